"""``hsmctl key``'s pure parts: the ``--type`` grammar, a key's row, the kit's remote line,
hsmctl's own client name, and what a PKCS#11 refusal becomes (rule, exit code)."""

from __future__ import annotations

from pathlib import Path

import pkcs11
import pytest

from hsmctl.clients import kit
from hsmctl.errors import ConflictError, HsmctlError, UnreachableError, UsageError
from hsmctl.keys import spec
from hsmctl.keys.remote import ckr_name, translate

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "kind", "bits", "curve"),
    [
        ("rsa:3072", spec.Kind.RSA, 3072, None),
        ("RSA:1024", spec.Kind.RSA, 1024, None),  # syntax only: the device decides
        ("ec:P-256", spec.Kind.EC, 256, "secp256r1"),
        ("ec:prime256v1", spec.Kind.EC, 256, "secp256r1"),
        ("ec:secp256k1", spec.Kind.EC, 256, "secp256k1"),
        ("ec:p-521", spec.Kind.EC, 521, "secp521r1"),
        ("aes:256", spec.Kind.AES, 256, None),
    ],
)
def test_type_grammar(text: str, kind: spec.Kind, bits: int, curve: str | None) -> None:
    parsed = spec.parse_type(text)
    assert (parsed.kind, parsed.bits, parsed.curve) == (kind, bits, curve)


@pytest.mark.parametrize(
    "text", ["", "rsa", "rsa:", "rsa:-1", "rsa:0", "rsa:2e3", "rsa:99999", "dsa:2048",
             "ec:P-999", "ec:", "aes:x", "ec:P-256;id", "rsa:2048:1"],
)  # fmt: skip
def test_bad_types_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--type"):
        spec.parse_type(text)


@pytest.mark.parametrize("label", ["", "-x", "a b", "a/b", "x;id", "é", "k" * 65])
def test_bad_labels_are_refused(label: str) -> None:
    with pytest.raises(ValueError, match="--label"):
        spec.check_label(label)


def test_rows_size_each_kind() -> None:
    rsa = spec.row(spec.Kind.RSA, "r", b"\x01", modulus=b"\x00" + b"\xff" * 256, local=True,
                   extractable=False, sensitive=True)  # fmt: skip
    assert rsa.as_dict() == {"label": "r", "id": "01", "type": "rsa", "size": 2048,
                             "local": True, "extractable": False, "sensitive": True}  # fmt: skip
    p256 = bytes.fromhex("06082a8648ce3d030107")
    assert spec.row(spec.Kind.EC, "e", b"", ec_params=p256).size == 256
    assert spec.row(spec.Kind.EC, "e", b"", ec_params=b"\x06\x01\x00").size is None
    assert spec.row(spec.Kind.AES, "a", b"", value_len=24).size == 192


def test_remote_line_of_a_module_file() -> None:
    text = "# comment\nremote: |/usr/bin/ssh -T p11-a@198.19.0.2\n"
    assert kit.remote_line(text) == "|/usr/bin/ssh -T p11-a@198.19.0.2"
    for bad in ("", "module: /x.so\n", "remote: unix:path=/x\n", "remote: |a\nremote: |b\n"):
        with pytest.raises(ValueError):
            kit.remote_line(bad)


def test_the_kit_ssh_pins_everything_and_negotiates_aes_gcm_only(tmp_path: Path) -> None:
    argv = kit.ssh_command(tmp_path, "app", "198.19.0.2")
    opts = {argv[i + 1].split("=", 1)[0]: argv[i + 1].split("=", 1)[1]
            for i, a in enumerate(argv) if a == "-o"}  # fmt: skip
    assert opts["Ciphers"] == "aes256-gcm@openssh.com,aes128-gcm@openssh.com"
    assert opts["StrictHostKeyChecking"] == "yes" and opts["IdentitiesOnly"] == "yes"
    assert opts["UserKnownHostsFile"] == str(tmp_path / "known_hosts")
    assert argv[-1] == "p11-app@198.19.0.2" and "-T" in argv


@pytest.mark.parametrize(
    ("host", "name"),
    [("vm", "hsmctl-vm"), ("Build_Host.example.org", "hsmctl-build-host"),
     ("a" * 40, "hsmctl-" + "a" * 21), ("--", "hsmctl")],
)  # fmt: skip
def test_own_client_name(host: str, name: str) -> None:
    assert kit.own_client_name(host) == name
    assert kit.NAME.fullmatch(name)


def test_refusals_name_the_rule_and_exit_2() -> None:
    err = translate(pkcs11.KeySizeRange(), "hsm1", "generate-rsa")
    assert isinstance(err, UsageError) and err.detail["rule"] == "rsa-size"
    prohibited = pkcs11.PKCS11Error("Unmapped error code 0x1b")
    assert ckr_name(prohibited) == "CKR_ACTION_PROHIBITED"
    assert translate(prohibited, "hsm1", "destroy").detail["rule"] == "role-crypto-user"
    curve = pkcs11.PKCS11Error("Unmapped error code 0x140")
    assert translate(curve, "hsm1", "generate-ec").detail["rule"] == "ec-curve"
    assert isinstance(translate(pkcs11.PinIncorrect(), "hsm1", "login"), UsageError)
    assert isinstance(translate(pkcs11.PinLocked(), "hsm1", "login"), ConflictError)
    assert isinstance(translate(pkcs11.DeviceRemoved(), "hsm1", "connect"), UnreachableError)
    other = translate(pkcs11.KeySizeRange(), "hsm1", "list")
    assert type(other) is HsmctlError and other.exit_code == 1
