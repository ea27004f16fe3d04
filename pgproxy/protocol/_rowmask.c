/* _rowmask: masks a run of DataRow messages in one call (the compiled twin of rowmask.py).
 *
 * rewrite_rows(out, chunk, frames, first, room, actions) -> (next, rows, cells)
 *
 * Walks frames[first:] while they are DataRows ('D') and fewer than `room` rows were done; for
 * each row, the cells named by `actions` (sorted by column ordinal) are replaced and every other
 * byte is copied. The new rows are appended to the bytearray `out`. Actions, as compiled by
 * rowmask.compile_actions: (ordinal, kind, constant, call, fmt, clamp):
 *
 *   NULL       the cell becomes NULL
 *   CONST      a non-NULL cell becomes `constant`, or NULL when it already equals it
 *   CALL       call(value or None, fmt): bytes -> that value; None, an exception, anything else
 *              or a value over 1 GB -> NULL (fail closed)
 *   DATE_TEXT  'YYYY-MM-DD' -> 'YYYY-01-01' (years before clamp shown as clamp); any other
 *              value is handed to `call`, which defines the result
 *   DATE_BIN   int32 days since 2000-01-01 -> the day of January 1st of that year (same clamp);
 *              +-infinity pass; anything else is handed to `call`
 *
 * Every length word is checked against the row's end before it is used: a malformed row raises
 * pgproxy.protocol.errors.PeerProtocolError with the same message as the Python twin, and rows
 * finished before it are already in `out`. This file must stay byte-for-byte equivalent to
 * rowmask._rewrite_rows_py; tests/protocol/test_rowmask.py checks that with hypothesis.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { ACT_NULL = 0, ACT_CONST = 1, ACT_CALL = 2, ACT_DATE_TEXT = 3, ACT_DATE_BIN = 4 };

#define MAX_CELL 0x3fffffff /* 1 GB - 1: Postgres' largest field */
#define PG_EPOCH_ORDINAL 730120 /* date(2000, 1, 1).toordinal() */
#define MAX_ORDINAL 3652059 /* date(9999, 12, 31).toordinal() */

static const char SHORT[] = "DataRow is shorter than its fields";
static const char INVALID[] = "DataRow has an invalid value length";
static const char TOO_LONG[] = "DataRow is too long after masking";

static PyObject *peer_error; /* PeerProtocolError */

typedef struct {
    Py_ssize_t ordinal;
    int kind;
    const char *cbuf;
    Py_ssize_t clen;
    PyObject *call; /* borrowed from the actions tuple */
    PyObject *fmt;
    long clamp; /* -1: none */
} action_t;

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} sbuf;

static int sb_reserve(sbuf *b, Py_ssize_t extra)
{
    if (extra > PY_SSIZE_T_MAX / 2 - b->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t need = b->len + extra;
    if (need <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < need)
        cap *= 2;
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline void put32(char *p, uint32_t v)
{
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static inline int32_t get32(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) |
                     (uint32_t)p[3]);
}

/* The length word of the cell at buf[pos]: NULL when it fits before `end`, else the error. */
static inline const char *cell_length(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end,
                                      int32_t *len)
{
    if (end - pos < 4)
        return SHORT;
    *len = get32(buf + pos);
    if (*len < -1 || (*len > 0 && *len > end - pos - 4))
        return INVALID;
    return NULL;
}

static int sb_put(sbuf *b, const void *src, Py_ssize_t n)
{
    if (sb_reserve(b, n) < 0)
        return -1;
    if (n > 0)
        memcpy(b->p + b->len, src, (size_t)n);
    b->len += n;
    return 0;
}

/* a cell: its length word and bytes, or the NULL length word */
static int sb_cell(sbuf *b, const void *src, Py_ssize_t n)
{
    if (sb_reserve(b, 4 + (n > 0 ? n : 0)) < 0)
        return -1;
    if (src == NULL) {
        put32(b->p + b->len, 0xffffffffu);
        b->len += 4;
        return 0;
    }
    put32(b->p + b->len, (uint32_t)n);
    b->len += 4;
    return sb_put(b, src, n);
}

static int call_cell(sbuf *b, const action_t *a, const unsigned char *v, Py_ssize_t n)
{
    PyObject *value;
    if (v == NULL) {
        value = Py_None;
        Py_INCREF(value);
    }
    else {
        value = PyBytes_FromStringAndSize((const char *)v, n);
        if (value == NULL)
            return -1;
    }
    PyObject *args[2] = {value, a->fmt};
    PyObject *res = PyObject_Vectorcall(a->call, args, 2, NULL);
    Py_DECREF(value);
    if (res == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyErr_Clear(); /* fail closed: the cell becomes NULL */
        return sb_cell(b, NULL, 0);
    }
    int rc;
    if (PyBytes_Check(res) && PyBytes_GET_SIZE(res) <= MAX_CELL)
        rc = sb_cell(b, PyBytes_AS_STRING(res), PyBytes_GET_SIZE(res));
    else
        rc = sb_cell(b, NULL, 0);
    Py_DECREF(res);
    return rc;
}

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* 1 when v is 'YYYY-MM-DD' with a month/day that exists in a leap year (pgbinary._MONTH_DAYS) */
static int iso_date(const unsigned char *v, Py_ssize_t n, long *year)
{
    static const int mdays[13] = {0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (n != 10 || v[4] != '-' || v[7] != '-')
        return 0;
    for (int i = 0; i < 10; i++) {
        if (i != 4 && i != 7 && !is_digit(v[i]))
            return 0;
    }
    int month = (v[5] - '0') * 10 + (v[6] - '0');
    int day = (v[8] - '0') * 10 + (v[9] - '0');
    if (month < 1 || month > 12 || day < 1 || day > mdays[month])
        return 0;
    *year = (v[0] - '0') * 1000L + (v[1] - '0') * 100L + (v[2] - '0') * 10L + (v[3] - '0');
    return 1;
}

static long year_of_ordinal(long ordinal)
{
    /* CPython's _ord2ymd, year only */
    long n = ordinal - 1;
    long n400 = n / 146097;
    n %= 146097;
    long n100 = n / 36524;
    n %= 36524;
    long n4 = n / 1461;
    n %= 1461;
    long n1 = n / 365;
    long year = n400 * 400 + 1 + n100 * 100 + n4 * 4 + n1;
    if (n1 == 4 || n100 == 4)
        year -= 1;
    return year;
}

static long ordinal_of_jan1(long year)
{
    long y = year - 1;
    return y * 365 + y / 4 - y / 100 + y / 400 + 1;
}

static int date_cell(sbuf *b, const action_t *a, const unsigned char *v, Py_ssize_t n)
{
    if (v == NULL)
        return sb_cell(b, NULL, 0);
    if (a->kind == ACT_DATE_TEXT) {
        long year;
        if (iso_date(v, n, &year)) {
            char out[10];
            if (a->clamp >= 0 && year < a->clamp) {
                long c = a->clamp;
                out[0] = (char)('0' + c / 1000);
                out[1] = (char)('0' + c / 100 % 10);
                out[2] = (char)('0' + c / 10 % 10);
                out[3] = (char)('0' + c % 10);
            }
            else
                memcpy(out, v, 4);
            memcpy(out + 4, "-01-01", 6);
            return sb_cell(b, out, 10);
        }
    }
    else if (n == 4) {
        int32_t days = get32(v);
        if (days == INT32_MAX || days == INT32_MIN)
            return sb_cell(b, v, 4); /* infinity passes */
        long ordinal = PG_EPOCH_ORDINAL + (long)days;
        if (ordinal >= 1 && ordinal <= MAX_ORDINAL) {
            long year = year_of_ordinal(ordinal);
            if (a->clamp >= 0 && year < a->clamp)
                year = a->clamp;
            char out[4];
            put32(out, (uint32_t)(int32_t)(ordinal_of_jan1(year) - PG_EPOCH_ORDINAL));
            return sb_cell(b, out, 4);
        }
    }
    return call_cell(b, a, v, n);
}

static int write_cell(sbuf *b, const action_t *a, const unsigned char *v, Py_ssize_t n)
{
    switch (a->kind) {
    case ACT_NULL:
        return sb_cell(b, NULL, 0);
    case ACT_CONST:
        if (v == NULL || (n == a->clen && memcmp(v, a->cbuf, (size_t)n) == 0))
            return sb_cell(b, NULL, 0);
        return sb_cell(b, a->cbuf, a->clen);
    case ACT_CALL:
        return call_cell(b, a, v, n);
    default:
        return date_cell(b, a, v, n);
    }
}

static int parse_actions(PyObject *seq, action_t **out, Py_ssize_t *count)
{
    if (!PyTuple_Check(seq)) {
        PyErr_SetString(PyExc_TypeError, "actions must be a tuple");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    action_t *acts = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(action_t));
    if (acts == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyTuple_GET_ITEM(seq, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 6) {
            PyErr_SetString(PyExc_TypeError, "an action must be a 6-tuple");
            goto fail;
        }
        action_t *a = &acts[i];
        a->ordinal = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 0));
        a->kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(t, 1));
        a->clamp = PyLong_AsLong(PyTuple_GET_ITEM(t, 5));
        if (PyErr_Occurred())
            goto fail;
        PyObject *c = PyTuple_GET_ITEM(t, 2);
        a->call = PyTuple_GET_ITEM(t, 3);
        a->fmt = PyTuple_GET_ITEM(t, 4);
        if (a->kind < ACT_NULL || a->kind > ACT_DATE_BIN || a->ordinal < 0 ||
            (i > 0 && a->ordinal <= acts[i - 1].ordinal)) {
            PyErr_SetString(PyExc_ValueError, "invalid action");
            goto fail;
        }
        if (a->kind == ACT_CONST) {
            if (!PyBytes_Check(c)) {
                PyErr_SetString(PyExc_TypeError, "a constant must be bytes");
                goto fail;
            }
            a->cbuf = PyBytes_AS_STRING(c);
            a->clen = PyBytes_GET_SIZE(c);
        }
        if (a->kind >= ACT_CALL && !PyCallable_Check(a->call)) {
            PyErr_SetString(PyExc_TypeError, "an action's call must be callable");
            goto fail;
        }
        if (a->kind >= ACT_DATE_TEXT && (a->clamp < -1 || a->clamp > 9999)) {
            PyErr_SetString(PyExc_ValueError, "invalid clamp year");
            goto fail;
        }
    }
    *out = acts;
    *count = n;
    return 0;
fail:
    PyMem_Free(acts);
    return -1;
}

static int flush(PyObject *out, sbuf *b)
{
    if (b->len == 0)
        return 0;
    Py_ssize_t old = PyByteArray_GET_SIZE(out);
    if (PyByteArray_Resize(out, old + b->len) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(out) + old, b->p, (size_t)b->len);
    b->len = 0;
    return 0;
}

static PyObject *rewrite_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "rewrite_rows takes 6 arguments");
        return NULL;
    }
    PyObject *out = args[0], *frames = args[2];
    if (!PyByteArray_Check(out) || !PyList_Check(frames)) {
        PyErr_SetString(PyExc_TypeError, "rewrite_rows(bytearray, chunk, list, int, int, tuple)");
        return NULL;
    }
    Py_ssize_t first = PyLong_AsSsize_t(args[3]);
    if (first == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t room = PyLong_AsSsize_t(args[4]);
    if (room == -1 && PyErr_Occurred())
        return NULL;
    action_t *acts = NULL;
    Py_ssize_t nacts = 0;
    if (parse_actions(args[5], &acts, &nacts) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        PyMem_Free(acts);
        return NULL;
    }
    const unsigned char *buf = view.buf;
    Py_ssize_t buflen = view.len;
    sbuf b = {NULL, 0, 0};
    Py_ssize_t i = first < 0 ? 0 : first, rows = 0, cells = 0;
    Py_ssize_t complete = 0; /* b.len after the last complete row */
    const char *error = NULL;

    while (rows < room && i < PyList_GET_SIZE(frames)) {
        PyObject *f = PyList_GET_ITEM(frames, i);
        if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 3) {
            PyErr_SetString(PyExc_TypeError, "a frame must be a (tag, start, end) tuple");
            goto fail;
        }
        long tag = PyLong_AsLong(PyTuple_GET_ITEM(f, 0));
        Py_ssize_t start = PyLong_AsSsize_t(PyTuple_GET_ITEM(f, 1));
        Py_ssize_t end = PyLong_AsSsize_t(PyTuple_GET_ITEM(f, 2));
        if (PyErr_Occurred())
            goto fail;
        if (tag != 'D')
            break;
        if (start < 0 || start > end || end > buflen) {
            PyErr_SetString(PyExc_ValueError, "frame outside the chunk");
            goto fail;
        }
        if (end - start < 7) {
            error = SHORT;
            goto fail;
        }
        Py_ssize_t row = b.len;
        if (sb_reserve(&b, 5) < 0)
            goto fail;
        b.len += 5;
        Py_ssize_t ncols = ((Py_ssize_t)buf[start + 5] << 8) | buf[start + 6];
        Py_ssize_t pos = start + 7, seg = start + 5, col = 0;
        for (Py_ssize_t k = 0; k < nacts; k++) {
            const action_t *a = &acts[k];
            if (a->ordinal >= ncols)
                break;
            int32_t len;
            while (col < a->ordinal) { /* untouched columns: copied with the next segment */
                if ((error = cell_length(buf, pos, end, &len)) != NULL)
                    goto fail;
                pos += 4 + (len > 0 ? len : 0);
                col++;
            }
            if ((error = cell_length(buf, pos, end, &len)) != NULL)
                goto fail;
            Py_ssize_t nxt = pos + 4 + (len > 0 ? len : 0);
            if (sb_put(&b, buf + seg, pos - seg) < 0)
                goto fail;
            if (write_cell(&b, a, len < 0 ? NULL : buf + pos + 4, len < 0 ? 0 : len) < 0)
                goto fail;
            pos = seg = nxt;
            col++;
            cells++;
        }
        if (sb_put(&b, buf + seg, end - seg) < 0)
            goto fail;
        Py_ssize_t size = b.len - row - 1;
        if (size > INT32_MAX) {
            error = TOO_LONG;
            goto fail;
        }
        b.p[row] = 'D';
        put32(b.p + row + 1, (uint32_t)size);
        rows++;
        i++;
        complete = b.len;
        if (b.len >= (1 << 20)) {
            if (flush(out, &b) < 0)
                goto fail;
            complete = 0;
        }
    }
    if (flush(out, &b) < 0)
        goto fail;
    PyMem_Free(b.p);
    PyBuffer_Release(&view);
    PyMem_Free(acts);
    return Py_BuildValue("nnn", i, rows, cells);

fail:
    /* rows finished before the failure are written, as in the Python twin */
    b.len = complete;
    if (error != NULL) {
        if (flush(out, &b) == 0)
            PyErr_SetString(peer_error, error);
    }
    else {
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        if (flush(out, &b) < 0)
            PyErr_Clear();
        PyErr_Restore(t, v, tb);
    }
    PyMem_Free(b.p);
    PyBuffer_Release(&view);
    PyMem_Free(acts);
    return NULL;
}

static PyMethodDef methods[] = {
    {"rewrite_rows", (PyCFunction)(void (*)(void))rewrite_rows, METH_FASTCALL,
     "rewrite_rows(out, chunk, frames, first, room, actions) -> (next, rows, cells)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rowmask", "Masks runs of DataRows (see rowmask.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rowmask(void)
{
    PyObject *errors = PyImport_ImportModule("pgproxy.protocol.errors");
    if (errors == NULL)
        return NULL;
    peer_error = PyObject_GetAttrString(errors, "PeerProtocolError");
    Py_DECREF(errors);
    if (peer_error == NULL)
        return NULL;
    return PyModule_Create(&module);
}
