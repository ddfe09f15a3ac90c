/* One whole decoder layer of a decode batch (T <= 8 tokens, fp32 weights) in one call, built from the other
 * kernels of this library. On a small model a decode step is mostly dispatch: a layer is some forty torch ops
 * and kernel calls of a few microseconds each from Python; here it is one call. The math is the Python
 * layer's (dsinfer/layers): RMSNorm, MLA with absorbed attention over the latent cache, then MoE or a dense MLP. */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"

void gemv_f32(const float *x, const float *w, float *y, int64_t m, int64_t n, int64_t k, int threads);
void rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t n, int64_t x_stride, float eps);
int mla_rope_cache_f32(float *q, const float *kv, const float *w, float eps, const float *cs, float *cache,
                       const int64_t *slots, int64_t t, int64_t h, int64_t dn, int64_t dr, int64_t r, int64_t n);
#define MLA_DECODE(NAME, CACHE_T)                                                                          \
    int NAME(const float *q, const CACHE_T *cache, const int64_t *rows, const int64_t *seq, const int64_t *lens, \
             float *out, int64_t t, int64_t h, int64_t r, int64_t dr, int64_t lmax, int64_t b,             \
             int64_t n_cache_rows, float scale, int threads);
MLA_DECODE(mla_decode_f32, float)
MLA_DECODE(mla_decode_bf16, uint16_t)
MLA_DECODE(mla_decode_fp8, uint8_t)
int moe_decode_f32(const float *x, const int64_t *ids, const float *weights, const float *gate_up,
                   const float *down, float *out, int64_t t, int64_t k, int64_t e, int64_t d, int64_t inter,
                   int threads);
int route_f32(const float *x, const void *weight, int weight_bf16, const float *bias, float *out_w,
              int64_t *out_ids, int64_t *counts, int64_t t, int64_t d, int64_t e, int64_t top_k, int64_t n_group,
              int64_t topk_group, int method, int sigmoid, int norm_topk_prob, float scale);

#define MAX_T 8
#define MAX_K 64

/* A layer's weights and shapes; filled once from Python (dsinfer/models/fused_decode.py), whose ctypes mirror
 * (dsinfer/kernels/decode_layer.py) is checked against LAYER_FIELDS / STEP_FIELDS when the library loads. */
typedef struct {
    int64_t d, h, dn, dr, dv, r, qr;                 /* qr: q_lora_rank, 0 when q_proj is one matrix */
    float eps, scale;
    const float *in_norm, *post_norm;                /* [d] */
    const float *q_a, *q_a_norm, *q_b;               /* [qr, d], [qr], [h (dn + dr), qr or d] */
    const float *kv_a, *kv_norm, *kv_b, *o;          /* [r + dr, d], [r], [h (dn + dv), r], [d, h dv] */
    int64_t experts, top_k, n_group, topk_group, method, sigmoid, norm_topk; /* experts 0: a dense MLP */
    float route_scale;
    const float *router, *bias;                      /* [E, d], [E] or NULL */
    const float *gate_up, *down;                     /* [E or 1, 2I, d], [E or 1, d, I] */
    int64_t inter;
    const float *sh_gate_up, *sh_down;               /* shared experts [1, 2 Is, d], [1, d, Is] or NULL */
    int64_t sh_inter;
    int64_t *counts;                                 /* tokens per expert, [E] */
} Layer;

/* One step's inputs, the same for every layer. cache_format: how the cache stores a row (0 fp32, 1 bf16,
 * 2 fp8; see dsinfer/layers/kv_format.py). */
typedef struct {
    int64_t t, b, lmax, cache_rows, cache_format;
    const float *cs;                                 /* [T, dr/2, 2] cos, sin */
    const int64_t *slots, *rows, *seq, *lens;        /* [T], [B, lmax], [T], [T] */
} Step;

/* Every field, in declaration order: what the layout check compares with the ctypes mirror. */
#define LAYER_FIELDS(X) X(d) X(h) X(dn) X(dr) X(dv) X(r) X(qr) X(eps) X(scale) X(in_norm) X(post_norm) X(q_a) \
    X(q_a_norm) X(q_b) X(kv_a) X(kv_norm) X(kv_b) X(o) X(experts) X(top_k) X(n_group) X(topk_group) X(method) \
    X(sigmoid) X(norm_topk) X(route_scale) X(router) X(bias) X(gate_up) X(down) X(inter) X(sh_gate_up) \
    X(sh_down) X(sh_inter) X(counts)
#define STEP_FIELDS(X) X(t) X(b) X(lmax) X(cache_rows) X(cache_format) X(cs) X(slots) X(rows) X(seq) X(lens)

#define FIELD_NAME(f) #f ","

/* The field names of Layer (which 0) or Step (1), comma-separated, in the order decode_layer_layout gives. */
const char *decode_layer_names(int which) {
    return which == 0 ? LAYER_FIELDS(FIELD_NAME) : which == 1 ? STEP_FIELDS(FIELD_NAME) : "";
}

/* out = [sizeof, offset of each field...] of Layer (which 0) or Step (1); returns how many values it has (it
 * writes at most cap of them), or -1 for an unknown struct. */
int64_t decode_layer_layout(int which, int64_t *out, int64_t cap) {
    int64_t n = 0, v[64];
    if (which == 0) {
        v[n++] = sizeof(Layer);
#define LAYER_OFFSET(f) v[n++] = (int64_t)offsetof(Layer, f);
        LAYER_FIELDS(LAYER_OFFSET)
    } else if (which == 1) {
        v[n++] = sizeof(Step);
#define STEP_OFFSET(f) v[n++] = (int64_t)offsetof(Step, f);
        STEP_FIELDS(STEP_OFFSET)
    } else {
        return -1;
    }
    for (int64_t i = 0; i < n && i < cap; i++) out[i] = v[i];
    return n;
}

/* qc[t][h] = (W_uk[h]^T q_nope[t][h], q_pe[t][h]): the query absorbed into latent space. q_nope and q_pe hold
 * one (token, head) pair every ns and ps floats; kv_b is [h (dn + dv), r], W_uk[h] its first dn rows of head h. */
void mla_absorb_f32(const float *q_nope, int64_t ns, const float *q_pe, int64_t ps, const float *kv_b, float *qc,
                    int64_t t, int64_t h, int64_t dn, int64_t dr, int64_t dv, int64_t r, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t th = 0; th < t * h; th++) {
        const float *qn = q_nope + th * ns;
        float *out = qc + th * (r + dr);
        memset(out, 0, sizeof(float) * r);
        for (int64_t i = 0; i < dn; i++) {
            const float *w = kv_b + ((th % h) * (dn + dv) + i) * r;
            const __m256 s = _mm256_set1_ps(qn[i]);
            int64_t j = 0;
            for (; j + 8 <= r; j += 8)
                _mm256_storeu_ps(out + j, _mm256_fmadd_ps(s, _mm256_loadu_ps(w + j), _mm256_loadu_ps(out + j)));
            for (; j < r; j++) out[j] += qn[i] * w[j];
        }
        memcpy(out + r, q_pe + th * ps, sizeof(float) * dr);
    }
}

/* attn[t][h dv + j] = W_uv[h][j] . o_lat[t][h]: the latent output [t, h, r] expanded to each head's values. */
void mla_expand_f32(const float *o_lat, const float *kv_b, float *attn, int64_t t, int64_t h, int64_t dn,
                    int64_t dv, int64_t r, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t th = 0; th < t * h; th++) {
        const float *o = o_lat + th * r;
        for (int64_t j = 0; j < dv; j++) {
            const float *w = kv_b + ((th % h) * (dn + dv) + dn + j) * r;
            __m256 acc = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= r; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(o + i), acc);
            float s = hsum(acc);
            for (; i < r; i++) s += w[i] * o[i];
            attn[th * dv + j] = s;
        }
    }
}

enum { CACHE_F32 = 0, CACHE_BF16 = 1, CACHE_FP8 = 2 };
#define FP8_GROUP 128
#define FP8_MAX 448.0f

static uint16_t f32_to_bf16(float v) {  /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &v, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static float e4m3_value(int code) {  /* the finite float8_e4m3fn values, codes 0..126 (positive) */
    const int e = (code >> 3) & 15, m = code & 7;
    return e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
}

/* The e4m3 byte nearest to v (ties to the even code, as torch's .to(torch.float8_e4m3fn)); |v| <= 448. */
static uint8_t f32_to_e4m3(float v) {
    const float a = fabsf(v);
    int lo = 0, hi = 126;  /* the largest code whose value is <= a */
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (e4m3_value(mid) <= a) lo = mid; else hi = mid - 1;
    }
    int code = lo;
    if (lo < 126) {
        const float below = a - e4m3_value(lo), above = e4m3_value(lo + 1) - a;
        if (above < below || (above == below && (lo & 1))) code = lo + 1;
    }
    return (uint8_t)(code | (v < 0 && code ? 128 : 0));
}

/* A fp32 row (r latent, dr rope values) stored at dst in the cache's format (layers/kv_format.py). */
static void store_row(const float *row, void *dst, int64_t r, int64_t dr, int64_t format) {
    if (format == CACHE_BF16) {
        for (int64_t i = 0; i < r + dr; i++) ((uint16_t *)dst)[i] = f32_to_bf16(row[i]);
        return;
    }
    uint8_t *bytes = dst, *scales = bytes + r, *rope = scales + 4 * ((r + FP8_GROUP - 1) / FP8_GROUP);
    for (int64_t g = 0; g < r; g += FP8_GROUP) {
        const int64_t end = g + FP8_GROUP < r ? g + FP8_GROUP : r;
        float amax = 0.0f;
        for (int64_t i = g; i < end; i++) amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
        const float scale = (amax > 1e-12f ? amax : 1e-12f) / FP8_MAX;
        for (int64_t i = g; i < end; i++) bytes[i] = f32_to_e4m3(row[i] / scale);
        memcpy(scales + 4 * (g / FP8_GROUP), &scale, 4);
    }
    for (int64_t j = 0; j < dr; j++) {
        const uint16_t v = f32_to_bf16(row[r + j]);
        memcpy(rope + 2 * j, &v, 2);
    }
}

static int64_t row_bytes(int64_t r, int64_t dr, int64_t format) {
    if (format == CACHE_FP8) return r + 4 * ((r + FP8_GROUP - 1) / FP8_GROUP) + 2 * dr;
    return (r + dr) * (format == CACHE_BF16 ? 2 : 4);
}

/* The new tokens' rows (rope + norm done into the fp32 rows `fresh`, [t, r + dr]) and q's rope: fp32 caches are
 * written in place, others through `fresh` and store_row. 0, or 2 for a slot outside the cache. */
static int write_rows(const Layer *L, const Step *S, float *q, const float *kv, void *cache, float *fresh) {
    const int64_t t = S->t, dc = L->r + L->dr;
    if (S->cache_format == CACHE_F32)
        return mla_rope_cache_f32(q, kv, L->kv_norm, L->eps, S->cs, cache, S->slots, t, L->h, L->dn, L->dr, L->r,
                                  S->cache_rows) ? 2 : 0;
    int64_t at[MAX_T];
    for (int64_t i = 0; i < t; i++) {
        if (S->slots[i] < 0 || S->slots[i] >= S->cache_rows) return 2;
        at[i] = i;
    }
    mla_rope_cache_f32(q, kv, L->kv_norm, L->eps, S->cs, fresh, at, t, L->h, L->dn, L->dr, L->r, t);
    const int64_t stride = row_bytes(L->r, L->dr, S->cache_format);
    for (int64_t i = 0; i < t; i++)
        store_row(fresh + i * dc, (char *)cache + S->slots[i] * stride, L->r, L->dr, S->cache_format);
    return 0;
}

/* Absorbed attention of qc over the cache in its format; 0 or the kernel's error code. */
static int attend(const Layer *L, const Step *S, const float *qc, const void *cache, float *o_lat, int threads) {
    if (S->cache_format == CACHE_BF16)
        return mla_decode_bf16(qc, cache, S->rows, S->seq, S->lens, o_lat, S->t, L->h, L->r, L->dr, S->lmax, S->b,
                               S->cache_rows, L->scale, threads);
    if (S->cache_format == CACHE_FP8)
        return mla_decode_fp8(qc, cache, S->rows, S->seq, S->lens, o_lat, S->t, L->h, L->r, L->dr, S->lmax, S->b,
                              S->cache_rows, L->scale, threads);
    return mla_decode_f32(qc, cache, S->rows, S->seq, S->lens, o_lat, S->t, L->h, L->r, L->dr, S->lmax, S->b,
                          S->cache_rows, L->scale, threads);
}

static void add_into(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* x += MLA(RMSNorm(x)); scratch as laid out in decode_layer_f32. */
static int attention(const Layer *L, const Step *S, float *x, void *cache, float *buf, int threads) {
    const int64_t t = S->t, hq = L->h * (L->dn + L->dr);
    float *h = buf, *qa = h + t * L->d, *q = qa + t * L->qr, *kv = q + t * hq;
    float *qc = kv + t * (L->r + L->dr), *o_lat = qc + t * L->h * (L->r + L->dr), *attn = o_lat + t * L->h * L->r;
    float *out = attn + t * L->h * L->dv, *fresh = out + t * L->d;
    rms_norm_f32(x, L->in_norm, h, t, L->d, L->d, L->eps);
    if (L->qr) {
        gemv_f32(h, L->q_a, qa, t, L->qr, L->d, threads);
        rms_norm_f32(qa, L->q_a_norm, qa, t, L->qr, L->qr, L->eps);
        gemv_f32(qa, L->q_b, q, t, hq, L->qr, threads);
    } else {
        gemv_f32(h, L->q_b, q, t, hq, L->d, threads);
    }
    gemv_f32(h, L->kv_a, kv, t, L->r + L->dr, L->d, threads);
    if (write_rows(L, S, q, kv, cache, fresh)) return 2;
    mla_absorb_f32(q, L->dn + L->dr, q + L->dn, L->dn + L->dr, L->kv_b, qc, t, L->h, L->dn, L->dr, L->dv, L->r,
                   threads);
    int err = attend(L, S, qc, cache, o_lat, threads);
    if (err) return 10 + err;
    mla_expand_f32(o_lat, L->kv_b, attn, t, L->h, L->dn, L->dv, L->r, threads);
    gemv_f32(attn, L->o, out, t, L->d, L->h * L->dv, threads);
    add_into(x, out, t * L->d);
    return 0;
}

/* x += MoE(RMSNorm(x)) or the dense MLP's output. */
static int feed_forward(const Layer *L, const Step *S, float *x, float *buf, int threads) {
    const int64_t t = S->t, k = L->experts ? L->top_k : 1;
    float *h = buf, *y = h + t * L->d, *ys = y + t * L->d, w[MAX_T * MAX_K], ones[MAX_T];
    int64_t ids[MAX_T * MAX_K], zeros[MAX_T];
    for (int64_t i = 0; i < t; i++) { ones[i] = 1.0f; zeros[i] = 0; }
    rms_norm_f32(x, L->post_norm, h, t, L->d, L->d, L->eps);
    int err;
    if (L->experts) {
        err = route_f32(h, L->router, 0, L->bias, w, ids, L->counts, t, L->d, L->experts, k, L->n_group,
                        L->topk_group, (int)L->method, (int)L->sigmoid, (int)L->norm_topk, L->route_scale);
        if (err) return 20 + err;
        err = moe_decode_f32(h, ids, w, L->gate_up, L->down, y, t, k, L->experts, L->d, L->inter, threads);
    } else {
        err = moe_decode_f32(h, zeros, ones, L->gate_up, L->down, y, t, 1, 1, L->d, L->inter, threads);
    }
    if (err) return 30 + err;
    if (L->sh_gate_up) {
        err = moe_decode_f32(h, zeros, ones, L->sh_gate_up, L->sh_down, ys, t, 1, 1, L->d, L->sh_inter, threads);
        if (err) return 30 + err;
        add_into(y, ys, t * L->d);
    }
    add_into(x, y, t * L->d);
    return 0;
}

/* x [T, d] (the residual stream) goes through the layer in place. Returns 0, or a code naming the failed
 * part: 1 bad sizes or no memory, 2 a slot outside the cache, 1x attention, 2x router, 3x experts. */
int decode_layer_f32(const Layer *L, const Step *S, float *x, void *cache, int threads) {
    if (S->t < 1 || S->t > MAX_T || (L->experts && (L->top_k < 1 || L->top_k > MAX_K))) return 1;
    if (S->cache_format < CACHE_F32 || S->cache_format > CACHE_FP8) return 1;
    const int64_t t = S->t, hq = L->h * (L->dn + L->dr), wide = L->h * (L->r + L->dr);
    const int64_t attn_floats = t * (L->d + L->qr + hq + (L->r + L->dr) + wide + L->h * L->r + L->h * L->dv + L->d
                                     + L->r + L->dr);
    const int64_t ffn_floats = 3 * t * L->d;
    float *buf = malloc(sizeof(float) * (attn_floats > ffn_floats ? attn_floats : ffn_floats));
    if (!buf) return 1;
    int err = attention(L, S, x, cache, buf, threads);
    if (!err) err = feed_forward(L, S, x, buf, threads);
    free(buf);
    return err;
}
