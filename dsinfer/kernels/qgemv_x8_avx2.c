#include "qkernels.h"

/* ---- Integer path (int8 activations), as llama.cpp does for Q4_0 x Q8_0 ----
 * x is first quantized per row in blocks of 32 consecutive columns: d = max|x| / 127, xq = round(x / d) (ties to
 * even; x * (1 / d) in fp32, 0 where d = 0). The blocks never straddle a group or (int4) a half-group: the
 * caller takes this path only where every group's length (int8) or half-length (int4) is a multiple of 32. Then
 * the codes meet xq in integers: int4 nibbles v (0..15) as unsigned bytes, maddubs(v, xq) gives int16 pair sums
 * of the low nibbles' block and of the high nibbles' block; hadd and madd(., 1) put both blocks' int32 sums (of 4
 * products each) into one vector. int8 codes w: |w| unsigned times xq with w's sign (sign_epi8), maddubs, madd.
 * Each block's int32 sums are converted once and FMA'd with the block's d into a per-group sum, which is scaled by
 * the group's scale. For many rows of x the vector integer multiplies (maddubs and madd: two per 32 products,
 * 1.5 for int4) bound the work on AVX2 without VNNI, which is why int8 codes gain less there than int4 ones.
 * The -8 of int4 and the mins use xsum, the per-group sums of the dequantized xq (d * xq), in finish. */

/* Quantizes x [m, k] (k a multiple of 32) into xq [m, k] and d [m, k / 32]; xs[g * 8 + r] = sum over group g of
 * d * xq (8 lanes per group, unused ones zero) when xs is not NULL. */
static void quantize_x(const float *x, int64_t m, int64_t k, int64_t g, int64_t ng, int8_t *xq, float *d,
                       float *xs) {
    const int64_t nb = k / 32;
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    if (xs) memset(xs, 0, sizeof(float) * 8 * ng);
    for (int64_t r = 0; r < m; r++)
        for (int64_t b = 0; b < nb; b++) {
            const float *p = x + r * k + 32 * b;
            __m256 v[4], amax = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(p + 8 * i);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(signbit, v[i]));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float db = _mm_cvtss_f32(h) / 127.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
            __m256i q[4];
            for (int i = 0; i < 4; i++)
                q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            /* int32 -> int16 -> int8: packs interleave 128-bit lanes, the permute puts them back in order */
            __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(xq + r * k + 32 * b), w);
            d[r * nb + b] = db;
            if (xs) {
                __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
                xs[(32 * b / g) * 8 + r] += db * (float)_mm_cvtsi128_si32(t);
            }
        }
}

struct icall {
    const int8_t *xq;
    const float *d, *dp; /* dp: int4's block scales per step of 64 columns, see i4_step */
    int64_t nb; /* blocks of 32 per row of x */
};

/* 8 int32 lanes of sums of 4 products each: unsigned bytes u times signed bytes s (no int16 saturation here:
 * |u| <= 128 and |s| <= 127, so a pair sums to at most 32512). With AVX-VNNI one instruction does both steps. */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(X8_VNNI512)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(X8_VNNI)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* int4 steps: [lo, lo, hi, hi] int32 sums in each 128-bit half from the low nibbles times xl and the high ones
 * times xh (see i4_step). */
static inline __m256i dot_i4_pair(__m256i lo, __m256i xl, __m256i hi, __m256i xh) {
#ifdef X8_VNNI
    return _mm256_hadd_epi32(dot_u8s8(lo, xl), dot_u8s8(hi, xh));
#else
    __m256i pl = _mm256_maddubs_epi16(lo, xl), ph = _mm256_maddubs_epi16(hi, xh);
    return _mm256_madd_epi16(_mm256_hadd_epi16(pl, ph), _mm256_set1_epi16(1));
#endif
}

/* One 32-byte load of int4 codes (64 columns: a block of x for the low nibbles, one for the high) for all M
 * rows of x, into accumulator u of each row. The two blocks' int16 pair sums (at most 2 * 15 * 127 each) are
 * added pairwise (hadd) before the one madd, whose lanes then hold [lo, lo, hi, hi] sums in each 128-bit half;
 * dp holds the matching block scales [dl, dl, dh, dh, dl, dl, dh, dh] for each such step of each row of x. */
static inline AI void i4_step(const uint8_t *wg, const int8_t *xl, const int8_t *xh, const float *dp, int64_t b,
                              int64_t k, int64_t ldp, int64_t pf, __m256 *acc, const int M, const int U,
                              const int u) {
    if (!(b & 63)) _mm_prefetch((const char *)wg + b + pf, _MM_HINT_T0);
    const __m256i m4 = _mm256_set1_epi8(15), v = _mm256_loadu_si256((const __m256i *)(wg + b));
    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    for (int r = 0; r < M; r++) {
        __m256i s = dot_i4_pair(lo, _mm256_loadu_si256((const __m256i *)(xl + r * k + b)),
                                hi, _mm256_loadu_si256((const __m256i *)(xh + r * k + b)));
        acc[r * U + u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_load_ps(dp + r * ldp + b / 4), acc[r * U + u]);
    }
}

/* One 32-byte load of int8 codes (a block of x) for all M rows of x, into accumulator u of each row: |w| times
 * xq with w's sign. */
static inline AI void i8_step(const uint8_t *wg, const int8_t *xg, const float *dg, int64_t b, int64_t k,
                              int64_t nb, int64_t pf, __m256 *acc, const int M, const int U, const int u) {
    if (!(b & 63)) _mm_prefetch((const char *)wg + b + pf, _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(wg + b)), av = _mm256_abs_epi8(v); /* -128: 128 */
    for (int r = 0; r < M; r++) {
        __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xg + r * k + b)), v);
        acc[r * U + u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(av, xs)),
                                         _mm256_broadcast_ss(dg + r * nb + b / 32), acc[r * U + u]);
    }
}

/* Rows j0..j1 of W with the quantized x: tot[(j - j0) * M + r] the 8-lane sums for y[r, j], then finish. U
 * independent accumulators per row of x (they alternate by block), in registers: the steps unrolled by U. */
/* One group's (or, the last, partial group's) steps of one weight row into t[r] += scale * sum: len columns from
 * c0. GS: the steps of 32 bytes a group takes, where known at compile time (0: from len), so that small groups
 * unroll completely. */
static inline AI void igroup(const struct icall *ic, const uint8_t *wg, int64_t c0, int64_t len, float scale,
                             __m256 *t, int64_t k, int64_t pf, const int M, const int U0, const int I4,
                             const int GS) {
    const int U = GS && GS < U0 ? GS : U0;
    __m256 acc[MAX_M * 4];
    for (int u = 0; u < M * U; u++) acc[u] = _mm256_setzero_ps();
    const int64_t steps = GS ? GS : (I4 ? len / 64 : len / 32);
    const int8_t *xl = ic->xq + c0, *xh = xl + len / 2;
    const float *dp = ic->dp + c0 / 8, *dg = ic->d + c0 / 32; /* dp: 8 floats per 64 columns */
    int64_t st = 0;
    for (; st + U <= steps; st += U)
        for (int u = 0; u < U; u++) {
            if (I4) i4_step(wg, xl, xh, dp, 32 * (st + u), k, k / 8, pf, acc, M, U, u);
            else i8_step(wg, xl, dg, 32 * (st + u), k, ic->nb, pf, acc, M, U, u);
        }
    for (; st < steps; st++) {
        if (I4) i4_step(wg, xl, xh, dp, 32 * st, k, k / 8, pf, acc, M, U, 0);
        else i8_step(wg, xl, dg, 32 * st, k, ic->nb, pf, acc, M, U, 0);
    }
    __m256 s = _mm256_set1_ps(scale);
    for (int r = 0; r < M; r++) t[r] = _mm256_fmadd_ps(s, sum_u(acc + r * U, U), t[r]);
}

/* Rows j0..j1 of W with the quantized x: tot[(j - j0) * M + r] the 8-lane sums for y[r, j], then finish. U
 * independent accumulators per row of x (they alternate by step), in registers: the steps unrolled by U. GS as
 * in igroup, for all groups but a partial last one. */
static inline AI void iblock(const struct qcall *a, const struct icall *ic, int64_t j0, int64_t j1, const int M,
                             const int U, const int I4, const int GS) {
    __m256 tot[BLOCK_ROWS * MAX_M];
    const int64_t k = a->k, g = a->g, ng = a->ng, rowb = a->rowb, gb = a->gb, full = k / g;
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *w = (const uint8_t *)a->q + j * rowb;
        const float *sc = a->scales + j * ng;
        __m256 t[MAX_M];
        for (int r = 0; r < M; r++) t[r] = _mm256_setzero_ps();
        for (int64_t gi = 0; gi < full; gi++) igroup(ic, w + gi * gb, gi * g, g, sc[gi], t, k, rowb, M, U, I4, GS);
        if (full < ng) igroup(ic, w + full * gb, full * g, k - full * g, sc[full], t, k, rowb, M, U, I4, 0);
        for (int r = 0; r < M; r++) tot[(j - j0) * M + r] = t[r];
    }
    finish(a, tot, j0, j1, I4 ? -8.0f : 0.0f);
}

static inline AI void irows_g(const struct qcall *a, const struct icall *ic, int64_t n0, int64_t n1, const int M,
                              const int U, const int I4, const int GS) {
    for (int64_t j = n0; j < n1; j += BLOCK_ROWS)
        iblock(a, ic, j, j + BLOCK_ROWS < n1 ? j + BLOCK_ROWS : n1, M, U, I4, GS);
}

/* Groups of 64 and 128 columns unrolled (1 / 2 steps for int4, 2 / 4 for int8), others walked. */
static inline AI void irows_m(const struct qcall *a, const struct icall *ic, int64_t n0, int64_t n1, const int M,
                              const int U, const int I4) {
    if (a->g == 128 && a->k >= 128) irows_g(a, ic, n0, n1, M, U, I4, I4 ? 2 : 4);
    else if (a->g == 64 && a->k >= 64) irows_g(a, ic, n0, n1, M, U, I4, I4 ? 1 : 2);
    else irows_g(a, ic, n0, n1, M, U, I4, 0);
}

#ifndef IU_I8
#define IU_I8 4, 2, 2, 1, 1, 1, 1, 1
#define IU_I4 4, 2, 2, 1, 1, 1, 1, 1
#endif
#define IROWS(NAME, I4, U1, U2, U3, U4, U5, U6, U7, U8)                                                 \
static void NAME(const struct qcall *a, const struct icall *ic, int64_t n0, int64_t n1) {              \
    switch (a->m) {                                                                                    \
    case 1: irows_m(a, ic, n0, n1, 1, U1, I4); break;                                                  \
    case 2: irows_m(a, ic, n0, n1, 2, U2, I4); break;                                                  \
    case 3: irows_m(a, ic, n0, n1, 3, U3, I4); break;                                                  \
    case 4: irows_m(a, ic, n0, n1, 4, U4, I4); break;                                                  \
    case 5: irows_m(a, ic, n0, n1, 5, U5, I4); break;                                                  \
    case 6: irows_m(a, ic, n0, n1, 6, U6, I4); break;                                                  \
    case 7: irows_m(a, ic, n0, n1, 7, U7, I4); break;                                                  \
    default: irows_m(a, ic, n0, n1, 8, U8, I4); break;                                                 \
    }                                                                                                  \
}
#define IROWS_(NAME, I4, ...) IROWS(NAME, I4, __VA_ARGS__)

IROWS_(irows_i8, 0, IU_I8)
IROWS_(irows_i4, 1, IU_I4)

static void qgemv_x8(const float *x, const void *q, const float *scales, const float *mins, float *y, int64_t m,
                     int64_t n, int64_t k, int64_t g, int threads, int i4) {
    const int64_t ng = (k + g - 1) / g, rowb = i4 ? k / 2 : k, nb = k / 32;
    struct qcall a = {x, NULL, scales, mins, NULL, q, y, m, n, k, g, ng, rowb, i4 ? g / 2 : g, rowb};
    const size_t xqb = ((size_t)(m * k) + 63) & ~(size_t)63, db = (sizeof(float) * m * nb + 63) & ~(size_t)63;
    const size_t xsb = (sizeof(float) * 8 * ng + 63) & ~(size_t)63;
    const size_t dpb = i4 ? (sizeof(float) * m * (k / 8) + 63) & ~(size_t)63 : 0;
    char *buf = aligned_alloc(64, xqb + db + xsb + dpb);
    float *xs = (i4 || mins) ? (float *)(buf + xqb + db) : NULL, *d = (float *)(buf + xqb);
    quantize_x(x, m, k, g, ng, (int8_t *)buf, d, xs);
    float *dp = (float *)(buf + xqb + db + xsb);
    if (i4) /* for each group and each 32 bytes of its codes: the scales of the low and the high nibbles' blocks */
        for (int64_t r = 0; r < m; r++)
            for (int64_t c0 = 0; c0 < k; c0 += g) {
                const int64_t h = (k - c0 < g ? k - c0 : g) / 2;
                for (int64_t b = 0; b < h; b += 32) {
                    const float dl = d[r * nb + (c0 + b) / 32], dh = d[r * nb + (c0 + h + b) / 32];
                    _mm256_store_ps(dp + r * (k / 8) + (c0 + 2 * b) / 8,
                                    _mm256_setr_ps(dl, dl, dh, dh, dl, dl, dh, dh));
                }
            }
    a.xsum = xs;
    struct icall ic = {(const int8_t *)buf, d, dp, nb};
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t per = (n + nt - 1) / nt, n0 = t * per, n1 = n0 + per < n ? n0 + per : n;
        if (n0 < n1) {
            if (i4) irows_i4(&a, &ic, n0, n1); else irows_i8(&a, &ic, n0, n1);
        }
    }
    free(buf);
}

/* As qgemv_i8 / qgemv_i4 with x quantized to int8 (see above); only for shapes where every group's length (int8) or
 * half-length (int4) is a multiple of 32 (the last group's too; the caller checks). X8_NAME: the _vnni copy's
 * names where qgemv_x8_vnni.c compiles this file again for AVX-VNNI, _vnni512 where qgemv_x8_vnni512.c does for
 * AVX512-VNNI (the same instruction, EVEX-encoded: CPUs such as Ice Lake have only this one); the same sums. */
#if defined(X8_VNNI512)
#define X8_NAME(name) name##_vnni512
#elif defined(X8_VNNI)
#define X8_NAME(name) name##_vnni
#else
#define X8_NAME(name) name
#endif
void X8_NAME(qgemv_i8_x8)(const float *x, const int8_t *q, const float *scales, const float *mins, float *y,
                          int64_t m, int64_t n, int64_t k, int64_t g, int threads) {
    qgemv_x8(x, q, scales, mins, y, m, n, k, g, threads, 0);
}

void X8_NAME(qgemv_i4_x8)(const float *x, const uint8_t *q, const float *scales, const float *mins, float *y,
                          int64_t m, int64_t n, int64_t k, int64_t g, int threads) {
    qgemv_x8(x, q, scales, mins, y, m, n, k, g, threads, 1);
}
#ifndef X8_VNNI

/* x [m, k] (k a multiple of 32) rounded as the integer path sees it, d * xq, into out [m, k]: prefill tiles use
 * it so that a row gets the same numbers whether it runs in a decode batch or in a prefill. Rows split between
 * threads. */
void round_x_i8(const float *x, float *out, int64_t m, int64_t k, int threads) {
    const int64_t nb = k / 32;
    #pragma omp parallel num_threads(threads)
    {
        int8_t xq[32];
        float d;
        #pragma omp for schedule(static)
        for (int64_t rb = 0; rb < m * nb; rb++) {
            quantize_x(x + rb * 32, 1, 32, 32, 1, xq, &d, NULL);
            for (int i = 0; i < 32; i++) out[rb * 32 + i] = d * (float)xq[i];
        }
    }
}
#endif
