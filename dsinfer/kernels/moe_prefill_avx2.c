/* A MoE layer's routed experts (or a dense SwiGLU MLP) for a prefill's many tokens, in one call:
 *     out[t] = sum_j weights[t, j] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),  e = ids[t, j]
 * with gate_up [E, 2I, D] (gate rows, then up rows) and down [E, D, I] in fp32; ids == NULL means one expert
 * that every token takes with weight 1 (a dense MLP).
 *
 * The (token, choice) pairs are grouped by expert, tokens ascending, and each expert's tokens run in blocks of
 * at most BLOCK rows (so that packed x stays in cache) through the panel kernels of panel.h. One parallel
 * region; per block:
 *  1. the threads pack the block's rows of x (gathered by token) into panels, each thread a range of columns;
 *  -- barrier --
 *  2. each thread takes its share of intermediate columns i, three at a time: the register tile runs gate rows
 *     i..i+2 and up rows I+i..I+i+2 together, so h = weight * silu(gate) * up is formed in registers and
 *     written straight into h's panels (lanes are tokens), never as a [rows, 2I] intermediate;
 *  -- barrier --
 *  3. each thread owns a slice of out's D columns and adds its rows of down @ h into them.
 * Experts are added in ascending order and each out element by one thread, so results do not depend on timing. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include "panel.h"

#define BLOCK 256 /* tokens per block: packed x [BLOCK, D] and h [BLOCK, I] stay within L2 / L3 */

typedef struct {
    const float *x, *gate_up, *down;
    float *out, *xp, *hp, *wv;
    int64_t t, d, inter;
} Moe;

/* Phase 2 for this thread's intermediate columns [i0, i1) of expert e, on the block's np panels. */
static void gate_up_phase(const Moe *s, const float *gu, int64_t rows, int64_t i0, int64_t i1) {
    const int64_t d = s->d, inter = s->inter, np = (rows + PW - 1) / PW;
    for (int64_t i = i0; i < i1;) {
        const int gp = i1 - i >= 3 ? 3 : 1; /* intermediate columns in this tile */
        const float *wr[6];
        for (int g = 0; g < gp; g++) wr[g] = gu + (i + g) * d, wr[gp + g] = gu + (inter + i + g) * d;
        for (int64_t p = 0; p < np; p++) {
            const int64_t pr = rows - p * PW < PW ? rows - p * PW : PW;
            float acc[6 * PW] __attribute__((aligned(32))); /* gate rows' lanes, then up rows' */
            panel_tile_any(s->xp + p * d * PW, wr, d, acc, 2 * gp, (int)pr);
            for (int g = 0; g < gp; g++) {
                float *h = s->hp + p * inter * PW + (i + g) * PW;
                for (int v = 0; v < PW; v += 8) { /* padded lanes have weight 0 */
                    __m256 gate = _mm256_load_ps(acc + g * PW + v), up = _mm256_load_ps(acc + (gp + g) * PW + v);
                    _mm256_store_ps(h + v, _mm256_mul_ps(silu_mul(gate, up), _mm256_load_ps(s->wv + p * PW + v)));
                }
            }
        }
        i += gp;
    }
}

/* Phase 3 for this thread's output columns [j0, j1): out[tok[r]][j] += (down rows j) . h[r]. */
static void down_phase(const Moe *s, const float *dn, const int64_t *tok, int64_t rows, int64_t j0, int64_t j1) {
    const int64_t d = s->d, inter = s->inter, np = (rows + PW - 1) / PW;
    for (int64_t j = j0; j < j1;) {
        const int G = j1 - j >= 6 ? 6 : 1;
        const float *wr[6];
        for (int g = 0; g < G; g++) wr[g] = dn + (j + g) * inter;
        for (int64_t p = 0; p < np; p++) {
            const int64_t pr = rows - p * PW < PW ? rows - p * PW : PW;
            float lanes[6 * PW] __attribute__((aligned(32)));
            panel_tile_any(s->hp + p * inter * PW, wr, inter, lanes, G, (int)pr);
            for (int64_t r = 0; r < pr; r++) {
                float *o = s->out + tok[p * PW + r] * d + j;
                for (int g = 0; g < G; g++) o[g] += lanes[g * PW + r];
            }
        }
        j += G;
    }
}

/* [lo, hi) of n items in units of `unit`, for thread tid of nt. */
static void share(int64_t n, int64_t unit, int tid, int nt, int64_t *lo, int64_t *hi) {
    int64_t units = (n + unit - 1) / unit, per = (units + nt - 1) / nt;
    *lo = tid * per * unit < n ? tid * per * unit : n;
    *hi = *lo + per * unit < n ? *lo + per * unit : n;
}

/* One block of `rows` tokens tok[0..rows) with weights w through one expert's matrices gu and dn. */
static void run_block(const Moe *s, const float *gu, const float *dn, const int64_t *tok, const float *w,
                      int64_t rows, int tid, int nt) {
    const int64_t np = (rows + PW - 1) / PW;
    int64_t lo, hi;
    share(s->d, 8, tid, nt, &lo, &hi);
    for (int64_t p = 0; p < np; p++) {
        const int64_t pr = rows - p * PW < PW ? rows - p * PW : PW;
        pack_panel(s->x, s->d, tok + p * PW, pr, s->xp + p * s->d * PW, lo, hi);
    }
    if (tid == 0)
        for (int64_t r = 0; r < np * PW; r++) s->wv[r] = r < rows ? w[r] : 0.0f;
    _Pragma("omp barrier")
    share(s->inter, 3, tid, nt, &lo, &hi);
    gate_up_phase(s, gu, rows, lo, hi);
    _Pragma("omp barrier")
    share(s->d, 6, tid, nt, &lo, &hi);
    down_phase(s, dn, tok, rows, lo, hi);
}

/* Groups the t * k pairs by expert (counting sort, tokens ascending): start[E + 1], tok and w [t * k].
 * Returns -1 for an id outside [0, E). */
static int group_by_expert(const int64_t *ids, const float *weights, int64_t t, int64_t k, int64_t e,
                           int64_t *start, int64_t *tok, float *w) {
    memset(start, 0, (size_t)(e + 1) * sizeof(int64_t));
    for (int64_t p = 0; p < t * k; p++) {
        if (ids[p] < 0 || ids[p] >= e) return -1;
        start[ids[p] + 1]++;
    }
    for (int64_t i = 0; i < e; i++) start[i + 1] += start[i];
    int64_t *fill = malloc((size_t)e * sizeof(int64_t));
    if (!fill) return -2;
    memcpy(fill, start, (size_t)e * sizeof(int64_t));
    for (int64_t p = 0; p < t * k; p++) tok[fill[ids[p]]] = p / k, w[fill[ids[p]]++] = weights[p];
    free(fill);
    return 0;
}

/* 0 on success; 1: an expert id outside [0, E); 2: out of memory; 3: bad sizes. out [t, d] is overwritten. */
int moe_prefill_f32(const float *x, const int64_t *ids, const float *weights, const float *gate_up,
                    const float *down, float *out, int64_t t, int64_t k, int64_t e, int64_t d, int64_t inter,
                    int threads) {
    if (t < 1 || e < 1 || inter < 1 || d < 1 || (ids && k < 1)) return 3;
    const int64_t pairs = ids ? t * k : t, block = pairs < BLOCK ? pairs : BLOCK, np = (block + PW - 1) / PW;
    int64_t *start = malloc((size_t)(e + 1) * sizeof(int64_t)), *tok = malloc((size_t)pairs * sizeof(int64_t));
    float *w = malloc((size_t)pairs * sizeof(float));
    Moe s = {x, gate_up, down, out, aligned_alloc(64, (size_t)(np * PW * d) * 4),
             aligned_alloc(64, (size_t)(np * PW * inter) * 4), aligned_alloc(64, (size_t)(np * PW) * 4), t, d, inter};
    int rc = !start || !tok || !w || !s.xp || !s.hp || !s.wv ? 2 : 0;
    if (!rc && ids) rc = group_by_expert(ids, weights, t, k, e, start, tok, w);
    rc = rc == -1 ? 1 : rc == -2 ? 2 : rc;
    if (!rc && !ids) { /* a dense MLP: every token, weight 1, one expert */
        for (int64_t i = 0; i < t; i++) tok[i] = i, w[i] = 1.0f;
        start[0] = 0, start[1] = t, e = 1;
    }
    if (!rc) {
        memset(out, 0, (size_t)(t * d) * sizeof(float));
        _Pragma("omp parallel num_threads(threads)")
        {
            const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
            for (int64_t ex = 0; ex < e; ex++)
                for (int64_t b = start[ex]; b < start[ex + 1]; b += BLOCK) {
                    const int64_t rows = start[ex + 1] - b < BLOCK ? start[ex + 1] - b : BLOCK;
                    run_block(&s, gate_up + ex * 2 * inter * d, down + ex * d * inter, tok + b, w + b, rows,
                              tid, nt);
                    _Pragma("omp barrier")
                }
        }
    }
    free(start), free(tok), free(w), free(s.xp), free(s.hp), free(s.wv);
    return rc;
}
