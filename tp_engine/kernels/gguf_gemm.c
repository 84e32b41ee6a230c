/*
 * Matmuls straight on GGUF quantized blocks (tp_engine.kernels.gguf_gemm).
 *
 * y (M, N) = x (M, K) @ W.T with W stored as ggml blocks: row n of W is
 * K / QK consecutive blocks of QB bytes (a GGUF matrix as it lies in the
 * file, so a range of output rows is a contiguous slice). Formats: Q4_0,
 * Q4_1, Q5_0, Q8_0 (32 weights a block) and Q4_K, Q5_K, Q6_K (256).
 *
 * Built twice from this one file (tp_engine/native.py compiles at first use):
 *   -DTP_GGUF_AVX2 with -mavx2 -mfma -mf16c: the fast kernels below;
 *   without: the portable C kernels only (any CPU, any compiler).
 * Both builds hold the scalar dequantizers, which repeat gguf-py's numpy
 * order of float32 operations exactly (-std=c11 turns FMA contraction off),
 * so dequantize_rows is bitwise gguf.quants.dequantize.
 *
 * AVX2 kernels. Each weight block is read once and decoded in registers,
 * in one of two modes. Dot mode (M = 1, 2: decode, where the per-weight
 * instruction count is the limit): integers -> vcvtdq2ps -> one FMA with x
 * per 8 weights into a per-sub-block sum, then one FMA with the sub-block
 * scale; minimums via per-32 sums of x (Q4_K, Q5_K, Q6_K split their bits
 * with byte operations into a small int8 staging buffer first). Scaled mode
 * (more rows of x): 8 bytes -> vpmovzxbd -> and / shift -> vcvtdq2ps -> one
 * FMA with scale and minimum (w = q * d_sub - m_sub, the weight rounded once)
 * -> one FMA per row of x. The dequantized weights of
 * RR rows of W are applied to MC rows of x while they are in registers
 * (RR * MC accumulators); more rows of x go in further chunks that re-read
 * the row from L1 (see the walk). RR rows come from RR slices of W far
 * apart, so the kernel reads RR sequential streams (one core reads DRAM
 * faster with a few streams in flight, as in cpu_gemm.c).
 *
 * Numerics: float32 weights (rounded once from the exact q * d - m), float32
 * FMA accumulation per 8-lane vector in a fixed order, then a horizontal
 * sum. Deterministic for a given plan.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef TP_GGUF_AVX2
#include <immintrin.h>
#endif

#define TP_GGUF_ABI 1
#define MAXR 4
#define MAXMC 8
#define GROUP 16 /* rows of x per pass over W */

/* ggml type ids */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

int tp_gguf_abi(void) { return TP_GGUF_ABI; }

#ifdef TP_GGUF_AVX2
int tp_gguf_is_avx2(void) { return 1; }
/* Whether this CPU runs the vector code (no vector instructions in here). */
int tp_gguf_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
int tp_gguf_is_avx2(void) { return 0; }
int tp_gguf_cpu_ok(void) { return 1; }
#endif

#define INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ scalar decode (both builds) */

/* IEEE half -> float, exact (subnormals, inf, nan included). */
__attribute__((unused)) static float f16_soft(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

INLINE float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#ifdef TP_GGUF_AVX2
    return _cvtsh_ss(h);
#else
    return f16_soft(h);
#endif
}

/* The 6-bit scales and minimums of a Q4_K / Q5_K block (12 bytes). */
INLINE void kscales(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* One block -> float32 weights, in gguf-py's order of operations. */
static void deq_q4_0(const uint8_t *b, float *y) {
    const float d = f16(b);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((b[2 + j] & 0x0F) - 8);
        y[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
    }
}

static void deq_q4_1(const uint8_t *b, float *y) {
    const float d = f16(b), m = f16(b + 2);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(b[4 + j] & 0x0F) + m;
        y[j + 16] = d * (float)(b[4 + j] >> 4) + m;
    }
}

static void deq_q5_0(const uint8_t *b, float *y) {
    const float d = f16(b);
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    for (int j = 0; j < 16; j++) {
        const int lo = (b[6 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
        const int hi = (b[6 + j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static void deq_q8_0(const uint8_t *b, float *y) {
    const float d = f16(b);
    for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
}

static void deq_q4_k(const uint8_t *b, float *y) {
    const float d = f16(b), dmin = f16(b + 2);
    uint8_t sc[8], mn[8];
    kscales(b + 4, sc, mn);
    const uint8_t *qs = b + 16;
    for (int c = 0; c < 4; c++) {
        const float d1 = d * (float)sc[2 * c], m1 = dmin * (float)mn[2 * c];
        const float d2 = d * (float)sc[2 * c + 1], m2 = dmin * (float)mn[2 * c + 1];
        for (int l = 0; l < 32; l++) {
            y[64 * c + l] = d1 * (float)(qs[32 * c + l] & 0x0F) - m1;
            y[64 * c + 32 + l] = d2 * (float)(qs[32 * c + l] >> 4) - m2;
        }
    }
}

static void deq_q5_k(const uint8_t *b, float *y) {
    const float d = f16(b), dmin = f16(b + 2);
    uint8_t sc[8], mn[8];
    kscales(b + 4, sc, mn);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int c = 0; c < 4; c++) {
        const float d1 = d * (float)sc[2 * c], m1 = dmin * (float)mn[2 * c];
        const float d2 = d * (float)sc[2 * c + 1], m2 = dmin * (float)mn[2 * c + 1];
        for (int l = 0; l < 32; l++) {
            const int lo = (qs[32 * c + l] & 0x0F) | (((qh[l] >> (2 * c)) & 1) << 4);
            const int hi = (qs[32 * c + l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
            y[64 * c + l] = d1 * (float)lo - m1;
            y[64 * c + 32 + l] = d2 * (float)hi - m2;
        }
    }
}

static void deq_q6_k(const uint8_t *b, float *y) {
    const float d = f16(b + 208);
    const int8_t *sc = (const int8_t *)(b + 192);
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
        float *yh = y + 128 * h;
        for (int l = 0; l < 32; l++) {
            const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            const int s = 8 * h + l / 16;
            yh[l] = (d * (float)sc[s]) * (float)q1;
            yh[l + 32] = (d * (float)sc[s + 2]) * (float)q2;
            yh[l + 64] = (d * (float)sc[s + 4]) * (float)q3;
            yh[l + 96] = (d * (float)sc[s + 6]) * (float)q4;
        }
    }
}

typedef void (*deq_fn)(const uint8_t *, float *);

/* elements and bytes per block, the decoder; 0 for an unknown type */
static int fmt_info(int t, int *qk, int *qb, deq_fn *deq) {
    switch (t) {
    case T_Q4_0: *qk = 32, *qb = 18, *deq = deq_q4_0; return 1;
    case T_Q4_1: *qk = 32, *qb = 20, *deq = deq_q4_1; return 1;
    case T_Q5_0: *qk = 32, *qb = 22, *deq = deq_q5_0; return 1;
    case T_Q8_0: *qk = 32, *qb = 34, *deq = deq_q8_0; return 1;
    case T_Q4_K: *qk = 256, *qb = 144, *deq = deq_q4_k; return 1;
    case T_Q5_K: *qk = 256, *qb = 176, *deq = deq_q5_k; return 1;
    case T_Q6_K: *qk = 256, *qb = 210, *deq = deq_q6_k; return 1;
    default: return 0;
    }
}

/* w: N rows of K / qk blocks -> y float32 (N, K). Returns 0, or -2 on bad arguments. */
int tp_gguf_dequant(int t, const uint8_t *w, int64_t N, int64_t K, float *y) {
    int qk, qb;
    deq_fn deq;
    if (!fmt_info(t, &qk, &qb, &deq) || N < 0 || K < 1 || K % qk) return -2;
    const int64_t nb = K / qk, rowb = nb * qb;
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++) deq(w + n * rowb + b * qb, y + n * K + b * qk);
    return 0;
}

/* ------------------------------------------------------------------ portable matmul */

/* Each block decoded once (into a 256-float buffer in L1) per group of up to
 * 16 rows of x, dotted with them in 8 independent lanes (the compiler
 * vectorises with whatever the target has; no reassociation needed). */
__attribute__((unused)) static void portable_gemm(deq_fn deq, int qk, int qb, const float *x, int64_t M, int64_t K, const uint8_t *w,
                          int64_t N, float *y) {
    const int64_t nb = K / qk, rowb = nb * qb;
    float buf[256];
    float part[GROUP][8];
    for (int64_t m0 = 0; m0 < M; m0 += GROUP) {
        const int64_t mg = M - m0 < GROUP ? M - m0 : GROUP;
        for (int64_t n = 0; n < N; n++) {
            memset(part, 0, sizeof part);
            for (int64_t b = 0; b < nb; b++) {
                deq(w + n * rowb + b * qb, buf);
                for (int64_t m = 0; m < mg; m++) {
                    const float *xm = x + (m0 + m) * K + b * qk;
                    for (int k = 0; k < qk; k += 8)
                        for (int l = 0; l < 8; l++) part[m][l] += buf[k + l] * xm[k + l];
                }
            }
            for (int64_t m = 0; m < mg; m++) {
                const float *p = part[m];
                y[(m0 + m) * N + n] = ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
            }
        }
    }
}

#ifdef TP_GGUF_AVX2
/* ------------------------------------------------------------------ AVX2 block kernels */

typedef __m256 acc_t[MAXR][MAXMC];

INLINE __m256i cvt8u(const uint8_t *p) { /* 8 bytes -> 8 int32 */
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}
#define LO4(v) _mm256_and_si256((v), _mm256_set1_epi32(0x0F))
#define HI4(v) _mm256_srli_epi32((v), 4)
#define CVT(v) _mm256_cvtepi32_ps(v)
#define XV(m, off) _mm256_loadu_ps(xb + (m) * ldx + (off))

/* Accumulator sets: with few rows of x, one FMA chain per (row of W, row of
 * x) would wait on the FMA latency (4 cycles) instead of the decode; NSETS(RR, MC)
 * independent sets (acc[r][set * MC + m]) keep 4 chains per row of W. */
#define NSETS(RR, MC) ((MC) == 1 ? ((RR) == 4 ? 2 : 4) : (MC) == 2 && (RR) < 4 ? 2 : 1)

/* acc[r][set j % NSETS][m] += w * x[m][off..off+7] for every m; j: the step's
 * index within the block (a constant after unrolling) */
#define APPLY(r, w, off, j)                                                                     \
    do {                                                                                        \
        const __m256 w_ = (w);                                                                  \
        const int s_ = ((j) % NSETS(RR, MC)) * MC;                                                  \
        _Pragma("GCC unroll 8") for (int m = 0; m < MC; m++) acc[r][s_ + m] =                   \
            _mm256_fmadd_ps(w_, XV(m, off), acc[r][s_ + m]);                                    \
    } while (0)

/* Block kernels: RR blocks (row r's at bp + r * ldr) against the matching
 * QK inputs of MC rows of x (xb, row stride ldx). The rows are done one after
 * the other (RR rows in flight are still RR memory streams); within a row the
 * decoded weights go straight from the FMA that dequantizes them into the
 * FMAs with x. */

INLINE void blk_q4_0(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     acc_t acc) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const __m256 d = _mm256_set1_ps(f16(br)), d8 = _mm256_mul_ps(d, _mm256_set1_ps(8.0f));
#pragma GCC unroll 2
        for (int s = 0; s < 2; s++) {
            const __m256i v = cvt8u(br + 2 + 8 * s);
            APPLY(r, _mm256_fmsub_ps(CVT(LO4(v)), d, d8), 8 * s, 2 * s);
            APPLY(r, _mm256_fmsub_ps(CVT(HI4(v)), d, d8), 16 + 8 * s, 2 * s + 1);
        }
    }
}

INLINE void blk_q4_1(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     acc_t acc) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const __m256 d = _mm256_set1_ps(f16(br)), mn = _mm256_set1_ps(f16(br + 2));
#pragma GCC unroll 2
        for (int s = 0; s < 2; s++) {
            const __m256i v = cvt8u(br + 4 + 8 * s);
            APPLY(r, _mm256_fmadd_ps(CVT(LO4(v)), d, mn), 8 * s, 2 * s);
            APPLY(r, _mm256_fmadd_ps(CVT(HI4(v)), d, mn), 16 + 8 * s, 2 * s + 1);
        }
    }
}

INLINE void blk_q5_0(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     acc_t acc) {
    const __m256i b4 = _mm256_set1_epi32(16);
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const __m256 d = _mm256_set1_ps(f16(br)), d16 = _mm256_mul_ps(d, _mm256_set1_ps(16.0f));
        uint32_t qh;
        memcpy(&qh, br + 2, 4);
        const __m256i hl = _mm256_set1_epi32((int)(qh << 4));  /* bit j (element j < 16) at bit 4 + j */
        const __m256i hh = _mm256_set1_epi32((int)(qh >> 12)); /* bit 16 + j at bit 4 + j */
#pragma GCC unroll 2
        for (int s = 0; s < 2; s++) {
            const __m256i sh = _mm256_setr_epi32(8 * s, 8 * s + 1, 8 * s + 2, 8 * s + 3, 8 * s + 4, 8 * s + 5,
                                                 8 * s + 6, 8 * s + 7);
            const __m256i v = cvt8u(br + 6 + 8 * s);
            const __m256i lo = _mm256_or_si256(LO4(v), _mm256_and_si256(_mm256_srlv_epi32(hl, sh), b4));
            const __m256i hi = _mm256_or_si256(HI4(v), _mm256_and_si256(_mm256_srlv_epi32(hh, sh), b4));
            APPLY(r, _mm256_fmsub_ps(CVT(lo), d, d16), 8 * s, 2 * s);
            APPLY(r, _mm256_fmsub_ps(CVT(hi), d, d16), 16 + 8 * s, 2 * s + 1);
        }
    }
}

INLINE void blk_q8_0(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     acc_t acc) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const __m256 d = _mm256_set1_ps(f16(br));
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(br + 2 + 8 * s)));
            APPLY(r, _mm256_mul_ps(CVT(q), d), 8 * s, s);
        }
    }
}

/* Q4_K / Q5_K share the layout of scales and nibbles; HB: Q5_K's fifth bits. */
INLINE void blk_k45(const int RR, const int MC, const int HB, const uint8_t *bp, int64_t ldr, const float *xb,
                    int64_t ldx, acc_t acc) {
    const int qs0 = HB ? 48 : 16;
    const __m256i b4 = _mm256_set1_epi32(16);
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const float d = f16(br), dmin = f16(br + 2);
        uint8_t sc[8], mn[8];
        kscales(br + 4, sc, mn);
#pragma GCC unroll 1
        for (int c = 0; c < 4; c++) {
            const __m256 d1 = _mm256_set1_ps(d * (float)sc[2 * c]), m1 = _mm256_set1_ps(dmin * (float)mn[2 * c]);
            const __m256 d2 = _mm256_set1_ps(d * (float)sc[2 * c + 1]);
            const __m256 m2 = _mm256_set1_ps(dmin * (float)mn[2 * c + 1]);
            /* Q5_K: bit 2c of qh[l] -> bit 4 of the low element, bit 2c + 1 -> of the high one */
            const __m128i sl = _mm_cvtsi32_si128(2 * c), sh = _mm_cvtsi32_si128(2 * c + 1);
#pragma GCC unroll 4
            for (int l = 0; l < 32; l += 8) {
                const __m256i v = cvt8u(br + qs0 + 32 * c + l);
                __m256i lo = LO4(v), hi = HI4(v);
                if (HB) {
                    const __m256i h = _mm256_slli_epi32(cvt8u(br + 16 + l), 4);
                    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_srl_epi32(h, sl), b4));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srl_epi32(h, sh), b4));
                }
                APPLY(r, _mm256_fmsub_ps(CVT(lo), d1, m1), 64 * c + l, l / 4);
                APPLY(r, _mm256_fmsub_ps(CVT(hi), d2, m2), 64 * c + 32 + l, l / 4 + 1);
            }
        }
    }
}

INLINE void blk_q4_k(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     acc_t acc) {
    blk_k45(RR, MC, 0, bp, ldr, xb, ldx, acc);
}

INLINE void blk_q5_k(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     acc_t acc) {
    blk_k45(RR, MC, 1, bp, ldr, xb, ldx, acc);
}

INLINE void blk_q6_k(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     acc_t acc) {
    const __m256i m30 = _mm256_set1_epi32(0x30);
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const float d = f16(br + 208);
        const int8_t *sc = (const int8_t *)(br + 192);
        /* per 16 inputs s: w = q * ds - 32 ds (ds = d * sc[s]; 32 ds is exact) */
#pragma GCC unroll 1
        for (int h = 0; h < 2; h++) {
#pragma GCC unroll 2
            for (int l = 0; l < 32; l += 16) {
                const int s = 8 * h + l / 16;
                const float f1 = d * (float)sc[s], f2 = d * (float)sc[s + 2], f3 = d * (float)sc[s + 4],
                            f4 = d * (float)sc[s + 6];
                const __m256 s1 = _mm256_set1_ps(f1), s2 = _mm256_set1_ps(f2), s3 = _mm256_set1_ps(f3),
                             s4 = _mm256_set1_ps(f4);
                const __m256 o1 = _mm256_set1_ps(32.0f * f1), o2 = _mm256_set1_ps(32.0f * f2),
                             o3 = _mm256_set1_ps(32.0f * f3), o4 = _mm256_set1_ps(32.0f * f4);
#pragma GCC unroll 2
                for (int e = l; e < l + 16; e += 8) {
                    const __m256i hq = cvt8u(br + 128 + 32 * h + e);
                    const __m256i a = cvt8u(br + 64 * h + e), b = cvt8u(br + 64 * h + 32 + e);
                    const __m256i q1 = _mm256_or_si256(LO4(a), _mm256_and_si256(_mm256_slli_epi32(hq, 4), m30));
                    const __m256i q2 = _mm256_or_si256(LO4(b), _mm256_and_si256(_mm256_slli_epi32(hq, 2), m30));
                    const __m256i q3 = _mm256_or_si256(HI4(a), _mm256_and_si256(hq, m30));
                    const __m256i q4 = _mm256_or_si256(HI4(b), _mm256_and_si256(_mm256_srli_epi32(hq, 2), m30));
                    APPLY(r, _mm256_fmsub_ps(CVT(q1), s1, o1), 128 * h + e, 0);
                    APPLY(r, _mm256_fmsub_ps(CVT(q2), s2, o2), 128 * h + 32 + e, 1);
                    APPLY(r, _mm256_fmsub_ps(CVT(q3), s3, o3), 128 * h + 64 + e, 2);
                    APPLY(r, _mm256_fmsub_ps(CVT(q4), s4, o4), 128 * h + 96 + e, 3);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ AVX2 dot-mode block kernels */

/* With few accumulators (RR * MC <= 4, MC <= 2: decode, M = 1 or 2) the
 * per-weight work is the limit, so the scale leaves the inner loop: per
 * sub-block the sums x . q over the stored integers (one convert and one FMA
 * per 8 weights), then one FMA adds scale * sum to the row's total (two
 * total sets, acc[r][m] and acc[r][MC + m]); minimums (Q4_1, Q4_K, Q5_K) come
 * from sums of x over each 32 inputs (sx, computed once per call), offsets
 * (Q4_0, Q5_0, Q6_K) are subtracted from the integers. */
#define DOTMODE(RR, MC) ((RR) * (MC) <= 4 && (MC) <= 2)

#define DOT(a, qi, off)                                                                       \
    do {                                                                                      \
        const __m256 qf_ = CVT(qi);                                                           \
        _Pragma("GCC unroll 2") for (int m = 0; m < MC; m++) a[m] =                           \
            _mm256_fmadd_ps(qf_, XV(m, off), a[m]);                                           \
    } while (0)
#define TOT(r, set, sv, a)                                                                    \
    do {                                                                                      \
        const __m256 sv_ = (sv);                                                              \
        _Pragma("GCC unroll 2") for (int m = 0; m < MC; m++) acc[r][(set) * MC + m] =         \
            _mm256_fmadd_ps(sv_, a[m], acc[r][(set) * MC + m]);                               \
    } while (0)
#define ZERO(a) _Pragma("GCC unroll 2") for (int m = 0; m < MC; m++) a[m] = _mm256_setzero_ps()

/* Q4_0, Q4_1, Q5_0: 32 weights, lo / hi nibbles of 16 bytes at QS; Q5_0's
 * fifth bits; OFF subtracted from the integers; MIN: Q4_1's minimum. */
INLINE void dot_q4x(const int RR, const int MC, const int QS, const int HB, const int OFF, const int MIN,
                    const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx, const float *sxb, int64_t ldsx,
                    acc_t acc, float corr[MAXR][MAXMC]) {
    const __m256i off = _mm256_set1_epi32(OFF), b4 = _mm256_set1_epi32(16);
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        __m256 alo[MAXMC], ahi[MAXMC];
        ZERO(alo);
        ZERO(ahi);
        __m256i hl = b4, hh = b4;
        if (HB) {
            uint32_t qh;
            memcpy(&qh, br + 2, 4);
            hl = _mm256_set1_epi32((int)(qh << 4));
            hh = _mm256_set1_epi32((int)(qh >> 12));
        }
#pragma GCC unroll 2
        for (int s = 0; s < 2; s++) {
            const __m256i v = cvt8u(br + QS + 8 * s);
            __m256i lo = LO4(v), hi = HI4(v);
            if (HB) {
                const __m256i sh = _mm256_setr_epi32(8 * s, 8 * s + 1, 8 * s + 2, 8 * s + 3, 8 * s + 4, 8 * s + 5,
                                                     8 * s + 6, 8 * s + 7);
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_srlv_epi32(hl, sh), b4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srlv_epi32(hh, sh), b4));
            }
            if (OFF) {
                lo = _mm256_sub_epi32(lo, off);
                hi = _mm256_sub_epi32(hi, off);
            }
            DOT(alo, lo, 8 * s);
            DOT(ahi, hi, 16 + 8 * s);
        }
        const __m256 d = _mm256_set1_ps(f16(br));
        TOT(r, 0, d, alo);
        TOT(r, 1, d, ahi);
        if (MIN) {
            const float mn = f16(br + 2);
            for (int m = 0; m < MC; m++) corr[r][m] += mn * sxb[m * ldsx];
        }
    }
}

INLINE void dot_q4_0(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     const float *sxb, int64_t ldsx, acc_t acc, float corr[MAXR][MAXMC]) {
    dot_q4x(RR, MC, 2, 0, 8, 0, bp, ldr, xb, ldx, sxb, ldsx, acc, corr);
}
INLINE void dot_q4_1(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     const float *sxb, int64_t ldsx, acc_t acc, float corr[MAXR][MAXMC]) {
    dot_q4x(RR, MC, 4, 0, 0, 1, bp, ldr, xb, ldx, sxb, ldsx, acc, corr);
}
INLINE void dot_q5_0(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     const float *sxb, int64_t ldsx, acc_t acc, float corr[MAXR][MAXMC]) {
    dot_q4x(RR, MC, 6, 1, 16, 0, bp, ldr, xb, ldx, sxb, ldsx, acc, corr);
}

INLINE void dot_q8_0(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     const float *sxb, int64_t ldsx, acc_t acc, float corr[MAXR][MAXMC]) {
    (void)sxb, (void)ldsx, (void)corr;
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        __m256 a0[MAXMC], a1[MAXMC];
        ZERO(a0);
        ZERO(a1);
#pragma GCC unroll 2
        for (int s = 0; s < 4; s += 2) {
            DOT(a0, _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(br + 2 + 8 * s))), 8 * s);
            DOT(a1, _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(br + 10 + 8 * s))), 8 * s + 8);
        }
        const __m256 d = _mm256_set1_ps(f16(br));
        TOT(r, 0, d, a0);
        TOT(r, 1, d, a1);
    }
}

/* Q4_K / Q5_K: per 64 weights the nibbles (and fifth bits) are split with
 * byte operations into a 64-byte staging buffer in L1, then widened 8 at a
 * time (as for Q6_K: a quarter of the integer work of 32-bit lanes). */
INLINE void dot_k45(const int RR, const int MC, const int HB, const uint8_t *bp, int64_t ldr, const float *xb,
                    int64_t ldx, const float *sxb, int64_t ldsx, acc_t acc) {
    const int qs0 = HB ? 48 : 16;
    const __m256i m0f = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    uint8_t q[64] __attribute__((aligned(32)));
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const float d = f16(br);
        uint8_t sc[8], mn[8];
        kscales(br + 4, sc, mn);
        const __m256i qh = HB ? _mm256_loadu_si256((const __m256i *)(br + 16)) : b4;
#pragma GCC unroll 1
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(br + qs0 + 32 * c));
            __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
            if (HB) { /* bit 2c of qh[l] -> bit 4 of the low element, bit 2c + 1 -> of the high one
                       * (16-bit shifts by at most 4: no wanted bit leaves its lane or crosses a byte) */
                const int sl = 4 - 2 * c, sh = 3 - 2 * c;
                const __m256i hl = sl >= 0 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(sl))
                                           : _mm256_srl_epi16(qh, _mm_cvtsi32_si128(-sl));
                const __m256i hh = sh >= 0 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(sh))
                                           : _mm256_srl_epi16(qh, _mm_cvtsi32_si128(-sh));
                lo = _mm256_or_si256(lo, _mm256_and_si256(hl, b4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(hh, b4));
            }
            _mm256_store_si256((__m256i *)q, lo);
            _mm256_store_si256((__m256i *)(q + 32), hi);
            __m256 alo[MAXMC], ahi[MAXMC];
            ZERO(alo);
            ZERO(ahi);
#pragma GCC unroll 4
            for (int l = 0; l < 32; l += 8) {
                DOT(alo, cvt8u(q + l), 64 * c + l);
                DOT(ahi, cvt8u(q + 32 + l), 64 * c + 32 + l);
            }
            TOT(r, 0, _mm256_set1_ps(d * (float)sc[2 * c]), alo);
            TOT(r, 1, _mm256_set1_ps(d * (float)sc[2 * c + 1]), ahi);
        }
        /* minus dmin * mn[j] * (sum of x over sub-block j), the 8 sub-blocks in the 8 lanes */
        uint64_t mn8;
        memcpy(&mn8, mn, 8);
        const __m256 dm = _mm256_mul_ps(_mm256_set1_ps(f16(br + 2)),
                                        CVT(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn8))));
        for (int m = 0; m < MC; m++) acc[r][m] = _mm256_fnmadd_ps(dm, _mm256_loadu_ps(sxb + m * ldsx), acc[r][m]);
    }
}

INLINE void dot_q4_k(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     const float *sxb, int64_t ldsx, acc_t acc, float corr[MAXR][MAXMC]) {
    (void)corr;
    dot_k45(RR, MC, 0, bp, ldr, xb, ldx, sxb, ldsx, acc);
}
INLINE void dot_q5_k(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     const float *sxb, int64_t ldsx, acc_t acc, float corr[MAXR][MAXMC]) {
    (void)corr;
    dot_k45(RR, MC, 1, bp, ldr, xb, ldx, sxb, ldsx, acc);
}

/* Q6_K: the 6-bit values of 128 weights are put together 32 at a time with
 * byte operations, less 32, into a 128-byte int8 staging buffer (L1, written
 * and read back at once): a quarter of the integer work of doing it 8 at a
 * time in 32-bit lanes, which was the limit. */
INLINE void dot_q6_k(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     const float *sxb, int64_t ldsx, acc_t acc, float corr[MAXR][MAXMC]) {
    (void)sxb, (void)ldsx, (void)corr;
    const __m256i m0f = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30), o32 = _mm256_set1_epi8(32);
    int8_t q[128] __attribute__((aligned(32)));
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const float d = f16(br + 208);
        const int8_t *sc = (const int8_t *)(br + 192);
#pragma GCC unroll 1
        for (int h = 0; h < 2; h++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(br + 64 * h));
            const __m256i b = _mm256_loadu_si256((const __m256i *)(br + 64 * h + 32));
            const __m256i hq = _mm256_loadu_si256((const __m256i *)(br + 128 + 32 * h));
            /* elements l, l + 32, l + 64, l + 96 of the half (16-bit shifts; the masks drop what crossed bytes) */
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(a, m0f), _mm256_and_si256(_mm256_slli_epi16(hq, 4), m30));
            const __m256i q2 = _mm256_or_si256(_mm256_and_si256(b, m0f), _mm256_and_si256(_mm256_slli_epi16(hq, 2), m30));
            const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m0f), _mm256_and_si256(hq, m30));
            const __m256i q4 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), m0f),
                                               _mm256_and_si256(_mm256_srli_epi16(hq, 2), m30));
            _mm256_store_si256((__m256i *)(q + 0), _mm256_sub_epi8(q1, o32));
            _mm256_store_si256((__m256i *)(q + 32), _mm256_sub_epi8(q2, o32));
            _mm256_store_si256((__m256i *)(q + 64), _mm256_sub_epi8(q3, o32));
            _mm256_store_si256((__m256i *)(q + 96), _mm256_sub_epi8(q4, o32));
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) { /* 16 weights of one scale */
                __m256 a0[MAXMC], a1[MAXMC];
                ZERO(a0);
                ZERO(a1);
                DOT(a0, _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16 * g))), 128 * h + 16 * g);
                DOT(a1, _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16 * g + 8))), 128 * h + 16 * g + 8);
                const __m256 sv = _mm256_set1_ps(d * (float)sc[8 * h + g]);
                TOT(r, g & 1, sv, a0);
                TOT(r, g & 1, sv, a1);
            }
        }
    }
}

/* ------------------------------------------------------------------ AVX2 rows and instantiation */

INLINE float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows i0..i1-1 of each of RR slices (slice r starts seg rows after slice r - 1)
 * against MC rows of x; y[m * ldy + i + r * seg]. sx: the sums of x over each
 * 32 inputs (row stride ldsx; used by the dot-mode kernels of Q4_1, Q4_K, Q5_K). */
typedef void (*rows_fn)(const uint8_t *w, int64_t rowb, int64_t nb, int64_t seg, int64_t i0, int64_t i1,
                        const float *x, int64_t ldx, const float *sx, int64_t ldsx, float *y, int64_t ldy);

#define DEF_ROWS(FMT, QK, QB, RR, MC)                                                                       \
    static void FMT##_##RR##_##MC(const uint8_t *w, int64_t rowb, int64_t nb, int64_t seg, int64_t i0,      \
                                  int64_t i1, const float *x, int64_t ldx, const float *sx, int64_t ldsx,   \
                                  float *y, int64_t ldy) {                                                  \
        const int64_t ldr = seg * rowb;                                                                     \
        const int dot = DOTMODE(RR, MC), sets = dot ? 2 : NSETS(RR, MC);                                    \
        for (int64_t i = i0; i < i1; i++) {                                                                 \
            const uint8_t *wi = w + i * rowb;                                                               \
            acc_t acc;                                                                                      \
            float corr[MAXR][MAXMC] = {{0}};                                                                \
            for (int r = 0; r < RR; r++)                                                                    \
                for (int m = 0; m < MC * sets; m++) acc[r][m] = _mm256_setzero_ps();                        \
            if (dot)                                                                                        \
                for (int64_t b = 0; b < nb; b++)                                                            \
                    dot_##FMT(RR, MC, wi + b * QB, ldr, x + b * QK, ldx, sx + b * (QK / 32), ldsx, acc, corr); \
            else                                                                                            \
                for (int64_t b = 0; b < nb; b++) blk_##FMT(RR, MC, wi + b * QB, ldr, x + b * QK, ldx, acc); \
            for (int r = 0; r < RR; r++)                                                                    \
                for (int m = 0; m < MC; m++) {                                                              \
                    __m256 a = acc[r][m];                                                                   \
                    if (sets == 2) a = _mm256_add_ps(a, acc[r][MC + m]);                                    \
                    if (sets == 4)                                                                          \
                        a = _mm256_add_ps(_mm256_add_ps(a, acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])); \
                    y[m * ldy + i + r * seg] = hsum8(a) + corr[r][m];                                       \
                }                                                                                           \
        }                                                                                                   \
    }

/* Instantiated plans (RR, MC): the accumulators and decoded weights fit the
 * 16 vector registers. */
#define DEF_FMT(FMT, QK, QB)                                                                                     \
    DEF_ROWS(FMT, QK, QB, 4, 1) DEF_ROWS(FMT, QK, QB, 4, 2) DEF_ROWS(FMT, QK, QB, 2, 1)                         \
    DEF_ROWS(FMT, QK, QB, 2, 2) DEF_ROWS(FMT, QK, QB, 2, 3) DEF_ROWS(FMT, QK, QB, 2, 4)                         \
    DEF_ROWS(FMT, QK, QB, 1, 1) DEF_ROWS(FMT, QK, QB, 1, 2) DEF_ROWS(FMT, QK, QB, 1, 3)                         \
    DEF_ROWS(FMT, QK, QB, 1, 4) DEF_ROWS(FMT, QK, QB, 1, 5) DEF_ROWS(FMT, QK, QB, 1, 6)                         \
    DEF_ROWS(FMT, QK, QB, 1, 7) DEF_ROWS(FMT, QK, QB, 1, 8)                                                      \
    static const rows_fn FMT##_tab[3][MAXMC] = {                                                                 \
        {FMT##_1_1, FMT##_1_2, FMT##_1_3, FMT##_1_4, FMT##_1_5, FMT##_1_6, FMT##_1_7, FMT##_1_8},                \
        {FMT##_2_1, FMT##_2_2, FMT##_2_3, FMT##_2_4, 0, 0, 0, 0},                                                \
        {FMT##_4_1, FMT##_4_2, 0, 0, 0, 0, 0, 0}};

DEF_FMT(q4_0, 32, 18)
DEF_FMT(q4_1, 32, 20)
DEF_FMT(q5_0, 32, 22)
DEF_FMT(q8_0, 32, 34)
DEF_FMT(q4_k, 256, 144)
DEF_FMT(q5_k, 256, 176)
DEF_FMT(q6_k, 256, 210)

static const rows_fn (*avx2_tab(int t))[MAXMC] {
    switch (t) {
    case T_Q4_0: return q4_0_tab;
    case T_Q4_1: return q4_1_tab;
    case T_Q5_0: return q5_0_tab;
    case T_Q8_0: return q8_0_tab;
    case T_Q4_K: return q4_k_tab;
    case T_Q5_K: return q5_k_tab;
    case T_Q6_K: return q6_k_tab;
    default: return 0;
    }
}

static int rr_index(int rr) { return rr == 1 ? 0 : rr == 2 ? 1 : rr == 4 ? 2 : -1; }

/* One group of mg <= 16 rows of x. W is cut into R slices of seg rows (plus
 * N - R * seg rows left over, done by the RR = 1 kernels); the rows of x into
 * balanced chunks of at most mc. One chunk: one pass. Several: row by row,
 * every chunk in turn, so a row of W comes from memory once and the later
 * chunks find it in L1. */
static void avx2_group(const rows_fn (*tab)[MAXMC], int qk, int qb, const float *x, int64_t mg, int64_t K,
                       const float *sx, const uint8_t *w, int64_t N, float *y, int rr, int mc) {
    const int64_t ls = K / 32;
    const int64_t nb = K / qk, rowb = nb * qb;
    int nc = (int)((mg + mc - 1) / mc), cs[GROUP], cn[GROUP], m0 = 0;
    for (int c = 0; c < nc; c++) {
        cs[c] = m0;
        cn[c] = (int)(mg / nc) + (c < mg % nc);
        m0 += cn[c];
    }
    int R = rr;
    while (R > 1 && N < R) R >>= 1;
    const int64_t seg = N / R, n0 = R * seg;
    const int ri = rr_index(R);
    if (nc == 1) {
        tab[ri][cn[0] - 1](w, rowb, nb, seg, 0, seg, x, K, sx, ls, y, N);
    } else {
        for (int64_t i = 0; i < seg; i++)
            for (int c = 0; c < nc; c++) tab[ri][cn[c] - 1](w, rowb, nb, seg, i, i + 1, x + cs[c] * K, K, sx + cs[c] * ls, ls, y + cs[c] * N, N);
    }
    if (n0 < N)
        for (int c = 0; c < nc; c++)
            tab[0][cn[c] - 1](w + n0 * rowb, rowb, nb, 1, 0, N - n0, x + cs[c] * K, K, sx + cs[c] * ls, ls,
                              y + cs[c] * N + n0, N);
}
#endif /* TP_GGUF_AVX2 */

/* y (M, N) = x (M, K) @ dequant(w).T, w: N rows of K / qk blocks of type t.
 * rr, mc: the AVX2 plan (rows of W, rows of x per kernel; ignored by the
 * portable build). Returns 0, -1 out of memory, -2 bad arguments / a plan not built. */
int tp_gguf_gemm(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int rr,
                 int mc) {
    int qk, qb;
    deq_fn deq;
    if (!fmt_info(t, &qk, &qb, &deq) || M < 1 || N < 1 || K < 1 || K % qk) return -2;
#ifdef TP_GGUF_AVX2
    const rows_fn (*tab)[MAXMC] = avx2_tab(t);
    const int ri = rr_index(rr);
    if (ri < 0 || mc < 1 || mc > MAXMC || !tab[ri][mc - 1]) return -2;
    for (int r = rr; r >= 1; r >>= 1) /* smaller R (tiny N) must have the chunk sizes too */
        for (int c = 1; c <= mc; c++)
            if (!tab[rr_index(r)][c - 1]) return -2;
    /* sums of x over each 32 inputs (eight lanes side by side, then across) */
    const int64_t ls = K / 32;
    float *sx = (float *)malloc((size_t)(M * ls) * sizeof(float));
    if (!sx) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ls; g++) {
            const float *p = x + m * K + 32 * g;
            const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                           _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
            sx[m * ls + g] = hsum8(s);
        }
    for (int64_t m0 = 0; m0 < M; m0 += GROUP) {
        const int64_t mg = M - m0 < GROUP ? M - m0 : GROUP;
        avx2_group(tab, qk, qb, x + m0 * K, mg, K, sx + m0 * ls, w, N, y + m0 * N, rr, mc);
    }
    free(sx);
#else
    (void)rr;
    (void)mc;
    portable_gemm(deq, qk, qb, x, M, K, w, N, y);
#endif
    return 0;
}
