/* prefix-lrfu's per-row work, compiled: what PrefixLRFU.on_access (with _learn), _adopt and on_evict do
 * per row in Python (~1 us a row), in one pass each (kvstore/policy/prefix_lrfu.py explains the
 * policy). Optional: without a compiler the policy runs its Python, which gives the same
 * numbers bit for bit (tests/unit/test_policy_native.py replays traces both ways).
 *
 * access(rows, mine, current, weight, last, histogram, time, term, step) -> int
 *   rows       int64 buffer: the accessed rows, leaf first (the caller reverses the chain)
 *   mine       uint32 buffer: the incarnation of each row when the policy last set its state
 *   current    uint32 buffer: the table's incarnation of each row
 *   weight     writable float32 buffer: each row's weight (a row's sum is taken in double, then stored)
 *   last       writable float32 buffer: each row's last access time (0: never)
 *   histogram  writable float64 buffer of 64 buckets: reuse intervals by log2
 *   time, term, step: the clock before the first row, that time's term, and the factor from
 *              one tick's term to the next
 * Returns -1, having changed nothing, when a row holds another block than the policy knows
 * (the caller adopts the rows, then calls again); otherwise the number of reuse intervals
 * counted into the histogram. Row i (from 0) is stamped time + i + 1 and adds term * step^(i+1).
 *
 * evict(rows, tier, tiers, mine, current, slot, keys, weight, last, history_tag, history_weight,
 *       history_last) -> int
 *   rows leaving `tier` (int64); `slot` the table's uint32 rows x `tiers` (absent: 0xFFFFFFFF);
 *   `keys` the table's list of 16-byte keys (None for a tombstone). A row the policy knows
 *   (mine == current) with no copy in another tier leaves its weight and last time in the
 *   history at its key's place (Fibonacci hashing of the key's two halves XORed, as
 *   PrefixLRFU._history_positions), and is forgotten (mine = 0). Returns how many left.
 *
 * adopt(rows, mine, current, keys, weight, last, history_tag, history_weight, history_last) -> int
 *   rows (int64) about to be accessed or queued; each one that holds another block than the
 *   policy knows (mine != current) is taken on: mine = current, and its weight and last time
 *   come from its key's history entry when the tag there is the key's (the entry is then
 *   emptied: tag 0), else start at 0. Returns how many rows were taken on.
 *
 * Every row is checked against every buffer before anything is written: IndexError otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

static Py_ssize_t rows_covered(const Py_buffer *weight, const Py_buffer *last, const Py_buffer *mine,
                               const Py_buffer *current) {
    /* How many rows every per-row buffer covers (weights, times and incarnations 4 bytes each), or
     * -1 with ValueError when the policy's own three differ in length (float64 weights, say). */
    if (weight->len != last->len || weight->len != mine->len) {
        PyErr_SetString(PyExc_ValueError, "the policy's weights (float32), times (float32) and incarnations "
                                          "(uint32) must cover the same rows");
        return -1;
    }
    Py_ssize_t limit = weight->len / 4;
    if (current->len / 4 < limit) limit = current->len / 4;
    return limit;
}

static void release_all(Py_buffer *const *buffers) {
    /* PyBuffer_Release on each of a NULL-terminated list. */
    for (; *buffers; buffers++) PyBuffer_Release(*buffers);
}

static PyObject *lrfu_access(PyObject *self, PyObject *args) {
    Py_buffer rows, mine, current, weight, last, histogram;
    double time, term, step;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*ddd", &rows, &mine, &current, &weight, &last, &histogram, &time,
                          &term, &step))
        return NULL;
    PyObject *result = NULL;
    if (rows.len % 8 || mine.len % 4 || current.len % 4 || weight.len % 4 || last.len % 4 ||
        histogram.len != BUCKETS * 8) {
        PyErr_SetString(PyExc_ValueError, "access: rows are int64, incarnations uint32, weights float32, "
                                          "times float32, and the histogram 64 float64 buckets");
        goto done;
    }
    const int64_t *row_of = rows.buf;
    const uint32_t *known = mine.buf, *now = current.buf;
    double *buckets = histogram.buf;
    float *weights = weight.buf, *stamps = last.buf;
    Py_ssize_t count = rows.len / 8, limit = rows_covered(&weight, &last, &mine, &current);
    if (limit < 0) goto done;
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
        weights[row] = (float)((double)weights[row] + term); /* as numpy stores a Python float's sum */
        double seen = (double)stamps[row];
        if (seen != 0.0) {
            buckets[bucket_of(time - seen)] += 1.0;
            intervals++;
        }
        stamps[row] = (float)time;
    }
    result = PyLong_FromLong(intervals);
done:
    release_all((Py_buffer *[]){&rows, &mine, &current, &weight, &last, &histogram, NULL});
    return result;
}

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define TAG_MULTIPLIER 0xC2B2AE3D27D4EB4FULL
#define ABSENT 0xFFFFFFFFu

static uint64_t history_place(PyObject *key, int bits, uint32_t *tag) {
    /* PrefixLRFU._history_positions for one key (None: 16 zero bytes): Fibonacci hashing of the
     * key's two little-endian halves XORed; the tag from another multiplier, never 0. */
    uint64_t halves[2] = {0, 0};
    if (key != Py_None) memcpy(halves, PyBytes_AS_STRING(key), 16); /* little-endian, as "<u8" */
    uint64_t folded = halves[0] ^ halves[1];
    *tag = (uint32_t)((folded * TAG_MULTIPLIER) >> 32) | 1u;
    return bits ? (folded * GOLDEN) >> (64 - bits) : 0;
}

static int history_valid(const Py_buffer *tag, const Py_buffer *weight, const Py_buffer *last) {
    /* A power of two of uint32 tags, with as many float32 weights and times. */
    Py_ssize_t size = tag->len / 4;
    return size >= 1 && !(size & (size - 1)) && weight->len / 4 == size && last->len / 4 == size;
}

static int history_bits(Py_ssize_t history) {
    int bits = 0;
    while (((Py_ssize_t)1 << bits) < history) bits++;
    return bits;
}

static int check_key(PyObject *keys, int64_t row, const char *who) {
    PyObject *key = PyList_GET_ITEM(keys, row);
    if (key != Py_None && (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) != 16)) {
        PyErr_Format(PyExc_ValueError, "%s: the key of row %lld is not 16 bytes", who, (long long)row);
        return -1;
    }
    return 0;
}

static PyObject *lrfu_evict(PyObject *self, PyObject *args) {
    Py_buffer rows, mine, current, slot, weight, last, tag, history_weight, history_last;
    int tier, tiers;
    PyObject *keys;
    if (!PyArg_ParseTuple(args, "y*iiw*y*y*O!y*y*w*w*w*", &rows, &tier, &tiers, &mine, &current, &slot, &PyList_Type,
                          &keys, &weight, &last, &tag, &history_weight, &history_last))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = rows.len / 8, history = tag.len / 4;
    Py_ssize_t limit = rows_covered(&weight, &last, &mine, &current), key_count = PyList_GET_SIZE(keys);
    if (limit < 0) goto done;
    if (key_count < limit) limit = key_count;
    if (rows.len % 8 || tiers < 1 || tier < 0 || tier >= tiers ||
        !history_valid(&tag, &history_weight, &history_last)) {
        PyErr_SetString(PyExc_ValueError, "evict: rows are int64, the tier one of the slot table's tiers, and the "
                                          "history a power of two of uint32 tags with as many float32 weights and "
                                          "times");
        goto done;
    }
    const int64_t *row_of = rows.buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t row = row_of[i];
        if (row < 0 || row >= limit || (row + 1) * tiers * 4 > slot.len) {
            PyErr_Format(PyExc_IndexError, "evict: row %lld is outside the policy's %zd rows", (long long)row, limit);
            goto done;
        }
        if (check_key(keys, row, "evict") < 0) goto done;
    }
    uint32_t *known = mine.buf, *tags = tag.buf;
    const uint32_t *now = current.buf, *slots = slot.buf;
    const float *weights = weight.buf, *stamps = last.buf;
    float *kept_weight = history_weight.buf, *kept_last = history_last.buf;
    int bits = history_bits(history);
    long left = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t row = row_of[i];
        if (known[row] != now[row]) continue;
        int elsewhere = 0;
        for (int other = 0; other < tiers; other++)
            if (other != tier && slots[row * tiers + other] != ABSENT) elsewhere = 1;
        if (elsewhere) continue;
        uint32_t key_tag;
        uint64_t position = history_place(PyList_GET_ITEM(keys, row), bits, &key_tag);
        tags[position] = key_tag;
        kept_weight[position] = weights[row];
        kept_last[position] = stamps[row];
        known[row] = 0;
        left++;
    }
    result = PyLong_FromLong(left);
done:
    release_all(
        (Py_buffer *[]){&rows, &mine, &current, &slot, &weight, &last, &tag, &history_weight, &history_last, NULL});
    return result;
}

static PyObject *lrfu_adopt(PyObject *self, PyObject *args) {
    Py_buffer rows, mine, current, weight, last, tag, history_weight, history_last;
    PyObject *keys;
    if (!PyArg_ParseTuple(args, "y*w*y*O!w*w*w*w*w*", &rows, &mine, &current, &PyList_Type, &keys, &weight, &last,
                          &tag, &history_weight, &history_last))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = rows.len / 8, history = tag.len / 4;
    Py_ssize_t limit = rows_covered(&weight, &last, &mine, &current), key_count = PyList_GET_SIZE(keys);
    if (limit < 0) goto done;
    if (key_count < limit) limit = key_count;
    if (rows.len % 8 || !history_valid(&tag, &history_weight, &history_last)) {
        PyErr_SetString(PyExc_ValueError, "adopt: rows are int64, and the history a power of two of uint32 tags "
                                          "with as many float32 weights and times");
        goto done;
    }
    const int64_t *row_of = rows.buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t row = row_of[i];
        if (row < 0 || row >= limit) {
            PyErr_Format(PyExc_IndexError, "adopt: row %lld is outside the policy's %zd rows", (long long)row, limit);
            goto done;
        }
        if (check_key(keys, row, "adopt") < 0) goto done;
    }
    uint32_t *known = mine.buf, *tags = tag.buf;
    const uint32_t *now = current.buf;
    float *weights = weight.buf, *stamps = last.buf;
    const float *kept_weight = history_weight.buf, *kept_last = history_last.buf;
    int bits = history_bits(history);
    long adopted = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t row = row_of[i];
        if (known[row] == now[row]) continue;
        known[row] = now[row];
        uint32_t key_tag;
        uint64_t position = history_place(PyList_GET_ITEM(keys, row), bits, &key_tag);
        if (tags[position] == key_tag) {
            weights[row] = kept_weight[position];
            stamps[row] = kept_last[position];
            tags[position] = 0;
        } else {
            weights[row] = 0.0f;
            stamps[row] = 0.0f;
        }
        adopted++;
    }
    result = PyLong_FromLong(adopted);
done:
    release_all((Py_buffer *[]){&rows, &mine, &current, &weight, &last, &tag, &history_weight, &history_last, NULL});
    return result;
}

static PyMethodDef methods[] = {
    {"adopt", lrfu_adopt, METH_VARARGS, "prefix-lrfu's taking on of rows; see the file's comment."},
    {"evict", lrfu_evict, METH_VARARGS, "prefix-lrfu's per-row eviction work; see the file's comment."},
    {"access", lrfu_access, METH_VARARGS, "prefix-lrfu's per-row access work; see the file's comment."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lrfu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__lrfu(void) { return PyModule_Create(&module); }
