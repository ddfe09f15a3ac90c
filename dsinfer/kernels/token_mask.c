/* Structured outputs' token masks (dsinfer/engine/sampler.py's mask_rows and dsinfer/engine/grammar.py's
 * best_allowed are the torch references). token_mask_f32, on the logits in place:
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

/* best[j] = the token t < vocab whose bit is set in mask[j] with the largest scores[rows[j]][t], the first of
 * equal ones (torch's argmax of the masked row); 0 where mask[j] allows none (as the argmax of a row all -inf). */
void token_argmax_f32(const float *scores, int64_t stride, const int32_t *mask, const int64_t *rows, int64_t n,
                      int64_t vocab, int64_t words, int64_t *best) {
    for (int64_t j = 0; j < n; j++) {
        const float *row = scores + rows[j] * stride;
        const uint32_t *bits = (const uint32_t *)(mask + j * words);
        int64_t arg = -1;
        float top = 0.0f;
        for (int64_t w = 0; w * 32 < vocab; w++) {
            uint32_t set = bits[w];
            int64_t base = w * 32;
            if (base + 32 > vocab) set &= (uint32_t)((1ull << (vocab - base)) - 1);
            for (; set; set &= set - 1) {
                int64_t t = base + __builtin_ctz(set);
                if (arg < 0 || row[t] > top) arg = t, top = row[t];
            }
        }
        best[j] = arg < 0 ? 0 : arg;
    }
}
