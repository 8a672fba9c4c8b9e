/* SPDX-License-Identifier: Apache-2.0 */
/* kernel_test.c: checks every kernel build this CPU runs (ctest, SECAGG_BUILD_TESTS).
 *
 *  - NIST SP 800-38A §F.5.1 (CTR-AES128.Encrypt): keystream xor plaintext = ciphertext.
 *  - Counter carry: initial counter blocks whose low 64 bits, or all 128 bits, wrap
 *    (SP 800-38A §B.1), against a portable FIPS-197 AES written here from the spec.
 *  - protect and mask against a scalar reference (DESIGN §3-§4) built on that AES,
 *    across chunk boundaries, odd lengths, offsets, unaligned buffers and more keys
 *    than one expansion batch; and sa_sum_* against a naive sum.
 * Also meant to run under -fsanitize=address,undefined.
 */
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h" /* secagg_kernel.h and the private sa_kernel_builds */

static int sa_failures;

#define SA_CHECK(cond, ...)                                                                   \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            sa_failures++;                                                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                              \
            fprintf(stderr, __VA_ARGS__);                                                     \
            fputc('\n', stderr);                                                              \
        }                                                                                     \
    } while (0)

/* ---- Portable AES-128, straight from FIPS-197 (no tables but the S-box) ------------- */

static const uint8_t sa_sbox[256] = {
    0x63, 0x7c, 0x77, 0x7b, 0xf2, 0x6b, 0x6f, 0xc5, 0x30, 0x01, 0x67, 0x2b, 0xfe, 0xd7, 0xab,
    0x76, 0xca, 0x82, 0xc9, 0x7d, 0xfa, 0x59, 0x47, 0xf0, 0xad, 0xd4, 0xa2, 0xaf, 0x9c, 0xa4,
    0x72, 0xc0, 0xb7, 0xfd, 0x93, 0x26, 0x36, 0x3f, 0xf7, 0xcc, 0x34, 0xa5, 0xe5, 0xf1, 0x71,
    0xd8, 0x31, 0x15, 0x04, 0xc7, 0x23, 0xc3, 0x18, 0x96, 0x05, 0x9a, 0x07, 0x12, 0x80, 0xe2,
    0xeb, 0x27, 0xb2, 0x75, 0x09, 0x83, 0x2c, 0x1a, 0x1b, 0x6e, 0x5a, 0xa0, 0x52, 0x3b, 0xd6,
    0xb3, 0x29, 0xe3, 0x2f, 0x84, 0x53, 0xd1, 0x00, 0xed, 0x20, 0xfc, 0xb1, 0x5b, 0x6a, 0xcb,
    0xbe, 0x39, 0x4a, 0x4c, 0x58, 0xcf, 0xd0, 0xef, 0xaa, 0xfb, 0x43, 0x4d, 0x33, 0x85, 0x45,
    0xf9, 0x02, 0x7f, 0x50, 0x3c, 0x9f, 0xa8, 0x51, 0xa3, 0x40, 0x8f, 0x92, 0x9d, 0x38, 0xf5,
    0xbc, 0xb6, 0xda, 0x21, 0x10, 0xff, 0xf3, 0xd2, 0xcd, 0x0c, 0x13, 0xec, 0x5f, 0x97, 0x44,
    0x17, 0xc4, 0xa7, 0x7e, 0x3d, 0x64, 0x5d, 0x19, 0x73, 0x60, 0x81, 0x4f, 0xdc, 0x22, 0x2a,
    0x90, 0x88, 0x46, 0xee, 0xb8, 0x14, 0xde, 0x5e, 0x0b, 0xdb, 0xe0, 0x32, 0x3a, 0x0a, 0x49,
    0x06, 0x24, 0x5c, 0xc2, 0xd3, 0xac, 0x62, 0x91, 0x95, 0xe4, 0x79, 0xe7, 0xc8, 0x37, 0x6d,
    0x8d, 0xd5, 0x4e, 0xa9, 0x6c, 0x56, 0xf4, 0xea, 0x65, 0x7a, 0xae, 0x08, 0xba, 0x78, 0x25,
    0x2e, 0x1c, 0xa6, 0xb4, 0xc6, 0xe8, 0xdd, 0x74, 0x1f, 0x4b, 0xbd, 0x8b, 0x8a, 0x70, 0x3e,
    0xb5, 0x66, 0x48, 0x03, 0xf6, 0x0e, 0x61, 0x35, 0x57, 0xb9, 0x86, 0xc1, 0x1d, 0x9e, 0xe1,
    0xf8, 0x98, 0x11, 0x69, 0xd9, 0x8e, 0x94, 0x9b, 0x1e, 0x87, 0xe9, 0xce, 0x55, 0x28, 0xdf,
    0x8c, 0xa1, 0x89, 0x0d, 0xbf, 0xe6, 0x42, 0x68, 0x41, 0x99, 0x2d, 0x0f, 0xb0, 0x54, 0xbb,
    0x16};

static uint8_t sa_xtime(uint8_t b)
{
    return (uint8_t)((b << 1) ^ ((b & 0x80) ? 0x1b : 0x00));
}

/* FIPS-197 §5.2 */
static void ref_expand(uint8_t rk[176], const uint8_t key[16])
{
    uint8_t rcon = 0x01;
    memcpy(rk, key, 16);
    for (int i = 16; i < 176; i += 4) {
        uint8_t t[4];
        memcpy(t, rk + i - 4, 4);
        if (i % 16 == 0) {
            const uint8_t t0 = t[0];
            t[0] = (uint8_t)(sa_sbox[t[1]] ^ rcon);
            t[1] = sa_sbox[t[2]];
            t[2] = sa_sbox[t[3]];
            t[3] = sa_sbox[t0];
            rcon = sa_xtime(rcon);
        }
        for (int j = 0; j < 4; j++)
            rk[i + j] = (uint8_t)(rk[i - 16 + j] ^ t[j]);
    }
}

/* FIPS-197 §5.1; the state is column-major, s[4c + r]. */
static void ref_encrypt(const uint8_t rk[176], const uint8_t in[16], uint8_t out[16])
{
    uint8_t s[16], t[16];
    for (int i = 0; i < 16; i++)
        s[i] = (uint8_t)(in[i] ^ rk[i]);
    for (int round = 1; round <= 10; round++) {
        for (int i = 0; i < 16; i++) /* SubBytes + ShiftRows */
            t[i] = sa_sbox[s[(i + 4 * (i % 4)) % 16]];
        if (round < 10) { /* MixColumns */
            for (int c = 0; c < 4; c++) {
                const uint8_t *a = t + 4 * c;
                const uint8_t x = (uint8_t)(a[0] ^ a[1] ^ a[2] ^ a[3]);
                uint8_t m[4];
                for (int r = 0; r < 4; r++)
                    m[r] = (uint8_t)(a[r] ^ x ^ sa_xtime((uint8_t)(a[r] ^ a[(r + 1) % 4])));
                memcpy(s + 4 * c, m, 4);
            }
        } else {
            memcpy(s, t, 16);
        }
        for (int i = 0; i < 16; i++)
            s[i] ^= rk[16 * round + i];
    }
    memcpy(out, s, 16);
}

/* AES-128-CTR from iv with the counter incremented as one 128-bit big-endian integer. */
static void ref_ctr(uint8_t *out, size_t nbytes, const uint8_t key[16], const uint8_t iv[16])
{
    uint8_t rk[176], ctr[16], ks[16];
    ref_expand(rk, key);
    memcpy(ctr, iv, 16);
    for (size_t i = 0; i < nbytes; i += 16) {
        ref_encrypt(rk, ctr, ks);
        memcpy(out + i, ks, nbytes - i < 16 ? nbytes - i : 16);
        for (int b = 15; b >= 0 && ++ctr[b] == 0; b--)
            ;
    }
}

/* Keystream word (off + i) for i < n of a zero-IV keystream (DESIGN §3). */
static void ref_words(uint64_t *w, size_t n, uint64_t off, int wsz, const uint8_t key[16])
{
    uint8_t iv[16] = {0};
    const uint64_t first = off * (uint64_t)wsz;
    const uint64_t blk = first / 16, skip = first % 16;
    for (int i = 0; i < 8; i++)
        iv[15 - i] = (uint8_t)(blk >> (8 * i));
    const size_t nbytes = (size_t)skip + n * (size_t)wsz;
    uint8_t *buf = malloc(nbytes + 1);
    ref_ctr(buf, nbytes, key, iv);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = buf + skip + i * (size_t)wsz;
        uint64_t v = 0;
        for (int b = wsz - 1; b >= 0; b--)
            v = (v << 8) | p[b];
        w[i] = v;
    }
    free(buf);
}

/* ---- helpers ----------------------------------------------------------------------- */

static uint64_t sa_rng = 0x9e3779b97f4a7c15ULL;

static uint64_t rnd(void)
{
    /* splitmix64 */
    uint64_t z = (sa_rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void hex(uint8_t *out, const char *s)
{
    for (size_t i = 0; s[2 * i] != '\0'; i++) {
        unsigned v;
        sscanf(s + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
}

static uint64_t get_word(const uint8_t *p, int wsz)
{
    uint64_t v = 0;
    memcpy(&v, p, (size_t)wsz); /* little-endian host */
    return v;
}

static void put_word(uint8_t *p, int wsz, uint64_t v)
{
    memcpy(p, &v, (size_t)wsz);
}

/* Round half to even for 0 <= t < 2^52 by the classic 2^52 addition, under the
 * default rounding mode: an independent path from the kernel's ROUNDPD. */
static double ref_rint(double t)
{
    volatile double big = 0x1p52;
    volatile double u = t + big;
    return u - big;
}

/* DESIGN §4, written from the text. */
static uint64_t ref_quant(double x, double c, int bits)
{
    const double top = (double)((UINT64_C(1) << bits) - 1);
    const double s = top / (2.0 * c);
    const double xc = x < -c ? -c : (x > c ? c : x); /* clip(x, -c, c) */
    double q = ref_rint((xc + c) * s);
    if (q > top)
        q = top;
    return (uint64_t)q;
}

static double xval(const uint8_t *x, sa_dtype dt, size_t i)
{
    if (dt == SA_F32) {
        float f;
        memcpy(&f, x + 4 * i, 4);
        return f;
    }
    double d;
    memcpy(&d, x + 8 * i, 8);
    return d;
}

static void put_x(uint8_t *x, sa_dtype dt, size_t i, double v)
{
    if (dt == SA_F32) {
        float f = (float)v;
        memcpy(x + 4 * i, &f, 4);
    } else {
        memcpy(x + 8 * i, &v, 8);
    }
}

/* ---- tests -------------------------------------------------------------------------- */

static void test_f51(const sa_kernel *k)
{
    /* NIST SP 800-38A §F.5.1 CTR-AES128.Encrypt */
    uint8_t key[16], iv[16], pt[64], ct[64], ks[64], ref[64];
    hex(key, "2b7e151628aed2a6abf7158809cf4f3c");
    hex(iv, "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff");
    hex(pt, "6bc1bee22e409f96e93d7e117393172a"
            "ae2d8a571e03ac9c9eb76fac45af8e51"
            "30c81c46a35ce411e5fbc1191a0a52ef"
            "f69f2445df4f9b17ad2b417be66c3710");
    hex(ct, "874d6191b620e3261bef6864990db6ce"
            "9806f66b7970fdff8617187bb9fffdff"
            "5ae4df3edbd5d35e5b4f09020db03eab"
            "1e031dda2fbe03d1792170a0f3009cee");
    ref_ctr(ref, 64, key, iv);
    for (int i = 0; i < 64; i++)
        SA_CHECK((uint8_t)(ref[i] ^ pt[i]) == ct[i], "reference AES fails F.5.1 at byte %d", i);
    for (size_t n = 0; n <= 64; n++) {
        memset(ks, 0xA5, sizeof ks);
        k->keystream(ks, n, key, iv);
        for (size_t i = 0; i < n; i++)
            SA_CHECK((uint8_t)(ks[i] ^ pt[i]) == ct[i], "%s: F.5.1 byte %zu of %zu", k->name, i,
                     n);
        for (size_t i = n; i < 64; i++)
            SA_CHECK(ks[i] == 0xA5, "%s: keystream wrote past %zu bytes", k->name, n);
    }
}

static void test_carry(const sa_kernel *k)
{
    static const char *ivs[] = {
        "00000000000000000000000000000000", /* the masks' all-zero block */
        "0000000000000000fffffffffffffff0", /* low 64 bits wrap mid-run */
        "00000000000000fffffffffffffffffd", /* carry ripples into byte 7 */
        "fffffffffffffffffffffffffffffffa", /* all 128 bits wrap to zero */
        "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff", /* F.5.1's, continued far */
        "0123456789abcdef00000000fffffffe", /* 32-bit carry (OpenSSL's ctr32 edge) */
    };
    static const size_t lens[] = {1, 15, 16, 17, 100, 16 * 16 + 5, 16 * 40, 16 * 700 + 9};
    uint8_t key[16], iv[16];
    for (size_t v = 0; v < sizeof ivs / sizeof ivs[0]; v++) {
        hex(iv, ivs[v]);
        for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
            const size_t n = lens[l];
            uint8_t *a = malloc(n + 1), *b = malloc(n + 1);
            for (int i = 0; i < 16; i++)
                key[i] = (uint8_t)rnd();
            /* Unaligned destination on purpose. */
            k->keystream(a + 1, n, key, iv);
            ref_ctr(b, n, key, iv);
            SA_CHECK(memcmp(a + 1, b, n) == 0, "%s: keystream iv %s len %zu", k->name, ivs[v], n);
            free(a);
            free(b);
        }
    }
}

/* Reference protect: quantize, then add/subtract every key's words. */
static void ref_protect(uint8_t *out, int wsz, const uint8_t *x, sa_dtype dt, size_t n, double c,
                        int bits, const uint8_t (*keys)[16], const int8_t *signs, size_t k,
                        sa_clipstats *st)
{
    memset(st, 0, sizeof *st);
    uint64_t *ws = malloc((n + 1) * sizeof *ws);
    const uint64_t mask = wsz == 4 ? 0xffffffffULL : ~0ULL;
    for (size_t i = 0; i < n; i++) {
        const double v = xval(x, dt, i);
        if (!isfinite(v)) {
            if (st->nonfinite++ == 0)
                st->first_nonfinite = i;
            put_word(out + i * (size_t)wsz, wsz, 0);
            continue;
        }
        if (fabs(v) > c)
            st->clipped++;
        if (fabs(v) > st->max_abs)
            st->max_abs = fabs(v);
        put_word(out + i * (size_t)wsz, wsz, ref_quant(v, c, bits));
    }
    for (size_t j = 0; j < k; j++) {
        ref_words(ws, n, 0, wsz, keys[j]);
        for (size_t i = 0; i < n; i++) {
            uint64_t a = get_word(out + i * (size_t)wsz, wsz);
            a = (signs[j] > 0 ? a + ws[i] : a - ws[i]) & mask;
            put_word(out + i * (size_t)wsz, wsz, a);
        }
    }
    free(ws);
}

static void fill_x(uint8_t *x, sa_dtype dt, size_t n, double c, int bits)
{
    const double s = (double)((UINT64_C(1) << bits) - 1) / (2.0 * c);
    for (size_t i = 0; i < n; i++) {
        double v;
        switch (rnd() % 10) {
        case 0: v = c; break;
        case 1: v = -c; break;
        case 2: v = (rnd() & 1 ? 1 : -1) * c * (1.0 + (double)(rnd() % 1000) / 100.0); break;
        case 3: v = -0.0; break;
        case 4: v = 1e-300 * (double)(rnd() % 7); break;
        case 5: /* exact halfway points of the quantizer grid, where representable */
            v = ((double)(rnd() % 64) + 0.5) / s - c;
            break;
        default: v = ((double)(int64_t)(rnd() >> 11) / 0x1p52) * c * 1.2; break;
        }
        put_x(x, dt, i, v);
    }
}

static void test_protect(const sa_kernel *k)
{
    static const size_t lens[] = {0,    1,    3,    4,    5,    7,    8,    9,     15,
                                  16,   17,   31,   32,   33,   2047, 2048, 2049,  4095,
                                  4096, 4097, 6143, 8195, 20001};
    static const struct {
        int wsz, bits;
    } rings[] = {{4, 1}, {4, 16}, {4, 31}, {4, 32}, {8, 1}, {8, 33}, {8, 48}};
    static const size_t nkeys[] = {0, 1, 3, 35}; /* 35 > one expansion batch */
    uint8_t keys[40][16];
    int8_t signs[40];
    for (size_t j = 0; j < 40; j++) {
        for (int b = 0; b < 16; b++)
            keys[j][b] = (uint8_t)rnd();
        signs[j] = (rnd() & 1) ? 1 : -1;
    }
    for (size_t r = 0; r < sizeof rings / sizeof rings[0]; r++)
        for (int dti = 0; dti < 2; dti++)
            for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++)
                for (size_t kk = 0; kk < sizeof nkeys / sizeof nkeys[0]; kk++) {
                    const size_t n = lens[l], nk = nkeys[kk];
                    const int wsz = rings[r].wsz, bits = rings[r].bits;
                    const sa_dtype dt = dti ? SA_F64 : SA_F32;
                    const size_t xsz = dt == SA_F32 ? 4 : 8;
                    if (nk == 35 && n > 4097)
                        continue; /* the reference AES is slow */
                    const double c = (l % 3 == 0) ? 3.0 : 0.7;
                    /* Unaligned x and out (numpy views at odd offsets). */
                    uint8_t *xb = malloc(n * xsz + 8), *ob = malloc(n * (size_t)wsz + 8),
                            *rb = malloc(n * (size_t)wsz + 8);
                    uint8_t *x = xb + 3, *o = ob + 1;
                    fill_x(x, dt, n, c, bits);
                    sa_clipstats st, rs;
                    if (wsz == 4)
                        k->protect_u32((uint32_t *)(void *)o, x, dt, n, c, bits,
                                       (const uint8_t(*)[16])keys, signs, nk, &st);
                    else
                        k->protect_u64((uint64_t *)(void *)o, x, dt, n, c, bits,
                                       (const uint8_t(*)[16])keys, signs, nk, &st);
                    ref_protect(rb, wsz, x, dt, n, c, bits, (const uint8_t(*)[16])keys, signs, nk,
                                &rs);
                    SA_CHECK(memcmp(o, rb, n * (size_t)wsz) == 0,
                             "%s: protect ring %d bits %d f%zu n %zu k %zu", k->name, 8 * wsz,
                             bits, 8 * xsz, n, nk);
                    SA_CHECK(st.clipped == rs.clipped && st.max_abs == rs.max_abs &&
                                 st.nonfinite == 0,
                             "%s: stats n %zu: clipped %" PRIu64 "/%" PRIu64 " max %g/%g",
                             k->name, n, st.clipped, rs.clipped, st.max_abs, rs.max_abs);
                    free(xb);
                    free(ob);
                    free(rb);
                }
}

/* NaN and inf are counted in the same pass, with the first index; the statistics
 * of the finite values stay exact (DESIGN §4). Both input types, both rings, with and
 * without a key (the fused loop). */
static void test_nonfinite(const sa_kernel *k)
{
    const size_t n = 5000;
    static const size_t firsts[] = {0, 1, 7, 8, 2047, 2048, 4999};
    uint8_t key[1][16] = {{7}};
    const int8_t sign[1] = {-1};
    uint8_t *x = malloc(n * 8), *o = malloc(n * 8);
    for (int dti = 0; dti < 2; dti++)
        for (int wsz = 4; wsz <= 8; wsz += 4)
            for (size_t nk = 0; nk <= 1; nk++)
                for (size_t f = 0; f < sizeof firsts / sizeof firsts[0]; f++) {
                    const sa_dtype dt = dti ? SA_F64 : SA_F32;
                    for (size_t i = 0; i < n; i++)
                        put_x(x, dt, i, (double)(i % 11) - 5.0); /* 4 in 11 beyond 3 */
                    put_x(x, dt, firsts[f], NAN);
                    if (firsts[f] + 3 < n)
                        put_x(x, dt, firsts[f] + 3, -INFINITY);
                    if (firsts[f] + 2100 < n)
                        put_x(x, dt, firsts[f] + 2100, INFINITY);
                    if (firsts[f] + 2200 < n)
                        put_x(x, dt, firsts[f] + 2200, 9.5);
                    uint64_t clipped = 0, bad = 0;
                    double mx = 0.0;
                    for (size_t i = 0; i < n; i++) {
                        const double v = xval(x, dt, i);
                        if (!isfinite(v)) {
                            bad++;
                            continue;
                        }
                        clipped += fabs(v) > 3.0;
                        if (fabs(v) > mx)
                            mx = fabs(v);
                    }
                    sa_clipstats st;
                    if (wsz == 4)
                        k->protect_u32((uint32_t *)(void *)o, x, dt, n, 3.0, 20,
                                       (const uint8_t(*)[16])key, sign, nk, &st);
                    else
                        k->protect_u64((uint64_t *)(void *)o, x, dt, n, 3.0, 40,
                                       (const uint8_t(*)[16])key, sign, nk, &st);
                    SA_CHECK(st.nonfinite == bad && st.first_nonfinite == firsts[f] &&
                                 st.clipped == clipped && st.max_abs == mx,
                             "%s: non-finite stats (f%d ring %d k %zu first %zu): %" PRIu64
                             " at %" PRIu64 ", clipped %" PRIu64 " max %g",
                             k->name, dti ? 64 : 32, 8 * wsz, nk, firsts[f], st.nonfinite,
                             st.first_nonfinite, st.clipped, st.max_abs);
                }
    free(x);
    free(o);
}

static void test_mask(const sa_kernel *k)
{
    static const size_t lens[] = {0, 1, 2, 3, 5, 7, 8, 9, 17, 33, 2047, 2049, 4097, 10007};
    uint8_t keys[3][16];
    const int8_t signs[3] = {1, -1, 1};
    for (size_t j = 0; j < 3; j++)
        for (int b = 0; b < 16; b++)
            keys[j][b] = (uint8_t)rnd();
    for (int wsz = 4; wsz <= 8; wsz += 4)
        for (uint64_t off = 0; off <= 5; off++)
            for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
                const size_t n = lens[l];
                uint8_t *wb = malloc(n * (size_t)wsz + 8), *rb = malloc(n * (size_t)wsz + 8);
                uint64_t *ws = malloc((n + 1) * sizeof *ws);
                uint8_t *w = wb + 5;
                for (size_t i = 0; i < n * (size_t)wsz; i++)
                    w[i] = rb[i] = (uint8_t)rnd();
                const uint64_t o = off == 5 ? 1000003 : off;
                if (wsz == 4)
                    k->mask_u32((uint32_t *)(void *)w, n, o, (const uint8_t(*)[16])keys, signs, 3);
                else
                    k->mask_u64((uint64_t *)(void *)w, n, o, (const uint8_t(*)[16])keys, signs, 3);
                const uint64_t mask = wsz == 4 ? 0xffffffffULL : ~0ULL;
                for (size_t j = 0; j < 3; j++) {
                    ref_words(ws, n, o, wsz, keys[j]);
                    for (size_t i = 0; i < n; i++) {
                        uint64_t a = get_word(rb + i * (size_t)wsz, wsz);
                        a = (signs[j] > 0 ? a + ws[i] : a - ws[i]) & mask;
                        put_word(rb + i * (size_t)wsz, wsz, a);
                    }
                }
                SA_CHECK(memcmp(w, rb, n * (size_t)wsz) == 0, "%s: mask ring %d off %" PRIu64
                         " n %zu", k->name, 8 * wsz, o, n);
                free(wb);
                free(rb);
                free(ws);
            }
}

/* Every variant gives the same bytes as the first (the best) on a large input. */
static void test_cross(const sa_kernel *const *ks, size_t nk)
{
    const size_t n = 100003;
    uint8_t keys[10][16];
    int8_t signs[10];
    for (size_t j = 0; j < 10; j++) {
        for (int b = 0; b < 16; b++)
            keys[j][b] = (uint8_t)rnd();
        signs[j] = (j % 3 == 0) ? -1 : 1;
    }
    float *x = malloc(n * sizeof *x);
    uint32_t *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    fill_x((uint8_t *)x, SA_F32, n, 3.0, 30);
    sa_clipstats sa, sb;
    ks[0]->protect_u32(a, x, SA_F32, n, 3.0, 30, (const uint8_t(*)[16])keys, signs, 10, &sa);
    for (size_t v = 1; v < nk; v++) {
        ks[v]->protect_u32(b, x, SA_F32, n, 3.0, 30, (const uint8_t(*)[16])keys, signs, 10, &sb);
        SA_CHECK(memcmp(a, b, n * sizeof *a) == 0 && sa.clipped == sb.clipped &&
                     sa.max_abs == sb.max_abs,
                 "%s and %s disagree", ks[0]->name, ks[v]->name);
    }
    free(x);
    free(a);
    free(b);
}

static void test_sum(void)
{
    static const size_t lens[] = {0, 1, 7, 4095, 4096, 4097, 10001};
    for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++)
        for (size_t nv = 0; nv <= 7; nv++) {
            const size_t n = lens[l];
            uint32_t *acc32 = malloc(n * 4 + 4), *ref32 = malloc(n * 4 + 4);
            uint64_t *acc64 = malloc(n * 8 + 8), *ref64 = malloc(n * 8 + 8);
            uint8_t *vb32[7], *vb64[7];
            const uint32_t *v32[7];
            const uint64_t *v64[7];
            for (size_t i = 0; i < n; i++) {
                acc32[i] = ref32[i] = (uint32_t)rnd();
                acc64[i] = ref64[i] = rnd();
            }
            for (size_t j = 0; j < nv; j++) {
                vb32[j] = malloc(n * 4 + 8);
                vb64[j] = malloc(n * 8 + 8);
                /* Unaligned by j bytes. */
                for (size_t i = 0; i < n; i++) {
                    const uint32_t a = (uint32_t)rnd();
                    const uint64_t b = rnd();
                    memcpy(vb32[j] + j + 4 * i, &a, 4);
                    memcpy(vb64[j] + j + 8 * i, &b, 8);
                    ref32[i] += a;
                    ref64[i] += b;
                }
                v32[j] = (const uint32_t *)(const void *)(vb32[j] + j);
                v64[j] = (const uint64_t *)(const void *)(vb64[j] + j);
            }
            sa_sum_u32(acc32, v32, nv, n);
            sa_sum_u64(acc64, v64, nv, n);
            SA_CHECK(memcmp(acc32, ref32, n * 4) == 0, "sum_u32 n %zu nv %zu", n, nv);
            SA_CHECK(memcmp(acc64, ref64, n * 8) == 0, "sum_u64 n %zu nv %zu", n, nv);
            for (size_t j = 0; j < nv; j++) {
                free(vb32[j]);
                free(vb64[j]);
            }
            free(acc32);
            free(ref32);
            free(acc64);
            free(ref64);
        }
}

int main(void)
{
    /* Every build this CPU runs, two "aesni" ones included, is tested directly: each
     * under a copy of its sa_kernel named after the build, for the messages. */
    const sa_kernel *ks[8], *best[8], *named[8];
    const char *builds[8];
    sa_kernel copies[8];
    const size_t nb = sa_kernel_builds(ks, builds, 8);
    const size_t nk = sa_kernels_available(best, 8);
    printf("variants:");
    for (size_t v = 0; v < nk; v++)
        printf(" %s", best[v]->name);
    printf("%s\nbuilds:", nk ? "" : " (none on this CPU)");
    for (size_t v = 0; v < nb; v++)
        printf(" %s", builds[v]);
    printf("\n");
    /* Public names: each listed once, best build first; find gives that build. */
    size_t first = 0;
    for (size_t v = 0; v < nb; v++) {
        size_t w = 0;
        while (strcmp(ks[w]->name, ks[v]->name) != 0)
            w++; /* the first (best) build with this name */
        SA_CHECK(sa_kernel_find(ks[v]->name) == ks[w], "find(%s) for %s", ks[v]->name,
                 builds[v]);
        if (w == v) {
            SA_CHECK(first < nk && best[first] == ks[v], "available() lacks %s in order",
                     builds[v]);
            first++;
        }
    }
    SA_CHECK(first == nk, "available() lists %zu names, the builds %zu", nk, first);
    for (size_t v = 0; v < nb; v++) {
        copies[v] = *ks[v];
        copies[v].name = builds[v];
        named[v] = &copies[v];
        test_f51(named[v]);
        test_carry(named[v]);
        test_protect(named[v]);
        test_nonfinite(named[v]);
        test_mask(named[v]);
    }
    SA_CHECK(sa_kernel_find("nope") == NULL, "find(nope)");
    if (nb > 1)
        test_cross(named, nb);
    test_sum();
    printf("%s (%d failures)\n", sa_failures ? "FAILED" : "OK", sa_failures);
    return sa_failures ? 1 : 0;
}
