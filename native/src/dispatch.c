/* SPDX-License-Identifier: Apache-2.0 */
/* dispatch.c: the table of kernel variants, best first (libsodium's
 * pick_best_implementation). A variant is returned only if cpu.c's probe says this
 * CPU and OS can run every instruction it uses (STYLE §3: never call a variant
 * without the probe). Nothing is cached: the caller (Py_mod_exec) stores its choice
 * in module state, so no lazily written static can race.
 */
#include <string.h>

#include "kernels.h"

typedef struct {
    const sa_kernel *kernel;
    unsigned needs; /* SA_CPU_* bits that must all be present */
} sa_variant;

static const sa_variant sa_variants[] = {
#if defined(SA_HAVE_X86)
    /* mask_vaes.c is compiled with -mvaes -mavx2 -maes (and SSE4.1, implied). */
    {&sa_kernel_vaes, SA_CPU_VAES | SA_CPU_AVX2 | SA_CPU_AVX | SA_CPU_AESNI | SA_CPU_SSE41},
    /* mask_aesni.c is compiled with -maes -msse4.1. */
    {&sa_kernel_aesni, SA_CPU_AESNI | SA_CPU_SSE41},
#endif
    {NULL, 0}, /* keeps the array non-empty where no variant is compiled */
};

size_t sa_kernels_available(const sa_kernel **out, size_t max)
{
    const unsigned have = sa_cpu_features();
    size_t n = 0;
    for (size_t i = 0; sa_variants[i].kernel != NULL; i++) {
        if ((sa_variants[i].needs & have) != sa_variants[i].needs)
            continue;
        if (n < max && out != NULL)
            out[n] = sa_variants[i].kernel;
        n++;
    }
    return n < max ? n : max;
}

const sa_kernel *sa_kernel_find(const char *name)
{
    if (name == NULL)
        return NULL;
    const unsigned have = sa_cpu_features();
    for (size_t i = 0; sa_variants[i].kernel != NULL; i++) {
        if (strcmp(sa_variants[i].kernel->name, name) != 0)
            continue;
        if ((sa_variants[i].needs & have) != sa_variants[i].needs)
            return NULL;
        return sa_variants[i].kernel;
    }
    return NULL;
}
