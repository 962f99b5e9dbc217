/* prefix-lrfu's access, compiled: what PrefixLRFU.on_access and _learn do per row in Python
 * (~1 us a row), in one pass (kvstore/policy/prefix_lrfu.py explains the policy). Optional:
 * without a compiler the policy runs its Python loop, which gives the same numbers bit for bit.
 *
 * access(rows, mine, current, weight, last, histogram, time, term, step) -> int
 *   rows       int64 buffer: the accessed rows, leaf first (the caller reverses the chain)
 *   mine       uint32 buffer: the incarnation of each row when the policy last set its state
 *   current    uint32 buffer: the table's incarnation of each row
 *   weight     writable float64 buffer: each row's weight
 *   last       writable float32 buffer: each row's last access time (0: never)
 *   histogram  writable float64 buffer of 64 buckets: reuse intervals by log2
 *   time, term, step: the clock before the first row, that time's term, and the factor from
 *              one tick's term to the next
 * Returns -1, having changed nothing, when a row holds another block than the policy knows
 * (the caller adopts the rows, then calls again); otherwise the number of reuse intervals
 * counted into the histogram. Row i (from 0) is stamped time + i + 1 and adds term * step^(i+1).
 * A row out of any buffer's range raises IndexError before anything is written.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define BUCKETS 64

static int bucket_of(double interval) {
    /* Python: min(63, max(0, int(interval).bit_length() - 1)) */
    long long whole = (long long)interval;
    unsigned long long magnitude = whole < 0 ? 0ULL - (unsigned long long)whole : (unsigned long long)whole;
    int bits = magnitude ? 64 - __builtin_clzll(magnitude) : 0;
    int bucket = bits - 1;
    if (bucket < 0) bucket = 0;
    if (bucket > BUCKETS - 1) bucket = BUCKETS - 1;
    return bucket;
}

static PyObject *lrfu_access(PyObject *self, PyObject *args) {
    Py_buffer rows, mine, current, weight, last, histogram;
    double time, term, step;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*ddd", &rows, &mine, &current, &weight, &last, &histogram, &time,
                          &term, &step))
        return NULL;
    PyObject *result = NULL;
    if (rows.len % 8 || mine.len % 4 || current.len % 4 || weight.len % 8 || last.len % 4 ||
        histogram.len != BUCKETS * 8) {
        PyErr_SetString(PyExc_ValueError, "access: rows are int64, incarnations uint32, weights float64, "
                                          "times float32, and the histogram 64 float64 buckets");
        goto done;
    }
    const int64_t *row_of = rows.buf;
    const uint32_t *known = mine.buf, *now = current.buf;
    double *weights = weight.buf, *buckets = histogram.buf;
    float *stamps = last.buf;
    Py_ssize_t count = rows.len / 8;
    Py_ssize_t limit = weight.len / 8;
    if (last.len / 4 < limit) limit = last.len / 4;
    if (mine.len / 4 < limit) limit = mine.len / 4;
    if (current.len / 4 < limit) limit = current.len / 4;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (row_of[i] < 0 || row_of[i] >= limit) {
            PyErr_Format(PyExc_IndexError, "access: row %lld is outside the policy's %zd rows", (long long)row_of[i],
                         limit);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (known[row_of[i]] != now[row_of[i]]) {
            result = PyLong_FromLong(-1);
            goto done;
        }
    }
    long intervals = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t row = row_of[i];
        time += 1.0;
        term *= step;
        weights[row] = weights[row] + term;
        double seen = (double)stamps[row];
        if (seen != 0.0) {
            buckets[bucket_of(time - seen)] += 1.0;
            intervals++;
        }
        stamps[row] = (float)time;
    }
    result = PyLong_FromLong(intervals);
done:
    PyBuffer_Release(&rows);
    PyBuffer_Release(&mine);
    PyBuffer_Release(&current);
    PyBuffer_Release(&weight);
    PyBuffer_Release(&last);
    PyBuffer_Release(&histogram);
    return result;
}

static PyMethodDef methods[] = {
    {"access", lrfu_access, METH_VARARGS, "prefix-lrfu's per-row access work; see the file's comment."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lrfu_access", NULL, -1, methods};

PyMODINIT_FUNC PyInit__lrfu_access(void) { return PyModule_Create(&module); }
