/* The shared index's read path, compiled: the probe, and the copy of blocks it located.
 *
 * The probe: what kvstore/shared_index.py does with ~25 numpy calls
 * (50-75 us for 128 keys), in one pass over the keys (a few us). Optional: without a compiler
 * the package falls back to the numpy probe, which gives the same answers.
 *
 * probe(keys, tag, buckets, header) -> None | (run, tiers, homes, seqs, drams)
 *   keys     bytes, 16 per key (two little-endian int64 words each)
 *   tag      the namespace tag (int64), XORed into each entry's second key word
 *   buckets  the index's buckets, read-only buffer of 128-byte buckets (a power of two of them)
 *   header   the index's 64-byte header, read-only buffer
 * The run is the leading keys found; for them: tiers (bytes), home buckets (int64 bytes),
 * bucket sequence numbers (uint32 bytes), DRAM slots in 4 KiB units (uint32 bytes). None when
 * the index cannot be sure: a bucket or the header being rewritten, a miss whose home bucket
 * overflowed, an incomplete index. The layout and the reasoning are in shared_index.py.
 *
 * Memory order: each bucket is read as a seqlock (acquire load of its sequence number, the
 * entries, an acquire fence, the sequence number again), so the compiler keeps the entry loads
 * between the two; x86 keeps loads in order in hardware.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BUCKET_WORDS 16
#define ENTRIES 4
#define EMPTY 255

static inline uint32_t load_seq(const int64_t *bucket) {
    return __atomic_load_n((const uint32_t *)bucket, __ATOMIC_ACQUIRE);
}

static PyObject *probe(PyObject *self, PyObject *args) {
    Py_buffer keys, buckets, header;
    long long tag;
    if (!PyArg_ParseTuple(args, "y*Ly*y*", &keys, &tag, &buckets, &header)) return NULL;
    PyObject *result = NULL;
    char *tiers = NULL;
    int64_t *homes = NULL;
    uint32_t *seqs = NULL, *drams = NULL;
    Py_ssize_t count = keys.len / 16;
    Py_ssize_t num_buckets = buckets.len / (BUCKET_WORDS * 8);
    if (keys.len % 16 || header.len < 64 || num_buckets < 1 || (num_buckets & (num_buckets - 1))) {
        PyErr_SetString(PyExc_ValueError, "probe: keys must be 16 bytes each, the header 64 bytes, "
                                          "and the buckets a power of two of 128 bytes");
        goto done;
    }
    const uint64_t *head = (const uint64_t *)header.buf;
    uint64_t header_seq = __atomic_load_n(&head[2], __ATOMIC_ACQUIRE);
    if ((header_seq & 1) || !(__atomic_load_n(&head[3], __ATOMIC_RELAXED) & 0xFF)) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    tiers = PyMem_Malloc(count + 1);
    homes = PyMem_Malloc(sizeof(int64_t) * (count + 1));
    seqs = PyMem_Malloc(sizeof(uint32_t) * (count + 1));
    drams = PyMem_Malloc(sizeof(uint32_t) * (count + 1));
    if (!tiers || !homes || !seqs || !drams) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t *wanted = (const int64_t *)keys.buf;
    const int64_t *words = (const int64_t *)buckets.buf;
    int64_t mask = (int64_t)num_buckets - 1;
    Py_ssize_t run = 0;
    int unsure = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t word0 = wanted[2 * i], word1 = wanted[2 * i + 1] ^ (int64_t)tag;
        int64_t home = word0 & mask;
        const int64_t *bucket = words + home * BUCKET_WORDS;
        uint32_t before = load_seq(bucket);
        const uint8_t *bytes = (const uint8_t *)bucket;
        int found = -1;
        for (int entry = 0; entry < ENTRIES; entry++) {
            if (bytes[4 + entry] != EMPTY && bucket[6 + 2 * entry] == word0 && bucket[7 + 2 * entry] == word1) {
                found = entry;
                break;
            }
        }
        uint8_t tier = found >= 0 ? bytes[4 + found] : EMPTY;
        uint32_t dram = found >= 0 ? ((const uint32_t *)(bucket + 14))[found] : 0;
        uint8_t overflow = bytes[8];
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint32_t after = __atomic_load_n((const uint32_t *)bucket, __ATOMIC_RELAXED);
        if ((before & 1) || before != after) {
            unsure = 1;  /* rewritten while read */
            break;
        }
        if (found < 0) {
            unsure = overflow != 0;  /* it may live in a later bucket */
            break;
        }
        tiers[run] = (char)tier;
        homes[run] = home;
        seqs[run] = before;
        drams[run] = dram;
        run++;
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (unsure || __atomic_load_n(&head[2], __ATOMIC_RELAXED) != header_seq) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    result = Py_BuildValue("(ny#y#y#y#)", run, tiers, run, (const char *)homes, run * (Py_ssize_t)sizeof(int64_t),
                           (const char *)seqs, run * (Py_ssize_t)sizeof(uint32_t), (const char *)drams,
                           run * (Py_ssize_t)sizeof(uint32_t));
done:
    PyMem_Free(tiers);
    PyMem_Free(homes);
    PyMem_Free(seqs);
    PyMem_Free(drams);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&buckets);
    PyBuffer_Release(&header);
    return result;
}

/* copy_blocks(source, offsets, size, dests) -> None
 *   source   the node's DRAM segment (a buffer)
 *   offsets  int64 byte offsets into it, one per block (a buffer)
 *   size     bytes per block
 *   dests    a sequence of writable, contiguous buffers of `size` bytes, at least one per offset
 * Copies block i from source[offsets[i]:][:size] into dests[i], with the GIL released for the
 * copies: what a Python loop of np.copyto does, without ~1 us of interpreter per block. Every
 * offset and destination is checked before anything is copied (ValueError names the first bad
 * one). */
static PyObject *copy_blocks(PyObject *self, PyObject *args) {
    Py_buffer source, offsets;
    Py_ssize_t size;
    PyObject *dests;
    if (!PyArg_ParseTuple(args, "y*y*nO", &source, &offsets, &size, &dests)) return NULL;
    PyObject *result = NULL, *sequence = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t count = offsets.len / (Py_ssize_t)sizeof(int64_t), held = 0;
    sequence = PySequence_Fast(dests, "copy_blocks: dests must be a sequence");
    if (!sequence) goto done;
    if (offsets.len % (Py_ssize_t)sizeof(int64_t) || size < 0 || PySequence_Fast_GET_SIZE(sequence) < count) {
        PyErr_SetString(PyExc_ValueError, "copy_blocks: offsets must be int64, with a destination for each");
        goto done;
    }
    views = PyMem_Calloc(count + 1, sizeof(Py_buffer));
    if (!views) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t *at = (const int64_t *)offsets.buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (at[i] < 0 || at[i] > source.len - size) {
            PyErr_Format(PyExc_ValueError, "copy_blocks: block %zd at offset %lld does not lie in the source", i,
                         (long long)at[i]);
            goto done;
        }
        PyObject *item = PySequence_Fast_GET_ITEM(sequence, i);
        if (PyObject_GetBuffer(item, &views[i], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
        held++;
        if (views[i].len != size) {
            PyErr_Format(PyExc_ValueError, "copy_blocks: destination %zd has %zd bytes, blocks have %zd", i,
                         views[i].len, size);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) memcpy(views[i].buf, (const char *)source.buf + at[i], (size_t)size);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_XDECREF(sequence);
    PyBuffer_Release(&source);
    PyBuffer_Release(&offsets);
    return result;
}

static PyMethodDef methods[] = {
    {"probe", probe, METH_VARARGS, "Probe the shared index for a chain of keys (see kvstore/_index_probe.c)."},
    {"copy_blocks", copy_blocks, METH_VARARGS, "Copy blocks out of the DRAM segment (see kvstore/_index_probe.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_index_probe", NULL, -1, methods};

PyMODINIT_FUNC PyInit__index_probe(void) { return PyModule_Create(&module); }
