/* SPDX-License-Identifier: Apache-2.0 */
/* dispatch.c: the table of kernel builds, best first (libsodium's
 * pick_best_implementation). A build is returned only if cpu.c's probe says this
 * CPU and OS can run every instruction it uses (STYLE §3: never call a variant
 * without the probe). Several builds may share one public name (DESIGN §4 fixes
 * the names: "aesni" is AES-NI with an AVX2 or an SSE4.1 quantizer); for a name,
 * callers get its best runnable build. Nothing is cached: the caller (Py_mod_exec)
 * stores its choice in module state, so no lazily written static can race.
 */
#include <string.h>

#include "kernels.h"

typedef struct {
    const sa_kernel *kernel;
    const char *build; /* distinguishes builds of one name (kernel_test) */
    unsigned needs;    /* SA_CPU_* bits that must all be present */
} sa_variant;

static const sa_variant sa_variants[] = {
#if defined(SA_HAVE_X86)
    /* mask_vaes.c is compiled with -mvaes -mavx2 -maes (and SSE4.1, implied). */
    {&sa_kernel_vaes, "vaes",
     SA_CPU_VAES | SA_CPU_AVX2 | SA_CPU_AVX | SA_CPU_AESNI | SA_CPU_SSE41},
    /* mask_aesni_avx2.c is compiled with -maes -mavx2 (SSE4.1 implied). */
    {&sa_kernel_aesni_avx2, "aesni-avx2", SA_CPU_AVX2 | SA_CPU_AVX | SA_CPU_AESNI | SA_CPU_SSE41},
    /* mask_aesni.c is compiled with -maes -msse4.1. */
    {&sa_kernel_aesni, "aesni-sse4.1", SA_CPU_AESNI | SA_CPU_SSE41},
#endif
    {NULL, NULL, 0}, /* keeps the array non-empty where no variant is compiled */
};

static int sa_runnable(size_t i, unsigned have)
{
    return (sa_variants[i].needs & have) == sa_variants[i].needs;
}

/* Whether a runnable build before index i has the same public name. */
static int sa_shadowed(size_t i, unsigned have)
{
    for (size_t j = 0; j < i; j++)
        if (sa_runnable(j, have) &&
            strcmp(sa_variants[j].kernel->name, sa_variants[i].kernel->name) == 0)
            return 1;
    return 0;
}

size_t sa_kernels_available(const sa_kernel **out, size_t max)
{
    const unsigned have = sa_cpu_features();
    size_t n = 0;
    for (size_t i = 0; sa_variants[i].kernel != NULL; i++) {
        if (!sa_runnable(i, have) || sa_shadowed(i, have))
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
    for (size_t i = 0; sa_variants[i].kernel != NULL; i++)
        if (strcmp(sa_variants[i].kernel->name, name) == 0 && sa_runnable(i, have))
            return sa_variants[i].kernel; /* the first runnable build is the best */
    return NULL;
}

size_t sa_kernel_builds(const sa_kernel **out, const char **build, size_t max)
{
    const unsigned have = sa_cpu_features();
    size_t n = 0;
    for (size_t i = 0; sa_variants[i].kernel != NULL && n < max; i++) {
        if (!sa_runnable(i, have))
            continue;
        out[n] = sa_variants[i].kernel;
        build[n] = sa_variants[i].build;
        n++;
    }
    return n;
}
