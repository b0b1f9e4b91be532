"""Token management in a fresh process: ``python3 -m hsmctl.appliance.tokencli OP``.

SoftHSM fixes its list of tokens at C_Initialize, so each management operation runs here,
in a process whose library has just been loaded (see :mod:`hsmctl.appliance.token`).
The request ``{"lib": PATH, "args": {...}}`` comes on stdin (PINs are never on argv);
the answer is one JSON object on stdout, ``{"result": ...}`` or ``{"error": {...}}``,
and the exit status is 0 or the error's exit code. Nothing else is printed: an
unexpected exception is reported by its class name only, as its text might hold a PIN.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import PyKCS11

from hsmctl.appliance import domainkey, tokenforks, tokenlock
from hsmctl.appliance import token as t
from hsmctl.errors import CommandFailed, HsmctlError, UsageError

Op = Callable[[Any, Mapping[str, Any]], object]


def _customer_status(lib: Any, args: Mapping[str, Any]) -> object:
    slots = t.list_slots(lib)
    t.find_audit(slots)  # refuses an ambiguous device early
    slot = t.find_customer(slots)
    if slot is None:
        free = t.find_free(slots)
        return t.TokenStatus("", "", False, 0, False, free.firmware).to_dict()
    return _status(lib, slot).to_dict()


def _status(lib: Any, slot: t.Slot) -> t.TokenStatus:
    objects = 0
    if slot.initialised:
        session = t.open_session(lib, slot, "reading the token")
        try:
            with t.pkcs11_errors("counting objects"):
                objects = len(session.findObjects([]))
        finally:
            t.close_session(session)
    return t.TokenStatus(
        slot.label,
        slot.serial,
        slot.initialised,
        objects,
        slot.user_pin_set,
        slot.firmware,
        _domain_fingerprint(lib, slot) if slot.initialised else None,
    )


def _domain_objects(session: Any) -> list[Any]:
    """The domain key (public: visible without login): a trusted AES key by its label."""
    return list(
        session.findObjects(
            [
                (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                (PyKCS11.CKA_TRUSTED, True),
                (PyKCS11.CKA_LABEL, domainkey.LABEL),
            ]
        )
    )


def _domain_fingerprint(lib: Any, slot: t.Slot) -> str | None:
    session = t.open_session(lib, slot, "reading the cloning domain")
    try:
        with t.pkcs11_errors("reading the cloning domain"):
            found = _domain_objects(session)
            if not found:
                return None
            (ident,) = session.getAttributeValue(found[0], [PyKCS11.CKA_ID], True)
    finally:
        t.close_session(session)
    return bytes(ident).hex()


def _customer_domain_set(lib: Any, args: Mapping[str, Any]) -> object:
    """Make the domain key as SO; the same domain again changes nothing, another one is
    refused (a token belongs to one domain: zeroize and init to change it)."""
    so_pin = t.reveal_pin(args["so_pin"], "SO PIN")
    try:
        value, fingerprint = domainkey.derive(str(args["domain_secret"]))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    slot = _customer(lib)
    current = _domain_fingerprint(lib, slot)
    if current == fingerprint:
        return {"domain": fingerprint, "created": False}
    if current is not None:
        raise t.TokenStateError(
            f"the token is in another cloning domain ({current[:16]}...): "
            "zeroize and init it to change domains"
        )
    session = t.open_session(lib, slot, "setting the cloning domain")
    try:
        with t.pkcs11_errors("setting the cloning domain"):
            session.login(so_pin, PyKCS11.CKU_SO)
            template = [
                (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                (PyKCS11.CKA_TOKEN, True),
                (PyKCS11.CKA_PRIVATE, False),  # SoftHSM's SO makes public objects only
                (PyKCS11.CKA_SENSITIVE, True),
                (PyKCS11.CKA_EXTRACTABLE, False),
                (PyKCS11.CKA_TRUSTED, True),
                (PyKCS11.CKA_WRAP, True),
                (PyKCS11.CKA_UNWRAP, True),
                (PyKCS11.CKA_ENCRYPT, False),
                (PyKCS11.CKA_DECRYPT, False),
                (PyKCS11.CKA_SIGN, False),
                (PyKCS11.CKA_VERIFY, False),
                (PyKCS11.CKA_DERIVE, False),
                (PyKCS11.CKA_MODIFIABLE, False),
                (PyKCS11.CKA_LABEL, domainkey.LABEL),
                (PyKCS11.CKA_ID, bytes.fromhex(fingerprint)),
                (PyKCS11.CKA_VALUE, value),
            ]
            session.createObject(template)
            session.logout()
    finally:
        t.close_session(session)
    return {"domain": fingerprint, "created": True}


def _refresh(lib: Any, slot: t.Slot) -> t.Slot:
    # Within one process a slot keeps its id after C_InitToken; re-read its token info.
    for s in t.list_slots(lib):
        if s.slot == slot.slot:
            return s
    raise t.TokenStateError("the token vanished")


def _customer(lib: Any) -> t.Slot:
    slots = t.list_slots(lib)
    audit = t.find_audit(slots)
    slot = t.find_customer(slots)
    if slot is None:
        raise t.TokenStateError("the customer token is not initialised")
    if audit is not None and slot.serial == audit.serial:  # belt and braces
        raise t.TokenStateError("customer token lookup returned the audit token")
    return slot


def _customer_init(lib: Any, args: Mapping[str, Any]) -> object:
    label = t.check_customer_label(args["label"])
    so_pin = t.reveal_pin(args["so_pin"], "SO PIN")
    current = args.get("current_so_pin")
    slots = t.list_slots(lib)
    t.find_audit(slots)
    slot = t.find_customer(slots)
    if slot is None:
        slot = t.find_free(slots)
        with t.pkcs11_errors("initialising the customer token"):
            lib.initToken(slot.slot, so_pin, t.padded_label(label))
        return _status(lib, _refresh(lib, slot)).to_dict()
    if current is None:
        raise t.TokenStateError(
            "the customer token is initialised: its current SO PIN is needed to re-initialise"
        )
    current = t.reveal_pin(current, "current SO PIN")
    with t.pkcs11_errors("re-initialising the customer token"):
        lib.initToken(slot.slot, current, t.padded_label(label))
    if so_pin != current:
        session = t.open_session(lib, slot, "setting the SO PIN")
        try:
            with t.pkcs11_errors("setting the SO PIN"):
                session.login(current, PyKCS11.CKU_SO)
                session.setPin(current, so_pin)
                session.logout()
        finally:
            t.close_session(session)
    return _status(lib, _refresh(lib, slot)).to_dict()


def _customer_set_co_pin(lib: Any, args: Mapping[str, Any]) -> object:
    so_pin = t.reveal_pin(args["so_pin"], "SO PIN")
    co_pin = t.reveal_pin(args["co_pin"], "CO PIN")
    session = t.open_session(lib, _customer(lib), "setting the CO PIN")
    try:
        with t.pkcs11_errors("setting the CO PIN"):
            session.login(so_pin, PyKCS11.CKU_SO)
            session.initPin(co_pin)
            session.logout()
    finally:
        t.close_session(session)
    return None


def _customer_change_co_pin(lib: Any, args: Mapping[str, Any]) -> object:
    old = t.reveal_pin(args["old"], "current CO PIN")
    new = t.reveal_pin(args["new"], "new CO PIN")
    session = t.open_session(lib, _customer(lib), "changing the CO PIN")
    try:
        with t.pkcs11_errors("changing the CO PIN"):
            session.login(old)
            session.setPin(old, new)
            session.logout()
    finally:
        t.close_session(session)
    return None


def _customer_check_co_pin(lib: Any, args: Mapping[str, Any]) -> object:
    pin = t.reveal_pin(args["pin"], "CO PIN")
    session = t.open_session(lib, _customer(lib), "checking the CO PIN")
    try:
        try:
            session.login(pin)
        except PyKCS11.PyKCS11Error as exc:
            if exc.value == PyKCS11.CKR_PIN_INCORRECT:
                return {"match": False}
            raise t.translate(exc, "checking the CO PIN") from exc
        with t.pkcs11_errors("checking the CO PIN"):
            session.logout()
    finally:
        t.close_session(session)
    return {"match": True}


def _audit_ensure(lib: Any, args: Mapping[str, Any]) -> object:
    so_pin = t.reveal_pin(args["so_pin"], "SO PIN")
    user_pin = t.reveal_pin(args["user_pin"])
    slots = t.list_slots(lib)
    slot = t.find_audit(slots)
    if slot is None:
        slot = t.find_free(slots)
        with t.pkcs11_errors("creating the audit token"):
            lib.initToken(slot.slot, so_pin, t.padded_label(t.AUDIT_LABEL))
        slot = _refresh(lib, slot)
    session = t.open_session(lib, slot, "opening the audit token")
    try:
        with t.pkcs11_errors("setting the audit user PIN"):
            if not slot.user_pin_set:  # new, or interrupted before C_InitPIN
                session.login(so_pin, PyKCS11.CKU_SO)
                session.initPin(user_pin)
                session.logout()
            session.login(user_pin)
            session.logout()
    finally:
        t.close_session(session)
    return _status(lib, _refresh(lib, slot)).to_dict()


def _audit_session(lib: Any, user_pin: str | None, what: str) -> Any:
    slot = t.find_audit(t.list_slots(lib))
    if slot is None:
        raise t.TokenStateError("the audit token does not exist")
    session = t.open_session(lib, slot, what)
    if user_pin is not None:
        try:
            with t.pkcs11_errors(what):
                session.login(user_pin)
        except BaseException:
            t.close_session(session)
            raise
    return session


def _audit_keys(session: Any) -> list[t.AuditKey]:
    """Generations found by label among EC key objects (a login shows private keys)."""
    publics: set[int] = set()
    privates: set[int] = set()
    for cls, into in ((PyKCS11.CKO_PUBLIC_KEY, publics), (PyKCS11.CKO_PRIVATE_KEY, privates)):
        for obj in session.findObjects([(PyKCS11.CKA_CLASS, cls)]):
            (label,) = session.getAttributeValue(obj, [PyKCS11.CKA_LABEL])
            gen = t.key_generation(str(label))
            if gen is not None:
                into.add(gen)
    return [
        t.AuditKey(f"{t.AUDIT_KEY_PREFIX}{g}", g, g in privates) for g in sorted(publics | privates)
    ]


def _audit_generate(lib: Any, args: Mapping[str, Any]) -> object:
    session = _audit_session(lib, t.reveal_pin(args["user_pin"]), "generating an audit key")
    try:
        with t.pkcs11_errors("generating an audit key"):
            gen = max((k.generation for k in _audit_keys(session)), default=0) + 1
            label = f"{t.AUDIT_KEY_PREFIX}{gen}"
            ident = label.encode("ascii")
            public = [
                (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
                (PyKCS11.CKA_TOKEN, True),
                (PyKCS11.CKA_PRIVATE, False),
                (PyKCS11.CKA_VERIFY, True),
                (PyKCS11.CKA_EC_PARAMS, t.P256_PARAMS),
                (PyKCS11.CKA_LABEL, label),
                (PyKCS11.CKA_ID, ident),
            ]
            private = [
                (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
                (PyKCS11.CKA_TOKEN, True),
                (PyKCS11.CKA_PRIVATE, True),
                (PyKCS11.CKA_SENSITIVE, True),
                (PyKCS11.CKA_EXTRACTABLE, False),
                (PyKCS11.CKA_SIGN, True),
                (PyKCS11.CKA_LABEL, label),
                (PyKCS11.CKA_ID, ident),
            ]
            session.generateKeyPair(public, private, PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN))
            session.logout()
    finally:
        t.close_session(session)
    return {"label": label, "generation": gen, "has_private": True}


def _audit_list(lib: Any, args: Mapping[str, Any]) -> object:
    session = _audit_session(lib, t.reveal_pin(args["user_pin"]), "listing audit keys")
    try:
        with t.pkcs11_errors("listing audit keys"):
            keys = _audit_keys(session)
            session.logout()
    finally:
        t.close_session(session)
    return [
        {"label": k.label, "generation": k.generation, "has_private": k.has_private} for k in keys
    ]


def _audit_public(lib: Any, args: Mapping[str, Any]) -> object:
    label = str(args["label"])
    session = _audit_session(lib, None, "reading an audit public key")
    try:
        with t.pkcs11_errors("reading an audit public key"):
            found = session.findObjects(
                [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY), (PyKCS11.CKA_LABEL, label)]
            )
            if len(found) != 1:
                raise t.TokenStateError(
                    f"audit key {label!r}: {len(found)} public keys found", detail={"key": label}
                )
            params, point = session.getAttributeValue(
                found[0], [PyKCS11.CKA_EC_PARAMS, PyKCS11.CKA_EC_POINT], True
            )
    finally:
        t.close_session(session)
    return {"ec_params": bytes(params).hex(), "ec_point": bytes(point).hex()}


def _audit_destroy(lib: Any, args: Mapping[str, Any]) -> object:
    label = str(args["label"])
    gen = t.key_generation(label)
    if gen is None:
        raise UsageError(f"{label!r} is not an audit key label")
    session = _audit_session(lib, t.reveal_pin(args["user_pin"]), "destroying an audit key")
    try:
        with t.pkcs11_errors("destroying an audit key"):
            with_private = [k.generation for k in _audit_keys(session) if k.has_private]
            if gen not in with_private:
                raise t.TokenStateError(f"audit key {label!r} has no private key")
            if gen == max(with_private):
                raise t.TokenStateError(f"audit key {label!r} is the newest: rotate first")
            for obj in session.findObjects(
                [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, label)]
            ):
                session.destroyObject(obj)
            session.logout()
    finally:
        t.close_session(session)
    return None


def _customer_zeroize(lib_path: str) -> object:
    """Delete every initialised token but the audit token (normally just the one)."""
    with t.shared_library(lib_path) as lib:
        slots = t.list_slots(lib)
        audit = t.find_audit(slots)
    # The library is finalised here: softhsm2-util deletes the token directories alone.
    doomed = [s for s in slots if s.initialised and s.label != t.AUDIT_LABEL]
    deleted = []
    for slot in doomed:
        if not slot.serial or (audit is not None and audit.serial == slot.serial):
            raise t.TokenStateError(f"refusing to delete the token labelled {slot.label!r}")
        argv = ["softhsm2-util", "--delete-token", "--serial", slot.serial]
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise CommandFailed(
                "deleting the customer token failed",
                argv=argv,
                status=proc.returncode,
                output=proc.stdout + proc.stderr,
            )
        deleted.append(slot.serial)
    return {"deleted": deleted}


OPS: dict[str, Op] = {
    "customer_status": _customer_status,
    "customer_init": _customer_init,
    "customer_set_co_pin": _customer_set_co_pin,
    "customer_change_co_pin": _customer_change_co_pin,
    "customer_check_co_pin": _customer_check_co_pin,
    "customer_domain_set": _customer_domain_set,
    "audit_ensure": _audit_ensure,
    "audit_generate": _audit_generate,
    "audit_list": _audit_list,
    "audit_public": _audit_public,
    "audit_destroy": _audit_destroy,
}


# Operations that only read the token files; every other one may write (a login rewrites
# token.object) and holds the token store's lock exclusively for its whole run
# (:mod:`tokenlock`).
READ_ONLY = frozenset({"customer_status"})


def run(op: str, request: Mapping[str, Any]) -> object:
    lib_path = str(request.get("lib") or t.DEFAULT_LIB)
    args = request.get("args") or {}
    if not isinstance(args, dict):
        raise UsageError("args must be an object")
    if op != "customer_zeroize" and op not in OPS:
        raise UsageError(f"unknown token operation {op!r}")
    hold = tokenlock.shared if op in READ_ONLY else tokenlock.exclusive
    with hold():
        if op == "customer_zeroize":
            return _customer_zeroize(lib_path)
        with t.shared_library(lib_path) as lib:
            return OPS[op](lib, args)


def handle(request: Any, op: str | None = None) -> tuple[dict[str, object], int]:
    """One decoded request (``op`` from the command line, else the request's ``op``):
    the reply object and the exit status. Never raises."""
    reply: dict[str, object]
    code = 0
    try:
        if not isinstance(request, dict):
            raise UsageError("the request must be a JSON object")
        op = op if op is not None else request.get("op")
        if not isinstance(op, str):
            raise UsageError("the request names no operation")
        reply = {"result": run(op, request)}
    except HsmctlError as exc:
        reply, code = {"error": t.error_to_json(exc)}, exc.exit_code
    except Exception as exc:  # reported by class only: its text may hold a PIN
        reply = {"error": {"type": "TokenError", "message": f"internal {type(exc).__name__}"}}
        code = 1
    return reply, code


def _usage(message: str) -> tuple[dict[str, object], int]:
    exc = UsageError(message)
    return {"error": t.error_to_json(exc)}, exc.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--fork-server"]:
        return tokenforks.serve(handle)
    if len(argv) != 1:
        reply, code = _usage("usage: python3 -m hsmctl.appliance.tokencli OP < request.json")
    else:
        try:
            request = json.loads(sys.stdin.read())
        except ValueError:
            reply, code = _usage("the request on stdin is not JSON")
        else:
            reply, code = handle(request, argv[0])
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
