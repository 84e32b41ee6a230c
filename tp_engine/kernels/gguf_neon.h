/*
 * NEON kernels (AArch64 Advanced SIMD) for gguf_gemm.c: included by it under
 * -DTP_GGUF_NEON (gguf_gemm.py builds that on aarch64 / arm64), after the
 * scalar decoders. The row kernels have the AVX2 ones' signatures (rows_fn,
 * irows_fn) and the same plan tables (RR rows of W x MC rows of x), so the
 * entry points and their walk over the rows use them unchanged.
 *
 * Decode. Every format is first turned into signed bytes, 16 weights a
 * vector, with byte operations (nibble masks and shifts, vtst for the fifth
 * bits, vsli / vsri to join Q6_K's two bit fields): the value q of each
 * weight, less the format's offset (Q4_0 8, Q5_0 16, Q6_K 32), so that
 * w = scale * q - min. Vector i of a 256-weight block holds weights
 * 16 i .. 16 i + 15; of a 32-weight block, 0..15 and 16..31.
 *
 * float32 activations: the AVX2 dot mode, for every plan: per sub-block (one
 * scale) the sums x . q, the bytes widened to float 4 at a time (two vmovl,
 * one vcvt) and one FMA per 4 weights per row of x; then one FMA of the
 * sub-block's scale (d * sc, kept 4 to a register, lane FMAs) with that sum.
 * Minimums (Q4_1, Q4_K, Q5_K) come from the sums of x over each 32 inputs
 * (sx). A scaled mode (w = q * d - m per 4 weights, then MC FMAs) would save
 * work only for Q6_K's 16-weight groups with MC > 4; one mode keeps every
 * output's order of operations independent of the plan.
 *
 * int8 activations: the integer dot products of the AVX2 path, with
 * sdot (vdotq_s32, the dot-product extension: 16 byte products into 4 int32
 * lanes in one instruction) or, on cores without it (Cortex-A72, A53),
 * smull + smlal2 + sadalp (products are at most 2 * 128 * 127 in an int16
 * pair: no saturation). Weights and x are both signed bytes (no vpsignb
 * trick). K-quants multiply the per-sub-block int32 sums by the sub-block
 * scale in int32 (vmla); every int32 lane stays below 2^24 (Q5_K:
 * 8 sub-blocks x 8 products x 31 x 127 x 63; Q6_K: per half, 8 x 4 x 32 x
 * 127 x 128), so its conversion to float is exact; then one FMA of
 * d_w * dx per block (Q6_K: per half). Both variants are compiled (the sdot
 * one with a target attribute, the rest of the file for baseline ARMv8-A)
 * and picked at run time: getauxval(AT_HWCAP) & HWCAP_ASIMDDP on Linux,
 * sysctl hw.optional.arm.FEAT_DotProd on macOS.
 *
 * Numerics: float32 accumulation in a fixed order per 4-lane vector, then
 * vaddvq (pairwise, fixed). A term goes through at most 8 steps of its
 * sub-block sum, one scale FMA, K / 16 steps of the row's sum and 3 adds,
 * inside the K / 4 + 16 roundings the AVX2 tests' bound allows; int8: the
 * exact integers, then 2 K / 32 + 8 at most, the AVX2 int8 bound. An
 * output's order of operations depends neither on the plan (RR, MC) nor on
 * which thread's row range it lies in: the same bits for every plan and
 * thread count (int8: for a given M; M = 1 alternates two sums, as AVX2).
 *
 * The code stays out of the scheduler's way where it hurt (GCC 12, checked
 * by counting stack spills in the disassembly): NEXT_ROW() between rows of W
 * (else the rows' shared x vectors are kept live and spilled), sub-block
 * scales in vector lanes (a scalar float takes a whole vector register).
 */
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
#endif

/* The sdot variant: where the whole build has the extension (e.g. Apple
 * clang's default arm64 target) the intrinsic as is; else under a target
 * attribute. GCC's arm_neon.h gives vdotq_s32 the armv8.2-a arch ("+dotprod"
 * alone cannot inline it); clang before ~17 declares vdotq_s32 only where
 * the whole build has the extension, so there its builtin (34: int32x4). */
#if defined(__ARM_FEATURE_DOTPROD)
#define TP_NEON_DOTPROD_ATTR
#define TP_NEON_SDOT(acc, a, b) vdotq_s32((acc), (a), (b))
#elif defined(__clang__)
#define TP_NEON_DOTPROD_ATTR __attribute__((target("dotprod")))
#if __has_builtin(__builtin_neon_vdotq_v)
#define TP_NEON_SDOT(acc, a, b) ((int32x4_t)__builtin_neon_vdotq_v((int8x16_t)(acc), (a), (b), 34))
#else
#define TP_NEON_SDOT(acc, a, b) vdotq_s32((acc), (a), (b))
#endif
#else
#define TP_NEON_DOTPROD_ATTR __attribute__((target("arch=armv8.2-a+dotprod")))
#define TP_NEON_SDOT(acc, a, b) vdotq_s32((acc), (a), (b))
#endif

/* Whether this CPU has the dot-product instructions (asked once). */
static int neon_has_dotprod(void) {
    static int cached = -1;
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v < 0) {
#if defined(__linux__)
        v = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
        int has = 0; /* hw.optional.arm.FEAT_DotProd: macOS 12 and later; absent: no sdot kernels */
        size_t len = sizeof has;
        v = sysctlbyname("hw.optional.arm.FEAT_DotProd", &has, &len, 0, 0) == 0 && has;
#else
        v = 0; /* no way to ask here: the baseline kernels */
#endif
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
}

int tp_gguf_is_neon(void) { return 1 + neon_has_dotprod(); }

/* ------------------------------------------------------------------ decoders: blocks -> signed bytes */

INLINE int8x16_t s8(uint8x16_t v) { return vreinterpretq_s8_u8(v); }

/* acc + a * v[L] for L a constant after inlining (clang wants the lane of the intrinsic as a literal) */
INLINE float32x4_t fma_lane(float32x4_t acc, float32x4_t a, float32x4_t v, const int L) {
    switch (L) {
    case 0: return vfmaq_laneq_f32(acc, a, v, 0);
    case 1: return vfmaq_laneq_f32(acc, a, v, 1);
    case 2: return vfmaq_laneq_f32(acc, a, v, 2);
    default: return vfmaq_laneq_f32(acc, a, v, 3);
    }
}
INLINE int32x4_t mla_lane(int32x4_t acc, int32x4_t a, int32x4_t v, const int L) {
    switch (L) {
    case 0: return vmlaq_laneq_s32(acc, a, v, 0);
    case 1: return vmlaq_laneq_s32(acc, a, v, 1);
    case 2: return vmlaq_laneq_s32(acc, a, v, 2);
    default: return vmlaq_laneq_s32(acc, a, v, 3);
    }
}

/* 16 bits -> 16 bytes, 0x10 where the bit is set (bit j -> byte j) */
INLINE uint8x16_t bits16(uint32_t h) {
    static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t v = vcombine_u8(vdup_n_u8((uint8_t)h), vdup_n_u8((uint8_t)(h >> 8)));
    return vandq_u8(vtstq_u8(v, vld1q_u8(bit)), vdupq_n_u8(0x10));
}

/* 32-weight formats: weights 0..15 in q[0], 16..31 in q[1]. FMT: the ggml type id (a constant). */
INLINE void ndec32(const int FMT, const uint8_t *br, int8x16_t q[2]) {
    const uint8x16_t m0f = vdupq_n_u8(0x0F);
    if (FMT == T_Q8_0) {
        q[0] = vld1q_s8((const int8_t *)br + 2);
        q[1] = vld1q_s8((const int8_t *)br + 18);
    } else if (FMT == T_Q4_1) {
        const uint8x16_t v = vld1q_u8(br + 4);
        q[0] = s8(vandq_u8(v, m0f));
        q[1] = s8(vshrq_n_u8(v, 4));
    } else if (FMT == T_Q4_0) {
        const uint8x16_t v = vld1q_u8(br + 2);
        q[0] = vsubq_s8(s8(vandq_u8(v, m0f)), vdupq_n_s8(8));
        q[1] = vsubq_s8(s8(vshrq_n_u8(v, 4)), vdupq_n_s8(8));
    } else { /* Q5_0: bit j of qh is the fifth bit of weight j */
        const uint8x16_t v = vld1q_u8(br + 6);
        uint32_t qh;
        memcpy(&qh, br + 2, 4);
        q[0] = vsubq_s8(s8(vorrq_u8(vandq_u8(v, m0f), bits16(qh))), vdupq_n_s8(16));
        q[1] = vsubq_s8(s8(vorrq_u8(vshrq_n_u8(v, 4), bits16(qh >> 16))), vdupq_n_s8(16));
    }
}

/* Q4_K / Q5_K, 64 weights c (sub-blocks 2c, 2c + 1) -> q[0..3] (weights 64c + 16 i ..). HB: Q5_K,
 * whose bit 2c of qh[l] is the fifth bit of weight 64c + l, bit 2c + 1 of weight 64c + 32 + l. */
INLINE void ndec_k45(const int HB, const uint8_t *br, int c, int8x16_t q[4]) {
    const uint8x16_t m0f = vdupq_n_u8(0x0F);
    const uint8_t *qs = br + (HB ? 48 : 16) + 32 * c;
    const uint8x16_t v0 = vld1q_u8(qs), v1 = vld1q_u8(qs + 16);
    uint8x16_t l0 = vandq_u8(v0, m0f), l1 = vandq_u8(v1, m0f), h0 = vshrq_n_u8(v0, 4), h1 = vshrq_n_u8(v1, 4);
    if (HB) {
        const uint8x16_t qh0 = vld1q_u8(br + 16), qh1 = vld1q_u8(br + 32), b4 = vdupq_n_u8(0x10);
        const uint8x16_t bl = vdupq_n_u8((uint8_t)(1u << (2 * c))), bh = vdupq_n_u8((uint8_t)(2u << (2 * c)));
        l0 = vorrq_u8(l0, vandq_u8(vtstq_u8(qh0, bl), b4));
        l1 = vorrq_u8(l1, vandq_u8(vtstq_u8(qh1, bl), b4));
        h0 = vorrq_u8(h0, vandq_u8(vtstq_u8(qh0, bh), b4));
        h1 = vorrq_u8(h1, vandq_u8(vtstq_u8(qh1, bh), b4));
    }
    q[0] = s8(l0), q[1] = s8(l1), q[2] = s8(h0), q[3] = s8(h1);
}

/* Q6_K, half h, l = 16p .. 16p + 15 -> q[i] = weights 128h + 32i + l (16-weight group g = 2i + p of
 * the half, scale sc[8h + g]), less 32. gguf's layout (deq_q6_k): weight l is lo(ql[l]) | qh[l] bits 0-1,
 * l + 32 lo(ql[l + 32]) | bits 2-3, l + 64 hi(ql[l]) | bits 4-5, l + 96 hi(ql[l + 32]) | bits 6-7. */
INLINE void ndec_q6(const uint8_t *br, int h, int p, int8x16_t q[4]) {
    const uint8x16_t a = vld1q_u8(br + 64 * h + 16 * p), b = vld1q_u8(br + 64 * h + 32 + 16 * p);
    const uint8x16_t qh = vld1q_u8(br + 128 + 32 * h + 16 * p), m3f = vdupq_n_u8(0x3F);
    const int8x16_t o32 = vdupq_n_s8(32);
    /* vsli(a, qh, 4) = qh << 4 | a & 0x0F; vsri(qh, a, 4) = a >> 4 | qh & 0xF0; 0x3F keeps the 6 bits */
    q[0] = vsubq_s8(s8(vandq_u8(vsliq_n_u8(a, qh, 4), m3f)), o32);
    q[1] = vsubq_s8(s8(vandq_u8(vsliq_n_u8(b, vshrq_n_u8(qh, 2), 4), m3f)), o32);
    q[2] = vsubq_s8(s8(vandq_u8(vsriq_n_u8(qh, a, 4), m3f)), o32);
    q[3] = vsubq_s8(s8(vandq_u8(vsriq_n_u8(vshrq_n_u8(qh, 2), b, 4), m3f)), o32);
}

/* ------------------------------------------------------------------ float32 activations */

typedef float32x4_t nacc_t[MAXR][MAXMC];

/* The end of one row of W's work on a block. Without it GCC keeps the x
 * vectors the block's rows share live from one row to the next (common
 * subexpressions: up to 64 of them) and spills; L1 reloads are cheaper. */
#define NEXT_ROW() __asm__ volatile("" ::: "memory")

/* a[m] += (16 bytes as float) * x[m][off .. off + 15] for m < MC */
INLINE void nsum16(const int MC, float32x4_t *a, int8x16_t q, const float *xb, int64_t ldx, int off) {
    const int16x8_t l = vmovl_s8(vget_low_s8(q)), h = vmovl_high_s8(q);
    const float32x4_t f0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(l))), f1 = vcvtq_f32_s32(vmovl_high_s16(l));
    const float32x4_t f2 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), f3 = vcvtq_f32_s32(vmovl_high_s16(h));
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++) {
        const float *xm = xb + m * ldx + off;
        a[m] = vfmaq_f32(a[m], f0, vld1q_f32(xm));
        a[m] = vfmaq_f32(a[m], f1, vld1q_f32(xm + 4));
        a[m] = vfmaq_f32(a[m], f2, vld1q_f32(xm + 8));
        a[m] = vfmaq_f32(a[m], f3, vld1q_f32(xm + 12));
    }
}
#define NZERO(a) _Pragma("GCC unroll 8") for (int m = 0; m < MC; m++) a[m] = vdupq_n_f32(0.0f)
#define NTOT(r, a, s)                                                                          \
    do {                                                                                       \
        const float s_ = (s);                                                                  \
        _Pragma("GCC unroll 8") for (int m = 0; m < MC; m++) acc[r][m] = vfmaq_n_f32(acc[r][m], a[m], s_); \
    } while (0)
/* the same with the scale in lane L (a constant) of v: sub-block scales 4 to a register, not 1 */
#define NTOTL(r, a, v, L)                                                                      \
    do {                                                                                       \
        _Pragma("GCC unroll 8") for (int m = 0; m < MC; m++) acc[r][m] = fma_lane(acc[r][m], a[m], v, L); \
    } while (0)

/* d * scale of 4 sub-blocks (4 bytes at p, unsigned or signed), in the 4 lanes (d * sc rounded once, as
 * in the AVX2 kernels) */
INLINE float32x4_t nscales_u8(const uint8_t *p, float d) {
    uint32_t v;
    memcpy(&v, p, 4);
    return vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(v))))), d);
}
INLINE float32x4_t nscales_s8(const int8_t *p, float d) {
    uint32_t v;
    memcpy(&v, p, 4);
    return vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vcreate_s8(v))))), d);
}

/* Block kernels: RR blocks (row r's at bp + r * ldr) against the block's inputs of MC rows of x (xb,
 * row stride ldx); sxb: the sums of x over the block's 32-input groups (row stride ldsx). */
INLINE void nf_32(const int FMT, const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb,
                  int64_t ldx, const float *sxb, int64_t ldsx, nacc_t acc, float corr[MAXR][MAXMC]) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        int8x16_t q[2];
        ndec32(FMT, br, q);
        float32x4_t a[MAXMC];
        NZERO(a);
        nsum16(MC, a, q[0], xb, ldx, 0);
        nsum16(MC, a, q[1], xb, ldx, 16);
        NTOT(r, a, f16(br));
        if (FMT == T_Q4_1) {
            const float mn = f16(br + 2);
            for (int m = 0; m < MC; m++) corr[r][m] += mn * sxb[m * ldsx];
        }
        NEXT_ROW();
    }
}

INLINE void nf_k45(const int HB, const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb,
                   int64_t ldx, const float *sxb, int64_t ldsx, nacc_t acc) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        uint8_t sc[8], mn[8];
        kscales(br + 4, sc, mn);
        const float d = f16(br);
#pragma GCC unroll 1
        for (int hf = 0; hf < 2; hf++) { /* sub-blocks 4 hf .. 4 hf + 3 */
            const float32x4_t ds = nscales_u8(sc + 4 * hf, d);
#pragma GCC unroll 2
            for (int cc = 0; cc < 2; cc++) {
                const int c = 2 * hf + cc;
                int8x16_t q[4];
                ndec_k45(HB, br, c, q);
                float32x4_t a[MAXMC];
                NZERO(a);
                nsum16(MC, a, q[0], xb, ldx, 64 * c);
                nsum16(MC, a, q[1], xb, ldx, 64 * c + 16);
                NTOTL(r, a, ds, 2 * cc);
                NZERO(a);
                nsum16(MC, a, q[2], xb, ldx, 64 * c + 32);
                nsum16(MC, a, q[3], xb, ldx, 64 * c + 48);
                NTOTL(r, a, ds, 2 * cc + 1);
            }
        }
        /* minus dmin * mn[j] * (sum of x over sub-block j), sub-blocks 0-3 and 4-7 in the lanes */
        const uint16x8_t mn16 = vmovl_u8(vld1_u8(mn));
        const float dmin = f16(br + 2);
        const float32x4_t dm0 = vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(mn16))), dmin);
        const float32x4_t dm1 = vmulq_n_f32(vcvtq_f32_u32(vmovl_high_u16(mn16)), dmin);
        for (int m = 0; m < MC; m++) {
            acc[r][m] = vfmsq_f32(acc[r][m], dm0, vld1q_f32(sxb + m * ldsx));
            acc[r][m] = vfmsq_f32(acc[r][m], dm1, vld1q_f32(sxb + m * ldsx + 4));
        }
        NEXT_ROW();
    }
}

INLINE void nf_q6_k(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                    nacc_t acc) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const float d = f16(br + 208);
#pragma GCC unroll 1
        for (int h = 0; h < 2; h++) {
            /* d * sc[8h + g], g = 0..7 */
            const float32x4_t ds[2] = {nscales_s8((const int8_t *)br + 192 + 8 * h, d),
                                       nscales_s8((const int8_t *)br + 196 + 8 * h, d)};
#pragma GCC unroll 2
            for (int p = 0; p < 2; p++) {
                int8x16_t q[4];
                ndec_q6(br, h, p, q);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) { /* group g = 2i + p: weights 128h + 16g .. */
                    const int g = 2 * i + p;
                    float32x4_t a[MAXMC];
                    NZERO(a);
                    nsum16(MC, a, q[i], xb, ldx, 128 * h + 16 * g);
                    NTOTL(r, a, ds[g / 4], g % 4);
                }
            }
        }
        NEXT_ROW();
    }
}

INLINE void nblk(const int FMT, const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb,
                 int64_t ldx, const float *sxb, int64_t ldsx, nacc_t acc, float corr[MAXR][MAXMC]) {
    if (FMT == T_Q4_K || FMT == T_Q5_K)
        nf_k45(FMT == T_Q5_K, RR, MC, bp, ldr, xb, ldx, sxb, ldsx, acc);
    else if (FMT == T_Q6_K)
        nf_q6_k(RR, MC, bp, ldr, xb, ldx, acc);
    else
        nf_32(FMT, RR, MC, bp, ldr, xb, ldx, sxb, ldsx, acc, corr);
}

/* Rows i0..i1-1 of each of RR slices (slice r starts seg rows after slice r - 1) against MC rows of x;
 * y[m * ldy + i + r * seg]. sx: the sums of x over each 32 inputs (row stride ldsx). */
typedef void (*rows_fn)(const uint8_t *w, int64_t rowb, int64_t nb, int64_t seg, int64_t i0, int64_t i1,
                        const float *x, int64_t ldx, const float *sx, int64_t ldsx, float *y, int64_t ldy);

#define DEF_NROWS(FMT, ID, QK, QB, RR, MC)                                                                   \
    static void n_##FMT##_##RR##_##MC(const uint8_t *w, int64_t rowb, int64_t nb, int64_t seg, int64_t i0,   \
                                      int64_t i1, const float *x, int64_t ldx, const float *sx, int64_t ldsx, \
                                      float *y, int64_t ldy) {                                               \
        const int64_t ldr = seg * rowb;                                                                      \
        for (int64_t i = i0; i < i1; i++) {                                                                  \
            const uint8_t *wi = w + i * rowb;                                                                \
            nacc_t acc;                                                                                      \
            float corr[MAXR][MAXMC] = {{0}};                                                                 \
            for (int r = 0; r < RR; r++)                                                                     \
                for (int m = 0; m < MC; m++) acc[r][m] = vdupq_n_f32(0.0f);                                  \
            for (int64_t b = 0; b < nb; b++)                                                                 \
                nblk(ID, RR, MC, wi + b * QB, ldr, x + b * QK, ldx, sx + b * (QK / 32), ldsx, acc, corr);    \
            for (int r = 0; r < RR; r++)                                                                     \
                for (int m = 0; m < MC; m++) y[m * ldy + i + r * seg] = vaddvq_f32(acc[r][m]) + corr[r][m];  \
        }                                                                                                    \
    }

/* The AVX2 build's plans (RR, MC) (gguf_gemm.py picks them per M), in a
 * table of its shape [mode][log2(RR)][MC - 1]. One mode here: the walk's
 * DOTMODE is 0, and both halves hold the same kernels. A kernel's order of
 * operations per output does not depend on RR, MC or the row range, so
 * results are bitwise the same for any plan and thread count. */
#define DOTMODE(RR, MC) 0
#define NROW1(FMT) n_##FMT##_1_1, n_##FMT##_1_2, n_##FMT##_1_3, n_##FMT##_1_4, n_##FMT##_1_5, n_##FMT##_1_6, \
                   n_##FMT##_1_7, n_##FMT##_1_8
#define NROW2(FMT) n_##FMT##_2_1, n_##FMT##_2_2, n_##FMT##_2_3, n_##FMT##_2_4, 0, 0, 0, 0
#define NROW4(FMT) n_##FMT##_4_1, n_##FMT##_4_2, 0, 0, 0, 0, 0, 0
#define DEF_NFMT(FMT, ID, QK, QB)                                                                                 \
    DEF_NROWS(FMT, ID, QK, QB, 4, 1) DEF_NROWS(FMT, ID, QK, QB, 4, 2) DEF_NROWS(FMT, ID, QK, QB, 2, 1)           \
    DEF_NROWS(FMT, ID, QK, QB, 2, 2) DEF_NROWS(FMT, ID, QK, QB, 2, 3) DEF_NROWS(FMT, ID, QK, QB, 2, 4)           \
    DEF_NROWS(FMT, ID, QK, QB, 1, 1) DEF_NROWS(FMT, ID, QK, QB, 1, 2) DEF_NROWS(FMT, ID, QK, QB, 1, 3)           \
    DEF_NROWS(FMT, ID, QK, QB, 1, 4) DEF_NROWS(FMT, ID, QK, QB, 1, 5) DEF_NROWS(FMT, ID, QK, QB, 1, 6)           \
    DEF_NROWS(FMT, ID, QK, QB, 1, 7) DEF_NROWS(FMT, ID, QK, QB, 1, 8)                                            \
    static const rows_fn n_##FMT##_tab[2][3][MAXMC] = {{{NROW1(FMT)}, {NROW2(FMT)}, {NROW4(FMT)}},               \
                                                       {{NROW1(FMT)}, {NROW2(FMT)}, {NROW4(FMT)}}};

DEF_NFMT(q4_0, T_Q4_0, 32, 18)
DEF_NFMT(q4_1, T_Q4_1, 32, 20)
DEF_NFMT(q5_0, T_Q5_0, 32, 22)
DEF_NFMT(q8_0, T_Q8_0, 32, 34)
DEF_NFMT(q4_k, T_Q4_K, 256, 144)
DEF_NFMT(q5_k, T_Q5_K, 256, 176)
DEF_NFMT(q6_k, T_Q6_K, 256, 210)

typedef const rows_fn (*neon_tab_t)[3][MAXMC];

/* The float32-activation row kernels of format t (0 for an unknown one). */
static neon_tab_t neon_tab(int t) {
    switch (t) {
    case T_Q4_0: return n_q4_0_tab;
    case T_Q4_1: return n_q4_1_tab;
    case T_Q5_0: return n_q5_0_tab;
    case T_Q8_0: return n_q8_0_tab;
    case T_Q4_K: return n_q4_k_tab;
    case T_Q5_K: return n_q5_k_tab;
    case T_Q6_K: return n_q6_k_tab;
    default: return 0;
    }
}

/* sx[m * (K / 32) + g] = the sum of x[m][32 g .. 32 g + 31] (any fixed order: the tests' bound covers it) */
static void neon_sums32(const float *x, int64_t M, int64_t K, float *sx) {
    const int64_t ls = K / 32;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ls; g++) {
            const float *p = x + m * K + 32 * g;
            float32x4_t s0 = vaddq_f32(vld1q_f32(p), vld1q_f32(p + 4)), s1 = vaddq_f32(vld1q_f32(p + 8), vld1q_f32(p + 12));
            float32x4_t s2 = vaddq_f32(vld1q_f32(p + 16), vld1q_f32(p + 20));
            float32x4_t s3 = vaddq_f32(vld1q_f32(p + 24), vld1q_f32(p + 28));
            sx[m * ls + g] = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
        }
}

/* ------------------------------------------------------------------ int8 activations */

/* x (M, K) -> q int8 (M, K), d float (M, K / qx), s int16 (M, K / 32): quantize_x_scalar's rule, bitwise
 * (vcvtnq rounds half to even, as rne does; 127 / amax and amax / 127 the same float divisions). */
static void neon_quantize_x(const float *x, int64_t M, int64_t K, int qx, int8_t *q, float *d, int16_t *s) {
    const int64_t nbx = K / qx;
    const float32x4_t big = vdupq_n_f32(3.4028234663852886e38f);
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nbx; b++) {
            const float *xb = x + m * K + b * qx;
            int8_t *qb = q + m * K + b * qx;
            float32x4_t mx = vdupq_n_f32(0.0f);
            uint32x4_t bad = vdupq_n_u32(0);
            for (int j = 0; j < qx; j += 4) {
                const float32x4_t a = vabsq_f32(vld1q_f32(xb + j));
                mx = vmaxq_f32(mx, a);
                bad = vorrq_u32(bad, vmvnq_u32(vcleq_f32(a, big))); /* inf or NaN */
            }
            const float amax = vmaxvq_f32(mx);
            if (vmaxvq_u32(bad) || amax == 0.0f) {
                memset(qb, 0, (size_t)qx);
                d[m * nbx + b] = vmaxvq_u32(bad) ? __builtin_nanf("") : 0.0f;
            } else {
                const float is = 127.0f / amax;
                for (int j = 0; j < qx; j += 16) {
                    const int32x4_t i0 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + j), is));
                    const int32x4_t i1 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + j + 4), is));
                    const int32x4_t i2 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + j + 8), is));
                    const int32x4_t i3 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + j + 12), is));
                    const int16x8_t h0 = vcombine_s16(vqmovn_s32(i0), vqmovn_s32(i1));
                    const int16x8_t h1 = vcombine_s16(vqmovn_s32(i2), vqmovn_s32(i3));
                    vst1q_s8(qb + j, vcombine_s8(vqmovn_s16(h0), vqmovn_s16(h1)));
                }
                d[m * nbx + b] = amax / 127.0f;
            }
            for (int g = 0; g < qx / 32; g++)
                s[m * (K / 32) + b * (qx / 32) + g] =
                    (int16_t)(vaddlvq_s8(vld1q_s8(qb + 32 * g)) + vaddlvq_s8(vld1q_s8(qb + 32 * g + 16)));
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

typedef float32x4_t niacc_t[MAXR][GROUP];
typedef float icorr_t[MAXR][GROUP];

/* Rows i0..i1-1 of each of RR slices against mg (<= 16) rows of x. */
typedef void (*irows_fn)(const uint8_t *w, int64_t rowb, int64_t nb, int64_t seg, int64_t i0, int64_t i1,
                         const xq_t *X, int mg, float *y, int64_t ldy);

/* 16 signed byte products into 4 int32 lanes without sdot: smull, smlal2 (int16 pairs, |sum| <= 32512),
 * sadalp */
INLINE int32x4_t sdot_emul(int32x4_t acc, int8x16_t a, int8x16_t b) {
    const int16x8_t p = vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b);
    return vpadalq_s16(acc, p);
}

/* the int8 kernels twice: with sdot (suffix _dp) and without (_nd) */
#define I8_DOTPROD 1
#include "gguf_neon_i8.h"
#undef I8_DOTPROD
#define I8_DOTPROD 0
#include "gguf_neon_i8.h"
#undef I8_DOTPROD

/* The int8-activation row kernels of format t for this CPU (0 for an unknown format). */
static const irows_fn (*neon_i8_tab(int t))[2] {
    const int dp = neon_has_dotprod();
    switch (t) {
    case T_Q4_0: return dp ? ni8tab_q4_0_dp : ni8tab_q4_0_nd;
    case T_Q4_1: return dp ? ni8tab_q4_1_dp : ni8tab_q4_1_nd;
    case T_Q5_0: return dp ? ni8tab_q5_0_dp : ni8tab_q5_0_nd;
    case T_Q8_0: return dp ? ni8tab_q8_0_dp : ni8tab_q8_0_nd;
    case T_Q4_K: return dp ? ni8tab_q4_k_dp : ni8tab_q4_k_nd;
    case T_Q5_K: return dp ? ni8tab_q5_k_dp : ni8tab_q5_k_nd;
    case T_Q6_K: return dp ? ni8tab_q6_k_dp : ni8tab_q6_k_nd;
    default: return 0;
    }
}

/* The names gguf_gemm.c's walk and entry points use for the vector build's kernels. */
typedef neon_tab_t vec_tab_t;
#define vec_tab neon_tab
#define vec_sums32 neon_sums32
#define vec_i8_tab neon_i8_tab
#define vec_quantize_x neon_quantize_x
