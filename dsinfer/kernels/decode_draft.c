/* The MTP draft layer of speculative decoding over a decode batch (T <= MAX_T rows) in one call: what
 * dsinfer/models/mtp.py's FusedDraft does with a dozen calls from Python, with the same kernels in the same order,
 * so the numbers are the same:
 *     x = eh_proj([enorm(embed(next_ids)); hnorm(hidden)])
 *     x += attention(x)                   every row (each writes its cache row)
 *     y = x[keep]; y += ffn(y)            only the rows drafted from
 *     out = out_norm(y); logits = head(out) */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "decode_layer.h"
#include "simd.h"

void rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t n, int64_t x_stride, float eps);
int decode_attention_f32(const Layer *L, const Step *S, const float *x, void *cache, float *out, int threads);
int decode_ffn_f32(const Layer *L, const Step *S, const float *x, float *out, int threads);

/* n values, fp32 or bf16 (widened exactly), as fp32 in out. */
static void as_f32(const void *v, int64_t bf16, int64_t n, float *out) {
    if (!bf16) {
        memcpy(out, v, sizeof(float) * n);
        return;
    }
    for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(((const uint16_t *)v)[i]);
}

/* xcat [t, 2d] = [enorm(embed(ids)); hnorm(hidden)], hidden fp32 or bf16; 0, or 3 for an id outside the table. */
static int draft_inputs(const Draft *D, const int64_t *ids, const void *hidden, int64_t hidden_bf16, int64_t t,
                        float *row, float *xcat) {
    const int64_t d = D->d;
    for (int64_t i = 0; i < t; i++) {
        if (ids[i] < 0 || ids[i] >= D->vocab) return 3;
        as_f32((const char *)D->embed + ids[i] * d * (D->embed_bf16 ? 2 : 4), D->embed_bf16, d, row);
        rms_norm_f32(row, D->enorm, xcat + i * 2 * d, 1, d, d, D->eps);
        as_f32((const char *)hidden + i * d * (hidden_bf16 ? 2 : 4), hidden_bf16, d, row);
        rms_norm_f32(row, D->hnorm, xcat + i * 2 * d + d, 1, d, d, D->eps);
    }
    return 0;
}

/* out [kept, d] = the draft layer's normed output at the `kept` rows `keep` (kept < 0: every row; 0: the rows'
 * cache rows only, the attention half) of a decode batch
 * (S->t rows: next_ids [t], the main model's hidden [t, d]); logits [kept, vocab] from the head where not NULL. Returns 0, or a code naming the failed part: 1 bad sizes or no memory, 3 a token id outside the
 * table, 4 a kept row outside the batch, 1x / 2x / 3x the attention half's or the MoE / MLP half's (decode_layer.c),
 * 100 + its code. */
int decode_draft_f32(const Draft *D, const Layer *L, const Step *S, const int64_t *next_ids, const void *hidden,
                     int64_t hidden_bf16, const int64_t *keep, int64_t kept, void *cache, float *out, float *logits,
                     int threads) {
    const int64_t t = S->t, d = D->d, every = kept < 0;
    if (t < 1 || t > MAX_T || d != L->d || kept > t || (!every && kept && !keep)) return 1;
    kept = every ? t : kept;
    for (int64_t i = 0; !every && i < kept; i++)
        if (keep[i] < 0 || keep[i] >= t) return 4;
    float *buf = malloc(sizeof(float) * (2 * t * d + 3 * t * d + d));
    if (!buf) return 1;
    float *xcat = buf, *x = xcat + 2 * t * d, *part = x + t * d, *y = part + t * d, *row = y + t * d;
    int err = draft_inputs(D, next_ids, hidden, hidden_bf16, t, row, xcat);
    if (!err) {
        mat_vec(&D->eh_proj, xcat, x, t, d, 2 * d, threads);
        err = decode_attention_f32(L, S, x, cache, part, threads);
        err = err ? 100 + err : 0;
    }
    if (!err && kept) {
        for (int64_t i = 0; i < kept; i++) {
            const int64_t from = every ? i : keep[i];
            for (int64_t j = 0; j < d; j++) y[i * d + j] = x[from * d + j] + part[from * d + j];
        }
        Step rows = *S;
        rows.t = kept;  /* the MoE / MLP half reads only the token count */
        err = decode_ffn_f32(L, &rows, y, part, threads);
        err = err ? 100 + err : 0;
    }
    if (!err && kept) {
        for (int64_t i = 0; i < kept * d; i++) y[i] += part[i];
        rms_norm_f32(y, D->out_norm, out, kept, d, d, D->eps);
        if (logits) mat_vec(&D->head, out, logits, kept, D->vocab, d, threads);
    }
    free(buf);
    return err;
}
