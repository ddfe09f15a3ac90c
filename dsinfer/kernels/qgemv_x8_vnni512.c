/* The integer-activation kernels of qgemv_x8_avx2.c compiled again with AVX512-VNNI's vpdpbusd on 256-bit
 * vectors (AVX512VL), as qgemv_i8_x8_vnni512 / qgemv_i4_x8_vnni512: the same dot products as the AVX-VNNI copy, for
 * CPUs that have AVX512-VNNI but not AVX-VNNI (Cascade Lake, Ice Lake). Only called where the CPU has both
 * avx512_vnni and avx512vl (KernelConfig.int8_kernel 3); the sums are the same integers as the AVX2 path's. */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512vnni")
#endif
#define X8_VNNI
#define X8_VNNI512
#include "qgemv_x8_avx2.c"
#if defined(__clang__)
#pragma clang attribute pop
#endif
