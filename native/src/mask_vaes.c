/* SPDX-License-Identifier: Apache-2.0 */
/* mask_vaes.c: the fused masking kernel with VAES on ymm registers and AVX2
 * (-mvaes -mavx2 -maes).
 *
 * VAESENC on a ymm register runs the AES round on two independent blocks. With a
 * latency of about 4 cycles and 2 issues per cycle (Zen 3/4, Ice Lake and later),
 * 8 ymm registers (16 blocks) are kept in flight. The quantizer (mask_avx2.h) works
 * on 4 doubles per ymm register, and for the first key it runs between that key's
 * AES rounds.
 *
 * No zmm path (yet): on Zen 4 a microbenchmark sustains about 3.9 AES block-rounds
 * per cycle with 8 zmm registers against about 3.0-3.4 with 8 ymm registers, but
 * this ymm kernel already meets DESIGN §6; a zmm path would need AVX-512F and the
 * XCR0 opmask/ZMM state (SA_CPU_AVX512F in cpu.c) as its own probe.
 */
#include "mask_avx2.h"

#define SA_VAES_LANES 8 /* ymm registers in flight, 2 blocks each */

SA_INLINE void sa_apply256(uint8_t *p, __m256i ks, const int op)
{
    if (op == SA_OP_STORE) {
        _mm256_storeu_si256((__m256i *)(void *)p, ks);
        return;
    }
    __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)p);
    switch (op) {
    case SA_OP_ADD32: v = _mm256_add_epi32(v, ks); break;
    case SA_OP_SUB32: v = _mm256_sub_epi32(v, ks); break;
    case SA_OP_ADD64: v = _mm256_add_epi64(v, ks); break;
    default: v = _mm256_sub_epi64(v, ks); break;
    }
    _mm256_storeu_si256((__m256i *)(void *)p, v);
}

SA_INLINE void sa_bulk_vaes(const __m128i rk[11], uint64_t hi, uint64_t lo, uint8_t *dst,
                            size_t nb, const int op)
{
    const __m256i bswap = _mm256_broadcastsi128_si256(sa_bswap128_mask());
    __m256i k[11];
    for (int r = 0; r < 11; r++)
        k[r] = _mm256_broadcastsi128_si256(rk[r]);
    /* Little-endian counters (low qword lo, high qword hi) for blocks i and i + 1 in
     * the two 128-bit lanes. The caller guarantees that lo does not wrap within nb
     * blocks, so 64-bit lane adds are exact; lanes past nb are never stored. */
    __m256i ctr = _mm256_set_epi64x((long long)hi, (long long)(lo + 1), (long long)hi,
                                    (long long)lo);
    const __m256i two = _mm256_set_epi64x(0, 2, 0, 2);
    size_t i = 0;
    for (; i + 2 * SA_VAES_LANES <= nb; i += 2 * SA_VAES_LANES) {
        __m256i b[SA_VAES_LANES];
        for (int t = 0; t < SA_VAES_LANES; t++) {
            b[t] = _mm256_xor_si256(_mm256_shuffle_epi8(ctr, bswap), k[0]);
            ctr = _mm256_add_epi64(ctr, two);
        }
        for (int r = 1; r < 10; r++)
            for (int t = 0; t < SA_VAES_LANES; t++)
                b[t] = _mm256_aesenc_epi128(b[t], k[r]);
        for (int t = 0; t < SA_VAES_LANES; t++) {
            b[t] = _mm256_aesenclast_epi128(b[t], k[10]);
            sa_apply256(dst + SA_BLOCK_SIZE * (i + 2 * (size_t)t), b[t], op);
        }
    }
    for (; i + 2 <= nb; i += 2) {
        __m256i b = _mm256_xor_si256(_mm256_shuffle_epi8(ctr, bswap), k[0]);
        ctr = _mm256_add_epi64(ctr, two);
        for (int r = 1; r < 10; r++)
            b = _mm256_aesenc_epi128(b, k[r]);
        b = _mm256_aesenclast_epi128(b, k[10]);
        sa_apply256(dst + SA_BLOCK_SIZE * i, b, op);
    }
    if (i < nb) {
        const __m128i b = sa_aes128_block(rk, _mm_shuffle_epi8(_mm256_castsi256_si128(ctr),
                                                               sa_bswap128_mask()));
        sa_apply128(dst + SA_BLOCK_SIZE * i, b, op);
    }
}

static void sa_ctr_bulk(const __m128i rk[11], uint64_t hi, uint64_t lo, uint8_t *dst,
                        size_t nblocks, int op)
{
    /* One specialized loop per operation, so the loop body has no branch. */
    switch (op) {
    case SA_OP_STORE: sa_bulk_vaes(rk, hi, lo, dst, nblocks, SA_OP_STORE); break;
    case SA_OP_ADD32: sa_bulk_vaes(rk, hi, lo, dst, nblocks, SA_OP_ADD32); break;
    case SA_OP_SUB32: sa_bulk_vaes(rk, hi, lo, dst, nblocks, SA_OP_SUB32); break;
    case SA_OP_ADD64: sa_bulk_vaes(rk, hi, lo, dst, nblocks, SA_OP_ADD64); break;
    default: sa_bulk_vaes(rk, hi, lo, dst, nblocks, SA_OP_SUB64); break;
    }
}

/* Words per fused iteration: 8 ymm keystream registers of 32 bytes each. */
#define SA_FUSED_BYTES (SA_VAES_LANES * 32)

/* mask_avx2.h's hook: each iteration encrypts 16 counter blocks (8 ymm) and, between
 * the AES rounds, quantizes the values those blocks mask, so the AES units and the
 * floating-point units work at the same time. */
SA_INLINE size_t sa_fused_avx2(sa_qstate *q, uint8_t *out, const int wsz, const uint8_t *x,
                                const sa_dtype dt, size_t n, size_t base, const __m128i *rk,
                                const int8_t sign)
{
    const size_t xsz = dt == SA_F32 ? 4 : 8;
    const size_t words = SA_FUSED_BYTES / (size_t)wsz; /* 64 or 32 */
    const int groups = (int)(words / 8);               /* 8 or 4 */
    const __m256i bswap = _mm256_broadcastsi128_si256(sa_bswap128_mask());
    __m256i k[11];
    for (int r = 0; r < 11; r++)
        k[r] = _mm256_broadcastsi128_si256(rk[r]);
    /* base is a multiple of the chunk size, so block-aligned; the block index
     * stays far below 2^64, so the low counter half never wraps. */
    const uint64_t blk = (uint64_t)base / (uint64_t)(SA_BLOCK_SIZE / wsz);
    __m256i ctr = _mm256_set_epi64x(0, (long long)(blk + 1), 0, (long long)blk);
    const __m256i two = _mm256_set_epi64x(0, 2, 0, 2);
    size_t i = 0;
    for (; i + words <= n; i += words) {
        __m256i b[SA_VAES_LANES], o[8][2];
        for (int t = 0; t < SA_VAES_LANES; t++) {
            b[t] = _mm256_xor_si256(_mm256_shuffle_epi8(ctr, bswap), k[0]);
            ctr = _mm256_add_epi64(ctr, two);
        }
        for (int r = 1; r < 10; r++) {
            for (int t = 0; t < SA_VAES_LANES; t++)
                b[t] = _mm256_aesenc_epi128(b[t], k[r]);
            if (r <= groups)
                sa_q8(q, x + xsz * (i + 8 * (size_t)(r - 1)), dt, wsz, o[r - 1]);
        }
        for (int t = 0; t < SA_VAES_LANES; t++) {
            b[t] = _mm256_aesenclast_epi128(b[t], k[10]);
            /* Keystream register t covers output bytes [32t, 32t + 32). */
            const __m256i w = wsz == 4 ? o[t][0] : o[t / 2][t % 2];
            const __m256i r = sign < 0 ? (wsz == 4 ? _mm256_sub_epi32(w, b[t])
                                                   : _mm256_sub_epi64(w, b[t]))
                                       : (wsz == 4 ? _mm256_add_epi32(w, b[t])
                                                   : _mm256_add_epi64(w, b[t]));
            _mm256_storeu_si256((__m256i *)(void *)(out + (size_t)wsz * i + 32 * (size_t)t), r);
        }
    }
    return i;
}

const sa_kernel sa_kernel_vaes = SA_X86_KERNEL("vaes");
