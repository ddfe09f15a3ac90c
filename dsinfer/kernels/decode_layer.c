/* One whole decoder layer of a decode batch (T <= 8 tokens; weights fp32, bf16 or int8 / int4 codes, see
 * decode_layer.h) in one call, built from the other
 * kernels of this library. On a small model a decode step is mostly dispatch: a layer is some forty torch ops
 * and kernel calls of a few microseconds each from Python; here it is one call. The math is the Python
 * layer's (dsinfer/layers): RMSNorm, MLA with absorbed attention over the latent cache, then MoE or a dense MLP. */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "decode_layer.h"
#include "simd.h"

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
int route_f32(const float *x, const void *weight, int weight_bf16, const float *bias, float *out_w,
              int64_t *out_ids, int64_t *counts, int64_t t, int64_t d, int64_t e, int64_t top_k, int64_t n_group,
              int64_t topk_group, int method, int sigmoid, int norm_topk_prob, float scale);

#define FIELD_NAME(f) #f ","

/* The most tokens a fused decode step takes (MAX_T). */
int64_t decode_step_tokens(void) {
    return MAX_T;
}

/* The field names of Layer (which 0), Step (1), Mat (2) or Draft (3), comma-separated, in decode_layer_layout's
 * order. */
const char *decode_layer_names(int which) {
    return which == 0 ? LAYER_FIELDS(FIELD_NAME) : which == 1 ? STEP_FIELDS(FIELD_NAME)
         : which == 2 ? MAT_FIELDS(FIELD_NAME) : which == 3 ? DRAFT_FIELDS(FIELD_NAME) : "";
}

/* out = [sizeof, offset of each field...] of Layer (which 0), Step (1), Mat (2) or Draft (3); returns how many
 * values it has (it writes at most cap of them), or -1 for an unknown struct. */
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
    } else if (which == 2) {
        v[n++] = sizeof(Mat);
#define MAT_OFFSET(f) v[n++] = (int64_t)offsetof(Mat, f);
        MAT_FIELDS(MAT_OFFSET)
    } else if (which == 3) {
        v[n++] = sizeof(Draft);
#define DRAFT_OFFSET(f) v[n++] = (int64_t)offsetof(Draft, f);
        DRAFT_FIELDS(DRAFT_OFFSET)
    } else {
        return -1;
    }
    for (int64_t i = 0; i < n && i < cap; i++) out[i] = v[i];
    return n;
}

enum { CACHE_F32 = 0, CACHE_BF16 = 1, CACHE_FP8 = 2 };
#define FP8_GROUP 128
#define FP8_MAX 448.0f

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

/* The attention half's scratch (attention_floats of it) for T tokens. */
typedef struct { float *h, *qa, *q, *kv, *qc, *o_lat, *attn, *fresh; } Scratch;

static Scratch scratch_of(const Layer *L, int64_t t, float *buf) {
    Scratch s;
    s.h = buf, s.qa = s.h + t * L->d, s.q = s.qa + t * L->qr, s.kv = s.q + t * L->h * (L->dn + L->dr);
    s.qc = s.kv + t * (L->r + L->dr), s.o_lat = s.qc + t * L->h * (L->r + L->dr), s.attn = s.o_lat + t * L->h * L->r;
    s.fresh = s.attn + t * L->h * L->dv;
    return s;
}

/* The attention half up to the cache: the norm, q (roped) and kv, and the new tokens' cache rows written. */
static int attention_in(const Layer *L, const Step *S, const float *x, void *cache, float *buf, int threads) {
    const int64_t t = S->t, hq = L->h * (L->dn + L->dr);
    const Scratch s = scratch_of(L, t, buf);
    float *h = s.h, *qa = s.qa, *q = s.q, *kv = s.kv;
    rms_norm_f32(x, L->in_norm, h, t, L->d, L->d, L->eps);
    if (L->qr) {
        mat_vec(&L->q_a, h, qa, t, L->qr, L->d, threads);
        rms_norm_f32(qa, L->q_a_norm, qa, t, L->qr, L->qr, L->eps);
        mat_vec(&L->q_b, qa, q, t, hq, L->qr, threads);
    } else {
        mat_vec(&L->q_b, h, q, t, hq, L->d, threads);
    }
    mat_vec(&L->kv_a, h, kv, t, L->r + L->dr, L->d, threads);
    return write_rows(L, S, q, kv, cache, s.fresh) ? 2 : 0;
}

/* The rest, once every new row is in the cache: out [T, d] = absorbed attention over the cache, expanded, o. */
static int attention_out(const Layer *L, const Step *S, const void *cache, float *buf, float *out, int threads) {
    const int64_t t = S->t;
    const Scratch s = scratch_of(L, t, buf);
    mat_absorb(s.q, L->dn + L->dr, s.q + L->dn, L->dn + L->dr, &L->kv_b, s.qc, t, L->h, L->dn, L->dr, L->dv, L->r,
               threads);
    int err = attend(L, S, s.qc, cache, s.o_lat, threads);
    if (err) return 10 + err;
    mat_expand(s.o_lat, &L->kv_b, s.attn, t, L->h, L->dn, L->dv, L->r, threads);
    mat_vec(&L->o, s.attn, out, t, L->d, L->h * L->dv, threads);
    return 0;
}

/* out [T, d] = MLA(RMSNorm(x)) (this rank's heads: a part of the sum over ranks); scratch of attention_floats. */
static int attention(const Layer *L, const Step *S, const float *x, void *cache, float *buf, float *out,
                     int threads) {
    const int err = attention_in(L, S, x, cache, buf, threads);
    return err ? err : attention_out(L, S, cache, buf, out, threads);
}

static int64_t attention_floats(const Layer *L, int64_t t) {
    return t * (L->d + L->qr + L->h * (L->dn + L->dr) + 2 * (L->r + L->dr) + L->h * (L->r + L->dr) + L->h * L->r
                + L->h * L->dv);
}

/* Expert parallelism: rewrites the (token, expert) pairs ids, w [t, k] in place as *kl pairs per token of this
 * rank's experts only, with local ids in [0, local_experts). A token with fewer than *kl pads with weight-0
 * pairs of the expert in use that has the fewest pairs (so no expert gets more than MAX_T, and no other
 * expert's weights are read). With all experts local the pairs stay as they are. */
static void local_pairs(const Layer *L, int64_t t, int64_t k, int64_t *ids, float *w, int64_t *kl) {
    const int64_t first = L->first_expert, n = L->local_experts;
    if (!n || (first == 0 && n == L->experts)) { *kl = k; return; }
    int64_t keep[MAX_T * MAX_K], got[MAX_T], uses[MAX_T * MAX_K] = {0}, used[MAX_T * MAX_K], nu = 0, most = 0;
    float kw[MAX_T * MAX_K];
    for (int64_t i = 0; i < t; i++) {
        got[i] = 0;
        for (int64_t j = 0; j < k; j++) {
            const int64_t e = ids[i * k + j] - first;
            if (e < 0 || e >= n) continue;
            keep[i * k + got[i]] = e, kw[i * k + got[i]++] = w[i * k + j];
            int64_t u = 0;
            while (u < nu && used[u] != e) u++;
            if (u == nu) used[nu++] = e;
            uses[u]++;
        }
        most = got[i] > most ? got[i] : most;
    }
    for (int64_t i = 0; i < t; i++)
        for (int64_t j = 0; j < most; j++) {
            if (j < got[i]) {
                ids[i * most + j] = keep[i * k + j], w[i * most + j] = kw[i * k + j];
                continue;
            }
            int64_t u = 0;
            for (int64_t v = 1; v < nu; v++) u = uses[v] < uses[u] ? v : u;
            uses[u]++;
            ids[i * most + j] = used[u], w[i * most + j] = 0.0f;
        }
    *kl = most;
}

/* out [T, d] = MoE(RMSNorm(x)) (this rank's experts, or its part of each) or the dense MLP's output. */
static int feed_forward(const Layer *L, const Step *S, const float *x, float *buf, float *out, int threads) {
    const int64_t t = S->t;
    int64_t k = L->experts ? L->top_k : 1;
    float *h = buf, *ys = h + t * L->d, w[MAX_T * MAX_K], ones[MAX_T];
    int64_t ids[MAX_T * MAX_K], zeros[MAX_T];
    for (int64_t i = 0; i < t; i++) { ones[i] = 1.0f; zeros[i] = 0; }
    rms_norm_f32(x, L->post_norm, h, t, L->d, L->d, L->eps);
    int err = 0;
    if (L->experts) {
        err = route_f32(h, L->router, (int)L->router_bf16, L->bias, w, ids, L->counts, t, L->d, L->experts, k, L->n_group,
                        L->topk_group, (int)L->method, (int)L->sigmoid, (int)L->norm_topk, L->route_scale);
        if (err) return 20 + err;
        local_pairs(L, t, k, ids, w, &k);
        const int64_t e = L->local_experts ? L->local_experts : L->experts;
        if (k) err = mat_ffn(&L->gate_up, &L->down, h, ids, w, out, t, k, e, L->d, L->inter, threads);
        else memset(out, 0, sizeof(float) * t * L->d);  /* none of these tokens' experts is here */
    } else {
        err = mat_ffn(&L->gate_up, &L->down, h, zeros, ones, out, t, 1, 1, L->d, L->inter, threads);
    }
    if (err) return 30 + err;
    if (L->sh_gate_up.w) {
        err = mat_ffn(&L->sh_gate_up, &L->sh_down, h, zeros, ones, ys, t, 1, 1, L->d, L->sh_inter, threads);
        if (err) return 30 + err;
        add_into(out, ys, t * L->d);
    }
    return 0;
}

static int bad_sizes(const Layer *L, const Step *S) {
    return S->t < 1 || S->t > MAX_T || (L->experts && (L->top_k < 1 || L->top_k > MAX_K))
        || S->cache_format < CACHE_F32 || S->cache_format > CACHE_FP8
        || L->first_expert < 0 || L->local_experts < 0 || L->first_expert + L->local_experts > L->experts;
}

/* out [T, d] = the attention half of the layer for the residual stream x [T, d] (not added into x): with a
 * rank's heads, its part of a sum over ranks. Writes the new tokens' cache rows. Codes as decode_layer_f32. */
int decode_attention_f32(const Layer *L, const Step *S, const float *x, void *cache, float *out, int threads) {
    if (bad_sizes(L, S)) return 1;
    float *buf = malloc(sizeof(float) * attention_floats(L, S->t));
    if (!buf) return 1;
    const int err = attention(L, S, x, cache, buf, out, threads);
    free(buf);
    return err;
}

/* out [T, d] = the MoE / MLP half of the layer for x [T, d] (not added into x); codes as decode_layer_f32. */
int decode_ffn_f32(const Layer *L, const Step *S, const float *x, float *out, int threads) {
    if (bad_sizes(L, S)) return 1;
    float *buf = malloc(sizeof(float) * 2 * S->t * L->d);
    if (!buf) return 1;
    const int err = feed_forward(L, S, x, buf, out, threads);
    free(buf);
    return err;
}

/* S narrowed to its tokens i0 .. i1 - 1 (their rope angles, slots, sequences and lengths). */
static Step tokens_of(const Step *S, int64_t i0, int64_t i1, int64_t dr) {
    Step part = *S;
    part.t = i1 - i0, part.cs = S->cs + i0 * dr, part.slots = S->slots + i0, part.seq = S->seq + i0;
    part.lens = S->lens + i0;
    return part;
}

/* decode_layer_f32 for a layer small enough to sit in each core's caches (Layer.token_parallel): each thread
 * takes a run of the tokens through the whole layer with its products on one thread, all new cache rows written
 * before any token attends; the tokens get the bits the row-split path gives them (the kernels sum each row the
 * same way whatever the batch). On such a layer a split by rows is mostly the threads' meeting cost. */
static int layer_by_tokens(const Layer *L, const Step *S, float *x, void *cache, int threads) {
    const int64_t t = S->t, nt = threads < t ? threads : t, d = L->d, attn = attention_floats(L, 1);
    const int64_t per = (attn > 2 * d ? attn : 2 * d) + d; /* a token's scratch and its half's output */
    float *buf = malloc(sizeof(float) * t * per);
    int errs[MAX_T] = {0};
    if (!buf) return 1;
    _Pragma("omp parallel num_threads(nt)")
    {   /* the team the runtime gave, which may be smaller than asked */
        const int64_t n = omp_get_num_threads(), w = omp_get_thread_num(), i0 = t * w / n, i1 = t * (w + 1) / n;
        const Step mine = tokens_of(S, i0, i1, L->dr);
        float *b = buf + i0 * per, *out = b + (i1 - i0) * (per - d);
        errs[i0] = attention_in(L, &mine, x + i0 * d, cache, b, 1);
        _Pragma("omp barrier") /* every new row is in the cache */
        if (!errs[i0]) errs[i0] = attention_out(L, &mine, cache, b, out, 1);
        if (!errs[i0]) add_into(x + i0 * d, out, (i1 - i0) * d);
        if (!errs[i0]) errs[i0] = feed_forward(L, &mine, x + i0 * d, b, out, 1);
        if (!errs[i0]) add_into(x + i0 * d, out, (i1 - i0) * d);
    }
    free(buf);
    for (int64_t i = 0; i < t; i++)
        if (errs[i]) return errs[i];
    return 0;
}

/* x [T, d] (the residual stream) goes through the layer in place: x += attention(x), then x += ffn(x). Returns
 * 0, or a code naming the failed part: 1 bad sizes or no memory, 2 a slot outside the cache, 1x attention,
 * 2x router, 3x experts. */
int decode_layer_f32(const Layer *L, const Step *S, float *x, void *cache, int threads) {
    if (bad_sizes(L, S)) return 1;
    if (L->token_parallel && threads > 1 && S->t > 1) return layer_by_tokens(L, S, x, cache, threads);
    const int64_t t = S->t, attn = attention_floats(L, t), ffn = 2 * t * L->d;
    float *buf = malloc(sizeof(float) * ((attn > ffn ? attn : ffn) + t * L->d)), *out = buf;
    if (!buf) return 1;
    int err = attention(L, S, x, cache, buf + t * L->d, out, threads);
    if (!err) add_into(x, out, t * L->d);
    if (!err) err = feed_forward(L, S, x, buf + t * L->d, out, threads);
    if (!err) add_into(x, out, t * L->d);
    free(buf);
    return err;
}
