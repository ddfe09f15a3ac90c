/* MLA "absorbed" decode attention over a latent cache (see MLA.absorbed in dsinfer/layers/attention.py):
 *   s_j = scale * q[t,h,:] . cache[row_j, :D]  for the first lens[t] rows of sequence seq[t],
 *   out[t,h,:] = sum_j softmax(s)_j * cache[row_j, :R].
 * Algorithm (flash-decoding): a token's context is split into chunks, one work item each, so that a single
 * long context keeps every thread busy. An item walks its chunk in blocks of BLK cache rows: each row is read
 * from memory once (bf16 widened, or fp8 decoded, to fp32 into a per-thread buffer) and used for all H heads while it is in
 * L1. Per block: the H x BLK scores, then an online softmax step per head (running max m, running sum l,
 * accumulator acc[R] rescaled by exp(m_old - m_new) once per block), then acc += p_j * c_j. A token with one
 * item writes acc / l straight to out; a split token's partial (m, l, acc) are merged per head by log-sum-exp
 * rescaling once all items are done. All arithmetic is fp32.
 * Cache formats (dsinfer/layers/kv_format.py): fp32 or bf16 rows of D = R + DR values, or fp8 rows of bytes:
 * R e4m3 latent values, one fp32 scale per FP8_GROUP of them, then DR bf16 rope values. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"

#define BLK 8        /* cache rows per block */
#define CHUNK 256     /* positions per work item, */
#define MAX_CHUNKS 16 /* up to this many per token (longer contexts: longer chunks), which bounds the scratch */
#define FP8_GROUP 128 /* latent values per fp8 scale */

enum { CACHE_F32 = 0, CACHE_BF16 = 1, CACHE_FP8 = 2 };

enum { MLA_OK = 0, MLA_BAD_ARGS = 1, MLA_BAD_INDEX = 2, MLA_NO_MEMORY = 3 };

typedef struct {
    const float *q;
    const void *cache;
    const int64_t *rows, *seq, *lens;
    float *out;
    int64_t t, h, r, d, lmax, b; /* b: sequences (rows of `rows`) */
    float scale;
    int format;      /* CACHE_F32, CACHE_BF16 or CACHE_FP8 */
    int64_t stride;  /* bytes from one cache row to the next */
} Args;

static inline int64_t round16(int64_t n) { return (n + 15) & ~(int64_t)15; }

static float e4m3_lut[256]; /* float8_e4m3fn byte -> value */

/* Fills e4m3_lut: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal, 0x7f / 0xff NaN. It
 * runs when the library loads, before any thread can read the table (decode layers may attend on several). */
__attribute__((constructor)) static void init_e4m3(void) {
    for (int b = 0; b < 256; b++) {
        const int e = (b >> 3) & 15, m = b & 7;
        float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
        if (e == 15 && m == 7) v = NAN;
        e4m3_lut[b] = b & 128 ? -v : v;
    }
}

/* One fp8 row (see the top of the file) as d = r + dr fp32 values in dst. The scales and rope values may sit
 * at odd byte offsets, so they are read with memcpy. */
static void decode_fp8_row(const uint8_t *src, float *dst, int64_t r, int64_t d) {
    const uint8_t *scales = src + r, *rope = scales + 4 * ((r + FP8_GROUP - 1) / FP8_GROUP);
    float sc = 0.0f;
    int64_t i = 0;
    for (; i + 8 <= r; i += 8) {
        if (i % FP8_GROUP == 0) memcpy(&sc, scales + 4 * (i / FP8_GROUP), 4);
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + i)));
        __m256 v = _mm256_i32gather_ps(e4m3_lut, idx, 4);
        _mm256_store_ps(dst + i, _mm256_mul_ps(v, _mm256_set1_ps(sc)));
    }
    for (; i < r; i++) {
        memcpy(&sc, scales + 4 * (i / FP8_GROUP), 4);
        dst[i] = e4m3_lut[src[i]] * sc;
    }
    for (int64_t j = 0; j < d - r; j++) {
        uint16_t v;
        memcpy(&v, rope + 2 * j, 2);
        dst[r + j] = bf16_to_f32(v);
    }
}

/* Pointers to the block's nb rows in fp32: the cache itself, or bf16 / fp8 rows turned to fp32 in buf. */
static void fetch(const Args *a, const int64_t *idx, int nb, const float **rp, float *buf) {
    const int64_t d = a->d;
    for (int j = 0; j < nb; j++) {
        const char *row = (const char *)a->cache + idx[j] * a->stride;
        if (a->format == CACHE_F32) { rp[j] = (const float *)row; continue; }
        float *dst = buf + j * round16(d);
        rp[j] = dst;
        if (a->format == CACHE_FP8) { decode_fp8_row((const uint8_t *)row, dst, a->r, d); continue; }
        const uint16_t *src = (const uint16_t *)row;
        int64_t i = 0;
        for (; i + 8 <= d; i += 8) {
            __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
            _mm256_store_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
        }
        for (; i < d; i++) dst[i] = bf16_to_f32(src[i]);
    }
}

/* s[hh * BLK + j] = q_hh . row_j for HN heads (q rows d apart) and RN rows: HN * RN accumulators. */
static inline __attribute__((always_inline)) void dot_tile(const float *q, const float **rp, float *s,
                                                           int64_t d, const int HN, const int RN) {
    __m256 acc[2][4];
    for (int hh = 0; hh < HN; hh++)
        for (int j = 0; j < RN; j++) acc[hh][j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        __m256 qv[2];
        for (int hh = 0; hh < HN; hh++) qv[hh] = _mm256_loadu_ps(q + hh * d + i);
        for (int j = 0; j < RN; j++) {
            __m256 rv = _mm256_loadu_ps(rp[j] + i);
            for (int hh = 0; hh < HN; hh++) acc[hh][j] = _mm256_fmadd_ps(qv[hh], rv, acc[hh][j]);
        }
    }
    for (int hh = 0; hh < HN; hh++)
        for (int j = 0; j < RN; j++) {
            float v = hsum(acc[hh][j]);
            for (int64_t k = i; k < d; k++) v += q[hh * d + k] * rp[j][k];
            s[hh * BLK + j] = v;
        }
}

/* Scores of all heads against the block's nb rows, into s[H][BLK]: heads in pairs, rows in fours. */
static void scores(const float *q, const float **rp, int nb, float *s, int64_t h, int64_t d) {
    int64_t hd = 0;
    for (; hd + 2 <= h; hd += 2) {
        int j = 0;
        for (; j + 4 <= nb; j += 4) dot_tile(q + hd * d, rp + j, s + hd * BLK + j, d, 2, 4);
        for (; j < nb; j++) dot_tile(q + hd * d, rp + j, s + hd * BLK + j, d, 2, 1);
    }
    if (hd < h) {
        int j = 0;
        for (; j + 4 <= nb; j += 4) dot_tile(q + hd * d, rp + j, s + hd * BLK + j, d, 1, 4);
        for (; j < nb; j++) dot_tile(q + hd * d, rp + j, s + hd * BLK + j, d, 1, 1);
    }
}

/* Online softmax step: scores s[H][BLK] become weights p = exp(scale * s - m_new); alpha[h] is the factor
 * that rescales what acc and l held so far (0 on the first block). */
static void softmax_step(float *s, int nb, float *m, float *l, float *alpha, int64_t h, float scale, int first) {
    for (int64_t hd = 0; hd < h; hd++) {
        float *p = s + hd * BLK, mb = -INFINITY, sum = 0.0f;
        for (int j = 0; j < nb; j++) {
            p[j] *= scale;
            mb = p[j] > mb ? p[j] : mb;
        }
        float m_new = first || mb > m[hd] ? mb : m[hd];
        alpha[hd] = first ? 0.0f : expf(m[hd] - m_new);
        for (int j = 0; j < nb; j++) {
            p[j] = expf(p[j] - m_new);
            sum += p[j];
        }
        l[hd] = (first ? 0.0f : l[hd] * alpha[hd]) + sum;
        m[hd] = m_new;
    }
}

/* acc[hh][i..i+8*CN) = alpha * acc + sum_j p[hh][j] * row_j for HN heads (acc rows r apart) and CN vectors
 * of 8 columns, the HN * CN sums held in registers over the block's rows. */
static inline __attribute__((always_inline)) void acc_tile(float *acc, const float **rp, int nb, const float *p,
                                                           const float *alpha, int64_t r, int64_t i, int first,
                                                           const int HN, const int CN) {
    __m256 a[2][4];
    for (int hh = 0; hh < HN; hh++) {
        __m256 al = _mm256_set1_ps(alpha[hh]);
        for (int c = 0; c < CN; c++)
            a[hh][c] = first ? _mm256_setzero_ps() : _mm256_mul_ps(al, _mm256_loadu_ps(acc + hh * r + i + 8 * c));
    }
    for (int j = 0; j < nb; j++) {
        __m256 pv[2];
        for (int hh = 0; hh < HN; hh++) pv[hh] = _mm256_broadcast_ss(p + hh * BLK + j);
        for (int c = 0; c < CN; c++) {
            __m256 rv = _mm256_loadu_ps(rp[j] + i + 8 * c);
            for (int hh = 0; hh < HN; hh++) a[hh][c] = _mm256_fmadd_ps(pv[hh], rv, a[hh][c]);
        }
    }
    for (int hh = 0; hh < HN; hh++)
        for (int c = 0; c < CN; c++) _mm256_storeu_ps(acc + hh * r + i + 8 * c, a[hh][c]);
}

/* One head group's accumulators over all R columns: 32 at a time, then 8, then single columns. */
static inline __attribute__((always_inline)) void acc_heads(float *acc, const float **rp, int nb, const float *p,
                                                            const float *alpha, int64_t r, int first, const int HN) {
    int64_t i = 0;
    for (; i + 32 <= r; i += 32) acc_tile(acc, rp, nb, p, alpha, r, i, first, HN, 4);
    for (; i + 8 <= r; i += 8) acc_tile(acc, rp, nb, p, alpha, r, i, first, HN, 1);
    for (; i < r; i++)
        for (int hh = 0; hh < HN; hh++) {
            float v = first ? 0.0f : alpha[hh] * acc[hh * r + i];
            for (int j = 0; j < nb; j++) v += p[hh * BLK + j] * rp[j][i];
            acc[hh * r + i] = v;
        }
}

static void accumulate(float *acc, const float **rp, int nb, const float *p, const float *alpha, int64_t h,
                       int64_t r, int first) {
    int64_t hd = 0;
    for (; hd + 2 <= h; hd += 2) acc_heads(acc + hd * r, rp, nb, p + hd * BLK, alpha + hd, r, first, 2);
    if (hd < h) acc_heads(acc + hd * r, rp, nb, p + hd * BLK, alpha + hd, r, first, 1);
}

/* Token t's positions j0..j1 into acc[H][R], m[H], l[H] (unnormalized). work: per-thread scratch. */
static void run_item(const Args *a, int64_t t, int64_t j0, int64_t j1, float *acc, float *m, float *l,
                     float *work) {
    const int64_t *idx = a->rows + a->seq[t] * a->lmax;
    const float *q = a->q + t * a->h * a->d;
    float *s = work, *alpha = s + round16(a->h * BLK), *buf = alpha + round16(a->h);
    const float *rp[BLK];
    for (int64_t j = j0; j < j1; j += BLK) {
        int nb = j1 - j < BLK ? (int)(j1 - j) : BLK;
        fetch(a, idx + j, nb, rp, buf);
        scores(q, rp, nb, s, a->h, a->d);
        softmax_step(s, nb, m, l, alpha, a->h, a->scale, j == j0);
        accumulate(acc, rp, nb, s, alpha, a->h, a->r, j == j0);
    }
}

/* out[i] = sum_c w[c] * part[c * stride + i] for i < r. */
static void weighted_sum(float *out, const float *part, const float *w, int nc, int64_t stride, int64_t r) {
    int64_t i = 0;
    for (; i + 8 <= r; i += 8) {
        __m256 v = _mm256_setzero_ps();
        for (int c = 0; c < nc; c++)
            v = _mm256_fmadd_ps(_mm256_set1_ps(w[c]), _mm256_loadu_ps(part + c * stride + i), v);
        _mm256_storeu_ps(out + i, v);
    }
    for (; i < r; i++) {
        float v = 0.0f;
        for (int c = 0; c < nc; c++) v += w[c] * part[c * stride + i];
        out[i] = v;
    }
}

/* Merges head hd of a token's nc partials (m, l [nc][H]; acc [nc][H][R]) into out[R]; w: nc floats. */
static void merge(float *out, const float *m, const float *l, const float *acc, int nc, int64_t h, int64_t r,
                  int64_t hd, float *w) {
    float mx = -INFINITY, total = 0.0f;
    for (int c = 0; c < nc; c++) mx = m[c * h + hd] > mx ? m[c * h + hd] : mx;
    for (int c = 0; c < nc; c++) {
        w[c] = expf(m[c * h + hd] - mx);
        total += w[c] * l[c * h + hd];
    }
    for (int c = 0; c < nc; c++) w[c] /= total;
    weighted_sum(out, acc + hd * r, w, nc, h * r, r);
}

/* Every index read is inside the cache, every lens in 1..lmax and every seq in 0..b-1. */
static int check(const Args *a, int64_t n_cache_rows) {
    for (int64_t t = 0; t < a->t; t++) {
        if (a->lens[t] < 1 || a->lens[t] > a->lmax || a->seq[t] < 0 || a->seq[t] >= a->b) return MLA_BAD_ARGS;
        const int64_t *idx = a->rows + a->seq[t] * a->lmax;
        for (int64_t j = 0; j < a->lens[t]; j++)
            if (idx[j] < 0 || idx[j] >= n_cache_rows) return MLA_BAD_INDEX;
    }
    return MLA_OK;
}

/* Work items: each token's positions in chunks of CHUNK, at most MAX_CHUNKS of them. The split depends on the
 * token's own length only, so its result is the same bits whatever else is in the batch (and however many
 * threads run it). */
static int64_t chunks(int64_t len) {
    const int64_t n = (len + CHUNK - 1) / CHUNK;
    return n < MAX_CHUNKS ? n : MAX_CHUNKS;
}

static int64_t count_items(const Args *a) {
    int64_t items = 0;
    for (int64_t t = 0; t < a->t; t++) items += chunks(a->lens[t]);
    return items;
}

static void plan(const Args *a, int64_t *nch, int64_t *first, int64_t *token) {
    int64_t items = 0;
    for (int64_t t = 0; t < a->t; t++) {
        nch[t] = chunks(a->lens[t]);
        first[t] = items;
        for (int64_t c = 0; c < nch[t]; c++) token[items++] = t;
    }
}

static int mla_decode(const Args *a, int64_t n_cache_rows, int threads) {
    if (a->t < 1 || a->h < 1 || a->r < 1 || a->d < a->r || a->lmax < 1) return MLA_BAD_ARGS;
    int err = check(a, n_cache_rows);
    if (err) return err;
    threads = threads < 1 ? 1 : threads;
    const int64_t h = a->h, r = a->r;
    const int64_t items = count_items(a);
    int64_t *nch = malloc(sizeof(int64_t) * (2 * a->t + items)), *first = nch + a->t, *token = first + a->t;
    if (!nch) return MLA_NO_MEMORY;
    plan(a, nch, first, token);
    /* scratch: m, l per item and head; acc per item of a split token; per thread: scores, alpha, rows, w */
    const int64_t ml = round16(items * h), accs = round16(items * h * r);
    const int64_t per_thread = round16(h * BLK) + round16(h) + BLK * round16(a->d) + round16(items);
    float *m = aligned_alloc(64, sizeof(float) * (2 * ml + accs + threads * per_thread));
    if (!m) { free(nch); return MLA_NO_MEMORY; }
    float *l = m + ml, *acc = l + ml, *work = acc + accs;
    #pragma omp parallel num_threads(threads)
    {
        float *mine = work + omp_get_thread_num() * per_thread;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t t = token[it], c = it - first[t], len = a->lens[t];
            float *dst = nch[t] == 1 ? a->out + t * h * r : acc + it * h * r;
            run_item(a, t, len * c / nch[t], len * (c + 1) / nch[t], dst, m + it * h, l + it * h, mine);
            if (nch[t] == 1)
                for (int64_t hd = 0; hd < h; hd++) {
                    __m256 inv = _mm256_set1_ps(1.0f / l[it * h + hd]);
                    float *o = dst + hd * r;
                    int64_t i = 0;
                    for (; i + 8 <= r; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(inv, _mm256_loadu_ps(o + i)));
                    for (; i < r; i++) o[i] /= l[it * h + hd];
                }
        }
        #pragma omp for schedule(static)
        for (int64_t th = 0; th < a->t * h; th++) {
            const int64_t t = th / h, hd = th % h, f = first[t];
            if (nch[t] > 1)
                merge(a->out + t * h * r + hd * r, m + f * h, l + f * h, acc + f * h * r, (int)nch[t], h, r, hd,
                      mine + per_thread - round16(items));
        }
    }
    free(m);
    free(nch);
    return MLA_OK;
}

#define ENTRY(NAME, CACHE_T, FORMAT, STRIDE)                                                              \
int NAME(const float *q, const CACHE_T *cache, const int64_t *rows, const int64_t *seq, const int64_t *lens, \
         float *out, int64_t t, int64_t h, int64_t r, int64_t dr, int64_t lmax, int64_t b,                \
         int64_t n_cache_rows, float scale, int threads) {                                                \
    Args a = { q, cache, rows, seq, lens, out, t, h, r, r + dr, lmax, b, scale, FORMAT, STRIDE };        \
    return dr < 0 ? MLA_BAD_ARGS : mla_decode(&a, n_cache_rows, threads);                                \
}

ENTRY(mla_decode_f32, float, CACHE_F32, 4 * (r + dr))
ENTRY(mla_decode_bf16, uint16_t, CACHE_BF16, 2 * (r + dr))
ENTRY(mla_decode_fp8, uint8_t, CACHE_FP8, r + 4 * ((r + FP8_GROUP - 1) / FP8_GROUP) + 2 * dr)
