/* A prefill's routed-expert products on AMX-BF16 tiles, as torch._grouped_mm(x, w.transpose(1, 2), offs):
 *     y[t] = w[e] @ x[t] for the rows t in [offs[e - 1], offs[e]) of x (sorted by expert), bf16 in and out,
 *     fp32 sums.
 * oneDNN (behind torch) repacks each expert's [N, K] weight into its tile layout on every call, which costs as
 * much as the multiply for the ~50 tokens an expert gets from a 512-token prefill. Here the weight is never
 * repacked: the product is computed transposed, y^T = W x^T, so that W, as stored, is the left tile operand
 * (16 rows of 32 bf16 each, read straight from the matrix with a row stride of 2K bytes), and x^T is the right
 * one, in AMX's pair-interleaved layout (xp below: rows of 16 tokens x 2 consecutive k), which the kernel packs
 * once per call from the small activation block. Tiles: 0-3 sums of 4 token blocks (16 weight rows x 16 tokens
 * each, fp32), 4 the weight rows, 5 the tokens. Each thread takes blocks of 16 weight rows of every expert, so
 * every weight element is read from memory once per call. Needs K % 32 == 0 (callers check). Only called on
 * CPUs with AMX (KernelConfig.amx). */
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "simd.h"


#define TOK 16    /* tokens per tile */
#define ROWS 16   /* weight rows per tile */
#define KT 32     /* k per tile (bf16) */
#define MB 4      /* token tiles summed per pass over a weight block */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) TileConfig;

/* Asks Linux for the AMX tile state (once per process); 0 if granted. */
int amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? 1 : 0;
}

static void configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 6; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}

/* xp for one expert: blocks [token block][k / 32] of 16 pair rows x 16 tokens x 2, zero past the m tokens. A
 * pair of consecutive k (two bf16) moves as one 32-bit word. */
static void pack_tokens(const uint16_t *x, uint16_t *xp, int64_t m, int64_t k) {
    int64_t tb = (m + TOK - 1) / TOK, kb = k / KT;
    memset(xp, 0, (size_t)(tb * kb * KT * TOK) * sizeof(uint16_t));
    const uint32_t *x2 = (const uint32_t *)x;
    uint32_t *xp2 = (uint32_t *)xp;
    for (int64_t t = 0; t < m; t++)
        for (int64_t c = 0; c < kb; c++) {
            uint32_t *block = xp2 + ((t / TOK) * kb + c) * (KT / 2) * TOK + t % TOK;
            const uint32_t *src = x2 + t * (k / 2) + c * (KT / 2);
            for (int64_t p = 0; p < KT / 2; p++) block[p * TOK] = src[p];
        }
}

/* The sum tile st [16 rows][16 tokens] into y[t][j0 + r] for the rows and tokens that exist: each token's column
 * is gathered, rounded to bf16 as f32_to_bf16 does (nearest even) and stored as one row segment. */
static void store_block(const float *st, uint16_t *y, int64_t n, int64_t j0, int64_t rows, int64_t t0, int64_t m) {
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(TOK));
    const __mmask16 keep = (__mmask16)((1u << rows) - 1);
    for (int64_t t = 0; t < TOK && t0 + t < m; t++) {
        __m512i u = _mm512_castps_si512(_mm512_i32gather_ps(column, st + t, 4));
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
        _mm256_mask_storeu_epi16(y + (t0 + t) * n + j0, keep, _mm512_cvtepi32_epi16(u));
    }
}

/* Up to MB token tiles starting at token block tb0 against weight rows w (16 rows, or a zero-padded copy). */
static void weight_block(const uint16_t *w, int64_t ldw, const uint16_t *xp, int64_t kb, int64_t tb0, int64_t ntb,
                         uint16_t *y, int64_t n, int64_t j0, int64_t rows, int64_t m, float *st, const uint16_t *next) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t c = 0; c < kb; c++) {
        if (next) /* this line of each of the next 16 rows: the stream keeps running from block to block */
            for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(next + r * ldw + c * KT), _MM_HINT_T1);
        _tile_loadd(4, w + c * KT, ldw * 2);
        const uint16_t *xb = xp + (tb0 * kb + c) * KT * TOK;
        _tile_loadd(5, xb, 64); _tile_dpbf16ps(0, 4, 5);
        if (ntb > 1) { _tile_loadd(5, xb + kb * KT * TOK, 64); _tile_dpbf16ps(1, 4, 5); }
        if (ntb > 2) { _tile_loadd(5, xb + 2 * kb * KT * TOK, 64); _tile_dpbf16ps(2, 4, 5); }
        if (ntb > 3) { _tile_loadd(5, xb + 3 * kb * KT * TOK, 64); _tile_dpbf16ps(3, 4, 5); }
    }
    _tile_stored(0, st, 64); store_block(st, y, n, j0, rows, tb0 * TOK, m);
    if (ntb > 1) { _tile_stored(1, st, 64); store_block(st, y, n, j0, rows, (tb0 + 1) * TOK, m); }
    if (ntb > 2) { _tile_stored(2, st, 64); store_block(st, y, n, j0, rows, (tb0 + 2) * TOK, m); }
    if (ntb > 3) { _tile_stored(3, st, 64); store_block(st, y, n, j0, rows, (tb0 + 3) * TOK, m); }
}

/* Rows [j0, j0 + 16) of one expert's w [N, K] for all of its m tokens; the last, partial block of rows goes
 * through pad (16 x K, zeroed past the rows). */
static void expert_rows(const uint16_t *w, const uint16_t *xp, uint16_t *y, int64_t m, int64_t n, int64_t k,
                        int64_t j0, uint16_t *pad, float *st) {
    int64_t rows = n - j0 < ROWS ? n - j0 : ROWS, tb = (m + TOK - 1) / TOK;
    const uint16_t *wb = w + j0 * k, *next = j0 + 2 * ROWS <= n ? wb + ROWS * k : NULL;
    if (rows < ROWS) {
        memset(pad, 0, (size_t)(ROWS * k) * sizeof(uint16_t));
        memcpy(pad, wb, (size_t)(rows * k) * sizeof(uint16_t));
        wb = pad;
    }
    for (int64_t t0 = 0; t0 < tb; t0 += MB)
        weight_block(wb, k, xp, k / KT, t0, tb - t0 < MB ? tb - t0 : MB, y, n, j0, rows, m, st, t0 ? NULL : next);
}

/* 0 on success; 2: out of memory; 3: bad sizes (K not a multiple of 32, offsets not ascending within T). */
int grouped_mm_amx_bf16(const uint16_t *x, const int32_t *offs, const uint16_t *w, uint16_t *y, int64_t t,
                        int64_t e, int64_t n, int64_t k, int threads) {
    if (k % KT || k < KT || n < 1 || e < 1) return 3;
    int64_t *start = malloc((size_t)(e + 1) * 2 * sizeof(int64_t)), *packed = start + e + 1, total = 0;
    if (!start) return 2;
    for (int64_t i = 0; i < e; i++) {
        start[i] = i ? offs[i - 1] : 0;
        if (offs[i] < start[i] || offs[i] > t) { free(start); return 3; }
        packed[i] = total, total += (offs[i] - start[i] + TOK - 1) / TOK * TOK * k;
    }
    start[e] = t;
    uint16_t *xp = aligned_alloc(64, (size_t)(total + 1) * sizeof(uint16_t) + 64);
    if (!xp) { free(start); return 2; }
    int failed = 0;
    _Pragma("omp parallel num_threads(threads)")
    {
        _Pragma("omp for schedule(dynamic)")
        for (int64_t i = 0; i < e; i++)
            if (offs[i] > start[i]) pack_tokens(x + start[i] * k, xp + packed[i], offs[i] - start[i], k);
        uint16_t *pad = aligned_alloc(64, (size_t)(ROWS * k) * sizeof(uint16_t));
        float *st = aligned_alloc(64, ROWS * TOK * sizeof(float));
        if (!pad || !st) {
            _Pragma("omp atomic write")
            failed = 1;
        } else {
            configure();
            for (int64_t i = 0; i < e; i++) {
                int64_t m = offs[i] - start[i];
                if (!m) continue;
                _Pragma("omp for schedule(static) nowait")
                for (int64_t j0 = 0; j0 < n; j0 += ROWS)
                    expert_rows(w + i * n * k, xp + packed[i], y + start[i] * n, m, n, k, j0, pad, st);
            }
            _tile_release();
        }
        free(pad);
        free(st);
    }
    free(xp);
    free(start);
    return failed ? 2 : 0;
}
