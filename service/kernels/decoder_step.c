/* One decode step of a decoder on GGUF blocks, every layer, in one call from Python.
 *
 * The same computation as transformers' LlamaDecoderLayer (RMSNorm, rotary q/k, grouped-query
 * attention, SiLU-gated MLP, residuals), with the matmuls of block_matmul.c and the attention of
 * decode_attention.c; and what the other architectures' layers add, each switched on per layer or
 * per model by kernels.h's structs: the embeddings scaled (Gemma, Granite), projection biases
 * (Qwen2), the attention's and the MLP's outputs normalized before their residual adds (Gemma 2/3,
 * OLMo 2) and scaled (Granite), no norm before them (OLMo 2), q/k norms per head (Qwen3, Gemma 3) or
 * over all heads (OLMo 2), sliding windows, a rotary table per layer (Gemma 3's local and global
 * bases), part of each head rotated (Phi-3) or none (SmolLM3's NoPE layers), soft-capped scores
 * (Gemma 2), GELU (tanh) in the MLP, layer norms with biases and an ungated MLP (StarCoder2),
 * attention and MLP in parallel with interleaved rope and per-head q/k norm weights (Command R).
 * Gemma's (1 + w) norm weights come added. Run from torch, a
 * step is ~55 small ops a layer, and at one row their dispatch costs more than the arithmetic;
 * here it is one call. Each row is computed on
 * its own with fixed reduction orders, so a row gets the same bits in any batch. Against the
 * transformers layers the results differ in the last bits only (the order of sums, exp).
 * A decode step goes from token ids (their embeddings looked up here) to the lm_head's outputs,
 * and for greedy rows their argmax, so that Python runs no torch op around it.
 *
 * Shapes: hidden, intermediate and head_dim multiples of 16 (the caller checks).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "alloc.h"
#include "kernels.h"
#include "thread_pool.h"
#include "vec16.h"

static int multiply_blocks(const Matrix *m, const float *x, int64_t rows, float *y, int threads) {
    if (m->bits == 8 && (m->minimum || (m->group && m->group != 32))) {  /* Q5_1, Q5_K, Q6_K repacked */
        const int64_t group = m->group ? m->group : 32;
        if (m->int8_activations)
            return q8_matmul_groups_int8(x, rows, m->in_features, m->codes, m->scale, m->minimum, group,
                                         m->out_features, y, threads);
        return q8_matmul_groups(x, rows, m->in_features, m->codes, m->scale, m->minimum, group, m->out_features,
                                y, threads);
    }
    if (m->int8_activations && m->bits == 4)
        return q4_matmul_int8(x, rows, m->in_features, m->codes, m->scale, m->minimum, m->out_features, y, threads);
    if (m->int8_activations)
        return q8_matmul_int8(x, rows, m->in_features, m->codes, m->scale, m->out_features, y, threads);
    if (m->bits == 4)
        return q4_matmul(x, rows, m->in_features, m->codes, m->scale, m->minimum, m->out_features, y, threads);
    return q8_matmul(x, rows, m->in_features, m->codes, m->scale, m->out_features, y, threads);
}

/* y = x @ W.T, plus the bias where the Matrix has one (added after the sum, as torch's linear) */
static int multiply(const Matrix *m, const float *x, int64_t rows, float *y, int threads) {
    const int status = multiply_blocks(m, x, rows, y, threads);
    if (status == KERNEL_OK && m->bias)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < m->out_features; c++) y[r * m->out_features + c] += m->bias[c];
    return status;
}

/* The work between the matmuls, one row per item of a parallel job (at 16 rows, run alone it left
 * the other threads idle for ~4% of a decode step). What a job does with a row never depends on
 * the other rows. */
typedef struct {
    const Decoder *d;
    const float *norm, *norm_bias;  /* the norm's weights (and bias): of the next sublayer, or the final */
    int add;  /* first x += delta (the previous sublayer's output) */
    const float *delta_norm;  /* RMSNorm weights for delta before it is added; NULL: added as it is */
    const float *mlp_delta;  /* the MLP's output, added after delta (a parallel layer's); NULL: none */
    float *x, *delta, *normed, *qkv, *gate_up, *act;
    const float *cos, *sin;  /* each row's, or NULL: from a table, by position */
    const int64_t *positions;
    const Layer *layer;  /* the layer in flight: its q/k norms and rotary table */
} Rows;

/* 1 / sqrt(mean(row^2) + eps), the factor of an RMSNorm */
static inline float inverse_rms(const float *row, int64_t n, float eps) {
    v16f squares = (v16f){0};
    for (int64_t c = 0; c < n; c += LANES) squares += load16(row + c) * load16(row + c);
    return 1.0f / sqrtf(sum_lanes(squares) / (float)n + eps);
}

/* y = x / sqrt(mean(x^2) + eps) * weight (RMSNorm), or with the decoder's layer norms
 * (x - mean) / sqrt(mean((x - mean)^2) + eps) * weight + bias (bias NULL: none); over n values (a
 * multiple of 16); y may be x */
static inline void normalize(const Decoder *d, const float *x, float *y, int64_t n, const float *weight,
                             const float *bias) {
    if (!d->layer_norm) {
        const float inverse = inverse_rms(x, n, d->eps);
        for (int64_t i = 0; i < n; i += LANES) store16(y + i, load16(x + i) * inverse * load16(weight + i));
        return;
    }
    v16f total = (v16f){0}, squares = (v16f){0};
    for (int64_t i = 0; i < n; i += LANES) total += load16(x + i);
    const float mean = sum_lanes(total) / (float)n;
    for (int64_t i = 0; i < n; i += LANES) squares += (load16(x + i) - mean) * (load16(x + i) - mean);
    const float inverse = 1.0f / sqrtf(sum_lanes(squares) / (float)n + d->eps);
    for (int64_t i = 0; i < n; i += LANES) {
        const v16f v = (load16(x + i) - mean) * inverse * load16(weight + i);
        store16(y + i, bias ? v + load16(bias + i) : v);
    }
}

/* x[r] += delta[r] (when `add`; normalized first with delta_norm, or times the residual scale; then
 * x[r] += mlp_delta[r] for a parallel layer), then normed[r] = the norm of x[r] (LlamaRMSNorm's, or
 * a layer norm), or x[r] as it is where the sublayer has no norm before it (OLMo 2) */
static void residual_norm_row(void *ctx, int64_t r) {
    const Rows *j = ctx;
    const int64_t hidden = j->d->hidden;
    const float scale = j->d->residual_scale != 0.0f ? j->d->residual_scale : 1.0f;  /* x * 1 is x */
    float *row = j->x + r * hidden, *y = j->normed + r * hidden;
    const float *delta = j->delta + r * hidden;
    if (j->add && j->delta_norm) {  /* Gemma, OLMo 2: residual + norm(delta); no residual scale with these */
        const float inverse = inverse_rms(delta, hidden, j->d->eps);
        for (int64_t c = 0; c < hidden; c += LANES)
            store16(row + c, load16(row + c) + load16(delta + c) * inverse * load16(j->delta_norm + c));
    } else if (j->add) {
        for (int64_t c = 0; c < hidden; c++) row[c] += delta[c] * scale;
    }
    if (j->add && j->mlp_delta)  /* Command R: residual + attention + MLP, in that order */
        for (int64_t c = 0; c < hidden; c++) row[c] += j->mlp_delta[r * hidden + c];
    if (!j->norm) {
        memcpy(y, row, sizeof(float) * hidden);
        return;
    }
    normalize(j->d, row, y, hidden, j->norm, j->norm_bias);
}

/* In place, the q and k heads of row r (side by side in qkv): normalized where the layer has q/k
 * norms (each head, or all q and all k heads at once), then, unless the layer has no rope, their first
 * rotary_dim values x*cos + rotate_half(x)*sin, from the row's own cos/sin, the layer's half-width
 * table or the decoder's table */
static void rotate_row(void *ctx, int64_t r) {
    const Rows *j = ctx;
    const Decoder *d = j->d;
    const int64_t head_dim = d->head_dim, heads = d->heads + d->kv_heads;
    const int64_t rotary = d->rotary_dim ? d->rotary_dim : head_dim, half = rotary / 2;
    const int64_t width = (d->heads + 2 * d->kv_heads) * head_dim;
    const Layer *layer = j->layer;
    float *qk = j->qkv + r * width;
    if (d->whole_qk_norm) {  /* OLMo 2: one RMS over all the q heads, one over all the k heads */
        float *k = qk + d->heads * head_dim;
        if (layer->q_norm) normalize(d, qk, qk, d->heads * head_dim, layer->q_norm, 0);
        if (layer->k_norm) normalize(d, k, k, d->kv_heads * head_dim, layer->k_norm, 0);
    }
    const float *c, *s;
    int64_t second;  /* where the second half's cos/sin start: the table repeats the first half */
    if (layer->rope_cos) {
        c = layer->rope_cos + j->positions[r] * half, s = layer->rope_sin + j->positions[r] * half, second = 0;
    } else {
        c = j->cos ? j->cos + r * rotary : d->rope_cos + j->positions[r] * rotary;
        s = j->sin ? j->sin + r * rotary : d->rope_sin + j->positions[r] * rotary;
        second = half;
    }
    for (int64_t h = 0; h < heads; h++) {
        float *head = qk + h * head_dim;
        const float *norm = h < d->heads ? layer->q_norm : layer->k_norm;
        if (norm && d->qk_norm_per_head) norm += (h < d->heads ? h : h - d->heads) * head_dim;
        if (norm && !d->whole_qk_norm) normalize(d, head, head, head_dim, norm, 0);
        if (layer->no_rope) continue;
        if (d->interleaved_rope) {  /* Command R: pairs (2i, 2i + 1), the table's entries in pairs too */
            for (int64_t i = 0; i < rotary; i += 2) {
                const float a = head[i], b = head[i + 1];
                head[i] = a * c[i] - b * s[i];
                head[i + 1] = b * c[i + 1] + a * s[i + 1];
            }
            continue;
        }
        for (int64_t i = 0; i < half; i++) {
            const float a = head[i], b = head[i + half];
            head[i] = a * c[i] - b * s[i];
            head[i + half] = b * c[i + second] + a * s[i + second];
        }
    }
}

/* The MLP's activation: torch's silu, or its gelu(approximate="tanh"): 0.5 x (1 + tanh(b (x + k x^3))) */
static inline v16f activate(const Decoder *d, v16f g) {
    if (d->activation == 1) {
        const float beta = 0.7978845608028654f, kappa = 0.044715f;
        return 0.5f * g * (1.0f + tanh16(beta * (g + kappa * g * g * g)));
    }
    return g / (1.0f + exp16(-g));
}

/* act[r] = act(gate) * up from gate_up[r] = (gate, up), or act(up) from gate_up[r] = up (ungated) */
static void activation_times_up_row(void *ctx, int64_t r) {
    const Rows *j = ctx;
    const Decoder *d = j->d;
    const int64_t intermediate = d->intermediate, width = d->ungated_mlp ? intermediate : 2 * intermediate;
    const float *gate = j->gate_up + r * width, *up = gate + intermediate;
    float *out = j->act + r * intermediate;
    for (int64_t c = 0; c < intermediate; c += LANES) {
        const v16f a = activate(d, load16(gate + c));
        store16(out + c, d->ungated_mlp ? a : a * load16(up + c));
    }
}

/* Each row's argmax over the lm_head's outputs, as numpy's argmax answers (what sampling.py's
 * greedy rows take): the first maximum, or the first NaN if there is one. */
typedef struct {
    const float *logits;
    int64_t vocab;
    int64_t *argmax;
} Argmax;

static int64_t first_argmax(const float *row, int64_t n) {
    int64_t i = 0, best = 0;
#ifdef __AVX512F__
    if (n >= LANES) {  /* per lane the first maximum; a NaN ends the search */
        __m512 most = _mm512_loadu_ps(row);
        __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i lanes = at;
        for (; i + LANES <= n; i += LANES) {
            const __m512 v = _mm512_loadu_ps(row + i);
            const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            if (nan) return i + __builtin_ctz(nan);
            const __mmask16 greater = _mm512_cmp_ps_mask(v, most, _CMP_GT_OQ);
            most = _mm512_mask_mov_ps(most, greater, v);
            at = _mm512_mask_mov_epi32(at, greater, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)i)));
        }
        const float top = _mm512_reduce_max_ps(most);
        const __mmask16 tied = _mm512_cmp_ps_mask(most, _mm512_set1_ps(top), _CMP_EQ_OQ);
        best = _mm512_mask_reduce_min_epi32(tied, at);  /* the earliest of the lanes' maxima */
    }
#endif
    for (; i < n; i++) {
        if (row[i] != row[i]) return i;  /* NaN */
        if (row[i] > row[best]) best = i;
    }
    return best;
}

static void argmax_row(void *ctx, int64_t r) {
    const Argmax *a = ctx;
    a->argmax[r] = first_argmax(a->logits + r * a->vocab, a->vocab);
}

void argmax_rows(const float *logits, int64_t rows, int64_t vocab, int64_t *argmax, int threads) {
    Argmax a = {logits, vocab, argmax};
    parallel_for(rows, threads, argmax_row, &a);
}

/* Row `id` of a Matrix's weight, from the kernels' layouts (quantized.py's Q4Matmul and Q8Matmul
 * say how they are packed), as blocks().dequantize() computes it: code * scale, then + minimum,
 * each rounded on its own (no fused multiply-add, as torch's two ops). */
__attribute__((optimize("fp-contract=off"))) static void matrix_row(const Matrix *m, int64_t id, float *out) {
    const int64_t K = m->in_features, tile = id / 16, lane = id % 16;
    const int64_t group = m->bits == 4 || !m->group ? 32 : m->group, groups = K / group;
    const uint8_t *codes = m->codes;
    const float *scale = m->scale + tile * groups * 16, *minimum = m->minimum ? m->minimum + tile * groups * 16 : 0;
    for (int64_t k = 0; k < K; k++) {
        int code;
        if (m->bits == 8 && m->int8_activations)  /* [tiles, K / 4, 16, 4], code + 128 */
            code = (int8_t)(codes[((tile * (K / 4) + k / 4) * 16 + lane) * 4 + k % 4] ^ 0x80);
        else if (m->bits == 8)  /* [tiles, K, 16] */
            code = ((const int8_t *)codes)[(tile * K + k) * 16 + lane];
        else if (m->int8_activations) {  /* [tiles, K / 8, 16, 4]: k % 8 = 4 * nibble + byte */
            const uint8_t byte = codes[((tile * (K / 8) + k / 8) * 16 + lane) * 4 + k % 4];
            code = k % 8 >= 4 ? byte >> 4 : byte & 15;
        } else {  /* [tiles, K / 2, 16]: even k in the low nibble */
            const uint8_t byte = codes[(tile * (K / 2) + k / 2) * 16 + lane];
            code = k % 2 ? byte >> 4 : byte & 15;
        }
        const int64_t at = (k / group) * 16 + lane;
        float w = (float)code * scale[at];
        if (minimum) w = w + minimum[at];
        out[k] = w;
    }
}

void matrix_rows(const Matrix *m, const int64_t *ids, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) matrix_row(m, ids[i], out + i * m->in_features);
}

/* out = the layer's MLP of j->normed */
static int mlp(const Layer *layer, Rows *j, int64_t rows, float *out, int threads) {
    int status = multiply(&layer->gate_up, j->normed, rows, j->gate_up, threads);
    if (status) return status;
    parallel_for(rows, threads, activation_times_up_row, j);
    return multiply(&layer->down, j->act, rows, out, threads);
}

/* ids: [rows] token ids; x: [rows, hidden], the final-norm hidden states out.
 * cos, sin: [rows, head_dim] for each row's position, or NULL where the decoder has a table (then a
 * step runs without a torch op before it, each of which would let the event loop's thread take
 * the GIL first); positions: where each row's key goes. logits: NULL, or [rows, vocab] for the
 * lm_head's outputs too (then argmax: NULL, or [rows] for each row's argmax).
 * slots: each row's cache slot, or NULL for slot r (decode: one token per sequence). A prompt's
 * tokens may share one slot, each attending up to its own position (decode_attention.c): then this
 * is a prefill, and a token's result is the same however its prompt is split into chunks. */
int decoder_step(const Decoder *d, const int64_t *ids, float *x, const float *cos, const float *sin,
                 const int64_t *positions, const int64_t *slots, int64_t rows, float *logits, int64_t *argmax,
                 int threads) {
    const int64_t hidden = d->hidden, head_dim = d->head_dim, heads = d->heads, kv = d->kv_heads;
    const int64_t qkv_width = (heads + 2 * kv) * head_dim, layer_cache = d->max_rows * kv * d->max_len * head_dim;
    const int64_t element = d->half_cache ? 2 : 4;  /* bytes per cached value */
    /* The rope table ends at max_len too, and layer 0 reads it before its attention checks the rest
     * (rows and slots against the cache): a position past it is refused here, before anything is read */
    for (int64_t r = 0; r < rows; r++)
        if (positions[r] < 0 || positions[r] >= d->max_len) return KERNEL_BAD_ARGUMENT;
    float *normed = kernel_malloc(sizeof(float) * rows * hidden);
    float *qkv = kernel_malloc(sizeof(float) * rows * qkv_width);
    float *attended = kernel_malloc(sizeof(float) * rows * heads * head_dim);
    float *gate_up = kernel_malloc(sizeof(float) * rows * 2 * d->intermediate);
    float *act = kernel_malloc(sizeof(float) * rows * d->intermediate);
    float *delta = kernel_malloc(sizeof(float) * rows * hidden);
    float *mlp_out = d->parallel ? kernel_malloc(sizeof(float) * rows * hidden) : 0;
    /* A failure part way leaves the rows' caches written up to some layer: their requests end (the
     * engine fails the step's sequences), and a row's cache is rewritten before it is read again. */
    int status = normed && qkv && attended && gate_up && act && delta && (mlp_out || !d->parallel)
                     ? KERNEL_OK : KERNEL_NO_MEMORY;
    if (status == KERNEL_OK)
        for (int64_t r = 0; r < rows; r++) {
            float *row = x + r * hidden;
            if (d->embedding)
                memcpy(row, d->embedding + ids[r] * hidden, sizeof(float) * hidden);
            else
                matrix_row(&d->embedding_blocks, ids[r], row);
            if (d->embedding_scale != 0.0f)
                for (int64_t c = 0; c < hidden; c++) row[c] *= d->embedding_scale;
        }
    Rows j = {d, 0, 0, 0, 0, 0, x, delta, normed, qkv, gate_up, act, cos, sin, positions, 0};
    for (int64_t l = 0; l < d->layers && status == KERNEL_OK; l++) {
        const Layer *layer = d->layer + l;
        j.layer = layer;
        /* the previous layer's MLP output (a parallel layer's attention and MLP outputs), added here */
        j.norm = layer->input_norm, j.norm_bias = layer->input_norm_bias, j.add = l > 0;
        j.delta_norm = l > 0 ? layer[-1].mlp_out_norm : 0, j.mlp_delta = l > 0 ? mlp_out : 0;
        parallel_for(rows, threads, residual_norm_row, &j);
        if ((status = multiply(&layer->qkv, normed, rows, qkv, threads))) break;
        parallel_for(rows, threads, rotate_row, &j);
        status = decode_attention(qkv, qkv_width, head_dim,
                                  qkv + heads * head_dim, qkv_width, head_dim,
                                  qkv + (heads + kv) * head_dim, qkv_width, head_dim,
                                  (char *)d->cache_k + l * layer_cache * element,
                                  (char *)d->cache_v + l * layer_cache * element,
                                  (int)d->half_cache, positions, slots, rows, heads, kv, head_dim,
                                  d->max_rows, d->max_len, layer->window, d->attention_softcap,
                                  d->attention_scale, attended, threads);
        if (status || (status = multiply(&layer->o, attended, rows, delta, threads))) break;
        if (d->parallel) {  /* the MLP of the same normed input; both added at the next norm */
            status = mlp(layer, &j, rows, mlp_out, threads);
            continue;
        }
        j.norm = layer->post_attention_norm, j.norm_bias = layer->post_attention_norm_bias, j.add = 1;
        j.delta_norm = layer->attention_out_norm, j.mlp_delta = 0;
        parallel_for(rows, threads, residual_norm_row, &j);
        status = mlp(layer, &j, rows, delta, threads);
    }
    if (status == KERNEL_OK) {
        j.norm = d->final_norm, j.norm_bias = d->final_norm_bias, j.add = d->layers > 0;
        j.delta_norm = d->layers > 0 ? d->layer[d->layers - 1].mlp_out_norm : 0;
        j.mlp_delta = d->layers > 0 ? mlp_out : 0;
        parallel_for(rows, threads, residual_norm_row, &j);
        memcpy(x, normed, sizeof(float) * rows * hidden);
        if (logits) {
            status = multiply(&d->lm_head, x, rows, logits, threads);
            if (status == KERNEL_OK && argmax) argmax_rows(logits, rows, d->lm_head.out_features, argmax, threads);
        }
    }
    free(normed); free(qkv); free(attended); free(gate_up); free(act); free(delta); free(mlp_out);
    return status;
}
