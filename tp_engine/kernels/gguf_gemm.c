/*
 * Matmuls straight on GGUF quantized blocks (tp_engine.kernels.gguf_gemm).
 *
 * y (M, N) = x (M, K) @ W.T with W stored as ggml blocks: row n of W is
 * K / QK consecutive blocks of QB bytes (a GGUF matrix as it lies in the
 * file, so a range of output rows is a contiguous slice). Formats: Q4_0,
 * Q4_1, Q5_0, Q8_0 (32 weights a block) and Q4_K, Q5_K, Q6_K (256).
 *
 * Built from this one file (tp_engine/native.py compiles at first use):
 *   -DTP_GGUF_AVX2 with -mavx2 -mfma -mf16c: the fast kernels below;
 *   -DTP_GGUF_AVX2 -DTP_GGUF_AVX512 with AVX-512 F/BW/VL/DQ/VNNI too: the
 *   same, with 512-bit kernels for Q4_K / Q5_K / Q6_K: int8 activations
 *   from gguf_avx512.h (vpmaddubsw + VNNI vpdpwssd; bitwise the AVX2
 *   results), float32 dot mode (M = 1) from gguf_avx512_f32.h (16 lanes:
 *   within float32 rounding, not bitwise AVX2's); chosen at run time where
 *   the CPU has them (gguf_gemm.py);
 *   -DTP_GGUF_NEON on AArch64: the NEON kernels of gguf_neon.h (same row
 *   kernel signatures and tables, run by the same walk and thread split);
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
 * sum. Deterministic for a given plan, and bitwise the same for any number
 * of threads: the threads of tp_engine/kernels/pool.c split the output rows
 * into contiguous ranges, and the mode of every row is the plan's, whatever
 * range (and RR) the row falls in.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef TP_GGUF_AVX2
#include <immintrin.h>
#endif

#define TP_GGUF_ABI 4
#define MAXR 4
#define MAXMC 8
#define GROUP 16 /* rows of x per pass over W */

/* ggml type ids */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

int tp_gguf_abi(void) { return TP_GGUF_ABI; }

#if defined(TP_GGUF_AVX512) && !defined(TP_GGUF_AVX2)
#error "TP_GGUF_AVX512 is the AVX2 build plus gguf_avx512.h: define both"
#endif
#ifdef TP_GGUF_AVX2
/* 1: the AVX2 build, 2: the AVX-512 build (-DTP_GGUF_AVX512 too) */
int tp_gguf_is_avx2(void) {
#ifdef TP_GGUF_AVX512
    return 2;
#else
    return 1;
#endif
}
/* Whether this CPU runs the vector code (no vector instructions in here). */
int tp_gguf_cpu_ok(void) {
    __builtin_cpu_init();
    int ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifdef TP_GGUF_AVX512
    ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
#endif
    return ok;
}
#else
int tp_gguf_is_avx2(void) { return 0; }
int tp_gguf_cpu_ok(void) { return 1; }
#endif
#ifdef TP_GGUF_NEON
int tp_gguf_is_neon(void); /* 1: the NEON kernels, 2: with sdot (gguf_neon.h) */
#else
int tp_gguf_is_neon(void) { return 0; }
#endif
#if defined(TP_GGUF_AVX2) || defined(TP_GGUF_NEON)
#define TP_GGUF_VEC /* vector row kernels, and the walk below that runs them */
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
#elif defined(TP_GGUF_NEON)
    __fp16 f; /* fcvt: exact, as f16_soft */
    memcpy(&f, &h, 2);
    return (float)f;
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

/* kscales with 32-bit integer operations (llama.cpp's masks): the 8 scales and
 * 8 minimums as the bytes of two uint64 (byte j: sub-block j). The vector
 * kernels use this: byte by byte (kscales), then packed or broadcast one at a
 * time, the compiler spent ~100 scalar instructions a block on them. */
__attribute__((unused)) INLINE void kscales64(const uint8_t *s, uint64_t *sc8, uint64_t *mn8) {
    const uint32_t k1 = 0x3F3F3F3F, k2 = 0x0F0F0F0F, k3 = 0x03030303;
    uint32_t u[3];
    memcpy(u, s, 12);
    *sc8 = (uint64_t)(u[0] & k1) | (uint64_t)((u[2] & k2) | (((u[0] >> 6) & k3) << 4)) << 32;
    *mn8 = (uint64_t)(u[1] & k1) | (uint64_t)(((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4)) << 32;
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

/* ------------------------------------------------------------------ portable matmul */

/* Each block decoded once (into a 256-float buffer in L1) per group of up to
 * 16 rows of x, dotted with them in 8 independent lanes (the compiler
 * vectorises with whatever the target has; no reassociation needed). N rows
 * of w; y's rows ldy apart. */
static void portable_gemm(deq_fn deq, int qk, int qb, const float *x, int64_t M, int64_t K, const uint8_t *w,
                          int64_t N, int64_t ldy, float *y) {
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
                y[(m0 + m) * ldy + n] = ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
            }
        }
    }
}

#ifdef TP_GGUF_NEON
#include "gguf_neon.h"
#endif

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

/* acc[r][m] += w * x[m][off..off+7] for every m. One accumulator per (row of
 * W, row of x): this scaled mode runs where the dot mode does not (RR * MC
 * > 4 or MC > 2: enough independent FMA chains), and on the rows a thread
 * has left over after its RR slices under such a plan (see avx2_range). */
#define APPLY(r, w, off)                                                                        \
    do {                                                                                        \
        const __m256 w_ = (w);                                                                  \
        _Pragma("GCC unroll 8") for (int m = 0; m < MC; m++) acc[r][m] =                        \
            _mm256_fmadd_ps(w_, XV(m, off), acc[r][m]);                                         \
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
            APPLY(r, _mm256_fmsub_ps(CVT(LO4(v)), d, d8), 8 * s);
            APPLY(r, _mm256_fmsub_ps(CVT(HI4(v)), d, d8), 16 + 8 * s);
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
            APPLY(r, _mm256_fmadd_ps(CVT(LO4(v)), d, mn), 8 * s);
            APPLY(r, _mm256_fmadd_ps(CVT(HI4(v)), d, mn), 16 + 8 * s);
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
            APPLY(r, _mm256_fmsub_ps(CVT(lo), d, d16), 8 * s);
            APPLY(r, _mm256_fmsub_ps(CVT(hi), d, d16), 16 + 8 * s);
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
            APPLY(r, _mm256_mul_ps(CVT(q), d), 8 * s);
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
                APPLY(r, _mm256_fmsub_ps(CVT(lo), d1, m1), 64 * c + l);
                APPLY(r, _mm256_fmsub_ps(CVT(hi), d2, m2), 64 * c + 32 + l);
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
                    APPLY(r, _mm256_fmsub_ps(CVT(q1), s1, o1), 128 * h + e);
                    APPLY(r, _mm256_fmsub_ps(CVT(q2), s2, o2), 128 * h + 32 + e);
                    APPLY(r, _mm256_fmsub_ps(CVT(q3), s3, o3), 128 * h + 64 + e);
                    APPLY(r, _mm256_fmsub_ps(CVT(q4), s4, o4), 128 * h + 96 + e);
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

#ifdef TP_GGUF_AVX512
#include "gguf_avx512_f32.h" /* dot_k45 and dot_q6_k on 512-bit vectors */
#else
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
        uint64_t sc8, mn8;
        kscales64(br + 4, &sc8, &mn8);
        /* d * scale of the 8 sub-blocks in 8 lanes (the same float products as one at a time) */
        const __m256 dsc = _mm256_mul_ps(_mm256_set1_ps(f16(br)),
                                         CVT(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc8))));
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
            TOT(r, 0, _mm256_permutevar8x32_ps(dsc, _mm256_set1_epi32(2 * c)), alo);
            TOT(r, 1, _mm256_permutevar8x32_ps(dsc, _mm256_set1_epi32(2 * c + 1)), ahi);
        }
        /* minus dmin * mn[j] * (sum of x over sub-block j), the 8 sub-blocks in the 8 lanes */
        const __m256 dm = _mm256_mul_ps(_mm256_set1_ps(f16(br + 2)),
                                        CVT(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn8))));
        for (int m = 0; m < MC; m++) acc[r][m] = _mm256_fnmadd_ps(dm, _mm256_loadu_ps(sxb + m * ldsx), acc[r][m]);
    }
}

#endif /* !TP_GGUF_AVX512 */

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

#ifndef TP_GGUF_AVX512 /* gguf_avx512_f32.h has its own */
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

#endif /* !TP_GGUF_AVX512 */

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

/* DOT: dot mode (else scaled mode), chosen by the plan (DOTMODE of the
 * plan's rows of W and the chunk's rows of x), not by RR: see avx2_range. */
#define DEF_ROWS(FMT, QK, QB, RR, MC, DOT)                                                                  \
    static void FMT##_##RR##_##MC##_##DOT(const uint8_t *w, int64_t rowb, int64_t nb, int64_t seg,          \
                                          int64_t i0, int64_t i1, const float *x, int64_t ldx,              \
                                          const float *sx, int64_t ldsx, float *y, int64_t ldy) {           \
        const int64_t ldr = seg * rowb;                                                                     \
        const int sets = DOT ? 2 : 1;                                                                       \
        for (int64_t i = i0; i < i1; i++) {                                                                 \
            const uint8_t *wi = w + i * rowb;                                                               \
            acc_t acc;                                                                                      \
            float corr[MAXR][MAXMC] = {{0}};                                                                \
            for (int r = 0; r < RR; r++)                                                                    \
                for (int m = 0; m < MC * sets; m++) acc[r][m] = _mm256_setzero_ps();                        \
            if (DOT)                                                                                        \
                for (int64_t b = 0; b < nb; b++)                                                            \
                    dot_##FMT(RR, MC, wi + b * QB, ldr, x + b * QK, ldx, sx + b * (QK / 32), ldsx, acc, corr); \
            else                                                                                            \
                for (int64_t b = 0; b < nb; b++) blk_##FMT(RR, MC, wi + b * QB, ldr, x + b * QK, ldx, acc); \
            for (int r = 0; r < RR; r++)                                                                    \
                for (int m = 0; m < MC; m++) {                                                              \
                    __m256 a = acc[r][m];                                                                   \
                    if (sets == 2) a = _mm256_add_ps(a, acc[r][MC + m]);                                    \
                    y[m * ldy + i + r * seg] = hsum8(a) + corr[r][m];                                       \
                }                                                                                           \
        }                                                                                                   \
    }

/* Instantiated (RR, MC): the accumulators and decoded weights fit the 16
 * vector registers. Dot mode for RR * MC <= 4, MC <= 2; scaled mode for the
 * plans (4, 2), (2, 3..4), (1, 3..8), and (1, 2), (2, 2) for the rows a
 * thread has left over under plan (4, 2). */
#define DEF_FMT(FMT, QK, QB)                                                                                     \
    DEF_ROWS(FMT, QK, QB, 4, 1, 1) DEF_ROWS(FMT, QK, QB, 2, 1, 1) DEF_ROWS(FMT, QK, QB, 1, 1, 1)                \
    DEF_ROWS(FMT, QK, QB, 2, 2, 1) DEF_ROWS(FMT, QK, QB, 1, 2, 1)                                               \
    DEF_ROWS(FMT, QK, QB, 4, 2, 0) DEF_ROWS(FMT, QK, QB, 2, 2, 0) DEF_ROWS(FMT, QK, QB, 1, 2, 0)                \
    DEF_ROWS(FMT, QK, QB, 2, 3, 0) DEF_ROWS(FMT, QK, QB, 2, 4, 0)                                               \
    DEF_ROWS(FMT, QK, QB, 1, 3, 0) DEF_ROWS(FMT, QK, QB, 1, 4, 0) DEF_ROWS(FMT, QK, QB, 1, 5, 0)                \
    DEF_ROWS(FMT, QK, QB, 1, 6, 0) DEF_ROWS(FMT, QK, QB, 1, 7, 0) DEF_ROWS(FMT, QK, QB, 1, 8, 0)                \
    static const rows_fn FMT##_tab[2][3][MAXMC] = {                                                              \
        {{0, FMT##_1_2_0, FMT##_1_3_0, FMT##_1_4_0, FMT##_1_5_0, FMT##_1_6_0, FMT##_1_7_0, FMT##_1_8_0},         \
         {0, FMT##_2_2_0, FMT##_2_3_0, FMT##_2_4_0, 0, 0, 0, 0},                                                 \
         {0, FMT##_4_2_0, 0, 0, 0, 0, 0, 0}},                                                                    \
        {{FMT##_1_1_1, FMT##_1_2_1, 0, 0, 0, 0, 0, 0},                                                           \
         {FMT##_2_1_1, FMT##_2_2_1, 0, 0, 0, 0, 0, 0},                                                           \
         {FMT##_4_1_1, 0, 0, 0, 0, 0, 0, 0}}};

DEF_FMT(q4_0, 32, 18)
DEF_FMT(q4_1, 32, 20)
DEF_FMT(q5_0, 32, 22)
DEF_FMT(q8_0, 32, 34)
DEF_FMT(q4_k, 256, 144)
DEF_FMT(q5_k, 256, 176)
DEF_FMT(q6_k, 256, 210)

typedef const rows_fn (*avx2_tab_t)[3][MAXMC]; /* [dot mode][log2(RR)][MC - 1] */

static avx2_tab_t avx2_tab(int t) {
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

/* sums of x over each 32 inputs (eight lanes side by side, then across) */
static void avx2_sums32(const float *x, int64_t M, int64_t K, float *sx) {
    const int64_t ls = K / 32;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ls; g++) {
            const float *p = x + m * K + 32 * g;
            const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                           _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
            sx[m * ls + g] = hsum8(s);
        }
}

/* The names the walk and entry points below use for the vector build's
 * kernels (gguf_neon.h gives them for NEON). */
typedef avx2_tab_t vec_tab_t;
#define vec_tab avx2_tab
#define vec_sums32 avx2_sums32
#define vec_i8_tab i8_tab
#define vec_quantize_x quantize_x_avx2
#endif /* TP_GGUF_AVX2 */

__attribute__((unused)) static int rr_index(int rr) { return rr == 1 ? 0 : rr == 2 ? 1 : rr == 4 ? 2 : -1; }

/* ------------------------------------------------------------------ threads */

/* The process's thread pool (tp_engine/kernels/pool.c's tp_pool_run, handed
 * over at load time by tp_engine.kernels.threads): run fn(arg, t, n) for
 * every task t < n <= max_n, on the calling thread and the workers, and
 * return when all are done; work (bytes of weights) lets it keep tiny
 * matmuls on one thread. NULL: the calling thread only. */
typedef void (*tp_job_fn)(void *arg, int t, int n);
typedef void (*tp_run_fn)(tp_job_fn fn, void *arg, int max_n, int64_t work);
static tp_run_fn pool_run;

void tp_gguf_set_pool(tp_run_fn run) { pool_run = run; }

/* Every thread takes a contiguous range of the N output rows; what an
 * element's sum is does not depend on the range it lies in (see
 * avx2_range), so results are bitwise the same for any thread count. */
static void parallel_rows(tp_job_fn fn, void *arg, int64_t N, int64_t work) {
    if (pool_run && N > 1) pool_run(fn, arg, N < 256 ? (int)N : 256, work);
    else fn(arg, 0, 1);
}

/* One call's arguments, shared by its threads. */
typedef struct {
    int t, qk, qb, rr, mc;
    deq_fn deq;
    const float *x, *sx; /* float x (M, K) and its sums over 32 inputs */
    const int8_t *q;     /* int8 x: q (M, K), d (M, K / qk), s (M, K / 32) */
    const float *d;
    const int16_t *s;
    const uint8_t *w;
    float *y;
    int64_t M, K, N;
} job_t;

/* Task t of n: rows *a .. *a + *nr - 1 of N (0 rows: nothing to do). */
static int thread_rows(int64_t N, int t, int n, int64_t *a, int64_t *nr) {
    *a = N * t / n;
    *nr = N * (t + 1) / n - *a;
    return *nr > 0;
}

/* dequantize_rows (the prefill path's decode). */
static void dequant_job(void *arg, int t, int n) {
    const job_t *j = (const job_t *)arg;
    int64_t a, nr;
    if (!thread_rows(j->N, t, n, &a, &nr)) return;
    const int64_t nb = j->K / j->qk, rowb = nb * j->qb;
    for (int64_t r = a; r < a + nr; r++)
        for (int64_t b = 0; b < nb; b++) j->deq(j->w + r * rowb + b * j->qb, j->y + r * j->K + b * j->qk);
}

/* w: N rows of K / qk blocks -> y float32 (N, K). Returns 0, or -2 on bad arguments. */
int tp_gguf_dequant(int t, const uint8_t *w, int64_t N, int64_t K, float *y) {
    int qk, qb;
    deq_fn deq;
    if (!fmt_info(t, &qk, &qb, &deq) || N < 0 || K < 1 || K % qk) return -2;
    if (N == 0) return 0;
    job_t j = {.qk = qk, .qb = qb, .deq = deq, .w = w, .y = y, .K = K, .N = N};
    parallel_rows(dequant_job, &j, N, N * (K / qk) * qb);
    return 0;
}

/* The portable kernel on a thread's rows (x: float x, or int8 x as float). */
__attribute__((unused)) static void portable_job(void *arg, int t, int n) {
    const job_t *j = (const job_t *)arg;
    int64_t a, nr;
    if (!thread_rows(j->N, t, n, &a, &nr)) return;
    const int64_t rowb = j->K / j->qk * j->qb;
    portable_gemm(j->deq, j->qk, j->qb, j->x, j->M, j->K, j->w + a * rowb, nr, j->N, j->y + a);
}

#ifdef TP_GGUF_VEC
/* One group of mg <= 16 rows of x against the N rows of a thread's range
 * (w, y: at its first row; y row stride ldy). The range is cut into R
 * slices of seg rows (plus N - R * seg rows left over, done by the RR = 1
 * kernels); the rows of x into balanced chunks of at most mc. One chunk: one
 * pass. Several: row by row, every chunk in turn, so a row of W comes from
 * memory once and the later chunks find it in L1.
 *
 * Where the range falls depends on the thread count, and so do R and the
 * left-over rows; the kernel's mode (dot or scaled) must not, since the two
 * sum in different orders: it is DOTMODE(rr, chunk) of the plan's rr. */
static void avx2_range(vec_tab_t tab, int qk, int qb, const float *x, int64_t mg, int64_t K, const float *sx,
                       const uint8_t *w, int64_t N, float *y, int64_t ldy, int rr, int mc) {
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
#define KERNEL(r, c) tab[DOTMODE(rr, cn[c])][r][cn[c] - 1]
    if (nc == 1) {
        KERNEL(ri, 0)(w, rowb, nb, seg, 0, seg, x, K, sx, ls, y, ldy);
    } else {
        for (int64_t i = 0; i < seg; i++)
            for (int c = 0; c < nc; c++)
                KERNEL(ri, c)(w, rowb, nb, seg, i, i + 1, x + cs[c] * K, K, sx + cs[c] * ls, ls, y + cs[c] * ldy, ldy);
    }
    if (n0 < N)
        for (int c = 0; c < nc; c++)
            KERNEL(0, c)(w + n0 * rowb, rowb, nb, 1, 0, N - n0, x + cs[c] * K, K, sx + cs[c] * ls, ls,
                         y + cs[c] * ldy + n0, ldy);
#undef KERNEL
}

static void avx2_job(void *arg, int t, int n) {
    const job_t *j = (const job_t *)arg;
    int64_t a, nr;
    if (!thread_rows(j->N, t, n, &a, &nr)) return;
    const int64_t ls = j->K / 32, rowb = j->K / j->qk * j->qb;
    for (int64_t m0 = 0; m0 < j->M; m0 += GROUP) {
        const int64_t mg = j->M - m0 < GROUP ? j->M - m0 : GROUP;
        avx2_range(vec_tab(j->t), j->qk, j->qb, j->x + m0 * j->K, mg, j->K, j->sx + m0 * ls, j->w + a * rowb, nr,
                   j->y + m0 * j->N + a, j->N, j->rr, j->mc);
    }
}
#endif /* TP_GGUF_VEC */

/* y (M, N) = x (M, K) @ dequant(w).T, w: N rows of K / qk blocks of type t.
 * rr, mc: the AVX2 plan (rows of W, rows of x per kernel; ignored by the
 * portable build). Returns 0, -1 out of memory, -2 bad arguments / a plan not built. */
int tp_gguf_gemm(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int rr,
                 int mc) {
    int qk, qb;
    deq_fn deq;
    if (!fmt_info(t, &qk, &qb, &deq) || M < 1 || N < 1 || K < 1 || K % qk) return -2;
    job_t j = {.t = t, .qk = qk, .qb = qb, .rr = rr, .mc = mc, .deq = deq, .x = x, .w = w, .y = y, .M = M, .K = K,
               .N = N};
    const int64_t work = N * (K / qk) * qb;
#ifdef TP_GGUF_VEC
    const vec_tab_t tab = vec_tab(t);
    if (rr_index(rr) < 0 || mc < 1 || mc > MAXMC) return -2;
    /* every kernel a thread's range may need: any R <= rr, any chunk size <= mc */
    for (int r = rr; r >= 1; r >>= 1)
        for (int c = 1; c <= mc; c++)
            if (!tab[DOTMODE(rr, c)][rr_index(r)][c - 1]) return -2;
    /* sums of x over each 32 inputs, once before the split */
    float *sx = (float *)malloc((size_t)(M * (K / 32)) * sizeof(float));
    if (!sx) return -1;
    vec_sums32(x, M, K, sx);
    j.sx = sx;
    parallel_rows(avx2_job, &j, N, work);
    free(sx);
#else
    parallel_rows(portable_job, &j, N, work);
#endif
    return 0;
}

/* ================================================================== int8 activations
 *
 * y = xq @ dequant(w).T where xq is x rounded per block of QX inputs (32 for
 * Q4_0 / Q4_1 / Q5_0 / Q8_0, 256 for the K-quants, as llama.cpp's Q8_0 /
 * Q8_K): dx = amax / 127, q = round-half-even(x * (127 / amax)) in -127..127,
 * xq = dx * q; and s = sum of q over each 32 inputs (the minimums of Q4_1,
 * Q4_K, Q5_K multiply it). Each weight block is decoded once into bytes (for
 * up to 16 rows of x); per row of x the products are integer dot products
 * (vpmaddubsw: unsigned weight bytes x signed x bytes into int16 pairs,
 * vpmaddwd with 1 or with the sub-block scales into int32), exact in int32
 * and within 2^24 (so the conversion to float is exact too); then per block
 * one FMA of d_w * dx with that sum (and one for the minimums). Signed
 * weights (Q4_0, Q5_0, Q8_0, Q6_K) go through vpsignb: |w| times x with
 * w's sign. Error: |y - x w| <= sum_blocks dx / 2 sum |w| (the rounding of
 * x) plus float32 rounding of about 2 K / 32 + 4 steps (tests bound both).
 */

/* round-half-even of |v| < 2^22 in float32 (as vcvtps2dq does in the default mode) */
static inline float rne(float v) { return (v + 12582912.0f) - 12582912.0f; }

/* x (M, K) -> q int8 (M, K), d float (M, K / qx), s int16 (M, K / 32). A block
 * holding inf or NaN gets d = NaN (so its outputs are NaN, as in float). */
__attribute__((unused)) static void quantize_x_scalar(const float *x, int64_t M, int64_t K, int qx, int8_t *q, float *d,
                                                      int16_t *s) {
    const int64_t nbx = K / qx;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nbx; b++) {
            const float *xb = x + m * K + b * qx;
            int8_t *qb = q + m * K + b * qx;
            float amax = 0.0f;
            int bad = 0;
            for (int j = 0; j < qx; j++) {
                const float a = xb[j] < 0 ? -xb[j] : xb[j];
                bad |= !(a <= 3.4028234663852886e38f);
                amax = a > amax ? a : amax;
            }
            if (bad || amax == 0.0f) {
                for (int j = 0; j < qx; j++) qb[j] = 0;
                d[m * nbx + b] = bad ? __builtin_nanf("") : 0.0f;
            } else {
                const float is = 127.0f / amax;
                for (int j = 0; j < qx; j++) qb[j] = (int8_t)rne(xb[j] * is);
                d[m * nbx + b] = amax / 127.0f;
            }
            for (int g = 0; g < qx / 32; g++) {
                int t = 0;
                for (int j = 0; j < 32; j++) t += qb[32 * g + j];
                s[m * (K / 32) + b * (qx / 32) + g] = (int16_t)t;
            }
        }
}

/* the float decoders as x quantized to int8 sees them: xq as float (portable build) */
__attribute__((unused)) static void xq_float(const int8_t *q, const float *d, int64_t M, int64_t K, int qx, float *xq) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xq[m * K + k] = d[m * (K / qx) + k / qx] * (float)q[m * K + k];
}

#ifdef TP_GGUF_AVX2
static void quantize_x_avx2(const float *x, int64_t M, int64_t K, int qx, int8_t *q, float *d, int16_t *s) {
    const int64_t nbx = K / qx;
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), big = _mm256_set1_ps(3.4028234663852886e38f);
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nbx; b++) {
            const float *xb = x + m * K + b * qx;
            int8_t *qb = q + m * K + b * qx;
            __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
            for (int j = 0; j < qx; j += 8) {
                const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xb + j), absm);
                mx = _mm256_max_ps(mx, a);
                bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            if (_mm256_movemask_ps(bad) || amax == 0.0f) {
                memset(qb, 0, (size_t)qx);
                d[m * nbx + b] = _mm256_movemask_ps(bad) ? __builtin_nanf("") : 0.0f;
            } else {
                const __m256 is = _mm256_set1_ps(127.0f / amax);
                for (int j = 0; j < qx; j += 32) {
                    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j), is));
                    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 8), is));
                    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 16), is));
                    const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 24), is));
                    /* packs interleave the 128-bit lanes: undo with one permute */
                    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
                    _mm256_storeu_si256((__m256i *)(qb + j),
                                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
                }
                d[m * nbx + b] = amax / 127.0f;
            }
            for (int g = 0; g < qx / 32; g++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 32 * g));
                const __m256i w16 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v), _mm256_set1_epi16(1));
                __m128i t = _mm_add_epi32(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
                s[m * (K / 32) + b * (qx / 32) + g] = (int16_t)_mm_cvtsi128_si32(t);
            }
        }
}

/* The quantized rows of x, block b of a format with QX-input activation blocks. */
typedef struct {
    const int8_t *q;
    const float *d;
    const int16_t *s;
    int64_t K;
} xq_t;

#define XQ(m, qx, b) (X->q + (m) * X->K + (b) * (qx))
#define XD(m, qx, b) (X->d[(m) * (X->K / (qx)) + (b)])
#define XS(m, b32) (X->s + (m) * (X->K / 32) + (b32))

typedef __m256 iacc_t[MAXR][GROUP];
typedef float icorr_t[MAXR][GROUP];

INLINE __m256i ones16(void) { return _mm256_set1_epi16(1); }
/* 32 products |w| * (x with w's sign) summed into 8 int32 */
INLINE __m256i sdot32(__m256i aw, __m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)), ones16());
}
INLINE __m256i udot32(__m256i uw, __m256i x) { return _mm256_madd_epi16(_mm256_maddubs_epi16(uw, x), ones16()); }
INLINE __m256i ld32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* 16 bytes -> 32 nibbles: low nibbles in bytes 0..15, high in 16..31 */
INLINE __m256i nib32(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
/* 32 bits -> 32 bytes, 0xFF where the bit is set */
INLINE __m256i bits32(uint32_t x) {
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bm = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bm), bm);
}

/* 32-input formats. Signed: w in bytes (Q4_0 nibble - 8, Q5_0 5 bits - 16, Q8_0). */
#define I8_SIGNED32(NAME, DECODE)                                                                          \
    INLINE void i8_##NAME(const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X, int64_t b, \
                          iacc_t acc, icorr_t corr) {                                                      \
        (void)corr;                                                                                        \
        _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++) {                                             \
            const uint8_t *br = bp + r * ldr;                                                              \
            __m256i w;                                                                                     \
            DECODE;                                                                                        \
            const __m256i aw = _mm256_sign_epi8(w, w);                                                     \
            const float dw = f16(br);                                                                      \
            _Pragma("GCC unroll 2") for (int m = 0; m < mg; m++) {                                         \
                const __m256 p = _mm256_cvtepi32_ps(sdot32(aw, w, ld32(XQ(m, 32, b))));                    \
                acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * XD(m, 32, b)), p, acc[r][m]);              \
            }                                                                                              \
        }                                                                                                  \
    }
I8_SIGNED32(q8_0, w = ld32(br + 2))
I8_SIGNED32(q4_0, w = _mm256_sub_epi8(nib32(br + 2), _mm256_set1_epi8(8)))
I8_SIGNED32(q5_0, {
    uint32_t qh;
    memcpy(&qh, br + 2, 4);
    w = _mm256_sub_epi8(_mm256_or_si256(nib32(br + 6), _mm256_and_si256(bits32(qh), _mm256_set1_epi8(0x10))),
                        _mm256_set1_epi8(16));
})

/* Q4_1: unsigned nibbles; y += d dx (q . xq) + m dx s */
INLINE void i8_q4_1(const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X, int64_t b,
                    iacc_t acc, icorr_t corr) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const __m256i w = nib32(br + 4);
        const float dw = f16(br), mw = f16(br + 2);
#pragma GCC unroll 2
        for (int m = 0; m < mg; m++) {
            const float dx = XD(m, 32, b);
            const __m256 p = _mm256_cvtepi32_ps(udot32(w, ld32(XQ(m, 32, b))));
            acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), p, acc[r][m]);
            corr[r][m] += (mw * dx) * (float)*XS(m, b);
        }
    }
}

#ifdef TP_GGUF_AVX512
#include "gguf_avx512.h" /* i8_k45 and i8_q6_k with 512-bit vectors and VNNI */
#else
/* Q4_K / Q5_K: 8 sub-blocks of 32 unsigned 4 (5) bit values, 6-bit scale and
 * minimum each; y += d dx sum_j sc_j (q_j . xq_j) - dmin dx sum_j mn_j s_j */
INLINE void i8_k45(const int RR, const int mg, const int HB, const uint8_t *bp, int64_t ldr, const xq_t *X,
                   int64_t b, iacc_t acc) {
    const int qs0 = HB ? 48 : 16;
    const __m256i m0f = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        uint64_t sc8, mn8;
        kscales64(br + 4, &sc8, &mn8);
        const __m256i scv = _mm256_set1_epi64x((long long)sc8); /* scale j -> int16 words: one vpshufb */
        __m256i w[8], s16[8];
        const __m256i qh = HB ? ld32(br + 16) : b4;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const __m256i v = ld32(br + qs0 + 32 * c);
            __m256i lo = _mm256_and_si256(v, m0f), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
            if (HB) { /* bit 2c of qh[l] -> bit 4 of the low value, bit 2c + 1 -> of the high one */
                const int sl = 4 - 2 * c, sh = 3 - 2 * c;
                const __m256i hl = sl >= 0 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(sl))
                                           : _mm256_srl_epi16(qh, _mm_cvtsi32_si128(-sl));
                const __m256i hh = sh >= 0 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(sh))
                                           : _mm256_srl_epi16(qh, _mm_cvtsi32_si128(-sh));
                lo = _mm256_or_si256(lo, _mm256_and_si256(hl, b4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(hh, b4));
            }
            w[2 * c] = lo;
            w[2 * c + 1] = hi;
            s16[2 * c] = _mm256_shuffle_epi8(scv, _mm256_set1_epi16((short)(0x8000 | (2 * c))));
            s16[2 * c + 1] = _mm256_shuffle_epi8(scv, _mm256_set1_epi16((short)(0x8000 | (2 * c + 1))));
        }
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn8));
        const float d = f16(br), dmin = f16(br + 2);
#pragma GCC unroll 2
        for (int m = 0; m < mg; m++) {
            const int8_t *xq = XQ(m, 256, b);
            __m256i t0 = _mm256_setzero_si256(), t1 = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(_mm256_maddubs_epi16(w[2 * c], ld32(xq + 64 * c)), s16[2 * c]));
                t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(_mm256_maddubs_epi16(w[2 * c + 1], ld32(xq + 64 * c + 32)),
                                                            s16[2 * c + 1]));
            }
            const __m128i mins = _mm_madd_epi16(_mm_loadu_si128((const __m128i *)XS(m, 8 * b)), mn16);
            const float dx = XD(m, 256, b);
            acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(_mm256_add_epi32(t0, t1)), acc[r][m]);
            acc[r][m] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(_mm256_zextsi128_si256(mins)),
                                         acc[r][m]);
        }
    }
}
#endif /* !TP_GGUF_AVX512 */
INLINE void i8_q4_k(const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X, int64_t b,
                    iacc_t acc, icorr_t corr) {
    (void)corr;
    i8_k45(RR, mg, 0, bp, ldr, X, b, acc);
}
INLINE void i8_q5_k(const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X, int64_t b,
                    iacc_t acc, icorr_t corr) {
    (void)corr;
    i8_k45(RR, mg, 1, bp, ldr, X, b, acc);
}

#ifndef TP_GGUF_AVX512
/* Q6_K: 16 sub-blocks of 16 signed 6-bit values (less 32), int8 scale each;
 * vector i holds inputs 32 i .. 32 i + 31 (scales 2 i, 2 i + 1). */
INLINE void i8_q6_k(const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X, int64_t b,
                    iacc_t acc, icorr_t corr) {
    (void)corr;
    const __m256i m0f = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30), o32 = _mm256_set1_epi8(32);
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const int8_t *sc = (const int8_t *)(br + 192);
        __m256i w[8], s16[8];
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256i a = ld32(br + 64 * h), c = ld32(br + 64 * h + 32), hq = ld32(br + 128 + 32 * h);
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(a, m0f), _mm256_and_si256(_mm256_slli_epi16(hq, 4), m30));
            const __m256i q2 = _mm256_or_si256(_mm256_and_si256(c, m0f), _mm256_and_si256(_mm256_slli_epi16(hq, 2), m30));
            const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m0f), _mm256_and_si256(hq, m30));
            const __m256i q4 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), m0f),
                                               _mm256_and_si256(_mm256_srli_epi16(hq, 2), m30));
            w[4 * h] = _mm256_sub_epi8(q1, o32);
            w[4 * h + 1] = _mm256_sub_epi8(q2, o32);
            w[4 * h + 2] = _mm256_sub_epi8(q3, o32);
            w[4 * h + 3] = _mm256_sub_epi8(q4, o32);
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) s16[i] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * i + 1]), _mm_set1_epi16(sc[2 * i]));
        const float d = f16(br + 208);
#pragma GCC unroll 2
        for (int m = 0; m < mg; m++) {
            const int8_t *xq = XQ(m, 256, b);
            __m256i t0 = _mm256_setzero_si256(), t1 = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int i = 0; i < 8; i += 2) {
                const __m256i x0 = ld32(xq + 32 * i), x1 = ld32(xq + 32 * i + 32);
                t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w[i], w[i]),
                                                                                 _mm256_sign_epi8(x0, w[i])), s16[i]));
                t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w[i + 1], w[i + 1]),
                                                                                 _mm256_sign_epi8(x1, w[i + 1])), s16[i + 1]));
            }
            acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d * XD(m, 256, b)), _mm256_cvtepi32_ps(_mm256_add_epi32(t0, t1)),
                                        acc[r][m]);
        }
    }
}

#endif /* !TP_GGUF_AVX512 */

/* Rows i0..i1-1 of each of RR slices against mg (<= 16) rows of x; MG1: mg
 * is 1, known at compile time (the accumulators stay in registers). */
typedef void (*irows_fn)(const uint8_t *w, int64_t rowb, int64_t nb, int64_t seg, int64_t i0, int64_t i1,
                         const xq_t *X, int mg, float *y, int64_t ldy);

#define DEF_IROWS(FMT, QB, RR, MG1)                                                                          \
    static void i8r_##FMT##_##RR##_##MG1(const uint8_t *w, int64_t rowb, int64_t nb, int64_t seg, int64_t i0, \
                                         int64_t i1, const xq_t *X, int mg, float *y, int64_t ldy) {          \
        const int64_t ldr = seg * rowb;                                                                      \
        if (MG1) mg = 1;                                                                                     \
        for (int64_t i = i0; i < i1; i++) {                                                                  \
            const uint8_t *wi = w + i * rowb;                                                                \
            iacc_t acc;                                                                                      \
            icorr_t corr;                                                                                    \
            iacc_t acc2; /* one row of x: odd blocks in a second set (two FMA chains a row of W) */        \
            icorr_t corr2;                                                                                   \
            for (int r = 0; r < RR; r++)                                                                     \
                for (int m = 0; m < mg; m++)                                                                 \
                    acc[r][m] = acc2[r][m] = _mm256_setzero_ps(), corr[r][m] = corr2[r][m] = 0.0f;           \
            int64_t b = 0;                                                                                   \
            if (MG1)                                                                                         \
                for (; b + 1 < nb; b += 2) {                                                                 \
                    i8_##FMT(RR, 1, wi + b * QB, ldr, X, b, acc, corr);                                      \
                    i8_##FMT(RR, 1, wi + (b + 1) * QB, ldr, X, b + 1, acc2, corr2);                          \
                }                                                                                            \
            for (; b < nb; b++) i8_##FMT(RR, mg, wi + b * QB, ldr, X, b, acc, corr);                         \
            for (int r = 0; r < RR; r++)                                                                     \
                for (int m = 0; m < mg; m++)                                                                 \
                    y[m * ldy + i + r * seg] =                                                               \
                        hsum8(_mm256_add_ps(acc[r][m], acc2[r][m])) + (corr[r][m] + corr2[r][m]);            \
        }                                                                                                    \
    }
#define DEF_IFMT(FMT, QB)                                                                                    \
    DEF_IROWS(FMT, QB, 1, 1) DEF_IROWS(FMT, QB, 2, 1) DEF_IROWS(FMT, QB, 4, 1)                                \
    DEF_IROWS(FMT, QB, 1, 0) DEF_IROWS(FMT, QB, 2, 0) DEF_IROWS(FMT, QB, 4, 0)                                \
    static const irows_fn i8tab_##FMT[3][2] = {{i8r_##FMT##_1_0, i8r_##FMT##_1_1},                            \
                                               {i8r_##FMT##_2_0, i8r_##FMT##_2_1},                            \
                                               {i8r_##FMT##_4_0, i8r_##FMT##_4_1}};

DEF_IFMT(q4_0, 18)
DEF_IFMT(q4_1, 20)
DEF_IFMT(q5_0, 22)
DEF_IFMT(q8_0, 34)
DEF_IFMT(q4_k, 144)
DEF_IFMT(q5_k, 176)
DEF_IFMT(q6_k, 210)

static const irows_fn (*i8_tab(int t))[2] {
    switch (t) {
    case T_Q4_0: return i8tab_q4_0;
    case T_Q4_1: return i8tab_q4_1;
    case T_Q5_0: return i8tab_q5_0;
    case T_Q8_0: return i8tab_q8_0;
    case T_Q4_K: return i8tab_q4_k;
    case T_Q5_K: return i8tab_q5_k;
    case T_Q6_K: return i8tab_q6_k;
    default: return 0;
    }
}
#endif /* TP_GGUF_AVX2 */

/* x quantized as the int8 kernels of format t see it (tests):
 * q int8 (M, K), d float (M, K / qx), s int16 (M, K / 32); returns qx or -2. */
int tp_gguf_quantize_x(int t, const float *x, int64_t M, int64_t K, int8_t *q, float *d, int16_t *s) {
    int qk, qb;
    deq_fn deq;
    if (!fmt_info(t, &qk, &qb, &deq) || M < 1 || K < 1 || K % qk) return -2;
#ifdef TP_GGUF_VEC
    vec_quantize_x(x, M, K, qk, q, d, s);
#else
    quantize_x_scalar(x, M, K, qk, q, d, s);
#endif
    return qk;
}

#ifdef TP_GGUF_VEC
/* The int8 kernels on a thread's rows, cut into R slices as in avx2_range
 * (their order of operations per element does not depend on RR). */
static void i8_job(void *arg, int t, int n) {
    const job_t *j = (const job_t *)arg;
    int64_t a, nr;
    if (!thread_rows(j->N, t, n, &a, &nr)) return;
    const irows_fn(*tab)[2] = vec_i8_tab(j->t);
    const int64_t K = j->K, N = j->N, nb = K / j->qk, rowb = nb * j->qb;
    int R = j->rr;
    while (R > 1 && nr < R) R >>= 1;
    const int64_t seg = nr / R, n0 = R * seg;
    const uint8_t *w = j->w + a * rowb;
    for (int64_t m0 = 0; m0 < j->M; m0 += GROUP) {
        const int mg = (int)(j->M - m0 < GROUP ? j->M - m0 : GROUP);
        const xq_t X = {j->q + m0 * K, j->d + m0 * (K / j->qk), j->s + m0 * (K / 32), K};
        float *y = j->y + m0 * N + a;
        tab[rr_index(R)][mg == 1](w, rowb, nb, seg, 0, seg, &X, mg, y, N);
        if (n0 < nr) tab[0][mg == 1](w + n0 * rowb, rowb, nb, 1, 0, nr - n0, &X, mg, y + n0, N);
    }
}
#endif

/* y (M, N) = xq @ dequant(w).T with x quantized per block to int8 (above),
 * once before the threads split the rows.
 * rr: rows of W in flight (1, 2, 4; AVX2 only). Returns 0, -1 out of memory,
 * -2 bad arguments. The portable build applies its float kernels to xq. */
int tp_gguf_gemm_i8(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int rr) {
    int qk, qb;
    deq_fn deq;
    if (!fmt_info(t, &qk, &qb, &deq) || M < 1 || N < 1 || K < 1 || K % qk) return -2;
    /* q 64-byte aligned: the AVX-512 kernels load 64 bytes of it at a time (K is a multiple of 32, so
     * a 16-byte-aligned malloc would split every such load across two cache lines) */
    void *qraw = malloc((size_t)(M * K) + 64);
    int8_t *q = qraw ? (int8_t *)(((uintptr_t)qraw + 63) & ~(uintptr_t)63) : 0;
    float *d = (float *)malloc((size_t)(M * (K / 32)) * sizeof(float));
    int16_t *s = (int16_t *)malloc((size_t)(M * (K / 32)) * sizeof(int16_t));
    int rc = 0;
    job_t j = {.t = t, .qk = qk, .qb = qb, .rr = rr, .deq = deq, .q = q, .d = d, .s = s, .w = w, .y = y, .M = M,
               .K = K, .N = N};
    const int64_t work = N * (K / qk) * qb;
    if (!q || !d || !s) {
        rc = -1;
        goto done;
    }
#ifdef TP_GGUF_VEC
    if (rr_index(rr) < 0) {
        rc = -2;
        goto done;
    }
    vec_quantize_x(x, M, K, qk, q, d, s);
    parallel_rows(i8_job, &j, N, work);
#else
    {
        float *xq = (float *)malloc((size_t)(M * K) * sizeof(float));
        if (!xq) {
            rc = -1;
            goto done;
        }
        quantize_x_scalar(x, M, K, qk, q, d, s);
        xq_float(q, d, M, K, qk, xq);
        j.x = xq;
        parallel_rows(portable_job, &j, N, work);
        free(xq);
    }
#endif
done:
    free(qraw);
    free(d);
    free(s);
    return rc;
}
