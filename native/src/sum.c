/* SPDX-License-Identifier: Apache-2.0 */
/* sum.c: the server side: the sum of masked vectors, acc[i] += sum_j vs[j][i] mod
 * 2^32/2^64, and the dequantization of the exact integer sum.
 *
 * Memory-bound (DESIGN §6: at least 0.6x numpy's read bandwidth). acc is walked in
 * chunks that stay in L1 while all nv vectors stream through, so each chunk of acc
 * is read and written once whatever nv is; four vectors are added per pass over a
 * chunk to keep the loads per stored word low. Plain C: gcc -O3 vectorizes the inner
 * loops. The buffers come from numpy and may be unaligned, so words are accessed
 * through 1-byte-aligned types (no misaligned-access undefined behaviour).
 */
#include <stddef.h>
#include <stdint.h>

#include "secagg_kernel.h"

/* 4096 words: 16 KiB (ring 32) or 32 KiB (ring 64) of acc per chunk. */
#define SA_SUM_CHUNK 4096

typedef uint32_t sa_u32u __attribute__((aligned(1), may_alias));
typedef uint64_t sa_u64u __attribute__((aligned(1), may_alias));

#define SA_DEFINE_SUM(NAME, T, TU)                                                            \
    void NAME(T *acc_, const T *const *vs, size_t nv, size_t n)                               \
    {                                                                                         \
        TU *acc = (TU *)acc_;                                                                 \
        for (size_t i0 = 0; i0 < n; i0 += SA_SUM_CHUNK) {                                     \
            const size_t m = n - i0 < SA_SUM_CHUNK ? n - i0 : SA_SUM_CHUNK;                   \
            TU *restrict a = acc + i0;                                                        \
            size_t j = 0;                                                                     \
            for (; j + 4 <= nv; j += 4) {                                                     \
                const TU *restrict v0 = (const TU *)vs[j] + i0;                               \
                const TU *restrict v1 = (const TU *)vs[j + 1] + i0;                           \
                const TU *restrict v2 = (const TU *)vs[j + 2] + i0;                           \
                const TU *restrict v3 = (const TU *)vs[j + 3] + i0;                           \
                for (size_t i = 0; i < m; i++)                                                \
                    a[i] += (T)((T)(v0[i] + v1[i]) + (T)(v2[i] + v3[i]));                     \
            }                                                                                 \
            for (; j + 2 <= nv; j += 2) {                                                     \
                const TU *restrict v0 = (const TU *)vs[j] + i0;                               \
                const TU *restrict v1 = (const TU *)vs[j + 1] + i0;                           \
                for (size_t i = 0; i < m; i++)                                                \
                    a[i] += (T)(v0[i] + v1[i]);                                               \
            }                                                                                 \
            for (; j < nv; j++) {                                                             \
                const TU *restrict v0 = (const TU *)vs[j] + i0;                               \
                for (size_t i = 0; i < m; i++)                                                \
                    a[i] += v0[i];                                                            \
            }                                                                                 \
        }                                                                                     \
    }

SA_DEFINE_SUM(sa_sum_u32, uint32_t, sa_u32u)
SA_DEFINE_SUM(sa_sum_u64, uint64_t, sa_u64u)

typedef double sa_f64u __attribute__((aligned(1), may_alias));

/* One pass instead of numpy's five (cast, multiply, divide, subtract, max): at
 * d = 10^6 the dequantization otherwise costs a third of a 10-node sum. The
 * division stays a division: DESIGN §4 fixes ((S * 2c) / (2^b - 1)) - m*c, and a
 * multiplication by the reciprocal would change last bits. */
/* Clones for AVX-512 and AVX2, picked once at load time by the dynamic loader from
 * libgcc's CPU probe (which checks OS support, as cpu.c does): the vector division
 * and the uint -> double conversion need them to run at memory speed. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__)
#define SA_SERVER_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SA_SERVER_CLONES
#endif

#define SA_DEFINE_DEQUANTIZE(NAME, T, TU)                                                     \
    SA_SERVER_CLONES size_t NAME(double *out_, const T *s_, size_t n, double two_c, double top, double nc,   \
                uint64_t bound)                                                             \
    {                                                                                         \
        sa_f64u *restrict out = (sa_f64u *)out_;                                              \
        const TU *restrict s = (const TU *)s_;                                                \
        size_t over = 0;                                                                      \
        for (size_t i = 0; i < n; i++) {                                                      \
            const T w = s[i];                                                                 \
            over += (uint64_t)w > bound;                                                      \
            out[i] = ((double)w * two_c) / top - nc;                                          \
        }                                                                                     \
        return over;                                                                          \
    }

SA_DEFINE_DEQUANTIZE(sa_dequantize_u32, uint32_t, sa_u32u)
SA_DEFINE_DEQUANTIZE(sa_dequantize_u64, uint64_t, sa_u64u)
