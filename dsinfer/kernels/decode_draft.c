/* The MTP draft layer of speculative decoding over a decode batch (T <= 8 rows) in one call: what
 * dsinfer/models/mtp.py's FusedDraft does with a dozen calls from Python, with the same kernels in the same order,
 * so the numbers are the same:
 *     x = eh_proj([enorm(embed(next_ids)); hnorm(hidden)])
 *     x += attention(x)                   every row (each writes its cache row)
 *     y = x[keep]; y += ffn(y)            only the rows drafted from
 *     out = out_norm(y); logits = head(out); best = argmax(logits) */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "decode_layer.h"

void rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t n, int64_t x_stride, float eps);
int decode_attention_f32(const Layer *L, const Step *S, const float *x, void *cache, float *out, int threads);
int decode_ffn_f32(const Layer *L, const Step *S, const float *x, float *out, int threads);

/* Row `id` of a fp32 or bf16 table as fp32. */
static void table_row(const Draft *D, int64_t id, float *out) {
    if (!D->embed_bf16) {
        memcpy(out, (const float *)D->embed + id * D->d, sizeof(float) * D->d);
        return;
    }
    const uint16_t *row = (const uint16_t *)D->embed + id * D->d;
    for (int64_t i = 0; i < D->d; i++) {
        const uint32_t bits = (uint32_t)row[i] << 16;
        memcpy(out + i, &bits, 4);
    }
}

/* xcat [t, 2d] = [enorm(embed(ids)); hnorm(hidden)], hidden fp32 or bf16; 0, or 3 for an id outside the table. */
static int draft_inputs(const Draft *D, const int64_t *ids, const void *hidden, int64_t hidden_bf16, int64_t t,
                        float *row, float *xcat) {
    const int64_t d = D->d;
    for (int64_t i = 0; i < t; i++) {
        if (ids[i] < 0 || ids[i] >= D->vocab) return 3;
        table_row(D, ids[i], row);
        rms_norm_f32(row, D->enorm, xcat + i * 2 * d, 1, d, d, D->eps);
        if (hidden_bf16) {
            const uint16_t *h = (const uint16_t *)hidden + i * d;
            for (int64_t j = 0; j < d; j++) {
                const uint32_t bits = (uint32_t)h[j] << 16;
                memcpy(row + j, &bits, 4);
            }
        } else {
            memcpy(row, (const float *)hidden + i * d, sizeof(float) * d);
        }
        rms_norm_f32(row, D->hnorm, xcat + i * 2 * d + d, 1, d, d, D->eps);
    }
    return 0;
}

/* best[i] = the first index of row i's largest value (a NaN counts as largest, as in torch.argmax). */
static void argmax_rows(const float *logits, int64_t rows, int64_t n, int64_t *best) {
    for (int64_t i = 0; i < rows; i++) {
        const float *v = logits + i * n;
        int64_t b = 0;
        for (int64_t j = 1; j < n && !isnan(v[b]); j++)
            if (v[j] > v[b] || isnan(v[j])) b = j;
        best[i] = b;
    }
}

/* out [kept, d] = the draft layer's normed output at the `kept` rows `keep` (kept < 0: every row; 0: the rows'
 * cache rows only, the attention half) of a decode batch
 * (S->t rows: next_ids [t], the main model's hidden [t, d]); logits [kept, vocab] and best [kept] from the head
 * where not NULL. Returns 0, or a code naming the failed part: 1 bad sizes or no memory, 3 a token id outside the
 * table, 4 a kept row outside the batch, 1x / 2x / 3x the attention half's or the MoE / MLP half's (decode_layer.c),
 * 100 + its code. */
int decode_draft_f32(const Draft *D, const Layer *L, const Step *S, const int64_t *next_ids, const void *hidden,
                     int64_t hidden_bf16, const int64_t *keep, int64_t kept, void *cache, float *out, float *logits,
                     int64_t *best, int threads) {
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
        if (logits && best) argmax_rows(logits, kept, D->vocab, best);
    }
    free(buf);
    return err;
}
