/* Panel kernels for fp32 products of a few dozen to a few hundred rows of x with a weight W [N, K] (a prefill's
 * per-expert matmuls; used by moe_prefill_avx2.c).
 *
 * x is packed in panels of PW = 16 rows, each as [K][16] (rows padded with zeros), so that one k step reads
 * two vectors of 16 rows' values. The register tile is G <= 6 rows of W by 16 rows of x: per k it broadcasts
 * W[j][k] for each of the G weight rows (vbroadcastss reads W where it lies, so W is never packed) and does
 * 2G FMAs into 2G accumulators that stay in registers for all of K. Each lane is one row of x, summed over k in
 * order, so a row's result does not depend on which other rows share its panel. A panel of at most 8 rows
 * runs one vector wide (V = 1). */
#ifndef DSINFER_PANEL_H
#define DSINFER_PANEL_H

#include <immintrin.h>
#include <stdint.h>
#include "simd.h"

#define PW 16       /* rows of x per panel */
#define PANEL_PF 512 /* weight prefetch distance in floats: 256-512 measured alike, 64 and 1024 slower */

/* Packs rows idx[0..rows) of x (row stride ldx) into the panel dst [K][16], padded with zero rows; columns
 * [c0, c1) only, so that threads can share a panel. */
static inline void pack_panel(const float *x, int64_t ldx, const int64_t *idx, int64_t rows, float *dst,
                              int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < PW; r++) {
        if (r >= rows) {
            for (int64_t c = c0; c < c1; c++) dst[c * PW + r] = 0.f;
            continue;
        }
        const float *src = x + idx[r] * ldx;
        for (int64_t c = c0; c < c1; c++) dst[c * PW + r] = src[c];
    }
}

/* out[16 g + l] = sum_k W[g][k] * panel[k][l] for the G weight rows wr[g] and lanes l < 8 V (the rest 0).
 * The accumulators are named variables, not an array: with arrays, gcc 12 kept a copy on the stack, stored at
 * every step (half the speed). Rows g >= G are compiled out, G and V being constants after inlining. */
#define TILE_ROW(g)                                                                                        \
    if (G > g) {                                                                                           \
        __m256 s = _mm256_broadcast_ss(w##g + c);                                                          \
        a##g##0 = _mm256_fmadd_ps(s, b0, a##g##0);                                                         \
        if (V == 2) a##g##1 = _mm256_fmadd_ps(s, b1, a##g##1);                                             \
    }
#define TILE_OUT(g)                                                                                        \
    if (G > g) {                                                                                           \
        _mm256_store_ps(out + 16 * g, a##g##0);                                                            \
        _mm256_store_ps(out + 16 * g + 8, V == 2 ? a##g##1 : _mm256_setzero_ps());                          \
    }
static inline __attribute__((always_inline)) void panel_tile(const float *xp, const float *const *wr, int64_t k,
                                                              float *out, const int G, const int V) {
    const __m256 z = _mm256_setzero_ps();
    __m256 a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z, a40 = z, a41 = z, a50 = z, a51 = z;
    const float *w0 = wr[0], *w1 = G > 1 ? wr[1] : w0, *w2 = G > 2 ? wr[2] : w0, *w3 = G > 3 ? wr[3] : w0,
                *w4 = G > 4 ? wr[4] : w0, *w5 = G > 5 ? wr[5] : w0;
    for (int64_t c = 0; c < k; c++) {
        __m256 b0 = _mm256_load_ps(xp + c * PW), b1 = V == 2 ? _mm256_load_ps(xp + c * PW + 8) : b0;
        if ((c & 15) == 0)
            for (int g = 0; g < G; g++) _mm_prefetch((const char *)(wr[g] + c + PANEL_PF), _MM_HINT_T0);
        TILE_ROW(0) TILE_ROW(1) TILE_ROW(2) TILE_ROW(3) TILE_ROW(4) TILE_ROW(5)
    }
    TILE_OUT(0) TILE_OUT(1) TILE_OUT(2) TILE_OUT(3) TILE_OUT(4) TILE_OUT(5)
}
#undef TILE_ROW
#undef TILE_OUT

/* panel_tile with G and V as constants (the register tile needs them known at compile time); not inlined, so
 * that no caller's constants take a register the tile needs. */
static __attribute__((noinline)) void panel_tile_any(const float *xp, const float *const *wr, int64_t k, float *out,
                                                     int G, int rows) {
    const int wide = rows > 8;
    switch (G * 2 + wide) {
    case 13: panel_tile(xp, wr, k, out, 6, 2); break;
    case 12: panel_tile(xp, wr, k, out, 6, 1); break;
    case 5: panel_tile(xp, wr, k, out, 2, 2); break;
    case 4: panel_tile(xp, wr, k, out, 2, 1); break;
    case 3: panel_tile(xp, wr, k, out, 1, 2); break;
    default: panel_tile(xp, wr, k, out, 1, 1); break;
    }
}

/* e^x for |x| <= 88 to about 2 ulp (x is clamped there): 2^n * p(r) with n = round(x / ln 2) and r = x - n ln 2
 * in [-ln2 / 2, ln2 / 2], p the degree-7 Taylor-like polynomial of Cephes' expf. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* silu(g) * u = g / (1 + e^-g) * u, as torch computes silu. */
static inline __m256 silu_mul(__m256 g, __m256 u) {
    __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    return _mm256_mul_ps(s, u);
}

#endif
