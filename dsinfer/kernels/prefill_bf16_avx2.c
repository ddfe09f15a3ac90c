/* Elementwise pieces of a bf16 prefill, one pass over memory each instead of torch's several.
 *
 * SwiGLU's activation: from x [T, 2I] bf16 (gate | up, as the gate_up products give
 * them), out[t, i] = silu(gate[t, i]) * up[t, i] * scale[t] (no scale: 1), in fp32 and rounded to bf16 once.
 * torch's bf16 silu_and_mul rounds three times (after silu, after the product, after the weight) and takes three
 * passes over memory; this is one. Threads split the tokens. */
#include <math.h>
#include "panel.h"

void silu_mul_bf16(const uint16_t *x, const float *scale, uint16_t *out, int64_t t, int64_t inter, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < t; r++) {
        const uint16_t *gate = x + r * 2 * inter, *up = gate + inter;
        uint16_t *h = out + r * inter;
        float s = scale ? scale[r] : 1.0f;
        __m256 sv = _mm256_set1_ps(s);
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8)
            _mm_storeu_si128((__m128i *)(h + i), bf16x8(_mm256_mul_ps(silu_mul(load_bf16(gate + i), load_bf16(up + i)), sv)));
        for (; i < inter; i++) {
            float g = bf16_to_f32(gate[i]);
            h[i] = f32_to_bf16(g / (1.0f + expf(-g)) * bf16_to_f32(up[i]) * s);
        }
    }
}

/* RMSNorm of bf16 rows as transformers computes it in 16 bits: r = 1 / sqrt(mean(x^2) + eps) in fp32, then
 * out = bf16(w * bf16(x * r)), two roundings (torch rounds the normalised row back to bf16 before the weight).
 * x [rows, n] with row stride x_stride; out [rows, n] contiguous. Threads split the rows. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t n, int64_t x_stride,
                   float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        const uint16_t *xr = x + row * x_stride;
        uint16_t *o = out + row * n;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) { __m256 v = load_bf16(xr + i); acc = _mm256_fmadd_ps(v, v, acc); }
        float ss = hsum(acc);
        for (; i < n; i++) ss += bf16_to_f32(xr[i]) * bf16_to_f32(xr[i]);
        float r = 1.0f / sqrtf(ss / (float)n + eps);
        __m256 rv = _mm256_set1_ps(r);
        for (i = 0; i + 8 <= n; i += 8) {
            __m128i normed = bf16x8(_mm256_mul_ps(load_bf16(xr + i), rv));
            __m256 back = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(normed), 16));
            _mm_storeu_si128((__m128i *)(o + i), bf16x8(_mm256_mul_ps(back, load_bf16(w + i))));
        }
        for (; i < n; i++) o[i] = f32_to_bf16(bf16_to_f32(w[i]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[i]) * r)));
    }
}
