/* SPDX-License-Identifier: Apache-2.0 */
/* mask_aesni_avx2.c: the "aesni" build for CPUs with AES-NI and AVX2 but no VAES
 * (Haswell to Skylake, Zen 1/2), compiled with -maes -mavx2.
 *
 * The cipher is mask_aesni.c's: 8 xmm blocks in flight (sa_bulk_aesni,
 * mask_x86.h). The quantizer is mask_vaes.c's AVX2 one (mask_avx2.h), 4 doubles per
 * ymm register, about half the cost per word of the SSE4.1 one; for the first key
 * it runs between that key's AES rounds, and each pair of keystream blocks is
 * joined into one ymm register to be added to the quantized words.
 */
#include "mask_avx2.h"

static void sa_ctr_bulk(const __m128i rk[11], uint64_t hi, uint64_t lo, uint8_t *dst,
                        size_t nblocks, int op)
{
    sa_ctr_bulk_aesni(rk, hi, lo, dst, nblocks, op);
}

/* mask_avx2.h's hook: each iteration encrypts 8 counter blocks (128 bytes of out)
 * and, between the AES rounds, quantizes the values those blocks mask. */
SA_INLINE size_t sa_fused_avx2(sa_qstate *q, uint8_t *out, const int wsz, const uint8_t *x,
                                const sa_dtype dt, size_t n, size_t base, const __m128i *rk,
                                const int8_t sign)
{
    const size_t xsz = dt == SA_F32 ? 4 : 8;
    const size_t words = SA_AESNI_LANES * SA_BLOCK_SIZE / (size_t)wsz; /* 32 or 16 */
    const int groups = (int)(words / 8);                              /* 4 or 2 */
    const __m128i bswap = sa_bswap128_mask(), one = _mm_set_epi64x(0, 1);
    /* base is a multiple of the chunk size, so block-aligned; the block index stays
     * far below 2^64, so the low counter half never wraps. */
    __m128i ctr = _mm_set_epi64x(0, (long long)((uint64_t)base / (uint64_t)(16 / wsz)));
    size_t i = 0;
    for (; i + words <= n; i += words) {
        __m128i b[SA_AESNI_LANES];
        __m256i o[4][2];
        for (int t = 0; t < SA_AESNI_LANES; t++) {
            b[t] = _mm_xor_si128(_mm_shuffle_epi8(ctr, bswap), rk[0]);
            ctr = _mm_add_epi64(ctr, one);
        }
        for (int r = 1; r < 10; r++) {
            for (int t = 0; t < SA_AESNI_LANES; t++)
                b[t] = _mm_aesenc_si128(b[t], rk[r]);
            if (r <= groups)
                sa_q8(q, x + xsz * (i + 8 * (size_t)(r - 1)), dt, wsz, o[r - 1]);
        }
        for (int t = 0; t < SA_AESNI_LANES; t++)
            b[t] = _mm_aesenclast_si128(b[t], rk[10]);
        for (int u = 0; u < SA_AESNI_LANES / 2; u++) {
            /* Keystream blocks 2u and 2u + 1 cover output bytes [32u, 32u + 32). */
            const __m256i ks = _mm256_inserti128_si256(_mm256_castsi128_si256(b[2 * u]),
                                                       b[2 * u + 1], 1);
            const __m256i w = wsz == 4 ? o[u][0] : o[u / 2][u % 2];
            const __m256i r = sign < 0 ? (wsz == 4 ? _mm256_sub_epi32(w, ks)
                                                   : _mm256_sub_epi64(w, ks))
                                       : (wsz == 4 ? _mm256_add_epi32(w, ks)
                                                   : _mm256_add_epi64(w, ks));
            _mm256_storeu_si256((__m256i *)(void *)(out + (size_t)wsz * i + 32 * (size_t)u), r);
        }
    }
    return i;
}

const sa_kernel sa_kernel_aesni_avx2 = SA_X86_KERNEL("aesni");
