"""Cloning domain, backup and restore end to end (SPEC §12, issue 12 items 1-2): three
appliances of one tenant taken over with ``hsmctl takeover`` into one state directory,
hsm45 and hsm46 in domain A, hsm47 in domain B; keys made and used through hsmctl's own
crypto-officer kit (real sshd, p11-kit remote, the key-policy layer, SoftHSM).

Appliances: ``APPLIANCE_SETS["keys"][:3]`` (hsm45, hsm46, hsm47).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsmctl.appliance import domainkey
from tests.conftest import APPLIANCE_SETS, HSMCTL, ensure_lab
from tests.lab.p11_helpers import CLIENT_SO, PYTHON
from tests.lab.takeover_helpers import (
    Rig,
    audit_records,
    console,
    escrowed,
    provision_all,
    takeover_cli,
)

pytestmark = pytest.mark.lab

TENANT = "tenant1"
A, B, C = APPLIANCE_SETS["keys"][:3]
SECRET_A = "domain-A-secret-for-the-keys-tests-1"
SECRET_B = "domain-B-secret-for-the-keys-tests-2"


@dataclass
class Domains:
    conf: Path
    netns: str
    base: Path
    files: dict[str, Path]
    since: dict[str, int]  # each appliance's log position before this module's takeover

    def hsmctl(self, *args: str, check: bool = True,
               timeout: float = 600) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        argv = ["ip", "netns", "exec", self.netns, HSMCTL, "--config", str(self.conf), *args]
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        if check:
            assert proc.returncode == 0, (args, proc.stderr.decode()[-3000:])
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.hsmctl(*args, "--json").stdout)

    def state(self, appliance: str) -> Path:
        return self.base / "customer" / f"{TENANT}-state" / "appliances" / appliance

    def pin(self, appliance: str) -> str:
        pin = escrowed(self.conf, appliance, "co-pin")
        assert pin is not None
        return pin

    def remote(self, appliance: str) -> str:
        from hsmctl.clients import kit
        from hsmctl.keys.workflow import remote_of

        own = self.state(appliance) / "clients" / kit.own_client_name(socket.gethostname())
        return remote_of(own)

    def remote_ready(self, appliance: str) -> None:
        """hsmctl's own kit for ``appliance`` (``key list`` registers it on first use)."""
        from hsmctl.clients import kit

        own = self.state(appliance) / "clients" / kit.own_client_name(socket.gethostname())
        if not own.is_dir():
            self.json("key", "list", appliance)

    def p11(self, appliance: str, body: str, data: Any = None) -> Any:
        """A python-pkcs11 script through hsmctl's own kit (PIN on stdin); ``out``."""
        req = {"remote": self.remote(appliance), "pin": self.pin(appliance), "data": data}
        code = _P11_PRELUDE + body + "\nprint(json.dumps(out))\n"
        proc = subprocess.run(
            ["ip", "netns", "exec", self.netns, PYTHON, "-c", code],
            input=json.dumps(req).encode(), capture_output=True, timeout=600, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return json.loads(proc.stdout.decode().splitlines()[-1])

    def keys(self, appliance: str) -> list[tuple[str, str]]:
        listed = self.json("key", "list", appliance)
        return sorted((k["label"], k["id"]) for k in listed["keys"])

    def objects(self, appliance: str) -> list[tuple[str, str, str]]:
        """Every key object (class, label, id), the domain key left out."""
        self.remote_ready(appliance)
        out = self.p11(appliance, _LIST)
        return sorted(tuple(x) for x in out["objects"])


_P11_PRELUDE = f"""
import hashlib, json, os, sys
req = json.load(sys.stdin)
os.environ["P11_KIT_SERVER_ADDRESS"] = req["remote"]
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
lib_path = {CLIENT_SO!r}
lib = pkcs11.lib(lib_path)
(token,) = list(lib.get_tokens())
se = token.open(user_pin=req["pin"], rw=True)
out = {{}}

def ckr(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except pkcs11.PKCS11Error as e:
        return type(e).__name__ + ":" + str(e)
    return "OK"
"""

_LIST = """
out["objects"] = []
for cls, name in ((ObjectClass.PRIVATE_KEY, "private"), (ObjectClass.SECRET_KEY, "secret"),
                  (ObjectClass.PUBLIC_KEY, "public")):
    for o in se.get_objects({Attribute.CLASS: cls}):
        if o[Attribute.LABEL] == "hsm-domain":
            continue
        out["objects"].append([name, o[Attribute.LABEL], bytes(o[Attribute.ID]).hex()])
"""

_SIGN = """
for label in req["data"]:
    priv = se.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
    msg = ("backup test " + label).encode()
    if priv.key_type == KeyType.EC:
        sig = priv.sign(hashlib.sha256(msg).digest(), mechanism=Mechanism.ECDSA)
    else:
        sig = priv.sign(msg, mechanism=Mechanism.SHA256_RSA_PKCS)
    pub = se.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
    if priv.key_type == KeyType.EC:
        material = {"ec_point": bytes(pub[Attribute.EC_POINT]).hex()}
    else:
        material = {"n": bytes(pub[Attribute.MODULUS]).hex(),
                    "e": bytes(pub[Attribute.PUBLIC_EXPONENT]).hex()}
    out[label] = {"sig": bytes(sig).hex(), **material}
"""

SIGNERS = ("k-ec", "k-rsa")


def verify(label: str, old: dict[str, str], sig_hex: str) -> None:
    """``sig_hex`` (made now) verifies with the public key read before the backup."""
    msg = ("backup test " + label).encode()
    sig = bytes.fromhex(sig_hex)
    if "ec_point" in old:
        point = bytes.fromhex(old["ec_point"])[2:]  # DER OCTET STRING around 04||X||Y
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        der = encode_dss_signature(int.from_bytes(sig[:32]), int.from_bytes(sig[32:]))
        key.verify(der, msg, ec.ECDSA(hashes.SHA256()))
    else:
        nums = rsa.RSAPublicNumbers(int(old["e"], 16), int(old["n"], 16))
        nums.public_key().verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def console_in(appliance: str, line: str, *secrets: str) -> None:
    stdin = "".join(s + "\n" for s in secrets).encode()
    proc = subprocess.run([HSMCTL, "lab", "console", appliance, "--", "hsmsh", "-c", line],
                          input=stdin, capture_output=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, (line, proc.stderr.decode())


def shown(appliance: str) -> dict[str, Any]:
    return dict(json.loads(console(appliance, "hsmsh", "-c", "hsm show").stdout))


@pytest.fixture(scope="module")
def domains(_lab_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Domains]:
    lab = ensure_lab()
    base = tmp_path_factory.mktemp("keys-domain")
    rigs = [Rig(lab, app, TENANT, base / app) for app in (A, B, C)]
    provision_all(rigs)
    since = {app: int(audit_records(app)[-1]["seq"]) for app in (A, B, C)}
    conf = rigs[0].tenant_conf(base / "customer")
    files = {
        "A": secret_file(base / "domain-a", SECRET_A),
        "B": secret_file(base / "domain-b", SECRET_B),
    }
    for rig in rigs:
        # C joins its domain at the takeover (--domain-file), A and B afterwards
        extra = ("--domain-file", str(files["B"])) if rig.appliance == C else ()
        proc = takeover_cli(rig.netns, conf, rig.handoff, *extra)
        assert proc.returncode == 0, proc.stderr.decode()
    d = Domains(conf, rigs[0].netns, base, files, since)
    for app in (A, B):
        out = d.json("domain", "set", app, "--domain-file", str(files["A"]))
        assert out["created"] is True
    yield d


@pytest.fixture(scope="module")
def keyed(domains: Domains) -> dict[str, Any]:
    """Keys made on A in its domain, and what they signed with their public keys."""
    for label, kind in (("k-ec", "ec:p256"), ("k-rsa", "rsa:2048"), ("k-aes", "aes:256")):
        domains.json("key", "generate", A, "--label", label, "--type", kind)
    return dict(domains.p11(A, _SIGN, list(SIGNERS)))


# -- the domain ---------------------------------------------------------------------------------


def test_domain_fingerprint_in_hsm_show_and_set_is_idempotent(
    domains: Domains, tmp_path: Path
) -> None:
    fp_a, fp_b = domainkey.fingerprint(SECRET_A), domainkey.fingerprint(SECRET_B)
    assert shown(A)["domain"] == shown(B)["domain"] == fp_a
    assert shown(C)["domain"] == fp_b
    again = domains.json("domain", "set", A, "--domain-file", str(domains.files["A"]))
    assert again == {"appliance": A, "domain": fp_a, "created": False}
    # another domain onto a token in one: refused, nothing changed (and the escrow kept)
    proc = domains.hsmctl("domain", "set", C, "--domain-file", str(domains.files["A"]),
                          check=False)  # fmt: skip
    assert proc.returncode == 5, proc.stderr.decode()
    short = secret_file(tmp_path / "short", "too-short")
    assert domains.hsmctl("domain", "set", A, "--domain-file", str(short),
                          check=False).returncode == 2  # fmt: skip
    loose = tmp_path / "loose"
    loose.write_text(SECRET_A)
    loose.chmod(0o644)
    assert domains.hsmctl("domain", "set", A, "--domain-file", str(loose),
                          check=False).returncode == 2  # fmt: skip
    assert shown(C)["domain"] == fp_b
    assert escrowed(domains.conf, A, "domain-secret") == SECRET_A
    assert escrowed(domains.conf, C, "domain-secret") == SECRET_B  # the takeover's escrow
    from hsmctl.customer.store import ApplianceDir
    from hsmctl.takeover import journal
    from hsmctl.takeover.records import TakeoverStep

    record = journal.read(ApplianceDir(domains.state(C).parents[1], C))
    assert record is not None and TakeoverStep.DOMAIN in record.done
    text = json.dumps(audit_records(A))
    assert SECRET_A not in text
    sets = [r for r in audit_records(A) if r["seq"] > domains.since[A]
            and r["detail"].get("command") == "hsm domain set"]  # fmt: skip
    assert sets and all(r["detail"].get("domain", fp_a) == fp_a for r in sets)
    assert any(r["detail"].get("domain") == fp_a for r in sets)


def test_keys_made_in_the_domain_are_cloneable(domains: Domains, keyed: dict[str, Any]) -> None:
    listed = {k["label"]: k for k in domains.json("key", "list", A)["keys"]}
    for label in ("k-ec", "k-rsa", "k-aes"):
        assert listed[label]["extractable"] is True and listed[label]["sensitive"] is True


def test_domain_key_serves_no_client_for_anything_else(
    domains: Domains, keyed: dict[str, Any]
) -> None:
    seq = audit_records(A)[-1]["seq"]
    out = domains.p11(
        A,
        """
(dk,) = list(se.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                             Attribute.LABEL: "hsm-domain"}))
ecpriv = se.get_key(object_class=ObjectClass.PRIVATE_KEY, label="k-ec")
# python-pkcs11 offers no sign/encrypt on a key without CKA_SIGN/CKA_ENCRYPT: PyKCS11
# asks anyway, as a client that does not care would (its own session, same kit)
import PyKCS11 as P
raw = P.PyKCS11Lib()
raw.load(lib_path)
rs = raw.openSession(raw.getSlotList(True)[0], P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
rs.login(req["pin"])
(rdk,) = rs.findObjects([(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_LABEL, "hsm-domain")])

def raw_ckr(fn, *args):
    try:
        fn(*args)
    except P.PyKCS11Error as e:
        return P.CKR.get(e.value, hex(e.value))
    return "OK"

out["sign"] = raw_ckr(rs.sign, rdk, bytes(32), P.Mechanism(P.CKM_ECDSA))
out["encrypt"] = raw_ckr(rs.encrypt, rdk, bytes(16), P.Mechanism(P.CKM_AES_ECB))
rs.logout()
rs.closeSession()
out["destroy"] = ckr(dk.destroy)
kek = se.generate_key(KeyType.AES, 256, label="kek", store=False,
                      capabilities=pkcs11.MechanismFlag.WRAP | pkcs11.MechanismFlag.UNWRAP)
out["by_kek"] = ckr(kek.wrap_key, ecpriv, mechanism=Mechanism(0x400))
out["self"] = ckr(dk.wrap_key, dk, mechanism=Mechanism(0x400))
""",
    )
    assert out["sign"] == "CKR_KEY_FUNCTION_NOT_PERMITTED", out
    assert out["encrypt"] != "OK", out
    assert out["destroy"] != "OK" and out["by_kek"] != "OK" and out["self"] != "OK", out
    denied = [(r["detail"].get("function"), r["detail"].get("rule"))
              for r in audit_records(A) if r["seq"] > seq and r["outcome"] == "denied"]  # fmt: skip
    assert ("C_SignInit", "domain-key") in denied, denied
    assert ("C_DestroyObject", "domain-key") in denied, denied
    assert denied.count(("C_WrapKey", "domain-wrap")) == 2, denied


# -- backup and restore -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backup_file(domains: Domains, keyed: dict[str, Any]) -> Path:
    out = domains.base / "a.backup"
    result = domains.json("backup", A, "--output", str(out))
    assert result["domain"] == domainkey.fingerprint(SECRET_A)
    assert result["objects"] == 5 and result["skipped"] == []  # 2 pairs + 1 AES
    assert out.stat().st_size == result["bytes"]
    assert SECRET_A.encode() not in out.read_bytes()
    return out


def test_backup_zeroize_init_restore_signs_with_the_old_keys(
    domains: Domains, keyed: dict[str, Any], backup_file: Path
) -> None:
    before = domains.objects(A)
    so, co = escrowed(domains.conf, A, "so-pin"), domains.pin(A)
    assert so is not None
    label = shown(A)["label"]
    console_in(A, "hsm zeroize")
    assert shown(A)["domain"] is None
    console_in(A, f"hsm init --label {label}", so)
    console_in(A, "hsm co-pin set", so, co)
    domains.json("domain", "set", A, "--domain-file", str(domains.files["A"]))
    assert domains.objects(A) == []
    seq = audit_records(A)[-1]["seq"]
    out = domains.json("restore", A, "--backup", str(backup_file))
    assert len(out["restored"]) == 5 and out["present"] == 0
    assert domains.objects(A) == before
    signed = domains.p11(A, _SIGN, list(SIGNERS))
    for label_ in SIGNERS:
        verify(label_, keyed[label_], signed[label_]["sig"])
    imported = [r for r in audit_records(A) if r["seq"] > seq and r["event"] == "key-imported"]
    assert sorted(r["detail"]["label"] for r in imported) == ["k-aes", "k-ec", "k-rsa"]
    again = domains.json("restore", A, "--backup", str(backup_file))
    assert again["restored"] == [] and again["present"] == 5
    assert domains.objects(A) == before


def test_restore_onto_another_appliance_of_the_domain(
    domains: Domains, keyed: dict[str, Any], backup_file: Path
) -> None:
    out = domains.json("restore", B, "--backup", str(backup_file))
    assert out["source"] == A and len(out["restored"]) + out["present"] == 5
    signed = domains.p11(B, _SIGN, list(SIGNERS))
    for label in SIGNERS:
        verify(label, keyed[label], signed[label]["sig"])
    assert domains.json("restore", B, "--backup", str(backup_file))["restored"] == []


def test_another_domain_is_exit_3_and_nothing_added(domains: Domains, backup_file: Path) -> None:
    before = domains.objects(C)
    proc = domains.hsmctl("restore", C, "--backup", str(backup_file), "--json", check=False)
    assert proc.returncode == 3, proc.stderr.decode()
    assert "domain" in proc.stderr.decode()
    assert domains.objects(C) == before


@pytest.mark.parametrize("where", ["start", "format", "label", "wrapped", "digest", "sig",
                                   "key_id", "end"])  # fmt: skip
def test_one_flipped_byte_is_exit_3(
    domains: Domains, backup_file: Path, tmp_path: Path, where: str
) -> None:
    raw = bytearray(backup_file.read_bytes())
    needles = {
        "format": b"hsmctl-backup/1",
        "label": b'"k-rsa"',
        "wrapped": b'"wrapped":"',
        "digest": b'"manifest_sha256":"',
        "sig": b'"sig":"',
        "key_id": b'"key_id":"',
    }
    if where == "start":
        at = 0
    elif where == "end":
        at = len(raw) - 2
    else:
        at = raw.index(needles[where]) + len(needles[where]) + 3
    raw[at] ^= 0x01
    bad = tmp_path / "flipped.backup"
    bad.write_bytes(bytes(raw))
    # target: B with one key gone, so a restore would add something
    domains.p11(B, """
for o in se.get_objects({Attribute.LABEL: "k-aes"}):
    o.destroy()
""")  # fmt: skip
    before = domains.objects(B)
    proc = domains.hsmctl("restore", B, "--backup", str(bad), check=False)
    assert proc.returncode == 3, (where, proc.stderr.decode())
    assert domains.objects(B) == before
    domains.hsmctl("restore", B, "--backup", str(backup_file))


def test_bad_input_changes_nothing(domains: Domains, backup_file: Path, tmp_path: Path) -> None:
    before = domains.objects(B)
    cases = [
        (("restore", B, "--backup", str(tmp_path / "missing")), 2),
        (("restore", "../x", "--backup", str(backup_file)), 2),
        (("restore", "hsm99", "--backup", str(backup_file)), 5),
        (("backup", "hsm99", "--output", str(tmp_path / "o")), 5),
        (("backup", A, "--output", str(tmp_path / "no" / "dir" / "o")), 2),
        (("backup", A, "--output", str(tmp_path)), 2),
        (("domain", "set", B, "--domain-file", str(tmp_path / "none")), 2),
        (("key", "destroy", B, "--label", "no-such-key", "--yes"), 2),
    ]
    not_json = tmp_path / "garbage.backup"
    not_json.write_text("not a backup\n")
    cases.append((("restore", B, "--backup", str(not_json)), 3))
    # a genuine file from an appliance this state directory has not pinned: exit 3
    doc = json.loads(backup_file.read_bytes())
    doc["manifest"]["appliance"] = "hsm98"
    forged = tmp_path / "forged.backup"
    from hsmctl.auditlog import canonical

    forged.write_bytes(canonical(doc) + b"\n")
    cases.append((("restore", B, "--backup", str(forged)), 3))
    for args, code in cases:
        proc = domains.hsmctl(*args, check=False)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr.decode())
    assert domains.objects(B) == before
    assert not (tmp_path / "o").exists()


def _kill_when(proc: subprocess.Popen[bytes], ready: Any, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` once ``ready()`` holds; False when it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError("never got to the point to kill at")


def test_kill_9_mid_backup_and_mid_restore_then_rerun(
    domains: Domains, keyed: dict[str, Any], tmp_path: Path
) -> None:
    for i in range(12):
        domains.json("key", "generate", A, "--label", f"bulk-{i:02d}", "--type", "ec:p256")
    expected = domains.objects(A)
    out = tmp_path / "bulk.backup"
    argv = ["ip", "netns", "exec", domains.netns, HSMCTL, "--config", str(domains.conf)]

    # mid-backup: once the device has wrapped something (its p11 process is running)
    def wrapping() -> bool:
        found = subprocess.run(["pgrep", "-f", "p11-kit remote"], capture_output=True)
        return found.returncode == 0

    proc = subprocess.Popen([*argv, "backup", A, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    killed = _kill_when(proc, wrapping)
    if killed:
        assert not out.exists()
    result = domains.json("backup", A, "--output", str(out))
    assert result["objects"] == len(expected)

    # mid-restore into B: once the restore's PKCS#11 session on B is open (the file is
    # verified by then). A trigger on the device log's first 'key-imported' record came
    # too late on an idle machine: reading the log took longer than the whole batch.
    domains.p11(B, """
for o in se.get_objects({}):
    if o[Attribute.LABEL].startswith(("bulk-", "k-")):
        o.destroy()
""")  # fmt: skip
    quiet = time.monotonic() + 60
    while wrapping() and time.monotonic() < quiet:  # earlier sessions' processes end first
        time.sleep(0.1)
    proc = subprocess.Popen([*argv, "restore", B, "--backup", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    killed = _kill_when(proc, wrapping)
    partial = domains.objects(B)
    if killed:
        assert len(partial) < len(expected)
    final = domains.json("restore", B, "--backup", str(out))
    assert final["present"] == len(partial)
    objects = domains.objects(B)
    assert objects == expected  # everything, each once
    assert len(set(objects)) == len(objects)
    hashlib.sha256(out.read_bytes())  # the file stays readable after the reruns
