/* SPDX-License-Identifier: Apache-2.0 */
/* kernels.h: private glue between the CPU probe, the variants and the dispatcher.
 *
 * Nothing here is part of the public API (secagg_kernel.h). The symbols keep the
 * sa_ prefix (STYLE §4) but are hidden, so the extension module exports none of them.
 */
#ifndef SECAGG_KERNELS_H
#define SECAGG_KERNELS_H

#include "secagg_kernel.h"

#if defined(__GNUC__)
#define SA_HIDDEN __attribute__((visibility("hidden")))
#else
#define SA_HIDDEN
#endif

/* What the CPU offers *and* the OS saves across context switches (cpu.c). */
#define SA_CPU_SSE41 (1u << 0)
#define SA_CPU_AESNI (1u << 1)
#define SA_CPU_AVX (1u << 2)     /* CPUID.1:ECX.AVX, OSXSAVE and XCR0 has SSE+YMM */
#define SA_CPU_AVX2 (1u << 3)    /* CPUID.7.0:EBX bit 5, and SA_CPU_AVX */
#define SA_CPU_VAES (1u << 4)    /* CPUID.7.0:ECX bit 9, and SA_CPU_AVX */
#define SA_CPU_AVX512F (1u << 5) /* CPUID.7.0:EBX bit 16, and XCR0 has opmask+ZMM */

SA_HIDDEN unsigned sa_cpu_features(void);

#if defined(SA_HAVE_X86)
SA_HIDDEN extern const sa_kernel sa_kernel_aesni;      /* SSE4.1 quantizer */
SA_HIDDEN extern const sa_kernel sa_kernel_aesni_avx2; /* AVX2 quantizer, also "aesni" */
SA_HIDDEN extern const sa_kernel sa_kernel_vaes;
#endif

/* Every compiled build this CPU and OS can run, best first, including builds that
 * share a public name (two are "aesni"); build[i] names each one ("aesni-avx2").
 * Returns how many (<= max). For kernel_test, which checks each build directly;
 * sa_kernels_available and sa_kernel_find give only the best build of each name. */
SA_HIDDEN size_t sa_kernel_builds(const sa_kernel **out, const char **build, size_t max);

#endif /* SECAGG_KERNELS_H */
