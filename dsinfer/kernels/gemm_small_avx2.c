/* y[M,N] = x[M,K] . W[N,K]^T in fp32 for 1 <= M <= SMALL_MAX_M rows (a prefill's per-expert matmul: a few dozen
 * tokens). The blocked row kernel of gemv_kernels.h extended to more rows of x:
 *  - x is packed once per call (in parallel) into the tiles' layout below (pack_tiles);
 *  - threads split the N weight rows in groups of 3;
 *  - for each group of G = 3 weight rows, K is walked in chunks of SMALL_KC columns; in each chunk every tile of
 *    up to 4 x rows runs the register kernel rows_f32_blocked_tile (G x T <= 12 accumulators), so the 3 weight
 *    rows' chunk (3 KB at KC = 256, prefetched one chunk ahead) is read from memory once and reused from L1 by
 *    all M/4 tiles;
 *  - packed x is laid out tile by tile within each chunk (pack_tiles), so that each group of weight rows reads
 *    it from L2 as one sequential stream (x has no reuse in L1 across groups: each tile reads its own rows);
 *    with x packed as [K/8][M][8] instead, the tiles' strided reads ran 10-20% slower;
 *  - the tiles' vector partial sums wait between chunks in a per-thread buffer acc[tile][3][8] (stride MAX_M,
 *    as rows_f32_blocked_tile expects), and are summed horizontally once at the end.
 * K's tail (K % 8 columns) is added from x itself; N's tail (N % 3 rows) runs with G = 1 or 2. */
#include <omp.h>
#include "gemv_kernels.h"

#define SMALL_MAX_M 64
#ifndef SMALL_KC
#define SMALL_KC 256 /* columns per chunk: measured against 64 / 128 / 512 (and KC shrinking with M), the fastest */
#endif
#ifndef PF_CHUNKS
#define PF_CHUNKS 4 /* weight prefetch distance in chunks: 1 measured slower on weights from memory; 3-8 alike */
#endif
#define MAX_TILES (SMALL_MAX_M / 3 + 1)

/* Splits m rows of x into tiles of at most 4 rows, avoiding tiles of 1 or 2 rows where possible (a 4-row tile
 * does 12 FMAs per 7 loads; a 1-row tile 3 per 4): returns the number of tiles, starts in r0[], sizes in t[]. */
static int plan_tiles(int m, int *r0, int *t) {
    int n4 = m / 4, rem = m % 4, count = 0, r = 0;
    int sizes[MAX_TILES];
    if (rem == 1 && n4 >= 2) { n4 -= 2; sizes[count++] = 3; sizes[count++] = 3; sizes[count++] = 3; }
    else if (rem == 1 && n4 == 1) { n4 -= 1; sizes[count++] = 3; sizes[count++] = 2; }
    else if (rem == 2 && n4 >= 1) { n4 -= 1; sizes[count++] = 3; sizes[count++] = 3; }
    else if (rem) sizes[count++] = rem;
    for (int i = 0; i < n4; i++) sizes[count++] = 4;
    for (int i = 0; i < count; i++) { r0[i] = r; t[i] = sizes[i]; r += sizes[i]; }
    return count;
}

/* Packed x: for each chunk [kc, kc + len) of K's first K8 = K & ~7 columns, the tiles one after the other, each
 * as [len / 8][T][8] (T its rows): the piece of column c of row r0 + r of the tile starting at row r0 is at
 * kc * M + len * r0 + (c - kc) / 8 * 8 * T + 8 * r + c % 8, so that every tile reads one contiguous stretch and a
 * whole group of weight rows walks packed x from start to end. */
static void pack_tiles(const float *x, float *xp, int64_t m, int64_t k, int64_t step, int ntiles, const int *r0,
                       const int *t, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) { /* the p-th 8-column piece */
        const int64_t c = 8 * p, kc = c / step * step;
        const int64_t len = (k & ~(int64_t)7) - kc < step ? (k & ~(int64_t)7) - kc : step;
        for (int i = 0; i < ntiles; i++)
            for (int r = 0; r < t[i]; r++)
                _mm256_store_ps(xp + kc * m + len * r0[i] + (c - kc) * t[i] + 8 * r,
                                _mm256_loadu_ps(x + (r0[i] + r) * k + c));
    }
}

/* One chunk of columns [kc, kc + len) for G weight rows w (row stride k), all tiles. */
static inline __attribute__((always_inline)) void chunk_g(
        const float *xp, const float *w, __m256 *acc, int64_t m, int64_t k, int64_t kc, int64_t len, int64_t step,
        int ntiles, const int *r0, const int *t, const int G) {
    /* the weight rows PF_CHUNKS chunks ahead (past the end: the next rows), into L1 while the tiles work on this
     * one: the rows are 4*K bytes apart, which the hardware prefetcher follows only slowly */
    for (int g = 0; g < G; g++)
        for (int64_t c = 0; c < step; c += 16)
            _mm_prefetch((const char *)(w + g * k + kc + PF_CHUNKS * step + c), _MM_HINT_T0);
    for (int i = 0; i < ntiles; i++) {
        const float *xt = xp + kc * m + len * r0[i];
        __m256 *a = acc + i * 3 * MAX_M;
        switch (t[i]) { /* the tile's x pieces are T * 8 floats apart: T passed as the tile kernel's m */
        case 4: rows_f32_blocked_tile(xt, w + kc, a, 4, k, len, G, 4); break;
        case 3: rows_f32_blocked_tile(xt, w + kc, a, 3, k, len, G, 3); break;
        case 2: rows_f32_blocked_tile(xt, w + kc, a, 2, k, len, G, 2); break;
        default: rows_f32_blocked_tile(xt, w + kc, a, 1, k, len, G, 1); break;
        }
    }
}

/* G weight rows from row j: all of K in chunks, then the sums (plus K's tail from x itself) into y. */
static inline __attribute__((always_inline)) void group_g(
        const float *x, const float *xp, const float *w, float *y, __m256 *acc, int64_t m, int64_t n, int64_t k,
        int64_t j, int64_t step, int ntiles, const int *r0, const int *t, const int G) {
    const int64_t k8 = k & ~(int64_t)7;
    for (int i = 0; i < ntiles * 3 * MAX_M; i++) acc[i] = _mm256_setzero_ps();
    const float *wj = w + j * k;
    for (int64_t kc = 0; kc < k8; kc += step) {
        const int64_t len = k8 - kc < step ? k8 - kc : step;
        chunk_g(xp, wj, acc, m, k, kc, len, step, ntiles, r0, t, G);
    }
    for (int i = 0; i < ntiles; i++)
        for (int g = 0; g < G; g++)
            for (int r = 0; r < t[i]; r++) {
                const int64_t row = r0[i] + r;
                float s = hsum(acc[i * 3 * MAX_M + g * MAX_M + r]);
                for (int64_t c = k8; c < k; c++) s += wj[g * k + c] * x[row * k + c];
                y[row * n + j + g] = s;
            }
}

/* Weight rows [n0, n1) in groups of 3 (the last 1 or 2 rows as a smaller group). */
static void small_rows(const float *x, const float *xp, const float *w, float *y, __m256 *acc, int64_t m,
                       int64_t n, int64_t k, int64_t n0, int64_t n1, int64_t step, int ntiles, const int *r0,
                       const int *t) {
    int64_t j = n0;
    for (; j + 3 <= n1; j += 3) group_g(x, xp, w, y, acc, m, n, k, j, step, ntiles, r0, t, 3);
    if (n1 - j == 2) group_g(x, xp, w, y, acc, m, n, k, j, step, ntiles, r0, t, 2);
    else if (n1 - j == 1) group_g(x, xp, w, y, acc, m, n, k, j, step, ntiles, r0, t, 1);
}

/* The exported entry point: 1 <= m <= SMALL_MAX_M; threads split the n output rows in groups of 3. */
void gemm_small_f32(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    const int64_t k8 = k & ~(int64_t)7;
    float *xp = aligned_alloc(64, (size_t)((k8 * m * 4 + 63) & ~63) + 64);
    if (!xp) { /* no memory for packed x: the unpacked row kernel, MAX_M rows of x at a time */
        for (int64_t r = 0; r < m; r += MAX_M) {
            const int64_t mm = m - r < MAX_M ? m - r : MAX_M;
            _Pragma("omp parallel num_threads(threads)")
            {
                int tid = omp_get_thread_num(), nt = omp_get_num_threads();
                int64_t per = (n + nt - 1) / nt, n0 = tid * per, n1 = n0 + per < n ? n0 + per : n;
                if (n0 < n1) rows_f32(x + r * k, w, y + r * n, mm, n, k, n0, n1);
            }
        }
        return;
    }
    int r0[MAX_TILES], t[MAX_TILES];
    const int ntiles = plan_tiles((int)m, r0, t);
    const int64_t step = SMALL_KC;
    _Pragma("omp parallel num_threads(threads)")
    {
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t pieces = k8 / 8, per = (pieces + nt - 1) / nt; /* packing: each thread its share of pieces */
        int64_t p0 = tid * per, p1 = p0 + per < pieces ? p0 + per : pieces;
        if (p0 < p1) pack_tiles(x, xp, m, k, step, ntiles, r0, t, p0, p1);
        _Pragma("omp barrier")
        __m256 acc[MAX_TILES * 3 * MAX_M] __attribute__((aligned(32)));
        int64_t groups = (n + 2) / 3, gper = (groups + nt - 1) / nt;
        int64_t n0 = tid * gper * 3, n1 = n0 + gper * 3 < n ? n0 + gper * 3 : n;
        if (n0 < n1) small_rows(x, xp, w, y, acc, m, n, k, n0, n1, step, ntiles, r0, t);
    }
    free(xp);
}
