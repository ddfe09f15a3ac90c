/* Prefill tiles of weight-only quantized matrices (the format of qgemv_avx2.c): W[j, i] for a range of rows
 * n0 <= j < n1, written to out[(j - n0) * k + i] in fp32 (dequant_i8 / dequant_i4) or bf16 (the _bf16 variants,
 * for CPUs that multiply bf16 natively: the fp32 value rounded to nearest even, as torch's .to(bfloat16) does;
 * weights are finite, so NaN needs no care). Threads split the rows. */
#include "qkernels.h"

/* out[i..i+8) = v, or out[i] = f, in fp32 or (BF) bf16. */
static inline AI void put8(void *out, int64_t i, __m256 v, const int BF) {
    if (BF) _mm_storeu_si128((__m128i *)((uint16_t *)out + i), bf16x8(v));
    else _mm256_storeu_ps((float *)out + i, v);
}

static inline AI void put1(void *out, int64_t i, float f, const int BF) {
    if (BF) ((uint16_t *)out)[i] = f32_to_bf16(f);
    else ((float *)out)[i] = f;
}

static inline AI void rows_i8(const int8_t *q, const float *scales, const float *mins, void *out, int64_t k,
                              int64_t g, int64_t n0, int64_t n1, int threads, const int BF) {
    int64_t ng = (k + g - 1) / g;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = n0; j < n1; j++)
        for (int64_t gi = 0; gi < ng; gi++) {
            const int8_t *w = q + j * k + gi * g;
            int64_t o = (j - n0) * k + gi * g, len = k - gi * g < g ? k - gi * g : g, i = 0;
            float s = scales[j * ng + gi], mn = mins ? mins[j * ng + gi] : 0.0f;
            __m256 sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(mn);
            for (; i + 8 <= len; i += 8)
                put8(out, o + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(i8x8(w + i)), sv, mv), BF);
            for (; i < len; i++) put1(out, o + i, s * w[i] + mn, BF);
        }
}

static inline AI void rows_i4(const uint8_t *q, const float *scales, const float *mins, void *out, int64_t k,
                              int64_t g, int64_t n0, int64_t n1, int threads, const int BF) {
    int64_t ng = (k + g - 1) / g;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = n0; j < n1; j++)
        for (int64_t gi = 0; gi < ng; gi++) {
            int64_t len = k - gi * g < g ? k - gi * g : g, h = len / 2, i = 0, o = (j - n0) * k + gi * g;
            const uint8_t *w = q + j * (k / 2) + gi * (g / 2);
            float s = scales[j * ng + gi], mn = mins ? mins[j * ng + gi] : 0.0f;
            __m256 sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(mn);
            __m256i eight = _mm256_set1_epi32(8);
            for (; i + 8 <= h; i += 8) {
                __m256i b = u8x8(w + i);
                __m256i lo = _mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(15)), eight);
                __m256i hi = _mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight);
                put8(out, o + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), sv, mv), BF);
                put8(out, o + h + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), sv, mv), BF);
            }
            for (; i < h; i++) {
                put1(out, o + i, s * ((w[i] & 15) - 8) + mn, BF);
                put1(out, o + h + i, s * ((w[i] >> 4) - 8) + mn, BF);
            }
        }
}

void dequant_i8(const int8_t *q, const float *scales, const float *mins, float *out, int64_t k, int64_t g,
                int64_t n0, int64_t n1, int threads) {
    rows_i8(q, scales, mins, out, k, g, n0, n1, threads, 0);
}

void dequant_i4(const uint8_t *q, const float *scales, const float *mins, float *out, int64_t k, int64_t g,
                int64_t n0, int64_t n1, int threads) {
    rows_i4(q, scales, mins, out, k, g, n0, n1, threads, 0);
}

void dequant_i8_bf16(const int8_t *q, const float *scales, const float *mins, uint16_t *out, int64_t k, int64_t g,
                     int64_t n0, int64_t n1, int threads) {
    rows_i8(q, scales, mins, out, k, g, n0, n1, threads, 1);
}

void dequant_i4_bf16(const uint8_t *q, const float *scales, const float *mins, uint16_t *out, int64_t k, int64_t g,
                     int64_t n0, int64_t n1, int threads) {
    rows_i4(q, scales, mins, out, k, g, n0, n1, threads, 1);
}
