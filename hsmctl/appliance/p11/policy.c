/*
 * hsmctl key-policy layer: a PKCS#11 module that wraps the device's SoftHSM and enforces
 * the `fips` key policy (SPEC §11) on every call, because SoftHSM enforces none of it.
 * It is meant to be loaded by `p11-kit remote --provider <this .so>` behind SSH, one
 * process per client connection, so a process serves exactly one client and one role.
 *
 * Environment (read at C_Initialize):
 *   HSM_P11_MODULE     the real module (default /usr/lib/softhsm/libsofthsm2.so)
 *   HSM_P11_ROLE       crypto-officer | crypto-user; anything else: no session, no login
 *   HSM_P11_CLIENT     the client's name, for the events only
 *   HSM_P11_EVENTS_FD  an open descriptor; one JSON object per line is written to it
 *   HSM_P11_TOKEN_LOCK the token store's lock file (see "the token store's lock" below);
 *                      unset: no lock (the module alone, outside a device); set but not
 *                      openable: C_Initialize fails (CKR_GENERAL_ERROR)
 *
 * Every refusal returns a CKR_* code and writes {"event":"denied","rule":...}. Rules
 * (stable names; README.md in this folder has the full table with functions and codes):
 *   rsa-size, ec-curve, aes-size, key-type, sensitive, extractable, plaintext-import,
 *   object-class, weakening-change, sensitive-read, mechanism-md5, mechanism-sha1-sign,
 *   mechanism-raw-rsa, so-login, token-management, operation-state, role-crypto-user,
 *   role-unknown, malformed, wrapping-key, oaep-params, byok-unwrap.
 *
 * BYOK wrapping keys (SPEC §12; "BYOK wrapping keys" below): SoftHSM 2.6.1 does RSA-OAEP
 * with SHA-1 only, so for an RSA key marked CKA_ALLOWED_MECHANISMS={CKM_RSA_X_509} this
 * layer does the OAEP unwrap itself: a raw RSA decrypt inside SoftHSM, OpenSSL's
 * constant-time OAEP decoding (SHA-256 or SHA-1), and the AES key made in SoftHSM as a
 * session object. Clients get no other use of such a key, and none of raw RSA.
 *
 * Shape: every policy decision is made before the call is forwarded (template checks),
 * and every object the layer lets SoftHSM create is read back and judged again
 * (post_check); an object that fails is destroyed before the error is returned. So the
 * layer never relies on SoftHSM's own checks, and a template trick the pre-check misses
 * (an attribute in the "other" template, an unwrapped blob of another size) still fails.
 *
 * Never logged: PINs, key values, data. Labels are escaped (attacker-chosen bytes).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

/* RSA_padding_check_PKCS1_OAEP_mgf1 is deprecated in OpenSSL 3.0 but is its only OAEP
 * decoder that takes an encoded message rather than an RSA key (the key stays inside
 * SoftHSM): declared without the deprecation attribute so -Werror builds. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>

#define EXPORT __attribute__((visibility("default")))

#define DEFAULT_MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define MAX_ATTRS 64                 /* attributes in one template */
#define MAX_VALUE_LEN (1UL << 20)    /* bytes in one attribute value */
#define MAX_SESSIONS 1024
#define MAX_MECHS 4096
#define LABEL_CAP 256                /* label bytes written to an event */
#define ID_CAP 64                    /* CKA_ID bytes written to an event */
#define CLIENT_CAP 128

/* ---- state --------------------------------------------------------------------- */

enum role { ROLE_NONE, ROLE_OFFICER, ROLE_USER };

enum op {
	OP_SIGN, OP_VERIFY, OP_ENCRYPT, OP_DECRYPT, OP_DIGEST, OP_WRAP, OP_UNWRAP,
	OP_GENERATE, OP_DERIVE, OP_CREATE, OP_COPY, OP_DESTROY, OP_DENIED, OP_COUNT
};
static const char *const op_names[OP_COUNT] = {
	"sign", "verify", "encrypt", "decrypt", "digest", "wrap", "unwrap",
	"generate", "derive", "create", "copy", "destroy", "denied",
};

struct session {
	CK_SESSION_HANDLE handle;
	CK_SLOT_ID slot;
	CK_MECHANISM_TYPE sign_mech;
	unsigned long ops[OP_COUNT];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static CK_FUNCTION_LIST_PTR real;

/* ---- the token store's lock ------------------------------------------------------- */
/*
 * SoftHSM (2.6.1) rewrites a token's token.object at every C_Login (the PIN-count flags)
 * and reads it again in other processes at C_Initialize and at most token calls. Its own
 * fcntl locking does not keep a reader from taking a torn file: measured, 8 processes
 * that C_Initialize and C_Login at once lose the token in about 40 % of them, and a
 * process that reads a torn token.object drops the token for its lifetime ("Token
 * integrity check failed"; softhsm/SoftHSMv2#757). So every SoftHSM user on the device
 * takes one lock file beside the token store (flock; hsmctl/appliance/tokenlock.py is the
 * daemon's and the token helper's side): shared around every call forwarded here,
 * exclusive around the ones that rewrite a file other processes read (C_Login rewrites
 * token.object, C_SetAttributeValue the object's file; C_InitToken, C_InitPIN and
 * C_SetPIN are refused before they are forwarded). The cause is SoftHSM's File::unlock
 * in 2.6.1: the lock goes before the buffered write reaches the file (truncate, unlock,
 * write). A new object (generate, create, copy, unwrap, derive) is written completely
 * before SoftHSM bumps the token's generation, which is what makes other processes look
 * at it, and a destroyed one is unlinked: those stay shared, so a long RSA key
 * generation holds no other call. token_mutex keeps this process's threads to one flock
 * state at a time. C_WaitForSlotEvent is not locked (it may block; SoftHSM does not
 * support it).
 */
static int token_lock_fd = -1;
static pthread_mutex_t token_mutex = PTHREAD_MUTEX_INITIALIZER;

static CK_RV open_token_lock(void)
{
	const char *path = getenv("HSM_P11_TOKEN_LOCK");
	if (token_lock_fd >= 0 || !path || !*path)
		return CKR_OK;
	token_lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	return token_lock_fd >= 0 ? CKR_OK : CKR_GENERAL_ERROR;
}

static int token_hold(int how)
{
	pthread_mutex_lock(&token_mutex);
	if (token_lock_fd < 0)
		return 0;
	while (flock(token_lock_fd, how) != 0) {
		if (errno != EINTR) {
			pthread_mutex_unlock(&token_mutex);
			return -1;
		}
	}
	return 0;
}

static void token_release(void)
{
	if (token_lock_fd >= 0)
		flock(token_lock_fd, LOCK_UN);
	pthread_mutex_unlock(&token_mutex);
}

/* Forward a call under the shared (SH) or exclusive (EX) token lock; CKR_GENERAL_ERROR
 * when the lock cannot be taken (fail closed: never a call without it). */
#define FORWARD(how, fn, ...)                                        \
	({                                                           \
		CK_RV fwd_rv_ = CKR_GENERAL_ERROR;                   \
		if (token_hold(how) == 0) {                          \
			fwd_rv_ = real->fn(__VA_ARGS__);             \
			token_release();                             \
		}                                                    \
		fwd_rv_;                                             \
	})
#define SH(fn, ...) FORWARD(LOCK_SH, fn, __VA_ARGS__)
#define EX(fn, ...) FORWARD(LOCK_EX, fn, __VA_ARGS__)
static void *real_handle;
static enum role role;
static char client[CLIENT_CAP + 1];
static int events_fd = -1;
static struct session sessions[MAX_SESSIONS];
static size_t nsessions;

static pthread_mutex_t probe_lock = PTHREAD_MUTEX_INITIALIZER;
static CK_OBJECT_HANDLE probe_obj = CK_INVALID_HANDLE; /* see probe_secret_len */
static CK_BBOOL ck_true = CK_TRUE;
static CK_BBOOL ck_false = CK_FALSE;

static const char *role_name(void)
{
	switch (role) {
	case ROLE_OFFICER: return "crypto-officer";
	case ROLE_USER: return "crypto-user";
	default: return "none";
	}
}

/* ---- CKR names (the ones this layer returns or logs) ------------------------------ */

static const struct { CK_RV rv; const char *name; } rv_names[] = {
	{CKR_OK, "CKR_OK"},
	{CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"},
	{CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"},
	{CKR_ATTRIBUTE_READ_ONLY, "CKR_ATTRIBUTE_READ_ONLY"},
	{CKR_ATTRIBUTE_SENSITIVE, "CKR_ATTRIBUTE_SENSITIVE"},
	{CKR_ATTRIBUTE_TYPE_INVALID, "CKR_ATTRIBUTE_TYPE_INVALID"},
	{CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID"},
	{CKR_ACTION_PROHIBITED, "CKR_ACTION_PROHIBITED"},
	{CKR_DATA_INVALID, "CKR_DATA_INVALID"},
	{CKR_DATA_LEN_RANGE, "CKR_DATA_LEN_RANGE"},
	{CKR_FUNCTION_NOT_SUPPORTED, "CKR_FUNCTION_NOT_SUPPORTED"},
	{CKR_KEY_SIZE_RANGE, "CKR_KEY_SIZE_RANGE"},
	{CKR_KEY_UNEXTRACTABLE, "CKR_KEY_UNEXTRACTABLE"},
	{CKR_KEY_FUNCTION_NOT_PERMITTED, "CKR_KEY_FUNCTION_NOT_PERMITTED"},
	{CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"},
	{CKR_MECHANISM_PARAM_INVALID, "CKR_MECHANISM_PARAM_INVALID"},
	{CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"},
	{CKR_PIN_LOCKED, "CKR_PIN_LOCKED"},
	{CKR_SESSION_COUNT, "CKR_SESSION_COUNT"},
	{CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"},
	{CKR_TEMPLATE_INCOMPLETE, "CKR_TEMPLATE_INCOMPLETE"},
	{CKR_TEMPLATE_INCONSISTENT, "CKR_TEMPLATE_INCONSISTENT"},
	{CKR_USER_ALREADY_LOGGED_IN, "CKR_USER_ALREADY_LOGGED_IN"},
	{CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"},
	{CKR_USER_TYPE_INVALID, "CKR_USER_TYPE_INVALID"},
	{CKR_CURVE_NOT_SUPPORTED, "CKR_CURVE_NOT_SUPPORTED"},
};

static const char *rv_name(CK_RV rv, char *buf, size_t len)
{
	for (size_t i = 0; i < sizeof rv_names / sizeof rv_names[0]; i++)
		if (rv_names[i].rv == rv)
			return rv_names[i].name;
	snprintf(buf, len, "0x%lx", (unsigned long)rv);
	return buf;
}

/* ---- events: one JSON object per line, one write(2) each --------------------------- */

struct jbuf {
	char s[8192];
	size_t n;
	int overflow;
};

static void jb_put(struct jbuf *b, const char *p, size_t len)
{
	if (b->overflow || len >= sizeof b->s - b->n) {
		b->overflow = 1;
		return;
	}
	memcpy(b->s + b->n, p, len);
	b->n += len;
}

static void jb_raw(struct jbuf *b, const char *p) { jb_put(b, p, strlen(p)); }

/* Length of the valid UTF-8 sequence at p (0 if invalid), RFC 3629. */
static size_t utf8_len(const unsigned char *p, size_t left)
{
	unsigned char c = p[0];
	size_t need;
	unsigned char lo = 0x80, hi = 0xBF;
	if (c < 0x80) return 1;
	if (c >= 0xC2 && c <= 0xDF) need = 1;
	else if (c == 0xE0) { need = 2; lo = 0xA0; }
	else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) need = 2;
	else if (c == 0xED) { need = 2; hi = 0x9F; }
	else if (c == 0xF0) { need = 3; lo = 0x90; }
	else if (c >= 0xF1 && c <= 0xF3) need = 3;
	else if (c == 0xF4) { need = 3; hi = 0x8F; }
	else return 0;
	if (left < need + 1) return 0;
	if (p[1] < lo || p[1] > hi) return 0;
	for (size_t i = 2; i <= need; i++)
		if (p[i] < 0x80 || p[i] > 0xBF) return 0;
	return need + 1;
}

/* A JSON string from arbitrary bytes: valid UTF-8 kept, invalid bytes become U+FFFD. */
static void jb_string(struct jbuf *b, const unsigned char *p, size_t len)
{
	char esc[8];
	jb_put(b, "\"", 1);
	for (size_t i = 0; i < len;) {
		unsigned char c = p[i];
		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			jb_put(b, esc, 2);
			i++;
		} else if (c < 0x20 || c == 0x7F) {
			snprintf(esc, sizeof esc, "\\u%04x", c);
			jb_put(b, esc, 6);
			i++;
		} else {
			size_t l = utf8_len(p + i, len - i);
			if (l == 0) {
				jb_raw(b, "\\ufffd");
				i++;
			} else {
				jb_put(b, (const char *)p + i, l);
				i += l;
			}
		}
	}
	jb_put(b, "\"", 1);
}

static void jb_key(struct jbuf *b, const char *key)
{
	jb_put(b, ",", 1);
	jb_string(b, (const unsigned char *)key, strlen(key));
	jb_put(b, ":", 1);
}

static void jb_str(struct jbuf *b, const char *key, const char *v)
{
	jb_key(b, key);
	jb_string(b, (const unsigned char *)v, strlen(v));
}

static void jb_ulong(struct jbuf *b, const char *key, unsigned long v)
{
	char num[32];
	jb_key(b, key);
	snprintf(num, sizeof num, "%lu", v);
	jb_raw(b, num);
}

static void jb_hex(struct jbuf *b, const char *key, const unsigned char *p, size_t len)
{
	static const char digits[] = "0123456789abcdef";
	char pair[2];
	jb_key(b, key);
	jb_put(b, "\"", 1);
	for (size_t i = 0; i < len; i++) {
		pair[0] = digits[p[i] >> 4];
		pair[1] = digits[p[i] & 15];
		jb_put(b, pair, 2);
	}
	jb_put(b, "\"", 1);
}

static void jb_begin(struct jbuf *b, const char *event)
{
	struct timespec ts;
	struct tm tm;
	char when[40], ms[8];
	b->n = 0;
	b->overflow = 0;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	if (strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm) == 0)
		when[0] = 0;
	snprintf(ms, sizeof ms, ".%03uZ", (unsigned)(ts.tv_nsec / 1000000L) % 1000u);
	jb_raw(b, "{\"ts\":\"");
	jb_raw(b, when);
	jb_raw(b, ms);
	jb_raw(b, "\"");
	jb_str(b, "event", event);
	jb_str(b, "client", client);
	jb_str(b, "role", role_name());
	jb_ulong(b, "pid", (unsigned long)getpid());
}

/* Write the line; SIGPIPE is held off so a closed reader cannot kill the service. */
static void jb_emit(struct jbuf *b)
{
	sigset_t pipe_set, old;
	int broken = 0;
	const char *p = b->s;
	size_t left;
	if (events_fd < 0)
		return;
	jb_put(b, "}\n", 2);
	if (b->overflow)
		return;
	left = b->n;
	sigemptyset(&pipe_set);
	sigaddset(&pipe_set, SIGPIPE);
	pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
	while (left > 0) {
		ssize_t w = write(events_fd, p, left);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			broken = errno == EPIPE;
			break;
		}
		p += w;
		left -= (size_t)w;
	}
	if (broken) {
		struct timespec zero = {0, 0};
		sigtimedwait(&pipe_set, NULL, &zero);
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* ---- sessions and their operation counts ------------------------------------------ */

static struct session *sess_find(CK_SESSION_HANDLE h) /* lock held */
{
	for (size_t i = 0; i < nsessions; i++)
		if (sessions[i].handle == h)
			return &sessions[i];
	return NULL;
}

static void count_op(CK_SESSION_HANDLE h, enum op op)
{
	pthread_mutex_lock(&lock);
	struct session *s = sess_find(h);
	if (s)
		s->ops[op]++;
	pthread_mutex_unlock(&lock);
}

static void emit_close(const struct session *s, const char *why) /* lock held */
{
	struct jbuf b;
	jb_begin(&b, "session-close");
	jb_ulong(&b, "session", s->handle);
	jb_ulong(&b, "slot", s->slot);
	jb_str(&b, "reason", why);
	jb_key(&b, "ops");
	jb_raw(&b, "{");
	for (int i = 0; i < OP_COUNT; i++) {
		char item[64];
		snprintf(item, sizeof item, "%s\"%s\":%lu", i ? "," : "", op_names[i], s->ops[i]);
		jb_raw(&b, item);
	}
	jb_raw(&b, "}");
	jb_emit(&b);
}

static void sess_remove_at(size_t i) /* lock held */
{
	sessions[i] = sessions[nsessions - 1];
	nsessions--;
}

/* ---- refusals -------------------------------------------------------------------- */

/* The refusal event; DETAIL is written as a JSON number when NUMERIC. */
static CK_RV deny_event(CK_SESSION_HANDLE h, const char *fn, const char *rule, CK_RV rv,
			const char *detail_key, const char *detail, int numeric)
{
	struct jbuf b;
	char rvbuf[24];
	pthread_mutex_lock(&lock);
	struct session *s = sess_find(h);
	if (s)
		s->ops[OP_DENIED]++;
	jb_begin(&b, "denied");
	jb_str(&b, "rule", rule);
	jb_str(&b, "function", fn);
	if (h != CK_INVALID_HANDLE)
		jb_ulong(&b, "session", h);
	jb_str(&b, "rv", rv_name(rv, rvbuf, sizeof rvbuf));
	if (detail_key && detail && numeric) {
		jb_key(&b, detail_key);
		jb_raw(&b, detail);
	} else if (detail_key && detail) {
		jb_str(&b, detail_key, detail);
	}
	jb_emit(&b);
	pthread_mutex_unlock(&lock);
	return rv;
}

static CK_RV deny(CK_SESSION_HANDLE h, const char *fn, const char *rule, CK_RV rv,
		  const char *detail_key, const char *detail)
{
	return deny_event(h, fn, rule, rv, detail_key, detail, 0);
}

static CK_RV deny_num(CK_SESSION_HANDLE h, const char *fn, const char *rule, CK_RV rv,
		      const char *key, unsigned long v)
{
	char num[32];
	snprintf(num, sizeof num, "0x%lx", v);
	return deny(h, fn, rule, rv, key, num);
}

static CK_RV deny_dec(CK_SESSION_HANDLE h, const char *fn, const char *rule, CK_RV rv,
		      const char *key, unsigned long v)
{
	char num[32];
	snprintf(num, sizeof num, "%lu", v);
	return deny_event(h, fn, rule, rv, key, num, 1);
}

/* 1 when O is the unwrap probe (another thread cannot reach it; p11-kit remote has none). */
static int probe_guard(CK_SESSION_HANDLE h, const char *fn, CK_OBJECT_HANDLE o, CK_RV *rv)
{
	pthread_mutex_lock(&lock);
	int hit = o != CK_INVALID_HANDLE && o == probe_obj;
	pthread_mutex_unlock(&lock);
	if (hit)
		*rv = deny(h, fn, "extractable", CKR_KEY_HANDLE_INVALID, NULL, NULL);
	return hit;
}

/* A crypto-user uses keys; only a crypto-officer makes, changes or removes them. */
static int not_officer(CK_SESSION_HANDLE h, const char *fn, CK_RV *rv)
{
	if (role == ROLE_OFFICER)
		return 0;
	*rv = deny(h, fn, role == ROLE_USER ? "role-crypto-user" : "role-unknown",
		   CKR_ACTION_PROHIBITED, NULL, NULL);
	return 1;
}

/* ---- templates ------------------------------------------------------------------- */

/* An input template: bounded, no NULL value with a length, no attribute twice. */
static CK_RV tmpl_in(CK_SESSION_HANDLE h, const char *fn, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	if (n == 0)
		return CKR_OK;
	if (t == NULL)
		return deny(h, fn, "malformed", CKR_ARGUMENTS_BAD, "detail", "NULL template");
	if (n > MAX_ATTRS)
		return deny_dec(h, fn, "malformed", CKR_ARGUMENTS_BAD, "attributes", n);
	for (CK_ULONG i = 0; i < n; i++) {
		if (t[i].pValue == NULL && t[i].ulValueLen != 0)
			return deny_num(h, fn, "malformed", CKR_ARGUMENTS_BAD, "attribute", t[i].type);
		if (t[i].ulValueLen > MAX_VALUE_LEN)
			return deny_num(h, fn, "malformed", CKR_ARGUMENTS_BAD, "attribute", t[i].type);
		for (CK_ULONG j = 0; j < i; j++)
			if (t[j].type == t[i].type)
				return deny_num(h, fn, "malformed", CKR_TEMPLATE_INCONSISTENT,
						"attribute", t[i].type);
	}
	return CKR_OK;
}

/* An output template (C_GetAttributeValue): bounded; NULL values are size queries. */
static CK_RV tmpl_out(CK_SESSION_HANDLE h, const char *fn, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	if (n == 0)
		return CKR_OK;
	if (t == NULL)
		return deny(h, fn, "malformed", CKR_ARGUMENTS_BAD, "detail", "NULL template");
	if (n > MAX_ATTRS)
		return deny_dec(h, fn, "malformed", CKR_ARGUMENTS_BAD, "attributes", n);
	return CKR_OK;
}

static CK_ATTRIBUTE_PTR attr_find(CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_ATTRIBUTE_TYPE type)
{
	for (CK_ULONG i = 0; i < n; i++)
		if (t[i].type == type)
			return &t[i];
	return NULL;
}

/* 1 and *out set when A holds a well-formed CK_BBOOL / CK_ULONG. */
static int attr_bool(const CK_ATTRIBUTE *a, CK_BBOOL *out)
{
	if (a->pValue == NULL || a->ulValueLen != sizeof(CK_BBOOL))
		return 0;
	*out = *(const CK_BBOOL *)a->pValue ? CK_TRUE : CK_FALSE;
	return 1;
}

static int attr_ulong(const CK_ATTRIBUTE *a, CK_ULONG *out)
{
	if (a->pValue == NULL || a->ulValueLen != sizeof(CK_ULONG))
		return 0;
	memcpy(out, a->pValue, sizeof *out);
	return 1;
}

/* Key components never handed out and never taken in plaintext. */
static int is_secret_component(CK_ATTRIBUTE_TYPE type)
{
	switch (type) {
	case CKA_VALUE:
	case CKA_PRIVATE_EXPONENT:
	case CKA_PRIME_1:
	case CKA_PRIME_2:
	case CKA_EXPONENT_1:
	case CKA_EXPONENT_2:
	case CKA_COEFFICIENT:
		return 1;
	default:
		return 0;
	}
}

static int is_protected_class(CK_OBJECT_CLASS cls)
{
	return cls == CKO_PRIVATE_KEY || cls == CKO_SECRET_KEY || cls == CKO_OTP_KEY;
}

/* ---- curves ---------------------------------------------------------------------- */

static const struct { const char *name; unsigned char der[12]; size_t len; } curves[] = {
	{"P-256", {0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07}, 10},
	{"P-384", {0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22}, 7},
	{"P-521", {0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x23}, 7},
	{"secp256k1", {0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x0A}, 7},
};

static const char *curve_name(const unsigned char *der, size_t len)
{
	for (size_t i = 0; i < sizeof curves / sizeof curves[0]; i++)
		if (len == curves[i].len && memcmp(der, curves[i].der, len) == 0)
			return curves[i].name;
	return NULL;
}

static void hex_into(char *out, size_t cap, const unsigned char *p, size_t len)
{
	size_t o = 0;
	for (size_t i = 0; i < len && o + 3 <= cap; i++, o += 2)
		snprintf(out + o, 3, "%02x", p[i]);
	out[o < cap ? o : cap - 1] = 0;
}

/* ---- the fips key rules, on a template ------------------------------------------ */

static int aes_len_ok(CK_ULONG len) { return len == 16 || len == 24 || len == 32; }
static int key_type_ok(CK_KEY_TYPE kt) { return kt == CKK_RSA || kt == CKK_EC || kt == CKK_AES; }

/* Sizes, curves and key types named in a key template (any of the creating calls). */
static CK_RV check_key_template(CK_SESSION_HANDLE h, const char *fn, CK_ATTRIBUTE_PTR t,
				CK_ULONG n)
{
	CK_ATTRIBUTE_PTR a;
	CK_ULONG v;
	if ((a = attr_find(t, n, CKA_KEY_TYPE))) {
		if (!attr_ulong(a, &v))
			return deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute",
				    "CKA_KEY_TYPE");
		if (!key_type_ok(v))
			return deny_num(h, fn, "key-type", CKR_TEMPLATE_INCONSISTENT, "key_type", v);
	}
	if ((a = attr_find(t, n, CKA_MODULUS_BITS))) {
		if (!attr_ulong(a, &v))
			return deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute",
				    "CKA_MODULUS_BITS");
		if (v < 2048 || v > 8192)
			return deny_dec(h, fn, "rsa-size", CKR_KEY_SIZE_RANGE, "bits", v);
	}
	if ((a = attr_find(t, n, CKA_VALUE_LEN))) {
		if (!attr_ulong(a, &v))
			return deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute",
				    "CKA_VALUE_LEN");
		if (!aes_len_ok(v))
			return deny_dec(h, fn, "aes-size", CKR_KEY_SIZE_RANGE, "bits", v * 8);
	}
	if ((a = attr_find(t, n, CKA_EC_PARAMS))) {
		if (a->pValue == NULL || !curve_name(a->pValue, a->ulValueLen)) {
			char hex[2 * 16 + 1] = "";
			if (a->pValue)
				hex_into(hex, sizeof hex, a->pValue,
					 a->ulValueLen < 16 ? a->ulValueLen : 16);
			return deny(h, fn, "ec-curve", CKR_CURVE_NOT_SUPPORTED, "ec_params", hex);
		}
	}
	return CKR_OK;
}

/*
 * Copy a private/secret key template into OUT (room for n + 3) with CKA_SENSITIVE=true
 * and CKA_EXTRACTABLE=false; a template asking for anything else is refused. A CLONEABLE
 * key (made in a cloning domain, SPEC §12) gets CKA_EXTRACTABLE=true (whatever the
 * template said: the domain's policy, as on a Luna partition that allows cloning) and
 * CKA_WRAP_WITH_TRUSTED=true, so it leaves only under the trusted domain key; a template
 * asking CKA_WRAP_WITH_TRUSTED=false there is refused.
 */
static CK_RV force_protected(CK_SESSION_HANDLE h, const char *fn, CK_ATTRIBUTE_PTR t,
			     CK_ULONG n, CK_ATTRIBUTE *out, CK_ULONG *outn, int cloneable)
{
	CK_ATTRIBUTE_PTR a;
	CK_BBOOL v;
	CK_ULONG k = 0;
	for (CK_ULONG i = 0; i < n; i++)
		out[k++] = t[i];
	if ((a = attr_find(t, n, CKA_SENSITIVE))) {
		if (!attr_bool(a, &v))
			return deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute",
				    "CKA_SENSITIVE");
		if (!v)
			return deny(h, fn, "sensitive", CKR_TEMPLATE_INCONSISTENT, NULL, NULL);
	} else {
		out[k++] = (CK_ATTRIBUTE){CKA_SENSITIVE, &ck_true, sizeof ck_true};
	}
	if ((a = attr_find(t, n, CKA_EXTRACTABLE))) {
		if (!attr_bool(a, &v))
			return deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute",
				    "CKA_EXTRACTABLE");
		if (v && !cloneable)
			return deny(h, fn, "extractable", CKR_TEMPLATE_INCONSISTENT, NULL, NULL);
		if (cloneable)
			out[a - t].pValue = &ck_true;
	} else {
		out[k++] = (CK_ATTRIBUTE){CKA_EXTRACTABLE, cloneable ? &ck_true : &ck_false,
					  sizeof ck_false};
	}
	if (cloneable) {
		if ((a = attr_find(t, n, CKA_WRAP_WITH_TRUSTED))) {
			if (!attr_bool(a, &v))
				return deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID,
					    "attribute", "CKA_WRAP_WITH_TRUSTED");
			if (!v)
				return deny(h, fn, "extractable", CKR_TEMPLATE_INCONSISTENT,
					    "attribute", "CKA_WRAP_WITH_TRUSTED");
		} else {
			out[k++] = (CK_ATTRIBUTE){CKA_WRAP_WITH_TRUSTED, &ck_true, sizeof ck_true};
		}
	}
	*outn = k;
	return CKR_OK;
}

/* ---- the fips key rules, on an object --------------------------------------------- */

struct keyinfo {
	CK_OBJECT_CLASS cls;
	CK_KEY_TYPE kt;
	int have_cls, have_kt, have_sens, have_ext, have_bits;
	unsigned long bits;
	const char *curve;
	unsigned char ec_params[16];
	CK_ULONG ec_params_len;
	CK_BBOOL sensitive, extractable;
	int have_wwt, have_trusted;
	CK_BBOOL wwt, trusted; /* CKA_WRAP_WITH_TRUSTED, CKA_TRUSTED */
	unsigned char label[LABEL_CAP];
	CK_ULONG label_len;
	unsigned char id[ID_CAP];
	CK_ULONG id_len;
};

static int get_fixed(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE type,
		     void *buf, CK_ULONG len)
{
	CK_ATTRIBUTE a = {type, buf, len};
	return SH(C_GetAttributeValue, h, o, &a, 1) == CKR_OK && a.ulValueLen == len;
}

/* A variable-length attribute, at most CAP bytes kept; returns its full length or -1. */
static long get_var(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE type,
		    unsigned char *buf, CK_ULONG cap, CK_ULONG *kept)
{
	CK_ATTRIBUTE a = {type, NULL, 0};
	*kept = 0;
	if (SH(C_GetAttributeValue, h, o, &a, 1) != CKR_OK ||
	    a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > MAX_VALUE_LEN)
		return -1;
	CK_ULONG full = a.ulValueLen;
	if (full == 0)
		return 0;
	unsigned char *tmp = malloc(full);
	if (!tmp)
		return -1;
	a.pValue = tmp;
	if (SH(C_GetAttributeValue, h, o, &a, 1) != CKR_OK || a.ulValueLen != full) {
		free(tmp);
		return -1;
	}
	*kept = full < cap ? full : cap;
	memcpy(buf, tmp, *kept);
	free(tmp);
	return (long)full;
}

static unsigned long modulus_bits(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o)
{
	unsigned char top[1];
	CK_ULONG kept;
	CK_ULONG bits;
	if (get_fixed(h, o, CKA_MODULUS_BITS, &bits, sizeof bits))
		return bits;
	long len = get_var(h, o, CKA_MODULUS, top, sizeof top, &kept);
	if (len <= 0 || kept == 0)
		return 0;
	unsigned long b = (unsigned long)len * 8;
	for (unsigned char c = top[0]; c < 0x80 && b > 0; c = (unsigned char)(c << 1))
		b--;
	return b;
}

static void describe(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, struct keyinfo *ki)
{
	memset(ki, 0, sizeof *ki);
	ki->have_cls = get_fixed(h, o, CKA_CLASS, &ki->cls, sizeof ki->cls);
	ki->have_kt = get_fixed(h, o, CKA_KEY_TYPE, &ki->kt, sizeof ki->kt);
	ki->have_sens = get_fixed(h, o, CKA_SENSITIVE, &ki->sensitive, sizeof ki->sensitive);
	ki->have_ext = get_fixed(h, o, CKA_EXTRACTABLE, &ki->extractable, sizeof ki->extractable);
	ki->have_wwt = get_fixed(h, o, CKA_WRAP_WITH_TRUSTED, &ki->wwt, sizeof ki->wwt);
	ki->have_trusted = get_fixed(h, o, CKA_TRUSTED, &ki->trusted, sizeof ki->trusted);
	get_var(h, o, CKA_LABEL, ki->label, sizeof ki->label, &ki->label_len);
	get_var(h, o, CKA_ID, ki->id, sizeof ki->id, &ki->id_len);
	if (!ki->have_kt)
		return;
	if (ki->kt == CKK_RSA) {
		ki->bits = modulus_bits(h, o);
		ki->have_bits = ki->bits != 0;
	} else if (ki->kt == CKK_EC) {
		if (get_var(h, o, CKA_EC_PARAMS, ki->ec_params, sizeof ki->ec_params,
			    &ki->ec_params_len) > 0)
			ki->curve = curve_name(ki->ec_params, ki->ec_params_len);
	} else if (ki->kt == CKK_AES) {
		CK_ULONG len;
		if (get_fixed(h, o, CKA_VALUE_LEN, &len, sizeof len)) {
			ki->bits = len * 8;
			ki->have_bits = 1;
		}
	}
}

static const char *key_type_name(CK_KEY_TYPE kt)
{
	switch (kt) {
	case CKK_RSA: return "rsa";
	case CKK_EC: return "ec";
	case CKK_AES: return "aes";
	default: return NULL;
	}
}

/* The rule a key object breaks (NULL: none); RV gets the code to return. */
static const char *key_verdict(const struct keyinfo *ki, CK_RV *rv)
{
	if (!ki->have_cls) {
		*rv = CKR_GENERAL_ERROR;
		return "key-type";
	}
	if (ki->cls != CKO_PRIVATE_KEY && ki->cls != CKO_SECRET_KEY && ki->cls != CKO_PUBLIC_KEY) {
		if (ki->cls == CKO_OTP_KEY) {
			*rv = CKR_TEMPLATE_INCONSISTENT;
			return "key-type";
		}
		return NULL;
	}
	*rv = CKR_TEMPLATE_INCONSISTENT;
	if (!ki->have_kt || !key_type_ok(ki->kt) ||
	    (ki->kt == CKK_AES) != (ki->cls == CKO_SECRET_KEY))
		return "key-type";
	if (ki->kt == CKK_RSA && (!ki->have_bits || ki->bits < 2048 || ki->bits > 8192)) {
		*rv = CKR_KEY_SIZE_RANGE;
		return "rsa-size";
	}
	if (ki->kt == CKK_EC && !ki->curve) {
		*rv = CKR_CURVE_NOT_SUPPORTED;
		return "ec-curve";
	}
	if (ki->kt == CKK_AES && (!ki->have_bits || !aes_len_ok(ki->bits / 8))) {
		*rv = CKR_KEY_SIZE_RANGE;
		return "aes-size";
	}
	if (ki->cls == CKO_PUBLIC_KEY)
		return NULL;
	if (ki->have_trusted && ki->trusted)
		return "domain-key"; /* only the SO makes one, in hsmsh: never a client */
	if (!ki->have_sens || !ki->sensitive)
		return "sensitive";
	/* Extractable only when cloneable: wrapped by a trusted (domain) key alone. */
	if (!ki->have_ext || (ki->extractable && !(ki->have_wwt && ki->wwt)))
		return "extractable";
	return NULL;
}

/* Judge a freshly made object; on a breach destroy it and refuse. */
static CK_RV post_check_sized(CK_SESSION_HANDLE h, const char *fn, CK_OBJECT_HANDLE o,
			      struct keyinfo *ki, unsigned long secret_bits)
{
	CK_RV rv = CKR_OK;
	describe(h, o, ki);
	if (secret_bits && ki->cls == CKO_SECRET_KEY && (!ki->have_bits || ki->bits == 0)) {
		ki->bits = secret_bits;
		ki->have_bits = 1;
	}
	const char *rule = key_verdict(ki, &rv);
	if (!rule)
		return CKR_OK;
	SH(C_DestroyObject, h, o);
	return deny(h, fn, rule, rv, "detail", "object read back");
}

static CK_RV post_check(CK_SESSION_HANDLE h, const char *fn, CK_OBJECT_HANDLE o,
			struct keyinfo *ki)
{
	return post_check_sized(h, fn, o, ki, 0);
}

/* ---- the cloning domain (SPEC §12) ------------------------------------------------ */

/* The domain key: a secret key with CKA_TRUSTED=true (SoftHSM lets only the SO set it;
 * hsmsh's `hsm domain set` makes it, and SO login is refused on this path). */
static int is_domain_key(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o)
{
	CK_OBJECT_CLASS cls;
	CK_BBOOL trusted;
	return get_fixed(h, o, CKA_CLASS, &cls, sizeof cls) && cls == CKO_SECRET_KEY &&
	       get_fixed(h, o, CKA_TRUSTED, &trusted, sizeof trusted) && trusted;
}

/* 1 when the key may leave under the domain key (CKA_WRAP_WITH_TRUSTED=true). */
static int is_cloneable(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o)
{
	CK_BBOOL wwt;
	return get_fixed(h, o, CKA_WRAP_WITH_TRUSTED, &wwt, sizeof wwt) && wwt;
}

/* Whether the token is in a cloning domain: a search in a session of our own, so the
 * caller's search (if one is active) is not disturbed. Any failure: no domain (keys
 * made then stay unextractable, the safe side). */
static int domain_present(CK_SESSION_HANDLE h)
{
	CK_SESSION_INFO info;
	CK_SESSION_HANDLE own;
	CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
	CK_ATTRIBUTE q[2] = {
		{CKA_CLASS, &cls, sizeof cls},
		{CKA_TRUSTED, &ck_true, sizeof ck_true},
	};
	CK_OBJECT_HANDLE o;
	CK_ULONG found = 0;
	if (SH(C_GetSessionInfo, h, &info) != CKR_OK)
		return 0;
	if (SH(C_OpenSession, info.slotID, CKF_SERIAL_SESSION, NULL, NULL, &own) != CKR_OK)
		return 0;
	if (SH(C_FindObjectsInit, own, q, 2) == CKR_OK) {
		if (SH(C_FindObjects, own, &o, 1, &found) != CKR_OK)
			found = 0;
		SH(C_FindObjectsFinal, own);
	}
	SH(C_CloseSession, own);
	return found > 0;
}

/* Refuse any use of the domain key but wrapping and unwrapping cloneable keys. */
static int domain_guard(CK_SESSION_HANDLE h, const char *fn, CK_OBJECT_HANDLE k, CK_RV code,
			CK_RV *rv)
{
	if (k == CK_INVALID_HANDLE || !is_domain_key(h, k))
		return 0;
	*rv = deny(h, fn, "domain-key", code, "detail", "the cloning domain's key");
	return 1;
}

static int domain_mech_ok(CK_MECHANISM_TYPE m)
{
	return m == CKM_AES_KEY_WRAP_PAD || m == CKM_AES_KEY_WRAP;
}

/*
 * p11-kit 0.24.1's RPC carries neither CKM_AES_KEY_WRAP nor CKM_AES_KEY_WRAP_PAD (its
 * client refuses them before sending). Remote clients send CKM_KEY_WRAP_LYNKS without
 * parameters (carried; not a SoftHSM mechanism) and mean AES key wrap with padding
 * (RFC 5649): C_WrapKey reads it so here (C_UnwrapKey does the same, see there).
 */
static CK_MECHANISM_PTR wire_kwp(CK_MECHANISM_PTR m, CK_MECHANISM *kwp)
{
	if (m && m->mechanism == CKM_KEY_WRAP_LYNKS && m->pParameter == NULL &&
	    m->ulParameterLen == 0) {
		*kwp = (CK_MECHANISM){CKM_AES_KEY_WRAP_PAD, NULL, 0};
		return kwp;
	}
	return m;
}

/* ---- BYOK wrapping keys (SPEC §12) ------------------------------------------------- */
/*
 * SoftHSM 2.6.1 refuses every RSA-OAEP hash but SHA-1 (MechParamCheckRSAPKCSOAEP), and
 * SPEC §12 asks for RSA-OAEP-SHA256. So `hsmctl key wrapping-key` makes an RSA pair whose
 * private half is *marked*: CKA_ALLOWED_MECHANISMS={CKM_RSA_X_509} and CKA_DECRYPT=true
 * (SoftHSM enforces both in C_DecryptInit: isMechanismPermitted and the CKA_DECRYPT check),
 * and C_UnwrapKey(CKM_RSA_PKCS_OAEP) with such a key is done here (byok_unwrap): the raw
 * RSA decrypt inside SoftHSM in a session of this layer's own, OpenSSL's constant-time OAEP
 * decoding with SHA-256/MGF1-SHA-256 or SHA-1/MGF1-SHA-1, and the AES key it holds made in
 * SoftHSM as a session object with the caller's template after the usual rules, good for
 * AES key wrap only (no encrypt/decrypt: the client cannot run RFC 5649 itself). Clients
 * never see raw RSA (check_mech refuses CKM_RSA_X_509 everywhere) and may use a marked key
 * for nothing else (byok_guard: every *Init, digest, derive, wrap, copy, attribute change).
 * Only a crypto-officer's C_GenerateKeyPair in the wrapping-key shape makes a marked key
 * (byok_shape); every other template naming CKM_RSA_X_509 in CKA_ALLOWED_MECHANISMS is
 * refused. A marked key is never cloneable (a copy restored under the domain key would
 * lose the mark and keep CKA_DECRYPT), not modifiable and not copyable. Wrapping keys made
 * before the mark keep SoftHSM's own OAEP (SHA-1) path.
 */

/* 1 when the attribute (a CK_MECHANISM_TYPE array) names CKM_RSA_X_509, 0 when it does
 * not, -1 when it is not a well-formed array. */
static int names_raw_rsa(const CK_ATTRIBUTE *a)
{
	CK_MECHANISM_TYPE m;
	if (a->ulValueLen % sizeof m != 0 || (a->ulValueLen && a->pValue == NULL))
		return -1;
	for (CK_ULONG i = 0; i < a->ulValueLen / sizeof m; i++) {
		memcpy(&m, (const unsigned char *)a->pValue + i * sizeof m, sizeof m);
		if (m == CKM_RSA_X_509)
			return 1;
	}
	return 0;
}

/* Refuse a template that would mark a key (or is malformed there); 0 when it does not. */
static int marks_key(CK_SESSION_HANDLE h, const char *fn, CK_ATTRIBUTE_PTR t, CK_ULONG n,
		     CK_RV *rv)
{
	CK_ATTRIBUTE_PTR a = attr_find(t, n, CKA_ALLOWED_MECHANISMS);
	int named = a ? names_raw_rsa(a) : 0;
	if (named < 0)
		*rv = deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute",
			   "CKA_ALLOWED_MECHANISMS");
	else if (named > 0)
		*rv = deny(h, fn, "wrapping-key", CKR_TEMPLATE_INCONSISTENT, "detail",
			   "CKM_RSA_X_509 in CKA_ALLOWED_MECHANISMS: BYOK wrapping keys only");
	return named != 0;
}

/* Whether O is a marked private key. One call for the common case (class and a short
 * list); a longer list is read whole. Any failure: not marked (SoftHSM still enforces the
 * key's CKA_ALLOWED_MECHANISMS, and this layer refuses CKM_RSA_X_509 to every client). */
static int is_byok_key(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o)
{
	CK_OBJECT_CLASS cls = CKO_DATA;
	CK_MECHANISM_TYPE few[8];
	CK_ATTRIBUTE q[2] = {
		{CKA_CLASS, &cls, sizeof cls},
		{CKA_ALLOWED_MECHANISMS, few, sizeof few},
	};
	CK_RV rv = SH(C_GetAttributeValue, h, o, q, 2);
	if (q[0].ulValueLen != sizeof cls || cls != CKO_PRIVATE_KEY)
		return 0;
	if (rv == CKR_OK)
		return names_raw_rsa(&q[1]) == 1;
	if (rv != CKR_BUFFER_TOO_SMALL)
		return 0;
	CK_ATTRIBUTE a = {CKA_ALLOWED_MECHANISMS, NULL, 0};
	if (SH(C_GetAttributeValue, h, o, &a, 1) != CKR_OK || a.ulValueLen == 0 ||
	    a.ulValueLen > MAX_VALUE_LEN)
		return 0;
	int marked = 0;
	a.pValue = malloc(a.ulValueLen);
	if (a.pValue && SH(C_GetAttributeValue, h, o, &a, 1) == CKR_OK)
		marked = names_raw_rsa(&a) == 1;
	free(a.pValue);
	return marked;
}

/* Refuse any use of a marked key but the OAEP unwrap (byok_unwrap). */
static int byok_guard(CK_SESSION_HANDLE h, const char *fn, CK_OBJECT_HANDLE k, CK_RV code,
		      CK_RV *rv)
{
	if (k == CK_INVALID_HANDLE || !is_byok_key(h, k))
		return 0;
	*rv = deny(h, fn, "wrapping-key", code, "detail", "a BYOK wrapping key only unwraps");
	return 1;
}

static void emit_key(CK_SESSION_HANDLE h, const char *event, const char *fn,
		     const char *cls, const struct keyinfo *ki)
{
	struct jbuf b;
	const char *ktn = key_type_name(ki->kt);
	pthread_mutex_lock(&lock);
	jb_begin(&b, event);
	jb_str(&b, "function", fn);
	jb_ulong(&b, "session", h);
	jb_str(&b, "class", cls);
	jb_key(&b, "label");
	jb_string(&b, ki->label, ki->label_len);
	jb_hex(&b, "id", ki->id, ki->id_len);
	if (ki->have_kt) {
		if (ktn)
			jb_str(&b, "key_type", ktn);
		else
			jb_ulong(&b, "key_type", ki->kt);
	}
	if (ki->have_bits)
		jb_ulong(&b, "bits", ki->bits);
	if (ki->curve)
		jb_str(&b, "curve", ki->curve);
	jb_emit(&b);
	pthread_mutex_unlock(&lock);
}

static const char *class_name(CK_OBJECT_CLASS cls)
{
	switch (cls) {
	case CKO_PRIVATE_KEY: return "private-key";
	case CKO_SECRET_KEY: return "secret-key";
	case CKO_PUBLIC_KEY: return "public-key";
	case CKO_OTP_KEY: return "otp-key";
	case CKO_CERTIFICATE: return "certificate";
	case CKO_DATA: return "data";
	default: return "other";
	}
}

/* ---- mechanisms ------------------------------------------------------------------ */

static int is_md5(CK_MECHANISM_TYPE m)
{
	switch (m) {
	case CKM_MD2: case CKM_MD2_HMAC: case CKM_MD2_HMAC_GENERAL: case CKM_MD2_RSA_PKCS:
	case CKM_MD2_KEY_DERIVATION:
	case CKM_MD5: case CKM_MD5_HMAC: case CKM_MD5_HMAC_GENERAL: case CKM_MD5_RSA_PKCS:
	case CKM_MD5_KEY_DERIVATION: case CKM_SSL3_MD5_MAC:
	case CKM_PBE_MD2_DES_CBC: case CKM_PBE_MD5_DES_CBC: case CKM_PBE_MD5_CAST_CBC:
	case CKM_PBE_MD5_CAST3_CBC: case CKM_PBE_MD5_CAST5_CBC:
		return 1;
	default:
		return 0;
	}
}

static int is_sha1_sign(CK_MECHANISM_TYPE m)
{
	switch (m) {
	case CKM_SHA1_RSA_PKCS: case CKM_SHA1_RSA_PKCS_PSS: case CKM_SHA1_RSA_X9_31:
	case CKM_ECDSA_SHA1: case CKM_DSA_SHA1: case CKM_SHA_1_HMAC:
	case CKM_SHA_1_HMAC_GENERAL: case CKM_SSL3_SHA1_MAC:
		return 1;
	default:
		return 0;
	}
}

static int mech_hidden(CK_MECHANISM_TYPE m)
{
	return is_md5(m) || is_sha1_sign(m) || m == CKM_RSA_X_509;
}

/* SIGNING: the mechanism makes or checks a signature (or MAC). */
static CK_RV check_mech(CK_SESSION_HANDLE h, const char *fn, CK_MECHANISM_PTR mech,
			int signing)
{
	if (mech == NULL)
		return deny(h, fn, "malformed", CKR_ARGUMENTS_BAD, "detail", "NULL mechanism");
	if (mech->pParameter == NULL && mech->ulParameterLen != 0)
		return deny(h, fn, "malformed", CKR_ARGUMENTS_BAD, "detail", "NULL parameter");
	if (mech->ulParameterLen > MAX_VALUE_LEN)
		return deny(h, fn, "malformed", CKR_ARGUMENTS_BAD, "detail", "parameter length");
	if (is_md5(mech->mechanism))
		return deny_num(h, fn, "mechanism-md5", CKR_MECHANISM_INVALID, "mechanism",
				mech->mechanism);
	if (mech->mechanism == CKM_RSA_X_509)
		return deny_num(h, fn, "mechanism-raw-rsa", CKR_MECHANISM_INVALID, "mechanism",
				mech->mechanism);
	if (!signing)
		return CKR_OK;
	if (is_sha1_sign(mech->mechanism))
		return deny_num(h, fn, "mechanism-sha1-sign", CKR_MECHANISM_INVALID, "mechanism",
				mech->mechanism);
	if (mech->mechanism == CKM_RSA_PKCS_PSS && mech->pParameter &&
	    mech->ulParameterLen == sizeof(CK_RSA_PKCS_PSS_PARAMS)) {
		CK_RSA_PKCS_PSS_PARAMS pss;
		memcpy(&pss, mech->pParameter, sizeof pss);
		if (pss.hashAlg == CKM_SHA_1 || pss.mgf == CKG_MGF1_SHA1)
			return deny_num(h, fn, "mechanism-sha1-sign", CKR_MECHANISM_INVALID,
					"mechanism", mech->mechanism);
	}
	return CKR_OK;
}

/*
 * Raw signature mechanisms sign what the caller hashed: refuse an MD5/SHA-1 DigestInfo
 * (CKM_RSA_PKCS) and digests shorter than SHA-224 (CKM_ECDSA, CKM_RSA_PKCS). NULL: ok.
 */
static const char *raw_sign_rule(CK_MECHANISM_TYPE m, const unsigned char *data, CK_ULONG len)
{
	static const unsigned char sha1_oid[] = {0x06, 0x05, 0x2B, 0x0E, 0x03, 0x02, 0x1A};
	static const unsigned char md_oid[] = {0x06, 0x08, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x02};
	if (m == CKM_ECDSA || m == CKM_DSA)
		return len < 28 ? "mechanism-sha1-sign" : NULL;
	if (m != CKM_RSA_PKCS)
		return NULL;
	if (len == 16 || len == 20 || len == 36)
		return len == 20 ? "mechanism-sha1-sign" : "mechanism-md5";
	for (CK_ULONG i = 0; i + sizeof sha1_oid <= len && i < 8; i++) {
		if (memcmp(data + i, sha1_oid, sizeof sha1_oid) == 0)
			return "mechanism-sha1-sign";
		if (i + sizeof md_oid <= len && memcmp(data + i, md_oid, sizeof md_oid) == 0)
			return "mechanism-md5";
	}
	return NULL;
}

/* ---- the module: setup ----------------------------------------------------------- */

static CK_FUNCTION_LIST function_list;

static void read_config(void)
{
	const char *r = getenv("HSM_P11_ROLE");
	const char *c = getenv("HSM_P11_CLIENT");
	const char *fd = getenv("HSM_P11_EVENTS_FD");
	role = ROLE_NONE;
	if (r && strcmp(r, "crypto-officer") == 0)
		role = ROLE_OFFICER;
	else if (r && strcmp(r, "crypto-user") == 0)
		role = ROLE_USER;
	snprintf(client, sizeof client, "%s", c ? c : "");
	events_fd = -1;
	if (fd && *fd) {
		char *end;
		errno = 0;
		long v = strtol(fd, &end, 10);
		if (errno == 0 && *end == 0 && v >= 0 && v <= INT_MAX && fcntl((int)v, F_GETFD) != -1)
			events_fd = (int)v;
	}
}

static CK_RV load_real(void)
{
	CK_C_GetFunctionList get;
	CK_FUNCTION_LIST_PTR list = NULL;
	const char *path = getenv("HSM_P11_MODULE");
	if (real)
		return CKR_OK;
	if (!path || !*path)
		path = DEFAULT_MODULE;
	real_handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!real_handle)
		return CKR_GENERAL_ERROR;
	*(void **)&get = dlsym(real_handle, "C_GetFunctionList");
	if (!get || get(&list) != CKR_OK || !list || list == &function_list) {
		dlclose(real_handle);
		real_handle = NULL;
		return CKR_GENERAL_ERROR;
	}
	real = list;
	return CKR_OK;
}

#define NEED_REAL()                                  \
	do {                                         \
		if (!real)                           \
			return CKR_CRYPTOKI_NOT_INITIALIZED; \
	} while (0)

static CK_RV w_Initialize(CK_VOID_PTR args)
{
	CK_RV rv;
	pthread_mutex_lock(&lock);
	read_config();
	rv = open_token_lock();
	if (rv == CKR_OK)
		rv = load_real();
	pthread_mutex_unlock(&lock);
	if (rv != CKR_OK)
		return rv;
	return SH(C_Initialize, args);
}

static CK_RV w_Finalize(CK_VOID_PTR reserved_arg)
{
	NEED_REAL();
	CK_RV rv = SH(C_Finalize, reserved_arg);
	if (rv == CKR_OK) {
		pthread_mutex_lock(&lock);
		for (size_t i = 0; i < nsessions; i++)
			emit_close(&sessions[i], "finalize");
		nsessions = 0;
		pthread_mutex_unlock(&lock);
	}
	return rv;
}

static CK_RV w_GetInfo(CK_INFO_PTR info)
{
	NEED_REAL();
	return SH(C_GetInfo, info);
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out)
{
	if (!out)
		return CKR_ARGUMENTS_BAD;
	*out = &function_list;
	return CKR_OK;
}

static CK_RV w_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR n)
{
	NEED_REAL();
	return SH(C_GetSlotList, present, list, n);
}

static CK_RV w_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
	NEED_REAL();
	return SH(C_GetSlotInfo, slot, info);
}

static CK_RV w_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
	NEED_REAL();
	return SH(C_GetTokenInfo, slot, info);
}

/* Mechanisms the policy refuses in every use are not advertised. */
static CK_RV w_GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR n)
{
	CK_ULONG all = 0, k = 0;
	CK_RV rv;
	NEED_REAL();
	if (!n)
		return CKR_ARGUMENTS_BAD;
	rv = SH(C_GetMechanismList, slot, NULL, &all);
	if (rv != CKR_OK)
		return rv;
	if (all > MAX_MECHS)
		return CKR_GENERAL_ERROR;
	CK_MECHANISM_TYPE *tmp = calloc(all ? all : 1, sizeof *tmp);
	if (!tmp)
		return CKR_HOST_MEMORY;
	rv = SH(C_GetMechanismList, slot, tmp, &all);
	if (rv == CKR_OK) {
		for (CK_ULONG i = 0; i < all; i++)
			if (!mech_hidden(tmp[i]))
				tmp[k++] = tmp[i];
		if (list && *n < k)
			rv = CKR_BUFFER_TOO_SMALL;
		else if (list)
			memcpy(list, tmp, k * sizeof *tmp);
		*n = k;
	}
	free(tmp);
	return rv;
}

static CK_RV w_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info)
{
	NEED_REAL();
	if (mech_hidden(type))
		return CKR_MECHANISM_INVALID;
	return SH(C_GetMechanismInfo, slot, type, info);
}

/* ---- token and PIN management stay in hsmsh --------------------------------------- */

static CK_RV w_InitToken(CK_SLOT_ID slot, CK_UTF8CHAR_PTR pin, CK_ULONG len, CK_UTF8CHAR_PTR label)
{
	(void)slot; (void)pin; (void)len; (void)label;
	NEED_REAL();
	return deny(CK_INVALID_HANDLE, "C_InitToken", "token-management", CKR_ACTION_PROHIBITED,
		    NULL, NULL);
}

static CK_RV w_InitPIN(CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
	(void)pin; (void)len;
	NEED_REAL();
	return deny(h, "C_InitPIN", "token-management", CKR_ACTION_PROHIBITED, NULL, NULL);
}

static CK_RV w_SetPIN(CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR o, CK_ULONG ol, CK_UTF8CHAR_PTR nw,
		      CK_ULONG nl)
{
	(void)o; (void)ol; (void)nw; (void)nl;
	NEED_REAL();
	return deny(h, "C_SetPIN", "token-management", CKR_ACTION_PROHIBITED, NULL, NULL);
}

/* ---- sessions and login ---------------------------------------------------------- */

static CK_RV w_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
			   CK_SESSION_HANDLE_PTR out)
{
	CK_RV rv;
	NEED_REAL();
	if (role == ROLE_NONE)
		return deny(CK_INVALID_HANDLE, "C_OpenSession", "role-unknown",
			    CKR_ACTION_PROHIBITED, NULL, NULL);
	if (!out)
		return CKR_ARGUMENTS_BAD;
	rv = SH(C_OpenSession, slot, flags, app, notify, out);
	if (rv != CKR_OK)
		return rv;
	pthread_mutex_lock(&lock);
	if (nsessions == MAX_SESSIONS) {
		pthread_mutex_unlock(&lock);
		SH(C_CloseSession, *out);
		*out = CK_INVALID_HANDLE;
		return CKR_SESSION_COUNT;
	}
	struct session *s = &sessions[nsessions++];
	memset(s, 0, sizeof *s);
	s->handle = *out;
	s->slot = slot;
	struct jbuf b;
	jb_begin(&b, "session-open");
	jb_ulong(&b, "session", *out);
	jb_ulong(&b, "slot", slot);
	jb_str(&b, "mode", (flags & CKF_RW_SESSION) ? "rw" : "ro");
	jb_emit(&b);
	pthread_mutex_unlock(&lock);
	return CKR_OK;
}

static CK_RV w_CloseSession(CK_SESSION_HANDLE h)
{
	NEED_REAL();
	CK_RV rv = SH(C_CloseSession, h);
	if (rv != CKR_OK)
		return rv;
	pthread_mutex_lock(&lock);
	for (size_t i = 0; i < nsessions; i++) {
		if (sessions[i].handle == h) {
			emit_close(&sessions[i], "closed");
			sess_remove_at(i);
			break;
		}
	}
	pthread_mutex_unlock(&lock);
	return rv;
}

static CK_RV w_CloseAllSessions(CK_SLOT_ID slot)
{
	NEED_REAL();
	CK_RV rv = SH(C_CloseAllSessions, slot);
	if (rv != CKR_OK)
		return rv;
	pthread_mutex_lock(&lock);
	for (size_t i = 0; i < nsessions;) {
		if (sessions[i].slot == slot) {
			emit_close(&sessions[i], "closed");
			sess_remove_at(i);
		} else {
			i++;
		}
	}
	pthread_mutex_unlock(&lock);
	return rv;
}

static CK_RV w_GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR info)
{
	NEED_REAL();
	return SH(C_GetSessionInfo, h, info);
}

/* An operation state is opaque key-bearing bytes: neither handed out nor taken in. */
static CK_RV w_GetOperationState(CK_SESSION_HANDLE h, CK_BYTE_PTR st, CK_ULONG_PTR len)
{
	(void)st; (void)len;
	NEED_REAL();
	return deny(h, "C_GetOperationState", "operation-state", CKR_FUNCTION_NOT_SUPPORTED,
		    NULL, NULL);
}

static CK_RV w_SetOperationState(CK_SESSION_HANDLE h, CK_BYTE_PTR st, CK_ULONG len,
				 CK_OBJECT_HANDLE ek, CK_OBJECT_HANDLE ak)
{
	(void)st; (void)len; (void)ek; (void)ak;
	NEED_REAL();
	return deny(h, "C_SetOperationState", "operation-state", CKR_FUNCTION_NOT_SUPPORTED,
		    NULL, NULL);
}

static CK_RV w_Login(CK_SESSION_HANDLE h, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
	struct jbuf b;
	char rvbuf[24];
	NEED_REAL();
	if (role == ROLE_NONE)
		return deny(h, "C_Login", "role-unknown", CKR_ACTION_PROHIBITED, NULL, NULL);
	if (user != CKU_USER && user != CKU_CONTEXT_SPECIFIC)
		return deny_num(h, "C_Login", "so-login", CKR_USER_TYPE_INVALID, "user_type", user);
	CK_RV rv = EX(C_Login, h, user, pin, len);
	pthread_mutex_lock(&lock);
	jb_begin(&b, "login");
	jb_ulong(&b, "session", h);
	jb_str(&b, "user_type", user == CKU_USER ? "user" : "context-specific");
	jb_str(&b, "rv", rv_name(rv, rvbuf, sizeof rvbuf));
	jb_emit(&b);
	pthread_mutex_unlock(&lock);
	return rv;
}

static CK_RV w_Logout(CK_SESSION_HANDLE h)
{
	NEED_REAL();
	return SH(C_Logout, h);
}

/* ---- objects --------------------------------------------------------------------- */

/* Public keys, certificates and data objects may be created; key material may not. */
static CK_RV w_CreateObject(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n,
			    CK_OBJECT_HANDLE_PTR out)
{
	static const char fn[] = "C_CreateObject";
	CK_RV rv;
	CK_ATTRIBUTE_PTR a;
	CK_ULONG cls = CKO_DATA;
	struct keyinfo ki;
	NEED_REAL();
	if (not_officer(h, fn, &rv))
		return rv;
	if ((rv = tmpl_in(h, fn, t, n)) != CKR_OK)
		return rv;
	if ((a = attr_find(t, n, CKA_CLASS))) {
		if (!attr_ulong(a, &cls))
			return deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute",
				    "CKA_CLASS");
		if (is_protected_class(cls))
			return deny(h, fn, "plaintext-import", CKR_ACTION_PROHIBITED, "class",
				    class_name(cls));
		if (cls != CKO_PUBLIC_KEY && cls != CKO_CERTIFICATE && cls != CKO_DATA)
			return deny_num(h, fn, "object-class", CKR_TEMPLATE_INCONSISTENT, "class",
					cls);
	}
	if (cls == CKO_PUBLIC_KEY && (rv = check_key_template(h, fn, t, n)) != CKR_OK)
		return rv;
	if (marks_key(h, fn, t, n, &rv))
		return rv;
	rv = SH(C_CreateObject, h, t, n, out);
	if (rv != CKR_OK || !out)
		return rv;
	if ((rv = post_check(h, fn, *out, &ki)) != CKR_OK) {
		*out = CK_INVALID_HANDLE;
		return rv;
	}
	count_op(h, OP_CREATE);
	return CKR_OK;
}

/* Attribute changes that would weaken an object; NULL: the change is allowed. */
static const char *weakening(const CK_ATTRIBUTE *a, CK_RV *rv)
{
	CK_BBOOL v;
	*rv = CKR_ATTRIBUTE_READ_ONLY;
	switch (a->type) {
	case CKA_EXTRACTABLE:
	case CKA_MODIFIABLE:
	case CKA_COPYABLE:
	case CKA_DESTROYABLE:
		if (!attr_bool(a, &v))
			break;
		return v ? "weakening-change" : NULL;
	case CKA_SENSITIVE:
	case CKA_WRAP_WITH_TRUSTED:
		if (!attr_bool(a, &v))
			break;
		return v ? NULL : "weakening-change";
	case CKA_TRUSTED:
	case CKA_CLASS:
	case CKA_KEY_TYPE:
	case CKA_ALWAYS_SENSITIVE:
	case CKA_NEVER_EXTRACTABLE:
	case CKA_LOCAL:
	case CKA_KEY_GEN_MECHANISM:
		return "weakening-change";
	default:
		return NULL;
	}
	*rv = CKR_ATTRIBUTE_VALUE_INVALID;
	return "malformed";
}

static CK_RV check_changes(CK_SESSION_HANDLE h, const char *fn, CK_OBJECT_HANDLE o,
			   CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	CK_RV rv;
	CK_OBJECT_CLASS cls;
	int have_cls = -1;
	for (CK_ULONG i = 0; i < n; i++) {
		const char *rule = weakening(&t[i], &rv);
		if (rule)
			return deny_num(h, fn, rule, rv, "attribute", t[i].type);
		if (is_secret_component(t[i].type)) {
			if (have_cls < 0)
				have_cls = get_fixed(h, o, CKA_CLASS, &cls, sizeof cls);
			if (!have_cls || is_protected_class(cls))
				return deny_num(h, fn, "plaintext-import", CKR_ATTRIBUTE_READ_ONLY,
						"attribute", t[i].type);
		}
	}
	return CKR_OK;
}

static CK_RV w_CopyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t,
			  CK_ULONG n, CK_OBJECT_HANDLE_PTR out)
{
	static const char fn[] = "C_CopyObject";
	CK_RV rv;
	struct keyinfo ki;
	NEED_REAL();
	if (not_officer(h, fn, &rv))
		return rv;
	if (probe_guard(h, fn, o, &rv))
		return rv;
	if (domain_guard(h, fn, o, CKR_ACTION_PROHIBITED, &rv))
		return rv;
	if (byok_guard(h, fn, o, CKR_ACTION_PROHIBITED, &rv))
		return rv;
	if ((rv = tmpl_in(h, fn, t, n)) != CKR_OK)
		return rv;
	if (marks_key(h, fn, t, n, &rv))
		return rv;
	if ((rv = check_changes(h, fn, o, t, n)) != CKR_OK)
		return rv;
	rv = SH(C_CopyObject, h, o, t, n, out);
	if (rv != CKR_OK || !out)
		return rv;
	if ((rv = post_check(h, fn, *out, &ki)) != CKR_OK) {
		*out = CK_INVALID_HANDLE;
		return rv;
	}
	count_op(h, OP_COPY);
	return CKR_OK;
}

static CK_RV w_DestroyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o)
{
	static const char fn[] = "C_DestroyObject";
	CK_RV rv;
	struct keyinfo ki;
	NEED_REAL();
	if (not_officer(h, fn, &rv))
		return rv;
	if (domain_guard(h, fn, o, CKR_ACTION_PROHIBITED, &rv))
		return rv;
	describe(h, o, &ki);
	rv = SH(C_DestroyObject, h, o);
	if (rv != CKR_OK)
		return rv;
	count_op(h, OP_DESTROY);
	if (ki.have_cls && (is_protected_class(ki.cls) || ki.cls == CKO_PUBLIC_KEY))
		emit_key(h, "key-destroyed", fn, class_name(ki.cls), &ki);
	return CKR_OK;
}

static CK_RV w_GetObjectSize(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ULONG_PTR size)
{
	NEED_REAL();
	return SH(C_GetObjectSize, h, o, size);
}

/*
 * Key components of a private or secret key are never returned, whatever SoftHSM's
 * CKA_SENSITIVE says: the other attributes are filled, those get
 * CK_UNAVAILABLE_INFORMATION and the call returns CKR_ATTRIBUTE_SENSITIVE (PKCS#11 2.40
 * C_GetAttributeValue semantics).
 */
static CK_RV w_GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t,
				 CK_ULONG n)
{
	static const char fn[] = "C_GetAttributeValue";
	CK_ATTRIBUTE copy[MAX_ATTRS];
	CK_ULONG idx[MAX_ATTRS];
	CK_ULONG k = 0, hidden = 0, first = 0;
	CK_OBJECT_CLASS cls;
	CK_RV rv;
	NEED_REAL();
	if ((rv = tmpl_out(h, fn, t, n)) != CKR_OK)
		return rv;
	for (CK_ULONG i = 0; i < n; i++)
		if (is_secret_component(t[i].type))
			hidden++;
	if (hidden == 0)
		return SH(C_GetAttributeValue, h, o, t, n);
	CK_ATTRIBUTE ca = {CKA_CLASS, &cls, sizeof cls};
	rv = SH(C_GetAttributeValue, h, o, &ca, 1);
	if (rv != CKR_OK)
		return rv;
	if (!is_protected_class(cls))
		return SH(C_GetAttributeValue, h, o, t, n);
	for (CK_ULONG i = 0; i < n; i++) {
		if (is_secret_component(t[i].type)) {
			if (first == 0)
				first = t[i].type;
			t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
			continue;
		}
		idx[k] = i;
		copy[k++] = t[i];
	}
	rv = CKR_OK;
	if (k > 0) {
		rv = SH(C_GetAttributeValue, h, o, copy, k);
		for (CK_ULONG j = 0; j < k; j++)
			t[idx[j]].ulValueLen = copy[j].ulValueLen;
	}
	if (rv != CKR_OK && rv != CKR_ATTRIBUTE_SENSITIVE)
		return rv;
	return deny_num(h, fn, "sensitive-read", CKR_ATTRIBUTE_SENSITIVE, "attribute", first);
}

static CK_RV w_SetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t,
				 CK_ULONG n)
{
	static const char fn[] = "C_SetAttributeValue";
	CK_RV rv;
	NEED_REAL();
	if (not_officer(h, fn, &rv))
		return rv;
	if ((rv = tmpl_in(h, fn, t, n)) != CKR_OK)
		return rv;
	if (domain_guard(h, fn, o, CKR_ACTION_PROHIBITED, &rv))
		return rv;
	if (byok_guard(h, fn, o, CKR_ACTION_PROHIBITED, &rv))
		return rv;
	if (marks_key(h, fn, t, n, &rv))
		return rv;
	if ((rv = check_changes(h, fn, o, t, n)) != CKR_OK)
		return rv;
	return EX(C_SetAttributeValue, h, o, t, n);
}

static CK_RV w_FindObjectsInit(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	CK_RV rv;
	NEED_REAL();
	if ((rv = tmpl_in(h, "C_FindObjectsInit", t, n)) != CKR_OK)
		return rv;
	return SH(C_FindObjectsInit, h, t, n);
}

static CK_RV w_FindObjects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR list, CK_ULONG max,
			   CK_ULONG_PTR n)
{
	NEED_REAL();
	return SH(C_FindObjects, h, list, max, n);
}

static CK_RV w_FindObjectsFinal(CK_SESSION_HANDLE h)
{
	NEED_REAL();
	return SH(C_FindObjectsFinal, h);
}

/* ---- crypto operations: mechanism checked at Init, counted when an output is made ---- */

#define OUT_MADE(rv, out) ((rv) == CKR_OK && (out) != NULL)

static CK_RV w_EncryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	CK_RV rv;
	NEED_REAL();
	if ((rv = check_mech(h, "C_EncryptInit", m, 0)) != CKR_OK)
		return rv;
	if (domain_guard(h, "C_EncryptInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	if (byok_guard(h, "C_EncryptInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	return SH(C_EncryptInit, h, m, k);
}

static CK_RV w_Encrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR o,
		       CK_ULONG_PTR ol)
{
	NEED_REAL();
	CK_RV rv = SH(C_Encrypt, h, d, dl, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_ENCRYPT);
	return rv;
}

static CK_RV w_EncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR o,
			     CK_ULONG_PTR ol)
{
	NEED_REAL();
	return SH(C_EncryptUpdate, h, d, dl, o, ol);
}

static CK_RV w_EncryptFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR ol)
{
	NEED_REAL();
	CK_RV rv = SH(C_EncryptFinal, h, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_ENCRYPT);
	return rv;
}

static CK_RV w_DecryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	CK_RV rv;
	NEED_REAL();
	if ((rv = check_mech(h, "C_DecryptInit", m, 0)) != CKR_OK)
		return rv;
	if (domain_guard(h, "C_DecryptInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	if (byok_guard(h, "C_DecryptInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	return SH(C_DecryptInit, h, m, k);
}

static CK_RV w_Decrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR o,
		       CK_ULONG_PTR ol)
{
	NEED_REAL();
	CK_RV rv = SH(C_Decrypt, h, d, dl, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_DECRYPT);
	return rv;
}

static CK_RV w_DecryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR o,
			     CK_ULONG_PTR ol)
{
	NEED_REAL();
	return SH(C_DecryptUpdate, h, d, dl, o, ol);
}

static CK_RV w_DecryptFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR ol)
{
	NEED_REAL();
	CK_RV rv = SH(C_DecryptFinal, h, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_DECRYPT);
	return rv;
}

static CK_RV w_DigestInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m)
{
	CK_RV rv;
	NEED_REAL();
	if ((rv = check_mech(h, "C_DigestInit", m, 0)) != CKR_OK)
		return rv;
	return SH(C_DigestInit, h, m);
}

static CK_RV w_Digest(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR o,
		      CK_ULONG_PTR ol)
{
	NEED_REAL();
	CK_RV rv = SH(C_Digest, h, d, dl, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_DIGEST);
	return rv;
}

static CK_RV w_DigestUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl)
{
	NEED_REAL();
	return SH(C_DigestUpdate, h, d, dl);
}

static CK_RV w_DigestKey(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE k)
{
	CK_RV rv;
	NEED_REAL();
	if (probe_guard(h, "C_DigestKey", k, &rv))
		return rv;
	if (domain_guard(h, "C_DigestKey", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	if (byok_guard(h, "C_DigestKey", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	return SH(C_DigestKey, h, k);
}

static CK_RV w_DigestFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR ol)
{
	NEED_REAL();
	CK_RV rv = SH(C_DigestFinal, h, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_DIGEST);
	return rv;
}

static CK_RV w_SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	CK_RV rv;
	NEED_REAL();
	if ((rv = check_mech(h, "C_SignInit", m, 1)) != CKR_OK)
		return rv;
	if (domain_guard(h, "C_SignInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	if (byok_guard(h, "C_SignInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	rv = SH(C_SignInit, h, m, k);
	if (rv == CKR_OK) {
		pthread_mutex_lock(&lock);
		struct session *s = sess_find(h);
		if (s)
			s->sign_mech = m->mechanism;
		pthread_mutex_unlock(&lock);
	}
	return rv;
}

/* End SoftHSM's active sign operation without handing its result out. */
static void sign_discard(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl)
{
	CK_ULONG len = 0;
	if (SH(C_Sign, h, d, dl, NULL, &len) != CKR_OK || len == 0 || len > 4096) {
		unsigned char small[1];
		len = sizeof small;
		SH(C_Sign, h, d, dl, small, &len); /* CKR_BUFFER_TOO_SMALL keeps it active */
		return;
	}
	unsigned char *buf = malloc(len);
	if (!buf)
		return;
	SH(C_Sign, h, d, dl, buf, &len);
	explicit_bzero(buf, len);
	free(buf);
}

static CK_RV w_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR o,
		    CK_ULONG_PTR ol)
{
	CK_MECHANISM_TYPE mech = CKM_VENDOR_DEFINED;
	NEED_REAL();
	pthread_mutex_lock(&lock);
	struct session *s = sess_find(h);
	if (s)
		mech = s->sign_mech;
	pthread_mutex_unlock(&lock);
	if (d != NULL || dl == 0) {
		const char *rule = raw_sign_rule(mech, d, dl);
		if (rule) {
			sign_discard(h, d, dl);
			return deny_dec(h, "C_Sign", rule,
					mech == CKM_RSA_PKCS ? CKR_DATA_INVALID : CKR_DATA_LEN_RANGE,
					"data_len", dl);
		}
	}
	CK_RV rv = SH(C_Sign, h, d, dl, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_SIGN);
	return rv;
}

static CK_RV w_SignUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl)
{
	NEED_REAL();
	return SH(C_SignUpdate, h, d, dl);
}

static CK_RV w_SignFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR ol)
{
	NEED_REAL();
	CK_RV rv = SH(C_SignFinal, h, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_SIGN);
	return rv;
}

static CK_RV w_SignRecoverInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	CK_RV rv;
	NEED_REAL();
	if ((rv = check_mech(h, "C_SignRecoverInit", m, 1)) != CKR_OK)
		return rv;
	if (domain_guard(h, "C_SignRecoverInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	if (byok_guard(h, "C_SignRecoverInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	return SH(C_SignRecoverInit, h, m, k);
}

static CK_RV w_SignRecover(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR o,
			   CK_ULONG_PTR ol)
{
	NEED_REAL();
	CK_RV rv = SH(C_SignRecover, h, d, dl, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_SIGN);
	return rv;
}

static CK_RV w_VerifyInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	CK_RV rv;
	NEED_REAL();
	if ((rv = check_mech(h, "C_VerifyInit", m, 1)) != CKR_OK)
		return rv;
	if (domain_guard(h, "C_VerifyInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	if (byok_guard(h, "C_VerifyInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	return SH(C_VerifyInit, h, m, k);
}

static CK_RV w_Verify(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR sig,
		      CK_ULONG sl)
{
	NEED_REAL();
	CK_RV rv = SH(C_Verify, h, d, dl, sig, sl);
	if (rv == CKR_OK)
		count_op(h, OP_VERIFY);
	return rv;
}

static CK_RV w_VerifyUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl)
{
	NEED_REAL();
	return SH(C_VerifyUpdate, h, d, dl);
}

static CK_RV w_VerifyFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG sl)
{
	NEED_REAL();
	CK_RV rv = SH(C_VerifyFinal, h, sig, sl);
	if (rv == CKR_OK)
		count_op(h, OP_VERIFY);
	return rv;
}

static CK_RV w_VerifyRecoverInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	CK_RV rv;
	NEED_REAL();
	if ((rv = check_mech(h, "C_VerifyRecoverInit", m, 1)) != CKR_OK)
		return rv;
	if (domain_guard(h, "C_VerifyRecoverInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	if (byok_guard(h, "C_VerifyRecoverInit", k, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	return SH(C_VerifyRecoverInit, h, m, k);
}

static CK_RV w_VerifyRecover(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG sl, CK_BYTE_PTR o,
			     CK_ULONG_PTR ol)
{
	NEED_REAL();
	CK_RV rv = SH(C_VerifyRecover, h, sig, sl, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_VERIFY);
	return rv;
}

static CK_RV w_DigestEncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl,
				   CK_BYTE_PTR o, CK_ULONG_PTR ol)
{
	NEED_REAL();
	return SH(C_DigestEncryptUpdate, h, d, dl, o, ol);
}

static CK_RV w_DecryptDigestUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl,
				   CK_BYTE_PTR o, CK_ULONG_PTR ol)
{
	NEED_REAL();
	return SH(C_DecryptDigestUpdate, h, d, dl, o, ol);
}

static CK_RV w_SignEncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl, CK_BYTE_PTR o,
				 CK_ULONG_PTR ol)
{
	NEED_REAL();
	return SH(C_SignEncryptUpdate, h, d, dl, o, ol);
}

static CK_RV w_DecryptVerifyUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dl,
				   CK_BYTE_PTR o, CK_ULONG_PTR ol)
{
	NEED_REAL();
	return SH(C_DecryptVerifyUpdate, h, d, dl, o, ol);
}

/*
 * The BYOK wrapping-key shape, asked for by C_GenerateKeyPair's private template naming
 * CKM_RSA_X_509 in CKA_ALLOWED_MECHANISMS: an RSA pair, the private half with
 * CKA_ALLOWED_MECHANISMS exactly {CKM_RSA_X_509}, CKA_DECRYPT=true and CKA_UNWRAP=true,
 * and CKA_SIGN, CKA_SIGN_RECOVER, CKA_DERIVE, CKA_MODIFIABLE and CKA_COPYABLE false (added
 * where absent; true is refused). Returns 0 when not asked for (OUT untouched), 1 with
 * the template in OUT (room for n + 5), -1 when refused (*rv set).
 */
static int byok_shape(CK_SESSION_HANDLE h, const char *fn, CK_MECHANISM_PTR m,
		      CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_ATTRIBUTE *out, CK_ULONG *outn,
		      CK_RV *rv)
{
	static const CK_ATTRIBUTE_TYPE must[] = {CKA_DECRYPT, CKA_UNWRAP};
	static const CK_ATTRIBUTE_TYPE never[] = {CKA_SIGN, CKA_SIGN_RECOVER, CKA_DERIVE,
						  CKA_MODIFIABLE, CKA_COPYABLE};
	CK_ATTRIBUTE_PTR a = attr_find(t, n, CKA_ALLOWED_MECHANISMS);
	CK_BBOOL v;
	CK_ULONG k = 0;
	int named = a ? names_raw_rsa(a) : 0;
	if (named == 0)
		return 0;
	if (named < 0) {
		*rv = deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute",
			   "CKA_ALLOWED_MECHANISMS");
		return -1;
	}
	if (m->mechanism != CKM_RSA_PKCS_KEY_PAIR_GEN ||
	    a->ulValueLen != sizeof(CK_MECHANISM_TYPE)) {
		*rv = deny(h, fn, "wrapping-key", CKR_TEMPLATE_INCONSISTENT, "detail",
			   "a BYOK wrapping key is RSA, CKA_ALLOWED_MECHANISMS={CKM_RSA_X_509}");
		return -1;
	}
	for (size_t i = 0; i < sizeof must / sizeof must[0]; i++) {
		CK_ATTRIBUTE_PTR b = attr_find(t, n, must[i]);
		if (!b || !attr_bool(b, &v) || !v) {
			*rv = deny_num(h, fn, "wrapping-key", CKR_TEMPLATE_INCONSISTENT,
				       "attribute", must[i]);
			return -1;
		}
	}
	for (CK_ULONG i = 0; i < n; i++)
		out[k++] = t[i];
	for (size_t i = 0; i < sizeof never / sizeof never[0]; i++) {
		CK_ATTRIBUTE_PTR b = attr_find(t, n, never[i]);
		if (!b) {
			out[k++] = (CK_ATTRIBUTE){never[i], &ck_false, sizeof ck_false};
		} else if (!attr_bool(b, &v) || v) {
			*rv = deny_num(h, fn, "wrapping-key", CKR_TEMPLATE_INCONSISTENT,
				       "attribute", never[i]);
			return -1;
		}
	}
	*outn = k;
	return 1;
}

/* ---- key making: pre-check, force, forward, read back, log ------------------------ */

static CK_RV w_GenerateKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR t,
			   CK_ULONG n, CK_OBJECT_HANDLE_PTR out)
{
	static const char fn[] = "C_GenerateKey";
	CK_ATTRIBUTE forced[MAX_ATTRS + 3];
	CK_ULONG fn_count;
	struct keyinfo ki;
	CK_RV rv;
	NEED_REAL();
	if (not_officer(h, fn, &rv))
		return rv;
	if ((rv = check_mech(h, fn, m, 0)) != CKR_OK)
		return rv;
	if (m->mechanism != CKM_AES_KEY_GEN)
		return deny_num(h, fn, "key-type", CKR_MECHANISM_INVALID, "mechanism", m->mechanism);
	if ((rv = tmpl_in(h, fn, t, n)) != CKR_OK)
		return rv;
	if ((rv = check_key_template(h, fn, t, n)) != CKR_OK)
		return rv;
	if (marks_key(h, fn, t, n, &rv))
		return rv;
	if ((rv = force_protected(h, fn, t, n, forced, &fn_count, domain_present(h))) != CKR_OK)
		return rv;
	if (!out)
		return CKR_ARGUMENTS_BAD;
	rv = SH(C_GenerateKey, h, m, forced, fn_count, out);
	if (rv != CKR_OK)
		return rv;
	if ((rv = post_check(h, fn, *out, &ki)) != CKR_OK) {
		*out = CK_INVALID_HANDLE;
		return rv;
	}
	count_op(h, OP_GENERATE);
	emit_key(h, "key-generated", fn, "secret-key", &ki);
	return CKR_OK;
}

static CK_RV w_GenerateKeyPair(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR pt,
			       CK_ULONG pn, CK_ATTRIBUTE_PTR st, CK_ULONG sn,
			       CK_OBJECT_HANDLE_PTR pub, CK_OBJECT_HANDLE_PTR priv)
{
	static const char fn[] = "C_GenerateKeyPair";
	CK_ATTRIBUTE shaped[MAX_ATTRS + 5], forced[MAX_ATTRS + 8];
	CK_ULONG scount = 0, fcount;
	struct keyinfo pki, ski;
	CK_RV rv;
	NEED_REAL();
	if (not_officer(h, fn, &rv))
		return rv;
	if ((rv = check_mech(h, fn, m, 0)) != CKR_OK)
		return rv;
	if (m->mechanism != CKM_RSA_PKCS_KEY_PAIR_GEN && m->mechanism != CKM_EC_KEY_PAIR_GEN)
		return deny_num(h, fn, "key-type", CKR_MECHANISM_INVALID, "mechanism", m->mechanism);
	if ((rv = tmpl_in(h, fn, pt, pn)) != CKR_OK || (rv = tmpl_in(h, fn, st, sn)) != CKR_OK)
		return rv;
	if ((rv = check_key_template(h, fn, pt, pn)) != CKR_OK ||
	    (rv = check_key_template(h, fn, st, sn)) != CKR_OK)
		return rv;
	if (marks_key(h, fn, pt, pn, &rv))
		return rv;
	/* A BYOK wrapping key is never cloneable: see "BYOK wrapping keys". */
	int wrapping = byok_shape(h, fn, m, st, sn, shaped, &scount, &rv);
	if (wrapping < 0)
		return rv;
	if (wrapping)
		rv = force_protected(h, fn, shaped, scount, forced, &fcount, 0);
	else
		rv = force_protected(h, fn, st, sn, forced, &fcount, domain_present(h));
	if (rv != CKR_OK)
		return rv;
	if (!pub || !priv)
		return CKR_ARGUMENTS_BAD;
	rv = SH(C_GenerateKeyPair, h, m, pt, pn, forced, fcount, pub, priv);
	if (rv != CKR_OK)
		return rv;
	rv = post_check(h, fn, *priv, &ski);
	if (rv == CKR_OK && wrapping && !is_byok_key(h, *priv)) {
		SH(C_DestroyObject, h, *priv);
		rv = deny(h, fn, "wrapping-key", CKR_GENERAL_ERROR, "detail", "object read back");
	}
	if (rv == CKR_OK) {
		rv = post_check(h, fn, *pub, &pki);
		if (rv != CKR_OK)
			SH(C_DestroyObject, h, *priv);
	} else {
		SH(C_DestroyObject, h, *pub);
	}
	if (rv != CKR_OK) {
		*pub = *priv = CK_INVALID_HANDLE;
		return rv;
	}
	count_op(h, OP_GENERATE);
	emit_key(h, "key-generated", fn, "key-pair", &ski);
	return CKR_OK;
}

static CK_RV w_WrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE wk,
		       CK_OBJECT_HANDLE k, CK_BYTE_PTR o, CK_ULONG_PTR ol)
{
	static const char fn[] = "C_WrapKey";
	CK_BBOOL ext = CK_FALSE;
	CK_ATTRIBUTE ea = {CKA_EXTRACTABLE, &ext, sizeof ext};
	CK_MECHANISM kwp;
	CK_RV rv;
	NEED_REAL();
	m = wire_kwp(m, &kwp);
	if ((rv = check_mech(h, fn, m, 0)) != CKR_OK)
		return rv;
	if (probe_guard(h, fn, k, &rv))
		return rv;
	if (byok_guard(h, fn, wk, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv) ||
	    byok_guard(h, fn, k, CKR_KEY_UNEXTRACTABLE, &rv))
		return rv;
	/* The domain key wraps cloneable keys only, and only it wraps them. */
	if (is_domain_key(h, wk)) {
		if (!domain_mech_ok(m->mechanism))
			return deny_num(h, fn, "domain-key", CKR_MECHANISM_INVALID, "mechanism",
					m->mechanism);
		if (is_domain_key(h, k) || !is_cloneable(h, k))
			return deny(h, fn, "domain-wrap", CKR_KEY_NOT_WRAPPABLE, "detail",
				    "the domain key wraps cloneable keys only");
	} else if (is_cloneable(h, k)) {
		return deny(h, fn, "domain-wrap", CKR_KEY_NOT_WRAPPABLE, "detail",
			    "a cloneable key leaves under the domain key only");
	}
	if ((rv = SH(C_GetAttributeValue, h, k, &ea, 1)) != CKR_OK)
		return rv;
	if (ea.ulValueLen != sizeof ext || !ext)
		return deny(h, fn, "extractable", CKR_KEY_UNEXTRACTABLE, NULL, NULL);
	rv = SH(C_WrapKey, h, m, wk, k, o, ol);
	if (OUT_MADE(rv, o))
		count_op(h, OP_WRAP);
	return rv;
}

/* Shared by C_UnwrapKey and C_DeriveKey: both make a key from something else. */
static CK_RV prepare_made_key(CK_SESSION_HANDLE h, const char *fn, CK_ATTRIBUTE_PTR t,
			      CK_ULONG n, CK_ATTRIBUTE *forced, CK_ULONG *fcount, int cloneable)
{
	CK_RV rv;
	CK_ATTRIBUTE_PTR a;
	CK_ULONG cls = CKO_SECRET_KEY;
	if ((rv = tmpl_in(h, fn, t, n)) != CKR_OK)
		return rv;
	if ((a = attr_find(t, n, CKA_CLASS)) && !attr_ulong(a, &cls))
		return deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute", "CKA_CLASS");
	if (cls != CKO_SECRET_KEY && cls != CKO_PRIVATE_KEY)
		return deny_num(h, fn, "key-type", CKR_TEMPLATE_INCONSISTENT, "class", cls);
	if ((rv = check_key_template(h, fn, t, n)) != CKR_OK)
		return rv;
	if (marks_key(h, fn, t, n, &rv))
		return rv;
	return force_protected(h, fn, t, n, forced, fcount, cloneable);
}

/*
 * SoftHSM 2.6.1 records no CKA_VALUE_LEN for an unwrapped secret key (it reads 0) and
 * refuses one in the template, so the size is learnt from a probe: the same blob
 * unwrapped as a session key that SoftHSM will tell the CKA_VALUE length of (neither
 * sensitive nor unextractable), asked for the length only and destroyed at once. While
 * it lives, its handle is `probe_obj`, which no forwarded call may touch (probe_guard).
 * Returns the key length in bytes through LEN.
 */
static CK_RV probe_secret_len(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE uk,
			      CK_BYTE_PTR w, CK_ULONG wl, CK_ATTRIBUTE_PTR t, CK_ULONG n,
			      CK_ULONG *len)
{
	CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
	CK_ATTRIBUTE probe[4] = {
		{CKA_CLASS, &cls, sizeof cls},
		{CKA_TOKEN, &ck_false, sizeof ck_false},
		{CKA_SENSITIVE, &ck_false, sizeof ck_false},
		{CKA_EXTRACTABLE, &ck_true, sizeof ck_true},
	};
	CK_ATTRIBUTE tmpl[5];
	CK_ULONG k = 0;
	CK_OBJECT_HANDLE o = CK_INVALID_HANDLE;
	CK_ATTRIBUTE_PTR kt = attr_find(t, n, CKA_KEY_TYPE);
	for (; k < 4; k++)
		tmpl[k] = probe[k];
	if (kt)
		tmpl[k++] = *kt;
	pthread_mutex_lock(&probe_lock);
	CK_RV rv = SH(C_UnwrapKey, h, m, uk, w, wl, tmpl, k, &o);
	if (rv != CKR_OK) {
		pthread_mutex_unlock(&probe_lock);
		return rv;
	}
	pthread_mutex_lock(&lock);
	probe_obj = o;
	pthread_mutex_unlock(&lock);
	CK_ATTRIBUTE v = {CKA_VALUE, NULL, 0};
	rv = SH(C_GetAttributeValue, h, o, &v, 1);
	SH(C_DestroyObject, h, o);
	pthread_mutex_lock(&lock);
	probe_obj = CK_INVALID_HANDLE;
	pthread_mutex_unlock(&lock);
	pthread_mutex_unlock(&probe_lock);
	if (rv != CKR_OK || v.ulValueLen == CK_UNAVAILABLE_INFORMATION)
		return rv != CKR_OK ? rv : CKR_GENERAL_ERROR;
	*len = v.ulValueLen;
	return CKR_OK;
}

/*
 * C_UnwrapKey(CKM_RSA_PKCS_OAEP) with a marked key (see "BYOK wrapping keys"): every
 * check that does not depend on the wrapped bytes first (mechanism, parameters, template,
 * role already), then the raw RSA decrypt in a session of this layer's own (so no
 * decrypt operation is ever left active in the client's session), OpenSSL's constant-time
 * OAEP decoding, the key made with C_CreateObject in the caller's session as a session
 * object, read back and judged. Every failure from the decrypt on returns the same code
 * (CKR_GENERAL_ERROR, what SoftHSM's own OAEP unwrap answers) and writes the same event
 * (rule byok-unwrap): no padding oracle. Buffers holding decrypted bytes are cleansed.
 */
static CK_RV byok_unwrap(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE uk,
			 CK_BYTE_PTR w, CK_ULONG wl, CK_ATTRIBUTE_PTR t, CK_ULONG n,
			 CK_OBJECT_HANDLE_PTR out)
{
	static const char fn[] = "C_UnwrapKey";
	enum { MAX_MODULUS = 8192 / 8 };
	/* The AES key unwraps (AES key wrap) and does nothing else: with encrypt or decrypt
	 * a client could run RFC 3394/5649 itself and read the key it brought in. */
	static const CK_ATTRIBUTE_TYPE uses[] = {CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN,
						 CKA_VERIFY, CKA_WRAP, CKA_DERIVE};
	static const CK_MECHANISM_TYPE kw_only[] = {CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP};
	CK_ATTRIBUTE made[MAX_ATTRS + 16];
	CK_ULONG mcount;
	CK_RSA_PKCS_OAEP_PARAMS p;
	const EVP_MD *md;
	CK_ATTRIBUTE_PTR a;
	CK_BBOOL v;
	CK_ULONG cls = CKO_SECRET_KEY, kt = CKK_GENERIC_SECRET;
	CK_RV rv;
	if (m->mechanism != CKM_RSA_PKCS_OAEP)
		return deny_num(h, fn, "wrapping-key", CKR_MECHANISM_INVALID, "mechanism",
				m->mechanism);
	if (m->pParameter == NULL || m->ulParameterLen != sizeof p)
		return deny(h, fn, "oaep-params", CKR_MECHANISM_PARAM_INVALID, "detail",
			    "not CK_RSA_PKCS_OAEP_PARAMS");
	memcpy(&p, m->pParameter, sizeof p);
	if (p.hashAlg == CKM_SHA256 && p.mgf == CKG_MGF1_SHA256)
		md = EVP_sha256();
	else if (p.hashAlg == CKM_SHA_1 && p.mgf == CKG_MGF1_SHA1)
		md = EVP_sha1();
	else
		return deny_num(h, fn, "oaep-params", CKR_MECHANISM_PARAM_INVALID, "hash",
				p.hashAlg);
	if (p.source != CKZ_DATA_SPECIFIED || p.ulSourceDataLen != 0)
		return deny(h, fn, "oaep-params", CKR_MECHANISM_PARAM_INVALID, "detail",
			    "an OAEP label");
	if (md == NULL)
		return CKR_GENERAL_ERROR;
	if ((a = attr_find(t, n, CKA_TOKEN)) && attr_bool(a, &v) && v)
		return deny(h, fn, "wrapping-key", CKR_TEMPLATE_INCONSISTENT, "detail",
			    "a BYOK wrapping key unwraps session keys only");
	if ((a = attr_find(t, n, CKA_VALUE)) || (a = attr_find(t, n, CKA_VALUE_LEN)) ||
	    (a = attr_find(t, n, CKA_ALLOWED_MECHANISMS)))
		return deny_num(h, fn, "wrapping-key", CKR_TEMPLATE_INCONSISTENT, "attribute",
				a->type);
	if ((rv = prepare_made_key(h, fn, t, n, made, &mcount, 0)) != CKR_OK)
		return rv;
	for (size_t i = 0; i < sizeof uses / sizeof uses[0]; i++) {
		if (!(a = attr_find(t, n, uses[i]))) {
			made[mcount++] = (CK_ATTRIBUTE){uses[i], &ck_false, sizeof ck_false};
		} else if (!attr_bool(a, &v) || v) {
			return deny_num(h, fn, "wrapping-key", CKR_TEMPLATE_INCONSISTENT,
					"attribute", uses[i]);
		}
	}
	if (!attr_find(t, n, CKA_UNWRAP))
		made[mcount++] = (CK_ATTRIBUTE){CKA_UNWRAP, &ck_true, sizeof ck_true};
	made[mcount++] = (CK_ATTRIBUTE){CKA_ALLOWED_MECHANISMS, (void *)kw_only, sizeof kw_only};
	if ((a = attr_find(t, n, CKA_CLASS)))
		attr_ulong(a, &cls); /* checked by prepare_made_key */
	if (!(a = attr_find(t, n, CKA_KEY_TYPE)) || !attr_ulong(a, &kt) || cls != CKO_SECRET_KEY ||
	    kt != CKK_AES)
		return deny_num(h, fn, "key-type", CKR_TEMPLATE_INCONSISTENT, "key_type", kt);
	if (!attr_find(t, n, CKA_TOKEN))
		made[mcount++] = (CK_ATTRIBUTE){CKA_TOKEN, &ck_false, sizeof ck_false};
	if (!out || (!w && wl))
		return CKR_ARGUMENTS_BAD;

	unsigned char em[MAX_MODULUS], key[MAX_MODULUS];
	CK_ATTRIBUTE mod = {CKA_MODULUS, NULL, 0};
	CK_MECHANISM raw = {CKM_RSA_X_509, NULL, 0};
	CK_SESSION_INFO info;
	CK_SESSION_HANDLE own;
	CK_ULONG k = 0, emlen = sizeof em;
	CK_OBJECT_HANDLE o = CK_INVALID_HANDLE;
	struct keyinfo ki;
	int klen = -1, decrypted = 0;
	*out = CK_INVALID_HANDLE;
	if (SH(C_GetAttributeValue, h, uk, &mod, 1) == CKR_OK && mod.ulValueLen <= MAX_MODULUS)
		k = mod.ulValueLen;
	if (k != 0 && wl == k && SH(C_GetSessionInfo, h, &info) == CKR_OK &&
	    SH(C_OpenSession, info.slotID, CKF_SERIAL_SESSION, NULL, NULL, &own) == CKR_OK) {
		if (SH(C_DecryptInit, own, &raw, uk) == CKR_OK &&
		    SH(C_Decrypt, own, w, wl, em, &emlen) == CKR_OK && emlen == k)
			decrypted = 1;
		SH(C_CloseSession, own); /* ends any operation left in it */
	}
	if (decrypted) {
		klen = RSA_padding_check_PKCS1_OAEP_mgf1(key, (int)k, em, (int)k, (int)k, NULL, 0,
							 md, md);
		ERR_clear_error();
	}
	OPENSSL_cleanse(em, sizeof em);
	if (klen > 0 && aes_len_ok((CK_ULONG)klen)) {
		made[mcount++] = (CK_ATTRIBUTE){CKA_VALUE, key, (CK_ULONG)klen};
		if (SH(C_CreateObject, h, made, mcount, &o) != CKR_OK)
			o = CK_INVALID_HANDLE;
	}
	OPENSSL_cleanse(key, sizeof key);
	if (o != CK_INVALID_HANDLE) {
		describe(h, o, &ki);
		if (ki.cls == CKO_SECRET_KEY && (!ki.have_bits || ki.bits == 0)) {
			ki.bits = (unsigned long)klen * 8;
			ki.have_bits = 1;
		}
		if (key_verdict(&ki, &rv) == NULL) {
			*out = o;
			count_op(h, OP_UNWRAP);
			emit_key(h, "key-imported", fn, class_name(ki.cls), &ki);
			return CKR_OK;
		}
		SH(C_DestroyObject, h, o);
	}
	return deny(h, fn, "byok-unwrap", CKR_GENERAL_ERROR, "detail", "the key did not unwrap");
}

static CK_RV w_UnwrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE uk,
			 CK_BYTE_PTR w, CK_ULONG wl, CK_ATTRIBUTE_PTR t, CK_ULONG n,
			 CK_OBJECT_HANDLE_PTR out)
{
	static const char fn[] = "C_UnwrapKey";
	CK_ATTRIBUTE forced[MAX_ATTRS + 3];
	CK_ULONG fcount;
	struct keyinfo ki;
	CK_RV rv;
	NEED_REAL();
	/*
	 * BYOK (docs/keys.md): p11-kit 0.24.1's RPC does not carry CKM_AES_KEY_WRAP_PAD
	 * (rpc-message.c lists it in neither mechanism table, so the client refuses it with
	 * CKR_MECHANISM_INVALID before sending). hsmctl sends CKM_KEY_WRAP_LYNKS instead: a
	 * parameterless mechanism 0.24.1 does carry and SoftHSM does not implement, which
	 * this layer turns into CKM_AES_KEY_WRAP_PAD (RFC 5649, default IV) for SoftHSM.
	 * Unwrap only; every rule below then judges the real mechanism.
	 */
	CK_MECHANISM kwp = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
	if (m && m->mechanism == CKM_KEY_WRAP_LYNKS && m->ulParameterLen == 0)
		m = &kwp;
	if ((rv = tmpl_in(h, fn, t, n)) != CKR_OK)
		return rv;
	/* Importing a key (a token object) is the officer's; a crypto-user may unwrap a
	 * session key (CKA_TOKEN absent or false: gone when its session ends) to use it. */
	CK_ATTRIBUTE_PTR tok = attr_find(t, n, CKA_TOKEN);
	CK_BBOOL on_token = CK_FALSE;
	if (tok && !attr_bool(tok, &on_token))
		return deny(h, fn, "malformed", CKR_ATTRIBUTE_VALUE_INVALID, "attribute",
			    "CKA_TOKEN");
	if ((on_token || role != ROLE_USER) && not_officer(h, fn, &rv))
		return rv;
	if ((rv = check_mech(h, fn, m, 0)) != CKR_OK)
		return rv;
	if (is_byok_key(h, uk))
		return byok_unwrap(h, m, uk, w, wl, t, n, out);
	/* What the domain key unwraps stays cloneable (a copy of a cloneable key). */
	int from_domain = is_domain_key(h, uk);
	if (from_domain && !domain_mech_ok(m->mechanism))
		return deny_num(h, fn, "domain-key", CKR_MECHANISM_INVALID, "mechanism",
				m->mechanism);
	if ((rv = prepare_made_key(h, fn, t, n, forced, &fcount, from_domain)) != CKR_OK)
		return rv;
	if (!out)
		return CKR_ARGUMENTS_BAD;
	CK_ATTRIBUTE_PTR ca = attr_find(t, n, CKA_CLASS);
	CK_ULONG cls = CKO_SECRET_KEY, secret_len = 0;
	if (ca)
		attr_ulong(ca, &cls); /* checked by prepare_made_key */
	if (cls == CKO_SECRET_KEY) {
		CK_ATTRIBUTE_PTR kt = attr_find(t, n, CKA_KEY_TYPE);
		CK_ULONG ktv = CKK_GENERIC_SECRET;
		if (!kt || !attr_ulong(kt, &ktv) || ktv != CKK_AES)
			return deny_num(h, fn, "key-type", CKR_TEMPLATE_INCONSISTENT, "key_type", ktv);
		if ((rv = probe_secret_len(h, m, uk, w, wl, t, n, &secret_len)) != CKR_OK)
			return rv;
		if (!aes_len_ok(secret_len))
			return deny_dec(h, fn, "aes-size", CKR_KEY_SIZE_RANGE, "bits", secret_len * 8);
	}
	rv = SH(C_UnwrapKey, h, m, uk, w, wl, forced, fcount, out);
	if (rv != CKR_OK)
		return rv;
	if ((rv = post_check_sized(h, fn, *out, &ki, secret_len * 8)) != CKR_OK) {
		*out = CK_INVALID_HANDLE;
		return rv;
	}
	count_op(h, OP_UNWRAP);
	emit_key(h, "key-imported", fn, class_name(ki.cls), &ki);
	return CKR_OK;
}

static CK_RV w_DeriveKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE base,
			 CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR out)
{
	static const char fn[] = "C_DeriveKey";
	CK_ATTRIBUTE forced[MAX_ATTRS + 3];
	CK_ULONG fcount;
	struct keyinfo ki;
	CK_RV rv;
	NEED_REAL();
	if (not_officer(h, fn, &rv))
		return rv;
	if ((rv = check_mech(h, fn, m, 0)) != CKR_OK)
		return rv;
	if (domain_guard(h, fn, base, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	if (byok_guard(h, fn, base, CKR_KEY_FUNCTION_NOT_PERMITTED, &rv))
		return rv;
	if ((rv = prepare_made_key(h, fn, t, n, forced, &fcount, 0)) != CKR_OK)
		return rv;
	if (!out)
		return CKR_ARGUMENTS_BAD;
	rv = SH(C_DeriveKey, h, m, base, forced, fcount, out);
	if (rv != CKR_OK)
		return rv;
	if ((rv = post_check(h, fn, *out, &ki)) != CKR_OK) {
		*out = CK_INVALID_HANDLE;
		return rv;
	}
	count_op(h, OP_DERIVE);
	emit_key(h, "key-generated", fn, class_name(ki.cls), &ki);
	return CKR_OK;
}

/* ---- the rest passes through ----------------------------------------------------- */

static CK_RV w_SeedRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG sl)
{
	NEED_REAL();
	return SH(C_SeedRandom, h, s, sl);
}

static CK_RV w_GenerateRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG ol)
{
	NEED_REAL();
	return SH(C_GenerateRandom, h, o, ol);
}

static CK_RV w_GetFunctionStatus(CK_SESSION_HANDLE h)
{
	NEED_REAL();
	return SH(C_GetFunctionStatus, h);
}

static CK_RV w_CancelFunction(CK_SESSION_HANDLE h)
{
	NEED_REAL();
	return SH(C_CancelFunction, h);
}

static CK_RV w_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR rsv)
{
	NEED_REAL();
	return real->C_WaitForSlotEvent(flags, slot, rsv);
}

static CK_FUNCTION_LIST function_list = {
	{CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR},
	w_Initialize, w_Finalize, w_GetInfo, C_GetFunctionList,
	w_GetSlotList, w_GetSlotInfo, w_GetTokenInfo, w_GetMechanismList, w_GetMechanismInfo,
	w_InitToken, w_InitPIN, w_SetPIN,
	w_OpenSession, w_CloseSession, w_CloseAllSessions, w_GetSessionInfo,
	w_GetOperationState, w_SetOperationState, w_Login, w_Logout,
	w_CreateObject, w_CopyObject, w_DestroyObject, w_GetObjectSize,
	w_GetAttributeValue, w_SetAttributeValue,
	w_FindObjectsInit, w_FindObjects, w_FindObjectsFinal,
	w_EncryptInit, w_Encrypt, w_EncryptUpdate, w_EncryptFinal,
	w_DecryptInit, w_Decrypt, w_DecryptUpdate, w_DecryptFinal,
	w_DigestInit, w_Digest, w_DigestUpdate, w_DigestKey, w_DigestFinal,
	w_SignInit, w_Sign, w_SignUpdate, w_SignFinal, w_SignRecoverInit, w_SignRecover,
	w_VerifyInit, w_Verify, w_VerifyUpdate, w_VerifyFinal, w_VerifyRecoverInit,
	w_VerifyRecover,
	w_DigestEncryptUpdate, w_DecryptDigestUpdate, w_SignEncryptUpdate,
	w_DecryptVerifyUpdate,
	w_GenerateKey, w_GenerateKeyPair, w_WrapKey, w_UnwrapKey, w_DeriveKey,
	w_SeedRandom, w_GenerateRandom, w_GetFunctionStatus, w_CancelFunction,
	w_WaitForSlotEvent,
};
