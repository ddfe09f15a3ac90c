/* The DeepSeekMoE router for a few tokens (decode), in one call (dsinfer/layers/moe.py, Router.plain):
 *     logits[t][e] = x[t] . weight[e]          (weight fp32 or bf16, fp32 accumulation)
 *     scores       = softmax(logits) or sigmoid(logits)
 *     choice       = scores + bias             (bias optional)
 *     method 0 greedy: every expert allowed; 1 group_limited_greedy / 2 noaux_tc with n_group > 1: the experts
 *       are split into n_group equal groups, ranked by the group's best choice (1) or the sum of its two best
 *       (2), and only the topk_group best groups' experts are allowed;
 *     ids          = the top_k allowed experts by choice, descending (ties: lower index first)
 *     weights      = scores[ids], divided by (their sum + 1e-20) if norm_topk_prob and top_k > 1, times scale
 * and, if counts is given, counts[id] += 1 for every chosen id (atomically: a decode layer may route tokens on
 * several threads at once).
 *
 * Each logit is one thread's dot product in a fixed order, so results do not depend on the thread count;
 * threads (OpenMP, over experts) are used only for large E * D * T. Returns 0, 1 for bad arguments, 2 if out of
 * memory. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"

#define PARALLEL_FROM (1 << 21) /* multiply-adds */

static inline __m256 load8(const void *w, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float load1(const void *w, int bf16, int64_t i) {
    if (!bf16) return ((const float *)w)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* logits[r][row] for up to 4 tokens x[r] against one weight row, the row read once for all of them. */
static void dots4(const float *x, int64_t m, const void *w, int bf16, int64_t row, int64_t d, float *logits,
                  int64_t e) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t base = row * d, c = 0;
    if (m == 4) {
        for (; c + 8 <= d; c += 8) {
            __m256 wv = load8(w, bf16, base + c);
            acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + c), acc[0]);
            acc[1] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + d + c), acc[1]);
            acc[2] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 2 * d + c), acc[2]);
            acc[3] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 3 * d + c), acc[3]);
        }
    } else {
        for (; c + 8 <= d; c += 8) {
            __m256 wv = load8(w, bf16, base + c);
            for (int64_t r = 0; r < m; r++) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * d + c), acc[r]);
        }
    }
    for (int64_t r = 0; r < m; r++) {
        float s = hsum(acc[r]);
        for (int64_t cc = c; cc < d; cc++) s += x[r * d + cc] * load1(w, bf16, base + cc);
        logits[r * e + row] = s;
    }
}

static void logits_all(const float *x, const void *w, int bf16, float *logits, int64_t t, int64_t d, int64_t e) {
    int parallel = (double)t * (double)d * (double)e >= PARALLEL_FROM;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t row = 0; row < e; row++)
        for (int64_t r0 = 0; r0 < t; r0 += 4)
            dots4(x + r0 * d, t - r0 < 4 ? t - r0 : 4, w, bf16, row, d, logits + r0 * e, e);
}

int route_f32(const float *x, const void *weight, int weight_bf16, const float *bias, float *out_w,
              int64_t *out_ids, int64_t *counts, int64_t t, int64_t d, int64_t e, int64_t top_k, int64_t n_group,
              int64_t topk_group, int method, int sigmoid, int norm_topk_prob, float scale) {
    int grouped = method != 0 && n_group > 1;
    int64_t per = grouped ? e / n_group : e;
    if (t < 1 || d < 1 || e < 1 || top_k < 1 || top_k > e || method < 0 || method > 2) return 1;
    if (grouped && (e % n_group || topk_group < 1 || topk_group > n_group || top_k > topk_group * per
                    || (method == 2 && per < 2)))
        return 1;
    int64_t ng = grouped ? n_group : 1;
    float *logits = malloc((size_t)(t * e + e + ng) * sizeof(float));
    unsigned char *allowed = malloc((size_t)(e + ng));
    if (!logits || !allowed) {
        free(logits);
        free(allowed);
        return 2;
    }
    float *choice = logits + t * e, *gscore = choice + e;
    unsigned char *gkeep = allowed + e;
    logits_all(x, weight, weight_bf16, logits, t, d, e);

    for (int64_t r = 0; r < t; r++) {
        float *s = logits + r * e; /* becomes the scores */
        if (sigmoid) {
            for (int64_t i = 0; i < e; i++) s[i] = 1.0f / (1.0f + expf(-s[i]));
        } else {
            float mx = s[0], sum = 0.0f;
            for (int64_t i = 1; i < e; i++) mx = s[i] > mx ? s[i] : mx;
            for (int64_t i = 0; i < e; i++) sum += (s[i] = expf(s[i] - mx));
            for (int64_t i = 0; i < e; i++) s[i] /= sum;
        }
        for (int64_t i = 0; i < e; i++) choice[i] = bias ? s[i] + bias[i] : s[i];

        memset(allowed, 1, (size_t)e);
        if (grouped) {
            for (int64_t g = 0; g < ng; g++) {
                const float *c = choice + g * per;
                if (method == 2) { /* the sum of the two largest; the first of equal values counts as larger */
                    int64_t b1 = 0;
                    for (int64_t i = 1; i < per; i++) b1 = c[i] > c[b1] ? i : b1;
                    int64_t b2 = b1 == 0 ? 1 : 0;
                    for (int64_t i = 0; i < per; i++) b2 = i != b1 && c[i] > c[b2] ? i : b2;
                    gscore[g] = c[b1] + c[b2];
                } else {
                    float mx = c[0];
                    for (int64_t i = 1; i < per; i++) mx = c[i] > mx ? c[i] : mx;
                    gscore[g] = mx;
                }
                gkeep[g] = 0;
            }
            for (int64_t j = 0; j < topk_group; j++) {
                int64_t best = -1;
                for (int64_t g = 0; g < ng; g++)
                    if (!gkeep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                gkeep[best] = 1;
            }
            for (int64_t i = 0; i < e; i++) allowed[i] = gkeep[i / per];
        }

        float *w = out_w + r * top_k, sum = 0.0f;
        int64_t *ids = out_ids + r * top_k;
        for (int64_t j = 0; j < top_k; j++) {
            int64_t best = -1;
            for (int64_t i = 0; i < e; i++)
                if (allowed[i] && (best < 0 || choice[i] > choice[best])) best = i;
            allowed[best] = 0;
            ids[j] = best;
            sum += (w[j] = s[best]);
        }
        if (norm_topk_prob && top_k > 1)
            for (int64_t j = 0; j < top_k; j++) w[j] /= sum + 1e-20f;
        if (scale != 1.0f)
            for (int64_t j = 0; j < top_k; j++) w[j] *= scale;
        if (counts)
            for (int64_t j = 0; j < top_k; j++) __atomic_fetch_add(&counts[ids[j]], 1, __ATOMIC_RELAXED);
    }
    free(logits);
    free(allowed);
    return 0;
}
