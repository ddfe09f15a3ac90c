/* Weight-only quantized kernels: y[M,N] = x[M,K] . W[N,K]^T for a few rows M (decode); prefill tiles of W are
 * expanded by dequant_avx2.c. W is stored as int8 codes [N,K] or int4 nibbles [N,K/2], in groups of
 * G columns along K with an fp32 scale (and optionally an fp32 min) per row and group:
 *     W[j,i] = scales[j,i/G] * code[j,i] + mins[j,i/G]        (the last group may be shorter than G)
 * int4: a nibble v holds code v - 8; within a group of g columns, byte t holds column t (low nibble) and
 * column t + g/2 (high nibble). Activations and sums stay fp32; each weight byte is read from memory once per
 * call, for all M rows.
 *
 * A row's dot product is sum_g scale_g * (sum_i code_i x_i) + mins_g * xsum_g, with xsum_g the sum of x over
 * group g; int4 multiplies by the nibble v itself and takes 8 * scale_g * xsum_g off (xsum computed once per
 * call). x is first copied into the order the kernels read it (pack_x): for more than two rows of x, in chunks
 * of K that stay in L1 while a block of weight rows walks over each. Threads split the N rows; the memory
 * traffic is the packed weights (plus scales / mins) once per call. */
#include "qkernels.h"

/* acc[r*U + u] += code[i] * x[r*ldx + i] over i < len, for int8 codes; U independent sums per row of x (with
 * SW, code[i] * sv: the codes times their scale). Returns x past the len floats used. */
static inline AI const float *dot_i8(const int8_t *w, const float *x, int64_t ldx, int64_t len,
                                     __m256 acc[MAX_ACC], const int M, const int U, int64_t pf, const int SW,
                                     __m256 sv) {
    int64_t i = 0;
    for (; i + 8 * U <= len; i += 8 * U) {
        if (!(i & 63)) _mm_prefetch((const char *)w + i + pf, _MM_HINT_T0);
        for (int u = 0; u < U; u++) {
            __m256 wv = _mm256_cvtepi32_ps(i8x8(w + i + 8 * u));
            if (SW) wv = _mm256_mul_ps(wv, sv);
            for (int r = 0; r < M; r++)
                acc[r * U + u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + i + 8 * u), acc[r * U + u]);
        }
    }
    for (; i + 8 <= len; i += 8) {
        __m256 wv = _mm256_cvtepi32_ps(i8x8(w + i));
        if (SW) wv = _mm256_mul_ps(wv, sv);
        for (int r = 0; r < M; r++) acc[r * U] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + i), acc[r * U]);
    }
    if (i < len) {
        int8_t buf[8] = {0};
        memcpy(buf, w + i, len - i);
        __m256 wv = _mm256_cvtepi32_ps(i8x8(buf));
        if (SW) wv = _mm256_mul_ps(wv, sv);
        __m256i mask = tail_mask(len - i);
        for (int r = 0; r < M; r++)
            acc[r * U] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + r * ldx + i, mask), acc[r * U]);
    }
    return x + len;
}

/* Masks for nibbles 0..6 of a 32-bit lane, read from memory (kept in registers they would crowd out
 * accumulators). */
static const __m256i NIBBLE[7] = {
#define NIB(n) {0xfLL << (4 * n) | 0xfLL << (4 * n + 32), 0xfLL << (4 * n) | 0xfLL << (4 * n + 32), \
                0xfLL << (4 * n) | 0xfLL << (4 * n + 32), 0xfLL << (4 * n) | 0xfLL << (4 * n + 32)}
    NIB(0), NIB(1), NIB(2), NIB(3), NIB(4), NIB(5), NIB(6)
#undef NIB
};

/* acc[r*U + u] += v * x over len bytes of one int4 group (the piece of it in this chunk), v the nibbles as stored
 * (0..15). Whole 32-byte blocks first: nibble n of each 32-bit lane is masked out in place, which leaves
 * v * 16^n; pack_x stored the matching x (lane i: byte 4i + n/2, low nibble's column for even n, high's for
 * odd) times 16^-n, so no shifts are needed (the top nibble is shifted down instead: masked, it would read as
 * negative). Then the bytes past the last block: 8 at a time, x as their low-nibble columns then high ones.
 * With SW, v * sv. */
static inline AI const float *dot_i4(const uint8_t *w, const float *x, int64_t ldx, int64_t len,
                                     __m256 acc[MAX_ACC], const int M, const int U, int64_t pf, const int SW,
                                     __m256 sv) {
    const __m256i *mask = NIBBLE;
    __asm__("" : "+r"(mask)); /* loads, not constants the compiler rebuilds in registers for every group */
    int64_t b = 0;
    for (; b + 32 <= len; b += 32, x += 64) {
        if (!(b & 63)) _mm_prefetch((const char *)w + b + pf, _MM_HINT_T0);
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + b));
#pragma GCC unroll 8
        for (int n = 0; n < 8; n++) {
            __m256i nib = n < 7 ? _mm256_and_si256(v, _mm256_load_si256(mask + n)) : _mm256_srli_epi32(v, 28);
            __m256 wv = _mm256_cvtepi32_ps(nib);
            if (SW) wv = _mm256_mul_ps(wv, sv);
            for (int r = 0; r < M; r++)
                acc[r * U + n % U] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + 8 * n), acc[r * U + n % U]);
        }
    }
    const int64_t nt = len - b;
    const float *xl = x, *xh = x + nt;
    int64_t i = 0;
    for (; i + 8 <= nt; i += 8) {
        __m256i v = u8x8(w + b + i);
        __m256 lo = lo4(v), hi = hi4(v);
        if (SW) {
            lo = _mm256_mul_ps(lo, sv);
            hi = _mm256_mul_ps(hi, sv);
        }
        for (int r = 0; r < M; r++) {
            acc[r * U] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xl + r * ldx + i), acc[r * U]);
            acc[r * U + 1 % U] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xh + r * ldx + i), acc[r * U + 1 % U]);
        }
    }
    if (i < nt) {
        uint8_t buf[8] = {0};
        memcpy(buf, w + b + i, nt - i);
        __m256i v = u8x8(buf), mask = tail_mask(nt - i);
        __m256 lo = lo4(v), hi = hi4(v);
        if (SW) {
            lo = _mm256_mul_ps(lo, sv);
            hi = _mm256_mul_ps(hi, sv);
        }
        for (int r = 0; r < M; r++) {
            acc[r * U] = _mm256_fmadd_ps(lo, _mm256_maskload_ps(xl + r * ldx + i, mask), acc[r * U]);
            acc[r * U + 1 % U] = _mm256_fmadd_ps(hi, _mm256_maskload_ps(xh + r * ldx + i, mask), acc[r * U + 1 % U]);
        }
    }
    return x + 2 * nt;
}

/* One int4 block's x as dot_i4 reads it: out[8n + i] = (n even ? lo : hi)[4i + n/2] * 16^-n (1 for n = 7), a
 * 4 x 8 transpose of each of lo[0:32] and hi[0:32]. */
static inline void pack_block(const float *lo, const float *hi, float *out) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int h = 0; h < 2; h++) {
        const float *src = h ? hi : lo;
        __m256 l0 = _mm256_loadu_ps(src), l1 = _mm256_loadu_ps(src + 8);
        __m256 l2 = _mm256_loadu_ps(src + 16), l3 = _mm256_loadu_ps(src + 24);
        __m256d a0 = _mm256_castps_pd(_mm256_unpacklo_ps(l0, l1)), a1 = _mm256_castps_pd(_mm256_unpackhi_ps(l0, l1));
        __m256d b0 = _mm256_castps_pd(_mm256_unpacklo_ps(l2, l3)), b1 = _mm256_castps_pd(_mm256_unpackhi_ps(l2, l3));
        __m256d c[4] = {_mm256_unpacklo_pd(a0, b0), _mm256_unpackhi_pd(a0, b0), _mm256_unpacklo_pd(a1, b1),
                        _mm256_unpackhi_pd(a1, b1)};
        for (int q = 0; q < 4; q++) {
            const int n = 2 * q + h;
            __m256 v = _mm256_permutevar8x32_ps(_mm256_castpd_ps(c[q]), order);
            _mm256_storeu_ps(out + 8 * n, _mm256_mul_ps(v, _mm256_set1_ps(n < 7 ? 1.0f / (1 << 4 * n) : 1.0f)));
        }
    }
}

/* x rearranged chunk by chunk, in the order the kernels read it: chunk [c, e) of every row of x together
 * (row r at r * ldx, ldx = cb floats per byte; rows of x K apart would fall on the same L1 sets), and within
 * a chunk, group piece by group piece as dot_i8 / dot_i4 consume them. */
static void pack_x(const struct qcall *a, float *xp, int i4) {
    const int64_t m = a->m, k = a->k, ldx = a->cb * (i4 ? 2 : 1);
    for (int64_t c = 0; c < a->rowb; xp += m * ldx) {
        const int64_t e = chunk_end(a, c);
        for (int64_t r = 0; r < m; r++) {
            const float *xr = a->x + r * k;
            float *o = xp + r * ldx;
            if (!i4) {
                memcpy(o, xr + c, sizeof(float) * (e - c));
                continue;
            }
            for (int64_t p = c, gi = c / a->gb; p < e; gi++) {
                const int64_t g0 = gi * a->gb, gend = g0 + a->gb < e ? g0 + a->gb : e;
                const int64_t h = (k - gi * a->g < a->g ? k - gi * a->g : a->g) / 2; /* half the group's columns */
                const float *lo = xr + gi * a->g + (p - g0), *hi = lo + h;
                int64_t t = 0;
                for (; t + 32 <= gend - p; t += 32, o += 64) pack_block(lo + t, hi + t, o);
                const int64_t nt = gend - p - t;
                memcpy(o, lo + t, sizeof(float) * nt);
                memcpy(o + nt, hi + t, sizeof(float) * nt);
                o += 2 * nt;
                p = gend;
            }
        }
        c = e;
    }
}

/* xsum[g*8 + r] = sum of x[r] over group g (8 lanes per group, one per row of x, unused ones zero). */
static void group_sums(const float *x, int64_t m, int64_t k, int64_t g, int64_t ng, float *xs) {
    memset(xs, 0, sizeof(float) * 8 * ng);
    for (int64_t r = 0; r < m; r++)
        for (int64_t gi = 0; gi < ng; gi++) {
            const float *p = x + r * k + gi * g;
            int64_t len = k - gi * g < g ? k - gi * g : g, i = 0;
            __m256 acc = _mm256_setzero_ps();
            for (; i + 8 <= len; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(p + i));
            float s = hsum(acc);
            for (; i < len; i++) s += p[i];
            xs[gi * 8 + r] = s;
        }
}

/* tot[r] += scale * (sum of acc[r*U + u] over u), and acc back to zero: one group piece's dot product, scaled. */
static inline AI void add_scaled(__m256 *tot, __m256 acc[MAX_ACC], float scale, const int M, const int U) {
    __m256 s = _mm256_set1_ps(scale);
    for (int r = 0; r < M; r++) {
        tot[r] = _mm256_fmadd_ps(s, sum_u(acc + r * U, U), tot[r]);
        for (int u = 0; u < U; u++) acc[r * U + u] = _mm256_setzero_ps();
    }
}

static inline AI const float *dot(const uint8_t *w, const float *x, int64_t ldx, int64_t len, __m256 acc[MAX_ACC],
                                  const int M, const int U, const int I4, int64_t pf, const int SW, __m256 sv) {
    if (I4) return dot_i4(w, x, ldx, len, acc, M, U, pf, SW, sv);
    return dot_i8((const int8_t *)w, x, ldx, len, acc, M, U, pf, SW, sv);
}

/* One row's part of the chunk [c, e), group piece by group piece: sum code * x, then add it times the group's
 * scale into tj. With SW (short groups and many rows of x) the scale multiplies the converted codes instead:
 * one multiply per 8 codes for all rows of x, rather than per row and group a sum into tj (in memory then). */
static inline AI void row_chunk(const uint8_t *row, const float *x, const float *scale, __m256 *tj,
                                __m256 acc[MAX_ACC], int64_t c, int64_t e, int64_t gb, int64_t gc, int64_t ldx,
                                int64_t pf, const int M, const int U, const int I4, const int SW) {
    for (int64_t p = c, gend = (gc + 1) * gb; p < e; gend += gb, scale++) {
        const int64_t end = gend < e ? gend : e;
        x = dot(row + p, x, ldx, end - p, acc, M, U, I4, pf, SW, _mm256_set1_ps(*scale));
        if (!SW) add_scaled(tj, acc, *scale, M, U);
        p = end;
    }
    if (SW) add_scaled(tj, acc, 1.0f, M, U);
}

/* Rows j0..j1 (at most BLOCK_ROWS): for each chunk of the rows' bytes, for each row, its group pieces in the
 * chunk (row_chunk). Each 64 bytes read prefetch the same bytes of the row a block on (a row on where whole
 * rows are walked), which the hardware prefetcher does not foresee. */
static inline AI void block(const struct qcall *a, int64_t j0, int64_t j1, const int M, const int U, const int I4) {
    __m256 tot[BLOCK_ROWS * MAX_M], t[MAX_M], acc[MAX_ACC];
    const int64_t rowb = a->rowb, gb = a->gb, fpb = I4 ? 2 : 1;
    for (int64_t i = 0; i < (j1 - j0) * M; i++) tot[i] = _mm256_setzero_ps();
    for (int u = 0; u < M * U; u++) acc[u] = _mm256_setzero_ps();
    const int64_t ldx = (M <= 2 ? a->cb : chunk_bytes(M, 0, I4)) * fpb;
    const float *xc = a->xp;
    for (int64_t c = 0; c < rowb; xc += M * ldx) {
        const int64_t e = chunk_end(a, c), gc = c / gb;
        for (int64_t j = j0; j < j1; j++) {
            const uint8_t *row = (const uint8_t *)a->q + j * rowb;
            const float *x = xc, *scale = a->scales + j * a->ng + gc;
            const int64_t pf = M <= 2 ? rowb : BLOCK_ROWS * rowb;
            /* the row's sums in registers while its groups are walked, where they fit beside acc */
            const int in_regs = M * (U + 1) <= 12;
            __m256 *tj = in_regs ? t : tot + (j - j0) * M;
            for (int r = 0; r < M && in_regs; r++) t[r] = tot[(j - j0) * M + r];
            if (M >= 7 && 4 * gb <= a->cb) row_chunk(row, x, scale, tj, acc, c, e, gb, gc, ldx, pf, M, U, I4, 1);
            else row_chunk(row, x, scale, tj, acc, c, e, gb, gc, ldx, pf, M, U, I4, 0);
            for (int r = 0; r < M && in_regs; r++) tot[(j - j0) * M + r] = t[r];
        }
        c = e;
    }
    finish(a, tot, j0, j1, I4 ? -8.0f : 0.0f);
}

static inline AI void rows_m(const struct qcall *a, int64_t n0, int64_t n1, const int M, const int U, const int I4) {
    for (int64_t j = n0; j < n1; j += BLOCK_ROWS) block(a, j, j + BLOCK_ROWS < n1 ? j + BLOCK_ROWS : n1, M, U, I4);
}

/* U, the accumulators per row of x for M = 1..8 rows, so that small M still has independent FMA chains (at most
 * MAX_ACC in all; constants after inlining, so the accumulators live in registers). Measured on Zen 3. */
#ifndef U_I8
#define U_I8 8, 4, 4, 2, 2, 2, 1, 1
#define U_I4 4, 4, 2, 2, 1, 1, 1, 1
#endif
#define ROWS(NAME, I4, U1, U2, U3, U4, U5, U6, U7, U8)                                                  \
static void NAME(const struct qcall *a, int64_t n0, int64_t n1) {                                      \
    switch (a->m) {                                                                                    \
    case 1: rows_m(a, n0, n1, 1, U1, I4); break;                                                       \
    case 2: rows_m(a, n0, n1, 2, U2, I4); break;                                                       \
    case 3: rows_m(a, n0, n1, 3, U3, I4); break;                                                       \
    case 4: rows_m(a, n0, n1, 4, U4, I4); break;                                                       \
    case 5: rows_m(a, n0, n1, 5, U5, I4); break;                                                       \
    case 6: rows_m(a, n0, n1, 6, U6, I4); break;                                                       \
    case 7: rows_m(a, n0, n1, 7, U7, I4); break;                                                       \
    default: rows_m(a, n0, n1, 8, U8, I4); break;                                                      \
    }                                                                                                  \
}
#define ROWS_(NAME, I4, ...) ROWS(NAME, I4, __VA_ARGS__)

ROWS_(rows_i8, 0, U_I8)
ROWS_(rows_i4, 1, U_I4)

/* The exported entry points: m <= MAX_M; threads split the n output rows evenly; mins may be NULL. */
static void qgemv(const float *x, const void *q, const float *scales, const float *mins, float *y, int64_t m,
                  int64_t n, int64_t k, int64_t g, int threads, int i4) {
    const int64_t ng = (k + g - 1) / g, rowb = i4 ? k / 2 : k;
    struct qcall a = {x, NULL, scales, mins, NULL, q, y, m, n, k, g, ng, rowb, i4 ? g / 2 : g,
                      chunk_bytes(m, rowb, i4)};
    int64_t chunks = 0;
    for (int64_t c = 0; c < rowb; c = chunk_end(&a, c)) chunks++;
    const int64_t packed = chunks * m * a.cb * (i4 ? 2 : 1);
    float *buf = aligned_alloc(64, sizeof(float) * (packed + 8 * ng + 16) & ~(size_t)63); /* no split loads */
    pack_x(&a, buf, i4);
    a.xp = buf;
    if (i4 || mins) {
        group_sums(x, m, k, g, ng, buf + packed);
        a.xsum = buf + packed;
    }
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t per = (n + nt - 1) / nt, n0 = t * per, n1 = n0 + per < n ? n0 + per : n;
        if (n0 < n1) {
            if (i4) rows_i4(&a, n0, n1); else rows_i8(&a, n0, n1);
        }
    }
    free(buf);
}

void qgemv_i8(const float *x, const int8_t *q, const float *scales, const float *mins, float *y, int64_t m,
              int64_t n, int64_t k, int64_t g, int threads) {
    qgemv(x, q, scales, mins, y, m, n, k, g, threads, 0);
}

void qgemv_i4(const float *x, const uint8_t *q, const float *scales, const float *mins, float *y, int64_t m,
              int64_t n, int64_t k, int64_t g, int threads) {
    qgemv(x, q, scales, mins, y, m, n, k, g, threads, 1);
}
