/* y = x @ W.T for a weight W kept as a GGUF file's blocks of 32: Q4_1 (4-bit codes, w = d*q + m)
 * or Q8_0 (8-bit signed codes, w = d*q), with d and m as float32 per block.
 *
 * Built at set-up for several instruction sets (build.py; ops.py picks one by the CPU) and called
 * through cffi. Why not torch's int4 kernel: that one takes bfloat16 activations and dequantizes the
 * weights again for every 4 rows; this one takes float32 activations as they are and dequantizes
 * once per 8 rows: 16 rows through gate+up take ~0.4 ms instead of ~0.68 here, and the result
 * is float32 throughout (the weights are exactly the file's: d*q + m is exact in float32). torch
 * has no kernel for Q8_0 at all; float32 MKL on the unpacked weights reads 4x the bytes.
 *
 * Every output element is one chain of fused multiply-adds over k in order 0..K-1, whatever the
 * number of rows, the row block it falls in, or the thread that computes it: a row gets the same
 * bits alone or in any batch, and a layer fused with others (more columns) gives the same bits.
 *
 * Layout, for N a multiple of 16 and K a multiple of 32 (a "tile" is 16 output columns):
 *   Q4_1 codes  [N/16][K/2][16] bytes: byte c of pair p holds the code of column c at k = 2p (low
 *               nibble) and at k = 2p + 1 (high nibble), so one 16-byte load gives two k's of a tile.
 *   Q8_0 codes  [N/16][K][16] signed bytes.
 *   scale       [N/16][K/32][16] floats, minimum likewise: per tile, block of 32 k's, column.
 *
 * q8_matmul_groups takes the other GGUF types on 8-bit codes (quantized.py repacks them at load,
 * the file's weights exactly): a minimum per group too (w = d*q + m: Q5_1, Q5_K), and/or groups of
 * 16 k's (Q6_K's sub-blocks); scale and minimum are then [N/16][K/group][16].
 * Written with GCC vector extensions, not intrinsics, so it compiles for any target: AVX-512 here.
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "thread_pool.h"

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));

#define TILE 16
#define GROUP 32
#define BLOCK_ROWS 8  /* rows sharing one dequantized weight: 8 x 2 tiles = 16 accumulators */
#define BLOCK_TILES 2
#define PANEL_ROWS 64  /* a multiple of BLOCK_ROWS */

static inline v16f dequantize(v16b codes, v16f scale, v16f minimum) {
    return __builtin_convertvector(__builtin_convertvector(codes, v16i), v16f) * scale + minimum;
}

/* Signed bytes widened as unsigned (q + 128), then shifted back: GCC vectorises only that widening. */
static inline v16f dequantize8(v16b codes, v16f scale) {
    const v16i widened = __builtin_convertvector(codes ^ 0x80, v16i) - 128;
    return __builtin_convertvector(widened, v16f) * scale;
}

/* Rows r0..r0+rows-1 times tiles t..t+tiles-1 of a 4- or 8-bit weight in groups of `group` k's,
 * with a minimum per group (always for 4 bits) or not; `rows`, `tiles`, `bits`, `group` and
 * `has_min` are constants after inlining. */
static inline __attribute__((always_inline)) void block(
    const float *x, int64_t K, const uint8_t *codes, const float *scale, const float *minimum,
    int64_t N, float *y, int64_t r0, int rows, int64_t t, int tiles, int bits, int group, int has_min)
{
    v16f acc[BLOCK_ROWS][BLOCK_TILES];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < tiles; j++) acc[r][j] = (v16f){0};
    const int64_t groups = K / group;
    for (int64_t g = 0; g < groups; g++) {
        v16f s[BLOCK_TILES], m[BLOCK_TILES];
        for (int j = 0; j < tiles; j++) {
            memcpy(&s[j], scale + ((t + j) * groups + g) * TILE, sizeof(v16f));
            if (has_min) memcpy(&m[j], minimum + ((t + j) * groups + g) * TILE, sizeof(v16f));
        }
        for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
            v16f even[BLOCK_TILES], odd[BLOCK_TILES];
            for (int j = 0; j < tiles; j++) {
                if (bits == 4) {
                    v16b pair;
                    memcpy(&pair, codes + ((t + j) * K + k) * (TILE / 2), sizeof(pair));
                    even[j] = dequantize(pair & 0x0F, s[j], m[j]);
                    odd[j] = dequantize(pair >> 4, s[j], m[j]);
                } else {
                    v16b first, second;
                    memcpy(&first, codes + ((t + j) * K + k) * TILE, sizeof(first));
                    memcpy(&second, codes + ((t + j) * K + k + 1) * TILE, sizeof(second));
                    even[j] = has_min ? dequantize8(first, s[j]) + m[j] : dequantize8(first, s[j]);
                    odd[j] = has_min ? dequantize8(second, s[j]) + m[j] : dequantize8(second, s[j]);
                }
            }
            for (int r = 0; r < rows; r++) {
                const float a = x[(r0 + r) * K + k], b = x[(r0 + r) * K + k + 1];
                for (int j = 0; j < tiles; j++) acc[r][j] += a * even[j];
                for (int j = 0; j < tiles; j++) acc[r][j] += b * odd[j];
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < tiles; j++) memcpy(y + (r0 + r) * N + (t + j) * TILE, &acc[r][j], sizeof(v16f));
}

#define ROWS(n) case n: block(x, K, codes, scale, minimum, N, y, r, n, t, tiles, bits, group, has_min); break;

/* Rows r_begin..r_end-1 in blocks of BLOCK_ROWS, for tiles t..t+tiles-1. */
static inline __attribute__((always_inline)) void rows(
    const float *x, int64_t r_begin, int64_t r_end, int64_t K, const uint8_t *codes, const float *scale,
    const float *minimum, int64_t N, float *y, int64_t t, int tiles, int bits, int group, int has_min)
{
    for (int64_t r = r_begin; r < r_end; r += BLOCK_ROWS) {
        switch (r_end - r < BLOCK_ROWS ? (int)(r_end - r) : BLOCK_ROWS) {
            ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
        }
    }
}

typedef struct {
    const float *x;
    int64_t M, K;
    const uint8_t *codes;
    const float *scale, *minimum;
    int64_t N;
    float *y;
} Matmul;

static int64_t column_blocks(int64_t N) { return (N / TILE + BLOCK_TILES - 1) / BLOCK_TILES; }

/* One item: BLOCK_TILES tiles (32 output columns) for one panel of up to PANEL_ROWS rows. Items run
 * panel by panel, so a prefill's activations stay in L2 while the column blocks pass over them
 * (1,536 tokens of prefill: C matmuls ~2.8 s with all rows per item). */
static inline __attribute__((always_inline)) void item(const Matmul *m, int64_t i, int bits, int group, int has_min) {
    const int64_t blocks = column_blocks(m->N), tiles = m->N / TILE;
    const int64_t r_begin = i / blocks * PANEL_ROWS, t = i % blocks * BLOCK_TILES;
    const int64_t r_end = r_begin + PANEL_ROWS < m->M ? r_begin + PANEL_ROWS : m->M;
    if (tiles - t >= BLOCK_TILES)
        rows(m->x, r_begin, r_end, m->K, m->codes, m->scale, m->minimum, m->N, m->y, t, BLOCK_TILES, bits,
             group, has_min);
    else
        rows(m->x, r_begin, r_end, m->K, m->codes, m->scale, m->minimum, m->N, m->y, t, 1, bits, group, has_min);
}

static void q4_item(void *ctx, int64_t i) { item(ctx, i, 4, GROUP, 1); }
static void q8_item(void *ctx, int64_t i) { item(ctx, i, 8, GROUP, 0); }
static void q8_min_item(void *ctx, int64_t i) { item(ctx, i, 8, GROUP, 1); }
static void q8_16_item(void *ctx, int64_t i) { item(ctx, i, 8, 16, 0); }
static void q8_16_min_item(void *ctx, int64_t i) { item(ctx, i, 8, 16, 1); }

static int64_t items(int64_t M, int64_t N) { return (M + PANEL_ROWS - 1) / PANEL_ROWS * column_blocks(N); }

int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
              const float *minimum, int64_t N, float *y, int threads)
{
    Matmul m = {x, M, K, codes, scale, minimum, N, y};
    parallel_for(items(M, N), threads, q4_item, &m);
    return KERNEL_OK;
}

int q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scale,
              int64_t N, float *y, int threads)
{
    Matmul m = {x, M, K, (const uint8_t *)codes, scale, 0, N, y};
    parallel_for(items(M, N), threads, q8_item, &m);
    return KERNEL_OK;
}

int q8_matmul_groups(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scale,
                     const float *minimum, int64_t group, int64_t N, float *y, int threads)
{
    if (group != 16 && group != GROUP) return KERNEL_BAD_ARGUMENT;
    Matmul m = {x, M, K, (const uint8_t *)codes, scale, minimum, N, y};
    item_fn fn = group == 16 ? (minimum ? q8_16_min_item : q8_16_item) : (minimum ? q8_min_item : q8_item);
    parallel_for(items(M, N), threads, fn, &m);
    return KERNEL_OK;
}
