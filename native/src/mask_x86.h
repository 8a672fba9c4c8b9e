/* SPDX-License-Identifier: Apache-2.0 */
/* mask_x86.h: the parts of the fused masking kernel shared by the x86 variants.
 *
 * Included by the mask_*.c variant files only, so every function here is compiled
 * under the including file's -m flags and must stay static. The including file
 * first defines two hooks:
 *
 *   static void sa_ctr_bulk(const __m128i rk[11], uint64_t hi, uint64_t lo,
 *                           uint8_t *dst, size_t nblocks, int op);
 *       applies AES-128-CTR blocks with counters (hi:lo) .. (hi:lo + nblocks - 1)
 *       to dst with operation op; the caller guarantees lo + nblocks <= 2^64.
 *   static void sa_quant_chunk(uint8_t *out, int wsz, const uint8_t *x,
 *                              sa_dtype dt, size_t n, size_t base,
 *                              const sa_qparams *qp, sa_clipstats *st,
 *                              const __m128i *rk, int8_t sign);
 *       quantizes n values into n words of wsz bytes (DESIGN §4), adds to st, and,
 *       if rk is not NULL, adds sign * keystream words base .. base + n - 1 of that
 *       key in the same loop (base is a multiple of SA_CHUNK_WORDS).
 *
 * and then uses the drivers below (protect, mask, keystream) to fill its sa_kernel.
 * No allocation: round keys and partial blocks live in fixed-size stack arrays.
 * Buffers may be unaligned (numpy views): every access is loadu/storeu or memcpy.
 */
#ifndef SECAGG_MASK_X86_H
#define SECAGG_MASK_X86_H

#include <float.h>
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

#define SA_INLINE static inline __attribute__((always_inline))

/* Words of out per fused chunk: 2048 words are 8 KiB (ring 32) or 16 KiB (ring 64)
 * of out plus at most 16 KiB of x, which stay in a 32 KiB L1d while every key's
 * keystream is added. (On Zen 4, 1K to 8K words measured within noise.) */
#define SA_CHUNK_WORDS 2048
/* Keys whose round keys are expanded at once: 32 * 176 B = 5.5 KiB of stack.
 * More keys take further passes over out, each key still expanded once per call. */
#define SA_KEY_BATCH 32

/* What sa_ctr_bulk does with each keystream block. */
enum { SA_OP_STORE = 0, SA_OP_ADD32, SA_OP_SUB32, SA_OP_ADD64, SA_OP_SUB64 };

typedef struct {
    double c;    /* clipping range, finite and > 0 */
    double s;    /* (2^bits - 1) / (2c), computed once in double (DESIGN §4) */
    double qmax; /* 2^bits - 1, exact in double since bits <= 48 */
} sa_qparams;

static void sa_ctr_bulk(const __m128i rk[11], uint64_t hi, uint64_t lo, uint8_t *dst,
                        size_t nblocks, int op);
static void sa_quant_chunk(uint8_t *out, int wsz, const uint8_t *x, sa_dtype dt, size_t n,
                           size_t base, const sa_qparams *qp, sa_clipstats *st,
                           const __m128i *rk, int8_t sign);

/* ---- AES-128 (FIPS-197) ------------------------------------------------------- */

SA_INLINE __m128i sa_expand_step(__m128i k, __m128i assist)
{
    /* FIPS-197 §5.2: w[i] = w[i-4] ^ SubWord(RotWord(w[i-1])) ^ Rcon, then each
     * following word xors the previous one; the shifts compute that prefix xor. */
    assist = _mm_shuffle_epi32(assist, 0xff);
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, assist);
}

static void sa_aes128_expand(__m128i rk[11], const uint8_t key[SA_KEY_SIZE])
{
    /* aeskeygenassist needs its round constant as an immediate. */
    rk[0] = _mm_loadu_si128((const __m128i *)(const void *)key);
    rk[1] = sa_expand_step(rk[0], _mm_aeskeygenassist_si128(rk[0], 0x01));
    rk[2] = sa_expand_step(rk[1], _mm_aeskeygenassist_si128(rk[1], 0x02));
    rk[3] = sa_expand_step(rk[2], _mm_aeskeygenassist_si128(rk[2], 0x04));
    rk[4] = sa_expand_step(rk[3], _mm_aeskeygenassist_si128(rk[3], 0x08));
    rk[5] = sa_expand_step(rk[4], _mm_aeskeygenassist_si128(rk[4], 0x10));
    rk[6] = sa_expand_step(rk[5], _mm_aeskeygenassist_si128(rk[5], 0x20));
    rk[7] = sa_expand_step(rk[6], _mm_aeskeygenassist_si128(rk[6], 0x40));
    rk[8] = sa_expand_step(rk[7], _mm_aeskeygenassist_si128(rk[7], 0x80));
    rk[9] = sa_expand_step(rk[8], _mm_aeskeygenassist_si128(rk[8], 0x1b));
    rk[10] = sa_expand_step(rk[9], _mm_aeskeygenassist_si128(rk[9], 0x36));
}

SA_INLINE __m128i sa_aes128_block(const __m128i rk[11], __m128i b)
{
    b = _mm_xor_si128(b, rk[0]);
    for (int r = 1; r < 10; r++)
        b = _mm_aesenc_si128(b, rk[r]);
    return _mm_aesenclast_si128(b, rk[10]);
}

/* SP 800-38A §B.1: the counter block is one 128-bit big-endian integer hi:lo. */
SA_INLINE __m128i sa_ctr_block(uint64_t hi, uint64_t lo)
{
    return _mm_set_epi64x((long long)__builtin_bswap64(lo), (long long)__builtin_bswap64(hi));
}

/* The byte-reversal that turns a little-endian counter (low qword = lo, high qword
 * = hi) into the big-endian counter block. */
SA_INLINE __m128i sa_bswap128_mask(void)
{
    return _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

/* Applies one full keystream block to 16 bytes at p. */
SA_INLINE void sa_apply128(uint8_t *p, __m128i ks, const int op)
{
    if (op == SA_OP_STORE) {
        _mm_storeu_si128((__m128i *)(void *)p, ks);
        return;
    }
    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
    switch (op) {
    case SA_OP_ADD32: v = _mm_add_epi32(v, ks); break;
    case SA_OP_SUB32: v = _mm_sub_epi32(v, ks); break;
    case SA_OP_ADD64: v = _mm_add_epi64(v, ks); break;
    default: v = _mm_sub_epi64(v, ks); break;
    }
    _mm_storeu_si128((__m128i *)(void *)p, v);
}

/* ---- AES-128-CTR on xmm registers (AES-NI, the "aesni" builds) -------------------- */

/* AES-NI has a latency of about 4 cycles and issues up to 2 per cycle on recent
 * cores, so 8 independent blocks are kept in flight (Intel's AES-NI white paper,
 * "parallelizing CTR"). */
#define SA_AESNI_LANES 8

SA_INLINE void sa_bulk_aesni(const __m128i rk[11], uint64_t hi, uint64_t lo, uint8_t *dst,
                             size_t nb, const int op)
{
    const __m128i bswap = sa_bswap128_mask();
    /* Little-endian counter: low qword lo, high qword hi. The caller guarantees that
     * lo does not wrap within these nb blocks, so 64-bit lane adds are exact. */
    __m128i ctr = _mm_set_epi64x((long long)hi, (long long)lo);
    const __m128i one = _mm_set_epi64x(0, 1);
    const __m128i k0 = rk[0], k1 = rk[1], k2 = rk[2], k3 = rk[3], k4 = rk[4], k5 = rk[5];
    const __m128i k6 = rk[6], k7 = rk[7], k8 = rk[8], k9 = rk[9], k10 = rk[10];
    size_t i = 0;
    for (; i + SA_AESNI_LANES <= nb; i += SA_AESNI_LANES) {
        __m128i b[SA_AESNI_LANES];
        for (int t = 0; t < SA_AESNI_LANES; t++) {
            b[t] = _mm_xor_si128(_mm_shuffle_epi8(ctr, bswap), k0);
            ctr = _mm_add_epi64(ctr, one);
        }
#define SA_ROUND(K)                                                                           \
    for (int t = 0; t < SA_AESNI_LANES; t++)                                                  \
        b[t] = _mm_aesenc_si128(b[t], K);
        SA_ROUND(k1) SA_ROUND(k2) SA_ROUND(k3) SA_ROUND(k4) SA_ROUND(k5)
        SA_ROUND(k6) SA_ROUND(k7) SA_ROUND(k8) SA_ROUND(k9)
#undef SA_ROUND
        for (int t = 0; t < SA_AESNI_LANES; t++) {
            b[t] = _mm_aesenclast_si128(b[t], k10);
            sa_apply128(dst + SA_BLOCK_SIZE * (i + (size_t)t), b[t], op);
        }
    }
    for (; i < nb; i++) {
        __m128i b = sa_aes128_block(rk, _mm_shuffle_epi8(ctr, bswap));
        ctr = _mm_add_epi64(ctr, one);
        sa_apply128(dst + SA_BLOCK_SIZE * i, b, op);
    }
}

/* A definition of the sa_ctr_bulk hook for the "aesni" builds: one specialized loop
 * per operation, so the loop body has no branch. */
SA_INLINE void sa_ctr_bulk_aesni(const __m128i rk[11], uint64_t hi, uint64_t lo, uint8_t *dst,
                                 size_t nblocks, int op)
{
    switch (op) {
    case SA_OP_STORE: sa_bulk_aesni(rk, hi, lo, dst, nblocks, SA_OP_STORE); break;
    case SA_OP_ADD32: sa_bulk_aesni(rk, hi, lo, dst, nblocks, SA_OP_ADD32); break;
    case SA_OP_SUB32: sa_bulk_aesni(rk, hi, lo, dst, nblocks, SA_OP_SUB32); break;
    case SA_OP_ADD64: sa_bulk_aesni(rk, hi, lo, dst, nblocks, SA_OP_ADD64); break;
    default: sa_bulk_aesni(rk, hi, lo, dst, nblocks, SA_OP_SUB64); break;
    }
}

/* ---- Quantizer, scalar (chunk tails and vectors that hold a non-finite) ---------- */

SA_INLINE void sa_stat1(double v, size_t idx, double c, sa_clipstats *st)
{
    const double a = __builtin_fabs(v);
    if (!(a <= DBL_MAX)) { /* NaN or +-inf, in the same pass (DESIGN §4) */
        if (st->nonfinite++ == 0)
            st->first_nonfinite = idx;
        return;
    }
    st->clipped += a > c;
    if (a > st->max_abs)
        st->max_abs = a;
}

/* DESIGN §4 for one value, with the same operations as the SIMD loops so that tails
 * and bodies agree bit for bit: round-half-even by ROUNDSD (independent of MXCSR),
 * the min, and the 2^52 trick for the exact double -> integer conversion. */
SA_INLINE uint64_t sa_quant1(double v, const sa_qparams *qp)
{
    double xc = v < -qp->c ? -qp->c : v;
    xc = xc > qp->c ? qp->c : xc;
    const double t = (xc + qp->c) * qp->s;
    __m128d r = _mm_round_sd(_mm_setzero_pd(), _mm_set_sd(t),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm_min_sd(r, _mm_set_sd(qp->qmax));
    r = _mm_add_sd(r, _mm_set_sd(0x1p52));
    /* The mantissa of 2^52 + q is q (q < 2^48); NaN inputs give garbage, not UB. */
    return (uint64_t)_mm_cvtsi128_si64(_mm_castpd_si128(r)) & 0x000fffffffffffffULL;
}

SA_INLINE double sa_load_x(const uint8_t *x, sa_dtype dt, size_t i)
{
    if (dt == SA_F32) {
        float f;
        memcpy(&f, x + 4 * i, 4);
        return (double)f; /* exact (DESIGN §4) */
    }
    double d;
    memcpy(&d, x + 8 * i, 8);
    return d;
}

SA_INLINE void sa_store_word(uint8_t *p, int wsz, uint64_t q)
{
    if (wsz == 4) {
        uint32_t w = (uint32_t)q;
        memcpy(p, &w, 4);
    } else {
        memcpy(p, &q, 8);
    }
}

/* Statistics of values [0, n) of a chunk, scalar: the SIMD loops fall back to this
 * only for a chunk that holds a NaN or an infinity (an error the caller raises). */
static void sa_stats_scalar(const uint8_t *x, sa_dtype dt, size_t n, size_t base, double c,
                            sa_clipstats *st)
{
    for (size_t i = 0; i < n; i++)
        sa_stat1(sa_load_x(x, dt, i), base + i, c, st);
}

/* For float32 input: the bits of the largest float <= c, so that for a float a >= 0,
 * a > c (compared in double, DESIGN §4) iff bits(a) > this as an integer (the order
 * of non-negative IEEE-754 values is the order of their bit patterns). */
SA_INLINE uint32_t sa_f32_clip_bits(double c)
{
    uint32_t b;
    if (c >= (double)FLT_MAX)
        return 0x7f7fffffu; /* FLT_MAX: no finite float exceeds c */
    float f = (float)c;     /* in range: no undefined conversion */
    memcpy(&b, &f, 4);
    if ((double)f > c)
        b--; /* c > 0, so f > 0 and the previous float is b - 1 */
    return b;
}

/* Scalar quantization of values [i, n) of a chunk whose first value has index base. */
SA_INLINE void sa_quant_tail(uint8_t *out, int wsz, const uint8_t *x, sa_dtype dt, size_t i,
                             size_t n, size_t base, const sa_qparams *qp, sa_clipstats *st)
{
    for (; i < n; i++) {
        const double v = sa_load_x(x, dt, i);
        sa_stat1(v, base + i, qp->c, st);
        sa_store_word(out + (size_t)wsz * i, wsz, sa_quant1(v, qp));
    }
}

/* ---- Keystream application -------------------------------------------------------- */

SA_INLINE int sa_opcode(int wsz, int8_t sign)
{
    if (wsz == 4)
        return sign < 0 ? SA_OP_SUB32 : SA_OP_ADD32;
    return sign < 0 ? SA_OP_SUB64 : SA_OP_ADD64;
}

/* Applies counter blocks hi:lo, hi:lo+1, ... with full 128-bit carry, handing
 * sa_ctr_bulk only runs on which the low 64 bits do not wrap (its fast path). */
static void sa_ctr_apply(const __m128i rk[11], uint64_t hi, uint64_t lo, uint8_t *dst,
                         size_t nblocks, int op)
{
    while (nblocks > 0) {
        size_t m = nblocks;
        const uint64_t room = (uint64_t)0 - lo; /* blocks until lo wraps; 0 means 2^64 */
        if (room != 0 && (uint64_t)m > room)
            m = (size_t)room;
        sa_ctr_bulk(rk, hi, lo, dst, m, op);
        dst += (size_t)SA_BLOCK_SIZE * m;
        nblocks -= m;
        lo += (uint64_t)m;
        if (lo == 0)
            hi++; /* SP 800-38A §B.1: carry into the high half, mod 2^128 */
    }
}

/* Adds or subtracts words [from, from + n) of one keystream block ks to n words at w. */
static void sa_apply_partial(uint8_t *w, const uint8_t ks[SA_BLOCK_SIZE], size_t from,
                             size_t n, int wsz, int8_t sign)
{
    for (size_t i = 0; i < n; i++) {
        const uint8_t *k = ks + (from + i) * (size_t)wsz;
        uint8_t *p = w + i * (size_t)wsz;
        if (wsz == 4) {
            uint32_t a, b;
            memcpy(&a, p, 4);
            memcpy(&b, k, 4);
            a = sign < 0 ? a - b : a + b; /* mod 2^32 */
            memcpy(p, &a, 4);
        } else {
            uint64_t a, b;
            memcpy(&a, p, 8);
            memcpy(&b, k, 8);
            a = sign < 0 ? a - b : a + b; /* mod 2^64 */
            memcpy(p, &a, 8);
        }
    }
}

/* w[i] += sign * keystream word (off + i), i < n; words are wsz bytes, little-endian
 * (DESIGN §3). Word off + i lives in counter block (off + i) / (16 / wsz) of the
 * all-zero initial counter block; a start or end inside a block is done word by word. */
static void sa_ks_words(const __m128i rk[11], uint8_t *w, size_t n, uint64_t off, int wsz,
                        int8_t sign)
{
    const size_t wpb = (size_t)(SA_BLOCK_SIZE / wsz);
    uint64_t blk = off / wpb;
    const size_t skip = (size_t)(off % wpb);
    uint8_t ks[SA_BLOCK_SIZE];
    if (n == 0)
        return;
    if (skip != 0) {
        const size_t m = n < wpb - skip ? n : wpb - skip;
        _mm_storeu_si128((__m128i *)(void *)ks, sa_aes128_block(rk, sa_ctr_block(0, blk)));
        sa_apply_partial(w, ks, skip, m, wsz, sign);
        w += m * (size_t)wsz;
        n -= m;
        blk++;
    }
    const size_t nb = n / wpb;
    if (nb > 0) {
        sa_ctr_apply(rk, 0, blk, w, nb, sa_opcode(wsz, sign));
        w += nb * SA_BLOCK_SIZE;
        n -= nb * wpb;
        blk += nb;
    }
    if (n > 0) {
        _mm_storeu_si128((__m128i *)(void *)ks, sa_aes128_block(rk, sa_ctr_block(0, blk)));
        sa_apply_partial(w, ks, 0, n, wsz, sign);
    }
}

/* ---- Drivers ------------------------------------------------------------------------ */

static void sa_expand_batch(__m128i (*rk)[11], const uint8_t (*keys)[SA_KEY_SIZE], size_t k)
{
    for (size_t j = 0; j < k; j++)
        sa_aes128_expand(rk[j], keys[j]);
}

/* w[i] += sum_j signs[j] * keystream_j word (off + i): chunk by chunk, every key of a
 * batch while the chunk is in L1. */
static void sa_mask_words(uint8_t *w, int wsz, size_t n, uint64_t off,
                          const uint8_t (*keys)[SA_KEY_SIZE], const int8_t *signs, size_t k)
{
    __m128i rk[SA_KEY_BATCH][11];
    for (size_t j0 = 0; j0 < k; j0 += SA_KEY_BATCH) {
        const size_t kb = k - j0 < SA_KEY_BATCH ? k - j0 : SA_KEY_BATCH;
        sa_expand_batch(rk, keys + j0, kb);
        for (size_t i0 = 0; i0 < n; i0 += SA_CHUNK_WORDS) {
            const size_t m = n - i0 < SA_CHUNK_WORDS ? n - i0 : SA_CHUNK_WORDS;
            for (size_t j = 0; j < kb; j++)
                sa_ks_words(rk[j], w + i0 * (size_t)wsz, m, off + i0, wsz, signs[j0 + j]);
        }
    }
}

/* The fused kernel (DESIGN §4, STYLE §3): for each chunk, quantize into out, then
 * add or subtract each key's keystream for those words while the chunk is hot.
 * No whole keystream is ever materialized. */
static void sa_protect_words(uint8_t *out, int wsz, const void *xv, sa_dtype dt, size_t n,
                             double c, int bits, const uint8_t (*keys)[SA_KEY_SIZE],
                             const int8_t *signs, size_t k, sa_clipstats *st)
{
    const uint8_t *x = (const uint8_t *)xv;
    const size_t xsz = dt == SA_F32 ? 4 : 8;
    sa_qparams qp;
    qp.c = c;
    qp.qmax = (double)((UINT64_C(1) << bits) - 1);
    qp.s = qp.qmax / (2.0 * c);
    st->clipped = 0;
    st->max_abs = 0.0;
    st->nonfinite = 0;
    st->first_nonfinite = 0;

    __m128i rk[SA_KEY_BATCH][11];
    const size_t kb = k < SA_KEY_BATCH ? k : SA_KEY_BATCH;
    sa_expand_batch(rk, keys, kb);
    for (size_t i0 = 0; i0 < n; i0 += SA_CHUNK_WORDS) {
        const size_t m = n - i0 < SA_CHUNK_WORDS ? n - i0 : SA_CHUNK_WORDS;
        uint8_t *o = out + i0 * (size_t)wsz;
        /* The first key rides in the quantizer's loop: its AES rounds and the
         * quantizer's arithmetic use different execution ports, so they overlap. */
        sa_quant_chunk(o, wsz, x + i0 * xsz, dt, m, i0, &qp, st, kb > 0 ? rk[0] : NULL,
                       kb > 0 ? signs[0] : 1);
        for (size_t j = 1; j < kb; j++)
            sa_ks_words(rk[j], o, m, i0, wsz, signs[j]);
    }
    if (k > kb)
        sa_mask_words(out, wsz, n, 0, keys + kb, signs + kb, k - kb);
}

static void sa_keystream_bytes(uint8_t *out, size_t nbytes, const uint8_t key[SA_KEY_SIZE],
                               const uint8_t iv[SA_BLOCK_SIZE])
{
    __m128i rk[11];
    uint64_t hi = 0, lo = 0;
    for (int i = 0; i < 8; i++) {
        hi = (hi << 8) | iv[i];
        lo = (lo << 8) | iv[8 + i];
    }
    sa_aes128_expand(rk, key);
    const size_t nb = nbytes / SA_BLOCK_SIZE;
    sa_ctr_apply(rk, hi, lo, out, nb, SA_OP_STORE);
    const size_t rest = nbytes % SA_BLOCK_SIZE;
    if (rest != 0) {
        const uint64_t lo2 = lo + (uint64_t)nb;
        const uint64_t hi2 = hi + (lo2 < lo); /* 128-bit carry; nb < 2^64 */
        uint8_t ks[SA_BLOCK_SIZE];
        _mm_storeu_si128((__m128i *)(void *)ks, sa_aes128_block(rk, sa_ctr_block(hi2, lo2)));
        memcpy(out + nb * SA_BLOCK_SIZE, ks, rest);
    }
}

/* The sa_kernel entry points, identical for every x86 variant. */
static void sa_protect_u32_x86(uint32_t *out, const void *x, sa_dtype dtype, size_t n, double c,
                               int bits, const uint8_t (*keys)[SA_KEY_SIZE], const int8_t *signs,
                               size_t k, sa_clipstats *st)
{
    sa_protect_words((uint8_t *)out, 4, x, dtype, n, c, bits, keys, signs, k, st);
}

static void sa_protect_u64_x86(uint64_t *out, const void *x, sa_dtype dtype, size_t n, double c,
                               int bits, const uint8_t (*keys)[SA_KEY_SIZE], const int8_t *signs,
                               size_t k, sa_clipstats *st)
{
    sa_protect_words((uint8_t *)out, 8, x, dtype, n, c, bits, keys, signs, k, st);
}

static void sa_mask_u32_x86(uint32_t *w, size_t n, uint64_t offset,
                            const uint8_t (*keys)[SA_KEY_SIZE], const int8_t *signs, size_t k)
{
    sa_mask_words((uint8_t *)w, 4, n, offset, keys, signs, k);
}

static void sa_mask_u64_x86(uint64_t *w, size_t n, uint64_t offset,
                            const uint8_t (*keys)[SA_KEY_SIZE], const int8_t *signs, size_t k)
{
    sa_mask_words((uint8_t *)w, 8, n, offset, keys, signs, k);
}

#define SA_X86_KERNEL(NAME)                                                                   \
    {                                                                                         \
        NAME, sa_protect_u32_x86, sa_protect_u64_x86, sa_mask_u32_x86, sa_mask_u64_x86,       \
            sa_keystream_bytes                                                                \
    }

#endif /* SECAGG_MASK_X86_H */
