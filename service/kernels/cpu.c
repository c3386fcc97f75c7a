/* Which kernel builds this CPU can run, asked at load as ggml's cpu-feats does: ops.py loads the
 * portable build first (it runs anywhere), asks it kernels_cpu_level(), and then takes the best
 * build at or below that level. So a wheel or a shared cache built with AVX-512 never faults on a
 * CPU of the same family without it. Compiled into every build; only the portable one is asked. */
#include "kernels.h"

/* 0: portable; 1: x86-64-v3 (AVX2, FMA, F16C); 2: x86-64-v4 (AVX-512 F/BW/CD/DQ/VL);
 * 3: x86-64-v4 with AVX512-VNNI (the 8-bit activations of block_matmul_int8.c).
 * __builtin_cpu_supports also checks that the OS saves the vector registers. */
int kernels_cpu_level(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
    /* The levels the builds are compiled for (-march=x86-64-v3/v4): every feature they assume */
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("x86-64-v3")) return 0;
    if (!__builtin_cpu_supports("x86-64-v4")) return 1;
    return __builtin_cpu_supports("avx512vnni") ? 3 : 2;
#elif defined(__x86_64__) && defined(__GNUC__)
    /* Older compilers name features only: the ones the builds' code relies on */
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")))
        return 0;
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("avx512vl")))
        return 1;
    return __builtin_cpu_supports("avx512vnni") ? 3 : 2;
#else
    return 0;
#endif
}
