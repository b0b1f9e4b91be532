"""DomainToken.describe reads a key object's attributes in one C_GetAttributeValue (what
made ha sync and backup of 1,000 keys slow over the kit was one round trip per
attribute): the batched read describes every kind of key exactly as reading the
attributes one by one does. Real SoftHSM2 (a token of its own in a temporary
directory), python-pkcs11; the remote path is not involved."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hsmctl.keys import domain
from hsmctl.keys.domain import DomainToken

SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
pytestmark = pytest.mark.skipif(not SOFTHSM.exists(), reason="SoftHSM2 is not installed")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import pkcs11
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\n")
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "describe",
                        "--so-pin", "12345678", "--pin", "87654321"],
                       check=True, capture_output=True)  # fmt: skip
        lib = pkcs11.lib(str(SOFTHSM))
        token = lib.get_token(token_label="describe")
        with token.open(user_pin="87654321", rw=True) as se:
            se.generate_keypair(KeyType.RSA, 2048, label="rsa", id=b"\x01", store=True)
            params = se.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True,
            )
            params.generate_keypair(label="ec", id=b"\x02", store=True)
            se.generate_key(KeyType.AES, 256, label="aes", id=b"\x03", store=True,
                            template={Attribute.EXTRACTABLE: True,
                                      Attribute.WRAP_WITH_TRUSTED: True})  # fmt: skip
            yield se
        pkcs11.unload(str(SOFTHSM))
    finally:
        if before is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = before


def _describe_all(se: Any) -> list[dict[str, Any]]:
    token = DomainToken("t", "|unused", None)  # type: ignore[arg-type]
    token._session = se
    out = [token.describe(cls, obj) for cls, obj in token._objects()]
    return sorted((e for e in out if e is not None), key=lambda e: (e["class"], e["label"]))


def test_batched_and_one_by_one_reads_describe_alike(
    session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batched = _describe_all(session)
    assert [(e["class"], e["label"]) for e in batched] == [
        ("private-key", "ec"), ("private-key", "rsa"), ("public-key", "ec"),
        ("public-key", "rsa"), ("secret-key", "aes"),
    ]  # fmt: skip
    monkeypatch.setattr(domain, "_batch_getter", lambda obj, cls: domain._getter(obj))
    assert _describe_all(session) == batched
    by = {(e["class"], e["label"]): e for e in batched}
    assert by[("secret-key", "aes")]["cloneable"] is True
    assert by[("private-key", "rsa")]["cloneable"] is False
    assert by[("private-key", "rsa")]["public_sha256"] == by[("public-key", "rsa")]["public_sha256"]
    assert set(by[("public-key", "ec")]["public"]) == {"ec_params", "ec_point"}
    assert "sign" in by[("private-key", "ec")]["usage"]


def test_one_call_per_object(session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pkcs11 import _pkcs11

    calls: list[int] = []
    obj_class: Any = getattr(_pkcs11, "Object")  # noqa: B009 (not in the stubs)
    real = obj_class.get_attributes

    def counting(self: Any, keys: Any) -> Any:
        calls.append(len(keys))
        return real(self, keys)

    monkeypatch.setattr(obj_class, "get_attributes", counting)
    described = _describe_all(session)
    assert len(calls) == len(described) == 5 and min(calls) >= 10
