"""BYOK wrapping keys (SPEC §12) on real SoftHSM2 through the key-policy layer: RSA-OAEP
with SHA-256 (and SHA-1) done by the layer for a marked wrapping key, since SoftHSM 2.6.1
does OAEP with SHA-1 only. What it makes, the one error every failed unwrap gives, the
parameters it refuses, and every other use of the key refused and logged. Reuses the
policy tests' throwaway token and child runner (tests/softhsm/test_p11policy.py)."""

from __future__ import annotations

import os
import struct
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("PyKCS11")

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from hsmctl.appliance import token as tok
from tests.softhsm import test_p11policy as base

Lab = base.Lab
SOFTHSM = Path(base.SOFTHSM)

pytestmark = [pytest.mark.softhsm]

CKM_RSA_X_509 = 3


@pytest.fixture
def lab(tmp_path: Path, policy_so: Path) -> Lab:
    """The policy tests' throwaway token (label, PINs) and the module built here."""
    return base.make_lab(tmp_path, policy_so)


# The wrapping key as `hsmctl key wrapping-key` asks for it (byok.py make_wrapping_key):
# the private half CKA_ALLOWED_MECHANISMS={CKM_RSA_X_509}, CKA_DECRYPT and CKA_UNWRAP.
_KEK = """
import struct
RAW_ONLY = struct.pack("L", 3)  # CKM_RSA_X_509 as a CK_MECHANISM_TYPE array
SHA256 = P.RSAOAEPMechanism(P.CKM_SHA256, P.CKG_MGF1_SHA256)
SHA1 = P.RSAOAEPMechanism(P.CKM_SHA_1, P.CKG_MGF1_SHA1)

def kek_pair(label="kek", priv=None, bits=2048):
    if priv is None:
        priv = [(P.CKA_ALLOWED_MECHANISMS, RAW_ONLY), (P.CKA_DECRYPT, True),
                (P.CKA_UNWRAP, True)]
    return se.generateKeyPair(
        [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, P.CKK_RSA), (P.CKA_TOKEN, True),
         (P.CKA_MODULUS_BITS, bits), (P.CKA_PUBLIC_EXPONENT, b"\\x01\\x00\\x01"),
         (P.CKA_WRAP, True), (P.CKA_LABEL, label)],
        [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_RSA), (P.CKA_TOKEN, True),
         (P.CKA_LABEL, label)] + list(priv),
        P.MechanismRSAGENERATEKEYPAIR)

def public(pub):
    n, e = se.getAttributeValue(pub, [P.CKA_MODULUS, P.CKA_PUBLIC_EXPONENT], True)
    return bytes(n).hex(), bytes(e).hex()

def session_aes(extra=()):
    return [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES),
            (P.CKA_UNWRAP, True), (P.CKA_LABEL, "eph")] + list(extra)

def secrets():
    return len(se.findObjects([(P.CKA_CLASS, P.CKO_SECRET_KEY)]))

def copy_object(obj, attr, value=b""):
    # C_CopyObject with ATTR set to VALUE (PyKCS11 has none): the loaded module's own
    # function list through ctypes.
    import ctypes as C
    so = C.CDLL(req["module"])
    flist = C.c_void_p()
    assert so.C_GetFunctionList(C.byref(flist)) == 0
    table = C.cast(flist, C.POINTER(C.c_void_p))
    U = C.c_ulong
    class Attr(C.Structure):
        _fields_ = [("type", U), ("pValue", C.c_void_p), ("ulValueLen", U)]
    copy = C.CFUNCTYPE(U, U, U, C.POINTER(Attr), U, C.POINTER(U))(table[1 + 21])
    made = U()
    buf = C.create_string_buffer(value, len(value)) if value else None
    ptr = C.cast(buf, C.c_void_p) if buf is not None else None
    rv = copy(se.session.value(), obj.value(), (Attr * 1)(Attr(attr, ptr, len(value))), 1,
              C.byref(made))
    return P.CKR.get(rv, hex(rv))
"""

OAEP_SHA256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def with_kek(body: str) -> str:
    """The helpers above, then BODY (the runner dedents the whole, so BODY first)."""
    return _KEK + textwrap.dedent(body)


def ecb(key: bytes, block: bytes) -> str:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return (enc.update(block) + enc.finalize()).hex()


def make_kek(lab: Lab, label: str = "kek") -> rsa.RSAPublicKey:
    out = lab.run(_KEK + f'out["n"], out["e"] = public(kek_pair({label!r})[0])')
    return rsa.RSAPublicNumbers(int(out["e"], 16), int(out["n"], 16)).public_key()


def without_noise(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("ts", "pid", "session")}


def test_the_wrapping_key_is_marked_unwrap_only_and_never_cloneable(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a cloning domain too: a copy restored under the domain key would lose the mark."""
    monkeypatch.setenv("SOFTHSM2_CONF", str(lab.conf))
    tok.customer_domain_set(base.SO_PIN, "domain-secret-of-tenant-one-0001")
    out = lab.run(
        with_kek(
            """
        pub, priv = kek_pair()
        attrs = (P.CKA_DECRYPT, P.CKA_UNWRAP, P.CKA_SIGN, P.CKA_SIGN_RECOVER, P.CKA_DERIVE,
                 P.CKA_MODIFIABLE, P.CKA_COPYABLE, P.CKA_SENSITIVE, P.CKA_EXTRACTABLE,
                 P.CKA_WRAP_WITH_TRUSTED)
        out["attrs"] = [bool(v) for v in se.getAttributeValue(priv, list(attrs))]
        out["allowed"] = bytes(se.getAttributeValue(priv, [P.CKA_ALLOWED_MECHANISMS],
                                                    True)[0]).hex()
        ec = se.generateKeyPair(
            [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_TOKEN, True),
             (P.CKA_EC_PARAMS, P256), (P.CKA_VERIFY, True)],
            [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_TOKEN, True),
             (P.CKA_SIGN, True)], P.MechanismECGENERATEKEYPAIR)[1]
        out["ec_cloneable"] = [bool(v) for v in se.getAttributeValue(
            ec, [P.CKA_EXTRACTABLE, P.CKA_WRAP_WITH_TRUSTED])]
        """
        )
    )
    # decrypt, unwrap | sign, sign-recover, derive, modifiable, copyable | sensitive |
    # extractable, wrap-with-trusted
    assert out["attrs"] == [True, True, False, False, False, False, False, True, False, False]
    assert bytes.fromhex(out["allowed"]) == struct.pack("L", CKM_RSA_X_509)
    assert out["ec_cloneable"] == [True, True]  # the domain is there: other keys clone
    (made,) = [e for e in lab.events("key-generated") if e["key_type"] == "rsa"]
    assert made["bits"] == 2048 and made["class"] == "key-pair"
    assert lab.events("denied") == []


@pytest.mark.parametrize("role", ["crypto-officer", "crypto-user"])
def test_oaep_sha256_and_sha1_unwrap_into_a_usable_protected_session_key(
    lab: Lab, role: str
) -> None:
    """The AES key comes out right (it AES-KWP-unwraps a known key, whose ECB output is
    checked), sensitive, a session object, and good for AES key wrap only."""
    kek = make_kek(lab)
    eph256, eph128, eph_sha1 = os.urandom(32), os.urandom(16), os.urandom(32)
    targets = {name: os.urandom(16) for name in ("sha256", "sha256_128", "sha1")}
    data = {
        "sha256": kek.encrypt(eph256, OAEP_SHA256).hex(),
        "sha256_128": kek.encrypt(eph128, OAEP_SHA256).hex(),
        "sha1": kek.encrypt(eph_sha1, OAEP_SHA1).hex(),
    }
    for name, eph in (("sha256", eph256), ("sha256_128", eph128), ("sha1", eph_sha1)):
        data[f"{name}_kwp"] = aes_key_wrap_with_padding(eph, targets[name]).hex()
    lab.clear()
    out = lab.run(
        with_kek(
            """
        (kek,) = find("kek", P.CKO_PRIVATE_KEY)
        d = {k: bytes.fromhex(v) for k, v in req["data"].items()}
        block = bytes(range(16))
        tmpl = [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES),
                (P.CKA_ENCRYPT, True), (P.CKA_LABEL, "target")]
        uses = [P.CKA_ENCRYPT, P.CKA_DECRYPT, P.CKA_SIGN, P.CKA_VERIFY, P.CKA_WRAP,
                P.CKA_DERIVE, P.CKA_UNWRAP]
        for name, mech in (("sha256", SHA256), ("sha256_128", SHA256), ("sha1", SHA1)):
            key = se.unwrapKey(kek, d[name], session_aes(), mech)
            # The session key unwraps what the customer wrapped with it (AES-KWP).
            target = se.unwrapKey(key, d[name + "_kwp"], tmpl,
                                  P.Mechanism(P.CKM_AES_KEY_WRAP_PAD))
            out[name] = {
                "prot": protection(key),
                "token": bool(se.getAttributeValue(key, [P.CKA_TOKEN])[0]),
                "local": bool(se.getAttributeValue(key, [P.CKA_LOCAL])[0]),
                "value": raw_get(key, P.CKA_VALUE),
                "uses": [bool(v) for v in se.getAttributeValue(key, uses)],
                "allowed": bytes(se.getAttributeValue(key, [P.CKA_ALLOWED_MECHANISMS],
                                                      True)[0]).hex(),
                "ecb": ckr(se.encrypt, key, block, P.Mechanism(P.CKM_AES_ECB)),
                "target_ecb": bytes(se.encrypt(target, block,
                                               P.Mechanism(P.CKM_AES_ECB))).hex(),
            }
        """
        ),
        role=role,
        data=data,
    )
    block = bytes(range(16))
    for name in ("sha256", "sha256_128", "sha1"):
        got = out[name]
        assert got["target_ecb"] == ecb(targets[name], block), name
        assert got["prot"] == [True, False] and got["token"] is False and got["local"] is False
        assert got["value"] == "CKR_ATTRIBUTE_SENSITIVE"
        # encrypt, decrypt, sign, verify, wrap, derive: no; unwrap: yes, by AES key wrap only
        assert got["uses"] == [False] * 6 + [True]
        allowed = [m for (m,) in struct.iter_unpack("L", bytes.fromhex(got["allowed"]))]
        assert sorted(allowed) == [0x2109, 0x210A]  # CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD
        assert got["ecb"] == "CKR_KEY_FUNCTION_NOT_PERMITTED"
    imported = [e for e in lab.events("key-imported") if e["label"] == "eph"]
    assert len([e for e in lab.events("key-imported") if e["label"] == "target"]) == 3
    assert [(e["key_type"], e["bits"], e["class"]) for e in imported] == [
        ("aes", 256, "secret-key"),
        ("aes", 128, "secret-key"),
        ("aes", 256, "secret-key"),
    ]
    assert [e["rule"] for e in lab.events("denied")] == ["sensitive-read"] * 3
    # the crypto-user's session keys went with its session; nothing on the token
    assert lab.run('out["n"] = len(se.findObjects([(P.CKA_CLASS, P.CKO_SECRET_KEY)]))')["n"] == 0


def test_every_failed_unwrap_gives_one_error_and_one_log_record_and_makes_nothing(
    lab: Lab,
) -> None:
    """No padding oracle: a flipped byte, the wrong hash either way, another key's blob,
    a valid OAEP of a non-AES length, a number above the modulus, a short blob."""
    kek = make_kek(lab)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    good = bytearray(kek.encrypt(os.urandom(32), OAEP_SHA256))
    flipped_low, flipped_high = bytearray(good), bytearray(good)
    flipped_low[-1] ^= 1
    flipped_high[1] ^= 0x80
    sha1_blob = kek.encrypt(os.urandom(32), OAEP_SHA1)
    cases = {
        "flipped-low": (bytes(flipped_low), "sha256"),
        "flipped-high": (bytes(flipped_high), "sha256"),
        "sha1-as-sha256": (sha1_blob, "sha256"),
        "sha256-as-sha1": (bytes(good), "sha1"),
        "other-key": (other.encrypt(os.urandom(32), OAEP_SHA256), "sha256"),
        "20-bytes": (kek.encrypt(os.urandom(20), OAEP_SHA256), "sha256"),
        "above-modulus": (b"\xff" * 256, "sha256"),
        "short": (bytes(good[:-1]), "sha256"),
    }
    lab.clear()
    out = lab.run(
        with_kek(
            """
        (kek,) = find("kek", P.CKO_PRIVATE_KEY)
        for name, (blob, hash_) in req["data"].items():
            mech = SHA256 if hash_ == "sha256" else SHA1
            out[name] = ckr(se.unwrapKey, kek, bytes.fromhex(blob), session_aes(), mech)
        out["secrets"] = secrets()
        """
        ),
        data={k: (v.hex(), h) for k, (v, h) in cases.items()},
    )
    assert {name: out[name] for name in cases} == dict.fromkeys(cases, "CKR_GENERAL_ERROR")
    assert out["secrets"] == 0
    denied = lab.events("denied")
    assert len(denied) == len(cases)
    assert {str(sorted(without_noise(e).items())) for e in denied} == {
        str(sorted({"event": "denied", "client": "app-1", "role": "crypto-officer",
                    "rule": "byok-unwrap", "function": "C_UnwrapKey",
                    "rv": "CKR_GENERAL_ERROR", "detail": "the key did not unwrap"}.items()))
    }  # fmt: skip
    assert lab.events("key-imported") == []


def test_other_oaep_parameters_templates_and_mechanisms_are_refused_before_decrypting(
    lab: Lab,
) -> None:
    kek = make_kek(lab)
    blob = kek.encrypt(os.urandom(32), OAEP_SHA256).hex()
    lab.clear()
    out = lab.run(
        with_kek(
            """
        (kek,) = find("kek", P.CKO_PRIVATE_KEY)
        blob = bytes.fromhex(req["data"])
        cases = {
            "sha384": (P.RSAOAEPMechanism(P.CKM_SHA384, P.CKG_MGF1_SHA384), session_aes()),
            "mixed": (P.RSAOAEPMechanism(P.CKM_SHA256, P.CKG_MGF1_SHA1), session_aes()),
            "label": (P.RSAOAEPMechanism(P.CKM_SHA256, P.CKG_MGF1_SHA256, b"x"),
                      session_aes()),
            "pkcs1": (P.Mechanism(P.CKM_RSA_PKCS), session_aes()),
            "raw": (P.Mechanism(P.CKM_RSA_X_509), session_aes()),
            "token": (SHA256, session_aes([(P.CKA_TOKEN, True)])),
            "value_len": (SHA256, session_aes([(P.CKA_VALUE_LEN, 32)])),
            "generic": (SHA256, [(P.CKA_CLASS, P.CKO_SECRET_KEY),
                                 (P.CKA_KEY_TYPE, P.CKK_GENERIC_SECRET)]),
            "extractable": (SHA256, session_aes([(P.CKA_EXTRACTABLE, True)])),
            "marking": (SHA256, session_aes([(P.CKA_ALLOWED_MECHANISMS, RAW_ONLY)])),
            "encrypt": (SHA256, session_aes([(P.CKA_ENCRYPT, True)])),
            "decrypt": (SHA256, session_aes([(P.CKA_DECRYPT, True)])),
        }
        for name, (mech, tmpl) in cases.items():
            out[name] = ckr(se.unwrapKey, kek, blob, tmpl, mech)
        out["secrets"] = secrets()
        """
        ),
        data=blob,
    )
    want = {
        "sha384": ("CKR_MECHANISM_PARAM_INVALID", "oaep-params"),
        "mixed": ("CKR_MECHANISM_PARAM_INVALID", "oaep-params"),
        "label": ("CKR_MECHANISM_PARAM_INVALID", "oaep-params"),
        "pkcs1": ("CKR_MECHANISM_INVALID", "wrapping-key"),
        "raw": ("CKR_MECHANISM_INVALID", "mechanism-raw-rsa"),
        "token": ("CKR_TEMPLATE_INCONSISTENT", "wrapping-key"),
        "value_len": ("CKR_TEMPLATE_INCONSISTENT", "wrapping-key"),
        "generic": ("CKR_TEMPLATE_INCONSISTENT", "key-type"),
        "extractable": ("CKR_TEMPLATE_INCONSISTENT", "extractable"),
        "marking": ("CKR_TEMPLATE_INCONSISTENT", "wrapping-key"),
        "encrypt": ("CKR_TEMPLATE_INCONSISTENT", "wrapping-key"),
        "decrypt": ("CKR_TEMPLATE_INCONSISTENT", "wrapping-key"),
    }
    assert {k: out[k] for k in want} == {k: v[0] for k, v in want.items()}
    assert [e["rule"] for e in lab.events("denied")] == [v[1] for v in want.values()]
    assert out["secrets"] == 0


def test_every_other_use_of_the_wrapping_key_is_denied_and_logged(lab: Lab) -> None:
    """Decrypt (any mechanism), sign, raw RSA, derive, wrap, copy, attribute changes:
    the layer refuses each; SoftHSM itself refuses them too (checked without the layer)."""
    make_kek(lab)
    lab.clear()
    body = with_kek(
        """
        (kek,) = find("kek", P.CKO_PRIVATE_KEY)
        (pub,) = find("kek", P.CKO_PUBLIC_KEY)
        c = bytes(256)
        out["decrypt_oaep"] = ckr(se.decrypt, kek, c, SHA1)
        out["decrypt_pkcs1"] = ckr(se.decrypt, kek, c, P.Mechanism(P.CKM_RSA_PKCS))
        out["decrypt_raw"] = ckr(se.decrypt, kek, c, P.Mechanism(P.CKM_RSA_X_509))
        out["sign"] = ckr(se.sign, kek, b"m", P.Mechanism(P.CKM_SHA256_RSA_PKCS))
        out["sign_raw"] = ckr(se.sign, kek, c, P.Mechanism(P.CKM_RSA_X_509))
        out["encrypt_raw"] = ckr(se.encrypt, pub, c, P.Mechanism(P.CKM_RSA_X_509))
        out["unmark"] = ckr(se.setAttributeValue, kek, [(P.CKA_ALLOWED_MECHANISMS, b"")])
        out["relabel"] = ckr(se.setAttributeValue, kek, [(P.CKA_LABEL, "x")])
        out["copy"] = copy_object(kek, P.CKA_ALLOWED_MECHANISMS)
        out["left"] = len(se.findObjects([(P.CKA_CLASS, P.CKO_PRIVATE_KEY)]))
        """
    )
    out = lab.run(body)
    want = {
        "decrypt_oaep": ("CKR_KEY_FUNCTION_NOT_PERMITTED", "wrapping-key"),
        "decrypt_pkcs1": ("CKR_KEY_FUNCTION_NOT_PERMITTED", "wrapping-key"),
        "decrypt_raw": ("CKR_MECHANISM_INVALID", "mechanism-raw-rsa"),
        "sign": ("CKR_KEY_FUNCTION_NOT_PERMITTED", "wrapping-key"),
        "sign_raw": ("CKR_MECHANISM_INVALID", "mechanism-raw-rsa"),
        "encrypt_raw": ("CKR_MECHANISM_INVALID", "mechanism-raw-rsa"),
        "unmark": ("CKR_ACTION_PROHIBITED", "wrapping-key"),
        "relabel": ("CKR_ACTION_PROHIBITED", "wrapping-key"),
        "copy": ("CKR_ACTION_PROHIBITED", "wrapping-key"),
    }
    assert {k: out[k] for k in want} == {k: v[0] for k, v in want.items()}
    denied = lab.events("denied")
    assert [(e["function"], e["rule"]) for e in denied] == [
        ("C_DecryptInit", "wrapping-key"), ("C_DecryptInit", "wrapping-key"),
        ("C_DecryptInit", "mechanism-raw-rsa"), ("C_SignInit", "wrapping-key"),
        ("C_SignInit", "mechanism-raw-rsa"), ("C_EncryptInit", "mechanism-raw-rsa"),
        ("C_SetAttributeValue", "wrapping-key"), ("C_SetAttributeValue", "wrapping-key"),
        ("C_CopyObject", "wrapping-key")]  # fmt: skip
    assert out["left"] == 1
    # SoftHSM on its own (no layer): CKA_ALLOWED_MECHANISMS, CKA_SIGN=false,
    # CKA_MODIFIABLE=false and CKA_COPYABLE=false hold each of these too, except raw RSA
    # (the mark allows it: only the layer ever asks for it).
    raw = lab.run(body, module=SOFTHSM)
    assert raw["decrypt_oaep"] == raw["decrypt_pkcs1"] == "CKR_MECHANISM_INVALID"
    assert raw["sign"] in ("CKR_KEY_FUNCTION_NOT_PERMITTED", "CKR_MECHANISM_INVALID")
    assert raw["unmark"] == raw["relabel"] == "CKR_ACTION_PROHIBITED"
    assert raw["copy"] == "CKR_ACTION_PROHIBITED"
    assert raw["decrypt_raw"] == "CKR_OK"


def test_only_the_officers_wrapping_key_shape_makes_a_marked_key(lab: Lab) -> None:
    lab.run('rsa_pair("plain")')
    lab.clear()
    out = lab.run(
        with_kek(
            """
        two = RAW_ONLY + struct.pack("L", P.CKM_RSA_PKCS)
        base_ = [(P.CKA_DECRYPT, True), (P.CKA_UNWRAP, True)]
        out["two_mechs"] = ckr(kek_pair, "a", [(P.CKA_ALLOWED_MECHANISMS, two)] + base_)
        out["no_decrypt"] = ckr(kek_pair, "b", [(P.CKA_ALLOWED_MECHANISMS, RAW_ONLY),
                                                 (P.CKA_UNWRAP, True)])
        out["sign"] = ckr(kek_pair, "c", [(P.CKA_ALLOWED_MECHANISMS, RAW_ONLY),
                                           (P.CKA_SIGN, True)] + base_)
        out["modifiable"] = ckr(kek_pair, "d", [(P.CKA_ALLOWED_MECHANISMS, RAW_ONLY),
                                                 (P.CKA_MODIFIABLE, True)] + base_)
        out["malformed"] = ckr(kek_pair, "e", [(P.CKA_ALLOWED_MECHANISMS, b"\\x03")] + base_)
        out["ec"] = ckr(ec_pair, "f", P256, [(P.CKA_ALLOWED_MECHANISMS, RAW_ONLY)])
        out["public"] = ckr(se.generateKeyPair,
            [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, P.CKK_RSA),
             (P.CKA_MODULUS_BITS, 2048), (P.CKA_ALLOWED_MECHANISMS, RAW_ONLY)],
            [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_RSA)],
            P.MechanismRSAGENERATEKEYPAIR)
        (plain,) = find("plain", P.CKO_PRIVATE_KEY)
        out["set"] = ckr(se.setAttributeValue, plain, [(P.CKA_ALLOWED_MECHANISMS, RAW_ONLY)])
        out["copy"] = copy_object(plain, P.CKA_ALLOWED_MECHANISMS, RAW_ONLY)
        out["aes"] = ckr(aes, "g", 32, [(P.CKA_ALLOWED_MECHANISMS, RAW_ONLY)])
        out["private_keys"] = len(se.findObjects([(P.CKA_CLASS, P.CKO_PRIVATE_KEY)]))
        """
        )
    )
    want = {
        "two_mechs": "wrapping-key", "no_decrypt": "wrapping-key", "sign": "wrapping-key",
        "modifiable": "wrapping-key", "malformed": "malformed", "ec": "wrapping-key",
        "public": "wrapping-key", "set": "wrapping-key", "copy": "wrapping-key",
        "aes": "wrapping-key",
    }  # fmt: skip
    assert out["set"] == out["copy"] == "CKR_TEMPLATE_INCONSISTENT"
    assert all(out[k] != "CKR_OK" for k in want), out
    assert [e["rule"] for e in lab.events("denied")] == list(want.values())
    assert out["private_keys"] == 1  # "plain" only
    user = lab.run(_KEK + 'out["kek"] = ckr(kek_pair, "u")', role="crypto-user")
    assert user["kek"] == "CKR_ACTION_PROHIBITED"
    assert lab.events("denied")[-1]["rule"] == "role-crypto-user"


def test_a_wrapping_key_made_before_the_mark_keeps_softhsms_sha1_only_oaep(lab: Lab) -> None:
    """SoftHSM 2.6.1's own OAEP (MechParamCheckRSAPKCSOAEP): SHA-1 only."""
    out = lab.run('out["n"], out["e"] = (bytes(v).hex() for v in se.getAttributeValue('
                  'rsa_pair("old")[0], [P.CKA_MODULUS, P.CKA_PUBLIC_EXPONENT], True))')  # fmt: skip
    kek = rsa.RSAPublicNumbers(int(out["e"], 16), int(out["n"], 16)).public_key()
    data = {"sha256": kek.encrypt(os.urandom(32), OAEP_SHA256).hex(),
            "sha1": kek.encrypt(os.urandom(32), OAEP_SHA1).hex()}  # fmt: skip
    out = lab.run(
        with_kek(
            """
        (kek,) = find("old", P.CKO_PRIVATE_KEY)
        out["sha256"] = ckr(se.unwrapKey, kek, bytes.fromhex(req["data"]["sha256"]),
                            session_aes(), SHA256)
        out["sha1"] = ckr(se.unwrapKey, kek, bytes.fromhex(req["data"]["sha1"]),
                          session_aes(), SHA1)
        """
        ),
        data=data,
    )
    assert out == {"sha256": "CKR_ARGUMENTS_BAD", "sha1": "CKR_OK"}
