"""The appliance's tokens against real SoftHSM2 (no mocks), one token directory per test."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PyKCS11 = pytest.importorskip("PyKCS11")

from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import (  # noqa: E402
    Prehashed,
    encode_dss_signature,
)

from hsmctl.appliance import token as tok  # noqa: E402
from hsmctl.errors import ConflictError, UsageError  # noqa: E402
from hsmctl.secret import Secret  # noqa: E402

pytestmark = [
    pytest.mark.softhsm,
    pytest.mark.skipif(
        not Path(tok.DEFAULT_LIB).exists() or shutil.which("softhsm2-util") is None,
        reason="SoftHSM2 is not installed",
    ),
]

AUDIT_SO, AUDIT_USER = "audit-so-pin-1", "audit-user-pin-1"
SO, SO2, CO, CO2 = "cust-so-pin-1", "cust-so-pin-2", "cust-co-pin-1", "cust-co-pin-2"
ALL_PINS = (AUDIT_SO, AUDIT_USER, SO, SO2, CO, CO2)


@pytest.fixture(autouse=True)
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    yield tokens
    # No library may outlive a test: the next one has another token directory.
    assert not tok._LOADED


@pytest.fixture
def audit() -> tok.AuditKey:
    tok.audit_ensure_token(AUDIT_SO, AUDIT_USER)
    return tok.audit_generate_key(AUDIT_USER)


def verify(pem: str, digest: bytes, sig: bytes) -> None:
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


_ADD_OBJECTS = """
import json, sys, PyKCS11 as P
req = json.load(sys.stdin)
lib = P.PyKCS11Lib(); lib.load(req["lib"])
slot = next(s for s in lib.getSlotList(True)
            if lib.getTokenInfo(s).label.rstrip(" \\0") == req["label"])
se = lib.openSession(slot, P.CKF_RW_SESSION); se.login(req["pin"])
for i in range(req["public"]):
    se.createObject([(P.CKA_CLASS, P.CKO_DATA), (P.CKA_TOKEN, True),
                     (P.CKA_PRIVATE, False), (P.CKA_LABEL, "pub%d" % i)])
se.createObject([(P.CKA_CLASS, P.CKO_DATA), (P.CKA_TOKEN, True),
                 (P.CKA_PRIVATE, True), (P.CKA_LABEL, "secret")])
se.logout(); se.closeSession()
"""


def add_objects(label: str, co_pin: str, public: int) -> None:
    """Fill the customer token from another process (plus one private object)."""
    req = {"lib": tok.DEFAULT_LIB, "label": label, "pin": co_pin, "public": public}
    subprocess.run(
        [sys.executable, "-c", _ADD_OBJECTS], input=json.dumps(req), text=True, check=True
    )


def assert_no_pin(exc: BaseException) -> None:
    text = f"{exc!s} {exc!r} {getattr(exc, 'detail', '')}"
    for pin in ALL_PINS:
        assert pin not in text


# --- audit token --------------------------------------------------------------------


def test_audit_token_keygen_sign_verify() -> None:
    first = tok.audit_ensure_token(AUDIT_SO, AUDIT_USER)
    assert first.label == tok.AUDIT_LABEL and first.initialised and first.co_pin_set
    assert tok.audit_ensure_token(AUDIT_SO, AUDIT_USER).serial == first.serial  # idempotent
    assert not tok.customer_status().initialised  # the audit token is not the customer's

    k1 = tok.audit_generate_key(AUDIT_USER)
    k2 = tok.audit_generate_key(AUDIT_USER)
    assert (k1.label, k2.label) == ("audit-1", "audit-2")
    assert tok.audit_list_keys(AUDIT_USER) == [
        tok.AuditKey("audit-1", 1, True),
        tok.AuditKey("audit-2", 2, True),
    ]
    pem1, pem2 = tok.audit_public_key_pem("audit-1"), tok.audit_public_key_pem("audit-2")
    assert pem1.startswith("-----BEGIN PUBLIC KEY-----") and pem1 != pem2

    digest = hashlib.sha256(b"record").digest()
    with tok.AuditSigner(AUDIT_USER) as signer:
        assert signer.public_key_pem("audit-1") == pem1
        sig = signer.sign_digest("audit-1", digest)
        assert len(sig) == 64
        verify(pem1, digest, sig)
        with pytest.raises(InvalidSignature):
            verify(pem2, digest, sig)
        verify(pem2, digest, signer.sign_digest("audit-2", digest))
        with pytest.raises(UsageError):
            signer.sign_digest("audit-1", b"short")
        with pytest.raises(tok.TokenStateError):
            signer.sign_digest("audit-9", digest)
    assert signer.closed
    with pytest.raises(tok.TokenStateError):
        signer.sign_digest("audit-1", digest)
    verify(pem1, digest, tok.audit_sign_digest(AUDIT_USER, "audit-1", digest))


def test_audit_private_key_is_not_extractable(audit: tok.AuditKey) -> None:
    with tok.shared_library() as lib:
        slot = tok.find_audit(tok.list_slots(lib))
        assert slot is not None
        se = lib.openSession(slot.slot, PyKCS11.CKF_RW_SESSION)
        try:
            # Without login the private key is invisible.
            assert se.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)]) == []
            se.login(AUDIT_USER)
            (key,) = se.findObjects(
                [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, audit.label)]
            )
            attrs = [
                PyKCS11.CKA_TOKEN,
                PyKCS11.CKA_PRIVATE,
                PyKCS11.CKA_SENSITIVE,
                PyKCS11.CKA_EXTRACTABLE,
                PyKCS11.CKA_SIGN,
                PyKCS11.CKA_ALWAYS_SENSITIVE,
                PyKCS11.CKA_NEVER_EXTRACTABLE,
            ]
            assert se.getAttributeValue(key, attrs) == [True, True, True, False, True, True, True]
            (ident,) = se.getAttributeValue(key, [PyKCS11.CKA_ID], True)
            assert bytes(ident) == b"audit-1"
            # Reading the private value is refused by the token...
            template = PyKCS11.LowLevel.ckattrlist(1)
            template[0].SetType(PyKCS11.CKA_VALUE)
            rv = lib.lib.C_GetAttributeValue(se.session, key, template)
            assert rv == PyKCS11.CKR_ATTRIBUTE_SENSITIVE
            assert se.getAttributeValue(key, [PyKCS11.CKA_VALUE]) == [None]
            # ...and the protection cannot be switched off.
            for attr, value in ((PyKCS11.CKA_EXTRACTABLE, True), (PyKCS11.CKA_SENSITIVE, False)):
                with pytest.raises(PyKCS11.PyKCS11Error) as err:
                    se.setAttributeValue(key, [(attr, value)])
                assert err.value.value == PyKCS11.CKR_ATTRIBUTE_READ_ONLY
            se.logout()
        finally:
            se.closeSession()


def test_audit_rotation_destroys_old_private_key(audit: tok.AuditKey) -> None:
    pem1 = tok.audit_public_key_pem("audit-1")
    with pytest.raises(tok.TokenStateError, match="newest"):
        tok.audit_destroy_private_key(AUDIT_USER, "audit-1")
    tok.audit_generate_key(AUDIT_USER)
    tok.audit_destroy_private_key(AUDIT_USER, "audit-1")
    assert tok.audit_list_keys(AUDIT_USER) == [
        tok.AuditKey("audit-1", 1, False),
        tok.AuditKey("audit-2", 2, True),
    ]
    assert tok.audit_public_key_pem("audit-1") == pem1  # old checkpoints still verify
    with pytest.raises(tok.TokenStateError):
        tok.audit_destroy_private_key(AUDIT_USER, "audit-1")
    with pytest.raises(UsageError):
        tok.audit_destroy_private_key(AUDIT_USER, "customer-key")
    digest = hashlib.sha256(b"x").digest()
    with pytest.raises(tok.TokenStateError):
        tok.audit_sign_digest(AUDIT_USER, "audit-1", digest)
    verify(
        tok.audit_public_key_pem("audit-2"),
        digest,
        tok.audit_sign_digest(AUDIT_USER, "audit-2", digest),
    )
    assert tok.audit_generate_key(AUDIT_USER).label == "audit-3"  # generations never reused


def test_audit_errors() -> None:
    with pytest.raises(tok.TokenStateError):
        tok.AuditSigner(AUDIT_USER)  # no audit token yet
    with pytest.raises(tok.TokenStateError):
        tok.audit_generate_key(AUDIT_USER)
    tok.audit_ensure_token(AUDIT_SO, AUDIT_USER)
    with pytest.raises(tok.TokenAuthError) as err:
        tok.AuditSigner("wrong-user-pin")
    assert_no_pin(err.value)
    with pytest.raises(tok.TokenAuthError):
        tok.audit_ensure_token(AUDIT_SO, "wrong-user-pin")
    with pytest.raises(tok.TokenAuthError):
        tok.audit_list_keys("wrong-user-pin")
    with pytest.raises(tok.TokenPinError):
        tok.AuditSigner("123")


# --- customer token -----------------------------------------------------------------


def test_customer_init_and_reinit() -> None:
    tok.audit_ensure_token(AUDIT_SO, AUDIT_USER)
    empty = tok.customer_status()
    assert (empty.initialised, empty.label, empty.objects, empty.co_pin_set) == (
        False,
        "",
        0,
        False,
    )
    first = tok.customer_init("tenant-a", SO)
    assert (first.label, first.initialised, first.objects, first.co_pin_set) == (
        "tenant-a",
        True,
        0,
        False,
    )
    assert first.firmware == "2.6" and len(first.serial) == 16
    tok.customer_set_co_pin(SO, CO)
    add_objects("tenant-a", CO, public=3)
    before = tok.customer_status()
    assert before.objects == 3 and before.co_pin_set  # public objects only, no login

    with pytest.raises(tok.TokenStateError) as err:
        tok.customer_init("tenant-b", SO2)  # no current SO PIN
    assert isinstance(err.value, ConflictError)
    assert tok.customer_status() == before
    with pytest.raises(tok.TokenAuthError) as auth:
        tok.customer_init("tenant-b", SO2, current_so_pin="wrong-so-pin")
    assert auth.value.exit_code == 1
    assert_no_pin(auth.value)
    assert tok.customer_status() == before
    assert tok.customer_check_co_pin(CO)

    after = tok.customer_init("tenant-b", SO2, current_so_pin=SO)
    assert (after.label, after.serial, after.objects, after.co_pin_set) == (
        "tenant-b",
        before.serial,
        0,
        False,
    )
    # The SO PIN is now the new one.
    with pytest.raises(tok.TokenAuthError):
        tok.customer_set_co_pin(SO, CO)
    tok.customer_set_co_pin(SO2, CO)
    assert tok.customer_init("tenant-c", SO2, current_so_pin=SO2).label == "tenant-c"
    assert tok.audit_list_keys(AUDIT_USER) == []  # the audit token is still usable


def test_customer_co_pin() -> None:
    with pytest.raises(tok.TokenStateError):
        tok.customer_set_co_pin(SO, CO)  # not initialised
    tok.customer_init("tenant", SO)
    with pytest.raises(tok.TokenStateError):
        tok.customer_check_co_pin(CO)  # CO PIN not set yet
    with pytest.raises(tok.TokenAuthError):
        tok.customer_set_co_pin("wrong-so-pin", CO)
    assert not tok.customer_status().co_pin_set
    tok.customer_set_co_pin(SO, CO)
    assert tok.customer_status().co_pin_set
    assert tok.customer_check_co_pin(CO)
    assert not tok.customer_check_co_pin(CO2)
    with pytest.raises(tok.TokenAuthError) as err:
        tok.customer_change_co_pin("wrong-co-pin", CO2)
    assert_no_pin(err.value)
    tok.customer_change_co_pin(CO, CO2)
    assert tok.customer_check_co_pin(CO2) and not tok.customer_check_co_pin(CO)
    tok.customer_set_co_pin(SO, CO)  # the SO resets a forgotten CO PIN
    assert tok.customer_check_co_pin(CO)


def test_pin_and_label_validation() -> None:
    tok.customer_init("tenant", SO)
    for bad in ("123", "x" * 256, ""):
        with pytest.raises(tok.TokenPinError) as err:
            tok.customer_set_co_pin(SO, bad)
        assert isinstance(err.value, UsageError) and err.value.exit_code == 2
    with pytest.raises(UsageError):
        tok.customer_check_co_pin("abc")
    with pytest.raises(UsageError):
        tok.customer_init("x", "abc", current_so_pin=SO)
    tok.customer_set_co_pin(SO, Secret("y" * 255))  # the limits are inclusive
    assert tok.customer_check_co_pin(Secret("y" * 255))
    tok.customer_change_co_pin("y" * 255, "1234")
    assert tok.customer_check_co_pin("1234")
    for label in ("hsm-audit", "HSM-AUDIT", "", " padded", "x" * 33, "tab\there"):
        with pytest.raises(UsageError):
            tok.customer_init(label, SO2, current_so_pin=SO)
    assert tok.customer_status().label == "tenant"
    assert tok.customer_init("z" * 32, SO, current_so_pin=SO).label == "z" * 32


def _token_dirs(store: Path) -> list[Path]:
    """The tokens in a SoftHSM store: one directory each (the store also holds the token
    lock file, appliance/tokenlock.py)."""
    return [p for p in store.iterdir() if p.is_dir()]


def test_zeroize_keeps_audit_token(audit: tok.AuditKey, softhsm: Path) -> None:
    pem = tok.audit_public_key_pem(audit.label)
    assert tok.customer_zeroize().initialised is False  # nothing to do: a no-op
    tok.customer_init("tenant", SO)
    tok.customer_set_co_pin(SO, CO)
    add_objects("tenant", CO, public=2)
    serial = tok.customer_status().serial
    assert len(_token_dirs(softhsm)) == 2

    status = tok.customer_zeroize()
    assert (status.initialised, status.label, status.serial, status.objects) == (
        False,
        "",
        "",
        0,
    )
    assert not status.co_pin_set
    assert len(_token_dirs(softhsm)) == 1  # only the audit token is left
    assert tok.audit_list_keys(AUDIT_USER) == [audit]
    assert tok.audit_public_key_pem(audit.label) == pem
    digest = hashlib.sha256(b"after zeroize").digest()
    verify(pem, digest, tok.audit_sign_digest(AUDIT_USER, audit.label, digest))
    with pytest.raises(tok.TokenStateError):
        tok.customer_check_co_pin(CO)

    again = tok.customer_init("tenant-2", SO2)  # no current SO PIN: it is a new token
    assert again.initialised and again.objects == 0 and not again.co_pin_set
    assert again.serial != serial
    tok.customer_set_co_pin(SO2, CO2)
    assert tok.customer_check_co_pin(CO2)


_INIT_STRAY = """
import sys, PyKCS11 as P
lib = P.PyKCS11Lib(); lib.load(sys.argv[1])
free = next(s for s in lib.getSlotList(True)
            if not lib.getTokenInfo(s).flags & P.CKF_TOKEN_INITIALIZED)
lib.initToken(free, sys.stdin.read(), "stray".ljust(32))
"""


def test_zeroize_removes_a_stray_second_token(audit: tok.AuditKey) -> None:
    tok.customer_init("tenant", SO)
    subprocess.run(
        [sys.executable, "-c", _INIT_STRAY, tok.DEFAULT_LIB], input=SO2, text=True, check=True
    )
    with pytest.raises(tok.TokenStateError, match="more than one customer token"):
        tok.customer_status()
    with pytest.raises(tok.TokenStateError):
        tok.customer_init("tenant", SO, current_so_pin=SO)
    assert not tok.customer_zeroize().initialised
    assert tok.audit_list_keys(AUDIT_USER) == [audit]
    assert tok.customer_init("tenant", SO).initialised


def test_softhsm_caches_the_token_list_per_process() -> None:
    """Why customer operations run in a fresh process: a loaded library misses new tokens."""
    tok.audit_ensure_token(AUDIT_SO, AUDIT_USER)
    with tok.shared_library() as lib:
        tok.customer_init("tenant", SO)
        assert tok.find_customer(tok.list_slots(lib)) is None  # stale view
        assert tok.customer_status().label == "tenant"  # fresh view
    with tok.shared_library() as lib:  # loaded again: current
        customer = tok.find_customer(tok.list_slots(lib))
        assert customer is not None and customer.label == "tenant"


def test_signer_survives_customer_operations(audit: tok.AuditKey) -> None:
    pem1 = tok.audit_public_key_pem(audit.label)
    stop = threading.Event()
    signed: list[tuple[bytes, bytes]] = []
    failures: list[BaseException] = []
    with tok.AuditSigner(AUDIT_USER) as signer:

        def sign_loop() -> None:
            n = 0
            while not stop.is_set():
                digest = hashlib.sha256(str(n).encode()).digest()
                try:
                    signed.append((digest, signer.sign_digest(audit.label, digest)))
                except BaseException as exc:
                    failures.append(exc)
                    return
                n += 1
                time.sleep(0.001)

        worker = threading.Thread(target=sign_loop)
        worker.start()
        try:
            for round_ in range(3):
                tok.customer_init(f"tenant-{round_}", SO)
                tok.customer_set_co_pin(SO, CO)
                assert tok.customer_check_co_pin(CO)
                tok.customer_init(f"tenant-{round_}b", SO, current_so_pin=SO)
                assert tok.customer_zeroize().initialised is False
        finally:
            stop.set()
            worker.join()
        assert not failures, failures
        assert len(signed) > 10
        # A key made by another process while the signer is open is usable at once.
        k2 = tok.audit_generate_key(AUDIT_USER)
        digest = hashlib.sha256(b"rotation").digest()
        verify(tok.audit_public_key_pem(k2.label), digest, signer.sign_digest(k2.label, digest))
        verify(pem1, digest, signer.sign_digest(audit.label, digest))
        # Destroying the old private key elsewhere makes the cached handle fail cleanly.
        tok.audit_destroy_private_key(AUDIT_USER, audit.label)
        with pytest.raises(tok.TokenError):
            signer.sign_digest(audit.label, digest)
        verify(tok.audit_public_key_pem(k2.label), digest, signer.sign_digest(k2.label, digest))
    for digest, sig in signed:
        verify(pem1, digest, sig)


def test_pins_never_on_a_command_line() -> None:
    seen: set[str] = set()
    stop = threading.Event()
    me = os.getpid()

    def watch() -> None:
        while not stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or int(entry.name) == me:
                    continue
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                        seen.add(f.read().decode("utf-8", "replace"))
                except OSError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        tok.audit_ensure_token(AUDIT_SO, AUDIT_USER)
        tok.audit_generate_key(AUDIT_USER)
        tok.customer_init("tenant", SO)
        tok.customer_set_co_pin(SO, CO)
        tok.customer_change_co_pin(CO, CO2)
        tok.customer_check_co_pin(CO2)
        tok.customer_init("tenant", SO2, current_so_pin=SO)
        tok.customer_zeroize()
    finally:
        stop.set()
        watcher.join()
    # the watcher works: it saw the helper (a child of the fork server, or a fresh process)
    assert any("hsmctl.appliance.token" in cmd for cmd in seen)
    for cmd in seen:
        for pin in ALL_PINS:
            assert pin not in cmd, cmd
