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

/* v rounded to bf16 and widened back to fp32 (nearest even, as f32_to_bf16). */
static inline __m256 round_bf16(__m256 v) {
    __m256i b = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32((int)0xffff0000u)));
}

/* Rope on bf16 interleaved pairs, rounded as torch's 16-bit ops round (apply_rope): for the pair (x0, x1) and
 * the bf16-rounded cos c and sin s of its token, out = (bf16(bf16(x0 c) - bf16(x1 s)), bf16(bf16(x1 c) + bf16(x0 s))).
 * cosd [T, dim] holds each c twice (c, c), sins [T, dim] (-s, s), both fp32 holding bf16 values; x [T, H, dim] with
 * strides xt (token) and xh (head), dim contiguous and a multiple of 8; out [T, H, dim] contiguous. */
void rope_bf16(const uint16_t *x, int64_t xt, int64_t xh, const float *cosd, const float *sins, uint16_t *out,
               int64_t t, int64_t h, int64_t dim, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < t; r++)
        for (int64_t hd = 0; hd < h; hd++) {
            const uint16_t *xr = x + r * xt + hd * xh;
            uint16_t *o = out + (r * h + hd) * dim;
            for (int64_t i = 0; i < dim; i += 8) {
                __m256 v = load_bf16(xr + i), swapped = _mm256_permute_ps(v, 0xB1);
                __m256 a = round_bf16(_mm256_mul_ps(v, _mm256_loadu_ps(cosd + r * dim + i)));
                __m256 b = round_bf16(_mm256_mul_ps(swapped, _mm256_loadu_ps(sins + r * dim + i)));
                _mm_storeu_si128((__m128i *)(o + i), bf16x8(_mm256_add_ps(a, b)));
            }
        }
}
