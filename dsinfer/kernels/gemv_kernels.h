/* The fp32 / bf16 weight-streaming row kernels shared by gemv_avx2.c and moe_decode_avx2.c (static, so each
 * translation unit gets its own inlined copy): rows_*_any(x, xp, w, y, m, n, k, n0, n1) computes
 * y[r * n + j] = x[r] . W[j] for rows j in [n0, n1) of W [N, K] and r < m <= WIDE_M; xp is x packed by pack_x
 * (or NULL: the one-row-at-a-time kernel on x as it is, MAX_M rows of x a pass). */
#ifndef DSINFER_GEMV_KERNELS_H
#define DSINFER_GEMV_KERNELS_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include "simd.h"

#define MAX_M 8  /* rows of x the row kernel takes; the blocked kernel takes up to WIDE_M in one pass */
#define WIDE_M 16
#define KC 128 /* columns per chunk in the blocked kernel */
#ifndef ROW_STREAMS
#define ROW_STREAMS 8 /* weight rows read side by side by the row kernel for one row of x */
#endif
#ifndef ROW_PREFETCH
#define ROW_PREFETCH 1 /* bf16 row kernel: prefetch the next R rows as it reads these (-DROW_PREFETCH=0: off) */
#endif
#ifndef ROW_PREFETCH_F32
#define ROW_PREFETCH_F32 1 /* the same for the fp32 row kernel, for 2 or more rows of x (1 row: slower with it) */
#endif
#ifndef ROW_STREAMS_2
#define ROW_STREAMS_2 6 /* weight rows side by side for two rows of x (12 accumulators) */
#endif
#ifndef BLOCK_PREFETCH
#define BLOCK_PREFETCH 1 /* blocked kernel: prefetch the next group's rows as it reads a group */
#endif

static inline __m256 load_f32(const float *w) { return _mm256_loadu_ps(w); }


/* R weight rows at a time (several independent memory streams: one row at a time leaves the core's read
 * bandwidth well short of the machine's, bf16 most of all), one accumulator per (weight row, x row), k walked in
 * order, so that every output is summed in the same order as by the blocked kernel below (batch-invariant
 * bits). M (rows of x) and R are compile-time constants after inlining, so accumulators live in registers.
 * LINE > 0 (values in a 64-byte line; LINE1 for one row of x): each line read also prefetches the same line of
 * the next R rows, so their streams are running when the kernel gets to them (a 2-byte row of K = 2048 is one
 * 4 KiB page, where the hardware prefetcher stops): bf16 25 -> 28 GB/s on a [102400, 2048] head, 2 threads, same
 * sums. The next rows are those of the next block, or for the last block the caller's `after` (the next
 * expert's rows in moe_decode), so that a stream of blocks does not stall where one matrix ends. */
#define ROW_KERNEL(NAME, WTYPE, LOAD, SCALAR, LINE, LINE1)                                          \
static inline __attribute__((always_inline)) void NAME##_step(                                      \
        const float *x, const WTYPE *row, __m256 acc[MAX_M][8], int64_t k, int64_t i, const int M,  \
        const int R) {                                                                              \
    for (int r = 0; r < M; r++) {                                                                   \
        __m256 xv = _mm256_loadu_ps(x + r * k + i);                                                 \
        for (int g = 0; g < R; g++) acc[r][g] = _mm256_fmadd_ps(LOAD(row + g * k + i), xv, acc[r][g]); \
    }                                                                                               \
}                                                                                                   \
static inline __attribute__((always_inline)) void NAME##_m(                                         \
        const float *x, const WTYPE *w, float *y, int64_t n, int64_t k, int64_t j, const WTYPE *next, \
        const int M, const int R) {                                                                 \
    const WTYPE *row = w + j * k;                                                                   \
    __m256 acc[MAX_M][8];                                                                           \
    for (int r = 0; r < M; r++)                                                                     \
        for (int g = 0; g < R; g++) acc[r][g] = _mm256_setzero_ps();                                \
    int64_t i = 0;                                                                                  \
    if ((M > 1 ? LINE : LINE1) && next) /* one cache line of each of the R rows at next per line read */ \
        for (; i + LINE <= k; i += LINE) {                                                          \
            for (int g = 0; g < R; g++) _mm_prefetch((const char *)(next + g * k + i), _MM_HINT_T1); \
            for (int64_t c = 0; c < LINE; c += 8) NAME##_step(x, row, acc, k, i + c, M, R);         \
        }                                                                                           \
    for (; i + 8 <= k; i += 8) NAME##_step(x, row, acc, k, i, M, R);                                \
    for (int r = 0; r < M; r++)                                                                     \
        for (int g = 0; g < R; g++) {                                                               \
            float s = hsum(acc[r][g]);                                                              \
            for (int64_t t = i; t < k; t++) s += SCALAR(row[g * k + t]) * x[r * k + t];             \
            y[r * n + j + g] = s;                                                                   \
        }                                                                                           \
}                                                                                                   \
/* Rows [n0, n1) R at a time; each block prefetches the next block's rows or, for the last block, the R    \
 * rows at `after` (the caller's next rows of the same k, e.g. the next expert's; NULL: none). */          \
static inline __attribute__((always_inline)) void NAME##_rows(                                      \
        const float *x, const WTYPE *w, float *y, int64_t n, int64_t k, int64_t n0, int64_t n1,     \
        const WTYPE *after, const int M, const int R) {                                             \
    int64_t j = n0;                                                                                 \
    for (; j + R <= n1; j += R)                                                                     \
        NAME##_m(x, w, y, n, k, j, j + 2 * R <= n1 ? w + (j + R) * k : after, M, R);                \
    for (; j < n1; j++) NAME##_m(x, w, y, n, k, j, NULL, M, 1);                                     \
}                                                                                                   \
static void NAME##_to(const float *x, const WTYPE *w, float *y, int64_t m, int64_t n, int64_t k,   \
                      int64_t n0, int64_t n1, const WTYPE *after) {                                 \
    switch (m) {                                                                                    \
    case 1: NAME##_rows(x, w, y, n, k, n0, n1, after, 1, ROW_STREAMS); break;                       \
    case 2: NAME##_rows(x, w, y, n, k, n0, n1, after, 2, ROW_STREAMS_2); break;                     \
    case 3: NAME##_rows(x, w, y, n, k, n0, n1, after, 3, 2); break;                                 \
    case 4: NAME##_rows(x, w, y, n, k, n0, n1, after, 4, 2); break;                                 \
    case 5: NAME##_rows(x, w, y, n, k, n0, n1, after, 5, 1); break;                                 \
    case 6: NAME##_rows(x, w, y, n, k, n0, n1, after, 6, 1); break;                                 \
    case 7: NAME##_rows(x, w, y, n, k, n0, n1, after, 7, 1); break;                                 \
    default: NAME##_rows(x, w, y, n, k, n0, n1, after, 8, 1); break;                                \
    }                                                                                               \
}                                                                                                   \
static inline void NAME(const float *x, const WTYPE *w, float *y, int64_t m, int64_t n, int64_t k, \
                        int64_t n0, int64_t n1) {                                                   \
    NAME##_to(x, w, y, m, n, k, n0, n1, NULL);                                                      \
}

/* For 3-16 rows of x, which is first packed once per call into xp[K/8][M][8] (the M rows' 8-float pieces
 * side by side: one sequential stream instead of M rows 4*K bytes apart, all in the same L1 sets). Blocking:
 *  - registers: G weight rows x a tile of T x rows, G * T <= 12 accumulators; per 8 columns G + T loads
 *    (each into a register) feed G * T FMAs. 3-4 x rows: one 3 x M tile; 5-8: two tiles (3+2, 4+2, 4+3,
 *    4+4 x rows), the second re-reading the weight piece from L1; 9-16: the first 8 rows' two tiles and those of
 *    the rest, all on the same weight piece (one pass over the weights; the same sums as two passes of 8).
 *  - L1: K is walked in chunks of KC columns, all tiles finishing a chunk before the next one, so the weight
 *    rows stream from memory at an even pace; partial sums wait in acc[][] between chunks.
 *  - memory: every weight element is read from memory once; while a group's chunk is read, the same chunk of
 *    the next group's rows (or of the caller's `after`) is prefetched (BLOCK_PREFETCH), so that 2G rows stream
 *    at a time instead of G: a [102400, 2048] bf16 head for 3 rows of x 24 -> 26 GB/s, same sums. */
#define GROUP_KERNEL(NAME, WTYPE, LOAD, SCALAR)                                                        \
static inline __attribute__((always_inline)) void NAME##_tile(                                      \
        const float *xp, const WTYPE *w, __m256 *acc, int64_t m, int64_t k, int64_t len,            \
        const int G, const int T) {                                                                 \
    __m256 a[3][4];                                                                                 \
    for (int g = 0; g < G; g++)                                                                     \
        for (int r = 0; r < T; r++) a[g][r] = acc[g * MAX_M + r];                                   \
    for (int64_t i = 0; i < len; i += 8, xp += 8 * m) {                                             \
        __m256 wv[3];                                                                               \
        for (int g = 0; g < G; g++) wv[g] = LOAD(w + g * k + i);                                    \
        for (int r = 0; r < T; r++) {                                                               \
            __m256 xv = _mm256_load_ps(xp + 8 * r);                                                 \
            __asm__("" : "+x"(xv)); /* one load into a register, not one folded into each FMA */    \
            for (int g = 0; g < G; g++) a[g][r] = _mm256_fmadd_ps(wv[g], xv, a[g][r]);              \
        }                                                                                           \
    }                                                                                               \
    for (int g = 0; g < G; g++)                                                                     \
        for (int r = 0; r < T; r++) acc[g * MAX_M + r] = a[g][r];                                   \
}                                                                                                   \
/* Rows n0.. in groups of G, x in tiles of T0, T1 rows (T1 = 0: one tile) and, past the first MAX_M rows of x, \
 * T2, T3 (0: none); acc[h][g][r] holds row h * MAX_M + r. Returns the first row left. */                  \
static inline __attribute__((always_inline)) int64_t NAME##_groups(                                 \
        const float *x, const float *xp, const WTYPE *w, float *y, int64_t m, int64_t n, int64_t k, \
        int64_t n0, int64_t n1, const WTYPE *after, const int G, const int T0, const int T1,        \
        const int T2, const int T3) {                                                               \
    const int64_t k8 = k & ~(int64_t)7;                                                             \
    __m256 acc[2][3][MAX_M];                                                                        \
    int64_t j = n0;                                                                                 \
    for (; j + G <= n1; j += G) {                                                                   \
        const WTYPE *next = BLOCK_PREFETCH ? (j + 2 * G <= n1 ? w + (j + G) * k : after) : NULL;    \
        for (int h = 0; h < (T2 ? 2 : 1); h++)                                                      \
            for (int g = 0; g < G; g++)                                                             \
                for (int r = 0; r < (h ? T2 + T3 : T0 + T1); r++) acc[h][g][r] = _mm256_setzero_ps(); \
        for (int64_t kc = 0; kc < k8; kc += KC) {                                                   \
            const int64_t len = k8 - kc < KC ? k8 - kc : KC;                                        \
            const WTYPE *wc = w + j * k + kc;                                                       \
            if (next) /* this chunk of the next group's rows */                                     \
                for (int g = 0; g < G; g++)                                                         \
                    for (int64_t c = 0; c < len; c += 64 / (int64_t)sizeof(WTYPE))                  \
                        _mm_prefetch((const char *)(next + g * k + kc + c), _MM_HINT_T1);           \
            NAME##_tile(xp + kc * m, wc, &acc[0][0][0], m, k, len, G, T0);                          \
            if (T1) NAME##_tile(xp + kc * m + 8 * T0, wc, &acc[0][0][T0], m, k, len, G, T1);        \
            if (T2) NAME##_tile(xp + kc * m + 8 * MAX_M, wc, &acc[1][0][0], m, k, len, G, T2);      \
            if (T3) NAME##_tile(xp + kc * m + 8 * (MAX_M + T2), wc, &acc[1][0][T2], m, k, len, G, T3); \
        }                                                                                           \
        for (int g = 0; g < G; g++)                                                                 \
            for (int r = 0; r < m; r++) {                                                           \
                float s = hsum(acc[r / MAX_M][g][r % MAX_M]);                                       \
                for (int64_t t = k8; t < k; t++) s += SCALAR(w[(j + g) * k + t]) * x[r * k + t];   \
                y[r * n + j + g] = s;                                                               \
            }                                                                                       \
    }                                                                                               \
    return j;                                                                                       \
}                                                                                                   \
/* m <= WIDE_M rows of x: one pass over the weights (past MAX_M rows, two more tiles per chunk of them) */ \
static void NAME(const float *x, const float *xp, const WTYPE *w, float *y, int64_t m, int64_t n,   \
                 int64_t k, int64_t n0, int64_t n1, const WTYPE *after) {                           \
    int64_t j;                                                                                      \
    switch (m) {                                                                                    \
    case 3: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 3, 0, 0, 0); break;           \
    case 4: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 0, 0, 0); break;           \
    case 5: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 3, 2, 0, 0); break;           \
    case 6: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 2, 0, 0); break;           \
    case 7: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 3, 0, 0); break;           \
    case 8: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 4, 0, 0); break;           \
    case 9: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 4, 1, 0); break;           \
    case 10: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 4, 2, 0); break;          \
    case 11: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 4, 3, 0); break;          \
    case 12: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 4, 4, 0); break;          \
    case 13: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 4, 3, 2); break;          \
    case 14: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 4, 4, 2); break;          \
    case 15: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 4, 4, 3); break;          \
    default: j = NAME##_groups(x, xp, w, y, m, n, k, n0, n1, after, 3, 4, 4, 4, 4); break;          \
    }                                                                                               \
    for (int64_t r = 0; j < n1 && r < m; r += MAX_M) /* weight rows past the last group: row kernel */ \
        NAME##_single(x + r * k, w, y + r * n, m - r < MAX_M ? m - r : MAX_M, n, k, j, n1, after);  \
}

#define AS_F32(v) (v)
ROW_KERNEL(rows_f32, float, load_f32, AS_F32, ROW_PREFETCH_F32 * 16, 0)
ROW_KERNEL(rows_bf16, uint16_t, load_bf16, bf16_to_f32, ROW_PREFETCH * 32, ROW_PREFETCH * 32)
#define rows_f32_blocked_single rows_f32_to
#define rows_bf16_blocked_single rows_bf16_to
GROUP_KERNEL(rows_f32_blocked, float, load_f32, AS_F32)
GROUP_KERNEL(rows_bf16_blocked, uint16_t, load_bf16, bf16_to_f32)

#ifndef BLOCKED_FROM
#define BLOCKED_FROM 2
#endif
/* Up to BLOCKED_FROM rows (or if packing found no memory): one weight row at a time on x as it is; more:
 * the blocked kernel on packed x. `after`: the rows that the caller reads next (prefetched near the end). */
#define ANY(NAME, ROWS, BLOCKED, WTYPE)                                                                \
static void NAME(const float *x, const float *xp, const WTYPE *w, float *y, int64_t m, int64_t n,   \
                 int64_t k, int64_t n0, int64_t n1, const WTYPE *after) {                           \
    if (m > BLOCKED_FROM && xp) BLOCKED(x, xp, w, y, m, n, k, n0, n1, after);                       \
    else for (int64_t r = 0; r < m; r += MAX_M) /* MAX_M rows of x a pass */                        \
        ROWS##_to(x + r * k, w, y + r * n, m - r < MAX_M ? m - r : MAX_M, n, k, n0, n1, after);     \
}
ANY(rows_f32_any, rows_f32, rows_f32_blocked, float)
ANY(rows_bf16_any, rows_bf16, rows_bf16_blocked, uint16_t)

/* xp[i/8][r][i%8] = x[r][i] for i < K rounded down to 8 (the tail is read from x itself); xp 32-byte aligned. */
static inline void pack_into(const float *x, float *xp, int64_t m, int64_t k) {
    for (int64_t i = 0; i < (k & ~(int64_t)7); i += 8)
        for (int64_t r = 0; r < m; r++) _mm256_store_ps(xp + i * m + 8 * r, _mm256_loadu_ps(x + r * k + i));
}

static inline float *pack_x(const float *x, int64_t m, int64_t k) {
    int64_t k8 = k & ~(int64_t)7;
    float *xp = aligned_alloc(64, (size_t)((k8 * m * 4 + 63) & ~63) + 64);
    if (xp) pack_into(x, xp, m, k);
    return xp;
}

#endif
