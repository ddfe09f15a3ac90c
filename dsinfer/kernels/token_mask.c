/* Structured outputs' token masks (dsinfer/engine/sampler.py's mask_rows and dsinfer/engine/grammar.py's
 * best_allowed are the torch references). token_mask_f32, on the logits in place:
 *     logits[rows[j]][t] = -inf   wherever bit t % 32 of mask[j][t / 32] is clear, for t < vocab
 * logits: fp32 rows of `stride` floats; mask: int32 [n][words] (llguidance's layout, words * 32 >= vocab).
 * Words with every bit set (most of them inside a JSON string) cost one compare. */
#include <immintrin.h>
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

/* The 8 lanes of a vector whose bits are set in bits8 (bit k: lane k), as an all-ones / all-zeros mask. */
static inline __m256 lanes_of(uint32_t bits8) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i set = _mm256_and_si256(_mm256_set1_epi32((int)bits8), lane);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane));
}

/* Word w of a mask with the bits of tokens >= vocab cleared. */
static inline uint32_t word_in_vocab(const uint32_t *bits, int64_t w, int64_t vocab) {
    int64_t base = w * 32;
    return base + 32 > vocab ? bits[w] & (uint32_t)((1ull << (vocab - base)) - 1) : bits[w];
}

/* The largest score the mask allows (-inf where it allows only -inf scores); *any: whether it allows a token. */
static float allowed_max(const float *row, const uint32_t *bits, int64_t vocab, int *any) {
    __m256 top = _mm256_set1_ps(-INFINITY), neg = top;
    float tail = -INFINITY;
    uint32_t seen = 0;
    for (int64_t w = 0; w * 32 < vocab; w++) {
        uint32_t set = word_in_vocab(bits, w, vocab);
        seen |= set;
        if (!set) continue;
        const float *x = row + w * 32;
        if (w * 32 + 32 > vocab) {  /* the vocabulary's last, partial word */
            for (; set; set &= set - 1) tail = fmaxf(tail, x[__builtin_ctz(set)]);
            continue;
        }
        for (int k = 0; k < 4; k++)
            top = _mm256_max_ps(top, _mm256_blendv_ps(neg, _mm256_loadu_ps(x + 8 * k), lanes_of(set >> (8 * k) & 0xff)));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    *any = seen != 0;
    return fmaxf(_mm_cvtss_f32(m), tail);
}

/* The first token the mask allows whose score is top (one exists: allowed_max found it). */
static int64_t first_equal(const float *row, const uint32_t *bits, int64_t vocab, float top) {
    __m256 want = _mm256_set1_ps(top);
    for (int64_t w = 0; w * 32 < vocab; w++) {
        uint32_t set = word_in_vocab(bits, w, vocab);
        if (!set) continue;
        const float *x = row + w * 32;
        if (w * 32 + 32 > vocab) {
            for (; set; set &= set - 1)
                if (x[__builtin_ctz(set)] == top) return w * 32 + __builtin_ctz(set);
            continue;
        }
        for (int k = 0; k < 4; k++) {
            __m256 hit = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8 * k), want, _CMP_EQ_OQ),
                                       lanes_of(set >> (8 * k) & 0xff));
            int lanes = _mm256_movemask_ps(hit);
            if (lanes) return w * 32 + 8 * k + __builtin_ctz(lanes);
        }
    }
    return 0;
}

/* best[j] = the token t < vocab whose bit is set in mask[j] with the largest scores[rows[j]][t], the first of
 * equal ones (torch's argmax of the masked row); 0 where mask[j] allows none (as the argmax of a row all -inf).
 * Two vectorised passes over the allowed words: their largest score, then its first allowed position. */
void token_argmax_f32(const float *scores, int64_t stride, const int32_t *mask, const int64_t *rows, int64_t n,
                      int64_t vocab, int64_t words, int64_t *best) {
    for (int64_t j = 0; j < n; j++) {
        const float *row = scores + rows[j] * stride;
        const uint32_t *bits = (const uint32_t *)(mask + j * words);
        int any;
        float top = allowed_max(row, bits, vocab, &any);
        best[j] = any ? first_equal(row, bits, vocab, top) : 0;
    }
}
