/* SPDX-License-Identifier: Apache-2.0 */
/* module.c: mpc_runtime.masking._native, the only file that includes Python.h.
 *
 * It parses arguments, takes buffers through the buffer protocol (no numpy
 * headers, so no numpy ABI coupling), re-checks them cheaply, releases the GIL
 * around large kernel calls, and calls the C kernel (STYLE §3). The variant in use
 * is chosen once in Py_mod_exec and kept in module state. It raises only
 * TypeError, ValueError, BufferError and MemoryError (STYLE §5); the Python facade
 * validates first and translates to the project's errors.
 *
 * Callers must not mutate the buffers while a call runs: with the GIL released,
 * another thread could (cryptography's CffiBuf admits the same hole).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "secagg_kernel.h"

/* Below this many bytes of work, releasing the GIL costs more than the call
 * (STYLE §3; crc32c uses 32 KiB). Work counts every pass over the data: one per key
 * for masking, one per vector for sums. */
#define SA_GIL_THRESHOLD (16 * 1024)
#define SA_MAX_VARIANTS 8

typedef struct {
    const sa_kernel *kernel; /* NULL when this CPU runs no variant */
} sa_state;

static const char *const sa_known_variants[] = {"vaes", "aesni", "armv8"};

static sa_state *sa_get_state(PyObject *module)
{
    return (sa_state *)PyModule_GetState(module);
}

/* select() may run while another thread is inside a call (no GIL on free-threaded
 * builds, Py_mod_gil below): the pointer is loaded and stored atomically, and the
 * variants it points to are immutable statics. */
static const sa_kernel *sa_load_kernel(PyObject *module)
{
    return __atomic_load_n(&sa_get_state(module)->kernel, __ATOMIC_ACQUIRE);
}

static void sa_store_kernel(PyObject *module, const sa_kernel *k)
{
    __atomic_store_n(&sa_get_state(module)->kernel, k, __ATOMIC_RELEASE);
}

static const sa_kernel *sa_require_kernel(PyObject *module)
{
    const sa_kernel *k = sa_load_kernel(module);
    if (k == NULL)
        PyErr_SetString(PyExc_ValueError,
                        "no kernel variant is selected: this CPU runs none of them");
    return k;
}

/* Whether bytes * passes >= SA_GIL_THRESHOLD, without overflow. */
static int sa_worth_releasing(size_t bytes, size_t passes)
{
    return passes > 0 && bytes >= (SA_GIL_THRESHOLD + passes - 1) / passes;
}

/* ---- argument helpers ---------------------------------------------------------- */

/* A non-negative integer that fits in uint64; OverflowError becomes ValueError. */
static int sa_parse_u64(PyObject *obj, const char *name, uint64_t *out)
{
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "expected %s to be an int, got %.100s", name,
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    const unsigned long long v = PyLong_AsUnsignedLongLong(idx);
    Py_DECREF(idx);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "expected %s in [0, 2**64), got an out-of-range int",
                     name);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* 1 <= bits <= maxbits (DESIGN §4: min(ring_bits, 48)). */
static int sa_parse_bits(PyObject *obj, int maxbits, int ring, long long *out)
{
    PyObject *idx = PyNumber_Index(obj);
    if (idx == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "expected bits to be an int, got %.100s",
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
    if (overflow != 0 || v < 1 || v > maxbits) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "expected bits in [1, %d] for ring %d, got %R",
                         maxbits, ring, idx);
        Py_DECREF(idx);
        return -1;
    }
    Py_DECREF(idx);
    *out = v;
    return 0;
}

/* Strips the byte-order prefix of a struct format; NULL if it is not little-endian
 * or native (x86 and arm64 are little-endian). */
static const char *sa_format_body(const Py_buffer *b)
{
    const char *f = b->format != NULL ? b->format : "B";
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    else if (*f == '>' || *f == '!')
        return NULL;
    return f;
}

static const char *sa_format_text(const Py_buffer *b)
{
    return b->format != NULL ? b->format : "B";
}

/* Gets a C-contiguous buffer of 4- or 8-byte unsigned words (numpy's 'I', 'L',
 * 'Q'). On failure no buffer is held. */
static int sa_get_words(PyObject *obj, Py_buffer *view, int writable, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    const char *f = sa_format_body(view);
    if (f == NULL || !(f[0] == 'I' || f[0] == 'L' || f[0] == 'Q') || f[1] != '\0' ||
        !(view->itemsize == 4 || view->itemsize == 8)) {
        PyErr_Format(PyExc_TypeError,
                     "expected %s to be a little-endian uint32 or uint64 buffer, "
                     "got format '%.20s' with itemsize %zd",
                     name, sa_format_text(view), view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Gets a C-contiguous float32 or float64 buffer. */
static int sa_get_floats(PyObject *obj, Py_buffer *view, const char *name, sa_dtype *dt)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = sa_format_body(view);
    if (f != NULL && f[0] == 'f' && f[1] == '\0' && view->itemsize == 4) {
        *dt = SA_F32;
        return 0;
    }
    if (f != NULL && f[0] == 'd' && f[1] == '\0' && view->itemsize == 8) {
        *dt = SA_F64;
        return 0;
    }
    PyErr_Format(PyExc_TypeError,
                 "expected %s to be a little-endian float32 or float64 buffer, "
                 "got format '%.20s' with itemsize %zd",
                 name, sa_format_text(view), view->itemsize);
    PyBuffer_Release(view);
    return -1;
}

static int sa_overlap(const Py_buffer *a, const Py_buffer *b)
{
    if (a->len <= 0 || b->len <= 0)
        return 0;
    const uintptr_t a0 = (uintptr_t)a->buf, b0 = (uintptr_t)b->buf;
    return a0 < b0 + (uintptr_t)b->len && b0 < a0 + (uintptr_t)a->len;
}

/* keys: 16 * k bytes; signs: k bytes, each 0x01 (+1) or 0xFF (-1). */
static int sa_check_keys(const Py_buffer *keys, const Py_buffer *signs, size_t *k)
{
    if (keys->len % SA_KEY_SIZE != 0) {
        PyErr_Format(PyExc_ValueError, "expected keys of a multiple of %d bytes, got %zd",
                     SA_KEY_SIZE, keys->len);
        return -1;
    }
    const size_t nk = (size_t)keys->len / SA_KEY_SIZE;
    if ((size_t)signs->len != nk) {
        PyErr_Format(PyExc_ValueError, "expected %zu signs (one per key), got %zd", nk,
                     signs->len);
        return -1;
    }
    const uint8_t *s = (const uint8_t *)signs->buf;
    for (size_t j = 0; j < nk; j++) {
        if (s[j] != 0x01 && s[j] != 0xFF) {
            PyErr_Format(PyExc_ValueError,
                         "expected each sign byte to be 0x01 or 0xff, got 0x%02x at %zu",
                         (unsigned)s[j], j);
            return -1;
        }
    }
    *k = nk;
    return 0;
}

/* ---- module functions ---------------------------------------------------------------- */

static PyObject *sa_available(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    const sa_kernel *ks[SA_MAX_VARIANTS];
    const size_t n = sa_kernels_available(ks, SA_MAX_VARIANTS);
    PyObject *t = PyTuple_New((Py_ssize_t)n);
    if (t == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *s = PyUnicode_FromString(ks[i]->name);
        if (s == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)i, s);
    }
    return t;
}

static PyObject *sa_select(PyObject *module, PyObject *arg)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "expected name to be a str, got %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(arg);
    if (name == NULL)
        return NULL;
    const sa_kernel *k = sa_kernel_find(name);
    if (k == NULL) {
        int known = 0;
        for (size_t i = 0; i < sizeof sa_known_variants / sizeof sa_known_variants[0]; i++)
            known |= strcmp(name, sa_known_variants[i]) == 0;
        if (known)
            PyErr_Format(PyExc_ValueError, "kernel variant '%s' cannot run on this CPU", name);
        else
            PyErr_Format(PyExc_ValueError,
                         "expected a kernel variant (vaes, aesni or armv8), got %R", arg);
        return NULL;
    }
    sa_store_kernel(module, k);
    Py_RETURN_NONE;
}

static PyObject *sa_selected(PyObject *module, PyObject *unused)
{
    (void)unused;
    const sa_kernel *k = sa_load_kernel(module);
    if (k == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromString(k->name);
}

static PyObject *sa_protect_into(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"out", "x", "c", "bits", "keys", "signs", NULL};
    PyObject *out_obj, *x_obj, *bits_obj;
    double c;
    Py_buffer keys = {0}, signs = {0}, out = {0}, x = {0};
    PyObject *result = NULL;
    long long bits;
    size_t k;
    sa_dtype dt;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOdOy*y*:protect_into", kwlist, &out_obj,
                                     &x_obj, &c, &bits_obj, &keys, &signs))
        return NULL;
    const sa_kernel *kern = sa_require_kernel(module);
    if (kern == NULL)
        goto done;
    /* DESIGN §4 needs c finite and > 0; 2c must be finite too, or s = 0 and the
     * quantizer is undefined (inf * 0). */
    if (!(isfinite(c) && c > 0.0 && isfinite(2.0 * c))) {
        PyObject *cf = PyFloat_FromDouble(c);
        if (cf != NULL) {
            PyErr_Format(PyExc_ValueError,
                         "expected c finite and > 0 (with 2c finite), got %R", cf);
            Py_DECREF(cf);
        }
        goto done;
    }
    if (sa_check_keys(&keys, &signs, &k) < 0)
        goto done;
    if (sa_get_words(out_obj, &out, 1, "out") < 0)
        goto done;
    if (sa_get_floats(x_obj, &x, "x", &dt) < 0)
        goto done;
    const Py_ssize_t n = out.len / out.itemsize;
    if (x.len / x.itemsize != n) {
        PyErr_Format(PyExc_ValueError, "expected x of length %zd (as out), got %zd", n,
                     x.len / x.itemsize);
        goto done;
    }
    const int ring = 8 * (int)out.itemsize;
    if (sa_parse_bits(bits_obj, ring < SA_MAX_BITS ? ring : SA_MAX_BITS, ring, &bits) < 0)
        goto done;
    if (sa_overlap(&out, &x)) {
        PyErr_SetString(PyExc_ValueError, "expected out and x not to overlap");
        goto done;
    }

    sa_clipstats st = {0, 0.0, 0, 0};
    const uint8_t(*kp)[SA_KEY_SIZE] = (const uint8_t(*)[SA_KEY_SIZE])keys.buf;
    const int8_t *sp = (const int8_t *)signs.buf;
    if (sa_worth_releasing((size_t)out.len, k + 1)) { /* quantize + k keys */
        Py_BEGIN_ALLOW_THREADS
        if (out.itemsize == 4)
            kern->protect_u32((uint32_t *)out.buf, x.buf, dt, (size_t)n, c, (int)bits, kp, sp,
                              k, &st);
        else
            kern->protect_u64((uint64_t *)out.buf, x.buf, dt, (size_t)n, c, (int)bits, kp, sp,
                              k, &st);
        Py_END_ALLOW_THREADS
    } else if (out.itemsize == 4) {
        kern->protect_u32((uint32_t *)out.buf, x.buf, dt, (size_t)n, c, (int)bits, kp, sp, k,
                          &st);
    } else {
        kern->protect_u64((uint64_t *)out.buf, x.buf, dt, (size_t)n, c, (int)bits, kp, sp, k,
                          &st);
    }
    result = Py_BuildValue("(KdKK)", (unsigned long long)st.clipped, st.max_abs,
                           (unsigned long long)st.nonfinite,
                           (unsigned long long)(st.nonfinite ? st.first_nonfinite : 0));
done:
    if (x.obj != NULL)
        PyBuffer_Release(&x);
    if (out.obj != NULL)
        PyBuffer_Release(&out);
    PyBuffer_Release(&signs);
    PyBuffer_Release(&keys);
    return result;
}

static PyObject *sa_mask_into(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"w", "offset", "keys", "signs", NULL};
    PyObject *w_obj, *off_obj;
    Py_buffer keys = {0}, signs = {0}, w = {0};
    PyObject *result = NULL;
    uint64_t offset;
    size_t k;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOy*y*:mask_into", kwlist, &w_obj, &off_obj,
                                     &keys, &signs))
        return NULL;
    const sa_kernel *kern = sa_require_kernel(module);
    if (kern == NULL)
        goto done;
    if (sa_parse_u64(off_obj, "offset", &offset) < 0)
        goto done;
    if (sa_check_keys(&keys, &signs, &k) < 0)
        goto done;
    if (sa_get_words(w_obj, &w, 1, "w") < 0)
        goto done;
    const size_t n = (size_t)(w.len / w.itemsize);
    if (n > 0 && (uint64_t)(n - 1) > UINT64_MAX - offset) {
        PyErr_SetString(PyExc_ValueError, "expected offset + len(w) <= 2**64");
        goto done;
    }
    const uint8_t(*kp)[SA_KEY_SIZE] = (const uint8_t(*)[SA_KEY_SIZE])keys.buf;
    const int8_t *sp = (const int8_t *)signs.buf;
    if (sa_worth_releasing((size_t)w.len, k)) {
        Py_BEGIN_ALLOW_THREADS
        if (w.itemsize == 4)
            kern->mask_u32((uint32_t *)w.buf, n, offset, kp, sp, k);
        else
            kern->mask_u64((uint64_t *)w.buf, n, offset, kp, sp, k);
        Py_END_ALLOW_THREADS
    } else if (w.itemsize == 4) {
        kern->mask_u32((uint32_t *)w.buf, n, offset, kp, sp, k);
    } else {
        kern->mask_u64((uint64_t *)w.buf, n, offset, kp, sp, k);
    }
    result = Py_NewRef(Py_None);
done:
    if (w.obj != NULL)
        PyBuffer_Release(&w);
    PyBuffer_Release(&signs);
    PyBuffer_Release(&keys);
    return result;
}

static PyObject *sa_sum_into(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"acc", "vectors", NULL};
    PyObject *acc_obj, *vec_obj, *seq = NULL, *result = NULL;
    Py_buffer acc = {0};
    Py_buffer *views = NULL;
    const void **ptrs = NULL;
    Py_ssize_t nv = 0, held = 0;
    (void)module;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:sum_into", kwlist, &acc_obj, &vec_obj))
        return NULL;
    if (!PyList_Check(vec_obj) && !PyTuple_Check(vec_obj)) {
        PyErr_Format(PyExc_TypeError, "expected vectors to be a list or tuple, got %.100s",
                     Py_TYPE(vec_obj)->tp_name);
        return NULL;
    }
    /* A tuple snapshot: the list cannot change under us even if a buffer getter
     * runs Python code. */
    seq = PySequence_Tuple(vec_obj);
    if (seq == NULL)
        return NULL;
    nv = PyTuple_GET_SIZE(seq);
    if (sa_get_words(acc_obj, &acc, 1, "acc") < 0)
        goto done;
    if (nv > 0) {
        views = PyMem_Calloc((size_t)nv, sizeof *views);
        ptrs = PyMem_Calloc((size_t)nv, sizeof *ptrs);
        if (views == NULL || ptrs == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    for (Py_ssize_t j = 0; j < nv; j++) {
        if (sa_get_words(PyTuple_GET_ITEM(seq, j), &views[j], 0, "each vector") < 0)
            goto done;
        held = j + 1;
        if (views[j].itemsize != acc.itemsize || views[j].len != acc.len) {
            PyErr_Format(PyExc_ValueError,
                         "expected vector %zd to have acc's itemsize %zd and length %zd, "
                         "got itemsize %zd and length %zd",
                         j, acc.itemsize, acc.len / acc.itemsize, views[j].itemsize,
                         views[j].len / views[j].itemsize);
            goto done;
        }
        if (sa_overlap(&acc, &views[j])) {
            PyErr_Format(PyExc_ValueError, "expected vector %zd not to overlap acc", j);
            goto done;
        }
        ptrs[j] = views[j].buf;
    }
    const size_t n = (size_t)(acc.len / acc.itemsize);
    if (nv > 0) {
        if (sa_worth_releasing((size_t)acc.len, (size_t)nv + 1)) {
            Py_BEGIN_ALLOW_THREADS
            if (acc.itemsize == 4)
                sa_sum_u32((uint32_t *)acc.buf, (const uint32_t *const *)ptrs, (size_t)nv, n);
            else
                sa_sum_u64((uint64_t *)acc.buf, (const uint64_t *const *)ptrs, (size_t)nv, n);
            Py_END_ALLOW_THREADS
        } else if (acc.itemsize == 4) {
            sa_sum_u32((uint32_t *)acc.buf, (const uint32_t *const *)ptrs, (size_t)nv, n);
        } else {
            sa_sum_u64((uint64_t *)acc.buf, (const uint64_t *const *)ptrs, (size_t)nv, n);
        }
    }
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t j = 0; j < held; j++)
        PyBuffer_Release(&views[j]);
    PyMem_Free(views);
    PyMem_Free(ptrs);
    if (acc.obj != NULL)
        PyBuffer_Release(&acc);
    Py_XDECREF(seq);
    return result;
}

static PyObject *sa_dequantize_into(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"out", "s", "two_c", "top", "nc", "bound", NULL};
    PyObject *out_obj, *s_obj, *bound_obj, *result = NULL;
    Py_buffer out = {0}, s = {0};
    double two_c, top, nc;
    uint64_t bound;
    size_t over;
    (void)module;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOdddO:dequantize_into", kwlist, &out_obj,
                                     &s_obj, &two_c, &top, &nc, &bound_obj))
        return NULL;
    if (sa_parse_u64(bound_obj, "bound", &bound) < 0)
        return NULL;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0)
        return NULL;
    const char *f = sa_format_body(&out);
    if (f == NULL || f[0] != 'd' || f[1] != '\0' || out.itemsize != 8) {
        PyErr_Format(PyExc_TypeError, "expected out to be a little-endian float64 buffer, "
                     "got format '%.20s'", sa_format_text(&out));
        goto done;
    }
    if (sa_get_words(s_obj, &s, 0, "s") < 0)
        goto done;
    if (out.len / 8 != s.len / s.itemsize) {
        PyErr_Format(PyExc_ValueError, "expected out of length %zd, got %zd",
                     s.len / s.itemsize, out.len / 8);
        goto done;
    }
    if (!(isfinite(two_c) && isfinite(top) && isfinite(nc) && top > 0)) {
        PyErr_SetString(PyExc_ValueError, "expected finite two_c and nc and a finite top > 0");
        goto done;
    }
    const size_t n = (size_t)(out.len / 8);
    if (sa_worth_releasing((size_t)out.len, 1)) {
        Py_BEGIN_ALLOW_THREADS
        over = s.itemsize == 4
                   ? sa_dequantize_u32((double *)out.buf, (const uint32_t *)s.buf, n, two_c, top, nc, bound)
                   : sa_dequantize_u64((double *)out.buf, (const uint64_t *)s.buf, n, two_c, top, nc, bound);
        Py_END_ALLOW_THREADS
    } else {
        over = s.itemsize == 4
                   ? sa_dequantize_u32((double *)out.buf, (const uint32_t *)s.buf, n, two_c, top, nc, bound)
                   : sa_dequantize_u64((double *)out.buf, (const uint64_t *)s.buf, n, two_c, top, nc, bound);
    }
    result = PyLong_FromSize_t(over);
done:
    if (s.obj != NULL)
        PyBuffer_Release(&s);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *sa_keystream(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "iv", "nbytes", NULL};
    Py_buffer key = {0}, iv = {0};
    PyObject *nbytes_obj, *result = NULL;
    uint64_t nbytes;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*O:keystream", kwlist, &key, &iv,
                                     &nbytes_obj))
        return NULL;
    const sa_kernel *kern = sa_require_kernel(module);
    if (kern == NULL)
        goto done;
    if (key.len != SA_KEY_SIZE || iv.len != SA_BLOCK_SIZE) {
        PyErr_Format(PyExc_ValueError, "expected a %d-byte key and a %d-byte iv, got %zd and %zd",
                     SA_KEY_SIZE, SA_BLOCK_SIZE, key.len, iv.len);
        goto done;
    }
    if (sa_parse_u64(nbytes_obj, "nbytes", &nbytes) < 0)
        goto done;
    if (nbytes > (uint64_t)PY_SSIZE_T_MAX) {
        PyErr_SetString(PyExc_ValueError, "expected nbytes <= sys.maxsize");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)nbytes);
    if (result == NULL)
        goto done;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(result);
    if (sa_worth_releasing((size_t)nbytes, 1)) {
        Py_BEGIN_ALLOW_THREADS
        kern->keystream(dst, (size_t)nbytes, (const uint8_t *)key.buf, (const uint8_t *)iv.buf);
        Py_END_ALLOW_THREADS
    } else {
        kern->keystream(dst, (size_t)nbytes, (const uint8_t *)key.buf, (const uint8_t *)iv.buf);
    }
done:
    PyBuffer_Release(&iv);
    PyBuffer_Release(&key);
    return result;
}

static PyMethodDef sa_methods[] = {
    {"available", sa_available, METH_NOARGS,
     "available($module, /)\n--\n\nKernel variants this CPU runs, best first: tuple[str, ...]."},
    {"select", sa_select, METH_O,
     "select($module, name, /)\n--\n\nUse that variant; ValueError if unknown or not "
     "runnable here."},
    {"selected", sa_selected, METH_NOARGS,
     "selected($module, /)\n--\n\nThe variant in use, or None if this CPU runs none."},
    {"protect_into", (PyCFunction)(void (*)(void))sa_protect_into, METH_VARARGS | METH_KEYWORDS,
     "protect_into($module, out, x, c, bits, keys, signs)\n--\n\n"
     "Quantize x into out (DESIGN §4) and add or subtract one AES-128-CTR keystream\n"
     "per 16-byte key (signs: 0x01 add, 0xff subtract). Returns (clipped, max_abs,\n"
     "nonfinite, first_nonfinite)."},
    {"mask_into", (PyCFunction)(void (*)(void))sa_mask_into, METH_VARARGS | METH_KEYWORDS,
     "mask_into($module, w, offset, keys, signs)\n--\n\n"
     "In place: w[i] += sum_j sign_j * keystream_j word (offset + i)."},
    {"sum_into", (PyCFunction)(void (*)(void))sa_sum_into, METH_VARARGS | METH_KEYWORDS,
     "sum_into($module, acc, vectors)\n--\n\n"
     "In place: acc += sum of vectors (a list or tuple), mod 2^32 or 2^64."},
    {"dequantize_into", (PyCFunction)(void (*)(void))sa_dequantize_into,
     METH_VARARGS | METH_KEYWORDS,
     "dequantize_into($module, out, s, two_c, top, nc, bound)\n--\n\n"
     "out[i] = ((s[i] * two_c) / top) - nc in float64 (DESIGN §4); returns how many\n"
     "words of s exceed bound."},
    {"keystream", (PyCFunction)(void (*)(void))sa_keystream, METH_VARARGS | METH_KEYWORDS,
     "keystream($module, key, iv, nbytes)\n--\n\n"
     "Test hook: raw AES-128-CTR keystream (bytes) from the initial counter block iv."},
    {NULL, NULL, 0, NULL},
};

static int sa_exec(PyObject *module)
{
    /* STYLE §3: pick once, best first, and keep the choice in module state. */
    const sa_kernel *best[1];
    sa_store_kernel(module, sa_kernels_available(best, 1) > 0 ? best[0] : NULL);
    return 0;
}

static PyModuleDef_Slot sa_slots[] = {
    {Py_mod_exec, (void *)sa_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef sa_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mpc_runtime.masking._native",
    .m_doc = "The compiled masking kernel (AES-128-CTR masks, DESIGN §3-§4). Hazmat: "
             "use mpc_runtime.masking.",
    .m_size = sizeof(sa_state),
    .m_methods = sa_methods,
    .m_slots = sa_slots,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModuleDef_Init(&sa_module);
}
