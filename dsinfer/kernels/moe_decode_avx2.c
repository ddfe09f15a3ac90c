/* Routed experts of a DeepSeekMoE layer for a few tokens (decode), in one call:
 *     out[t] = sum_j weights[t, j] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),  e = ids[t, j]
 * with gate_up [E, 2I, D] (gate rows, then up rows) and down [E, D, I], fp32 or bf16.
 *
 * Scheme: the (token, choice) pairs are grouped by expert (ascending expert, then token), so that each active
 * expert's weights are streamed from memory once for all of its tokens (up to `most` tokens a group, 8 to WIDE_M;
 * an expert with more, in a step of up to MAX_T: two groups back to back, the second finding the rows in cache), by
 * the row kernels of
 * gemv_kernels.h on a small gathered (and, for m > BLOCKED_FROM, packed) block of x. One parallel region:
 *  1. every thread takes the same share of rows i of every active expert: gate rows i and up rows I + i into
 *     g, then h[r][i] = weight * silu(gate) * up, written both plain and packed for phase 2;
 *  -- one barrier --
 *  2. every thread owns a slice of the D output columns: it zeroes them, then for each expert in ascending
 *     order computes down rows of its slice into y and adds them into out.
 * Each out element is summed by one thread in a fixed order, so the result does not depend on timing. */
#include <math.h>
#include <omp.h>
#include "decode_layer.h"
#include "gemv_kernels.h"

#define ALIGN(n) (((n) + 15) & ~(int64_t)15) /* floats: scratch blocks start on 64-byte boundaries */

typedef struct {
    int64_t e, m;           /* expert, tokens routed to it */
    int64_t tok[WIDE_M];    /* their rows of x and out */
    float w[WIDE_M];        /* their routing weights */
    float *x, *xp, *h, *hp; /* gathered x [m, D], packed (or NULL); activation [m, I], packed (or NULL) */
} Group;

/* Groups the T * K pairs by expert, tokens ascending within each, at most `most` tokens a group (more: the
 * expert's next group follows), using order [T * K] as scratch; returns how many groups, or -1 for an id
 * outside [0, E). */
static int64_t group_pairs(const int64_t *ids, const float *weights, int64_t t, int64_t k, int64_t e,
                           int64_t most, int64_t *order, Group *groups) {
    int64_t n = t * k, ng = 0;
    for (int64_t p = 0; p < n; p++) { /* stable insertion sort of the pair indices by expert */
        if (ids[p] < 0 || ids[p] >= e) return -1;
        int64_t q = p;
        for (; q > 0 && ids[order[q - 1]] > ids[p]; q--) order[q] = order[q - 1];
        order[q] = p;
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t p = order[i];
        if (ng == 0 || groups[ng - 1].e != ids[p] || groups[ng - 1].m == most)
            groups[ng].e = ids[p], groups[ng++].m = 0;
        Group *g = &groups[ng - 1];
        g->w[g->m] = weights[p];
        g->tok[g->m++] = p / k;
    }
    return ng;
}

/* Carves each group's blocks out of one allocation (returned; NULL if out of memory), after g and y
 * (shared scratch [most, 2I] and [most, D]), and gathers and packs x. */
static float *scratch(Group *groups, int64_t ng, int64_t most, const float *x, int64_t d, int64_t inter, float **g,
                      float **y) {
    int64_t size = ALIGN(most * 2 * inter) + ALIGN(most * d);
    for (int64_t i = 0; i < ng; i++) {
        int64_t m = groups[i].m, packed = m > BLOCKED_FROM;
        size += ALIGN(m * d) + ALIGN(m * inter) + packed * (ALIGN(m * d) + ALIGN(m * inter));
    }
    float *buf = aligned_alloc(64, (size_t)size * sizeof(float)), *at = buf;
    if (!buf) return NULL;
    *g = at, at += ALIGN(most * 2 * inter);
    *y = at, at += ALIGN(most * d);
    for (int64_t i = 0; i < ng; i++) {
        Group *gr = &groups[i];
        int64_t m = gr->m, packed = m > BLOCKED_FROM;
        gr->x = at, at += ALIGN(m * d);
        gr->h = at, at += ALIGN(m * inter);
        gr->xp = packed ? at : NULL, at += packed * ALIGN(m * d);
        gr->hp = packed ? at : NULL, at += packed * ALIGN(m * inter);
        for (int64_t r = 0; r < m; r++)
            for (int64_t c = 0; c < d; c++) gr->x[r * d + c] = x[gr->tok[r] * d + c];
        if (packed) pack_into(gr->x, gr->xp, m, d);
    }
    return buf;
}

/* Rows [n0, n1) of n, in blocks of 8, split evenly among nt threads. */
static void share(int64_t n, int t, int nt, int64_t *n0, int64_t *n1) {
    int64_t blocks = (n + 7) / 8, b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    *n0 = b0 * 8 < n ? b0 * 8 : n;
    *n1 = b1 * 8 < n ? b1 * 8 : n;
}

/* Rows [n0, n1) of w; `after`: the rows read next (the next part of this thread's work), prefetched. */
static inline __attribute__((always_inline)) void rows(const int bf16, const float *x, const float *xp,
                                                       const void *w, float *y, int64_t m, int64_t n, int64_t k,
                                                       int64_t n0, int64_t n1, const void *after) {
    if (bf16) rows_bf16_any(x, xp, (const uint16_t *)w, y, m, n, k, n0, n1, (const uint16_t *)after);
    else rows_f32_any(x, xp, (const float *)w, y, m, n, k, n0, n1, (const float *)after);
}

/* Phase 1 for one expert and this thread's rows [i0, i1) of gate and of up; `next`: what the thread reads after
 * them (its rows of the next expert's gate, or of the first expert's down), prefetched. */
static inline __attribute__((always_inline)) void gate_up_part(const int bf16, const Group *gr, const char *w,
                                                               const char *next, float *g, int64_t d,
                                                               int64_t inter, int64_t i0, int64_t i1) {
    const size_t es = bf16 ? 2 : 4;
    int64_t m = gr->m, i8 = inter & ~(int64_t)7;
    rows(bf16, gr->x, gr->xp, w, g, m, 2 * inter, d, i0, i1, w + (inter + i0) * d * es);
    rows(bf16, gr->x, gr->xp, w, g, m, 2 * inter, d, inter + i0, inter + i1, next);
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = i0; i < i1; i++) {
            float a = g[r * 2 * inter + i], v = a / (1.0f + expf(-a)) * g[r * 2 * inter + inter + i] * gr->w[r];
            gr->h[r * inter + i] = v;
            if (gr->hp && i < i8) gr->hp[(i & ~(int64_t)7) * m + 8 * r + (i & 7)] = v;
        }
}

static inline __attribute__((always_inline)) int moe_decode(
        const int bf16, const float *x, const int64_t *ids, const float *weights, const void *gate_up,
        const void *down, float *out, int64_t t, int64_t k, int64_t e, int64_t d, int64_t inter, int threads,
        int64_t most) {
    if (t < 1 || t > MAX_T || k < 1 || d < 1 || inter < 1 || most < 1 || most > WIDE_M) return 3;
    Group *groups = malloc((size_t)(t * k) * (sizeof(Group) + sizeof(int64_t)));
    if (!groups) return 2;
    int64_t ng = group_pairs(ids, weights, t, k, e, most, (int64_t *)(groups + t * k), groups);
    float *g, *y, *buf = ng < 0 ? NULL : scratch(groups, ng, most, x, d, inter, &g, &y);
    if (!buf) {
        free(groups);
        return ng < 0 ? 1 : 2;
    }
    const size_t es = bf16 ? 2 : 4;
    _Pragma("omp parallel num_threads(threads)")
    {
        int th = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t i0, i1, d0, d1;
        share(inter, th, nt, &i0, &i1);
        share(d, th, nt, &d0, &d1);
        /* prefetching `after` a part reads the R rows' worth of bytes that follow it in this thread's order
         * (rows of one matrix lie end to end, so that holds across matrices of other row lengths too) */
        for (int64_t i = 0; i < ng && i0 < i1; i++)
            gate_up_part(bf16, &groups[i], (const char *)gate_up + groups[i].e * 2 * inter * d * es,
                         i + 1 < ng ? (const char *)gate_up + (groups[i + 1].e * 2 * inter + i0) * d * es
                                    : (const char *)down + (groups[0].e * d + d0) * inter * es,
                         g, d, inter, i0, i1);
        _Pragma("omp barrier")
        for (int64_t r = 0; r < t; r++)
            for (int64_t c = d0; c < d1; c++) out[r * d + c] = 0.0f;
        for (int64_t i = 0; i < ng && d0 < d1; i++) {
            const Group *gr = &groups[i];
            const char *next = i + 1 < ng ? (const char *)down + (groups[i + 1].e * d + d0) * inter * es : NULL;
            rows(bf16, gr->h, gr->hp, (const char *)down + gr->e * d * inter * es, y, gr->m, d, inter, d0, d1, next);
            for (int64_t r = 0; r < gr->m; r++)
                for (int64_t c = d0; c < d1; c++) out[gr->tok[r] * d + c] += y[r * d + c];
        }
    }
    free(buf);
    free(groups);
    return 0;
}

/* 0 on success; 1: an expert id outside [0, E); 2: out of memory; 3: bad sizes (T outside 1..MAX_T, K, D or I
 * below 1, most outside 1..WIDE_M). most: the most tokens an expert's weights are read once for. */
int moe_decode_f32(const float *x, const int64_t *ids, const float *weights, const float *gate_up,
                   const float *down, float *out, int64_t t, int64_t k, int64_t e, int64_t d, int64_t inter,
                   int threads, int64_t most) {
    return moe_decode(0, x, ids, weights, gate_up, down, out, t, k, e, d, inter, threads, most);
}

int moe_decode_bf16(const float *x, const int64_t *ids, const float *weights, const uint16_t *gate_up,
                    const uint16_t *down, float *out, int64_t t, int64_t k, int64_t e, int64_t d, int64_t inter,
                    int threads, int64_t most) {
    return moe_decode(1, x, ids, weights, gate_up, down, out, t, k, e, d, inter, threads, most);
}
