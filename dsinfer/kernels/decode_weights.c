/* The fused decode layer's products with a weight matrix in any of its formats (decode_layer.h: fp32, bf16,
 * int8 / int4 codes in groups), by the kernels of this library: gemv_* and qgemv_* for a matrix, moe_decode_*
 * (fp32, bf16) or one expert at a time (integer codes) for the experts, and MLA's absorption and expansion
 * through kv_b (fp32 or bf16). Activations and sums are fp32 throughout. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "decode_layer.h"
#include "simd.h"

#define GEMV(NAME, WT) void NAME(const float *x, const WT *w, float *y, int64_t m, int64_t n, int64_t k, int threads);
#define QGEMV(NAME, WT) void NAME(const float *x, const WT *q, const float *scales, const float *mins, float *y, \
                                  int64_t m, int64_t n, int64_t k, int64_t g, int threads);
GEMV(gemv_f32, float)
GEMV(gemv_bf16, uint16_t)
QGEMV(qgemv_i8, int8_t)
QGEMV(qgemv_i4, uint8_t)
QGEMV(qgemv_i8_x8, int8_t)
QGEMV(qgemv_i4_x8, uint8_t)
QGEMV(qgemv_i8_x8_vnni, int8_t)
QGEMV(qgemv_i4_x8_vnni, uint8_t)
QGEMV(qgemv_i8_x8_vnni512, int8_t)
QGEMV(qgemv_i4_x8_vnni512, uint8_t)
#define MOE(NAME, WT) int NAME(const float *x, const int64_t *ids, const float *weights, const WT *gate_up, \
                               const WT *down, float *out, int64_t t, int64_t k, int64_t e, int64_t d,   \
                               int64_t inter, int threads, int64_t most);
MOE(moe_decode_f32, float)
MOE(moe_decode_bf16, uint16_t)

/* y [m, n] = x [m, k] @ A^T. */
static void mat_rows(const Mat *A, const float *x, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    switch (A->format) {
    case W_F32: gemv_f32(x, A->w, y, m, n, k, threads); break;
    case W_BF16: gemv_bf16(x, A->w, y, m, n, k, threads); break;
    case W_I8:
        (A->int8_x == 3 ? qgemv_i8_x8_vnni512 : A->int8_x == 2 ? qgemv_i8_x8_vnni : A->int8_x ? qgemv_i8_x8 : qgemv_i8)(x, A->w, A->scales, A->mins, y, m,
                                                                                   n, k, A->group, threads);
        break;
    default:
        (A->int8_x == 3 ? qgemv_i4_x8_vnni512 : A->int8_x == 2 ? qgemv_i4_x8_vnni : A->int8_x ? qgemv_i4_x8 : qgemv_i4)(x, A->w, A->scales, A->mins, y, m,
                                                                                   n, k, A->group, threads);
    }
}

/* The most rows of x A's kernel takes in one pass over its weights. */
static int64_t pass_rows(const Mat *A) { return A->wide && A->format <= W_BF16 ? WIDE_ROWS : KERNEL_ROWS; }

/* y [m, n] = x [m, k] . A^T, pass_rows(A) rows of x at a time, back to back, so that a second pass finds the
 * weights in cache; each row's sums are the kernels' batch-invariant ones. */
void mat_vec(const Mat *A, const float *x, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    const int64_t most = pass_rows(A);
    for (int64_t r = 0; r < m; r += most)
        mat_rows(A, x + r * k, y + r * n, m - r < most ? m - r : most, n, k, threads);
}

/* The matrix that starts at row `row` of A (rows of k columns): one expert of a stack. */
static Mat mat_at(const Mat *A, int64_t row, int64_t k) {
    static const int64_t bits[] = {32, 16, 8, 4};
    Mat B = *A;
    B.w = (const char *)A->w + row * k * bits[A->format] / 8;
    if (A->format >= W_I8) {
        const int64_t groups = (k + A->group - 1) / A->group;
        B.scales = A->scales + row * groups;
        B.mins = A->mins ? A->mins + row * groups : NULL;
    }
    return B;
}

/* One expert's SwiGLU for its m tokens: out[tok[i]] += w[i] * down @ (silu(gate @ x) * (up @ x)). */
static void expert(const Mat *gate_up, const Mat *down, const float *xg, const int64_t *tok, const float *w,
                   int64_t m, int64_t d, int64_t inter, float *g, float *y, float *out, int threads) {
    mat_vec(gate_up, xg, g, m, 2 * inter, d, threads);
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < inter; i++) {
            const float a = g[r * 2 * inter + i];
            g[r * inter + i] = a / (1.0f + expf(-a)) * g[r * 2 * inter + inter + i] * w[r]; /* in place: r*I <= r*2I */
        }
    mat_vec(down, g, y, m, d, inter, threads);
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = 0; c < d; c++) out[tok[r] * d + c] += y[r * d + c];
}

/* Routed experts (or, with e = 1 and ids 0, one MLP) in integer codes: each used expert, in ascending order,
 * gathers its tokens (ascending) and adds its weighted output; 0, 1 for an id outside [0, e), 2 no memory. */
static int experts_by_one(const Mat *gate_up, const Mat *down, const float *x, const int64_t *ids,
                          const float *weights, float *out, int64_t t, int64_t k, int64_t e, int64_t d,
                          int64_t inter, int threads) {
    for (int64_t p = 0; p < t * k; p++)
        if (ids[p] < 0 || ids[p] >= e) return 1;
    float *buf = malloc(sizeof(float) * (t * d + t * 2 * inter + t * d));
    if (!buf) return 2;
    float *xg = buf, *g = xg + t * d, *y = g + t * 2 * inter, w[MAX_T];
    int64_t tok[MAX_T];
    memset(out, 0, sizeof(float) * t * d);
    for (int64_t ex = 0, next = 0; next < e; ex = next) {
        int64_t m = 0;
        next = e;
        for (int64_t p = 0; p < t * k; p++) {
            if (ids[p] == ex) {
                tok[m] = p / k, w[m] = weights[p];
                memcpy(xg + m++ * d, x + p / k * d, sizeof(float) * d);
            } else if (ids[p] > ex && ids[p] < next) {
                next = ids[p];
            }
        }
        if (m) {
            const Mat gu = mat_at(gate_up, ex * 2 * inter, d), dn = mat_at(down, ex * d, inter);
            expert(&gu, &dn, xg, tok, w, m, d, inter, g, y, out, threads);
        }
    }
    free(buf);
    return 0;
}

/* out [t, d] = the weighted sum of each token's k experts (ids, weights [t, k]) of the stacks gate_up, down. */
int mat_ffn(const Mat *gate_up, const Mat *down, const float *x, const int64_t *ids, const float *weights,
            float *out, int64_t t, int64_t k, int64_t e, int64_t d, int64_t inter, int threads) {
    if (gate_up->format == down->format && gate_up->format == W_F32)
        return moe_decode_f32(x, ids, weights, gate_up->w, down->w, out, t, k, e, d, inter, threads,
                              pass_rows(gate_up));
    if (gate_up->format == down->format && gate_up->format == W_BF16)
        return moe_decode_bf16(x, ids, weights, gate_up->w, down->w, out, t, k, e, d, inter, threads,
                               pass_rows(gate_up));
    if (t < 1 || t > MAX_T || k < 1 || k > MAX_K) return 3;
    return experts_by_one(gate_up, down, x, ids, weights, out, t, k, e, d, inter, threads);
}

/* MLA's absorption and expansion through kv_b [h (dn + dv), r], for fp32 (LOAD load_f32) or bf16 weights:
 * qc[t][h] = (W_uk[h]^T q_nope[t][h], q_pe[t][h]), W_uk[h] the first dn rows of head h, with q_nope and q_pe
 * holding one (token, head) pair every ns and ps floats; attn[t][h dv + j] = W_uv[h][j] . o_lat[t][h].
 * Threads split the heads; each head's rows of kv_b are read from memory once for all t tokens (a piece of a
 * row is used for every token while it is in a register), and every output is summed in the same order
 * whatever t is. */
#ifndef ABSORB_PF_F32
#define ABSORB_PF_F32 0
#endif
#ifndef ABSORB_PF_BF16
#define ABSORB_PF_BF16 512
#endif
static inline __m256 load_f32(const float *w) { return _mm256_loadu_ps(w); }
static inline float f32_value(float v) { return v; }

#define ABSORB_EXPAND(SUFFIX, WT, LOAD, SCALAR, PF)                                                          \
/* qc[t][hd][:r] += sum over U rows u of q_nope[t][hd][i + u] * w[u] (w: row i of W_uk[hd]), in u order. */     \
static inline __attribute__((always_inline)) void absorb_rows_##SUFFIX(                                      \
        const float *q_nope, int64_t ns, const WT *w, float *qc, int64_t t, int64_t h, int64_t hd, int64_t i, \
        int64_t r, int64_t dr, const int U) {                                                                \
    int64_t j = 0;                                                                                           \
    for (; j + 8 <= r; j += 8) {                                                                             \
        __m256 wv[4];                                                                                        \
        if (PF && (j * (int64_t)sizeof(WT)) % 64 == 0)                                                       \
            for (int u = 0; u < U; u++) _mm_prefetch((const char *)(w + u * r + j) + PF, _MM_HINT_T0);       \
        for (int u = 0; u < U; u++) wv[u] = LOAD(w + u * r + j);                                             \
        for (int64_t tt = 0; tt < t; tt++) {                                                                 \
            float *out = qc + (tt * h + hd) * (r + dr) + j;                                                  \
            const float *qn = q_nope + (tt * h + hd) * ns + i;                                               \
            __m256 a = _mm256_loadu_ps(out);                                                                 \
            for (int u = 0; u < U; u++) a = _mm256_fmadd_ps(_mm256_set1_ps(qn[u]), wv[u], a);                \
            _mm256_storeu_ps(out, a);                                                                        \
        }                                                                                                    \
    }                                                                                                        \
    for (; j < r; j++)                                                                                       \
        for (int64_t tt = 0; tt < t; tt++)                                                                   \
            for (int u = 0; u < U; u++)                                                                      \
                qc[(tt * h + hd) * (r + dr) + j] += q_nope[(tt * h + hd) * ns + i + u] * SCALAR(w[u * r + j]); \
}                                                                                                            \
void mla_absorb_##SUFFIX(const float *q_nope, int64_t ns, const float *q_pe, int64_t ps, const WT *kv_b,     \
                         float *qc, int64_t t, int64_t h, int64_t dn, int64_t dr, int64_t dv, int64_t r,     \
                         int threads) {                                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                        \
    for (int64_t hd = 0; hd < h; hd++) {                                                                     \
        const WT *w = kv_b + hd * (dn + dv) * r;                                                             \
        for (int64_t tt = 0; tt < t; tt++) memset(qc + (tt * h + hd) * (r + dr), 0, sizeof(float) * r);     \
        int64_t i = 0; /* 4 rows at a time: each sum is still taken row by row, in order */                  \
        for (; i + 4 <= dn; i += 4) absorb_rows_##SUFFIX(q_nope, ns, w + i * r, qc, t, h, hd, i, r, dr, 4);  \
        for (; i < dn; i++) absorb_rows_##SUFFIX(q_nope, ns, w + i * r, qc, t, h, hd, i, r, dr, 1);          \
        for (int64_t tt = 0; tt < t; tt++)                                                                   \
            memcpy(qc + (tt * h + hd) * (r + dr) + r, q_pe + (tt * h + hd) * ps, sizeof(float) * dr);        \
    }                                                                                                        \
}                                                                                                            \
/* W_uv[h][j] . o_lat[t][h] for T tokens t0 .. t0 + T - 1 (T a constant: the sums stay in registers). */     \
static inline __attribute__((always_inline)) void expand_row_##SUFFIX(                                       \
        const WT *w, const float *o_lat, float *attn, int64_t t0, int64_t h, int64_t hd, int64_t dv,         \
        int64_t j, int64_t r, const int T) {                                                                 \
    __m256 acc[4];                                                                                           \
    for (int u = 0; u < T; u++) acc[u] = _mm256_setzero_ps();                                                \
    int64_t i = 0;                                                                                           \
    for (; i + 8 <= r; i += 8) {                                                                             \
        if (PF && (i * (int64_t)sizeof(WT)) % 64 == 0) _mm_prefetch((const char *)(w + i) + PF, _MM_HINT_T0); \
        const __m256 wv = LOAD(w + i);                                                                       \
        for (int u = 0; u < T; u++)                                                                          \
            acc[u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(o_lat + ((t0 + u) * h + hd) * r + i), acc[u]);      \
    }                                                                                                        \
    for (int u = 0; u < T; u++) {                                                                            \
        const float *o = o_lat + ((t0 + u) * h + hd) * r;                                                    \
        float s = hsum(acc[u]);                                                                              \
        for (int64_t c = i; c < r; c++) s += SCALAR(w[c]) * o[c];                                            \
        attn[((t0 + u) * h + hd) * dv + j] = s;                                                              \
    }                                                                                                        \
}                                                                                                            \
void mla_expand_##SUFFIX(const float *o_lat, const WT *kv_b, float *attn, int64_t t, int64_t h, int64_t dn,  \
                         int64_t dv, int64_t r, int threads) {                                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                        \
    for (int64_t hd = 0; hd < h; hd++)                                                                       \
        for (int64_t j = 0; j < dv; j++) {                                                                   \
            const WT *w = kv_b + (hd * (dn + dv) + dn + j) * r;                                              \
            for (int64_t t0 = 0; t0 < t; t0 += 4) { /* tokens in fours; the row stays in L1 between them */  \
                switch (t - t0 < 4 ? t - t0 : 4) {                                                           \
                case 1: expand_row_##SUFFIX(w, o_lat, attn, t0, h, hd, dv, j, r, 1); break;                  \
                case 2: expand_row_##SUFFIX(w, o_lat, attn, t0, h, hd, dv, j, r, 2); break;                  \
                case 3: expand_row_##SUFFIX(w, o_lat, attn, t0, h, hd, dv, j, r, 3); break;                  \
                default: expand_row_##SUFFIX(w, o_lat, attn, t0, h, hd, dv, j, r, 4); break;                 \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
}

ABSORB_EXPAND(f32, float, load_f32, f32_value, ABSORB_PF_F32)
ABSORB_EXPAND(bf16, uint16_t, load_bf16, bf16_to_f32, ABSORB_PF_BF16)

void mat_absorb(const float *q_nope, int64_t ns, const float *q_pe, int64_t ps, const Mat *kv_b, float *qc,
                int64_t t, int64_t h, int64_t dn, int64_t dr, int64_t dv, int64_t r, int threads) {
    if (kv_b->format == W_BF16) mla_absorb_bf16(q_nope, ns, q_pe, ps, kv_b->w, qc, t, h, dn, dr, dv, r, threads);
    else mla_absorb_f32(q_nope, ns, q_pe, ps, kv_b->w, qc, t, h, dn, dr, dv, r, threads);
}

void mat_expand(const float *o_lat, const Mat *kv_b, float *attn, int64_t t, int64_t h, int64_t dn, int64_t dv,
                int64_t r, int threads) {
    if (kv_b->format == W_BF16) mla_expand_bf16(o_lat, kv_b->w, attn, t, h, dn, dv, r, threads);
    else mla_expand_f32(o_lat, kv_b->w, attn, t, h, dn, dv, r, threads);
}
