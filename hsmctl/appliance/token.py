"""The appliance's two PKCS#11 tokens (SoftHSM2): the audit token and the customer token.

Both are found by label, never by slot id (SoftHSM renumbers slots per process and keeps
one uninitialised slot spare). The **audit token** (label ``hsm-audit``) is made at
personalisation and holds the activity-log signing keys ``audit-1``, ``audit-2``, ...
(EC P-256, non-extractable); its PINs are device-internal secrets the daemon keeps. The
**customer token** is the one initialised token that is not the audit token, or the spare
uninitialised slot when there is none; ``hsm init``/``hsm zeroize`` only ever touch it,
and the audit label is refused as a customer label, so the two cannot be confused.

Process and library lifetime (the design)
-----------------------------------------
SoftHSM reads its token directory once, at ``C_Initialize``: a process that keeps the
library loaded does not see tokens that another process or ``softhsm2-util`` creates or
deletes later. It does see new or destroyed *objects* in tokens it already knows (each
token is re-indexed when its generation file changes). Hence:

* Every management operation (customer: status, init, PINs, zeroize; audit: create,
  keygen, list, export, destroy) runs in a fresh library context, a short-lived child
  ``python3 -m hsmctl.appliance.tokencli OP`` that reads its arguments, PINs included,
  as JSON on stdin (never argv) and answers with JSON on stdout (0.1-0.2 s each).
  Its view is always current and nothing it does can disturb the daemon's library.
* Only :class:`AuditSigner` keeps the library in the calling process, with one logged-in
  session, because checkpoints are signed often. It touches the audit token only, whose
  objects stay visible, so a stale slot list does not matter to it. The library is loaded
  when the first signer opens and finalised when the last one closes (PyKCS11 1.5.12 has
  no per-instance reference count), so a signer opened later gets a fresh view.

Zeroize is the out-of-band factory reset: ``softhsm2-util --delete-token --serial`` (no
PIN), after which SoftHSM shows the spare uninitialised slot and a new init works.
``customer_status().objects`` counts the objects visible without login (public ones):
the daemon holds no customer PIN. SoftHSM never locks a PIN; a token that does
(``CKR_PIN_LOCKED``) gives :class:`TokenLockedError`.

Errors: ``PyKCS11Error`` is translated here and nowhere else (``raise ... from exc``)::

    HsmctlError
    └── TokenError (1)                      any other PKCS#11 failure; detail["ckr"]
        ├── TokenAuthError (1)              wrong PIN
        ├── TokenPinError (2, UsageError)   PIN length out of 4..255 or otherwise invalid
        ├── TokenLockedError (2, UsageError) PIN locked
        └── TokenStateError (5, ConflictError) token absent/ambiguous, PIN not set, busy

No message or detail ever holds a PIN.

The code, by concern: ``tokenlib`` (errors, their translation, PIN and label checks, the
library, slots, sessions), ``tokenhelper`` (the helper process), ``audittoken``,
``customertoken``. This module is the one the rest of the firmware imports.
"""

from __future__ import annotations

from hsmctl.appliance.audittoken import (
    DIGEST_BYTES,
    SIGNATURE_BYTES,
    AuditKey,
    AuditSigner,
    audit_destroy_private_key,
    audit_ensure_token,
    audit_generate_key,
    audit_list_keys,
    audit_public_key_pem,
    audit_sign_digest,
)
from hsmctl.appliance.customertoken import (
    customer_change_co_pin,
    customer_check_co_pin,
    customer_domain_set,
    customer_init,
    customer_set_co_pin,
    customer_status,
    customer_zeroize,
)
from hsmctl.appliance.tokenhelper import (
    HELPER_TIMEOUT,
    call_helper,
    error_from_json,
    error_to_json,
)
from hsmctl.appliance.tokenlib import (
    _LOADED,
    AUDIT_KEY_PREFIX,
    AUDIT_LABEL,
    DEFAULT_LIB,
    LABEL_BYTES,
    P256_PARAMS,
    PinLike,
    Slot,
    TokenAuthError,
    TokenError,
    TokenLockedError,
    TokenPinError,
    TokenStateError,
    TokenStatus,
    check_customer_label,
    ckr_name,
    close_session,
    ec_public_pem,
    find_audit,
    find_customer,
    find_free,
    key_generation,
    list_slots,
    open_session,
    padded_label,
    pkcs11_errors,
    reveal_pin,
    shared_library,
    translate,
)

__all__ = [
    "AUDIT_KEY_PREFIX",
    "AUDIT_LABEL",
    "DEFAULT_LIB",
    "DIGEST_BYTES",
    "HELPER_TIMEOUT",
    "LABEL_BYTES",
    "P256_PARAMS",
    "SIGNATURE_BYTES",
    "_LOADED",
    "AuditKey",
    "AuditSigner",
    "PinLike",
    "Slot",
    "TokenAuthError",
    "TokenError",
    "TokenLockedError",
    "TokenPinError",
    "TokenStateError",
    "TokenStatus",
    "audit_destroy_private_key",
    "audit_ensure_token",
    "audit_generate_key",
    "audit_list_keys",
    "audit_public_key_pem",
    "audit_sign_digest",
    "call_helper",
    "check_customer_label",
    "ckr_name",
    "close_session",
    "customer_change_co_pin",
    "customer_check_co_pin",
    "customer_domain_set",
    "customer_init",
    "customer_set_co_pin",
    "customer_status",
    "customer_zeroize",
    "ec_public_pem",
    "error_from_json",
    "error_to_json",
    "find_audit",
    "find_customer",
    "find_free",
    "key_generation",
    "list_slots",
    "open_session",
    "padded_label",
    "pkcs11_errors",
    "reveal_pin",
    "shared_library",
    "translate",
]
