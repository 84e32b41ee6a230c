/*
 * AVX-512 float32-activation dot-mode kernel for Q4_K / Q5_K (gguf_gemm.c's
 * -DTP_GGUF_AVX512 build; replaces the AVX2 dot_k45 there). As the AVX2
 * kernel: the nibbles (and fifth bits) of 64 weights split with byte
 * operations into a 64-byte staging buffer, then per 16 weights one
 * vpmovzxbd + vcvtdq2ps + FMA with x on 512-bit vectors (half the
 * instructions of 8 at a time), the two halves of a sub-block's sum added
 * into 8 lanes before the FMA with its scale. The order of the float sums is
 * fixed (and independent of the thread split) but not AVX2's: results agree
 * with AVX2's within float32 rounding, not bitwise.
 */

#define DOT16(a, qi, off)                                                                     \
    do {                                                                                      \
        const __m512 qf_ = _mm512_cvtepi32_ps(qi);                                            \
        _Pragma("GCC unroll 2") for (int m = 0; m < MC; m++) a[m] =                           \
            _mm512_fmadd_ps(qf_, _mm512_loadu_ps(xb + (m) * ldx + (off)), a[m]);              \
    } while (0)
/* 16 lanes -> 8: lane j + lane j + 8 */
INLINE __m256 fold16(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

INLINE void dot_k45(const int RR, const int MC, const int HB, const uint8_t *bp, int64_t ldr, const float *xb,
                    int64_t ldx, const float *sxb, int64_t ldsx, acc_t acc) {
    const int qs0 = HB ? 48 : 16;
    const __m256i m0f = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    uint8_t q[64] __attribute__((aligned(64)));
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
            if (HB) { /* as the AVX2 kernel */
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
            __m512 alo[MAXMC], ahi[MAXMC];
            _Pragma("GCC unroll 2") for (int m = 0; m < MC; m++) alo[m] = ahi[m] = _mm512_setzero_ps();
#pragma GCC unroll 2
            for (int l = 0; l < 32; l += 16) {
                DOT16(alo, _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(q + l))), 64 * c + l);
                DOT16(ahi, _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(q + 32 + l))), 64 * c + 32 + l);
            }
            const __m256 s0 = _mm256_permutevar8x32_ps(dsc, _mm256_set1_epi32(2 * c));
            const __m256 s1 = _mm256_permutevar8x32_ps(dsc, _mm256_set1_epi32(2 * c + 1));
            _Pragma("GCC unroll 2") for (int m = 0; m < MC; m++) {
                acc[r][m] = _mm256_fmadd_ps(s0, fold16(alo[m]), acc[r][m]);
                acc[r][MC + m] = _mm256_fmadd_ps(s1, fold16(ahi[m]), acc[r][MC + m]);
            }
        }
        /* minus dmin * mn[j] * (sum of x over sub-block j), the 8 sub-blocks in the 8 lanes (as AVX2) */
        const __m256 dm = _mm256_mul_ps(_mm256_set1_ps(f16(br + 2)),
                                        CVT(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn8))));
        for (int m = 0; m < MC; m++) acc[r][m] = _mm256_fnmadd_ps(dm, _mm256_loadu_ps(sxb + m * ldsx), acc[r][m]);
    }
}

/* Q6_K: the 6-bit values less 32 times their int8 scale, in int16 (|q sc| <=
 * 32 * 128: exact), widened to int32 and converted (exact) 16 at a time, one
 * FMA with x each; d once per block (y += d * sum x (q sc)). A third fewer
 * float operations than the AVX2 kernel's (a convert and an FMA per 8
 * weights, then an FMA with d sc per 8), which is what limits it. */
INLINE void dot_q6_k(const int RR, const int MC, const uint8_t *bp, int64_t ldr, const float *xb, int64_t ldx,
                     const float *sxb, int64_t ldsx, acc_t acc, float corr[MAXR][MAXMC]) {
    (void)sxb, (void)ldsx, (void)corr;
    const __m256i m0f = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30), o32 = _mm256_set1_epi8(32);
    /* word e of the scale vector of q_i (i = 0..3) in half h: scale 8 h + 2 i + e / 16 */
    const __m512i e16 = _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
                                                           16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          4);
#pragma GCC unroll 4
    for (int r = 0; r < RR; r++) {
        const uint8_t *br = bp + r * ldr;
        const __m512i s16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(br + 192))));
        __m512 a0[MAXMC], a1[MAXMC];
        _Pragma("GCC unroll 2") for (int m = 0; m < MC; m++) a0[m] = a1[m] = _mm512_setzero_ps();
#pragma GCC unroll 1
        for (int h = 0; h < 2; h++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(br + 64 * h));
            const __m256i b = _mm256_loadu_si256((const __m256i *)(br + 64 * h + 32));
            const __m256i hq = _mm256_loadu_si256((const __m256i *)(br + 128 + 32 * h));
            __m256i qv[4];
            qv[0] = _mm256_or_si256(_mm256_and_si256(a, m0f), _mm256_and_si256(_mm256_slli_epi16(hq, 4), m30));
            qv[1] = _mm256_or_si256(_mm256_and_si256(b, m0f), _mm256_and_si256(_mm256_slli_epi16(hq, 2), m30));
            qv[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m0f), _mm256_and_si256(hq, m30));
            qv[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), m0f),
                                    _mm256_and_si256(_mm256_srli_epi16(hq, 2), m30));
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                const __m512i sv = _mm512_permutexvar_epi16(
                    _mm512_add_epi16(e16, _mm512_set1_epi16((short)(8 * h + 2 * i))), s16);
                const __m512i p = _mm512_mullo_epi16(_mm512_cvtepi8_epi16(_mm256_sub_epi8(qv[i], o32)), sv);
                const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(p)));
                const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(p, 1)));
                const int off = 128 * h + 32 * i;
                _Pragma("GCC unroll 2") for (int m = 0; m < MC; m++) {
                    a0[m] = _mm512_fmadd_ps(f0, _mm512_loadu_ps(xb + m * ldx + off), a0[m]);
                    a1[m] = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xb + m * ldx + off + 16), a1[m]);
                }
            }
        }
        const __m256 d = _mm256_set1_ps(f16(br + 208));
        _Pragma("GCC unroll 2") for (int m = 0; m < MC; m++) {
            acc[r][m] = _mm256_fmadd_ps(d, fold16(a0[m]), acc[r][m]);
            acc[r][MC + m] = _mm256_fmadd_ps(d, fold16(a1[m]), acc[r][MC + m]);
        }
    }
}
#undef DOT16
