/* Structured outputs' token masks on the logits, in place (dsinfer/engine/sampler.py, mask_rows is the torch
 * reference):
 *     logits[rows[j]][t] = -inf   wherever bit t % 32 of mask[j][t / 32] is clear, for t < vocab
 * logits: fp32 rows of `stride` floats; mask: int32 [n][words] (llguidance's layout, words * 32 >= vocab).
 * Words with every bit set (most of them inside a JSON string) cost one compare. */
#include <math.h>
#include <stdint.h>

void token_mask_f32(float *logits, int64_t stride, const int32_t *mask, const int64_t *rows, int64_t n,
                    int64_t vocab, int64_t words) {
    for (int64_t j = 0; j < n; j++) {
        float *row = logits + rows[j] * stride;
        const uint32_t *bits = (const uint32_t *)(mask + j * words);
        for (int64_t w = 0; w * 32 < vocab; w++) {
            uint32_t clear = ~bits[w];
            int64_t base = w * 32;
            if (base + 32 > vocab) clear &= (uint32_t)((1ull << (vocab - base)) - 1);
            for (; clear; clear &= clear - 1) row[base + __builtin_ctz(clear)] = -INFINITY;
        }
    }
}
