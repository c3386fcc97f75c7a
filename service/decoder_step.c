/* One decode step of a llama decoder on GGUF blocks, every layer, in one call from Python.
 *
 * The same computation as transformers' LlamaDecoderLayer (RMSNorm, rotary q/k, grouped-query
 * attention, SiLU-gated MLP, residuals), with the matmuls of block_matmul.c and the attention of
 * decode_attention.c. Run from torch, a step is ~55 small ops a layer, and at one row their
 * dispatch costs more than the arithmetic; here it is one ctypes call. Each row is computed on
 * its own with fixed reduction orders, so a row gets the same bits in any batch. Against the
 * transformers layers the results differ in the last bits only (the order of sums, exp).
 *
 * Shapes: hidden, intermediate and head_dim multiples of 16 (the caller checks).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec16.h"

void q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
               const float *minimum, int64_t N, float *y, int threads);
void q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scale,
               int64_t N, float *y, int threads);
void q4_matmul_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                    const float *minimum, int64_t N, float *y, int threads);
void q8_matmul_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                    int64_t N, float *y, int threads);
void decode_attention(const float *q, int64_t q_row, int64_t q_head, const float *k, int64_t k_row,
                      int64_t k_head, const float *v, int64_t v_row, int64_t v_head, void *cache_k,
                      void *cache_v, int half, const int64_t *positions, const int64_t *slots,
                      int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_len,
                      float scale, float *out, int threads);

typedef struct {
    int64_t bits;  /* 4: Q4_1 (codes, scale, minimum); 8: Q8_0 (codes, scale) */
    int64_t int8_activations;  /* 1: block_matmul_int8.c and its layout; 0: block_matmul.c */
    int64_t out_features, in_features;
    const void *codes;
    const float *scale, *minimum;
} Matrix;

typedef struct {
    const float *input_norm, *post_attention_norm;  /* RMSNorm weights, [hidden] */
    Matrix qkv, o, gate_up, down;  /* q, k, v and gate, up stacked along the outputs */
} Layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, attention_scale;
    const Layer *layer;
    const float *final_norm;
    void *cache_k, *cache_v;  /* [layers, max_rows, kv_heads, max_len, head_dim] */
    int64_t half_cache;  /* 1: the cache holds float16, else float32 */
    int64_t max_rows, max_len;
} Decoder;

static void multiply(const Matrix *m, const float *x, int64_t rows, float *y, int threads) {
    if (m->int8_activations && m->bits == 4)
        q4_matmul_int8(x, rows, m->in_features, m->codes, m->scale, m->minimum, m->out_features, y, threads);
    else if (m->int8_activations)
        q8_matmul_int8(x, rows, m->in_features, m->codes, m->scale, m->out_features, y, threads);
    else if (m->bits == 4)
        q4_matmul(x, rows, m->in_features, m->codes, m->scale, m->minimum, m->out_features, y, threads);
    else
        q8_matmul(x, rows, m->in_features, m->codes, m->scale, m->out_features, y, threads);
}

/* y = x / sqrt(mean(x^2) + eps) * weight, per row (LlamaRMSNorm) */
static void rms_norm(const float *x, const float *weight, float *y, int64_t rows, int64_t hidden, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * hidden;
        v16f squares = (v16f){0};
        for (int64_t c = 0; c < hidden; c += LANES) squares += load16(row + c) * load16(row + c);
        const float inverse = 1.0f / sqrtf(sum_lanes(squares) / (float)hidden + eps);
        for (int64_t c = 0; c < hidden; c += LANES)
            store16(y + r * hidden + c, load16(row + c) * inverse * load16(weight + c));
    }
}

/* In place, each head of `heads` in a row of width `width`: x*cos + rotate_half(x)*sin */
static void rotate(float *x, int64_t rows, int64_t width, int64_t heads, int64_t head_dim,
                   const float *cos, const float *sin) {
    const int64_t half = head_dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * head_dim, *s = sin + r * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *head = x + r * width + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = head[i], b = head[i + half];
                head[i] = a * c[i] - b * s[i];
                head[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* act = silu(gate) * up, from [rows, 2 * intermediate] (gate, then up) */
static void silu_times_up(const float *gate_up, float *act, int64_t rows, int64_t intermediate) {
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * intermediate, *up = gate + intermediate;
        for (int64_t c = 0; c < intermediate; c += LANES) {
            const v16f g = load16(gate + c);
            store16(act + r * intermediate + c, g / (1.0f + exp16(-g)) * load16(up + c));
        }
    }
}

static void add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* x: [rows, hidden], the tokens' embeddings in, the final-norm hidden states out.
 * cos, sin: [rows, head_dim] for each row's position; positions: where each row's key goes.
 * slots: each row's cache slot, or NULL for slot r (decode: one token per sequence). A prompt's
 * tokens may share one slot, each attending up to its own position (decode_attention.c): then this
 * is a prefill, and a token's result is the same however its prompt is split into chunks. */
void decoder_step(const Decoder *d, float *x, const float *cos, const float *sin,
                  const int64_t *positions, const int64_t *slots, int64_t rows, int threads) {
    const int64_t hidden = d->hidden, head_dim = d->head_dim, heads = d->heads, kv = d->kv_heads;
    const int64_t qkv_width = (heads + 2 * kv) * head_dim, layer_cache = d->max_rows * kv * d->max_len * head_dim;
    const int64_t element = d->half_cache ? 2 : 4;  /* bytes per cached value */
    float *normed = malloc(sizeof(float) * rows * hidden);
    float *qkv = malloc(sizeof(float) * rows * qkv_width);
    float *attended = malloc(sizeof(float) * rows * heads * head_dim);
    float *gate_up = malloc(sizeof(float) * rows * 2 * d->intermediate);
    float *act = malloc(sizeof(float) * rows * d->intermediate);
    float *delta = malloc(sizeof(float) * rows * hidden);
    for (int64_t l = 0; l < d->layers; l++) {
        const Layer *layer = d->layer + l;
        rms_norm(x, layer->input_norm, normed, rows, hidden, d->eps);
        multiply(&layer->qkv, normed, rows, qkv, threads);
        rotate(qkv, rows, qkv_width, heads + kv, head_dim, cos, sin);  /* q and k heads, side by side */
        decode_attention(qkv, qkv_width, head_dim,
                         qkv + heads * head_dim, qkv_width, head_dim,
                         qkv + (heads + kv) * head_dim, qkv_width, head_dim,
                         (char *)d->cache_k + l * layer_cache * element, (char *)d->cache_v + l * layer_cache * element,
                         (int)d->half_cache, positions, slots,
                         rows, heads, kv, head_dim, d->max_len, d->attention_scale, attended, threads);
        multiply(&layer->o, attended, rows, delta, threads);
        add(x, delta, rows * hidden);
        rms_norm(x, layer->post_attention_norm, normed, rows, hidden, d->eps);
        multiply(&layer->gate_up, normed, rows, gate_up, threads);
        silu_times_up(gate_up, act, rows, d->intermediate);
        multiply(&layer->down, act, rows, delta, threads);
        add(x, delta, rows * hidden);
    }
    rms_norm(x, d->final_norm, normed, rows, hidden, d->eps);
    memcpy(x, normed, sizeof(float) * rows * hidden);
    free(normed); free(qkv); free(attended); free(gate_up); free(act); free(delta);
}
