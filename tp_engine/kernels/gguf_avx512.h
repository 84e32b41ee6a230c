/*
 * AVX-512 (F, BW, VL, DQ, VNNI) int8-activation kernels for gguf_gemm.c's
 * -DTP_GGUF_AVX512 build (that build is the AVX2 build plus these and
 * gguf_avx512_f32.h's float ones: every other kernel is the AVX2 code,
 * compiled with the wider instruction set).
 *
 * Q4_K / Q5_K and Q6_K (the formats of a Q4_K_M file) replace the AVX2
 * i8_k45 / i8_q6_k. One 512-bit vector holds 64 weights (two of the AVX2
 * kernel's 32-byte vectors side by side); per row of x and 64 weights:
 * vpmaddubsw (unsigned weight bytes x signed x bytes -> int16 pairs), then
 * vpdpwssd (VNNI: int16 pairs x the sub-block scales, summed into the int32
 * accumulator: AVX2's vpmaddwd + vpaddd in one instruction). Q6_K's signed
 * weights: AVX-512 has no vpsignb, so |w| and a mask of w < 0 per row of W,
 * and x negated under that mask (one masked vpsubb per row of x).
 *
 * Same integers as the AVX2 kernels: lane j of the 256-bit sum of the two
 * halves holds the products of the same weights (4j..4j+3 of every 32) as
 * AVX2's lane j, and integer sums are exact (|t| < 2^24); the float steps
 * after it are AVX2's. So the results are bitwise the AVX2 int8 kernels'
 * (tests/test_gguf_kernels.py checks).
 *
 * Included by gguf_gemm.c inside its AVX2 section (needs ld32, XQ, XD, XS,
 * kscales, f16, iacc_t).
 */

INLINE __m512i ld64(const void *p) { return _mm512_loadu_si512(p); }
/* two 256-bit halves -> one 512-bit vector */
INLINE __m512i cat256(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
/* int32 x16 -> x8: lane j + lane j + 8 (exact) */
INLINE __m256i fold512(__m512i t) {
    return _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
}

/* Q4_K / Q5_K: vector c = sub-blocks 2c (low nibbles, low half) and 2c + 1
 * (high nibbles, high half): inputs 64 c .. 64 c + 63, contiguous in xq. */
INLINE void i8_k45(const int RR, const int mg, const int HB, const uint8_t *bp, int64_t ldr, const xq_t *X,
                   int64_t b, iacc_t acc) {
    const int qs0 = HB ? 48 : 16;
    const __m512i m0f = _mm512_set1_epi8(0x0F), b4 = _mm512_set1_epi8(0x10);
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        uint64_t sc8, mn8;
        kscales64(br + 4, &sc8, &mn8);
        /* the 8 scale bytes in every 128-bit lane; vector c's int16 words: sc[2c] (low half), sc[2c + 1]
         * (high half), by one in-lane vpshufb each (zero high bytes: index 0x80), not a cross-lane vpermw */
        const __m512i s8 = _mm512_broadcast_i32x4(_mm_cvtsi64_si128((long long)sc8));
        __m512i w[4], s16[4];
        const __m512i qh = HB ? _mm512_broadcast_i64x4(ld32(br + 16)) : b4;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            /* the 32 bytes in both halves (a broadcast load), the high half shifted: low / high nibbles */
            const __m512i v = _mm512_broadcast_i64x4(ld32(br + qs0 + 32 * c));
            __m512i q = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4), m0f);
            if (HB) { /* bit 2c of qh[l] -> bit 4 (low half), bit 2c + 1 -> bit 4 (high half): 16-bit
                       * right shift by the bit's index, then left by 4; the mask keeps bit 4 of each byte,
                       * which came from that byte's own bit */
                const __m512i cnt = cat256(_mm256_set1_epi16((short)(2 * c)), _mm256_set1_epi16((short)(2 * c + 1)));
                q = _mm512_or_si512(q, _mm512_and_si512(_mm512_slli_epi16(_mm512_srlv_epi16(qh, cnt), 4), b4));
            }
            w[c] = q;
            s16[c] = _mm512_shuffle_epi8(s8, cat256(_mm256_set1_epi16((short)(0x8000 | (2 * c))),
                                                    _mm256_set1_epi16((short)(0x8000 | (2 * c + 1)))));
        }
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn8));
        const float d = f16(br), dmin = f16(br + 2);
#pragma GCC unroll 2
        for (int m = 0; m < mg; m++) {
            const int8_t *xq = XQ(m, 256, b);
            __m512i t0 = _mm512_setzero_si512(), t1 = _mm512_setzero_si512();
            t0 = _mm512_dpwssd_epi32(t0, _mm512_maddubs_epi16(w[0], ld64(xq)), s16[0]);
            t1 = _mm512_dpwssd_epi32(t1, _mm512_maddubs_epi16(w[1], ld64(xq + 64)), s16[1]);
            t0 = _mm512_dpwssd_epi32(t0, _mm512_maddubs_epi16(w[2], ld64(xq + 128)), s16[2]);
            t1 = _mm512_dpwssd_epi32(t1, _mm512_maddubs_epi16(w[3], ld64(xq + 192)), s16[3]);
            const __m128i mins = _mm_madd_epi16(_mm_loadu_si128((const __m128i *)XS(m, 8 * b)), mn16);
            const float dx = XD(m, 256, b);
            acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(fold512(_mm512_add_epi32(t0, t1))),
                                        acc[r][m]);
            acc[r][m] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(_mm256_zextsi128_si256(mins)),
                                         acc[r][m]);
        }
    }
}

/* Q6_K: vector i = inputs 64 i .. 64 i + 63 (half i / 2: q1 q2 for even i,
 * q3 q4 for odd), 16 weights a scale: 128-bit lane l has scale 4 i + l. */
INLINE void i8_q6_k(const int RR, const int mg, const uint8_t *bp, int64_t ldr, const xq_t *X, int64_t b,
                    iacc_t acc, icorr_t corr) {
    (void)corr;
    const __m512i m0f = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), o32 = _mm512_set1_epi8(32);
    const __m512i sh_lo = cat256(_mm256_set1_epi16(4), _mm256_set1_epi16(2)); /* q1: qh << 4, q2: qh << 2 */
    const __m512i sh_hi = cat256(_mm256_set1_epi16(0), _mm256_set1_epi16(2)); /* q3: qh, q4: qh >> 2 */
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        __m512i aw[4], s16[4];
        __mmask64 neg[4];
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m512i a = ld64(br + 64 * h), hq = _mm512_broadcast_i64x4(ld32(br + 128 + 32 * h));
            const __m512i q12 = _mm512_or_si512(_mm512_and_si512(a, m0f), _mm512_and_si512(_mm512_sllv_epi16(hq, sh_lo), m30));
            const __m512i q34 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(a, 4), m0f),
                                                _mm512_and_si512(_mm512_srlv_epi16(hq, sh_hi), m30));
            const __m512i w12 = _mm512_sub_epi8(q12, o32), w34 = _mm512_sub_epi8(q34, o32);
            aw[2 * h] = _mm512_abs_epi8(w12);
            aw[2 * h + 1] = _mm512_abs_epi8(w34);
            neg[2 * h] = _mm512_movepi8_mask(w12);
            neg[2 * h + 1] = _mm512_movepi8_mask(w34);
        }
        /* the 16 scales as int16: words 0..7 / 8..15 in every 128-bit lane; word e of vector i is
         * scale 4 i + e / 8: one in-lane vpshufb each (a cross-lane vpermw was slower) */
        const __m256i s16all = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(br + 192)));
        const __m512i slo = _mm512_broadcast_i32x4(_mm256_castsi256_si128(s16all));
        const __m512i shi = _mm512_broadcast_i32x4(_mm256_extracti128_si256(s16all, 1));
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) { /* 128-bit lane l: word 4 (i % 2) + l, bytes 2 (4 (i % 2) + l) and + 1 */
            const int w0 = 2 * (4 * (i % 2));
            const __m128i c0 = _mm_set1_epi16((short)((w0 + 1) << 8 | w0));
            const __m128i c1 = _mm_set1_epi16((short)((w0 + 3) << 8 | (w0 + 2)));
            const __m128i c2 = _mm_set1_epi16((short)((w0 + 5) << 8 | (w0 + 4)));
            const __m128i c3 = _mm_set1_epi16((short)((w0 + 7) << 8 | (w0 + 6)));
            s16[i] = _mm512_shuffle_epi8(i < 2 ? slo : shi,
                                         _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(c1, c0)),
                                                            _mm256_set_m128i(c3, c2), 1));
        }
        const float d = f16(br + 208);
#pragma GCC unroll 2
        for (int m = 0; m < mg; m++) {
            const int8_t *xq = XQ(m, 256, b);
            __m512i t0 = _mm512_setzero_si512(), t1 = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int i = 0; i < 4; i += 2) {
                const __m512i x0 = ld64(xq + 64 * i), x1 = ld64(xq + 64 * i + 64);
                /* x with w's sign: -x where w < 0 (|x| <= 127: no overflow) */
                const __m512i sx0 = _mm512_mask_sub_epi8(x0, neg[i], _mm512_setzero_si512(), x0);
                const __m512i sx1 = _mm512_mask_sub_epi8(x1, neg[i + 1], _mm512_setzero_si512(), x1);
                t0 = _mm512_dpwssd_epi32(t0, _mm512_maddubs_epi16(aw[i], sx0), s16[i]);
                t1 = _mm512_dpwssd_epi32(t1, _mm512_maddubs_epi16(aw[i + 1], sx1), s16[i + 1]);
            }
            acc[r][m] = _mm256_fmadd_ps(_mm256_set1_ps(d * XD(m, 256, b)),
                                        _mm256_cvtepi32_ps(fold512(_mm512_add_epi32(t0, t1))), acc[r][m]);
        }
    }
}
