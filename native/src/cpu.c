/* SPDX-License-Identifier: Apache-2.0 */
/* cpu.c: run-time CPU feature probing (STYLE §3, "Runtime CPU dispatch").
 *
 * An instruction is usable only if the CPU has it (CPUID) *and*, for the wider
 * registers, the OS saves their state on a context switch: CPUID.1:ECX.OSXSAVE
 * says XGETBV may be executed, and XCR0 must enable the SSE and YMM state (and the
 * opmask/ZMM state for AVX-512). This is libsodium's runtime.c recipe (Intel SDM
 * vol. 1 §14.3 "Detection of Intel AVX instructions").
 */
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>

/* CPUID.1:ECX */
#define SA_ECX1_SSE41 (1u << 19)
#define SA_ECX1_AESNI (1u << 25)
#define SA_ECX1_OSXSAVE (1u << 27)
#define SA_ECX1_AVX (1u << 28)
/* CPUID.(EAX=7,ECX=0) */
#define SA_EBX7_AVX2 (1u << 5)
#define SA_EBX7_AVX512F (1u << 16)
#define SA_ECX7_VAES (1u << 9)
/* XCR0 state components (SDM vol. 1 §13.1). */
#define SA_XCR0_SSE (1u << 1)
#define SA_XCR0_YMM (1u << 2)
#define SA_XCR0_OPMASK (1u << 5)
#define SA_XCR0_ZMM_HI256 (1u << 6)
#define SA_XCR0_HI16_ZMM (1u << 7)

static uint32_t sa_xgetbv0(void)
{
    uint32_t lo, hi;
    /* XGETBV with ECX = 0 reads XCR0; only valid when OSXSAVE is set. */
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return lo;
}

unsigned sa_cpu_features(void)
{
    unsigned a, b, c, d, f = 0;
    unsigned max_leaf = __get_cpuid_max(0, NULL);
    if (max_leaf < 1 || !__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    if (c & SA_ECX1_SSE41)
        f |= SA_CPU_SSE41;
    if (c & SA_ECX1_AESNI)
        f |= SA_CPU_AESNI;

    uint32_t xcr0 = 0;
    if ((c & SA_ECX1_OSXSAVE) != 0)
        xcr0 = sa_xgetbv0();
    const int os_ymm = (xcr0 & (SA_XCR0_SSE | SA_XCR0_YMM)) == (SA_XCR0_SSE | SA_XCR0_YMM);
    const uint32_t zmm_mask = SA_XCR0_OPMASK | SA_XCR0_ZMM_HI256 | SA_XCR0_HI16_ZMM;
    const int os_zmm = os_ymm && (xcr0 & zmm_mask) == zmm_mask;
    if ((c & SA_ECX1_AVX) && os_ymm)
        f |= SA_CPU_AVX;

    if (max_leaf >= 7 && (f & SA_CPU_AVX)) {
        __cpuid_count(7, 0, a, b, c, d);
        if (b & SA_EBX7_AVX2)
            f |= SA_CPU_AVX2;
        if (c & SA_ECX7_VAES)
            f |= SA_CPU_VAES;
        if ((b & SA_EBX7_AVX512F) && os_zmm)
            f |= SA_CPU_AVX512F;
    }
    return f;
}

#else

/* No x86 variant can run elsewhere; the armv8 variant (NEON is baseline on
 * arm64) will add its own probe. */
unsigned sa_cpu_features(void)
{
    return 0;
}

#endif
