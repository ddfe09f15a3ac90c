/* The structs of the fused decode layer (decode_layer.c, decode_weights.c), filled once from Python
 * (dsinfer/models/fused_decode.py), whose ctypes mirror (dsinfer/kernels/decode_layer.py) is checked against
 * MAT_FIELDS / LAYER_FIELDS / STEP_FIELDS when the library loads. */
#ifndef DSINFER_DECODE_LAYER_H
#define DSINFER_DECODE_LAYER_H
#include <stdint.h>

#define MAX_T 16       /* tokens of a fused decode step */
#define KERNEL_ROWS 8  /* rows of x a matrix kernel takes in one pass over the weights, */
#define WIDE_ROWS 16   /* ... and an fp32 / bf16 matrix with `wide` set */
#define MAX_K 64

/* How a weight matrix is stored: fp32 or bf16 values, or int8 / int4 codes in groups of `group` columns with
 * one fp32 scale (and optionally a min) per group and row (dsinfer/quant/qtensor.py). */
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_I4 = 3 };

typedef struct {
    const void *w;                    /* [N, K] values, or codes (int4: two per byte) */
    const float *scales, *mins;       /* [N, groups] for the integer formats (mins may be NULL), else NULL */
    int64_t format, group, int8_x;    /* int8_x: multiply int8-rounded activations in integers (qgemv_*_x8):
                                         0 no, 1 with AVX2, 2 with AVX-VNNI, 3 with AVX512-VNNI */
    int64_t wide;                     /* 1: fp32 / bf16 values read once for up to WIDE_ROWS rows of x, not
                                         once per KERNEL_ROWS (the same sums) */
} Mat;

typedef struct {
    int64_t d, h, dn, dr, dv, r, qr;                 /* qr: q_lora_rank, 0 when q_proj is one matrix */
    float eps, scale;
    const float *in_norm, *post_norm, *q_a_norm, *kv_norm; /* [d], [d], [qr], [r] */
    Mat q_a, q_b, kv_a, kv_b, o;                     /* [qr, d], [h (dn + dr), qr or d], [r + dr, d],
                                                        [h (dn + dv), r] (fp32 or bf16), [d, h dv] */
    int64_t experts, top_k, n_group, topk_group, method, sigmoid, norm_topk; /* experts 0: a dense MLP */
    float route_scale;
    const void *router;                              /* [E, d] fp32, or bf16 if router_bf16 */
    int64_t router_bf16;
    const float *bias;                               /* [E] or NULL */
    Mat gate_up, down;                               /* [E or 1, 2I, d], [E or 1, d, I] */
    int64_t inter;
    Mat sh_gate_up, sh_down;                         /* shared experts [2 Is, d], [d, Is]; w NULL: none */
    int64_t sh_inter;
    int64_t *counts;                                 /* tokens per expert, [E] */
    int64_t first_expert, local_experts;             /* gate_up / down hold experts first .. first + local - 1
                                                        of the E the router picks among (expert parallel: the
                                                        others are another rank's and skipped); local = E
                                                        in one process */
    int64_t token_parallel;                          /* 1: threads split a step's tokens, not the rows of each
                                                        product (a layer that fits each core's caches) */
} Layer;

/* One step's inputs, the same for every layer. cache_format: how the cache stores a row (0 fp32, 1 bf16,
 * 2 fp8; see dsinfer/layers/kv_format.py). */
typedef struct {
    int64_t t, b, lmax, cache_rows, cache_format;
    const float *cs;                                 /* [T, dr/2, 2] cos, sin */
    const int64_t *slots, *rows, *seq, *lens;        /* [T], [B, lmax], [T], [T] */
} Step;

/* The MTP draft layer's own parts around its decoder layer (dsinfer/models/mtp.py, decode_draft.c): the norms
 * of the next token's embedding and of the main model's hidden state, eh_proj over both, the output norm and
 * the head. The embedding table is the main model's, fp32 or bf16 (embed_bf16). */
typedef struct {
    int64_t d, vocab, embed_bf16;
    float eps;
    const float *enorm, *hnorm, *out_norm;           /* [d] each */
    const void *embed;                               /* [vocab, d] */
    Mat eh_proj, head;                               /* [d, 2d], [vocab, d] */
} Draft;

/* Every field, in declaration order: what the layout check compares with the ctypes mirror. */
#define MAT_FIELDS(X) X(w) X(scales) X(mins) X(format) X(group) X(int8_x) X(wide)
#define LAYER_FIELDS(X) X(d) X(h) X(dn) X(dr) X(dv) X(r) X(qr) X(eps) X(scale) X(in_norm) X(post_norm) \
    X(q_a_norm) X(kv_norm) X(q_a) X(q_b) X(kv_a) X(kv_b) X(o) X(experts) X(top_k) X(n_group) X(topk_group) \
    X(method) X(sigmoid) X(norm_topk) X(route_scale) X(router) X(router_bf16) X(bias) X(gate_up) X(down) \
    X(inter) X(sh_gate_up) X(sh_down) X(sh_inter) X(counts) X(first_expert) X(local_experts) X(token_parallel)
#define DRAFT_FIELDS(X) X(d) X(vocab) X(embed_bf16) X(eps) X(enorm) X(hnorm) X(out_norm) X(embed) X(eh_proj) \
    X(head)
#define STEP_FIELDS(X) X(t) X(b) X(lmax) X(cache_rows) X(cache_format) X(cs) X(slots) X(rows) X(seq) X(lens)

/* decode_weights.c: products with a Mat, whatever its format. */
void mat_vec(const Mat *A, const float *x, float *y, int64_t m, int64_t n, int64_t k, int threads);
int mat_ffn(const Mat *gate_up, const Mat *down, const float *x, const int64_t *ids, const float *weights,
            float *out, int64_t t, int64_t k, int64_t e, int64_t d, int64_t inter, int threads);
void mat_absorb(const float *q_nope, int64_t ns, const float *q_pe, int64_t ps, const Mat *kv_b, float *qc,
                int64_t t, int64_t h, int64_t dn, int64_t dr, int64_t dv, int64_t r, int threads);
void mat_expand(const float *o_lat, const Mat *kv_b, float *attn, int64_t t, int64_t h, int64_t dn, int64_t dv,
                int64_t r, int threads);
#endif
