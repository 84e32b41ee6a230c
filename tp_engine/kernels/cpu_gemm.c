/*
 * Skinny GEMMs for CPU decode and speculative verification (tp_engine.kernels.cpu_gemm).
 *
 * y (M, N) = x (M, K) @ W.T (+ bias) for M = 1..16 with W read from memory
 * once per call. Decode on a CPU is memory bound: every weight byte comes
 * from DRAM, so a call costs the weight bytes / bandwidth as long as the
 * arithmetic keeps up. MKL's sgemm repacks W for small M (M = 5 costs twice
 * M = 1); here each weight row is loaded once and applied to every row of x
 * while it is in registers (or, for a later chunk of x rows, in L1).
 *
 * Three weight formats, one structure:
 *   f32   W float32 (N, K) used as-is (the model's own parameter memory);
 *   int8  W = q * scale[n]: q int8 rows zero padded to Kp (a multiple of 8),
 *         scale float32 (N,) apart;
 *   int4  W = u * scale[n, g] + offset[n, g]: one record per row, [G scales]
 *         [G offsets] (float32) [nibbles]; each group of gs inputs padded to
 *         gp (a multiple of 16) with zero nibbles; per 16 inputs 8 bytes, byte
 *         i holding input i in its low nibble and input i + 8 in its high one
 *         (one zero-extend, one AND and one shift give two 8-wide vectors in
 *         input order).
 *
 * Memory access. One core reads DRAM fastest with a few sequential streams
 * in flight (on the development machine, AMD EPYC Zen 3 in a VM: ~17 GB/s
 * with one stream, ~30 GB/s with four, less again with 8 or more). So the RR
 * rows of a micro-kernel are not adjacent rows: W is cut into RR equal
 * slices of consecutive rows and the kernel takes row i of every slice, i =
 * 0, 1, ...: RR long sequential streams, each staying trained in the
 * hardware prefetcher (RR adjacent rows instead make RR short streams that
 * restart every block, at the one-stream speed or worse). See WALK for the
 * order of rows and chunks of x, and the prefetching.
 *
 * Micro-kernel: RR rows (1, 2, 4) x MC rows of x (1..8) accumulators, K in
 * 8-wide AVX2 vectors (FMA), horizontal sums once per row. float32 and int8
 * keep one accumulator per (row, x row): with W streamed from DRAM, more
 * independent FMA chains bought nothing measurable, and one fixed order of
 * additions makes row i of y bitwise the same whatever M, the plan or the
 * other rows of x are (a k + 1 token verification gives the bits a 1-token
 * step gives). int4 keeps more (see i4_rows) and is deterministic per plan.
 *
 * Threads: the N output rows are split into contiguous ranges over the
 * process's pool (tp_engine/kernels/pool.c), each range walked as above
 * with its own RR streams. No element's order of additions depends on the
 * range it falls in (int4: see DEF4), so results are bitwise the same for
 * any thread count; x is padded (and summed, int4) once, before the split.
 *
 * Arithmetic is float32 throughout, never -ffast-math. int8: sum_k x*q in
 * float32, times the row's scale once. int4: per group s * (x . u) (few
 * accumulators) or x . (u * s) (many), plus offset[n, g] * sum(x over group
 * g), the group sums of x computed once per call and added in the same
 * accumulators.
 *
 * Where the time goes (Zen 3, per 16 weights and row of x): float32 M = 1 is
 * at the 4-stream read bandwidth; int8 and int4 are limited by converting
 * the integers to float (vcvtdq2ps shares the two FMA pipes: 2 converts + 2
 * FMAs for 16 weights), ~2 cycles per 16 weights, about the time the
 * memory takes to deliver them at 30 GB/s for int8, twice that for int4.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TP_GEMM_ABI 3
#define MAXR 4
#define MAXMC 8
#define MAXM 16

int tp_gemm_abi(void) { return TP_GEMM_ABI; }

/* Whether this CPU runs the AVX2/FMA code. No vector code in here, so it is
 * safe to call on any x86-64 CPU. */
int tp_gemm_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#define INLINE static inline __attribute__((always_inline))

/* Sums of four vectors -> one 4-lane vector [sum a, sum b, sum c, sum d]. */
INLINE __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_hadd_ps(a, b);
    __m256 cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

INLINE float hsum1(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define MAXSETS 4

typedef __m256 acc_t[MAXSETS][MAXR][MAXMC];

INLINE void zero_acc(const int RR, const int MC, const int SETS, acc_t acc) {
#pragma GCC unroll 4
    for (int s = 0; s < SETS; s++)
#pragma GCC unroll 4
        for (int r = 0; r < RR; r++)
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++) acc[s][r][m] = _mm256_setzero_ps();
}

enum { EPI_STORE, EPI_SCALE };

/* Horizontal sums, then y[m][n + r * seg] = sum (* scale[n + r * seg]) (+ bias). */
INLINE void store_out(const int RR, const int MC, const int SETS, const int EPI, acc_t acc, float *restrict y,
                      int64_t ldy, int64_t n, int64_t seg, const float *restrict scale,
                      const float *restrict bias) {
    __m256 flat[MAXR * MAXMC];
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++)
#pragma GCC unroll 4
        for (int r = 0; r < RR; r++) {
            __m256 a = acc[0][r][m];
            if (SETS == 2) a = _mm256_add_ps(a, acc[1][r][m]);
            if (SETS == 4) a = _mm256_add_ps(_mm256_add_ps(a, acc[1][r][m]), _mm256_add_ps(acc[2][r][m], acc[3][r][m]));
            flat[m * RR + r] = a;
        }
    float sums[MAXR * MAXMC];
    const int cnt = RR * MC;
    int i = 0;
#pragma GCC unroll 8
    for (; i + 4 <= cnt; i += 4) _mm_storeu_ps(sums + i, hsum4(flat[i], flat[i + 1], flat[i + 2], flat[i + 3]));
#pragma GCC unroll 4
    for (; i < cnt; i++) /* the same order of additions as in hsum4 */
        sums[i] = _mm_cvtss_f32(hsum4(flat[i], flat[i], flat[i], flat[i]));
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++)
#pragma GCC unroll 4
        for (int r = 0; r < RR; r++) {
            const int64_t nn = n + r * seg;
            float v = sums[m * RR + r];
            if (EPI == EPI_SCALE) v = v * scale[nn];
            if (bias) v = v + bias[nn];
            y[m * ldy + nn] = v;
        }
}

/* ------------------------------------------------------------------ float32 */

/* One 8-wide step at input k. */
#define F32_STEP(k, LOAD)                                                                   \
    do {                                                                                       \
        __m256 wv[MAXR];                                                                       \
        _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++) wv[r] = LOAD(wi + r * ldr + (k)); \
        _Pragma("GCC unroll 8") for (int m = 0; m < MC; m++) {                                 \
            __m256 xv = LOAD(x + m * K + (k));                                                 \
            _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++)                               \
                acc[0][r][m] = _mm256_fmadd_ps(wv[r], xv, acc[0][r][m]);                       \
        }                                                                                      \
    } while (0)

#define MASKLOAD(p) _mm256_maskload_ps((p), tail)

/* Rows i0 .. i1-1 of each of the RR slices (slice r starts at row r * seg) of
 * w (N, K), against MC rows of x (M, K); any K. pf: when not 0, prefetch the
 * bytes pf ahead of each row as it is read (see the row walk). */
INLINE void f32_rows(const int RR, const int MC, const float *restrict w, int64_t K, int64_t seg, int64_t i0,
                     int64_t i1, const float *restrict x, float *restrict y, int64_t N,
                     const float *restrict bias, int64_t pf) {
    const int64_t ldr = seg * K;
    /* Masked loads for the last K % 8 inputs read nothing past a row (no
     * fault, no garbage: masked-off lanes are 0, so a NaN past the end of x
     * cannot leak in). */
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(K % 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t i = i0; i < i1; i++) {
        const float *wi = w + i * K;
        acc_t acc;
        zero_acc(RR, MC, 1, acc);
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            if (pf && !(k & 15))
#pragma GCC unroll 4
                for (int r = 0; r < RR; r++) _mm_prefetch((const char *)(wi + r * ldr + k) + pf, _MM_HINT_T0);
            F32_STEP(k, _mm256_loadu_ps);
        }
        if (k < K) F32_STEP(k, MASKLOAD);
        store_out(RR, MC, 1, EPI_STORE, acc, y, N, i, seg, NULL, bias);
    }
}

/* ------------------------------------------------------------------ int8 */

/* q: (N, Kp) int8, Kp a multiple of 8; x: (M, Kp) zero padded. */
#define I8_STEP(k)                                                                                \
    do {                                                                                          \
        __m256 wv[MAXR];                                                                          \
        _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++) wv[r] = _mm256_cvtepi32_ps(           \
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qi + r * ldr + (k)))));        \
        _Pragma("GCC unroll 8") for (int m = 0; m < MC; m++) {                                    \
            __m256 xv = _mm256_loadu_ps(x + m * Kp + (k));                                        \
            _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++)                                  \
                acc[0][r][m] = _mm256_fmadd_ps(wv[r], xv, acc[0][r][m]);                          \
        }                                                                                         \
    } while (0)

/* Prefetch `bytes` bytes at p + pf of each of the RR rows (stride ldr) into L1. */
INLINE void prefetch_rows(const int RR, const char *p, int64_t ldr, int64_t pf, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64)
#pragma GCC unroll 4
        for (int r = 0; r < RR; r++) _mm_prefetch(p + r * ldr + pf + b, _MM_HINT_T0);
}

INLINE void i8_rows(const int RR, const int MC, const int8_t *restrict q, int64_t Kp, int64_t seg, int64_t i0,
                    int64_t i1, const float *restrict x, float *restrict y, int64_t N, const float *restrict scale,
                    const float *restrict bias, int64_t pf) {
    const int64_t ldr = seg * Kp;
    for (int64_t i = i0; i < i1; i++) {
        const int8_t *qi = q + i * Kp;
        if (pf) prefetch_rows(RR, (const char *)qi, ldr, pf, Kp);
        acc_t acc;
        zero_acc(RR, MC, 1, acc);
        for (int64_t k = 0; k < Kp; k += 8) I8_STEP(k);
        store_out(RR, MC, 1, EPI_SCALE, acc, y, N, i, seg, scale, bias);
    }
}

/* ------------------------------------------------------------------ int4 */

/* One 16-input step: nibble bytes at ri + r * ldr + off, inputs 0..7 into set
 * sa, 8..15 into set sb. SCALED: the weights are cvt(u) * scale (sv[r]); else
 * the sets hold x . u and the scale multiplies them at the end of the group. */
#define I4_STEP(sa, sb, SCALED)                                                                   \
    do {                                                                                          \
        __m256 wa[MAXR], wb[MAXR];                                                                \
        _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++) {                                    \
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ri + r * ldr + off))); \
            wa[r] = _mm256_cvtepi32_ps(_mm256_and_si256(v, low4));                                \
            wb[r] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));                                  \
            if (SCALED) {                                                                         \
                wa[r] = _mm256_mul_ps(wa[r], sv[r]);                                              \
                wb[r] = _mm256_mul_ps(wb[r], sv[r]);                                              \
            }                                                                                     \
        }                                                                                         \
        _Pragma("GCC unroll 8") for (int m = 0; m < MC; m++) {                                    \
            __m256 xa = _mm256_loadu_ps(xk + m * ldx);                                            \
            __m256 xb = _mm256_loadu_ps(xk + m * ldx + 8);                                        \
            _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++) {                                \
                acc[sa][r][m] = _mm256_fmadd_ps(wa[r], xa, acc[sa][r][m]);                        \
                acc[sb][r][m] = _mm256_fmadd_ps(wb[r], xb, acc[sb][r][m]);                        \
            }                                                                                     \
        }                                                                                         \
        off += 8;                                                                                 \
        xk += 16;                                                                                 \
    } while (0)

/* Row records of rowb = 8 * G + G * 8 * tpg bytes: G scales, G offsets
 * (float32), then G groups of tpg 16-input steps. x: (M, ldx = G * 16 * tpg
 * + g8), each group zero padded, followed by the group sums of x (zero padded
 * to g8, G rounded up to 8).
 *
 * Two ways to apply the scale. With few accumulators (RR * MC <= DOT_MAX)
 * the sets collect x . u over a group and one FMA per group adds
 * scale * (x . u) to a total: per 16 inputs and row, 7 vector operations
 * (zero-extend, and, shift, 2 converts, 2 FMAs) instead of 9; the converts
 * and FMAs share two pipes, so that is what limits M = 1. With more
 * accumulators the totals would not fit in the 16 registers, so the
 * converted weights are multiplied by the scale instead (cvt(u) * scale: the
 * dequantized weight, one rounding).
 *
 * With fewer than I4_CHAINS accumulators, 2 or 4 sets (inputs 0..7 and 8..15
 * of a step apart, then alternate steps) keep enough FMA chains in flight;
 * more (8) made the compiler spill accumulators in the (4, 1) kernel. */
#define DOT_MAX 4
#define I4_CHAINS 4
#define I4_SETS(RR, MC) ((RR) * (MC) >= I4_CHAINS ? 1 : (RR) * (MC) * 2 >= I4_CHAINS ? 2 : 4)
/* SETS, DOT: chosen by the plan's rows of W (see DEF4), not by RR. */
INLINE void i4_rows(const int RR, const int MC, const int SETS, const int DOT, const uint8_t *restrict wp,
                    int64_t rowb, int64_t G, int64_t tpg, int64_t seg, int64_t i0, int64_t i1,
                    const float *restrict x, int64_t ldx, float *restrict y, int64_t N, const float *restrict bias,
                    int64_t pf) {
    const int64_t ldr = seg * rowb;
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    const int64_t nib0 = 8 * G; /* nibbles start after the scales and offsets */
    /* the offsets' last G % 8 lanes: masked, the bytes after them are nibbles */
    const __m256i otail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(G % 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t i = i0; i < i1; i++) {
        const uint8_t *ri = wp + i * rowb;
        if (pf) prefetch_rows(RR, (const char *)ri, ldr, pf, rowb);
        acc_t acc, tot;
        zero_acc(RR, MC, SETS, acc);
        if (DOT) zero_acc(RR, MC, 1, tot);
        int64_t off = nib0;
        const float *xk = x;
        for (int64_t g = 0; g < G; g++) {
            __m256 sv[MAXR];
            if (!DOT)
#pragma GCC unroll 4
                for (int r = 0; r < RR; r++) sv[r] = _mm256_broadcast_ss((const float *)(ri + r * ldr) + g);
            int64_t t = 0;
            if (SETS == 4)
                for (; t + 2 <= tpg; t += 2) {
                    I4_STEP(0, 1, !DOT);
                    I4_STEP(2 % SETS, 3 % SETS, !DOT);
                }
            for (; t < tpg; t++) I4_STEP(0, SETS - 1, !DOT);
            if (DOT) {
                /* the scales are loaded only now: registers are short during the steps */
#pragma GCC unroll 4
                for (int r = 0; r < RR; r++) sv[r] = _mm256_broadcast_ss((const float *)(ri + r * ldr) + g);
#pragma GCC unroll 4
                for (int r = 0; r < RR; r++)
#pragma GCC unroll 8
                    for (int m = 0; m < MC; m++) {
                        __m256 d = acc[0][r][m];
                        if (SETS == 2) d = _mm256_add_ps(d, acc[1][r][m]);
                        if (SETS == 4) d = _mm256_add_ps(_mm256_add_ps(d, acc[1][r][m]), _mm256_add_ps(acc[2][r][m], acc[3][r][m]));
                        tot[0][r][m] = _mm256_fmadd_ps(sv[r], d, tot[0][r][m]);
                    }
                zero_acc(RR, MC, SETS, acc);
            }
        }
        /* offset[n, g] * sum(x_g): G more "inputs", the offsets against the group sums */
        for (int64_t g = 0; g < G; g += 8) {
#pragma GCC unroll 4
            for (int r = 0; r < RR; r++) {
                const float *o = (const float *)(ri + r * ldr) + G + g;
                const __m256 ov = g + 8 <= G ? _mm256_loadu_ps(o) : _mm256_maskload_ps(o, otail);
#pragma GCC unroll 8
                for (int m = 0; m < MC; m++) {
                    const __m256 xs = _mm256_loadu_ps(xk + m * ldx + g);
                    if (DOT) tot[0][r][m] = _mm256_fmadd_ps(ov, xs, tot[0][r][m]);
                    else acc[0][r][m] = _mm256_fmadd_ps(ov, xs, acc[0][r][m]);
                }
            }
        }
        if (DOT) store_out(RR, MC, 1, EPI_STORE, tot, y, N, i, seg, NULL, bias);
        else store_out(RR, MC, SETS, EPI_STORE, acc, y, N, i, seg, NULL, bias);
    }
}

/* ------------------------------------------------------------------ instantiation */

typedef void (*f32_fn)(const float *, int64_t, int64_t, int64_t, int64_t, const float *, float *, int64_t,
                       const float *, int64_t);
typedef void (*i8_fn)(const int8_t *, int64_t, int64_t, int64_t, int64_t, const float *, float *, int64_t,
                      const float *, const float *, int64_t);
typedef void (*i4_fn)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const float *,
                      int64_t, float *, int64_t, const float *, int64_t);

#define DEF(RR, MC)                                                                                        \
    static void f32_##RR##_##MC(const float *w, int64_t K, int64_t seg, int64_t i0, int64_t i1,            \
                                const float *x, float *y, int64_t N, const float *bias, int64_t pf) {      \
        f32_rows(RR, MC, w, K, seg, i0, i1, x, y, N, bias, pf);                                            \
    }                                                                                                      \
    static void i8_##RR##_##MC(const int8_t *q, int64_t Kp, int64_t seg, int64_t i0, int64_t i1,           \
                               const float *x, float *y, int64_t N, const float *scale, const float *bias, \
                               int64_t pf) {                                                               \
        i8_rows(RR, MC, q, Kp, seg, i0, i1, x, y, N, scale, bias, pf);                                     \
    }
#define DEF_ROW(RR) DEF(RR, 1) DEF(RR, 2) DEF(RR, 3) DEF(RR, 4) DEF(RR, 5) DEF(RR, 6) DEF(RR, 7) DEF(RR, 8)
DEF_ROW(1)
DEF_ROW(2)
DEF_ROW(4)

/* int4: RR rows in flight, with the accumulators (SETS, DOT) of the plan's
 * NR >= RR rows. A thread's range (or the rows left over after its RR
 * slices) may run fewer rows at a time than the plan; each element must
 * still be summed in the plan's order, or results would depend on where the
 * thread boundaries fall. */
#define DEF4(NR, RR, MC)                                                                                     \
    static void i4_##NR##_##RR##_##MC(const uint8_t *wp, int64_t rowb, int64_t G, int64_t tpg, int64_t seg,  \
                                      int64_t i0, int64_t i1, const float *x, int64_t ldx, float *y,         \
                                      int64_t N, const float *bias, int64_t pf) {                            \
        i4_rows(RR, MC, I4_SETS(NR, MC), (NR) * (MC) <= DOT_MAX, wp, rowb, G, tpg, seg, i0, i1, x, ldx, y, N, \
                bias, pf);                                                                                   \
    }
#define DEF4_ROW(NR, RR) DEF4(NR, RR, 1) DEF4(NR, RR, 2) DEF4(NR, RR, 3) DEF4(NR, RR, 4) DEF4(NR, RR, 5) \
    DEF4(NR, RR, 6) DEF4(NR, RR, 7) DEF4(NR, RR, 8)
DEF4_ROW(1, 1)
DEF4_ROW(2, 1)
DEF4_ROW(2, 2)
DEF4_ROW(4, 1)
DEF4_ROW(4, 2)
DEF4_ROW(4, 4)

#define ROW(T, RR) {T##_##RR##_1, T##_##RR##_2, T##_##RR##_3, T##_##RR##_4, T##_##RR##_5, T##_##RR##_6, T##_##RR##_7, T##_##RR##_8}
/* index [log2(RR)][MC - 1] */
static const f32_fn F32[3][MAXMC] = {ROW(f32, 1), ROW(f32, 2), ROW(f32, 4)};
static const i8_fn I8[3][MAXMC] = {ROW(i8, 1), ROW(i8, 2), ROW(i8, 4)};
/* index [log2(the plan's rows)][log2(RR)][MC - 1] */
static const i4_fn I4[3][3][MAXMC] = {{ROW(i4_1, 1)}, {ROW(i4_2, 1), ROW(i4_2, 2)}, {ROW(i4_4, 1), ROW(i4_4, 2), ROW(i4_4, 4)}};

static int rr_index(int rr) { return rr == 1 ? 0 : rr == 2 ? 1 : rr == 4 ? 2 : -1; }

static int bad_plan(int64_t M, int rr, int mc) {
    return M < 1 || M > MAXM || rr_index(rr) < 0 || mc < 1 || mc > MAXMC;
}

/* The row walk shared by the three formats, over one thread's rows. M is
 * split into balanced chunks of at most mc rows (5 with mc 4 -> 3 + 2: both
 * keep enough accumulators); the rows into R slices of seg rows (R = rr,
 * fewer for tiny N), plus N % R rows left over, done one at a time.
 *
 * One chunk: one pass over all rows. Several: row by row (R rows, one per
 * slice), every chunk in turn, so each weight row leaves memory once and is
 * re-read from L1 by the later chunks. During those L1 passes the hardware
 * prefetchers see no new lines and DRAM would idle (measured: time = memory
 * + compute instead of the larger of the two), so the second chunk
 * prefetches the next row of every slice. */
typedef struct {
    int nc, cs[MAXM], cn[MAXM]; /* chunks: first row of x, rows */
    int R;
    int64_t seg;                /* rows per slice */
} walk_t;

static void plan_walk(walk_t *p, int64_t M, int64_t N, int rr, int mc) {
    p->nc = (int)((M + mc - 1) / mc);
    int base = (int)(M / p->nc), extra = (int)(M % p->nc), m0 = 0;
    for (int c = 0; c < p->nc; c++) {
        p->cs[c] = m0;
        p->cn[c] = base + (c < extra);
        m0 += p->cn[c];
    }
    p->R = rr;
    while (p->R > 1 && N < p->R) p->R >>= 1;
    p->seg = N / p->R;
}

/* Calls CALL(ri, i0, i1, c, n0, pf) for the walk above over N rows: ri the
 * kernel's row-count index, rows i0..i1-1 of the slices starting at row n0,
 * chunk c, prefetch distance pf bytes (0: none). */
#define WALK(p, N, row_bytes, CALL)                                                         \
    do {                                                                                    \
        const int ri_ = rr_index((p).R);                                                    \
        if ((p).nc == 1) {                                                                  \
            CALL(ri_, 0, (p).seg, 0, 0, 0);                                                 \
        } else {                                                                            \
            for (int64_t i_ = 0; i_ < (p).seg; i_++)                                        \
                for (int c_ = 0; c_ < (p).nc; c_++) CALL(ri_, i_, i_ + 1, c_, 0, c_ == 1 ? (row_bytes) : 0); \
        }                                                                                   \
        const int64_t n0_ = (int64_t)(p).R * (p).seg;                                       \
        if (n0_ < N)                                                                        \
            for (int c_ = 0; c_ < (p).nc; c_++) CALL(0, 0, N - n0_, c_, n0_, 0);            \
    } while (0)

/* ------------------------------------------------------------------ threads */

/* The process's thread pool (tp_engine/kernels/pool.c's tp_pool_run, handed
 * over at load time by tp_engine.kernels.threads): run fn(arg, t, n) for
 * every task t < n <= max_n, on the calling thread and the workers, and
 * return when all are done; work (bytes of weights) lets it keep tiny
 * matmuls on one thread. NULL: the calling thread only. */
typedef void (*tp_job_fn)(void *arg, int t, int n);
typedef void (*tp_run_fn)(tp_job_fn fn, void *arg, int max_n, int64_t work);
static tp_run_fn pool_run;

void tp_gemm_set_pool(tp_run_fn run) { pool_run = run; }

/* Every thread takes a contiguous range of the N output rows (and walks it
 * as above); nothing about an element's sum depends on the range it lies in
 * (int4: see DEF4), so results are bitwise the same for any thread count. */
static void parallel_rows(tp_job_fn fn, void *arg, int64_t N, int64_t work) {
    if (pool_run && N > 1) pool_run(fn, arg, N < 256 ? (int)N : 256, work);
    else fn(arg, 0, 1);
}

/* One call's arguments, shared by its threads. */
typedef struct {
    const float *x;  /* float32 (M, ldx): x (f32), padded x (i8, int4) */
    const void *w;   /* the weight rows */
    const float *scale, *bias;
    float *y;        /* (M, N) */
    int64_t M, K, N, ldx, rowb; /* rowb: bytes per weight row */
    int64_t G, gp;   /* int4 groups: count, padded size */
    int rr, mc;
} job_t;

/* Task t of n: rows a .. a + Nr - 1; the pointers below start at row a. */
#define RANGE(j, t, n)                                                          \
    const int64_t a_ = (j)->N * (t) / (n), Nr = (j)->N * ((t) + 1) / (n) - a_; \
    if (Nr < 1) return;                                                         \
    const int64_t N = (j)->N;                                                   \
    float *y = (j)->y + a_;                                                     \
    const float *bias = (j)->bias ? (j)->bias + a_ : NULL;                      \
    walk_t p;                                                                   \
    plan_walk(&p, (j)->M, Nr, (j)->rr, (j)->mc)

static void f32_job(void *arg, int t, int n) {
    const job_t *j = (const job_t *)arg;
    RANGE(j, t, n);
    const int64_t K = j->K;
    const float *w = (const float *)j->w + a_ * K, *x = j->x;
    /* the left-over rows (n0 > 0) are one slice of Nr - n0 rows: seg 1 */
#define F32_CALL(ri, i0, i1, c, n0, pf)                                                                \
    F32[ri][p.cn[c] - 1](w + (n0) * K, K, (n0) ? 1 : p.seg, i0, i1, x + p.cs[c] * K, y + p.cs[c] * N + (n0), N, \
                         bias ? bias + (n0) : NULL, pf)
    WALK(p, Nr, K * 4, F32_CALL);
}

static void i8_job(void *arg, int t, int n) {
    const job_t *j = (const job_t *)arg;
    RANGE(j, t, n);
    const int64_t Kp = j->ldx;
    const int8_t *q = (const int8_t *)j->w + a_ * Kp;
    const float *xp = j->x, *scale = j->scale + a_;
#define I8_CALL(ri, i0, i1, c, n0, pf)                                                                 \
    I8[ri][p.cn[c] - 1](q + (n0) * Kp, Kp, (n0) ? 1 : p.seg, i0, i1, xp + p.cs[c] * Kp, y + p.cs[c] * N + (n0), N, \
                        scale + (n0), bias ? bias + (n0) : NULL, pf)
    WALK(p, Nr, Kp, I8_CALL);
}

static void i4_job(void *arg, int t, int n) {
    const job_t *j = (const job_t *)arg;
    RANGE(j, t, n);
    const int64_t rowb = j->rowb, ldx = j->ldx, G = j->G, gp = j->gp;
    const uint8_t *wp = (const uint8_t *)j->w + a_ * rowb;
    const float *buf = j->x;
    const i4_fn(*tab)[MAXMC] = I4[rr_index(j->rr)];
#define I4_CALL(ri, i0, i1, c, n0, pf)                                                                 \
    tab[ri][p.cn[c] - 1](wp + (n0) * rowb, rowb, G, gp / 16, (n0) ? 1 : p.seg, i0, i1, buf + p.cs[c] * ldx, ldx, \
                         y + p.cs[c] * N + (n0), N, bias ? bias + (n0) : NULL, pf)
    WALK(p, Nr, rowb, I4_CALL);
}

/* ------------------------------------------------------------------ entry points */

/* y (M, N) = x (M, K) @ w (N, K).T (+ bias). Returns 0, or -2 on bad arguments. */
int tp_gemm_f32(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias, float *y,
                int rr, int mc) {
    if (bad_plan(M, rr, mc) || K < 1 || N < 1) return -2;
    job_t j = {.x = x, .w = w, .bias = bias, .y = y, .M = M, .K = K, .N = N, .ldx = K, .rowb = 4 * K, .rr = rr, .mc = mc};
    parallel_rows(f32_job, &j, N, N * K * 4);
    return 0;
}

/* y = (x @ q.T) * scale (+ bias). q: (N, Kp) int8 zero padded, Kp a multiple
 * of 8. Returns 0, -1 out of memory, -2 bad arguments. */
int tp_gemm_i8(const float *x, int64_t M, int64_t K, const int8_t *q, const float *scale, int64_t N, int64_t Kp,
               const float *bias, float *y, int rr, int mc) {
    if (bad_plan(M, rr, mc) || K < 1 || N < 1 || Kp < K || Kp % 8 || Kp - K >= 8) return -2;
    /* x padded to Kp with zeros: the weights' padding is zero, but 0 * (whatever
     * lies past the end of x) could be NaN. Once, before the threads split. */
    float *buf = NULL;
    const float *xp = x;
    if (Kp != K) {
        buf = (float *)aligned_alloc(64, (size_t)((M * Kp * 4 + 63) / 64 * 64));
        if (!buf) return -1;
        for (int64_t m = 0; m < M; m++) {
            memcpy(buf + m * Kp, x + m * K, (size_t)K * 4);
            memset(buf + m * Kp + K, 0, (size_t)(Kp - K) * 4);
        }
        xp = buf;
    }
    job_t j = {.x = xp, .w = q, .scale = scale, .bias = bias, .y = y, .M = M, .K = K, .N = N, .ldx = Kp, .rowb = Kp,
               .rr = rr, .mc = mc};
    parallel_rows(i8_job, &j, N, N * Kp);
    free(buf);
    return 0;
}

/* y = sum_g [scale_g * (x_g . u_g) + offset_g * sum(x_g)] (+ bias); with many
 * accumulators x_g . (u_g * scale_g) instead (see i4_rows). wp: N row
 * records (see i4_rows) of 8 * G + G * gp / 2 bytes; groups of gs inputs
 * padded to gp (a multiple of 16). Returns 0, -1 out of memory, -2 bad arguments. */
int tp_gemm_i4(const float *x, int64_t M, int64_t K, const uint8_t *wp, int64_t N, int64_t G, int64_t gs,
               int64_t gp, const float *bias, float *y, int rr, int mc) {
    if (bad_plan(M, rr, mc) || K < 1 || N < 1 || gs < 2 || G < 1 || G * gs != K || gp < gs || gp % 16 ||
        gp - gs >= 16)
        return -2;
    const int64_t g8 = (G + 7) / 8 * 8, kp = G * gp, ldx = kp + g8, rowb = 8 * G + kp / 2;
    /* x padded per group (zeros), then its group sums (float32, eight lanes
     * summed side by side then across: a scalar chain of K dependent adds
     * costs more than a small matrix's whole weight read). Once, before the
     * threads split. */
    float *buf = (float *)aligned_alloc(64, (size_t)((M * ldx * 4 + 63) / 64 * 64));
    if (!buf) return -1;
    for (int64_t m = 0; m < M; m++) {
        float *row = buf + m * ldx;
        for (int64_t g = 0; g < G; g++) {
            const float *src = x + m * K + g * gs;
            float *dst = row + g * gp;
            __m256 sum = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= gs; i += 8) {
                const __m256 v = _mm256_loadu_ps(src + i);
                _mm256_storeu_ps(dst + i, v);
                sum = _mm256_add_ps(sum, v);
            }
            float s = hsum1(sum);
            for (; i < gs; i++) {
                dst[i] = src[i];
                s += src[i];
            }
            for (i = gs; i < gp; i++) dst[i] = 0.0f;
            row[kp + g] = s;
        }
        for (int64_t g = G; g < g8; g++) row[kp + g] = 0.0f;
    }
    job_t j = {.x = buf, .w = wp, .bias = bias, .y = y, .M = M, .K = K, .N = N, .ldx = ldx, .rowb = rowb, .G = G,
               .gp = gp, .rr = rr, .mc = mc};
    parallel_rows(i4_job, &j, N, N * rowb);
    free(buf);
    return 0;
}

/* ------------------------------------------------------------------ bandwidth reference */

/* Sum of `bytes` bytes read as float32 (bytes a multiple of 64 * streams,
 * 32-byte aligned), in `streams` (1, 2, 4) equal slices read side by side:
 * how fast one core reads memory, the reference the benchmark compares the
 * GEMMs with. Eight independent sums, nothing else per load. */
float tp_gemm_read_sum(const float *p, int64_t bytes, int streams) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    if (streams != 2 && streams != 4) streams = 1;
    const int64_t n = bytes / 4 / streams;
    if (streams == 1)
        for (int64_t i = 0; i + 64 <= n; i += 64)
            for (int j = 0; j < 8; j++) a[j] = _mm256_add_ps(a[j], _mm256_load_ps(p + i + 8 * j));
    else if (streams == 2)
        for (int64_t i = 0; i + 32 <= n; i += 32)
            for (int j = 0; j < 4; j++) {
                a[j] = _mm256_add_ps(a[j], _mm256_load_ps(p + i + 8 * j));
                a[j + 4] = _mm256_add_ps(a[j + 4], _mm256_load_ps(p + n + i + 8 * j));
            }
    else
        for (int64_t i = 0; i + 16 <= n; i += 16)
            for (int j = 0; j < 2; j++) {
                a[j] = _mm256_add_ps(a[j], _mm256_load_ps(p + i + 8 * j));
                a[j + 2] = _mm256_add_ps(a[j + 2], _mm256_load_ps(p + n + i + 8 * j));
                a[j + 4] = _mm256_add_ps(a[j + 4], _mm256_load_ps(p + 2 * n + i + 8 * j));
                a[j + 6] = _mm256_add_ps(a[j + 6], _mm256_load_ps(p + 3 * n + i + 8 * j));
            }
    for (int j = 1; j < 8; j++) a[0] = _mm256_add_ps(a[0], a[j]);
    return hsum1(a[0]);
}
