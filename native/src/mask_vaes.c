/* SPDX-License-Identifier: Apache-2.0 */
/* mask_vaes.c: the fused masking kernel with VAES on ymm registers and AVX2
 * (-mvaes -mavx2 -maes).
 *
 * VAESENC on a ymm register runs the AES round on two independent blocks. With a
 * latency of about 4 cycles and 2 issues per cycle (Zen 3/4, Ice Lake and later),
 * 8 ymm registers (16 blocks) are kept in flight. The quantizer works on 4 doubles
 * per ymm register, and for the first key it runs between that key's AES rounds.
 *
 * No zmm path (yet): on Zen 4 a microbenchmark sustains about 3.9 AES block-rounds
 * per cycle with 8 zmm registers against about 3.0-3.4 with 8 ymm registers, but
 * this ymm kernel already meets DESIGN §6; a zmm path would need AVX-512F and the
 * XCR0 opmask/ZMM state (SA_CPU_AVX512F in cpu.c) as its own probe.
 */
#include "mask_x86.h"

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

/* DESIGN §4 on 4 doubles: returns 2^52 + q in each lane (q in the low mantissa bits).
 * With fmin = 0 the final min(., 2^bits - 1) is left to the caller, which does it on
 * the packed 32-bit words (ring 32): the same value, since the rounded value is a
 * non-negative integer below 2^32 + 1 and min is monotone, but an integer min runs
 * on any vector pipe while MINPD competes with VAESENC. */
SA_INLINE __m256d sa_quant4(__m256d v, __m256d nc, __m256d c, __m256d s, __m256d qmax,
                            const int fmin)
{
    __m256d q = _mm256_min_pd(_mm256_max_pd(v, nc), c);
    q = _mm256_mul_pd(_mm256_add_pd(q, c), s);
    q = _mm256_round_pd(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (fmin)
        q = _mm256_min_pd(q, qmax);
    /* AVX2 has no unsigned double -> int conversion: q < 2^48 is exact in the
     * mantissa of 2^52 + q. */
    return _mm256_add_pd(q, _mm256_set1_pd(0x1p52));
}

/* The quantizer's constants and running statistics. The statistics ride along
 * cheaply: for float32 they are integer operations on the raw bits (max |x| and the
 * clip test as bit-pattern compares; NaN and inf have the largest patterns); for
 * float64, a max and a compare per register plus x - x, which is non-zero exactly
 * for NaN and inf. A chunk holding a non-finite value (an error the caller raises)
 * has its statistics redone in scalar code. */
typedef struct {
    __m256d c, nc, s, qmax;
    __m256i qmax32;                 /* ring 32: 2^bits - 1 in each 32-bit lane */
    __m256i cbits, maxbits, clip32; /* float32 */
    __m256d maxabs, bad;            /* float64 */
    __m256i clip64;                 /* float64 */
} sa_qstate;

SA_INLINE void sa_qstate_init(sa_qstate *q, const sa_qparams *qp)
{
    q->c = _mm256_set1_pd(qp->c);
    q->nc = _mm256_set1_pd(-qp->c);
    q->s = _mm256_set1_pd(qp->s);
    q->qmax = _mm256_set1_pd(qp->qmax);
    q->qmax32 = _mm256_set1_epi32((int)(uint32_t)(uint64_t)qp->qmax); /* bits 33..48: unused */
    q->cbits = _mm256_set1_epi32((int)sa_f32_clip_bits(qp->c));
    q->maxbits = _mm256_setzero_si256();
    q->clip32 = _mm256_setzero_si256();
    q->maxabs = _mm256_setzero_pd();
    q->bad = _mm256_setzero_pd();
    q->clip64 = _mm256_setzero_si256();
}

/* Quantizes 8 values at x into o[0] (ring 32) or o[0], o[1] (ring 64). */
SA_INLINE void sa_q8(sa_qstate *q, const uint8_t *x, const sa_dtype dt, const int wsz,
                     __m256i o[2])
{
    __m256d v0, v1;
    if (dt == SA_F32) {
        const __m256i fb = _mm256_loadu_si256((const __m256i *)(const void *)x);
        const __m256i ab = _mm256_and_si256(fb, _mm256_set1_epi32(0x7fffffff));
        q->maxbits = _mm256_max_epu32(q->maxbits, ab);
        /* A true compare is all ones, i.e. -1: subtracting it counts (at most one
         * per 8 values per lane, far below 2^31 in a chunk). */
        q->clip32 = _mm256_sub_epi32(q->clip32, _mm256_cmpgt_epi32(ab, q->cbits));
        /* Two 128-bit loads rather than a lane extract: the extract would compete
         * with VAESENC for the same two vector pipes. */
        v0 = _mm256_cvtps_pd(_mm_loadu_ps((const float *)(const void *)x));
        v1 = _mm256_cvtps_pd(_mm_loadu_ps((const float *)(const void *)(x + 16)));
    } else {
        const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
        v0 = _mm256_loadu_pd((const double *)(const void *)x);
        v1 = _mm256_loadu_pd((const double *)(const void *)(x + 32));
        const __m256d a0 = _mm256_and_pd(v0, absmask), a1 = _mm256_and_pd(v1, absmask);
        /* x - x is +0.0 for finite x and NaN for NaN and +-inf. */
        q->bad = _mm256_or_pd(q->bad, _mm256_or_pd(_mm256_sub_pd(v0, v0), _mm256_sub_pd(v1, v1)));
        q->maxabs = _mm256_max_pd(q->maxabs, _mm256_max_pd(a0, a1));
        q->clip64 = _mm256_sub_epi64(q->clip64,
                                     _mm256_castpd_si256(_mm256_cmp_pd(a0, q->c, _CMP_GT_OQ)));
        q->clip64 = _mm256_sub_epi64(q->clip64,
                                     _mm256_castpd_si256(_mm256_cmp_pd(a1, q->c, _CMP_GT_OQ)));
    }
    const __m256i q0 = _mm256_castpd_si256(sa_quant4(v0, q->nc, q->c, q->s, q->qmax, wsz == 8));
    const __m256i q1 = _mm256_castpd_si256(sa_quant4(v1, q->nc, q->c, q->s, q->qmax, wsz == 8));
    if (wsz == 4) {
        /* The low 32 bits of each 64-bit lane: per 128-bit lane [q0 q1 | q4 q5 ...],
         * then qwords reordered to q0..q7. Since (xc + c) <= 2c, the product is at
         * most fl(2c * s) <= (2^bits - 1) + 2^-5, so the rounded value is at most
         * 2^bits - 1 < 2^32: the low 32 bits are the value itself, and the integer
         * min is DESIGN §4's min(., 2^bits - 1). */
        const __m256 w = _mm256_shuffle_ps(_mm256_castsi256_ps(q0), _mm256_castsi256_ps(q1),
                                           _MM_SHUFFLE(2, 0, 2, 0));
        o[0] = _mm256_min_epu32(
            _mm256_permute4x64_epi64(_mm256_castps_si256(w), _MM_SHUFFLE(3, 1, 2, 0)),
            q->qmax32);
    } else {
        /* q < 2^48: the mantissa bits of 2^52 + q. */
        const __m256i low52 = _mm256_set1_epi64x(0x000fffffffffffffLL);
        o[0] = _mm256_and_si256(q0, low52);
        o[1] = _mm256_and_si256(q1, low52);
    }
}

/* Folds the statistics of values [0, n) of a chunk into st. */
SA_INLINE void sa_qstate_finish(const sa_qstate *q, const uint8_t *x, const sa_dtype dt, size_t n,
                                size_t base, double c, sa_clipstats *st)
{
    if (dt == SA_F32) {
        uint32_t mb[8], cl[8], m = 0;
        uint64_t nclip = 0;
        _mm256_storeu_si256((__m256i *)(void *)mb, q->maxbits);
        _mm256_storeu_si256((__m256i *)(void *)cl, q->clip32);
        for (int t = 0; t < 8; t++) {
            m = mb[t] > m ? mb[t] : m;
            nclip += cl[t];
        }
        if (m >= 0x7f800000u) { /* an infinity or a NaN in this chunk */
            sa_stats_scalar(x, dt, n, base, c, st);
            return;
        }
        float f;
        memcpy(&f, &m, 4);
        st->clipped += nclip;
        if ((double)f > st->max_abs)
            st->max_abs = (double)f;
    } else {
        if (!_mm256_testz_si256(_mm256_castpd_si256(q->bad), _mm256_castpd_si256(q->bad))) {
            sa_stats_scalar(x, dt, n, base, c, st);
            return;
        }
        uint64_t cl[4];
        double mx[4];
        _mm256_storeu_si256((__m256i *)(void *)cl, q->clip64);
        _mm256_storeu_pd(mx, q->maxabs);
        st->clipped += cl[0] + cl[1] + cl[2] + cl[3];
        for (int t = 0; t < 4; t++)
            if (mx[t] > st->max_abs)
                st->max_abs = mx[t];
    }
}

/* Words per fused iteration: 8 ymm keystream registers of 32 bytes each. */
#define SA_FUSED_BYTES (SA_VAES_LANES * 32)

SA_INLINE void sa_quant_avx2(uint8_t *out, const int wsz, const uint8_t *x, const sa_dtype dt,
                             size_t n, size_t base, const sa_qparams *qp, sa_clipstats *st,
                             const __m128i *rk, const int8_t sign)
{
    const size_t xsz = dt == SA_F32 ? 4 : 8;
    sa_qstate q;
    sa_qstate_init(&q, qp);
    size_t i = 0;
    if (rk != NULL) {
        /* Fused: each iteration encrypts 16 counter blocks (8 ymm) and, between
         * the AES rounds, quantizes the values those blocks mask, so the AES units
         * and the floating-point units work at the same time. */
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
                    sa_q8(&q, x + xsz * (i + 8 * (size_t)(r - 1)), dt, wsz, o[r - 1]);
            }
            for (int t = 0; t < SA_VAES_LANES; t++) {
                b[t] = _mm256_aesenclast_epi128(b[t], k[10]);
                /* Keystream register t covers output bytes [32t, 32t + 32). */
                const __m256i w = wsz == 4 ? o[t][0] : o[t / 2][t % 2];
                const __m256i r = sign < 0 ? (wsz == 4 ? _mm256_sub_epi32(w, b[t])
                                                       : _mm256_sub_epi64(w, b[t]))
                                           : (wsz == 4 ? _mm256_add_epi32(w, b[t])
                                                       : _mm256_add_epi64(w, b[t]));
                _mm256_storeu_si256((__m256i *)(void *)(out + (size_t)wsz * i + 32 * (size_t)t),
                                    r);
            }
        }
    }
    const size_t fused = i;
    for (; i + 8 <= n; i += 8) {
        __m256i o[2];
        sa_q8(&q, x + xsz * i, dt, wsz, o);
        _mm256_storeu_si256((__m256i *)(void *)(out + (size_t)wsz * i), o[0]);
        if (wsz == 8)
            _mm256_storeu_si256((__m256i *)(void *)(out + (size_t)wsz * i + 32), o[1]);
    }
    sa_qstate_finish(&q, x, dt, i, base, qp->c, st);
    sa_quant_tail(out, wsz, x, dt, i, n, base, qp, st);
    if (rk != NULL && fused < n)
        sa_ks_words(rk, out + (size_t)wsz * fused, n - fused, base + fused, wsz, sign);
}

static void sa_quant_chunk(uint8_t *out, int wsz, const uint8_t *x, sa_dtype dt, size_t n,
                           size_t base, const sa_qparams *qp, sa_clipstats *st,
                           const __m128i *rk, int8_t sign)
{
    /* One specialized loop per ring, input type and sign. */
#define SA_Q(W, DT)                                                                           \
    do {                                                                                      \
        if (rk == NULL)                                                                       \
            sa_quant_avx2(out, W, x, DT, n, base, qp, st, NULL, 1);                           \
        else if (sign < 0)                                                                    \
            sa_quant_avx2(out, W, x, DT, n, base, qp, st, rk, -1);                            \
        else                                                                                  \
            sa_quant_avx2(out, W, x, DT, n, base, qp, st, rk, 1);                             \
    } while (0)
    if (wsz == 4) {
        if (dt == SA_F32)
            SA_Q(4, SA_F32);
        else
            SA_Q(4, SA_F64);
    } else {
        if (dt == SA_F32)
            SA_Q(8, SA_F32);
        else
            SA_Q(8, SA_F64);
    }
#undef SA_Q
}

const sa_kernel sa_kernel_vaes = SA_X86_KERNEL("vaes");
