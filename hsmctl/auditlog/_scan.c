/* hsmctl.auditlog._scan: the compiled accelerator of blockscan._link_scan's common path.
 *
 * scan(lines, pos, running, first) -> (end, running)
 *
 * Links lines[pos:end] to the chain on their bytes alone and returns the index of the first
 * line it did not take (len(lines) if it took them all) and the hash of the last line it
 * took (``running`` itself if none). It takes a line only when blockscan's Python path
 * would accept it as an unsigned record of the common shape (form.PLAIN): a line of
 * printable ASCII without a backslash (bytes 0x20-0x7f but '\\'), exactly of the form
 *
 *   {"actor":S,"detail":{K:V,...},"event":S,"hash":"H","outcome":"O","prev":"H",
 *    "role":S,"seq":N,"source":S,"time":"T"}
 *
 * (S a string of no '"', K such a key with the detail's keys strictly increasing as bytes
 * and at most form.FLAT_MEMBERS of them, V a string, 0, -?[1-9][0-9]{0,17}, true, false or
 * null, O one of chain.OUTCOMES, N [1-9][0-9]{0,17}, T chain.TIME_RE), whose ``hash`` is
 * the hex SHA-256 of the line without its ``,"hash":"..."`` member, whose ``prev`` is the
 * running hash and whose ``seq`` is first + its index, and whose event is not a signed
 * one ("checkpoint", "key-rotation"). Anything else - an escape, a control or non-ASCII
 * byte, another shape, a signed record, a wrong link - it leaves to the Python code, which
 * decides that line and calls again after it. Taking a line is the only verdict made here,
 * so whatever this code does not know, the reference path decides
 * (tests/unit/test_scan_property.py holds the two paths to identical results).
 *
 * The scan runs without the GIL, a window of lines at a time (the lines are held by a
 * reference each while it runs). SHA-256 is the system libcrypto's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <openssl/evp.h>

#define FLAT_MEMBERS 8
#define HEX_LEN 64
#define MAX_DIGITS 18
#define FIRST_WINDOW 64
#define MAX_WINDOW 1024

static EVP_MD *sha256_md;

typedef const unsigned char *ptr;

/* The literal ``s`` (``n`` bytes) at *p: step over it. */
static inline int
lit(ptr *p, ptr end, const char *s, size_t n)
{
    if ((size_t)(end - *p) < n || memcmp(*p, s, n) != 0)
        return 0;
    *p += n;
    return 1;
}

#define LIT(p, end, s) lit(p, end, s, sizeof(s) - 1)

/* A JSON string without escapes at *p: '"', bytes other than '"', '"'. */
static inline int
str(ptr *p, ptr end, ptr *text, size_t *len)
{
    ptr q;
    if (*p >= end || **p != '"')
        return 0;
    q = memchr(*p + 1, '"', (size_t)(end - *p - 1));
    if (q == NULL)
        return 0;
    *text = *p + 1;
    *len = (size_t)(q - *p - 1);
    *p = q + 1;
    return 1;
}

/* [0-9]{n} */
static inline int
digits(ptr *p, ptr end, int n)
{
    if (end - *p < n)
        return 0;
    for (int i = 0; i < n; i++)
        if ((*p)[i] < '0' || (*p)[i] > '9')
            return 0;
    *p += n;
    return 1;
}

/* [1-9][0-9]{0,17} as a number (the caller checks what follows: never a digit). */
static inline int
natural(ptr *p, ptr end, uint64_t *value)
{
    ptr q = *p;
    uint64_t v = 0;
    if (q >= end || *q < '1' || *q > '9')
        return 0;
    while (q < end && *q >= '0' && *q <= '9') {
        if (q - *p == MAX_DIGITS)
            return 0;
        v = v * 10 + (uint64_t)(*q - '0');
        q++;
    }
    *p = q;
    *value = v;
    return 1;
}

/* A detail value: a string, 0, -?[1-9][0-9]{0,17}, true, false, null. */
static inline int
value(ptr *p, ptr end)
{
    ptr text;
    size_t len;
    uint64_t v;
    if (*p >= end)
        return 0;
    switch (**p) {
    case '"':
        return str(p, end, &text, &len);
    case '0':
        *p += 1;
        return 1;
    case '-':
        *p += 1;
        return natural(p, end, &v);
    case 't':
        return LIT(p, end, "true");
    case 'f':
        return LIT(p, end, "false");
    case 'n':
        return LIT(p, end, "null");
    default:
        return natural(p, end, &v);
    }
}

/* Strictly greater as bytes (Python's bytes comparison). */
static inline int
after(ptr a, size_t alen, ptr b, size_t blen)
{
    size_t n = alen < blen ? alen : blen;
    int c = memcmp(a, b, n);
    return c > 0 || (c == 0 && alen > blen);
}

/* RFC 3339 UTC as chain.TIME_RE, then the line's end. */
static inline int
time_to_end(ptr p, ptr end)
{
    if (!(digits(&p, end, 4) && LIT(&p, end, "-") && digits(&p, end, 2) && LIT(&p, end, "-") &&
          digits(&p, end, 2) && LIT(&p, end, "T") && digits(&p, end, 2) && LIT(&p, end, ":") &&
          digits(&p, end, 2) && LIT(&p, end, ":") && digits(&p, end, 2)))
        return 0;
    if (p < end && *p == '.') {
        ptr q = ++p;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        if (p == q || p - q > 9)
            return 0;
    }
    return LIT(&p, end, "Z\"}") && p == end;
}

static const char HEX[] = "0123456789abcdef";

/* Whether the line is taken; then *claimed points at its hash (HEX_LEN bytes). */
static int
link_line(EVP_MD_CTX *ctx, ptr line, size_t size, ptr running, uint64_t seq, ptr *claimed)
{
    ptr p = line, end = line + size, text, key = NULL, at, hash;
    size_t len, key_len = 0;
    uint64_t number;
    unsigned char digest[EVP_MAX_MD_SIZE], hex[HEX_LEN];
    unsigned int digest_len = 0;
    unsigned char bad = 0;

    /* Printable ASCII, no backslash: no escapes. Without an early exit, so that the
       compiler vectorizes it (-O3): it was most of the scan's time byte by byte. */
    for (size_t i = 0; i < size; i++)
        bad |= (unsigned char)((unsigned char)(line[i] - 0x20) >= 0x60) |
               (unsigned char)(line[i] == '\\');
    if (bad)
        return 0;
    if (!(LIT(&p, end, "{\"actor\":") && str(&p, end, &text, &len) &&
          LIT(&p, end, ",\"detail\":{")))
        return 0;
    if (p < end && *p == '}') {
        p++;
    } else {
        for (int members = 1;; members++) {
            if (!str(&p, end, &text, &len))
                return 0;
            if (key != NULL && !after(text, len, key, key_len))
                return 0;
            key = text;
            key_len = len;
            if (!(LIT(&p, end, ":") && value(&p, end)) || p >= end)
                return 0;
            if (*p == '}') {
                p++;
                break;
            }
            if (*p != ',' || members == FLAT_MEMBERS)
                return 0;
            p++;
        }
    }
    if (!(LIT(&p, end, ",\"event\":") && str(&p, end, &text, &len)))
        return 0;
    if ((len == 10 && memcmp(text, "checkpoint", 10) == 0) ||
        (len == 12 && memcmp(text, "key-rotation", 12) == 0))
        return 0; /* signed: the Python path collects it for full verification */
    at = p;
    if (!LIT(&p, end, ",\"hash\":\"") || end - p < HEX_LEN + 1 || p[HEX_LEN] != '"')
        return 0;
    hash = p;
    p += HEX_LEN + 1;
    if (!(LIT(&p, end, ",\"outcome\":\"") &&
          (LIT(&p, end, "denied\"") || LIT(&p, end, "error\"") || LIT(&p, end, "failed\"") ||
           LIT(&p, end, "ok\"")) &&
          LIT(&p, end, ",\"prev\":\"") && end - p >= HEX_LEN &&
          memcmp(p, running, HEX_LEN) == 0))
        return 0;
    p += HEX_LEN;
    if (!(LIT(&p, end, "\",\"role\":") && str(&p, end, &text, &len) &&
          LIT(&p, end, ",\"seq\":") && natural(&p, end, &number) && number == seq &&
          LIT(&p, end, ",\"source\":") && str(&p, end, &text, &len) &&
          LIT(&p, end, ",\"time\":\"") && time_to_end(p, end)))
        return 0;
    /* The hash: SHA-256 of the line without the member (74 bytes from ``at``). */
    if (EVP_DigestInit_ex(ctx, sha256_md, NULL) != 1 ||
        EVP_DigestUpdate(ctx, line, (size_t)(at - line)) != 1 ||
        EVP_DigestUpdate(ctx, at + 10 + HEX_LEN, (size_t)(end - at - 10 - HEX_LEN)) != 1 ||
        EVP_DigestFinal_ex(ctx, digest, &digest_len) != 1 || digest_len * 2 != HEX_LEN)
        return 0;
    for (unsigned int i = 0; i < digest_len; i++) {
        hex[2 * i] = (unsigned char)HEX[digest[i] >> 4];
        hex[2 * i + 1] = (unsigned char)HEX[digest[i] & 15];
    }
    if (memcmp(hex, hash, HEX_LEN) != 0)
        return 0;
    *claimed = hash;
    return 1;
}

static PyObject *
scan(PyObject *module, PyObject *args)
{
    PyObject *lines, *out, *held[MAX_WINDOW];
    Py_ssize_t pos, total, window = FIRST_WINDOW;
    const char *start;
    Py_ssize_t start_len;
    long long first;
    unsigned char running[HEX_LEN];
    ptr bufs[MAX_WINDOW];
    size_t sizes[MAX_WINDOW];
    EVP_MD_CTX *ctx;

    (void)module;
    if (!PyArg_ParseTuple(args, "O!ny#L:scan", &PyList_Type, &lines, &pos, &start, &start_len,
                          &first))
        return NULL;
    if (start_len != HEX_LEN || pos < 0) {
        PyErr_SetString(PyExc_ValueError, "scan: a 64-byte running hash and pos >= 0");
        return NULL;
    }
    total = PyList_GET_SIZE(lines);
    if (first < 1 || first > 1000000000000000000LL - total) {
        PyErr_SetString(PyExc_ValueError, "scan: seq out of range");
        return NULL;
    }
    memcpy(running, start, HEX_LEN);
    ctx = EVP_MD_CTX_new();
    if (ctx == NULL)
        return PyErr_NoMemory();
    while (pos < total) {
        /* A window of lines, each held by a reference: the list may change meanwhile. */
        Py_ssize_t n = 0, taken = 0;
        total = PyList_GET_SIZE(lines); /* another thread may have changed it meanwhile */
        while (n < window && pos + n < total) {
            PyObject *item = PyList_GET_ITEM(lines, pos + n);
            if (!PyBytes_CheckExact(item))
                break;
            Py_INCREF(item);
            held[n] = item;
            bufs[n] = (ptr)PyBytes_AS_STRING(item);
            sizes[n] = (size_t)PyBytes_GET_SIZE(item);
            n++;
        }
        Py_BEGIN_ALLOW_THREADS
        ptr last = running;
        for (; taken < n; taken++) {
            ptr claimed;
            uint64_t seq = (uint64_t)first + (uint64_t)(pos + taken);
            if (!link_line(ctx, bufs[taken], sizes[taken], last, seq, &claimed))
                break;
            last = claimed;
        }
        if (last != running)
            memcpy(running, last, HEX_LEN);
        Py_END_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++)
            Py_DECREF(held[i]);
        pos += taken;
        if (taken < window)
            break; /* a line not taken (or not bytes): the Python path's */
        if (window < MAX_WINDOW)
            window *= 2;
    }
    EVP_MD_CTX_free(ctx);
    out = PyBytes_FromStringAndSize((const char *)running, HEX_LEN);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("nN", pos, out);
}

/* scan_buffer(data, pos, running, first, limit) -> (end, count, running): the same over
   the lines of a buffer from byte ``pos``, each ended by '\n' and at most ``limit`` bytes
   without it; stops before the first line it does not take (or an unended rest). */
static PyObject *
scan_buffer(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t pos, limit, count = 0;
    const char *start;
    Py_ssize_t start_len;
    long long first;
    unsigned char running[HEX_LEN];
    EVP_MD_CTX *ctx;
    PyObject *out;

    (void)module;
    if (!PyArg_ParseTuple(args, "y*ny#Ln:scan_buffer", &data, &pos, &start, &start_len, &first,
                          &limit))
        return NULL;
    if (start_len != HEX_LEN || pos < 0 || pos > data.len || limit < 0 || first < 1 ||
        first > 1000000000000000000LL - data.len) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "scan_buffer: argument out of range");
        return NULL;
    }
    memcpy(running, start, HEX_LEN);
    ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    ptr base = (ptr)data.buf, end = base + data.len, last = running;
    while (base + pos < end) {
        ptr line = base + pos, nl = memchr(line, '\n', (size_t)(end - line)), claimed;
        if (nl == NULL || nl - line > limit ||
            !link_line(ctx, line, (size_t)(nl - line), last, (uint64_t)first + (uint64_t)count,
                       &claimed))
            break;
        last = claimed;
        count++;
        pos = nl + 1 - base;
    }
    if (last != running)
        memcpy(running, last, HEX_LEN);
    Py_END_ALLOW_THREADS
    EVP_MD_CTX_free(ctx);
    PyBuffer_Release(&data);
    out = PyBytes_FromStringAndSize((const char *)running, HEX_LEN);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("nnN", pos, count, out);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(lines, pos, running, first) -> (end, running): link lines[pos:end] of the "
     "common shape on their bytes (see hsmctl.auditlog.blockscan)."},
    {"scan_buffer", scan_buffer, METH_VARARGS,
     "scan_buffer(data, pos, running, first, limit) -> (end, count, running): the same over "
     "the newline-ended lines of a buffer from byte pos."},
    {NULL, NULL, 0, NULL},
};

static void
free_module(void *module)
{
    (void)module;
    EVP_MD_free(sha256_md);
    sha256_md = NULL;
}

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "_scan",
    "The compiled byte scan of verified log collection (hsmctl.auditlog.blockscan).", -1,
    methods, NULL, NULL, NULL, free_module,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    if (sha256_md == NULL) {
        sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
        if (sha256_md == NULL) {
            PyErr_SetString(PyExc_ImportError, "libcrypto has no SHA256");
            return NULL;
        }
    }
    return PyModule_Create(&scan_module);
}
