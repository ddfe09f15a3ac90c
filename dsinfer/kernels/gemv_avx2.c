/* y[M,N] = x[M,K] . W[N,K]^T for a few rows M (decode): each weight row is read once from memory and used
 * for all M activation rows, which stay in cache. Rows of W are split between threads. Weights are fp32 or
 * bf16 (bf16 widens to fp32 exactly by a 16-bit shift); activations and sums are fp32. */
#include <immintrin.h>
#include <stdint.h>

#define MAX_M 8

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_f32(const float *w) { return _mm256_loadu_ps(w); }

static inline __m256 load_bf16(const uint16_t *w) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* One output row at a time; M (rows of x) and U (8-float vectors per step, so that small M still has
 * independent FMA chains) are compile-time constants after inlining, so accumulators live in registers. */
#define ROW_KERNEL(NAME, WTYPE, LOAD, SCALAR)                                                          \
static inline __attribute__((always_inline)) void NAME##_m(                                         \
        const float *x, const WTYPE *w, float *y, int64_t n, int64_t k, int64_t n0, int64_t n1,     \
        const int M, const int U) {                                                                 \
    for (int64_t j = n0; j < n1; j++) {                                                             \
        const WTYPE *row = w + j * k;                                                               \
        __m256 acc[MAX_M][4];                                                                       \
        for (int r = 0; r < M; r++)                                                                 \
            for (int u = 0; u < U; u++) acc[r][u] = _mm256_setzero_ps();                            \
        int64_t i = 0;                                                                              \
        for (; i + 8 * U <= k; i += 8 * U)                                                          \
            for (int u = 0; u < U; u++) {                                                           \
                __m256 wv = LOAD(row + i + 8 * u);                                                  \
                for (int r = 0; r < M; r++)                                                         \
                    acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * k + i + 8 * u), acc[r][u]); \
            }                                                                                       \
        for (int r = 0; r < M; r++) {                                                               \
            for (int u = 1; u < U; u++) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][u]);            \
            float s = hsum(acc[r][0]);                                                              \
            for (int64_t t = i; t < k; t++) s += SCALAR(row[t]) * x[r * k + t];                     \
            y[r * n + j] = s;                                                                       \
        }                                                                                           \
    }                                                                                               \
}                                                                                                   \
static void NAME(const float *x, const WTYPE *w, float *y, int64_t m, int64_t n, int64_t k,        \
                 int64_t n0, int64_t n1) {                                                          \
    switch (m) {                                                                                    \
    case 1: NAME##_m(x, w, y, n, k, n0, n1, 1, 4); break;                                           \
    case 2: NAME##_m(x, w, y, n, k, n0, n1, 2, 4); break;                                           \
    case 3: NAME##_m(x, w, y, n, k, n0, n1, 3, 2); break;                                           \
    case 4: NAME##_m(x, w, y, n, k, n0, n1, 4, 2); break;                                           \
    case 5: NAME##_m(x, w, y, n, k, n0, n1, 5, 1); break;                                           \
    case 6: NAME##_m(x, w, y, n, k, n0, n1, 6, 1); break;                                           \
    case 7: NAME##_m(x, w, y, n, k, n0, n1, 7, 1); break;                                           \
    default: NAME##_m(x, w, y, n, k, n0, n1, 8, 1); break;                                          \
    }                                                                                               \
}

/* For 5-8 rows of x: two weight rows at a time against tiles of up to 4 x rows, so each x load feeds two
 * FMAs (one x load per FMA would make the loads, not memory, the limit). The second tile re-reads the two
 * weight rows from cache, not memory. */
#define PAIR_KERNEL(NAME, WTYPE, LOAD, SCALAR)                                                         \
static inline __attribute__((always_inline)) void NAME##_tile(                                      \
        const float *x, const WTYPE *w0, const WTYPE *w1, float *y0, float *y1, int64_t n, int64_t k,\
        const int T) {                                                                              \
    __m256 a0[4], a1[4];                                                                            \
    for (int r = 0; r < T; r++) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }       \
    int64_t i = 0;                                                                                  \
    for (; i + 8 <= k; i += 8) {                                                                    \
        __m256 v0 = LOAD(w0 + i), v1 = LOAD(w1 + i);                                                \
        for (int r = 0; r < T; r++) {                                                               \
            __m256 xv = _mm256_loadu_ps(x + r * k + i);                                             \
            a0[r] = _mm256_fmadd_ps(v0, xv, a0[r]);                                                 \
            a1[r] = _mm256_fmadd_ps(v1, xv, a1[r]);                                                 \
        }                                                                                           \
    }                                                                                               \
    for (int r = 0; r < T; r++) {                                                                   \
        float s0 = hsum(a0[r]), s1 = hsum(a1[r]);                                                   \
        for (int64_t t = i; t < k; t++) {                                                           \
            s0 += SCALAR(w0[t]) * x[r * k + t];                                                     \
            s1 += SCALAR(w1[t]) * x[r * k + t];                                                     \
        }                                                                                           \
        y0[r * n] = s0;                                                                             \
        y1[r * n] = s1;                                                                             \
    }                                                                                               \
}                                                                                                   \
static void NAME(const float *x, const WTYPE *w, float *y, int64_t m, int64_t n, int64_t k,        \
                 int64_t n0, int64_t n1) {                                                          \
    int64_t j = n0;                                                                                 \
    for (; j + 2 <= n1; j += 2) {                                                                   \
        const WTYPE *w0 = w + j * k, *w1 = w0 + k;                                                  \
        for (int64_t r0 = 0; r0 < m; r0 += 4) {                                                     \
            const float *xt = x + r0 * k;                                                           \
            float *y0 = y + r0 * n + j, *y1 = y0 + 1;                                               \
            switch (m - r0) {                                                                       \
            case 1: NAME##_tile(xt, w0, w1, y0, y1, n, k, 1); break;                                \
            case 2: NAME##_tile(xt, w0, w1, y0, y1, n, k, 2); break;                                \
            case 3: NAME##_tile(xt, w0, w1, y0, y1, n, k, 3); break;                                \
            default: NAME##_tile(xt, w0, w1, y0, y1, n, k, 4); break;                               \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    if (j < n1) NAME##_single(x, w, y, m, n, k, j, n1);                                             \
}

#define AS_F32(v) (v)
ROW_KERNEL(rows_f32, float, load_f32, AS_F32)
ROW_KERNEL(rows_bf16, uint16_t, load_bf16, bf16_to_f32)
#define rows_f32_pair_single rows_f32
#define rows_bf16_pair_single rows_bf16
PAIR_KERNEL(rows_f32_pair, float, load_f32, AS_F32)
PAIR_KERNEL(rows_bf16_pair, uint16_t, load_bf16, bf16_to_f32)

#ifndef PAIR_FROM
#define PAIR_FROM 2
#endif
/* Up to PAIR_FROM rows: one weight row at a time; more: weight row pairs. */
static void rows_f32_any(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k,
                         int64_t n0, int64_t n1) {
    if (m > PAIR_FROM) rows_f32_pair(x, w, y, m, n, k, n0, n1); else rows_f32(x, w, y, m, n, k, n0, n1);
}
static void rows_bf16_any(const float *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k,
                          int64_t n0, int64_t n1) {
    if (m > PAIR_FROM) rows_bf16_pair(x, w, y, m, n, k, n0, n1); else rows_bf16(x, w, y, m, n, k, n0, n1);
}

/* The exported entry points: m <= MAX_M; threads split the n output rows evenly. */
#define ENTRY(NAME, ROWS, WTYPE)                                                                       \
void NAME(const float *x, const WTYPE *w, float *y, int64_t m, int64_t n, int64_t k, int threads) {   \
    _Pragma("omp parallel num_threads(threads)")                                                     \
    {                                                                                                \
        int t = omp_get_thread_num(), nt = omp_get_num_threads();                                    \
        int64_t per = (n + nt - 1) / nt, n0 = t * per, n1 = n0 + per < n ? n0 + per : n;             \
        if (n0 < n1) ROWS(x, w, y, m, n, k, n0, n1);                                                 \
    }                                                                                                \
}

#include <omp.h>
ENTRY(gemv_f32, rows_f32_any, float)
ENTRY(gemv_bf16, rows_bf16_any, uint16_t)
