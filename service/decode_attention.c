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

#include "vec16.h"

#define MAX_CHUNKS 16  /* head_dim <= 256 */

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
}
