/* Attention for one new token per row over the row's own slot of the KV cache, in one call.
 *
 * The torch version (model_runner.decode_attention) needs ~16 small ops a layer, the key/value
 * writes included, and pads every row to the longest one's keys in blocks of 64 so that a row's
 * result does not depend on its batch. Here each (row, kv head) is computed alone, over exactly
 * its own positions, in a fixed order: the same bits whatever else is in the batch, no padding,
 * and ~1 ms a step at 16 rows instead of ~6-7 (measured at ~200 keys).
 *
 * Layout: q[r, h, :] at q + r * q_row + h * q_head (likewise the new k and v, per kv head);
 * cache [rows_max, kv_heads, max_len, head_dim], contiguous; out [rows, heads, head_dim].
 * head_dim must be a multiple of 16, at most 256 (the caller checks); exp is a fixed polynomial (below), not
 * libm's, so it vectorises and gives the same bits everywhere.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef float v2f __attribute__((vector_size(8)));

#define LANES 16
#define MAX_CHUNKS 16  /* head_dim <= 256 */

static inline v16f load(const float *p) { v16f v; memcpy(&v, p, sizeof(v)); return v; }
static inline void store(float *p, v16f v) { memcpy(p, &v, sizeof(v)); }

static inline float sum_lanes(v16f v) {  /* a fixed tree of additions: halves, quarters, ... */
    const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
                + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    const v2f c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
    return c[0] + c[1];
}

/* e^x, as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial, times 2^n.
 * Relative error ~2e-7 over the range softmax uses (x <= 0). */
static inline v16f exp16(v16f x) {
    const v16f lo = (v16f){0} - 87.3f;
    const v16i underflow = x < lo;  /* e^x taken as 0 there (-inf included) */
    x = (v16f)(((v16i)lo & underflow) | ((v16i)x & ~underflow));
    const v16f t = x * 1.44269504088896341f + 0.5f;
    v16i n = __builtin_convertvector(t, v16i);  /* truncates toward zero: make it floor */
    n -= (v16i)(__builtin_convertvector(n, v16f) > t) & 1;
    const v16f fn = __builtin_convertvector(n, v16f);
    const v16f r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    v16f p = (v16f){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return (v16f)((v16i)(p * (v16f)((n + 127) << 23)) & ~underflow);
}

void decode_attention(
    const float *q, int64_t q_row, int64_t q_head,
    const float *k, int64_t k_row, int64_t k_head,
    const float *v, int64_t v_row, int64_t v_head,
    float *cache_k, float *cache_v, const int64_t *positions,
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_len,
    float scale, float *out, int threads)
{
    const int64_t group = heads / kv_heads, chunks = head_dim / LANES;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < rows * kv_heads; item++) {
        const int64_t r = item / kv_heads, g = item % kv_heads, length = positions[r] + 1;
        float *keys = cache_k + (r * kv_heads + g) * max_len * head_dim;
        float *values = cache_v + (r * kv_heads + g) * max_len * head_dim;
        memcpy(keys + positions[r] * head_dim, k + r * k_row + g * k_head, head_dim * sizeof(float));
        memcpy(values + positions[r] * head_dim, v + r * v_row + g * v_head, head_dim * sizeof(float));
        float *scores = malloc((size_t)(length + LANES) * sizeof(float));
        for (int64_t h = g * group; h < (g + 1) * group; h++) {
            const float *query = q + r * q_row + h * q_head;
            float top = -INFINITY;
            for (int64_t j = 0; j < length; j++) {
                v16f dot = load(query) * load(keys + j * head_dim);
                for (int64_t c = 1; c < chunks; c++)
                    dot += load(query + c * LANES) * load(keys + j * head_dim + c * LANES);
                scores[j] = sum_lanes(dot) * scale;
                top = scores[j] > top ? scores[j] : top;
            }
            for (int64_t j = length; j < length + LANES; j++) scores[j] = -INFINITY;  /* a whole vector */
            v16f total = (v16f){0};
            for (int64_t j = 0; j < length; j += LANES) {
                const v16f e = exp16(load(scores + j) - top);
                store(scores + j, e);
                total += e;
            }
            const float inverse = 1.0f / sum_lanes(total);
            v16f acc[MAX_CHUNKS];
            for (int64_t c = 0; c < chunks; c++) acc[c] = (v16f){0};
            for (int64_t j = 0; j < length; j++)
                for (int64_t c = 0; c < chunks; c++) acc[c] += scores[j] * load(values + j * head_dim + c * LANES);
            for (int64_t c = 0; c < chunks; c++) store(out + (r * heads + h) * head_dim + c * LANES, acc[c] * inverse);
        }
        free(scores);
    }
}
