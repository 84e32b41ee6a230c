/*
 * The NEON int8-activation kernels (see gguf_neon.h), a template included
 * twice by it: I8_DOTPROD 1 builds them with sdot (vdotq_s32, names ending
 * _dp, under the dot-product target attribute), 0 with smull / sadalp
 * (_nd, baseline ARMv8-A). One source, so the two can only differ in how
 * the 4 int32 lanes are filled (the integer totals are the same).
 */
#if I8_DOTPROD
#define I8_ATTR TP_NEON_DOTPROD_ATTR
#define I8_SFX dp
#define SDOT(acc, a, b) TP_NEON_SDOT(acc, a, b)
#else
#define I8_ATTR
#define I8_SFX nd
#define SDOT(acc, a, b) sdot_emul((acc), (a), (b))
#endif
#define I8_CAT_(a, b) a##_##b
#define I8_CAT(a, b) I8_CAT_(a, b)
#define I8N(name) I8_CAT(name, I8_SFX)
#define I8FN static inline __attribute__((always_inline)) I8_ATTR

/* 32-input formats: y += d_w dx (q . xq), Q4_1 also + m_w dx s (s: the sum of xq over the block) */
I8FN void I8N(ni8_32)(const int FMT, const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X,
                      int64_t b, niacc_t acc, icorr_t corr) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        int8x16_t q[2];
        ndec32(FMT, br, q);
        const float dw = f16(br), mw = FMT == T_Q4_1 ? f16(br + 2) : 0.0f;
#pragma GCC unroll 2
        for (int m = 0; m < mg; m++) {
            const int8_t *xq = XQ(m, 32, b);
            const int32x4_t t = SDOT(SDOT(vdupq_n_s32(0), q[0], vld1q_s8(xq)), q[1], vld1q_s8(xq + 16));
            const float dx = XD(m, 32, b);
            acc[r][m] = vfmaq_n_f32(acc[r][m], vcvtq_f32_s32(t), dw * dx);
            if (FMT == T_Q4_1) corr[r][m] += (mw * dx) * (float)*XS(m, b);
        }
        NEXT_ROW();
    }
}

/* Q4_K / Q5_K: y += d dx sum_j sc_j (q_j . xq_j) - dmin dx sum_j mn_j s_j (the scales applied in int32) */
I8FN void I8N(ni8_k45)(const int HB, const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X,
                       int64_t b, niacc_t acc) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        uint8_t sc[8], mn[8];
        kscales(br + 4, sc, mn);
        int8x16_t q[16];
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) ndec_k45(HB, br, c, q + 4 * c);
        const int16x8_t mn16 = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mn)));
        const uint16x8_t sc16 = vmovl_u8(vld1_u8(sc)); /* sub-block j's scale in lane j % 4 of sc32[j / 4] */
        const int32x4_t sc32[2] = {vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(sc16))),
                                   vreinterpretq_s32_u32(vmovl_high_u16(sc16))};
        const float d = f16(br), dmin = f16(br + 2);
#pragma GCC unroll 2
        for (int m = 0; m < mg; m++) {
            const int8_t *xq = XQ(m, 256, b);
            int32x4_t tot = vdupq_n_s32(0);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const int32x4_t t = SDOT(SDOT(vdupq_n_s32(0), q[2 * j], vld1q_s8(xq + 32 * j)), q[2 * j + 1],
                                         vld1q_s8(xq + 32 * j + 16));
                tot = mla_lane(tot, t, sc32[j / 4], j % 4);
            }
            const int16x8_t s = vld1q_s16(XS(m, 8 * b));
            const int32x4_t mins = vmlal_high_s16(vmull_s16(vget_low_s16(s), vget_low_s16(mn16)), s, mn16);
            const float dx = XD(m, 256, b);
            acc[r][m] = vfmaq_n_f32(acc[r][m], vcvtq_f32_s32(tot), d * dx);
            acc[r][m] = vfmsq_n_f32(acc[r][m], vcvtq_f32_s32(mins), dmin * dx);
        }
        NEXT_ROW();
    }
}

/* Q6_K: 16 groups of 16 signed 6-bit values (less 32), int8 scale each; per half (int32 lanes < 2^24)
 * y += d dx sum_g sc_g (q_g . xq_g) */
I8FN void I8N(ni8_q6_k)(const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X, int64_t b,
                        niacc_t acc) {
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const float d = f16(br + 208);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const int16x8_t s16 = vmovl_s8(vld1_s8((const int8_t *)br + 192 + 8 * h));
            const int32x4_t sc[2] = {vmovl_s16(vget_low_s16(s16)), vmovl_high_s16(s16)}; /* group g: lane g % 4 of sc[g / 4] */
            int8x16_t q[8]; /* q[g]: group g of the half */
#pragma GCC unroll 2
            for (int p = 0; p < 2; p++) {
                int8x16_t t[4];
                ndec_q6(br, h, p, t);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) q[2 * i + p] = t[i];
            }
#pragma GCC unroll 2
            for (int m = 0; m < mg; m++) {
                const int8_t *xq = XQ(m, 256, b) + 128 * h;
                int32x4_t tot = vdupq_n_s32(0);
#pragma GCC unroll 8
                for (int g = 0; g < 8; g++)
                    tot = mla_lane(tot, SDOT(vdupq_n_s32(0), q[g], vld1q_s8(xq + 16 * g)), sc[g / 4], g % 4);
                acc[r][m] = vfmaq_n_f32(acc[r][m], vcvtq_f32_s32(tot), d * XD(m, 256, b));
            }
        }
        NEXT_ROW();
    }
}

I8FN void I8N(ni8_blk)(const int FMT, const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X,
                       int64_t b, niacc_t acc, icorr_t corr) {
    if (FMT == T_Q4_K || FMT == T_Q5_K)
        I8N(ni8_k45)(FMT == T_Q5_K, RR, mg, bp, ldr, X, b, acc);
    else if (FMT == T_Q6_K)
        I8N(ni8_q6_k)(RR, mg, bp, ldr, X, b, acc);
    else
        I8N(ni8_32)(FMT, RR, mg, bp, ldr, X, b, acc, corr);
}

/* irows_fn: rows i0..i1-1 of each of RR slices against mg (<= 16) rows of x; MG1: mg is 1, known at
 * compile time (the accumulators stay in registers; odd blocks go to a second set, two FMA chains). */
#define DEF_NIROWS(FMT, ID, QB, RR, MG1)                                                                       \
    static I8_ATTR void I8_CAT(ni8r_##FMT##_##RR##_##MG1, I8_SFX)(const uint8_t *w, int64_t rowb, int64_t nb,  \
                                                                  int64_t seg, int64_t i0, int64_t i1,         \
                                                                  const xq_t *X, int mg, float *y, int64_t ldy) { \
        const int64_t ldr = seg * rowb;                                                                        \
        if (MG1) mg = 1;                                                                                       \
        for (int64_t i = i0; i < i1; i++) {                                                                    \
            const uint8_t *wi = w + i * rowb;                                                                  \
            niacc_t acc, acc2;                                                                                 \
            icorr_t corr, corr2;                                                                               \
            for (int r = 0; r < RR; r++)                                                                       \
                for (int m = 0; m < mg; m++)                                                                   \
                    acc[r][m] = acc2[r][m] = vdupq_n_f32(0.0f), corr[r][m] = corr2[r][m] = 0.0f;               \
            int64_t b = 0;                                                                                     \
            if (MG1)                                                                                           \
                for (; b + 1 < nb; b += 2) {                                                                   \
                    I8N(ni8_blk)(ID, RR, 1, wi + b * QB, ldr, X, b, acc, corr);                                \
                    I8N(ni8_blk)(ID, RR, 1, wi + (b + 1) * QB, ldr, X, b + 1, acc2, corr2);                    \
                }                                                                                              \
            for (; b < nb; b++) I8N(ni8_blk)(ID, RR, mg, wi + b * QB, ldr, X, b, acc, corr);                   \
            for (int r = 0; r < RR; r++)                                                                       \
                for (int m = 0; m < mg; m++)                                                                   \
                    y[m * ldy + i + r * seg] =                                                                 \
                        vaddvq_f32(vaddq_f32(acc[r][m], acc2[r][m])) + (corr[r][m] + corr2[r][m]);             \
        }                                                                                                      \
    }
#define DEF_NIFMT(FMT, ID, QB)                                                                                 \
    DEF_NIROWS(FMT, ID, QB, 1, 1) DEF_NIROWS(FMT, ID, QB, 2, 1) DEF_NIROWS(FMT, ID, QB, 4, 1)                  \
    DEF_NIROWS(FMT, ID, QB, 1, 0) DEF_NIROWS(FMT, ID, QB, 2, 0) DEF_NIROWS(FMT, ID, QB, 4, 0)                  \
    static const irows_fn I8_CAT(ni8tab_##FMT, I8_SFX)[3][2] = {                                               \
        {I8_CAT(ni8r_##FMT##_1_0, I8_SFX), I8_CAT(ni8r_##FMT##_1_1, I8_SFX)},                                  \
        {I8_CAT(ni8r_##FMT##_2_0, I8_SFX), I8_CAT(ni8r_##FMT##_2_1, I8_SFX)},                                  \
        {I8_CAT(ni8r_##FMT##_4_0, I8_SFX), I8_CAT(ni8r_##FMT##_4_1, I8_SFX)}};

DEF_NIFMT(q4_0, T_Q4_0, 18)
DEF_NIFMT(q4_1, T_Q4_1, 20)
DEF_NIFMT(q5_0, T_Q5_0, 22)
DEF_NIFMT(q8_0, T_Q8_0, 34)
DEF_NIFMT(q4_k, T_Q4_K, 144)
DEF_NIFMT(q5_k, T_Q5_K, 176)
DEF_NIFMT(q6_k, T_Q6_K, 210)

#undef DEF_NIFMT
#undef DEF_NIROWS
#undef I8FN
#undef I8N
#undef I8_CAT
#undef I8_CAT_
#undef SDOT
#undef I8_SFX
#undef I8_ATTR
