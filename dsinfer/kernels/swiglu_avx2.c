/* SwiGLU's activation for 16-bit prefill batches: from x [T, 2I] bf16 (gate | up, as the gate_up products give
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
