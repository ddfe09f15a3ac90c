/* Small fused elementwise steps of a decoder layer, each one C call instead of several torch ops: on a
 * decode step of a small model, torch's per-op dispatch costs more than the arithmetic. fp32 throughout. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include "simd.h"

/* out[i] = x[i] * w[i] / sqrt(mean(x^2) + eps) for one row of n values. */
static void norm_row(const float *x, const float *w, float *out, int64_t n, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv)));
    for (; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* RMSNorm of `rows` rows of n values, row i at x + i * x_stride, into contiguous out [rows, n]. */
void rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t n, int64_t x_stride, float eps) {
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * x_stride, w, out + r * n, n, eps);
}

/* Turns the interleaved pairs of x[0..2*half) by cs = (cos, sin) pairs: (a, b) -> (a c - b s, b c + a s). */
static void rope_pairs(const float *x, const float *cs, float *out, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float a = x[2 * i], b = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        out[2 * i] = a * c - b * s;
        out[2 * i + 1] = b * c + a * s;
    }
}

/* MLA's step between the projections and attention, for T tokens:
 *   q [T, H, dn + dr]: the rope part of every head turned in place;
 *   kv [T, r + dr] (kv_a_proj's output): cache[slots[t]] = (RMSNorm(latent) * w, turned roped key).
 * cs [T, dr/2, 2]: cos and sin per pair and position. Returns 1 if a slot is outside the cache's n rows. */
int mla_rope_cache_f32(float *q, const float *kv, const float *w, float eps, const float *cs, float *cache,
                       const int64_t *slots, int64_t t, int64_t h, int64_t dn, int64_t dr, int64_t r, int64_t n) {
    for (int64_t i = 0; i < t; i++)
        if (slots[i] < 0 || slots[i] >= n) return 1;
    const int64_t half = dr / 2, dq = dn + dr, dc = r + dr;
    for (int64_t i = 0; i < t; i++) {
        const float *c = cs + i * dr;
        for (int64_t hd = 0; hd < h; hd++) {
            float *pe = q + (i * h + hd) * dq + dn;
            rope_pairs(pe, c, pe, half);
        }
        float *row = cache + slots[i] * dc;
        norm_row(kv + i * dc, w, row, r, eps);
        rope_pairs(kv + i * dc + r, c, row + r, half);
    }
    return 0;
}
