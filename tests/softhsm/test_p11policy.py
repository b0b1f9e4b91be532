"""The key-policy PKCS#11 layer (hsmctl/appliance/p11) against real SoftHSM2, no mocks.

The module reads its role at C_Initialize and SoftHSM keeps one login state per process,
so every scenario runs in a child process that loads the built module with PyKCS11 (or
ctypes, for templates no binding would build) and prints what it saw as JSON. The PIN
reaches the child on stdin, never in its arguments or environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PyKCS11")

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    encode_dss_signature,
)

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.softhsm,
    pytest.mark.skipif(
        not Path(SOFTHSM).exists() or shutil.which("softhsm2-util") is None,
        reason="SoftHSM2 is not installed",
    ),
]

LABEL = "policy-test"
SO_PIN, USER_PIN = "so-pin-Zq81", "user-pin-Kx27"
NEW_PIN = "new-pin-Wv55"
ALL_PINS = (SO_PIN, USER_PIN, NEW_PIN)


@dataclass
class Lab:
    """One throwaway SoftHSM token, the built module and the events file it writes."""

    module: Path
    conf: Path
    events_path: Path

    def run(
        self,
        body: str,
        role: str | None = "crypto-officer",
        *,
        login: bool = True,
        module: Path | None = None,
        data: Any = None,
    ) -> dict[str, Any]:
        """Run BODY after the prelude in a child; returns its `out` dict."""
        code = _PRELUDE + textwrap.dedent(body) + _EPILOGUE
        proc = self.spawn(code, role, {"login": login, "data": data}, module=module)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
        return result

    def spawn(
        self, code: str, role: str | None, extra: dict[str, Any], *, module: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        req = {"module": str(module or self.module), "label": LABEL, "pin": USER_PIN}
        req |= {"so_pin": SO_PIN, "new_pin": NEW_PIN} | extra
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_P11_")}
        env |= {"SOFTHSM2_CONF": str(self.conf), "HSM_P11_CLIENT": "app-1"}
        if role is not None:
            env["HSM_P11_ROLE"] = role
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            env["HSM_P11_EVENTS_FD"] = str(fd)
            return subprocess.run(
                [sys.executable, "-c", code],
                input=json.dumps(req),
                env=env,
                pass_fds=(fd,),
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            os.close(fd)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()
        parsed = [json.loads(line) for line in lines]
        return [e for e in parsed if kind is None or e["event"] == kind]

    def clear(self) -> None:
        self.events_path.unlink(missing_ok=True)


def make_lab(tmp_path: Path, policy_so: Path) -> Lab:
    """A throwaway token (LABEL, SO_PIN, USER_PIN) in TMP_PATH and the module built here;
    the policy, domain and BYOK tests' ``lab`` fixture."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", LABEL),
            *("--so-pin", SO_PIN, "--pin", USER_PIN),
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True,
        capture_output=True,
    )
    return Lab(policy_so, conf, tmp_path / "events.jsonl")


@pytest.fixture
def lab(tmp_path: Path, policy_so: Path) -> Lab:
    return make_lab(tmp_path, policy_so)


# The child's prelude: a session (logged in unless told not to) and small key helpers.
_PRELUDE = """
import json, sys
import PyKCS11 as P
req = json.load(sys.stdin)
lib = P.PyKCS11Lib()
lib.load(req["module"])
out = {}

def ckr(fn, *args):
    try:
        fn(*args)
    except P.PyKCS11Error as e:
        return P.CKR.get(e.value, hex(e.value))
    return "CKR_OK"

slot = next(s for s in lib.getSlotList(True)
            if lib.getTokenInfo(s).label.rstrip(" \\0") == req["label"])
if req["login"]:
    se = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
    se.login(req["pin"])

P256 = bytes.fromhex("06082a8648ce3d030107")
P192 = bytes.fromhex("06082a8648ce3d030101")

def ec_pair(label, params=P256, priv=()):
    return se.generateKeyPair(
        [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_TOKEN, True),
         (P.CKA_EC_PARAMS, params), (P.CKA_VERIFY, True), (P.CKA_LABEL, label)],
        [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_TOKEN, True),
         (P.CKA_SIGN, True), (P.CKA_LABEL, label), (P.CKA_ID, b"\\x0e\\xc1")] + list(priv),
        P.MechanismECGENERATEKEYPAIR)

def rsa_pair(label, bits=2048, priv=()):
    return se.generateKeyPair(
        [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, P.CKK_RSA), (P.CKA_TOKEN, True),
         (P.CKA_MODULUS_BITS, bits), (P.CKA_PUBLIC_EXPONENT, b"\\x01\\x00\\x01"),
         (P.CKA_VERIFY, True), (P.CKA_ENCRYPT, True), (P.CKA_WRAP, True),
         (P.CKA_LABEL, label)],
        [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_RSA), (P.CKA_TOKEN, True),
         (P.CKA_SIGN, True), (P.CKA_DECRYPT, True), (P.CKA_UNWRAP, True),
         (P.CKA_LABEL, label)] + list(priv),
        P.MechanismRSAGENERATEKEYPAIR)

def aes(label, length=32, extra=()):
    return se.generateKey(
        [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES), (P.CKA_TOKEN, True),
         (P.CKA_VALUE_LEN, length), (P.CKA_ENCRYPT, True), (P.CKA_DECRYPT, True),
         (P.CKA_LABEL, label)] + list(extra),
        P.MechanismAESGENERATEKEY)

def protection(key):
    return se.getAttributeValue(key, [P.CKA_SENSITIVE, P.CKA_EXTRACTABLE])

def raw_get(key, attr):
    t = P.LowLevel.ckattrlist(1)
    t[0].SetType(attr)
    return P.CKR.get(lib.lib.C_GetAttributeValue(se.session, key, t))

def find(label, cls):
    return se.findObjects([(P.CKA_LABEL, label), (P.CKA_CLASS, cls)])
"""

_EPILOGUE = """
if req["login"]:
    se.closeSession()
print(json.dumps(out))
"""


def verify_ecdsa(point_der: str, digest: bytes, sig: str) -> None:
    point = bytes.fromhex(point_der)[2:]  # DER OCTET STRING (04 41) around 04||X||Y
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    raw = bytes.fromhex(sig)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def one_denied(lab: Lab) -> dict[str, Any]:
    denied = lab.events("denied")
    assert len(denied) == 1, denied
    return denied[0]


# --- the crypto-officer's normal work ---------------------------------------------------


def test_officer_generates_protected_keys_and_signs(lab: Lab) -> None:
    digest = hashlib.sha256(b"hello policy").digest()
    out = lab.run(
        """
        data = bytes.fromhex(req["data"])
        ecpub, ecpriv = ec_pair("ec-1")
        rsapub, rsapriv = rsa_pair("rsa-1", 3072)
        out["ec"] = protection(ecpriv)
        out["rsa"] = protection(rsapriv)
        sig = bytes(se.sign(ecpriv, data, P.Mechanism(P.CKM_ECDSA)))
        out["ec_sig"] = sig.hex()
        out["ec_ok"] = se.verify(ecpub, data, sig, P.Mechanism(P.CKM_ECDSA))
        out["ec_point"] = bytes(se.getAttributeValue(ecpub, [P.CKA_EC_POINT], True)[0]).hex()
        msg = b"hello policy"
        rsig = bytes(se.sign(rsapriv, msg, P.Mechanism(P.CKM_SHA256_RSA_PKCS)))
        out["rsa_sig"] = rsig.hex()
        out["rsa_ok"] = se.verify(rsapub, msg, rsig, P.Mechanism(P.CKM_SHA256_RSA_PKCS))
        n, e = se.getAttributeValue(rsapub, [P.CKA_MODULUS, P.CKA_PUBLIC_EXPONENT], True)
        out["rsa_n"], out["rsa_e"] = bytes(n).hex(), bytes(e).hex()
        """,
        data=digest.hex(),
    )
    # The templates said nothing about either: the layer made them so.
    assert out["ec"] == [True, False] and out["rsa"] == [True, False]
    assert out["ec_ok"] and out["rsa_ok"]
    verify_ecdsa(out["ec_point"], digest, out["ec_sig"])
    pub = rsa.RSAPublicNumbers(int(out["rsa_e"], 16), int(out["rsa_n"], 16)).public_key()
    assert pub.key_size == 3072
    pub.verify(bytes.fromhex(out["rsa_sig"]), b"hello policy", padding.PKCS1v15(), hashes.SHA256())

    made = lab.events("key-generated")
    assert [(e["key_type"], e.get("curve"), e.get("bits")) for e in made] == [
        ("ec", "P-256", None),
        ("rsa", None, 3072),
    ]
    assert made[0]["label"] == "ec-1" and made[0]["id"] == "0ec1"
    assert made[0]["class"] == "key-pair" and made[0]["client"] == "app-1"
    assert lab.events("denied") == []


def test_aes_256_gcm_round_trip(lab: Lab) -> None:
    out = lab.run(
        """
        key = aes("aes-1")
        out["prot"] = protection(key)
        gcm = P.AES_GCM_Mechanism(bytes(12), b"aad", 128)
        ct = bytes(se.encrypt(key, b"secret message", gcm))
        out["ct_len"] = len(ct)
        out["pt"] = bytes(se.decrypt(key, ct, P.AES_GCM_Mechanism(bytes(12), b"aad", 128))).hex()
        """
    )
    assert out["prot"] == [True, False]
    assert bytes.fromhex(out["pt"]) == b"secret message"
    assert out["ct_len"] == len(b"secret message") + 16
    (made,) = lab.events("key-generated")
    assert (made["key_type"], made["bits"], made["class"]) == ("aes", 256, "secret-key")


def test_byok_unwrap_rsa_oaep_sha1_imports_a_protected_key(lab: Lab) -> None:
    """BYOK on SoftHSM 2.6.1 needs OAEP with SHA-1 (LAB-FACTS): allowed for unwrap."""
    pub_out = lab.run(
        """
        pub, priv = rsa_pair("kek")
        n, e = se.getAttributeValue(pub, [P.CKA_MODULUS, P.CKA_PUBLIC_EXPONENT], True)
        out["n"], out["e"] = bytes(n).hex(), bytes(e).hex()
        """
    )
    kek = rsa.RSAPublicNumbers(int(pub_out["e"], 16), int(pub_out["n"], 16)).public_key()
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    blobs = {"aes": kek.encrypt(bytes(range(32)), oaep).hex()}
    blobs["odd"] = kek.encrypt(bytes(20), oaep).hex()
    out = lab.run(
        """
        (kek,) = find("kek", P.CKO_PRIVATE_KEY)
        oaep = P.RSAOAEPMechanism(P.CKM_SHA_1, P.CKG_MGF1_SHA1)
        tmpl = [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES),
                (P.CKA_TOKEN, True), (P.CKA_ENCRYPT, True), (P.CKA_DECRYPT, True),
                (P.CKA_LABEL, "imported")]
        key = se.unwrapKey(kek, bytes.fromhex(req["data"]["aes"]), tmpl, oaep)
        out["prot"] = protection(key)
        out["value"] = raw_get(key, P.CKA_VALUE)
        out["extractable"] = ckr(se.unwrapKey, kek, bytes.fromhex(req["data"]["aes"]),
                                 tmpl + [(P.CKA_EXTRACTABLE, True)], oaep)
        out["odd"] = ckr(se.unwrapKey, kek, bytes.fromhex(req["data"]["odd"]), tmpl, oaep)
        out["left"] = len(se.findObjects([(P.CKA_CLASS, P.CKO_SECRET_KEY)]))
        """,
        data=blobs,
    )
    assert out["prot"] == [True, False]
    assert out["value"] == "CKR_ATTRIBUTE_SENSITIVE"
    assert out["extractable"] == "CKR_TEMPLATE_INCONSISTENT"
    (imported,) = lab.events("key-imported")
    assert (imported["label"], imported["key_type"], imported["bits"]) == ("imported", "aes", 256)
    rules = [(e["function"], e["rule"]) for e in lab.events("denied")]
    assert rules[:2] == [("C_GetAttributeValue", "sensitive-read"), ("C_UnwrapKey", "extractable")]
    # A 20-byte secret unwrapped as AES: SoftHSM takes it (or not); the layer never keeps it.
    assert out["odd"] != "CKR_OK"
    assert out["left"] == 1


def test_destroy_is_logged_with_the_key(lab: Lab) -> None:
    lab.run(
        """
        pub, priv = ec_pair("gone")
        se.destroyObject(priv)
        se.destroyObject(pub)
        """
    )
    gone = lab.events("key-destroyed")
    assert [(e["class"], e["label"], e["curve"]) for e in gone] == [
        ("private-key", "gone", "P-256"),
        ("public-key", "gone", "P-256"),
    ]


# --- refusals: exact code, one `denied` event with its rule ------------------------------

REFUSALS = {
    "rsa-1024": (
        'out["rv"] = ckr(rsa_pair, "small", 1024)',
        "CKR_KEY_SIZE_RANGE",
        "rsa-size",
        "C_GenerateKeyPair",
    ),
    "rsa-16384": (
        'out["rv"] = ckr(rsa_pair, "huge", 16384)',
        "CKR_KEY_SIZE_RANGE",
        "rsa-size",
        "C_GenerateKeyPair",
    ),
    "ec-p192": (
        'out["rv"] = ckr(ec_pair, "p192", P192)',
        "CKR_CURVE_NOT_SUPPORTED",
        "ec-curve",
        "C_GenerateKeyPair",
    ),
    "aes-160": (
        'out["rv"] = ckr(aes, "a20", 20)',
        "CKR_KEY_SIZE_RANGE",
        "aes-size",
        "C_GenerateKey",
    ),
    "generic-secret": (
        """out["rv"] = ckr(se.generateKey, [(P.CKA_CLASS, P.CKO_SECRET_KEY),
               (P.CKA_KEY_TYPE, P.CKK_GENERIC_SECRET), (P.CKA_VALUE_LEN, 32)],
               P.Mechanism(P.CKM_GENERIC_SECRET_KEY_GEN))""",
        "CKR_MECHANISM_INVALID",
        "key-type",
        "C_GenerateKey",
    ),
    "private-extractable": (
        'out["rv"] = ckr(ec_pair, "x", P256, [(P.CKA_EXTRACTABLE, True)])',
        "CKR_TEMPLATE_INCONSISTENT",
        "extractable",
        "C_GenerateKeyPair",
    ),
    "private-not-sensitive": (
        'out["rv"] = ckr(ec_pair, "x", P256, [(P.CKA_SENSITIVE, False)])',
        "CKR_TEMPLATE_INCONSISTENT",
        "sensitive",
        "C_GenerateKeyPair",
    ),
    "secret-extractable": (
        'out["rv"] = ckr(aes, "x", 32, [(P.CKA_EXTRACTABLE, True)])',
        "CKR_TEMPLATE_INCONSISTENT",
        "extractable",
        "C_GenerateKey",
    ),
    "create-private-key": (
        """out["rv"] = ckr(se.createObject, [(P.CKA_CLASS, P.CKO_PRIVATE_KEY),
               (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_EC_PARAMS, P256),
               (P.CKA_VALUE, bytes(31) + b"\\x07"), (P.CKA_TOKEN, True)])""",
        "CKR_ACTION_PROHIBITED",
        "plaintext-import",
        "C_CreateObject",
    ),
    "create-secret-key": (
        """out["rv"] = ckr(se.createObject, [(P.CKA_CLASS, P.CKO_SECRET_KEY),
               (P.CKA_KEY_TYPE, P.CKK_AES), (P.CKA_VALUE, bytes(32)), (P.CKA_TOKEN, True)])""",
        "CKR_ACTION_PROHIBITED",
        "plaintext-import",
        "C_CreateObject",
    ),
    "set-extractable": (
        """key = aes("k")
        out["rv"] = ckr(se.setAttributeValue, key, [(P.CKA_EXTRACTABLE, True)])""",
        "CKR_ATTRIBUTE_READ_ONLY",
        "weakening-change",
        "C_SetAttributeValue",
    ),
    "set-not-sensitive": (
        """key = aes("k")
        out["rv"] = ckr(se.setAttributeValue, key, [(P.CKA_SENSITIVE, False)])""",
        "CKR_ATTRIBUTE_READ_ONLY",
        "weakening-change",
        "C_SetAttributeValue",
    ),
    "set-wrap-with-trusted-false": (
        """key = aes("k", 32, [(P.CKA_WRAP_WITH_TRUSTED, True)])
        out["rv"] = ckr(se.setAttributeValue, key, [(P.CKA_WRAP_WITH_TRUSTED, False)])""",
        "CKR_ATTRIBUTE_READ_ONLY",
        "weakening-change",
        "C_SetAttributeValue",
    ),
    "ecdsa-sha1": (
        """pub, priv = ec_pair("k")
        out["rv"] = ckr(se.sign, priv, b"data", P.Mechanism(P.CKM_ECDSA_SHA1))""",
        "CKR_MECHANISM_INVALID",
        "mechanism-sha1-sign",
        "C_SignInit",
    ),
    "ecdsa-over-sha1-digest": (
        """pub, priv = ec_pair("k")
        out["rv"] = ckr(se.sign, priv, bytes(20), P.Mechanism(P.CKM_ECDSA))
        # the refused operation was ended: the session signs again
        out["after"] = len(se.sign(priv, bytes(32), P.Mechanism(P.CKM_ECDSA)))""",
        "CKR_DATA_LEN_RANGE",
        "mechanism-sha1-sign",
        "C_Sign",
    ),
    "sha1-rsa-pkcs": (
        """pub, priv = rsa_pair("k")
        out["rv"] = ckr(se.sign, priv, b"data", P.Mechanism(P.CKM_SHA1_RSA_PKCS))""",
        "CKR_MECHANISM_INVALID",
        "mechanism-sha1-sign",
        "C_SignInit",
    ),
    "sha1-rsa-verify": (
        """pub, priv = rsa_pair("k")
        out["rv"] = ckr(se.verify, pub, b"data", bytes(256), P.Mechanism(P.CKM_SHA1_RSA_PKCS))""",
        "CKR_MECHANISM_INVALID",
        "mechanism-sha1-sign",
        "C_VerifyInit",
    ),
    "rsa-pkcs-sha1-digestinfo": (
        """pub, priv = rsa_pair("k")
        info = bytes.fromhex("3021300906052b0e03021a05000414") + bytes(20)
        out["rv"] = ckr(se.sign, priv, info, P.Mechanism(P.CKM_RSA_PKCS))
        info256 = bytes.fromhex("3031300d060960864801650304020105000420") + bytes(32)
        out["after"] = len(se.sign(priv, info256, P.Mechanism(P.CKM_RSA_PKCS)))""",
        "CKR_DATA_INVALID",
        "mechanism-sha1-sign",
        "C_Sign",
    ),
    "rsa-x-509-sign": (
        """pub, priv = rsa_pair("k")
        out["rv"] = ckr(se.sign, priv, bytes(256), P.Mechanism(P.CKM_RSA_X_509))""",
        "CKR_MECHANISM_INVALID",
        "mechanism-raw-rsa",
        "C_SignInit",
    ),
    "rsa-x-509-encrypt": (
        """pub, priv = rsa_pair("k")
        out["rv"] = ckr(se.encrypt, pub, bytes(256), P.Mechanism(P.CKM_RSA_X_509))""",
        "CKR_MECHANISM_INVALID",
        "mechanism-raw-rsa",
        "C_EncryptInit",
    ),
    "md5-digest": (
        'out["rv"] = ckr(se.digest, b"data", P.Mechanism(P.CKM_MD5))',
        "CKR_MECHANISM_INVALID",
        "mechanism-md5",
        "C_DigestInit",
    ),
    "read-aes-value": (
        """key = aes("k")
        out["rv"] = raw_get(key, P.CKA_VALUE)""",
        "CKR_ATTRIBUTE_SENSITIVE",
        "sensitive-read",
        "C_GetAttributeValue",
    ),
    "read-rsa-private-exponent": (
        """pub, priv = rsa_pair("k")
        out["rv"] = raw_get(priv, P.CKA_PRIVATE_EXPONENT)""",
        "CKR_ATTRIBUTE_SENSITIVE",
        "sensitive-read",
        "C_GetAttributeValue",
    ),
    "read-ec-private-value": (
        """pub, priv = ec_pair("k")
        out["rv"] = raw_get(priv, P.CKA_VALUE)""",
        "CKR_ATTRIBUTE_SENSITIVE",
        "sensitive-read",
        "C_GetAttributeValue",
    ),
    "so-login": (
        """se.logout()
        out["rv"] = ckr(se.login, req["so_pin"], P.CKU_SO)""",
        "CKR_USER_TYPE_INVALID",
        "so-login",
        "C_Login",
    ),
    "init-token": (
        'out["rv"] = ckr(lib.initToken, slot, req["so_pin"], "hijack")',
        "CKR_ACTION_PROHIBITED",
        "token-management",
        "C_InitToken",
    ),
    "set-pin": (
        'out["rv"] = ckr(se.setPin, req["pin"], req["new_pin"])',
        "CKR_ACTION_PROHIBITED",
        "token-management",
        "C_SetPIN",
    ),
    "init-pin": (
        'out["rv"] = ckr(se.initPin, req["new_pin"])',
        "CKR_ACTION_PROHIBITED",
        "token-management",
        "C_InitPIN",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal(lab: Lab, case: str) -> None:
    body, code, rule, function = REFUSALS[case]
    out = lab.run("\n".join(line.strip() for line in body.splitlines()))
    assert out["rv"] == code
    denied = one_denied(lab)
    assert (denied["rule"], denied["function"], denied["rv"]) == (rule, function, code)
    assert "after" not in out or out["after"] > 0


def test_refused_mechanisms_are_not_advertised(lab: Lab) -> None:
    out = lab.run(
        """
        mechs = set(lib.getMechanismList(slot))
        names = ["CKM_MD5", "CKM_SHA1_RSA_PKCS", "CKM_ECDSA_SHA1", "CKM_RSA_X_509",
                 "CKM_ECDSA", "CKM_SHA256_RSA_PKCS", "CKM_RSA_PKCS_OAEP", "CKM_AES_GCM"]
        out["listed"] = {n: n in mechs for n in names}
        out["info"] = ckr(lib.getMechanismInfo, slot, "CKM_MD5")
        """
    )
    assert out["listed"] == {
        "CKM_MD5": False,
        "CKM_SHA1_RSA_PKCS": False,
        "CKM_ECDSA_SHA1": False,
        "CKM_RSA_X_509": False,
        "CKM_ECDSA": True,
        "CKM_SHA256_RSA_PKCS": True,
        "CKM_RSA_PKCS_OAEP": True,
        "CKM_AES_GCM": True,
    }
    assert out["info"] == "CKR_MECHANISM_INVALID"


# --- roles ------------------------------------------------------------------------------


def test_crypto_user_signs_but_cannot_make_import_or_destroy(lab: Lab) -> None:
    lab.run('pub, priv = ec_pair("shared")')
    lab.clear()
    out = lab.run(
        """
        (priv,) = find("shared", P.CKO_PRIVATE_KEY)
        (pub,) = find("shared", P.CKO_PUBLIC_KEY)
        sig = se.sign(priv, bytes(32), P.Mechanism(P.CKM_ECDSA))
        out["verified"] = se.verify(pub, bytes(32), sig, P.Mechanism(P.CKM_ECDSA))
        out["generate"] = ckr(ec_pair, "mine")
        out["generate_aes"] = ckr(aes, "mine")
        out["create"] = ckr(se.createObject, [(P.CKA_CLASS, P.CKO_DATA), (P.CKA_LABEL, "d")])
        out["destroy"] = ckr(se.destroyObject, priv)
        out["unwrap"] = ckr(se.unwrapKey, priv, bytes(40),
                            [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES),
                             (P.CKA_TOKEN, True)],
                            P.Mechanism(P.CKM_AES_KEY_WRAP))
        out["set"] = ckr(se.setAttributeValue, priv, [(P.CKA_LABEL, "renamed")])
        out["still_there"] = len(find("shared", P.CKO_PRIVATE_KEY))
        """,
        role="crypto-user",
    )
    assert out["verified"] is True
    refused = ("generate", "generate_aes", "create", "destroy", "unwrap", "set")
    assert {k: out[k] for k in refused} == dict.fromkeys(refused, "CKR_ACTION_PROHIBITED")
    assert out["still_there"] == 1
    denied = lab.events("denied")
    assert [e["function"] for e in denied] == [
        "C_GenerateKeyPair",
        "C_GenerateKey",
        "C_CreateObject",
        "C_DestroyObject",
        "C_UnwrapKey",
        "C_SetAttributeValue",
    ]
    assert {e["rule"] for e in denied} == {"role-crypto-user"}
    assert {e["role"] for e in lab.events()} == {"crypto-user"}


def test_crypto_user_unwraps_a_session_key_to_use_it_but_imports_nothing(lab: Lab) -> None:
    """SPEC §11: a crypto-user may unwrap with keys whose attributes allow it; importing
    a key (a token object) is the officer's. The session key it unwraps is as protected
    as any key the device makes, and it is gone when its session ends."""
    pub_out = lab.run(
        """
        pub, priv = rsa_pair("user-kek")
        n, e = se.getAttributeValue(pub, [P.CKA_MODULUS, P.CKA_PUBLIC_EXPONENT], True)
        out["n"], out["e"] = bytes(n).hex(), bytes(e).hex()
        """
    )
    kek = rsa.RSAPublicNumbers(int(pub_out["e"], 16), int(pub_out["n"], 16)).public_key()
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    wrapped = kek.encrypt(bytes(range(32)), oaep).hex()
    lab.clear()
    out = lab.run(
        """
        (kek,) = find("user-kek", P.CKO_PRIVATE_KEY)
        oaep = P.RSAOAEPMechanism(P.CKM_SHA_1, P.CKG_MGF1_SHA1)
        tmpl = [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES),
                (P.CKA_ENCRYPT, True), (P.CKA_DECRYPT, True), (P.CKA_LABEL, "dek")]
        blob = bytes.fromhex(req["data"])
        out["token"] = ckr(se.unwrapKey, kek, blob, tmpl + [(P.CKA_TOKEN, True)], oaep)
        key = se.unwrapKey(kek, blob, tmpl + [(P.CKA_TOKEN, False)], oaep)
        out["prot"] = protection(key)
        out["on_token"] = bool(se.getAttributeValue(key, [P.CKA_TOKEN])[0])
        ct = se.encrypt(key, bytes(16), P.Mechanism(P.CKM_AES_ECB))
        out["ct"] = bytes(ct).hex()
        out["extractable"] = ckr(se.unwrapKey, kek, blob, tmpl + [(P.CKA_EXTRACTABLE, True)],
                                 oaep)
        """,
        role="crypto-user",
        data=wrapped,
    )
    assert out["token"] == "CKR_ACTION_PROHIBITED"
    assert out["prot"] == [True, False] and out["on_token"] is False
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(bytes(range(32))), modes.ECB()).encryptor()
    assert out["ct"] == (enc.update(bytes(16)) + enc.finalize()).hex()
    assert out["extractable"] == "CKR_TEMPLATE_INCONSISTENT"
    rules = [(e["function"], e["rule"]) for e in lab.events("denied")]
    assert rules == [("C_UnwrapKey", "role-crypto-user"), ("C_UnwrapKey", "extractable")]
    assert lab.run('out["left"] = len(find("dek", P.CKO_SECRET_KEY))')["left"] == 0


@pytest.mark.parametrize("role", [None, "", "crypto-admin", "CRYPTO-OFFICER"])
def test_unknown_role_gets_no_session(lab: Lab, role: str | None) -> None:
    out = lab.run(
        """
        out["open"] = ckr(lib.openSession, slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
        """,
        role=role,
        login=False,
    )
    assert out["open"] == "CKR_ACTION_PROHIBITED"
    assert one_denied(lab)["rule"] == "role-unknown"


# --- the events ---------------------------------------------------------------------------


def test_session_close_counts_add_up(lab: Lab) -> None:
    out = lab.run(
        """
        pub, priv = ec_pair("count")
        key = aes("count-aes")
        second = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
        n = 0
        for i in range(7):
            sig = se.sign(priv, bytes([i]) * 32, P.Mechanism(P.CKM_ECDSA))
            se.verify(pub, bytes([i]) * 32, sig, P.Mechanism(P.CKM_ECDSA))
        for i in range(3):
            second.sign(priv, bytes(32), P.Mechanism(P.CKM_ECDSA))
        gcm = lambda: P.AES_GCM_Mechanism(bytes(12), b"", 128)
        for i in range(1, 5):
            se.decrypt(key, bytes(se.encrypt(key, b"x" * i, gcm())), gcm())
        ckr(se.sign, priv, b"x", P.Mechanism(P.CKM_ECDSA_SHA1))
        se.digest(b"abc", P.Mechanism(P.CKM_SHA256))
        out["handles"] = [se.session.value(), second.session.value()]
        second.closeSession()
        """
    )
    first, second = out["handles"]
    closes = {e["session"]: e for e in lab.events("session-close")}
    assert closes[second]["ops"]["sign"] == 3
    assert sum(closes[second]["ops"].values()) == 3
    ops = closes[first]["ops"]
    assert (ops["sign"], ops["verify"], ops["encrypt"], ops["decrypt"]) == (7, 7, 4, 4)
    assert (ops["generate"], ops["denied"], ops["digest"]) == (2, 1, 1)
    assert sum(ops.values()) == 7 + 7 + 4 + 4 + 2 + 1 + 1
    opens = lab.events("session-open")
    assert sorted(e["session"] for e in opens) == sorted(out["handles"])


def test_no_pin_in_the_events(lab: Lab) -> None:
    lab.run(
        """
        ckr(se.setPin, req["pin"], req["new_pin"])
        ckr(se.initPin, req["new_pin"])
        ckr(lib.initToken, slot, req["so_pin"], "x")
        se.logout()
        ckr(se.login, req["so_pin"], P.CKU_SO)
        out["wrong"] = ckr(se.login, req["new_pin"])
        se.login(req["pin"])
        """
    )
    text = lab.events_path.read_text()
    for pin in ALL_PINS:
        assert pin not in text
    logins = [(e["user_type"], e["rv"]) for e in lab.events("login")]
    assert logins == [("user", "CKR_OK"), ("user", "CKR_PIN_INCORRECT"), ("user", "CKR_OK")]


# --- hostile callers ----------------------------------------------------------------------

# ctypes, because no binding builds these templates. Function-list indices (PKCS#11 2.40):
_HOSTILE = r"""
import ctypes as C, json, sys
req = json.load(sys.stdin)
so = C.CDLL(req["module"])
flist = C.c_void_p()
assert so.C_GetFunctionList(C.byref(flist)) == 0
table = C.cast(flist, C.POINTER(C.c_void_p))
U, P_ = C.c_ulong, C.c_void_p
def fn(index, *args):
    return C.CFUNCTYPE(U, *args)(table[1 + index])
class Attr(C.Structure):
    _fields_ = [("type", U), ("pValue", P_), ("ulValueLen", U)]
Initialize = fn(0, P_)
GetSlotList = fn(4, C.c_ubyte, C.POINTER(U), C.POINTER(U))
GetTokenInfo = fn(6, U, C.c_char_p)
OpenSession = fn(12, U, U, P_, P_, C.POINTER(U))
Login = fn(18, U, U, C.c_char_p, U)
CreateObject = fn(20, U, C.POINTER(Attr), U, C.POINTER(U))
CopyObject = fn(21, U, U, C.POINTER(Attr), U, C.POINTER(U))
GetAttributeValue = fn(24, U, U, C.POINTER(Attr), U)
SetAttributeValue = fn(25, U, U, C.POINTER(Attr), U)
FindObjectsInit = fn(26, U, C.POINTER(Attr), U)
GenerateKey = fn(58, U, P_, C.POINTER(Attr), U, C.POINTER(U))
assert Initialize(None) == 0
n = U(16); slots = (U * 16)()
assert GetSlotList(1, slots, C.byref(n)) == 0
info = C.create_string_buffer(512)
slot = next(s for s in slots[: n.value]
            if GetTokenInfo(s, info) == 0 and info.raw[:32].rstrip(b" ") == req["label"].encode())
h = U()
assert OpenSession(slot, 6, None, None, C.byref(h)) == 0
pin = req["pin"].encode()
assert Login(h, 1, pin, len(pin)) == 0
one = Attr(0, None, 0)
cls = U(0)  # CKO_DATA
out = {}
obj = U()
out["create_huge_count"] = CreateObject(h, C.byref(one), 1 << 30, C.byref(obj))
out["create_null_template"] = CreateObject(h, None, 3, C.byref(obj))
out["create_null_value"] = CreateObject(h, (Attr * 1)(Attr(0x11, None, 100)), 1, C.byref(obj))
out["create_huge_value"] = CreateObject(h, (Attr * 1)(Attr(0x11, C.addressof(cls), 1 << 40)), 1,
                                        C.byref(obj))
out["create_dup_class"] = CreateObject(h, (Attr * 2)(Attr(0, C.addressof(cls), 8),
                                                     Attr(0, C.addressof(cls), 8)), 2, C.byref(obj))
out["find_huge_count"] = FindObjectsInit(h, C.byref(one), 1 << 30)
out["get_huge_count"] = GetAttributeValue(h, 1, C.byref(one), 1 << 30)
out["get_null_template"] = GetAttributeValue(h, 1, None, 5)
out["set_null_value"] = SetAttributeValue(h, 1, (Attr * 1)(Attr(3, None, 4)), 1)
out["generate_null_mechanism"] = GenerateKey(h, None, None, 0, C.byref(obj))
out["copy_huge_count"] = CopyObject(h, 1, C.byref(one), 1 << 30, C.byref(obj))
# An attacker-chosen label: quotes, control bytes, UTF-8 and invalid UTF-8.
label = b'q"\\ \n\x01 \xc3\xa9 \xff\xfe end'
vlen = U(32)
aes_gen = (U * 3)(0x1080, 0, 0)
out["label_key"] = GenerateKey(h, C.cast(aes_gen, P_), (Attr * 2)(
    Attr(0x161, C.addressof(vlen), C.sizeof(vlen)),
    Attr(3, C.cast(C.c_char_p(label), P_), len(label))), 2, C.byref(obj))
bad_bool = C.c_uint32(1)  # CKA_SENSITIVE as 4 bytes
out["set_bad_bool"] = SetAttributeValue(h, 1, (Attr * 1)(Attr(0x103, C.addressof(bad_bool), 4)), 1)
print(json.dumps(out))
"""


def test_hostile_templates_do_not_crash(lab: Lab) -> None:
    proc = lab.spawn(_HOSTILE, "crypto-officer", {})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    bad, inconsistent = 0x7, 0xD1
    assert out == {
        "create_huge_count": bad,
        "create_null_template": bad,
        "create_null_value": bad,
        "create_huge_value": bad,
        "create_dup_class": inconsistent,
        "find_huge_count": bad,
        "get_huge_count": bad,
        "get_null_template": bad,
        "set_null_value": bad,
        "generate_null_mechanism": bad,
        "copy_huge_count": bad,
        "set_bad_bool": 0x13,  # CKR_ATTRIBUTE_VALUE_INVALID
        "label_key": 0,
    }
    assert {e["rule"] for e in lab.events("denied")} == {"malformed"}
    # Every line is JSON, and the label survives as far as it is text.
    (made,) = lab.events("key-generated")
    assert made["label"] == 'q"\\ \n\x01 \u00e9 \ufffd\ufffd end'
    assert made["bits"] == 256
