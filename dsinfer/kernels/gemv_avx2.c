/* y[M,N] = x[M,K] . W[N,K]^T for a few rows M (decode): each weight row is read once from memory and used
 * for all M activation rows, which stay in cache. Rows of W are split between threads. Weights are fp32 or
 * bf16 (bf16 widens to fp32 exactly by a 16-bit shift); activations and sums are fp32. */
#include "gemv_kernels.h"

/* The exported entry points: m <= WIDE_M; threads split the n output rows evenly. */
#define ENTRY(NAME, ROWS, WTYPE)                                                                       \
void NAME(const float *x, const WTYPE *w, float *y, int64_t m, int64_t n, int64_t k, int threads) {   \
    float *xp = m > BLOCKED_FROM ? pack_x(x, m, k) : NULL;                                          \
    _Pragma("omp parallel num_threads(threads)")                                                     \
    {                                                                                                \
        int t = omp_get_thread_num(), nt = omp_get_num_threads();                                    \
        int64_t per = (n + nt - 1) / nt, n0 = t * per, n1 = n0 + per < n ? n0 + per : n;             \
        if (n0 < n1) ROWS(x, xp, w, y, m, n, k, n0, n1, NULL);                                       \
    }                                                                                                \
    free(xp);                                                                                        \
}

#include <omp.h>
ENTRY(gemv_f32, rows_f32_any, float)
ENTRY(gemv_bf16, rows_bf16_any, uint16_t)
