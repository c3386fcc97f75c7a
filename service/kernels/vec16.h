/* 16-float vectors (GCC vector extensions: AVX-512 here, pairs of AVX2 registers elsewhere) and the
 * few helpers the kernels share. Every reduction has a fixed order, so results do not depend on
 * the batch or the thread. */
#ifndef TOKENWIRE_VEC16_H
#define TOKENWIRE_VEC16_H

#include <stdint.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef float v2f __attribute__((vector_size(8)));

#define LANES 16

static inline v16f load16(const float *p) { v16f v; memcpy(&v, p, sizeof(v)); return v; }
static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof(v)); }

#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float sum_lanes(v16f v) {  /* a fixed tree of additions: halves, quarters, ... */
#ifdef __AVX512F__
    /* The same tree in registers: the halves below go through memory, and reading half of a vector
     * just stored stalls store forwarding (decode attention spent most of its time there). */
    return _mm512_reduce_add_ps((__m512)v);
#else
    v8f lo8, hi8;  /* halves by memcpy, not __builtin_shufflevector: GCC has that only from 12 */
    memcpy(&lo8, &v, sizeof(lo8));
    memcpy(&hi8, (const char *)&v + sizeof(lo8), sizeof(hi8));
    const v8f a = lo8 + hi8;
    v4f lo4, hi4;
    memcpy(&lo4, &a, sizeof(lo4));
    memcpy(&hi4, (const char *)&a + sizeof(lo4), sizeof(hi4));
    const v4f b = lo4 + hi4;
    return (b[0] + b[2]) + (b[1] + b[3]);
#endif
}

static inline v16f select16(v16i mask, v16f yes, v16f no) {
    return (v16f)(((v16i)yes & mask) | ((v16i)no & ~mask));
}

static inline v16f max16(v16f a, v16f b) { return select16(a > b, a, b); }

static inline float max_lanes(v16f v) {  /* exact in any order */
    float most = v[0];
    for (int i = 1; i < LANES; i++) most = v[i] > most ? v[i] : most;
    return most;
}

/* e^x, as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial, times 2^n.
 * Relative error ~2e-7; 0 below -87.3 (-inf included), +inf above 88.7. Not libm's expf, which
 * would not vectorise here. */
static inline v16f exp16(v16f x) {
    const v16f lo = (v16f){0} - 87.3f, hi = (v16f){0} + 88.7f;
    const v16i underflow = x < lo, overflow = x > hi;
    x = select16(underflow, lo, select16(overflow, hi, x));
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
    /* 2^n for n up to 127 directly; n = 128 (x near 88.7) as 2 * 2^127 */
    const v16i big = n > 127;
    n -= big & 1;
    p = select16(big, p * 2.0f, p);
    const v16f e = p * (v16f)((n + 127) << 23);
    return select16(underflow, (v16f){0}, select16(overflow, (v16f){0} + __builtin_inff(), e));
}

/* tanh(x) = 1 - 2 / (e^2x + 1): exp16's inf and 0 at the ends give +-1 exactly */
static inline v16f tanh16(v16f x) { return 1.0f - 2.0f / (exp16(2.0f * x) + 1.0f); }

#endif
