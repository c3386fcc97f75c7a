/* Attention for one new token per row over the row's own slot of the KV cache, in one call.
 *
 * The torch version (model_runner.decode_attention) needs ~16 small ops a layer, the key/value
 * writes included, and pads every row to the longest one's keys in blocks of 64 so that a row's
 * result does not depend on its batch. Here each (row, kv head) is computed alone, over exactly
 * its own positions, in a fixed order: the same bits whatever else is in the batch, no padding,
 * and ~175 us a layer at 16 rows and ~200 keys instead of 330-450 (measured here).
 *
 * Layout: q[r, h, :] at q + r * q_row + h * q_head (likewise the new k and v, per kv head);
 * cache [rows_max, kv_heads, max_len, head_dim], contiguous; out [rows, heads, head_dim].
 * head_dim must be a multiple of 16, at most 256 (the caller checks).
 *
 * The cache holds float32, or float16 (`half`, as llama.cpp keeps its cache; AVX-512 only): at 16
 * rows a step reads every row's keys and values, ~85 MB at ~115 positions in float32, and that
 * read is what this attention's time is (the arithmetic is a few percent of it).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "thread_pool.h"
#include "vec16.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAX_CHUNKS 16  /* head_dim <= 256 */

typedef struct {
    const float *q, *k, *v;
    int64_t q_row, q_head, k_row, k_head, v_row, v_head;
    void *cache_k, *cache_v;
    const int64_t *positions;
    int64_t heads, kv_heads, head_dim, max_len;
    float scale;
    float *out;
} Attention;

/* 16 floats of a cache row: float32 or float16 (`half` is a constant after inlining) */
static inline v16f cached16(const void *cache, int64_t at, int half) {
#ifdef __AVX512F__
    if (half) return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + at)));
#endif
    return load16((const float *)cache + at);
}

static inline void cache_row(void *cache, int64_t at, const float *row, int64_t n, int half) {
#ifdef __AVX512F__
    if (half) {
        for (int64_t c = 0; c < n; c += LANES)
            _mm256_storeu_si256((__m256i *)((uint16_t *)cache + at + c),
                                _mm512_cvtps_ph(_mm512_loadu_ps(row + c), _MM_FROUND_TO_NEAREST_INT));
        return;
    }
#endif
    memcpy((float *)cache + at, row, n * sizeof(float));
}

/* One item: one row's one kv head, and the query heads that share it. `half` and `chunks`
 * (head_dim / 16) are constants after inlining, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void attend(const Attention *a, int64_t item, int half, int64_t chunks) {
    const float *q = a->q, *k = a->k, *v = a->v;
    const int64_t q_row = a->q_row, q_head = a->q_head, k_row = a->k_row, k_head = a->k_head;
    const int64_t v_row = a->v_row, v_head = a->v_head, heads = a->heads, kv_heads = a->kv_heads;
    const int64_t head_dim = a->head_dim, max_len = a->max_len, *positions = a->positions;
    const int64_t group = heads / kv_heads;
    float *out = a->out;
    const float scale = a->scale;
    const int64_t r = item / kv_heads, g = item % kv_heads, length = positions[r] + 1;
    const int64_t base = (r * kv_heads + g) * max_len * head_dim;  /* this slot's keys and values */
    cache_row(a->cache_k, base + positions[r] * head_dim, k + r * k_row + g * k_head, head_dim, half);
    cache_row(a->cache_v, base + positions[r] * head_dim, v + r * v_row + g * v_head, head_dim, half);
    float *scores = malloc((size_t)(length + LANES) * sizeof(float));
    for (int64_t h = g * group; h < (g + 1) * group; h++) {
        const float *query = q + r * q_row + h * q_head;
        float top = -INFINITY;
        for (int64_t j = 0; j < length; j++) {
            v16f dot = load16(query) * cached16(a->cache_k, base + j * head_dim, half);
            for (int64_t c = 1; c < chunks; c++)
                dot += load16(query + c * LANES) * cached16(a->cache_k, base + j * head_dim + c * LANES, half);
            scores[j] = sum_lanes(dot) * scale;
            top = scores[j] > top ? scores[j] : top;
        }
        for (int64_t j = length; j < length + LANES; j++) scores[j] = -INFINITY;  /* a whole vector */
        v16f total = (v16f){0};
        for (int64_t j = 0; j < length; j += LANES) {
            const v16f e = exp16(load16(scores + j) - top);
            store16(scores + j, e);
            total += e;
        }
        const float inverse = 1.0f / sum_lanes(total);
        v16f acc[MAX_CHUNKS];
        for (int64_t c = 0; c < chunks; c++) acc[c] = (v16f){0};
        for (int64_t j = 0; j < length; j++)
            for (int64_t c = 0; c < chunks; c++)
                acc[c] += scores[j] * cached16(a->cache_v, base + j * head_dim + c * LANES, half);
        for (int64_t c = 0; c < chunks; c++) store16(out + (r * heads + h) * head_dim + c * LANES, acc[c] * inverse);
    }
    free(scores);
}

/* Common head sizes (64, 128) compiled for their size; others take the general loop. */
#define ATTEND(name, half)                                                   \
    static void name(void *ctx, int64_t item) {                              \
        const Attention *a = ctx;                                            \
        switch (a->head_dim) {                                               \
            case 64: attend(a, item, half, 4); break;                        \
            case 128: attend(a, item, half, 8); break;                       \
            default: attend(a, item, half, a->head_dim / LANES); break;      \
        }                                                                    \
    }
ATTEND(attend_float32, 0)
ATTEND(attend_float16, 1)

/* Whether this build takes a float16 cache. */
int half_kv_cache(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

void decode_attention(
    const float *q, int64_t q_row, int64_t q_head,
    const float *k, int64_t k_row, int64_t k_head,
    const float *v, int64_t v_row, int64_t v_head,
    void *cache_k, void *cache_v, int half, const int64_t *positions,
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_len,
    float scale, float *out, int threads)
{
    if (half && !half_kv_cache()) abort();  /* the caller asks half_kv_cache() first */
    Attention a = {q, k, v, q_row, q_head, k_row, k_head, v_row, v_head, cache_k, cache_v, positions,
                   heads, kv_heads, head_dim, max_len, scale, out};
    parallel_for(rows * kv_heads, threads, half ? attend_float16 : attend_float32, &a);
}
