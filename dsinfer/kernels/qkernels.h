/* Shared by the quantized kernels (qgemv_avx2.c: fp32 activations; qgemv_x8_avx2.c: int8 activations):
 * the call description, chunking of K, and the final per-row sums. See qgemv_avx2.c for the format. */
#pragma once
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"

#define MAX_M 8
#define MAX_ACC 12 /* accumulators: M rows of x times U per row */
#ifndef BLOCK_ROWS
#define BLOCK_ROWS 16     /* weight rows that share one pass over a chunk of x */
#endif
#ifndef CHUNK_FLOATS
#define CHUNK_FLOATS 4096 /* floats of packed x per chunk, all M rows together: 16 KiB, so it stays in L1 */
#endif
#define AI __attribute__((always_inline))

static inline __m256i tail_mask(int64_t t) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)t), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 bytes -> 8 int32 lanes (sign- or zero-extended). */
static inline __m256i i8x8(const int8_t *w) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)); }
static inline __m256i u8x8(const uint8_t *w) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)w)); }
static inline __m256 lo4(__m256i b) { return _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))); }
static inline __m256 hi4(__m256i b) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)); }

/* Everything a call needs. Rows are walked in bytes: rowb per row, gb per (full) group, and chunks of at most
 * cb (see chunk_end); xp is x packed chunk by chunk (pack_x), xsum the sums of x per group (group_sums, or
 * NULL where nothing needs them: int8 without mins). */
struct qcall {
    const float *x, *xp, *scales, *mins, *xsum;
    const void *q;
    float *y;
    int64_t m, n, k, g, ng, rowb, gb, cb;
};

/* The chunk starting at byte c (a group start, or a multiple of cb into a group): as many whole groups as fit
 * in cb bytes, or cb bytes of a group longer than that. cb is a multiple of 32, so an int4 block (below) never
 * straddles two chunks. */
static inline int64_t chunk_end(const struct qcall *a, int64_t c) {
    int64_t e;
    if (a->gb <= a->cb) {
        e = c + a->cb / a->gb * a->gb;
    } else {
        int64_t gend = (c / a->gb + 1) * a->gb;
        e = c + a->cb < gend ? c + a->cb : gend;
    }
    return e < a->rowb ? e : a->rowb;
}

/* Bytes per chunk: a whole row for one or two rows of x (they fit in L1); else CHUNK_FLOATS of x for all M
 * rows, a constant for each M, so that the kernels address rows of packed x by fixed offsets. */
static inline int64_t chunk_bytes(int64_t m, int64_t rowb, int i4) {
    int64_t c = (CHUNK_FLOATS / m / (i4 ? 2 : 1)) & ~(int64_t)31;
    return m <= 2 ? rowb : c < 32 ? 32 : c;
}

/* Lane r of the result = the sum of the 8 lanes of v[r]. */
static inline __m256 hsum8(const __m256 v[8]) {
    __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

static inline AI __m256 sum_u(const __m256 *a, const int U) {
    if (U == 1) return a[0];
    if (U == 2) return _mm256_add_ps(a[0], a[1]);
    if (U == 3) return _mm256_add_ps(_mm256_add_ps(a[0], a[1]), a[2]);
    __m256 s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    if (U == 6) return _mm256_add_ps(s, _mm256_add_ps(a[4], a[5]));
    if (U == 8) return _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])));
    return s;
}

/* y[r, j0:j1] from the vector sums tot[(j - j0) * M + r], plus the part that does not depend on the codes:
 * sum over groups of (mins[g] + c8 * scales[g]) * xsum[g] (c8 = -8 for int4, whose nibbles are code + 8;
 * 0 for int8), for all rows of x at once. */
static void finish(const struct qcall *a, const __m256 *tot, int64_t j0, int64_t j1, float c8) {
    const int64_t m = a->m, ng = a->ng;
    for (int64_t j = j0; j < j1; j++) {
        __m256 v[8];
        for (int r = 0; r < 8; r++) v[r] = r < m ? tot[(j - j0) * m + r] : _mm256_setzero_ps();
        __m256 sum = hsum8(v);
        if (a->xsum) {
            const float *sc = a->scales + j * ng, *mn = a->mins ? a->mins + j * ng : NULL;
            for (int64_t g = 0; g < ng; g++)
                sum = _mm256_fmadd_ps(_mm256_set1_ps(c8 * sc[g] + (mn ? mn[g] : 0.0f)),
                                      _mm256_loadu_ps(a->xsum + 8 * g), sum);
        }
        float out[8];
        _mm256_storeu_ps(out, sum);
        for (int64_t r = 0; r < m; r++) a->y[r * a->n + j] = out[r];
    }
}

