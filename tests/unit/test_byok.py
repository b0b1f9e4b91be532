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


def test_allowed_mechanisms_pack_as_the_platforms_ulong_array() -> None:
    import struct

    packed = byok.pack_mechanisms([byok.CKM_RSA_X_509, 0x9])
    assert packed == struct.pack("LL", 3, 9)
    assert byok.unpack_mechanisms(packed) == [3, 9]
    assert byok.unpack_mechanisms(b"") == []
    with pytest.raises(ValueError, match="not a CK_MECHANISM_TYPE array"):
        byok.unpack_mechanisms(b"\x03")


def test_oaep_parameters_the_wrapping_key_does_not_take_are_usage() -> None:
    """SoftHSM's own OAEP (a wrapping key made before the mark) refuses SHA-256 with
    CKR_ARGUMENTS_BAD: not an altered file, a choice to change (exit 2)."""
    err = _Token()._refusal(pkcs11.ArgumentsBad(), "the RSA-OAEP part", Kind.AES, "sha256")
    assert isinstance(err, UsageError) and "RSA-OAEP-SHA256" in err.message


@pytest.mark.parametrize("oaep_hash", ["sha256", "sha1"])
def test_a_blob_that_does_not_unwrap_names_the_scheme_tried(oaep_hash: str) -> None:
    err = _Token()._refusal(pkcs11.GeneralError(), "the RSA-OAEP part", Kind.AES, oaep_hash)
    assert isinstance(err, IntegrityError)
    assert f"RSA-OAEP-{oaep_hash.upper()} + AES-KWP" in err.message
