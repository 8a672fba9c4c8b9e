/* SPDX-License-Identifier: Apache-2.0 */
/* mask_aesni.c: the fused masking kernel with AES-NI and SSE4.1 (-maes -msse4.1),
 * the "aesni" build for CPUs without AVX2 (or an OS without YMM state).
 *
 * 8 xmm blocks in flight (sa_bulk_aesni, mask_x86.h). The quantizer works on 2
 * doubles per xmm register, and for the first key it runs between that key's AES
 * rounds. mask_aesni_avx2.c is the same cipher with the AVX2 quantizer.
 */
#include "mask_x86.h"

static void sa_ctr_bulk(const __m128i rk[11], uint64_t hi, uint64_t lo, uint8_t *dst,
                        size_t nblocks, int op)
{
    sa_ctr_bulk_aesni(rk, hi, lo, dst, nblocks, op);
}

/* DESIGN §4 on 2 doubles: returns 2^52 + q in each lane (q in the low mantissa bits).
 * With fmin = 0 the final min(., 2^bits - 1) is left to the caller, which does it on
 * the packed 32-bit words (ring 32; see sa_q4): an integer min does not compete with
 * AESENC for the vector pipes MINPD needs. */
SA_INLINE __m128d sa_quant2(__m128d v, __m128d nc, __m128d c, __m128d s, __m128d qmax,
                            const int fmin)
{
    __m128d q = _mm_min_pd(_mm_max_pd(v, nc), c);
    q = _mm_mul_pd(_mm_add_pd(q, c), s);
    q = _mm_round_pd(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (fmin)
        q = _mm_min_pd(q, qmax);
    /* SSE has no unsigned double -> int conversion: q < 2^48 is exact in the
     * mantissa of 2^52 + q. */
    return _mm_add_pd(q, _mm_set1_pd(0x1p52));
}

/* The quantizer's constants and running statistics (see mask_vaes.c: integer
 * operations on the raw bits for float32; max, compare and x - x for float64). */
typedef struct {
    __m128d c, nc, s, qmax;
    __m128i qmax32;                 /* ring 32: 2^bits - 1 in each 32-bit lane */
    __m128i cbits, maxbits, clip32; /* float32 */
    __m128d maxabs, bad;            /* float64 */
    __m128i clip64;                 /* float64 */
} sa_qstate;

SA_INLINE void sa_qstate_init(sa_qstate *q, const sa_qparams *qp)
{
    q->c = _mm_set1_pd(qp->c);
    q->nc = _mm_set1_pd(-qp->c);
    q->s = _mm_set1_pd(qp->s);
    q->qmax = _mm_set1_pd(qp->qmax);
    q->qmax32 = _mm_set1_epi32((int)(uint32_t)(uint64_t)qp->qmax); /* bits 33..48: unused */
    q->cbits = _mm_set1_epi32((int)sa_f32_clip_bits(qp->c));
    q->maxbits = _mm_setzero_si128();
    q->clip32 = _mm_setzero_si128();
    q->maxabs = _mm_setzero_pd();
    q->bad = _mm_setzero_pd();
    q->clip64 = _mm_setzero_si128();
}

/* Quantizes 4 values at x into o[0] (ring 32) or o[0], o[1] (ring 64). */
SA_INLINE void sa_q4(sa_qstate *q, const uint8_t *x, const sa_dtype dt, const int wsz,
                     __m128i o[2])
{
    __m128d v0, v1;
    if (dt == SA_F32) {
        const __m128i fb = _mm_loadu_si128((const __m128i *)(const void *)x);
        const __m128i ab = _mm_and_si128(fb, _mm_set1_epi32(0x7fffffff));
        q->maxbits = _mm_max_epu32(q->maxbits, ab);
        /* A true compare is all ones, i.e. -1: subtracting it counts. */
        q->clip32 = _mm_sub_epi32(q->clip32, _mm_cmpgt_epi32(ab, q->cbits));
        /* Two 64-bit loads rather than a shuffle (which competes with AESENC). */
        v0 = _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(const void *)x)));
        v1 = _mm_cvtps_pd(
            _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(const void *)(x + 8))));
    } else {
        const __m128d absmask = _mm_castsi128_pd(_mm_set1_epi64x(0x7fffffffffffffffLL));
        v0 = _mm_loadu_pd((const double *)(const void *)x);
        v1 = _mm_loadu_pd((const double *)(const void *)(x + 16));
        const __m128d a0 = _mm_and_pd(v0, absmask), a1 = _mm_and_pd(v1, absmask);
        /* x - x is +0.0 for finite x and NaN for NaN and +-inf. */
        q->bad = _mm_or_pd(q->bad, _mm_or_pd(_mm_sub_pd(v0, v0), _mm_sub_pd(v1, v1)));
        q->maxabs = _mm_max_pd(q->maxabs, _mm_max_pd(a0, a1));
        q->clip64 = _mm_sub_epi64(q->clip64, _mm_castpd_si128(_mm_cmpgt_pd(a0, q->c)));
        q->clip64 = _mm_sub_epi64(q->clip64, _mm_castpd_si128(_mm_cmpgt_pd(a1, q->c)));
    }
    const __m128i q0 = _mm_castpd_si128(sa_quant2(v0, q->nc, q->c, q->s, q->qmax, wsz == 8));
    const __m128i q1 = _mm_castpd_si128(sa_quant2(v1, q->nc, q->c, q->s, q->qmax, wsz == 8));
    if (wsz == 4) {
        /* The low 32 bits of each 64-bit lane. Since (xc + c) <= 2c, the product is
         * at most fl(2c * s) <= (2^bits - 1) + 2^-5, so the rounded value is at most
         * 2^bits - 1 < 2^32: the low 32 bits are the value itself, and the integer
         * min is DESIGN §4's min(., 2^bits - 1). */
        o[0] = _mm_min_epu32(_mm_castps_si128(_mm_shuffle_ps(_mm_castsi128_ps(q0),
                                                             _mm_castsi128_ps(q1),
                                                             _MM_SHUFFLE(2, 0, 2, 0))),
                             q->qmax32);
    } else {
        /* q < 2^48: the mantissa bits of 2^52 + q. */
        const __m128i low52 = _mm_set1_epi64x(0x000fffffffffffffLL);
        o[0] = _mm_and_si128(q0, low52);
        o[1] = _mm_and_si128(q1, low52);
    }
}

/* Folds the statistics of values [0, n) of a chunk into st. */
SA_INLINE void sa_qstate_finish(const sa_qstate *q, const uint8_t *x, const sa_dtype dt, size_t n,
                                size_t base, double c, sa_clipstats *st)
{
    if (dt == SA_F32) {
        uint32_t mb[4], cl[4], m = 0;
        uint64_t nclip = 0;
        _mm_storeu_si128((__m128i *)(void *)mb, q->maxbits);
        _mm_storeu_si128((__m128i *)(void *)cl, q->clip32);
        for (int t = 0; t < 4; t++) {
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
        if (!_mm_testz_si128(_mm_castpd_si128(q->bad), _mm_castpd_si128(q->bad))) {
            sa_stats_scalar(x, dt, n, base, c, st);
            return;
        }
        uint64_t cl[2];
        double mx[2];
        _mm_storeu_si128((__m128i *)(void *)cl, q->clip64);
        _mm_storeu_pd(mx, q->maxabs);
        st->clipped += cl[0] + cl[1];
        for (int t = 0; t < 2; t++)
            if (mx[t] > st->max_abs)
                st->max_abs = mx[t];
    }
}

SA_INLINE void sa_quant_sse(uint8_t *out, const int wsz, const uint8_t *x, const sa_dtype dt,
                            size_t n, size_t base, const sa_qparams *qp, sa_clipstats *st,
                            const __m128i *rk, const int8_t sign)
{
    const size_t xsz = dt == SA_F32 ? 4 : 8;
    sa_qstate q;
    sa_qstate_init(&q, qp);
    size_t i = 0;
    if (rk != NULL) {
        /* Fused: each iteration encrypts 8 counter blocks and, between the AES
         * rounds, quantizes the values those blocks mask, so the AES unit and the
         * floating-point units work at the same time. */
        const size_t words = SA_AESNI_LANES * SA_BLOCK_SIZE / (size_t)wsz; /* 32 or 16 */
        const int groups = (int)(words / 4);                              /* 8 or 4 */
        const __m128i bswap = sa_bswap128_mask(), one = _mm_set_epi64x(0, 1);
        /* base is a multiple of the chunk size, so block-aligned; the block index
         * stays far below 2^64, so the low counter half never wraps. */
        __m128i ctr = _mm_set_epi64x(0, (long long)((uint64_t)base / (uint64_t)(16 / wsz)));
        for (; i + words <= n; i += words) {
            __m128i b[SA_AESNI_LANES], o[8][2];
            for (int t = 0; t < SA_AESNI_LANES; t++) {
                b[t] = _mm_xor_si128(_mm_shuffle_epi8(ctr, bswap), rk[0]);
                ctr = _mm_add_epi64(ctr, one);
            }
            for (int r = 1; r < 10; r++) {
                for (int t = 0; t < SA_AESNI_LANES; t++)
                    b[t] = _mm_aesenc_si128(b[t], rk[r]);
                if (r <= groups)
                    sa_q4(&q, x + xsz * (i + 4 * (size_t)(r - 1)), dt, wsz, o[r - 1]);
            }
            for (int t = 0; t < SA_AESNI_LANES; t++) {
                b[t] = _mm_aesenclast_si128(b[t], rk[10]);
                /* Keystream block t covers output bytes [16t, 16t + 16). */
                const __m128i w = wsz == 4 ? o[t][0] : o[t / 2][t % 2];
                const __m128i r =
                    sign < 0 ? (wsz == 4 ? _mm_sub_epi32(w, b[t]) : _mm_sub_epi64(w, b[t]))
                             : (wsz == 4 ? _mm_add_epi32(w, b[t]) : _mm_add_epi64(w, b[t]));
                _mm_storeu_si128((__m128i *)(void *)(out + (size_t)wsz * i + 16 * (size_t)t), r);
            }
        }
    }
    const size_t fused = i;
    for (; i + 4 <= n; i += 4) {
        __m128i o[2];
        sa_q4(&q, x + xsz * i, dt, wsz, o);
        _mm_storeu_si128((__m128i *)(void *)(out + (size_t)wsz * i), o[0]);
        if (wsz == 8)
            _mm_storeu_si128((__m128i *)(void *)(out + (size_t)wsz * i + 16), o[1]);
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
            sa_quant_sse(out, W, x, DT, n, base, qp, st, NULL, 1);                            \
        else if (sign < 0)                                                                    \
            sa_quant_sse(out, W, x, DT, n, base, qp, st, rk, -1);                             \
        else                                                                                  \
            sa_quant_sse(out, W, x, DT, n, base, qp, st, rk, 1);                              \
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

const sa_kernel sa_kernel_aesni = SA_X86_KERNEL("aesni");
