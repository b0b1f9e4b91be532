"""Hand-off bundles, tenant identities and tenant-signed documents, with real OpenSSH keys.

Keys are made by ``ssh-keygen`` so the OpenSSH formats are the real ones, and the bundle
format is checked against an independent implementation of docs/crypto.md (signature and
decryption written here from the spec, not by calling the library).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
    load_ssh_private_key,
)

from hsmctl.auditlog.signing import SoftwareSigner
from hsmctl.errors import HsmctlError, IntegrityError, UsageError
from hsmctl.handoff import (
    BundleExpired,
    OpenedBundle,
    TenantIdentity,
    bundle_id,
    ensure_provider_signing_key,
    make_bundle,
    make_release,
    open_bundle,
    read_bundle,
    sign_document,
    ssh_fingerprint,
    verify_document,
    verify_release,
    write_bundle,
    write_document,
)
from hsmctl.handoff.identity import load_provider_public_key
from hsmctl.secret import Secret

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen"),
]

OTP = "otp-Zq8!correct-horse-ünïcode-7f3a"
NOW = datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)
VALIDITY = timedelta(hours=24)

# The pinned layout: the exact top-level members of a bundle (mgmt_ip is optional).
BUNDLE_FIELDS = {
    "format",
    "appliance",
    "serial",
    "tenant",
    "data_ip",
    "data_host_keys",
    "data_host_key_fingerprints",
    "mgmt_ip",
    "audit_public_key",
    "audit_key_id",
    "issued_at",
    "expires_at",
    "request_id",
    "otp",
    "recipient",
    "signature",
}
OTP_FIELDS = ("alg", "epk", "nonce", "ct")
SIG_FIELDS = ("alg", "key_id", "sig")


def keygen(
    path: Path, *, kind: str = "ecdsa", bits: int | None = 256, passphrase: str = ""
) -> Path:
    argv = ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", f"test@{path.name}", "-f"]
    if bits is not None:
        argv[4:4] = ["-b", str(bits)]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)
    return path


def canonical(obj: object) -> bytes:
    """The spec's canonical JSON, written out here rather than imported."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Keys:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tenant = keygen(root / "tenant_id")
        self.other_tenant = keygen(root / "other_id")
        self.tenant_pub = (root / "tenant_id.pub").read_text().strip()
        self.host_key_files = [
            keygen(root / "host_ed25519", kind="ed25519", bits=None),
            keygen(root / "host_ecdsa"),
        ]
        self.host_keys = [Path(f"{p}.pub").read_text().strip() for p in self.host_key_files]
        self.provider_key, self.provider_pub = ensure_provider_signing_key(root / "provider")
        other_key, self.other_provider_pub = ensure_provider_signing_key(root / "provider2")
        self.other_provider_key = other_key
        self.audit_pem = SoftwareSigner.generate().public_key_pem


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


def new_bundle(keys: Keys, **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "appliance": "hsm-0001",
        "serial": "LUNA-7-000123",
        "tenant": "contoso",
        "data_ip": "10.20.0.5",
        "mgmt_ip": "192.168.50.11",
        "data_host_keys": keys.host_keys,
        "audit_public_key": keys.audit_pem,
        "request_id": "req-42",
        "otp": Secret(OTP),
        "tenant_public_key_line": keys.tenant_pub,
        "provider_signing_key_path": keys.provider_key,
        "validity": VALIDITY,
        "now": NOW,
    }
    args.update(over)
    return make_bundle(**args)


@pytest.fixture(scope="module")
def bundle(keys: Keys) -> dict[str, Any]:
    return new_bundle(keys)


def open_(keys: Keys, b: dict[str, Any], tmp_path: Path, **kw: Any) -> OpenedBundle:
    path = write_bundle(tmp_path / f"bundle-{os.urandom(3).hex()}.json", b)
    kw.setdefault("now", NOW + timedelta(minutes=5))
    return open_bundle(path, keys.provider_pub.read_text(), keys.tenant, **kw)


def resign(b: dict[str, Any], provider_key: Path) -> dict[str, Any]:
    """Sign a bundle the way the spec says, with our own code (an authentic re-signature)."""
    key = load_pem_private_key(provider_key.read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    body = {k: v for k, v in b.items() if k != "signature"}
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return body | {
        "signature": {
            "alg": "Ed25519",
            "key_id": hashlib.sha256(spki).hexdigest(),
            "sig": base64.b64encode(key.sign(canonical(body))).decode(),
        }
    }


# --- round trip and format ------------------------------------------------------------


def test_round_trip(keys: Keys, bundle: dict[str, Any], tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "b.json", bundle)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert OTP.encode() not in path.read_bytes()
    assert read_bundle(path) == bundle

    opened = open_bundle(path, keys.provider_pub, keys.tenant, now=NOW + timedelta(hours=1))
    assert opened.otp == Secret(OTP) and opened.otp.reveal() == OTP
    assert (opened.appliance, opened.serial, opened.tenant) == (
        "hsm-0001",
        "LUNA-7-000123",
        "contoso",
    )
    assert (opened.data_ip, opened.mgmt_ip, opened.request_id) == (
        "10.20.0.5",
        "192.168.50.11",
        "req-42",
    )
    assert opened.issued_at == NOW and opened.expires_at == NOW + VALIDITY
    assert not opened.expired
    assert opened.bundle_id == bundle_id(bundle) == hashlib.sha256(canonical(bundle)).hexdigest()
    assert opened.recipient == TenantIdentity.load(keys.tenant).fingerprint
    # host keys are stored without their comments; fingerprints are ssh-keygen's own
    assert list(opened.data_host_keys) == [" ".join(k.split()[:2]) for k in keys.host_keys]
    for pub_file, fp in zip(keys.host_key_files, opened.data_host_key_fingerprints, strict=True):
        out = subprocess.run(
            ["ssh-keygen", "-lf", f"{pub_file}.pub"], check=True, capture_output=True, text=True
        ).stdout
        assert out.split()[1] == fp
    assert opened.audit_public_key == keys.audit_pem
    assert opened.audit_key_id == bundle["audit_key_id"]


def test_layout_is_pinned(keys: Keys, bundle: dict[str, Any]) -> None:
    assert set(bundle) == BUNDLE_FIELDS
    assert bundle["format"] == "hsmctl-handoff/1"
    assert bundle["issued_at"] == "2025-01-31T12:00:00Z"
    assert bundle["expires_at"] == "2025-02-01T12:00:00Z"
    assert tuple(sorted(bundle["otp"])) == tuple(sorted(OTP_FIELDS))
    assert bundle["otp"]["alg"] == "ECIES-P256-HKDF-SHA256-AES256GCM"
    assert tuple(sorted(bundle["signature"])) == tuple(sorted(SIG_FIELDS))
    assert bundle["signature"]["alg"] == "Ed25519"
    audit = load_pem_public_key(keys.audit_pem.encode())
    spki = audit.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert bundle["audit_key_id"] == hashlib.sha256(spki).hexdigest()
    blob = base64.b64decode(keys.tenant_pub.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert bundle["recipient"] == f"SHA256:{digest}"
    no_mgmt = new_bundle(keys, mgmt_ip=None)
    assert set(no_mgmt) == BUNDLE_FIELDS - {"mgmt_ip"}


def test_provider_signature_verifies_independently(keys: Keys, bundle: dict[str, Any]) -> None:
    pub = load_pem_public_key(keys.provider_pub.read_bytes())
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    spki = pub.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert bundle["signature"]["key_id"] == hashlib.sha256(spki).hexdigest()
    body = {k: v for k, v in bundle.items() if k != "signature"}
    pub.verify(base64.b64decode(bundle["signature"]["sig"]), canonical(body))  # raises if bad


def test_otp_decrypts_independently(keys: Keys, bundle: dict[str, Any]) -> None:
    """ECIES exactly as docs/crypto.md states it, with the key read by cryptography."""
    key = load_ssh_private_key(keys.tenant.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    box = bundle["otp"]
    epk = base64.b64decode(box["epk"])
    rpk = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), epk)
    aead_key = HKDF(
        algorithm=SHA256(),
        length=32,
        salt=epk + rpk,
        info=b"hsmctl handoff v1" + bundle["appliance"].encode(),
    ).derive(key.exchange(ec.ECDH(), peer))
    aad = canonical({k: v for k, v in bundle.items() if k not in ("otp", "signature")})
    nonce = base64.b64decode(box["nonce"])
    assert len(nonce) == 12
    plain = AESGCM(aead_key).decrypt(nonce, base64.b64decode(box["ct"]), aad)
    assert plain.decode() == OTP


def test_each_bundle_encrypts_afresh(keys: Keys, bundle: dict[str, Any]) -> None:
    again = new_bundle(keys)
    assert again["otp"]["epk"] != bundle["otp"]["epk"]
    assert again["otp"]["ct"] != bundle["otp"]["ct"]


# --- who may open it ------------------------------------------------------------------


def test_other_tenant_identity_is_refused(
    keys: Keys, bundle: dict[str, Any], tmp_path: Path
) -> None:
    path = write_bundle(tmp_path / "b.json", bundle)
    with pytest.raises(UsageError, match="another tenant identity") as exc:
        open_bundle(path, keys.provider_pub, keys.other_tenant, now=NOW)
    assert exc.value.exit_code == 2
    assert not isinstance(exc.value, IntegrityError)


def test_bundle_made_for_other_tenant_opens_only_with_theirs(keys: Keys, tmp_path: Path) -> None:
    other = TenantIdentity.load(keys.other_tenant)
    b = new_bundle(keys, tenant_public_key_line=other.public_key_line)
    path = write_bundle(tmp_path / "b.json", b)
    assert open_bundle(path, keys.provider_pub, keys.other_tenant, now=NOW).otp.reveal() == OTP
    with pytest.raises(UsageError):
        open_bundle(path, keys.provider_pub, keys.tenant, now=NOW)


def test_wrong_provider_key(keys: Keys, bundle: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="another provider key") as exc:
        open_bundle(
            write_bundle(tmp_path / "b.json", bundle),
            keys.other_provider_pub,
            keys.tenant,
            now=NOW,
        )
    assert exc.value.exit_code == 3


def test_forged_by_another_provider_key_claiming_the_right_key_id(
    keys: Keys, bundle: dict[str, Any], tmp_path: Path
) -> None:
    forged = resign(bundle, keys.other_provider_key)
    forged["signature"]["key_id"] = bundle["signature"]["key_id"]
    with pytest.raises(IntegrityError, match="does not verify"):
        open_(keys, forged, tmp_path)


def test_resigned_control_opens(keys: Keys, bundle: dict[str, Any], tmp_path: Path) -> None:
    """The test's own signer is a faithful one: the AAD test below depends on it."""
    assert resign(bundle, keys.provider_key) == bundle
    assert open_(keys, resign(bundle, keys.provider_key), tmp_path).otp.reveal() == OTP


# --- tampering ------------------------------------------------------------------------


def _flip(value: Any) -> Any:
    if isinstance(value, str):
        i = len(value) // 2
        return value[:i] + ("B" if value[i] != "B" else "C") + value[i + 1 :]
    if isinstance(value, list):
        return [*value[:-1], _flip(value[-1])]
    raise AssertionError(f"no mutation for {type(value)}")


TAMPER_PATHS = sorted(
    [(f,) for f in BUNDLE_FIELDS - {"otp", "signature"}]
    + [("otp", f) for f in OTP_FIELDS]
    + [("signature", f) for f in SIG_FIELDS]
)


@pytest.mark.parametrize("where", TAMPER_PATHS, ids=".".join)
def test_every_field_tampered(
    keys: Keys, bundle: dict[str, Any], tmp_path: Path, where: tuple[str, ...]
) -> None:
    b = copy.deepcopy(bundle)
    holder = b
    for part in where[:-1]:
        holder = holder[part]
    holder[where[-1]] = _flip(holder[where[-1]])
    assert b != bundle
    # everything is covered by the signature, which is checked first
    expected = {
        ("signature", "alg"): "unsupported signature algorithm",
        ("signature", "key_id"): "another provider key",
    }.get(where, "signature does not verify")
    with pytest.raises(IntegrityError, match=expected) as exc:
        open_(keys, b, tmp_path)
    assert exc.value.exit_code == 3 and not isinstance(exc.value, BundleExpired)
    assert OTP not in str(exc.value)


@pytest.mark.parametrize("where", TAMPER_PATHS, ids=".".join)
def test_every_field_removed(
    keys: Keys, bundle: dict[str, Any], tmp_path: Path, where: tuple[str, ...]
) -> None:
    b = copy.deepcopy(bundle)
    holder = b
    for part in where[:-1]:
        holder = holder[part]
    del holder[where[-1]]
    with pytest.raises(IntegrityError):
        open_(keys, b, tmp_path)


def test_field_added(keys: Keys, bundle: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(IntegrityError):
        open_(keys, bundle | {"note": "hello"}, tmp_path)
    with pytest.raises(IntegrityError):
        open_(keys, bundle | {"otp": bundle["otp"] | {"x": "y"}}, tmp_path)


def test_non_canonical_signature_base64(keys: Keys, bundle: dict[str, Any], tmp_path: Path) -> None:
    """The last base64 character of a 64-byte signature has 4 spare bits; editing only
    those must still count as tampering."""
    sig = bundle["signature"]["sig"]
    assert sig.endswith("==")
    last = sig[-3]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = alphabet[alphabet.index(last) ^ 1]  # differs only in the unused low bit
    edited = sig[:-3] + twin + "=="
    assert base64.b64decode(edited) == base64.b64decode(sig)
    b = copy.deepcopy(bundle)
    b["signature"]["sig"] = edited
    with pytest.raises(IntegrityError, match="non-canonical"):
        open_(keys, b, tmp_path)


def test_duplicate_json_member(keys: Keys, bundle: dict[str, Any], tmp_path: Path) -> None:
    text = canonical(bundle).decode()
    path = tmp_path / "dup.json"
    path.write_text(text[:-1] + ',"appliance":"hsm-9999"}')
    path.chmod(0o600)
    with pytest.raises(IntegrityError, match="duplicate"):
        open_bundle(path, keys.provider_pub, keys.tenant, now=NOW)


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"format": NaN}'])
def test_garbage_file(keys: Keys, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "g.json"
    path.write_bytes(content)
    with pytest.raises(IntegrityError):
        open_bundle(path, keys.provider_pub, keys.tenant, now=NOW)


def test_missing_bundle_file(keys: Keys, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        open_bundle(tmp_path / "nope.json", keys.provider_pub, keys.tenant, now=NOW)


@pytest.mark.parametrize(
    "over",
    [
        {"appliance": "hsm-0002"},  # same key info differs: HKDF and AAD both catch it
        {"request_id": "req-43"},  # same appliance: only the AAD catches it
    ],
    ids=["other-appliance", "same-appliance-other-request"],
)
def test_ciphertext_moved_to_another_bundle(
    keys: Keys, bundle: dict[str, Any], tmp_path: Path, over: dict[str, str]
) -> None:
    target = new_bundle(keys, **over)
    moved = resign(target | {"otp": bundle["otp"]}, keys.provider_key)  # authentic signature
    with pytest.raises(IntegrityError, match="does not decrypt") as exc:
        open_(keys, moved, tmp_path)
    assert OTP not in str(exc.value)


# --- expiry ---------------------------------------------------------------------------


def test_expiry(keys: Keys, bundle: dict[str, Any], tmp_path: Path) -> None:
    just_before = NOW + VALIDITY - timedelta(seconds=1)
    assert not open_(keys, bundle, tmp_path, now=just_before).expired
    later = NOW + VALIDITY
    with pytest.raises(BundleExpired, match="expired") as exc:
        open_(keys, bundle, tmp_path, now=later)
    assert exc.value.exit_code == 3 and isinstance(exc.value, IntegrityError)
    opened = open_(keys, bundle, tmp_path, now=later, allow_expired=True)
    assert opened.expired and opened.otp.reveal() == OTP


def test_signature_is_checked_before_expiry_and_recipient(
    keys: Keys, bundle: dict[str, Any], tmp_path: Path
) -> None:
    b = copy.deepcopy(bundle)
    b["recipient"] = TenantIdentity.load(keys.other_tenant).fingerprint
    path = write_bundle(tmp_path / "b.json", b)
    later = NOW + 2 * VALIDITY
    with pytest.raises(IntegrityError) as exc:
        open_bundle(path, keys.provider_pub, keys.other_tenant, now=later)
    assert type(exc.value) is IntegrityError  # not BundleExpired, not UsageError


def test_expired_bundle_for_another_identity_reports_expiry(
    keys: Keys, bundle: dict[str, Any], tmp_path: Path
) -> None:
    path = write_bundle(tmp_path / "b.json", bundle)
    with pytest.raises(BundleExpired):
        open_bundle(path, keys.provider_pub, keys.other_tenant, now=NOW + 2 * VALIDITY)


# --- secrets never leak ---------------------------------------------------------------


def _failures(keys: Keys, bundle: dict[str, Any], tmp_path: Path) -> Iterator[BaseException]:
    cases: list[Callable[[], object]] = [
        lambda: open_bundle(
            write_bundle(tmp_path / "a.json", bundle), keys.provider_pub, keys.other_tenant, now=NOW
        ),
        lambda: open_(keys, bundle, tmp_path, now=NOW + 2 * VALIDITY),
        lambda: open_(
            keys,
            resign(new_bundle(keys, request_id="r2") | {"otp": bundle["otp"]}, keys.provider_key),
            tmp_path,
        ),
        lambda: open_(keys, bundle | {"tenant": "x"}, tmp_path),
        lambda: new_bundle(keys, tenant_public_key_line="ssh-ed25519 AAAA"),
        lambda: new_bundle(keys, validity=timedelta(0)),
    ]
    for case in cases:
        with pytest.raises(HsmctlError) as exc:
            case()
        yield exc.value


def test_otp_never_in_text(
    keys: Keys, bundle: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    opened = open_(keys, bundle, tmp_path)
    texts = [repr(opened), str(opened), f"{opened}", json.dumps(bundle), caplog.text]
    for err in _failures(keys, bundle, tmp_path):
        texts += [str(err), repr(err), repr(getattr(err, "detail", None))]
        cause = err.__cause__
        while cause is not None:
            texts += [str(cause), repr(cause)]
            cause = cause.__cause__
    assert texts and all(OTP not in t for t in texts)
    assert "***" in repr(opened.otp) and OTP not in repr(opened.otp)


# --- identities -----------------------------------------------------------------------


def test_identity_is_usable_by_openssh(keys: Keys) -> None:
    ident = TenantIdentity.load(keys.tenant)
    printed = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(keys.tenant)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert " ".join(printed[:2]) == ident.public_key_line
    listed = subprocess.run(
        ["ssh-keygen", "-lf", str(keys.tenant)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert listed[1] == ident.fingerprint == ssh_fingerprint(keys.tenant_pub)
    assert ident.fingerprint in repr(ident)


def test_created_identity_is_usable_by_openssh(tmp_path: Path) -> None:
    path = tmp_path / "id_new"
    ident = TenantIdentity.create(path, comment="ops@contoso")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    printed = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(path)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert " ".join(printed[:2]) == ident.public_key_line
    assert Path(f"{path}.pub").read_text().split()[:2] == printed[:2]
    assert TenantIdentity.load(path).fingerprint == ident.fingerprint
    with pytest.raises(UsageError, match="exists"):
        TenantIdentity.create(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_identity_open_to_others_is_refused(keys: Keys, tmp_path: Path, mode: int) -> None:
    loose = tmp_path / "id"
    shutil.copyfile(keys.tenant, loose)
    loose.chmod(mode)
    with pytest.raises(UsageError, match="too open") as exc:
        TenantIdentity.load(loose)
    assert exc.value.exit_code == 2


def test_encrypted_identity_is_refused(tmp_path: Path) -> None:
    path = keygen(tmp_path / "enc", passphrase="hunter2-passphrase")
    with pytest.raises(UsageError, match="passphrase") as exc:
        TenantIdentity.load(path)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize(("kind", "bits"), [("ed25519", None), ("ecdsa", 384), ("rsa", 2048)])
def test_identity_of_another_algorithm_is_refused(
    tmp_path: Path, kind: str, bits: int | None
) -> None:
    path = keygen(tmp_path / "k", kind=kind, bits=bits)
    with pytest.raises(UsageError, match="P-256"):
        TenantIdentity.load(path)


def test_not_a_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_text("hello\n")
    path.chmod(0o600)
    with pytest.raises(UsageError, match="not an OpenSSH private key"):
        TenantIdentity.load(path)
    with pytest.raises(UsageError):
        TenantIdentity.load(tmp_path / "missing")


def test_make_bundle_refuses_a_non_p256_tenant_key(keys: Keys, tmp_path: Path) -> None:
    ed = keygen(tmp_path / "ed", kind="ed25519", bits=None)
    with pytest.raises(UsageError, match="tenant"):
        new_bundle(keys, tenant_public_key_line=Path(f"{ed}.pub").read_text())
    with pytest.raises(UsageError):
        new_bundle(keys, data_host_keys=[])
    with pytest.raises(UsageError):
        new_bundle(keys, otp=Secret(""))


def test_provider_signing_key(tmp_path: Path) -> None:
    d = tmp_path / "state"
    priv, pub = ensure_provider_signing_key(d)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert (priv.name, pub.name) == ("signing_key.pem", "signing_key.pub.pem")
    first = priv.read_bytes()
    pub.unlink()
    assert ensure_provider_signing_key(d) == (priv, pub)
    assert priv.read_bytes() == first  # not regenerated
    key = load_pem_private_key(first, None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert load_provider_public_key(pub).public_bytes(
        Encoding.Raw, PublicFormat.Raw
    ) == key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert load_provider_public_key(str(pub)) is not None  # a str path works too
    priv.chmod(0o640)
    with pytest.raises(UsageError, match="too open"):
        ensure_provider_signing_key(d)


# --- tenant-signed documents ----------------------------------------------------------


def test_signed_document_round_trip(keys: Keys, tmp_path: Path) -> None:
    doc = {"format": "x-receipt/1", "appliance": "hsm-0001", "checks": [{"name": "a", "ok": True}]}
    signed = sign_document(doc, keys.tenant)
    assert set(signed) == {*doc, "signature"}
    sig = signed["signature"]
    assert sig["alg"] == "ECDSA-P256-SHA256"
    assert sig["key"] == TenantIdentity.load(keys.tenant).public_key_line
    assert sig["fingerprint"] == ssh_fingerprint(keys.tenant_pub)
    verify_document(signed)
    verify_document(signed, keys.tenant_pub)
    # independently: ECDSA P-256/SHA-256, DER, over the canonical JSON without "signature"
    key = load_ssh_private_key(keys.tenant.read_bytes(), None).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(base64.b64decode(sig["sig"]), canonical(doc), ec.ECDSA(SHA256()))
    path = write_document(tmp_path / "r.json", signed)
    verify_document(json.loads(path.read_text()), keys.tenant_pub)


def test_signed_document_tampered(keys: Keys) -> None:
    signed = sign_document({"appliance": "hsm-0001", "seq": 17, "note": "ok"}, keys.tenant)
    for field, value in [("appliance", "hsm-0002"), ("seq", 18), ("note", "ok ")]:
        with pytest.raises(IntegrityError):
            verify_document(signed | {field: value})
    with pytest.raises(IntegrityError):
        verify_document(signed | {"extra": 1})
    for field in ("alg", "key", "fingerprint", "sig"):
        bad = copy.deepcopy(signed)
        bad["signature"][field] = _flip(bad["signature"][field])
        with pytest.raises(IntegrityError):
            verify_document(bad)
    with pytest.raises(IntegrityError):
        verify_document({k: v for k, v in signed.items() if k != "signature"})


def test_signed_document_by_another_identity(keys: Keys) -> None:
    """A self-consistent signature by someone else is still refused when a key is expected."""
    signed = sign_document({"appliance": "hsm-0001"}, keys.other_tenant)
    verify_document(signed)
    with pytest.raises(IntegrityError, match="expected"):
        verify_document(signed, keys.tenant_pub)


def test_release(keys: Keys) -> None:
    rel = make_release("hsm-0001", "contoso", keys.tenant, reason="end of contract", now=NOW)
    assert {k: v for k, v in rel.items() if k != "signature"} == {
        "format": "hsmctl-release/1",
        "appliance": "hsm-0001",
        "tenant": "contoso",
        "issued_at": "2025-01-31T12:00:00Z",
        "reason": "end of contract",
    }
    ok = {"appliance": "hsm-0001", "tenant": "contoso", "tenant_public_key_line": keys.tenant_pub}
    verify_release(rel, **ok)
    verify_release(rel, **ok, not_before=NOW + timedelta(microseconds=500))
    with pytest.raises(UsageError, match="hsm-0002"):
        verify_release(rel, **ok | {"appliance": "hsm-0002"})
    with pytest.raises(UsageError):
        verify_release(rel, **ok | {"tenant": "fabrikam"})
    other_pub = TenantIdentity.load(keys.other_tenant).public_key_line
    with pytest.raises(IntegrityError):
        verify_release(rel, **ok | {"tenant_public_key_line": other_pub})
    with pytest.raises(IntegrityError, match="replayed"):
        verify_release(rel, **ok, not_before=NOW + timedelta(days=1))
    with pytest.raises(IntegrityError):
        verify_release(rel | {"appliance": "hsm-0002"}, **ok)
    assert "reason" not in make_release("hsm-0001", "contoso", keys.tenant)
