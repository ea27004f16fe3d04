/* _shapekey: the compiled twin of shape.py's _simple_key_py (see that module).
 *
 * simple_key(sql) -> str | None
 *     None unless `sql` is ASCII, made only of the characters of shape._SIMPLE (letters,
 *     digits, '_', whitespace, and , . ; ( ) = < > * + - :) and free of "--". Otherwise
 *     "f:" followed by `sql` with every standalone decimal integer replaced by '?': an
 *     integer is standalone when the character before it and the one after it are neither
 *     word characters nor '.'. When the text contains "order", "group" or "distinct" in any
 *     case, only integers of 5 or more digits with no leading zero are replaced (smaller ones
 *     may be column positions and stay in the key).
 *
 * It must answer exactly as _simple_key_py does for any str; tests/policy/test_shape.py checks
 * that with hypothesis. A key that differs is not a crash but a wrong cache key, which is why
 * the twin exists only for this one simple case and the scanner path stays in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static int is_word(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* the characters of shape._SIMPLE within ASCII; Python's \s there is str.isspace(): 9-13,
 * 28-31 and the space */
static int is_simple(unsigned char c)
{
    if (is_word(c))
        return 1;
    if ((c >= 9 && c <= 13) || (c >= 28 && c <= 32))
        return 1;
    return c != 0 && strchr(",.;()=<>*+-:", c) != NULL;
}

static unsigned char lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static int contains_ci(const unsigned char *s, Py_ssize_t n, const char *word)
{
    Py_ssize_t w = (Py_ssize_t)strlen(word);
    for (Py_ssize_t i = 0; i + w <= n; i++) {
        Py_ssize_t k = 0;
        while (k < w && lower(s[i + k]) == (unsigned char)word[k])
            k++;
        if (k == w)
            return 1;
    }
    return 0;
}

static PyObject *simple_key(PyObject *self, PyObject *arg)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "simple_key() argument must be str");
        return NULL;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(arg) < 0)
        return NULL;
#endif
    if (!PyUnicode_IS_ASCII(arg))
        Py_RETURN_NONE;
    const unsigned char *s = PyUnicode_1BYTE_DATA(arg);
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!is_simple(s[i]) || (s[i] == '-' && i + 1 < n && s[i + 1] == '-'))
            Py_RETURN_NONE;
    }
    int positions = contains_ci(s, n, "order") || contains_ci(s, n, "group")
                    || contains_ci(s, n, "distinct");
    /* the key is never longer than "f:" + sql */
    PyObject *out = PyUnicode_New(n + 2, 127);
    if (out == NULL)
        return NULL;
    unsigned char *o = PyUnicode_1BYTE_DATA(out);
    Py_ssize_t len = 0;
    o[len++] = 'f';
    o[len++] = ':';
    Py_ssize_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (!is_digit(c) || (i > 0 && (is_word(s[i - 1]) || s[i - 1] == '.'))) {
            o[len++] = c;
            i++;
            continue;
        }
        Py_ssize_t j = i;
        while (j < n && is_digit(s[j]))
            j++;
        int standalone = j == n || !(is_word(s[j]) || s[j] == '.');
        int replace = standalone && (!positions || (c != '0' && j - i >= 5));
        if (replace) {
            o[len++] = '?';
        }
        else {
            memcpy(o + len, s + i, (size_t)(j - i));
            len += j - i;
        }
        i = j;
    }
    if (len == n + 2)
        return out;
    /* shorter: copy into an exact-size string (a str's length is fixed at creation) */
    PyObject *exact = PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, o, len);
    Py_DECREF(out);
    return exact;
}

static PyMethodDef methods[] = {
    {"simple_key", (PyCFunction)simple_key, METH_O,
     "The shape key of a simple ASCII statement text, else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_shapekey", "Compiled twin of pgproxy.policy.shape's simple key.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__shapekey(void)
{
    return PyModule_Create(&module);
}
