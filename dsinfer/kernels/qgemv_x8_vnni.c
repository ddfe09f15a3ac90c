/* The integer-activation kernels of qgemv_x8_avx2.c compiled again with AVX-VNNI (vpdpbusd: one instruction for
 * each 32 byte products where AVX2 takes two), as qgemv_i8_x8_vnni / qgemv_i4_x8_vnni. Only called where the CPU
 * has avx_vnni (KernelConfig.vnni); the sums are the same integers as the AVX2 path's. */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avxvnni"))), apply_to = function)
#else
#pragma GCC target("avxvnni")
#endif
#define X8_VNNI
#include "qgemv_x8_avx2.c"
#if defined(__clang__)
#pragma clang attribute pop
#endif
