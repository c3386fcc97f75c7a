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
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "thread_pool.h"
#include "vec16.h"

#define MAX_CHUNKS 16  /* head_dim <= 256 */

typedef struct {
    const float *q, *k, *v;
    int64_t q_row, q_head, k_row, k_head, v_row, v_head;
    float *cache_k, *cache_v;
    const int64_t *positions;
    int64_t heads, kv_heads, head_dim, max_len;
    float scale;
    float *out;
} Attention;

/* One item: one row's one kv head, and the query heads that share it. */
static void attend(void *ctx, int64_t item) {
    const Attention *a = ctx;
    const float *q = a->q, *k = a->k, *v = a->v;
    const int64_t q_row = a->q_row, q_head = a->q_head, k_row = a->k_row, k_head = a->k_head;
    const int64_t v_row = a->v_row, v_head = a->v_head, heads = a->heads, kv_heads = a->kv_heads;
    const int64_t head_dim = a->head_dim, max_len = a->max_len, *positions = a->positions;
    const int64_t group = heads / kv_heads, chunks = head_dim / LANES;
    float *cache_k = a->cache_k, *cache_v = a->cache_v, *out = a->out;
    const float scale = a->scale;
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
            v16f dot = load16(query) * load16(keys + j * head_dim);
            for (int64_t c = 1; c < chunks; c++)
                dot += load16(query + c * LANES) * load16(keys + j * head_dim + c * LANES);
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
            for (int64_t c = 0; c < chunks; c++) acc[c] += scores[j] * load16(values + j * head_dim + c * LANES);
        for (int64_t c = 0; c < chunks; c++) store16(out + (r * heads + h) * head_dim + c * LANES, acc[c] * inverse);
    }
    free(scores);
}

void decode_attention(
    const float *q, int64_t q_row, int64_t q_head,
    const float *k, int64_t k_row, int64_t k_head,
    const float *v, int64_t v_row, int64_t v_head,
    float *cache_k, float *cache_v, const int64_t *positions,
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_len,
    float scale, float *out, int threads)
{
    Attention a = {q, k, v, q_row, q_head, k_row, k_head, v_row, v_head, cache_k, cache_v, positions,
                   heads, kv_heads, head_dim, max_len, scale, out};
    parallel_for(rows * kv_heads, threads, attend, &a);
}
