"""The cloning domain (SPEC §12) on real SoftHSM2 through the key-policy layer: the SO's
domain key (``hsm domain set``'s token operation), keys made in the domain, and what
the layer refuses and logs. Reuses the policy tests' throwaway token and child runner."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

pytest.importorskip("PyKCS11")

from hsmctl.appliance import domainkey
from hsmctl.appliance import token as tok
from hsmctl.errors import UsageError
from tests.softhsm import test_p11policy as base

Lab = base.Lab
SO_PIN = base.SO_PIN


@pytest.fixture
def lab(tmp_path: Path, policy_so: Path) -> Lab:
    """The policy tests' throwaway token (label, PINs) and the module built here."""
    return base.make_lab(tmp_path, policy_so)


pytestmark = [pytest.mark.softhsm]

SECRET = "domain-secret-of-tenant-one-0001"
OTHER = "domain-secret-of-another-tenant-9"


def set_domain(lab: Lab, monkeypatch: pytest.MonkeyPatch, secret: str = SECRET) -> Any:
    monkeypatch.setenv("SOFTHSM2_CONF", str(lab.conf))
    return tok.customer_domain_set(SO_PIN, secret)


_DOMAIN = """
(dk,) = se.findObjects([(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_LABEL, "hsm-domain")])
PAD = P.Mechanism(P.CKM_AES_KEY_WRAP_PAD)
"""


def test_domain_set_is_idempotent_and_one_domain_only(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = set_domain(lab, monkeypatch)
    assert first == {"domain": domainkey.fingerprint(SECRET), "created": True}
    assert set_domain(lab, monkeypatch) == {"domain": first["domain"], "created": False}
    with pytest.raises(tok.TokenStateError, match="another cloning domain"):
        set_domain(lab, monkeypatch, OTHER)
    assert tok.customer_status().domain == first["domain"]
    assert SECRET not in first["domain"] and len(first["domain"]) == 64
    with pytest.raises(tok.TokenError):
        tok.customer_domain_set("wrong-so-pin-1", OTHER)
    with pytest.raises(UsageError):  # too short: nothing made
        tok.customer_domain_set(SO_PIN, "short")
    out = lab.run(
        _DOMAIN
        + dedent("""
        out["attrs"] = se.getAttributeValue(dk, [P.CKA_TRUSTED, P.CKA_SENSITIVE,
            P.CKA_EXTRACTABLE, P.CKA_WRAP, P.CKA_UNWRAP, P.CKA_ENCRYPT, P.CKA_SIGN])
        out["value"] = raw_get(dk, P.CKA_VALUE)
        """)
    )
    assert out["attrs"] == [True, True, False, True, True, False, False]
    assert out["value"] == "CKR_ATTRIBUTE_SENSITIVE"


def test_keys_made_in_the_domain_clone_under_the_domain_key_only(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab.run('pub, priv = ec_pair("before")')
    set_domain(lab, monkeypatch)
    out = lab.run(
        _DOMAIN
        + dedent("""
        pub, priv = ec_pair("signer")
        kek = aes("kek", extra=[(P.CKA_WRAP, True), (P.CKA_UNWRAP, True)])
        out["prot"] = se.getAttributeValue(priv, [P.CKA_SENSITIVE, P.CKA_EXTRACTABLE,
                                                  P.CKA_WRAP_WITH_TRUSTED])
        out["explicit"] = se.getAttributeValue(
            aes("asked", extra=[(P.CKA_EXTRACTABLE, False)]), [P.CKA_EXTRACTABLE])
        out["no_wwt"] = ckr(aes, "x", 32, [(P.CKA_WRAP_WITH_TRUSTED, False)])
        blob = bytes(se.wrapKey(dk, priv, PAD))
        tmpl = [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_EC),
                (P.CKA_TOKEN, True), (P.CKA_SIGN, True), (P.CKA_LABEL, "copy")]
        copy = se.unwrapKey(dk, blob, tmpl, PAD)
        out["copy"] = se.getAttributeValue(copy, [P.CKA_EXTRACTABLE, P.CKA_WRAP_WITH_TRUSTED,
                                                  P.CKA_SENSITIVE])
        digest = bytes(32)
        sig = bytes(se.sign(copy, digest, P.Mechanism(P.CKM_ECDSA)))
        out["verify"] = se.verify(pub, digest, sig, P.Mechanism(P.CKM_ECDSA))
        # refusals
        out["by_kek"] = ckr(se.wrapKey, kek, priv, PAD)
        (before,) = find("before", P.CKO_PRIVATE_KEY)
        out["before"] = ckr(se.wrapKey, dk, before, PAD)
        out["self"] = ckr(se.wrapKey, dk, dk, PAD)
        out["encrypt"] = ckr(se.encrypt, dk, bytes(16), P.Mechanism(P.CKM_AES_ECB))
        out["sign"] = ckr(se.sign, dk, bytes(16), P.Mechanism(P.CKM_SHA256_HMAC))
        out["cbc"] = ckr(se.wrapKey, dk, priv, P.Mechanism(P.CKM_AES_CBC_PAD, bytes(16)))
        out["destroy"] = ckr(se.destroyObject, dk)
        out["weaken"] = ckr(se.setAttributeValue, priv, [(P.CKA_WRAP_WITH_TRUSTED, False)])
        """)
    )
    assert out["prot"] == [True, True, True]
    assert out["explicit"] == [True]
    assert out["no_wwt"] == "CKR_TEMPLATE_INCONSISTENT"
    assert out["copy"] == [True, True, True]
    assert out["verify"] is True
    assert out["by_kek"] == "CKR_KEY_NOT_WRAPPABLE"
    assert out["before"] == "CKR_KEY_NOT_WRAPPABLE"
    assert out["self"] == "CKR_KEY_NOT_WRAPPABLE"
    assert out["encrypt"] == "CKR_KEY_FUNCTION_NOT_PERMITTED"
    assert out["sign"] == "CKR_KEY_FUNCTION_NOT_PERMITTED"
    assert out["cbc"] == "CKR_MECHANISM_INVALID"
    assert out["destroy"] == "CKR_ACTION_PROHIBITED"
    assert out["weaken"] == "CKR_ATTRIBUTE_READ_ONLY"
    rules = [(e["function"], e["rule"]) for e in lab.events("denied")]
    assert rules == [
        ("C_GenerateKey", "extractable"),
        ("C_WrapKey", "domain-wrap"),
        ("C_WrapKey", "domain-wrap"),
        ("C_WrapKey", "domain-wrap"),
        ("C_EncryptInit", "domain-key"),
        ("C_SignInit", "domain-key"),
        ("C_WrapKey", "domain-key"),
        ("C_DestroyObject", "domain-key"),
        ("C_SetAttributeValue", "weakening-change"),
    ]
    imported = lab.events("key-imported")
    assert [e["label"] for e in imported] == ["copy"]


def test_without_a_domain_nothing_is_extractable(lab: Lab) -> None:
    out = lab.run(
        """
        pub, priv = ec_pair("plain")
        out["prot"] = se.getAttributeValue(priv, [P.CKA_EXTRACTABLE, P.CKA_WRAP_WITH_TRUSTED])
        """
    )
    assert out["prot"] == [False, False]
