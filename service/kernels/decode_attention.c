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
 * head_dim must be a multiple of 16, at most 256, and max_len of 16 (the caller checks).
 * Values are stored by position; keys in blocks of 16 positions, each block dimension-major
 * ([head_dim][16], see key_at), so a vector holds one dimension of 16 keys and their 16 scores
 * are plain multiply-adds. Stored by position, each score ended in a horizontal sum: a 3,000-token
 * prefill took 4.4 s instead of 3.2, most of it in attention.
 *
 * The cache holds float32, or float16 (`half`, as llama.cpp keeps its cache; AVX-512 only): at 16
 * rows a step reads every row's keys and values, ~85 MB at ~115 positions in float32, and about
 * half of this attention's time is that read. The query heads that share a kv head are computed
 * together, so each key and value is read and converted once for them (~25% less time with the
 * cache in L2; 30 layers of 16 rows x 116 keys: ~6.1 ms on one thread from memory, 2.7 from L2).
 *
 * A sliding window reads only the window's keys: from the block of 16 its first key falls in, the
 * keys before it in that block masked. A soft cap (Gemma 2) bends each score as it is computed,
 * before the window's mask.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "alloc.h"
#include "kernels.h"
#include "thread_pool.h"
#include "vec16.h"

#define MAX_CHUNKS 16  /* head_dim <= 256 */
#define HEAD_BLOCK 4  /* query heads computed together over one read of their kv head */
#define KEY_BLOCK 16  /* key positions per dimension-major block of the key cache: a vector */

typedef struct {
    const float *q, *k, *v;
    int64_t q_row, q_head, k_row, k_head, v_row, v_head;
    void *cache_k, *cache_v;
    const int64_t *positions, *slots;
    int64_t heads, kv_heads, head_dim, max_len;
    int64_t window;  /* a row attends to its last `window` positions, itself included; 0: all */
    float softcap;  /* scores -> softcap * tanh(scores / softcap); 0: as they are */
    float scale;
    float *out;
    atomic_int *failed;  /* set when an item could not allocate its scores: the call answers KERNEL_NO_MEMORY */
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

/* Element d of the key at position p, in a (slot, kv head)'s keys: blocks of KEY_BLOCK positions,
 * each stored dimension-major ([head_dim][KEY_BLOCK]), so that one vector holds a dimension of 16
 * keys and 16 scores are 16-lane multiply-adds, with no horizontal sum per key. */
static inline int64_t key_at(int64_t p, int64_t d, int64_t head_dim) {
    return (p / KEY_BLOCK) * KEY_BLOCK * head_dim + d * KEY_BLOCK + p % KEY_BLOCK;
}

/* Where row r's keys and values for kv head g start in the cache: its slot's, for that head. */
static inline int64_t slot_base(const Attention *a, int64_t r, int64_t g) {
    const int64_t slot = a->slots ? a->slots[r] : r;
    return (slot * a->kv_heads + g) * a->max_len * a->head_dim;
}

/* Row r's new key and value for kv head g, at its position in its slot (`base`). */
static inline void write_new(const Attention *a, int64_t r, int64_t g, int64_t base, int half) {
    const int64_t head_dim = a->head_dim, p = a->positions[r];
    const float *key = a->k + r * a->k_row + g * a->k_head;
    const int64_t at = base + key_at(p, 0, head_dim);
    for (int64_t d = 0; d < head_dim; d++) {
#ifdef __AVX512F__
        if (half) {
            ((uint16_t *)a->cache_k)[at + d * KEY_BLOCK] = _cvtss_sh(key[d], _MM_FROUND_TO_NEAREST_INT);
            continue;
        }
#endif
        ((float *)a->cache_k)[at + d * KEY_BLOCK] = key[d];
    }
    cache_row(a->cache_v, base + p * head_dim, a->v + r * a->v_row + g * a->v_head, head_dim, half);
}

/* Query heads h0..h0+n-1 of row r over one kv head's cached keys and values (`base`). Each key and
 * value is read (and converted, from float16) once for all n heads, each head's sums in the same
 * order as alone (the last bits may still differ with n, as the compiler fuses multiply-adds per
 * instance; n depends on the model only, so a row's result does not depend on its batch). `half`,
 * `chunks` (head_dim / 16) and `n` are constants after inlining, so the n * chunks accumulators
 * stay in registers. */
static inline __attribute__((always_inline)) void attend_heads(
    const Attention *a, int64_t r, int64_t h0, int n, int64_t base, int64_t first, int64_t length, int half,
    int64_t chunks, float *scores)
{
    /* Keys first..length-1; scores from the start of first's block (`start`), those before first
     * masked: a window starts anywhere in a block. Without one, first = start = 0. */
    const int64_t start = first / KEY_BLOCK * KEY_BLOCK, span = length - start;
    const int64_t head_dim = chunks * LANES, stride = span + LANES;  /* scores: one row per head */
    const float *query[HEAD_BLOCK];
    for (int i = 0; i < n; i++) query[i] = a->q + r * a->q_row + (h0 + i) * a->q_head;
    const int64_t blocks = (length + KEY_BLOCK - 1) / KEY_BLOCK;
    for (int64_t b = start / KEY_BLOCK; b < blocks; b++) {
        /* two chains per head over the dimensions (even, odd), so the multiply-adds overlap */
        v16f even[HEAD_BLOCK], odd[HEAD_BLOCK];
        for (int i = 0; i < n; i++) even[i] = odd[i] = (v16f){0};
        const int64_t block = base + b * KEY_BLOCK * head_dim;
        for (int64_t d = 0; d < head_dim; d += 2) {
            const v16f k0 = cached16(a->cache_k, block + d * KEY_BLOCK, half);
            const v16f k1 = cached16(a->cache_k, block + (d + 1) * KEY_BLOCK, half);
            for (int i = 0; i < n; i++) {
                even[i] += query[i][d] * k0;
                odd[i] += query[i][d + 1] * k1;
            }
        }
        for (int i = 0; i < n; i++) {
            v16f s = (even[i] + odd[i]) * a->scale;
            if (a->softcap != 0.0f) s = tanh16(s / a->softcap) * a->softcap;  /* as transformers: / tanh * */
            store16(scores + i * stride + b * KEY_BLOCK - start, s);
        }
    }
    float top[HEAD_BLOCK];
    for (int i = 0; i < n; i++) {
        float *row = scores + i * stride;
        for (int64_t j = 0; j < first - start; j++) row[j] = -INFINITY;  /* before the window */
        for (int64_t j = span; j < span + LANES; j++) row[j] = -INFINITY;  /* past the last key */
        v16f most = load16(row);
        for (int64_t j = LANES; j < span; j += LANES) most = max16(most, load16(row + j));
        top[i] = max_lanes(most);
    }
    float inverse[HEAD_BLOCK];
    for (int i = 0; i < n; i++) {
        float *row = scores + i * stride;
        v16f total = (v16f){0};
        for (int64_t j = 0; j < span; j += LANES) {
            const v16f e = exp16(load16(row + j) - top[i]);
            store16(row + j, e);
            total += e;
        }
        inverse[i] = 1.0f / sum_lanes(total);
    }
    v16f acc[HEAD_BLOCK][MAX_CHUNKS];
    for (int i = 0; i < n; i++)
        for (int64_t c = 0; c < chunks; c++) acc[i][c] = (v16f){0};
    for (int64_t j = first; j < length; j++) {
        for (int64_t c = 0; c < chunks; c++) {
            const v16f value = cached16(a->cache_v, base + j * head_dim + c * LANES, half);
            for (int i = 0; i < n; i++) acc[i][c] += scores[i * stride + j - start] * value;
        }
    }
    for (int i = 0; i < n; i++)
        for (int64_t c = 0; c < chunks; c++)
            store16(a->out + (r * a->heads + h0 + i) * head_dim + c * LANES, acc[i][c] * inverse[i]);
}

#define HEADS(count) case count: attend_heads(a, r, h, count, base, first, length, half, chunks, scores); break;

/* One item: one row's one kv head, and the query heads that share it, up to HEAD_BLOCK at a time
 * (fewer for larger heads, so their accumulators fit in registers). `half` and `chunks` are
 * constants after inlining. */
static inline __attribute__((always_inline)) void attend(const Attention *a, int64_t item, int half, int64_t chunks) {
    const int64_t kv_heads = a->kv_heads, group = a->heads / kv_heads;
    const int64_t r = item / kv_heads, g = item % kv_heads, length = a->positions[r] + 1;
    const int64_t first = a->window > 0 && length > a->window ? length - a->window : 0;
    const int64_t base = slot_base(a, r, g);
    if (!a->slots) write_new(a, r, g, base, half);
    const int64_t block = chunks <= 4 ? HEAD_BLOCK : chunks <= 8 ? 2 : 1;  /* block * chunks <= 16 */
    const int64_t span = length - first / KEY_BLOCK * KEY_BLOCK;
    float *scores = kernel_malloc((size_t)(block * (span + LANES)) * sizeof(float));
    if (!scores) {  /* a few KB: out of memory altogether; the step fails, the process goes on */
        atomic_store_explicit(a->failed, 1, memory_order_relaxed);
        return;
    }
    for (int64_t h = g * group; h < (g + 1) * group; h += block) {
        switch (h + block <= (g + 1) * group ? block : (g + 1) * group - h) {
            HEADS(1) HEADS(2) HEADS(3) HEADS(4)
        }
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

/* slots: the cache slot of each row, or NULL for slot r. Rows may share a slot (a prompt's tokens,
 * prefilled together): then every new key and value is written before any row attends, and each row
 * reads its slot up to its own position only, so token i sees tokens <= i, as a causal mask would.
 * window: a row attends to its last `window` positions, itself included (transformers' sliding
 * window: key > query - window); 0: to all. The cache still holds every position.
 * softcap: scores -> softcap * tanh(scores / softcap) (Gemma 2); 0: as they are. */
int decode_attention(
    const float *q, int64_t q_row, int64_t q_head,
    const float *k, int64_t k_row, int64_t k_head,
    const float *v, int64_t v_row, int64_t v_head,
    void *cache_k, void *cache_v, int half, const int64_t *positions, const int64_t *slots,
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_rows, int64_t max_len,
    int64_t window, float softcap, float scale, float *out, int threads)
{
    if (half && !half_kv_cache()) return KERNEL_UNSUPPORTED;  /* the caller asks half_kv_cache() first */
    if (head_dim % LANES || head_dim > MAX_CHUNKS * LANES || kv_heads <= 0 || heads % kv_heads || max_len % KEY_BLOCK
        || window < 0 || !(softcap >= 0.0f))
        return KERNEL_BAD_ARGUMENT;
    if (!slots && rows > max_rows) return KERNEL_BAD_ARGUMENT;
    for (int64_t r = 0; r < rows; r++)  /* a position or slot past the cache would write outside it */
        if (positions[r] < 0 || positions[r] >= max_len || (slots && (slots[r] < 0 || slots[r] >= max_rows)))
            return KERNEL_BAD_ARGUMENT;
    atomic_int failed = 0;
    Attention a = {q, k, v, q_row, q_head, k_row, k_head, v_row, v_head, cache_k, cache_v, positions, slots,
                   heads, kv_heads, head_dim, max_len, window, softcap, scale, out, &failed};
    if (slots)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t g = 0; g < kv_heads; g++) write_new(&a, r, g, slot_base(&a, r, g), half);
    parallel_for(rows * kv_heads, threads, half ? attend_float16 : attend_float32, &a);
    return atomic_load(&failed) ? KERNEL_NO_MEMORY : KERNEL_OK;
}
