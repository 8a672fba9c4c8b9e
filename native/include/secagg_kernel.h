/* SPDX-License-Identifier: Apache-2.0 */
/* secagg_kernel.h: the plain C API of the masking kernel (no Python types).
 *
 * Semantics are DESIGN.md §3-§4, byte for byte:
 *  - PRG: AES-128-CTR, initial counter block = 16 zero bytes, the counter block
 *    incremented as one 128-bit big-endian integer (SP 800-38A §B.1). Mask word i
 *    is the little-endian uint32 (uint64 for ring 64) at keystream bytes
 *    [4i, 4i+4) ([8i, 8i+8)).
 *  - Quantizer, all in float64 in exactly this order, no FMA:
 *      clipped  = |x| > c
 *      q        = min(round_half_even((min(max(x, -c), c) + c) * s), 2^bits - 1)
 *      s        = (2^bits - 1) / (2c)
 *  - out[i] = q[i] + sum_j signs[j] * keystream_j word i   (mod 2^32 or 2^64)
 *
 * Nothing here allocates, fails or touches Python. Callers validate arguments
 * (module.c: 1 <= bits <= min(ring bits, 48); c finite, > 0 and with 2c finite;
 * signs +-1; out and x not overlapping).
 * Pointers need not be aligned (numpy views may start at any byte): the kernel
 * accesses memory with unaligned loads and stores only.
 */
#ifndef SECAGG_KERNEL_H
#define SECAGG_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SA_KEY_SIZE 16
#define SA_BLOCK_SIZE 16
#define SA_MAX_BITS 48

typedef enum { SA_F32 = 0, SA_F64 = 1 } sa_dtype;

typedef struct {
    uint64_t clipped;         /* count of finite x with |x| > c */
    double max_abs;           /* max |x| over finite x, before clipping; 0.0 if none */
    uint64_t nonfinite;       /* count of NaN and +-inf */
    uint64_t first_nonfinite; /* index of the first one; meaningful if nonfinite > 0 */
} sa_clipstats;

/* signs[j] is +1 (add keystream j) or -1 (subtract it). */
typedef void (*sa_protect_u32_fn)(uint32_t *out, const void *x, sa_dtype dtype, size_t n,
                                  double c, int bits, const uint8_t (*keys)[SA_KEY_SIZE],
                                  const int8_t *signs, size_t k, sa_clipstats *st);
typedef void (*sa_protect_u64_fn)(uint64_t *out, const void *x, sa_dtype dtype, size_t n,
                                  double c, int bits, const uint8_t (*keys)[SA_KEY_SIZE],
                                  const int8_t *signs, size_t k, sa_clipstats *st);
/* In place: w[i] += sum_j signs[j] * keystream_j word (offset + i). */
typedef void (*sa_mask_u32_fn)(uint32_t *w, size_t n, uint64_t offset,
                               const uint8_t (*keys)[SA_KEY_SIZE], const int8_t *signs,
                               size_t k);
typedef void (*sa_mask_u64_fn)(uint64_t *w, size_t n, uint64_t offset,
                               const uint8_t (*keys)[SA_KEY_SIZE], const int8_t *signs,
                               size_t k);
/* Test hook: raw AES-128-CTR keystream from an explicit initial counter block. */
typedef void (*sa_keystream_fn)(uint8_t *out, size_t nbytes, const uint8_t key[SA_KEY_SIZE],
                                const uint8_t iv[SA_BLOCK_SIZE]);

/* One instruction-set variant of the fused kernel. */
typedef struct {
    const char *name; /* "vaes", "aesni", "armv8" */
    sa_protect_u32_fn protect_u32;
    sa_protect_u64_fn protect_u64;
    sa_mask_u32_fn mask_u32;
    sa_mask_u64_fn mask_u64;
    sa_keystream_fn keystream;
} sa_kernel;

/* Variants this CPU and OS can run, best first; returns how many (<= max). */
size_t sa_kernels_available(const sa_kernel **out, size_t max);
/* The named variant if this CPU can run it, else NULL. */
const sa_kernel *sa_kernel_find(const char *name);

/* Server side, memory-bound: acc[i] += sum_j vs[j][i] (mod 2^32 / 2^64). */
void sa_sum_u32(uint32_t *acc, const uint32_t *const *vs, size_t nv, size_t n);
void sa_sum_u64(uint64_t *acc, const uint64_t *const *vs, size_t nv, size_t n);

/* Server side, one pass: out[i] = ((double)s[i] * two_c) / top - nc in float64, in
 * exactly that order (DESIGN §4). Returns how many words exceed bound: a word above
 * m * (2^b - 1) means the masks did not cancel, and the caller must not use out. */
size_t sa_dequantize_u32(double *out, const uint32_t *s, size_t n, double two_c, double top,
                         double nc, uint64_t bound);
size_t sa_dequantize_u64(double *out, const uint64_t *s, size_t n, double two_c, double top,
                         double nc, uint64_t bound);

#ifdef __cplusplus
}
#endif
#endif /* SECAGG_KERNEL_H */
