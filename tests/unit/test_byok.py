"""``hsmctl key import``'s pure parts: splitting the wrapped file, telling the target's
kind from the AES-KWP part's length, the fingerprint rule, and what an unwrap refusal
becomes (exit 3 for a blob that does not decrypt, 2 for a policy rule)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pkcs11
import pytest

from hsmctl.errors import IntegrityError, UsageError
from hsmctl.keys import byok
from hsmctl.keys.spec import Kind

pytestmark = pytest.mark.unit

P = Path("blob")


@pytest.mark.parametrize(
    ("kwp_len", "kind"),
    [(24, Kind.AES), (32, Kind.AES), (40, Kind.AES), (80, Kind.EC), (144, Kind.EC),
     (248, Kind.EC), (1224, Kind.RSA)],
)  # fmt: skip
def test_kind_from_the_kwp_length(kwp_len: int, kind: Kind) -> None:
    blob = byok.split(b"r" * 384 + b"k" * kwp_len, 384, P)
    assert (blob.transport, blob.kind) == (b"r" * 384, kind)


@pytest.mark.parametrize("size", [1, 384, 384 + 8, 384 + 17, 384 + 23])
def test_not_a_wrapped_key_is_usage(size: int) -> None:
    with pytest.raises(UsageError, match="is not RSA-OAEP"):
        byok.split(b"x" * size, 384, P)


def test_empty_is_usage() -> None:
    with pytest.raises(UsageError, match="empty"):
        byok.split(b"", 384, P)


def test_fingerprint_is_sha256_of_the_spki() -> None:
    assert byok.fingerprint(b"abc") == hashlib.sha256(b"abc").hexdigest()


class _Token(byok.ByokToken):
    def __init__(self) -> None:
        self.appliance = "hsm99"


@pytest.mark.parametrize(
    "exc", [pkcs11.GeneralError(), pkcs11.exceptions.WrappedKeyInvalid(),
            pkcs11.exceptions.EncryptedDataInvalid()],
)  # fmt: skip
def test_a_blob_that_does_not_unwrap_is_integrity(exc: Exception) -> None:
    err = _Token()._refusal(exc, "the RSA-OAEP part", Kind.AES)
    assert isinstance(err, IntegrityError) and err.exit_code == 3
    assert "nothing was imported" in err.message


def test_a_policy_refusal_names_the_rule() -> None:
    err = _Token()._refusal(pkcs11.KeySizeRange(), "the AES-KWP part", Kind.AES)
    assert isinstance(err, UsageError) and err.detail["rule"] == "aes-size"
