/* y = x @ W.T for the same GGUF blocks as block_matmul.c, with the activations rounded to 8 bits
 * as llama.cpp does for these weights (its Q8_1 "vec_dot" type): each row's blocks of 32 get a
 * scale dx = max|x| / 127 and signed codes qx = round(x / dx). Then a block's dot product is
 * integer: sum(qw * qx), four byte products per lane per instruction (AVX512-VNNI vpdpbusd),
 * four times the multiply-adds of a float32 FMA. At 16 rows the layers take ~2.1x less time than
 * block_matmul.c's float32 activations; the rounding moves a layer's outputs by ~5e-3 relative
 * (norm of the error over the norm of the output), and the default model's NLL by ~+0.005.
 *
 *   Q4_1 (w = dw * qw + mw):  y = sum over blocks of dw * dx * sum(qw * qx) + mw * dx * sum(qx)
 *   Q8_0 (w = dw * qw):       y = sum over blocks of dw * dx * sum(qw * qx)
 *
 * The integer sums are exact and the float sums run over blocks in order, so a row gets the same
 * bits alone or in any batch, and fused layers the same bits as separate ones. vpdpbusd multiplies
 * unsigned by signed bytes: Q4_1 codes are unsigned already; Q8_0 codes are kept as qw + 128,
 * and 128 * sum(qx) is taken off again.
 *
 * Layout, per tile of 16 output columns (N a multiple of 16, K of 32); a 64-byte line is 16
 * columns x 4 consecutive k's (byte 4c + i is column c at k + i), as vpdpbusd takes them:
 *   Q4_1 codes  [N/16][K/8][64]: low nibbles k..k+3, high nibbles k+4..k+7
 *   Q8_0 codes  [N/16][K/4][64], qw + 128
 *   scale, minimum: as block_matmul.c, [N/16][K/32][16] floats
 *
 * q8_matmul_groups_int8 takes 8-bit codes (qw + 128) with a minimum per group too (Q5_1, Q5_K:
 * the minimum term as Q4_1's), and/or groups of 16 k's (Q6_K): then a block of 32 activations
 * has two integer sums, one per group of 16, each scaled by its own group's scale and minimum.
 *
 * Built only where the compiler targets AVX512-VNNI; elsewhere int8_activations() is 0, the
 * matmuls answer KERNEL_UNSUPPORTED, and Python keeps block_matmul.c.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "alloc.h"
#include "kernels.h"
#include "thread_pool.h"

#define TILE 16
#define GROUP 32

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

int int8_activations(void) { return 1; }

#define BLOCK_ROWS 16  /* rows sharing one tile's unpacked codes: 16 accumulators + 8 code vectors */
#define PANEL_ROWS 128  /* rows per work item, so that a long prefill's codes stay in L2 */
#define AMX_ROWS 32  /* the fewest rows a matmul takes on AMX: at 16 (a decode step) it was slower */

/* The rounded activations: codes [M][K], and per row and block the scale, the sum of the codes,
 * and scale * sum (Q4_1's minimum term takes it as it is, broadcast from memory); and the sums of
 * each half block (groups of 16, for Q6_K's weights). */
typedef struct {
    int8_t *codes;
    float *scale;
    int32_t *sum;
    float *scaled_sum;
    int32_t *sum16;
} Activations;

static void quantize_row(const float *x, int64_t r, int64_t K, Activations *a) {
    const int64_t groups = K / GROUP;
    for (int64_t g = 0; g < groups; g++) {
        const float *block = x + r * K + g * GROUP;
        const __m512 lo = _mm512_loadu_ps(block), hi = _mm512_loadu_ps(block + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        /* A NaN or inf must reach the output, as in float32 (max may drop a NaN; codes are finite) */
        const int broken = _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q);
        const float dx = broken || __builtin_isinf(amax) ? __builtin_nanf("") : amax / 127.0f;
        const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const int rounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        const __m512i qlo = _mm512_cvt_roundps_epi32(_mm512_mul_ps(lo, inverse), rounding);
        const __m512i qhi = _mm512_cvt_roundps_epi32(_mm512_mul_ps(hi, inverse), rounding);
        _mm_storeu_si128((__m128i *)(a->codes + r * K + g * GROUP), _mm512_cvtsepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(a->codes + r * K + g * GROUP + 16), _mm512_cvtsepi32_epi8(qhi));
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
        a->sum16[(r * groups + g) * 2] = _mm512_reduce_add_epi32(qlo);
        a->sum16[(r * groups + g) * 2 + 1] = _mm512_reduce_add_epi32(qhi);
        a->scale[r * groups + g] = dx;
        a->sum[r * groups + g] = sum;
        a->scaled_sum[r * groups + g] = dx * (float)sum;
    }
}

typedef struct {
    const float *input;  /* [M][K] floats, rounded into x by the job's first M items */
    Activations *x;
    int64_t M, K;
    const uint8_t *codes;
    const float *scale, *minimum;
    int64_t N;
    float *y;
    atomic_llong rounded;  /* rows of x done */
    int amx;  /* whole blocks of 16 rows on the tile unit */
} Matmul;

/* acc + one group's integer sums (16 columns of one row) in floats: a group of 32 k's, or a group of
 * 16 (Q6_K's halves), each as block() has always computed it; AMX's sums go through the same steps,
 * so a row gets the same bits either way. */
static inline __attribute__((always_inline)) __m512 add_group32(
    __m512 acc, __m512i dot, __m512 scale, __m512 minimum, float dx, int32_t sum, float scaled_sum, int offset,
    int has_min)
{
    if (offset) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * sum));  /* summed over qw + 128 */
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(dx)), acc);
    if (has_min) acc = _mm512_fmadd_ps(minimum, _mm512_set1_ps(scaled_sum), acc);
    return acc;
}

static inline __attribute__((always_inline)) __m512 add_group16(
    __m512 acc, __m512i dot, __m512 s16, __m512 m16, float dx, int32_t sum, int offset, int has_min)
{
    if (offset) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * sum));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s16, _mm512_set1_ps(dx)), acc);
    if (has_min) acc = _mm512_fmadd_ps(m16, _mm512_set1_ps(dx * (float)sum), acc);
    return acc;
}

/* Vector h of group g's weight codes, as vpdpbusd takes them (unsigned): 4 k's (4h..4h+3) x 16
 * columns. Q4_1 lines hold k, k+4 in nibbles: line h/2's low nibbles for even h, high for odd. */
static inline __attribute__((always_inline)) __m512i group_codes(const uint8_t *lines, int64_t g, int h, int bits) {
    if (bits == 4) {
        const __m512i line = _mm512_loadu_si512(lines + (g * 4 + h / 2) * 64);
        return _mm512_and_si512(h % 2 ? _mm512_srli_epi16(line, 4) : line, _mm512_set1_epi8(0x0F));
    }
    return _mm512_loadu_si512(lines + (g * 8 + h) * 64);
}

static inline __m512i four_codes(const int8_t *codes) {  /* 4 activation bytes in every lane */
    int32_t four;
    __builtin_memcpy(&four, codes, sizeof(four));
    return _mm512_set1_epi32(four);
}

/* Rows r0..r0+rows-1 of tile t, weights in groups of `group` (32 or 16) k's with or without a
 * minimum (always for 4 bits); `rows`, `bits`, `group` and `has_min` are constants after inlining. */
static inline __attribute__((always_inline)) void block(const Matmul *m, int64_t r0, int rows, int64_t t, int bits,
                                                        int group, int has_min) {
    const int64_t K = m->K, groups = K / GROUP;
    const int8_t *x_codes = m->x->codes;
    const float *x_scale = m->x->scale, *x_scaled_sum = m->x->scaled_sum;
    const int32_t *x_sum = m->x->sum, *x_sum16 = m->x->sum16;
    const int64_t line_k = bits == 4 ? 8 : 4;  /* k's per 64-byte line */
    const uint8_t *lines = m->codes + t * (K / line_k) * 64;
    __m512 acc[BLOCK_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i w[8];  /* the group's codes, 4 k's a vector */
        /* the codes ~2 KB ahead (this tile's later groups, then the next tile's): the hardware
         * prefetcher alone left the lm_head at 16 rows waiting on memory */
        const uint8_t *group_lines = lines + g * (bits == 4 ? 4 : 8) * 64;
        for (int p = 0; p < (bits == 4 ? 4 : 8); p++) __builtin_prefetch(group_lines + 2048 + p * 64);
        for (int h = 0; h < 8; h++) w[h] = group_codes(lines, g, h, bits);
        /* Q4_1 lines hold k, k+4 in nibbles: vector h covers k = 8(h/2) + 4(h%2) either way */
        if (group == 16) {  /* two groups of 16 k's: vectors 0..3, then 4..7 */
            for (int half = 0; half < 2; half++) {
                const int64_t gg = 2 * g + half;
                const __m512 s16 = _mm512_loadu_ps(m->scale + (t * 2 * groups + gg) * TILE);
                const __m512 m16 = has_min ? _mm512_loadu_ps(m->minimum + (t * 2 * groups + gg) * TILE) : s16;
                for (int r = 0; r < rows; r++) {
                    const int64_t row = r0 + r;
                    const int8_t *qx = x_codes + row * K + g * GROUP;
                    __m512i dot = _mm512_setzero_si512();
                    for (int h = 4 * half; h < 4 * half + 4; h++)
                        dot = _mm512_dpbusd_epi32(dot, w[h], four_codes(qx + 4 * h));
                    acc[r] = add_group16(acc[r], dot, s16, m16, x_scale[row * groups + g],
                                         x_sum16[row * 2 * groups + gg], bits == 8, has_min);
                }
            }
            continue;
        }
        const __m512 scale = _mm512_loadu_ps(m->scale + (t * groups + g) * TILE);
        const __m512 minimum = has_min ? _mm512_loadu_ps(m->minimum + (t * groups + g) * TILE) : scale;
        for (int r = 0; r < rows; r++) {
            const int64_t row = r0 + r;
            const int8_t *qx = x_codes + row * K + g * GROUP;
            __m512i dot = _mm512_setzero_si512();
            for (int h = 0; h < 8; h++) dot = _mm512_dpbusd_epi32(dot, w[h], four_codes(qx + 4 * h));
            const int64_t at = row * groups + g;
            acc[r] = add_group32(acc[r], dot, scale, minimum, x_scale[at], x_sum[at], x_scaled_sum[at], bits == 8,
                                 has_min);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(m->y + (r0 + r) * m->N + t * TILE, acc[r]);
}

/* AMX (the tile unit of Intel CPUs since Sapphire Rapids): a group's 16 rows x 16 columns of integer
 * sums in one tile multiply (tdpbssd: signed activation codes by signed weight codes, the products
 * vpdpbusd sums less its +128 offset), then the same float steps as block(), so a row gets the same
 * bits with AMX or without, alone or in any batch. It replaces the 8 vpdpbusd a row takes per group,
 * and most of a long prefill's time is those. From 32 rows (AMX_ROWS): at 16 it was slower.
 *
 * Tiles, loaded with ldtilecfg at each item (the step thread shares its tile state with torch's
 * oneDNN, which loads its own): C 16 x 16 int32 sums; A 16 rows x 32 activation codes (a group);
 * B the group's weights, 8 rows of 64 bytes (4 k's x 16 columns, the layout these codes are kept
 * in); A16 and B16 the halves of a group for weights in groups of 16.
 * Linux lends a process the tile registers only after arch_prctl(ARCH_REQ_XCOMP_PERM), asked once;
 * without AMX, or TOKENWIRE_AMX=0, block() runs alone. */
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TILE_C 0
#define TILE_A 1
#define TILE_B 2
#define TILE_A16 3
#define TILE_B16 4
#define TILE_A_NEXT 5  /* the next group's, so that its tile multiply overlaps this group's float steps */
#define TILE_B_NEXT 6
#define TILE_C_NEXT 7

typedef struct __attribute__((aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static const TileConfig tile_config = {1, 0, {0}, {64, 32, 64, 16, 64, 32, 64, 64}, {16, 16, 8, 16, 4, 16, 8, 16}};

/* ldtilecfg of the whole 64-byte struct: gcc 12's _tile_loadconfig names only a pointer's worth
 * of memory as read, which let stores into a stack config be dropped (llama.cpp's AMX fault) */
static inline void load_tile_config(void) { __asm__ volatile("ldtilecfg %0" ::"m"(tile_config)); }

/* back to the tiles' initial state (cheaper context switches); gcc's _tile_release needs -mamx-tile */
static inline void release_tiles(void) { __asm__ volatile("tilerelease" ::); }

static atomic_int amx_state = -1;  /* -1: not asked yet; 0: no AMX here; 1: AMX lent to this process */
static atomic_int amx_wanted = 1;  /* kernels_use_amx(0) turns it off (tests compare both ways) */

static int detect_amx(void) {
    unsigned eax, ebx, ecx, edx;
    const char *env = getenv("TOKENWIRE_AMX");
    if (env && env[0] == '0') return 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 25)))
        return 0;  /* AMX-TILE, AMX-INT8 */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

int amx_int8(void) {
    int state = atomic_load(&amx_state);
    if (state < 0) atomic_store(&amx_state, state = detect_amx());
    return state;
}

void kernels_use_amx(int on) { atomic_store(&amx_wanted, on); }

static int use_amx(void) { return atomic_load(&amx_wanted) && amx_int8(); }

/* Group g's weight codes as signed bytes, B's 8 rows of 64 (4 k's x 16 columns): Q4_1's as they
 * are, Q8's qw + 128 back to qw, so that tdpbssd sums the products themselves (no 128 * sum(qx) to
 * take off per row) */
static inline __attribute__((always_inline)) void signed_codes(const uint8_t *lines, int64_t g, int bits, int8_t *out) {
    for (int h = 0; h < 8; h++) {
        const __m512i codes = group_codes(lines, g, h, bits);
        _mm512_store_si512(out + h * 64, bits == 4 ? codes : _mm512_xor_si512(codes, _mm512_set1_epi8((char)0x80)));
    }
}

/* Rows r0..r0+15 of tile t, as block() computes them, the integer sums from the tile unit. */
static inline __attribute__((always_inline)) void block_amx(const Matmul *m, int64_t r0, int64_t t, int bits,
                                                            int group, int has_min) {
    const int64_t K = m->K, groups = K / GROUP;
    const int8_t *x_codes = m->x->codes;
    const float *x_scale = m->x->scale, *x_scaled_sum = m->x->scaled_sum;
    const int32_t *x_sum = m->x->sum, *x_sum16 = m->x->sum16;
    const int64_t line_k = bits == 4 ? 8 : 4;
    const uint8_t *lines = m->codes + t * (K / line_k) * 64;
    int32_t sums[BLOCK_ROWS * TILE] __attribute__((aligned(64))), sums_next[BLOCK_ROWS * TILE] __attribute__((aligned(64)));
    int8_t codes[8 * 64] __attribute__((aligned(64))), codes_next[8 * 64] __attribute__((aligned(64)));
    __m512 acc[BLOCK_ROWS];
    for (int r = 0; r < BLOCK_ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        signed_codes(lines, g, bits, codes);
        __asm__ volatile("" ::: "memory");  /* tileloadd's asm names no memory read: the stores above first */
        const int8_t *qx = x_codes + r0 * K + g * GROUP;
        if (group == 16) {
            for (int half = 0; half < 2; half++) {
                const int64_t gg = 2 * g + half;
                const __m512 s16 = _mm512_loadu_ps(m->scale + (t * 2 * groups + gg) * TILE);
                const __m512 m16 = has_min ? _mm512_loadu_ps(m->minimum + (t * 2 * groups + gg) * TILE) : s16;
                _tile_loadd(TILE_A16, qx + half * 16, K);
                _tile_loadd(TILE_B16, codes + half * 4 * 64, 64);
                _tile_zero(TILE_C);
                _tile_dpbssd(TILE_C, TILE_A16, TILE_B16);
                _tile_stored(TILE_C, sums, 64);
                for (int r = 0; r < BLOCK_ROWS; r++) {
                    const int64_t row = r0 + r;
                    acc[r] = add_group16(acc[r], _mm512_load_si512(sums + r * TILE), s16, m16, x_scale[row * groups + g],
                                         x_sum16[row * 2 * groups + gg], 0, has_min);
                }
            }
            continue;
        }
        /* groups of 32: this one and the next at once (two sum tiles in flight), added in order */
        const int pair = g + 1 < groups;
        if (pair) signed_codes(lines, g + 1, bits, codes_next);
        __asm__ volatile("" ::: "memory");
        _tile_loadd(TILE_A, qx, K);
        _tile_loadd(TILE_B, codes, 64);
        _tile_zero(TILE_C);
        _tile_dpbssd(TILE_C, TILE_A, TILE_B);
        if (pair) {
            _tile_loadd(TILE_A_NEXT, qx + GROUP, K);
            _tile_loadd(TILE_B_NEXT, codes_next, 64);
            _tile_zero(TILE_C_NEXT);
            _tile_dpbssd(TILE_C_NEXT, TILE_A_NEXT, TILE_B_NEXT);
        }
        _tile_stored(TILE_C, sums, 64);
        if (pair) _tile_stored(TILE_C_NEXT, sums_next, 64);
        for (int64_t gg = g; gg <= g + pair; gg++) {
            const int32_t *group_sums = gg == g ? sums : sums_next;
            const __m512 scale = _mm512_loadu_ps(m->scale + (t * groups + gg) * TILE);
            const __m512 minimum = has_min ? _mm512_loadu_ps(m->minimum + (t * groups + gg) * TILE) : scale;
            for (int r = 0; r < BLOCK_ROWS; r++) {
                const int64_t at = (r0 + r) * groups + gg;
                acc[r] = add_group32(acc[r], _mm512_load_si512(group_sums + r * TILE), scale, minimum, x_scale[at],
                                     x_sum[at], x_scaled_sum[at], 0, has_min);
            }
        }
        g += pair;
    }
    for (int r = 0; r < BLOCK_ROWS; r++) _mm512_storeu_ps(m->y + (r0 + r) * m->N + t * TILE, acc[r]);
}
#else
int amx_int8(void) { return 0; }
void kernels_use_amx(int on) { (void)on; }
static int use_amx(void) { return 0; }
static inline void load_tile_config(void) {}
static inline void release_tiles(void) {}
static inline void block_amx(const Matmul *m, int64_t r0, int64_t t, int bits, int group, int has_min) {}
#endif

#define ROWS(n) case n: block(m, r, n, t, bits, group, has_min); break;

/* One item: one tile for a panel of up to PANEL_ROWS rows, in blocks of BLOCK_ROWS. */
static inline __attribute__((always_inline)) void item(const Matmul *m, int64_t i, int bits, int group, int has_min) {
    const int64_t tiles = m->N / TILE, t = i % tiles, r_begin = i / tiles * PANEL_ROWS;
    const int64_t r_end = r_begin + PANEL_ROWS < m->M ? r_begin + PANEL_ROWS : m->M;
    const int amx = m->amx && r_end - r_begin >= BLOCK_ROWS;
    if (amx) load_tile_config();
    for (int64_t r = r_begin; r < r_end; r += BLOCK_ROWS) {
        if (amx && r_end - r >= BLOCK_ROWS) {
            block_amx(m, r, t, bits, group, has_min);
            continue;
        }
        switch (r_end - r < BLOCK_ROWS ? (int)(r_end - r) : BLOCK_ROWS) {
            ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
            ROWS(9) ROWS(10) ROWS(11) ROWS(12) ROWS(13) ROWS(14) ROWS(15) ROWS(16)
        }
    }
    if (amx) release_tiles();
}

/* One job rounds the rows (items 0..M-1), then multiplies (the rest): the rounding runs on every
 * thread too (done alone first, it left the other threads idle for ~6% of a 16-row decode step).
 * Items are claimed in order, so a thread that reaches a multiply item waits only for rows that
 * others have already claimed. */
static inline __attribute__((always_inline)) void job_item(Matmul *m, int64_t i, int bits, int group, int has_min) {
    if (i < m->M) {
        quantize_row(m->input, i, m->K, m->x);
        atomic_fetch_add_explicit(&m->rounded, 1, memory_order_release);
        return;
    }
    while (atomic_load_explicit(&m->rounded, memory_order_acquire) < m->M) _mm_pause();
    item(m, i - m->M, bits, group, has_min);
}

static void q4_item(void *ctx, int64_t i) { job_item(ctx, i, 4, GROUP, 1); }
static void q8_item(void *ctx, int64_t i) { job_item(ctx, i, 8, GROUP, 0); }
static void q8_min_item(void *ctx, int64_t i) { job_item(ctx, i, 8, GROUP, 1); }
static void q8_16_item(void *ctx, int64_t i) { job_item(ctx, i, 8, 16, 0); }
static void q8_16_min_item(void *ctx, int64_t i) { job_item(ctx, i, 8, 16, 1); }

static int run(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
               const float *minimum, int64_t N, float *y, int threads, item_fn fn)
{
    const int64_t groups = K / GROUP;
    const int64_t per_group = M * groups;
    const int64_t fixed = per_group * (2 * sizeof(float) + 3 * sizeof(int32_t));  /* 4-byte values first */
    char *scratch = kernel_malloc(fixed + M * K);
    if (!scratch) return KERNEL_NO_MEMORY;
    Activations a = {(int8_t *)(scratch + fixed), (float *)scratch,
                     (int32_t *)(scratch + per_group * sizeof(float)),
                     (float *)(scratch + per_group * (sizeof(float) + sizeof(int32_t))),
                     (int32_t *)(scratch + per_group * (2 * sizeof(float) + sizeof(int32_t)))};
    Matmul m = {x, &a, M, K, codes, scale, minimum, N, y};
    atomic_init(&m.rounded, 0);
    m.amx = M >= AMX_ROWS && use_amx();
    parallel_for(M + (M + PANEL_ROWS - 1) / PANEL_ROWS * (N / TILE), threads, fn, &m);
    free(scratch);
    return KERNEL_OK;
}

int q4_matmul_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                   const float *minimum, int64_t N, float *y, int threads)
{
    return run(x, M, K, codes, scale, minimum, N, y, threads, q4_item);
}

int q8_matmul_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                   int64_t N, float *y, int threads)
{
    return run(x, M, K, codes, scale, 0, N, y, threads, q8_item);
}

int q8_matmul_groups_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                          const float *minimum, int64_t group, int64_t N, float *y, int threads)
{
    if (group != 16 && group != GROUP) return KERNEL_BAD_ARGUMENT;
    item_fn fn = group == 16 ? (minimum ? q8_16_min_item : q8_16_item) : (minimum ? q8_min_item : q8_item);
    return run(x, M, K, codes, scale, minimum, N, y, threads, fn);
}

#else

int int8_activations(void) { return 0; }
int amx_int8(void) { return 0; }
void kernels_use_amx(int on) { (void)on; }

/* Python asks int8_activations() first; defined so that every build has the same functions. */
int q4_matmul_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                   const float *minimum, int64_t N, float *y, int threads) { return KERNEL_UNSUPPORTED; }
int q8_matmul_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                   int64_t N, float *y, int threads) { return KERNEL_UNSUPPORTED; }
int q8_matmul_groups_int8(const float *x, int64_t M, int64_t K, const uint8_t *codes, const float *scale,
                          const float *minimum, int64_t group, int64_t N, float *y, int threads)
{ return KERNEL_UNSUPPORTED; }

#endif
