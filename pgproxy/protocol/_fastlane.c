/* _fastlane: the compiled twin of fastlane.py's shape checks (see that module).
 *
 * query_text(data, max_size) -> str | None
 *     the SQL when `data` is exactly one Query message ('Q', a length word equal to the rest
 *     of `data` and at most max_size, one NUL, at the end) whose text is valid UTF-8
 *
 * plain_result(data, max_size) -> (rows, status) | None
 *     when `data` is exactly RowDescription / DataRow / CommandComplete / EmptyQueryResponse
 *     messages followed by one ReadyForQuery (length 5) that ends `data`: the number of
 *     DataRows and the transaction status byte
 *
 * plain_execute(data, max_size, parsed, described) -> (rows, status, body_start, body_end) | None
 *     when `data` is exactly [ParseComplete when `parsed`], BindComplete, [RowDescription or
 *     NoData when `described`],
 *     DataRows, one CommandComplete or EmptyQueryResponse, one ReadyForQuery (length 5) that
 *     ends `data`: the DataRows, the status byte and where the RowDescription's body lies in
 *     `data` (-1, -1 without one)
 *
 * All must answer exactly as fastlane's _query_text_py / _plain_result_py / _plain_execute_py
 * do for any bytes; tests/protocol/test_fastlane.py checks that with hypothesis.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int parse_args(PyObject *const *args, Py_ssize_t nargs, const char *name,
                      const unsigned char **buf, Py_ssize_t *n, long long *max_size)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly 2 arguments", name);
        return -1;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s() argument 1 must be bytes", name);
        return -1;
    }
    *max_size = PyLong_AsLongLong(args[1]);
    if (*max_size == -1 && PyErr_Occurred())
        return -1;
    *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    *n = PyBytes_GET_SIZE(args[0]);
    return 0;
}

/* The message at `pos`: 1 with its tag and end when it is whole and its length is within
 * [4, max_size]; 0 at the end of `buf`, or when fewer than 5 bytes are left; -1 when malformed. */
static int next_message(const unsigned char *buf, Py_ssize_t n, Py_ssize_t pos,
                        long long max_size, unsigned char *tag, Py_ssize_t *end)
{
    if (n - pos < 5)
        return 0;
    long long length = be32(buf + pos + 1);
    long long stop = (long long)pos + 1 + length;
    if (length < 4 || length > max_size || stop > (long long)n)
        return -1;
    *tag = buf[pos];
    *end = (Py_ssize_t)stop;
    return 1;
}

static PyObject *query_text(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *buf;
    Py_ssize_t n;
    long long max_size;
    if (parse_args(args, nargs, "query_text", &buf, &n, &max_size) < 0)
        return NULL;
    if (n < 6 || buf[0] != 'Q' || (long long)be32(buf + 1) != (long long)n - 1
        || (long long)n - 1 > max_size)
        Py_RETURN_NONE;
    if (buf[n - 1] != 0 || memchr(buf + 5, 0, (size_t)(n - 6)) != NULL)
        Py_RETURN_NONE;
    PyObject *text = PyUnicode_DecodeUTF8((const char *)buf + 5, n - 6, NULL);
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return text;
}

static PyObject *plain_result(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *buf;
    Py_ssize_t n;
    long long max_size;
    if (parse_args(args, nargs, "plain_result", &buf, &n, &max_size) < 0)
        return NULL;
    Py_ssize_t pos = 0, end;
    long long rows = 0;
    unsigned char tag;
    while (next_message(buf, n, pos, max_size, &tag, &end) > 0) {
        if (tag == 'D') {
            rows++;
        }
        else if (tag == 'Z') {
            if (end - pos != 6 || end != n)
                Py_RETURN_NONE;
            return Py_BuildValue("(Li)", rows, (int)buf[pos + 5]);
        }
        else if (tag != 'T' && tag != 'C' && tag != 'I') {
            Py_RETURN_NONE;
        }
        pos = end;
    }
    Py_RETURN_NONE;
}

static PyObject *plain_execute(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *buf;
    Py_ssize_t n;
    long long max_size;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "plain_execute() takes exactly 4 arguments");
        return NULL;
    }
    if (parse_args(args, 2, "plain_execute", &buf, &n, &max_size) < 0)
        return NULL;
    int parsed = PyObject_IsTrue(args[2]);
    if (parsed < 0)
        return NULL;
    int described = PyObject_IsTrue(args[3]);
    if (described < 0)
        return NULL;
    Py_ssize_t pos = 0, end;
    long long rows = 0;
    long long body_start = -1, body_end = -1;
    unsigned char tag;
    /* 0: ParseComplete, 1: BindComplete, 2: the Describe's answer, 3: rows, 4: ready */
    int stage = parsed ? 0 : 1;
    while (next_message(buf, n, pos, max_size, &tag, &end) > 0) {
        if (stage == 0) {
            if (tag != '1')
                Py_RETURN_NONE;
            stage = 1;
        }
        else if (stage == 1) {
            if (tag != '2')
                Py_RETURN_NONE;
            stage = described ? 2 : 3;
        }
        else if (stage == 2) {
            if (tag == 'T') {
                body_start = (long long)pos + 5;
                body_end = end;
            }
            else if (tag != 'n') {
                Py_RETURN_NONE;
            }
            stage = 3;
        }
        else if (stage == 3) {
            if (tag == 'D')
                rows++;
            else if (tag == 'C' || tag == 'I')
                stage = 4;
            else
                Py_RETURN_NONE;
        }
        else {
            if (tag != 'Z' || end - pos != 6 || end != n)
                Py_RETURN_NONE;
            return Py_BuildValue("(LiLL)", rows, (int)buf[pos + 5], body_start, body_end);
        }
        pos = end;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"query_text", (PyCFunction)(void (*)(void))query_text, METH_FASTCALL,
     "The SQL of exactly one well-formed Query message, else None."},
    {"plain_result", (PyCFunction)(void (*)(void))plain_result, METH_FASTCALL,
     "(DataRows, status) of exactly one plain simple-Query answer, else None."},
    {"plain_execute", (PyCFunction)(void (*)(void))plain_execute, METH_FASTCALL,
     "(DataRows, status, RowDescription body span) of exactly one plain Execute answer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastlane", "Compiled twin of pgproxy.protocol.fastlane.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastlane(void)
{
    return PyModule_Create(&module);
}
