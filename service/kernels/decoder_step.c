/* One decode step of a llama decoder on GGUF blocks, every layer, in one call from Python.
 *
 * The same computation as transformers' LlamaDecoderLayer (RMSNorm, rotary q/k, grouped-query
 * attention, SiLU-gated MLP, residuals), with the matmuls of block_matmul.c and the attention of
 * decode_attention.c. Run from torch, a step is ~55 small ops a layer, and at one row their
 * dispatch costs more than the arithmetic; here it is one call. Each row is computed on
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

static int multiply(const Matrix *m, const float *x, int64_t rows, float *y, int threads) {
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

/* The work between the matmuls, one row per item of a parallel job (at 16 rows, run alone it left
 * the other threads idle for ~4% of a decode step). What a job does with a row never depends on
 * the other rows. */
typedef struct {
    const Decoder *d;
    const float *norm;  /* RMSNorm weights: of the next sublayer, or the final norm */
    int add;  /* first x += delta (the previous sublayer's output) */
    float *x, *delta, *normed, *qkv, *gate_up, *act;
    const float *cos, *sin;  /* each row's, or NULL: from the decoder's table, by position */
    const int64_t *positions;
} Rows;

/* x[r] += delta[r] (when `add`), then normed[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight (LlamaRMSNorm) */
static void residual_norm_row(void *ctx, int64_t r) {
    const Rows *j = ctx;
    const int64_t hidden = j->d->hidden;
    float *row = j->x + r * hidden, *y = j->normed + r * hidden;
    if (j->add)
        for (int64_t c = 0; c < hidden; c++) row[c] += j->delta[r * hidden + c];
    v16f squares = (v16f){0};
    for (int64_t c = 0; c < hidden; c += LANES) squares += load16(row + c) * load16(row + c);
    const float inverse = 1.0f / sqrtf(sum_lanes(squares) / (float)hidden + j->d->eps);
    for (int64_t c = 0; c < hidden; c += LANES) store16(y + c, load16(row + c) * inverse * load16(j->norm + c));
}

/* In place, the q and k heads of row r (side by side in qkv): x*cos + rotate_half(x)*sin */
static void rotate_row(void *ctx, int64_t r) {
    const Rows *j = ctx;
    const int64_t head_dim = j->d->head_dim, half = head_dim / 2, heads = j->d->heads + j->d->kv_heads;
    const int64_t width = (j->d->heads + 2 * j->d->kv_heads) * head_dim;
    const float *c = j->cos ? j->cos + r * head_dim : j->d->rope_cos + j->positions[r] * head_dim;
    const float *s = j->sin ? j->sin + r * head_dim : j->d->rope_sin + j->positions[r] * head_dim;
    for (int64_t h = 0; h < heads; h++) {
        float *head = j->qkv + r * width + h * head_dim;
        for (int64_t i = 0; i < half; i++) {
            const float a = head[i], b = head[i + half];
            head[i] = a * c[i] - b * s[i];
            head[i + half] = b * c[i + half] + a * s[i + half];
        }
    }
}

/* act[r] = silu(gate) * up, from gate_up[r] = (gate, up) */
static void silu_times_up_row(void *ctx, int64_t r) {
    const Rows *j = ctx;
    const int64_t intermediate = j->d->intermediate;
    const float *gate = j->gate_up + r * 2 * intermediate, *up = gate + intermediate;
    for (int64_t c = 0; c < intermediate; c += LANES) {
        const v16f g = load16(gate + c);
        store16(j->act + r * intermediate + c, g / (1.0f + exp16(-g)) * load16(up + c));
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
    /* A failure part way leaves the rows' caches written up to some layer: their requests end (the
     * engine fails the step's sequences), and a row's cache is rewritten before it is read again. */
    int status = normed && qkv && attended && gate_up && act && delta ? KERNEL_OK : KERNEL_NO_MEMORY;
    if (status == KERNEL_OK)
        for (int64_t r = 0; r < rows; r++) memcpy(x + r * hidden, d->embedding + ids[r] * hidden, sizeof(float) * hidden);
    Rows j = {d, 0, 0, x, delta, normed, qkv, gate_up, act, cos, sin, positions};
    for (int64_t l = 0; l < d->layers && status == KERNEL_OK; l++) {
        const Layer *layer = d->layer + l;
        j.norm = layer->input_norm, j.add = l > 0;  /* the previous layer's MLP output, added here */
        parallel_for(rows, threads, residual_norm_row, &j);
        if ((status = multiply(&layer->qkv, normed, rows, qkv, threads))) break;
        parallel_for(rows, threads, rotate_row, &j);
        status = decode_attention(qkv, qkv_width, head_dim,
                                  qkv + heads * head_dim, qkv_width, head_dim,
                                  qkv + (heads + kv) * head_dim, qkv_width, head_dim,
                                  (char *)d->cache_k + l * layer_cache * element,
                                  (char *)d->cache_v + l * layer_cache * element,
                                  (int)d->half_cache, positions, slots,
                                  rows, heads, kv, head_dim, d->max_rows, d->max_len, d->attention_scale, attended, threads);
        if (status || (status = multiply(&layer->o, attended, rows, delta, threads))) break;
        j.norm = layer->post_attention_norm, j.add = 1;
        parallel_for(rows, threads, residual_norm_row, &j);
        if ((status = multiply(&layer->gate_up, normed, rows, gate_up, threads))) break;
        parallel_for(rows, threads, silu_times_up_row, &j);
        status = multiply(&layer->down, act, rows, delta, threads);
    }
    if (status == KERNEL_OK) {
        j.norm = d->final_norm, j.add = d->layers > 0;
        parallel_for(rows, threads, residual_norm_row, &j);
        memcpy(x, normed, sizeof(float) * rows * hidden);
        if (logits) {
            status = multiply(&d->lm_head, x, rows, logits, threads);
            if (status == KERNEL_OK && argmax) argmax_rows(logits, rows, d->lm_head.out_features, argmax, threads);
        }
    }
    free(normed); free(qkv); free(attended); free(gate_up); free(act); free(delta);
    return status;
}
