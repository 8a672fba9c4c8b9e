/* SPDX-License-Identifier: Apache-2.0 */
/* mask_avx2.h: the AVX2 quantizer shared by the variants built with -mavx2
 * (mask_vaes.c and mask_aesni_avx2.c), on top of mask_x86.h.
 *
 * It defines mask_x86.h's sa_quant_chunk hook. The including file defines one more
 * hook, the fused loop for the first key with its own cipher width:
 *
 *   SA_INLINE size_t sa_fused_avx2(sa_qstate *q, uint8_t *out, const int wsz,
 *                                  const uint8_t *x, const sa_dtype dt, size_t n,
 *                                  size_t base, const __m128i *rk, const int8_t sign);
 *       quantizes values [0, m) of a chunk with sa_q8 (statistics into q) and adds
 *       sign * keystream words base .. base + m - 1 of key rk in the same loop, for
 *       the largest m <= n that its loop handles; returns m.
 */
#ifndef SECAGG_MASK_AVX2_H
#define SECAGG_MASK_AVX2_H

#include "mask_x86.h"

#if !defined(__AVX2__)
#error "mask_avx2.h needs -mavx2"
#endif

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

SA_INLINE size_t sa_fused_avx2(sa_qstate *q, uint8_t *out, const int wsz, const uint8_t *x,
                                const sa_dtype dt, size_t n, size_t base, const __m128i *rk,
                                const int8_t sign);

SA_INLINE void sa_quant_avx2(uint8_t *out, const int wsz, const uint8_t *x, const sa_dtype dt,
                             size_t n, size_t base, const sa_qparams *qp, sa_clipstats *st,
                             const __m128i *rk, const int8_t sign)
{
    const size_t xsz = dt == SA_F32 ? 4 : 8;
    sa_qstate q;
    sa_qstate_init(&q, qp);
    /* Fused: the first key's AES rounds and the quantizer's arithmetic overlap. */
    const size_t fused = rk != NULL ? sa_fused_avx2(&q, out, wsz, x, dt, n, base, rk, sign) : 0;
    size_t i = fused;
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

#endif /* SECAGG_MASK_AVX2_H */
