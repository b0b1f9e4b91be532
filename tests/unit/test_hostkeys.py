"""Host key parsing, fingerprints and pinning, checked against OpenSSH's own ssh-keygen."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path

import pytest

from hsmctl.errors import HostKeyMismatch, UsageError
from hsmctl.ssh.hostkeys import (
    KeyFormatError,
    PinnedHostKeys,
    PublicKey,
    fingerprint,
    known_hosts_line,
    normalize_fingerprint,
    parse_known_hosts,
)

pytestmark = pytest.mark.unit

KEY_SPECS = [
    ("ed25519", []),
    ("ecdsa", ["-b", "256"]),
    ("ecdsa", ["-b", "384"]),
    ("ecdsa", ["-b", "521"]),
    ("rsa", ["-b", "2048"]),
]


def keygen(path: Path, kind: str, extra: list[str], comment: str = "host@lab") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return path.with_name(path.name + ".pub")


def keygen_fingerprint(pub: Path) -> str:
    """What ``ssh-keygen -l`` prints: BITS FINGERPRINT COMMENT (TYPE)."""
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    return {
        f"{kind}{''.join(extra)}": keygen(d / f"k_{kind}{''.join(extra)}", kind, extra)
        for kind, extra in KEY_SPECS
    }


@pytest.fixture
def ed(keys: dict[str, Path]) -> PublicKey:
    return PublicKey.parse(keys["ed25519"].read_text())


@pytest.fixture
def ec(keys: dict[str, Path]) -> PublicKey:
    return PublicKey.parse(keys["ecdsa-b256"].read_text())


def test_fingerprints_match_ssh_keygen(keys: dict[str, Path]) -> None:
    for pub in keys.values():
        key = PublicKey.parse(pub.read_text())
        assert key.fingerprint == keygen_fingerprint(pub)
        assert key.comment == "host@lab"
        assert key.to_line() == pub.read_text().strip()


def test_key_types_come_from_the_blob(keys: dict[str, Path]) -> None:
    types = {name: PublicKey.parse(p.read_text()).key_type for name, p in keys.items()}
    assert types == {
        "ed25519": "ssh-ed25519",
        "ecdsa-b256": "ecdsa-sha2-nistp256",
        "ecdsa-b384": "ecdsa-sha2-nistp384",
        "ecdsa-b521": "ecdsa-sha2-nistp521",
        "rsa-b2048": "ssh-rsa",
    }


def test_fingerprint_format_is_unpadded_base64_sha256(ed: PublicKey) -> None:
    raw = base64.b64encode(hashlib.sha256(ed.blob).digest()).decode()
    assert raw.endswith("=")
    assert fingerprint(ed.blob) == "SHA256:" + raw.rstrip("=")
    assert len(ed.fingerprint) == len("SHA256:") + 43


def test_equality_ignores_comment(ed: PublicKey) -> None:
    assert PublicKey.parse(f"{ed.key_type} {ed.base64} other-comment") == ed
    assert PublicKey.from_blob(ed.blob) == ed
    assert ed.fingerprint in repr(ed) and ed.base64 not in repr(ed)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "ssh-ed25519",
        "ssh-ed25519 not*base64",
        "ssh-ed25519 AAAA",
    ],
)
def test_malformed_key_lines_are_refused(line: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        PublicKey.parse(line)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


def test_type_label_must_match_the_key(ed: PublicKey, ec: PublicKey) -> None:
    with pytest.raises(KeyFormatError, match="says"):
        PublicKey.parse(f"{ec.key_type} {ed.base64}")


def test_truncated_or_padded_blobs_are_refused(ed: PublicKey) -> None:
    for blob in (ed.blob[:-1], ed.blob + b"\x00"):
        with pytest.raises(KeyFormatError):
            PublicKey.parse(f"ssh-ed25519 {base64.b64encode(blob).decode()}")


def test_normalize_fingerprint(ed: PublicKey) -> None:
    fp = ed.fingerprint
    assert normalize_fingerprint(fp) == fp
    assert normalize_fingerprint(f"  {fp}=\n") == fp
    for bad in ("MD5:aa:bb", fp[:-2], "SHA256:", "SHA256:!!!!", fp.removeprefix("SHA256:")):
        with pytest.raises(KeyFormatError):
            normalize_fingerprint(bad)


# -- known_hosts, compared with ssh-keygen -F ---------------------------------------------------


def keygen_lookup(known_hosts: Path, name: str) -> set[str]:
    """Fingerprints of the (non-revoked, non-CA) keys ``ssh-keygen -F`` finds for a name."""
    proc = subprocess.run(
        ["ssh-keygen", "-F", name, "-f", str(known_hosts)],
        capture_output=True,
        text=True,
        check=False,
    )
    found: set[str] = set()
    for line in proc.stdout.splitlines():
        if line.startswith("#") or not line.strip() or line.startswith("@"):
            continue
        found.add(PublicKey.parse(line.split(None, 1)[1]).fingerprint)
    return found


@pytest.fixture
def known_hosts(tmp_path: Path, keys: dict[str, Path]) -> tuple[Path, dict[str, PublicKey]]:
    k = {name: PublicKey.parse(p.read_text()) for name, p in keys.items()}
    text = "\n".join(
        [
            "# provider pins",
            known_hosts_line("198.18.0.11", k["ed25519"]),
            known_hosts_line("198.18.0.11", k["ecdsa-b256"]),
            known_hosts_line("198.18.0.12", k["ecdsa-b384"], port=2222),
            f"hsm03,198.18.0.13 {k['ecdsa-b521'].key_type} {k['ecdsa-b521'].base64} c",
            f"198.18.1.*,!198.18.1.9 {k['rsa-b2048'].key_type} {k['rsa-b2048'].base64}",
            "",
        ]
    )
    path = tmp_path / "known_hosts"
    path.write_text(text)
    return path, k


CASES = [
    ("198.18.0.11", 22, {"ed25519", "ecdsa-b256"}),
    ("198.18.0.12", 2222, {"ecdsa-b384"}),
    ("198.18.0.12", 22, set()),
    ("198.18.0.11", 2222, set()),
    ("HSM03", 22, {"ecdsa-b521"}),
    ("198.18.0.13", 22, {"ecdsa-b521"}),
    ("198.18.1.7", 22, {"rsa-b2048"}),
    ("198.18.1.9", 22, set()),
    ("198.18.10.7", 22, set()),
]


@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize(("host", "port", "expected"), CASES)
def test_known_hosts_lookup_agrees_with_ssh_keygen(
    known_hosts: tuple[Path, dict[str, PublicKey]],
    host: str,
    port: int,
    expected: set[str],
    hashed: bool,
) -> None:
    path, k = known_hosts
    if hashed:  # HashKnownHosts form; ssh-keygen leaves the wildcard line as it is
        subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)
        assert "|1|" in path.read_text()
    pins = PinnedHostKeys.from_known_hosts(path.read_text(), host, port)
    want = {k[name].fingerprint for name in expected}
    assert set(pins.fingerprints()) == want
    # ssh lowercases the host name before looking it up (ssh-keygen -F does not, which
    # only matters for hashed lines), so compare with what ssh itself would look up.
    name = host.lower() if port == 22 else f"[{host.lower()}]:{port}"
    assert keygen_lookup(path, name) == want


def test_markers(known_hosts: tuple[Path, dict[str, PublicKey]]) -> None:
    path, k = known_hosts
    text = path.read_text() + (
        f"@revoked * {k['ed25519'].key_type} {k['ed25519'].base64}\n"
        f"@cert-authority *.lab {k['rsa-b2048'].key_type} {k['rsa-b2048'].base64}\n"
    )
    entries = parse_known_hosts(text)
    assert [e.marker for e in entries][-2:] == ["@revoked", "@cert-authority"]
    pins = PinnedHostKeys.from_known_hosts(text, "198.18.0.11")
    assert not pins.matches(k["ed25519"])  # pinned, but revoked
    assert pins.matches(k["ecdsa-b256"])
    with pytest.raises(HostKeyMismatch, match="revoked"):
        pins.verify("198.18.0.11", k["ed25519"])
    assert not PinnedHostKeys.from_known_hosts(text, "x.lab")  # CA lines pin nothing


@pytest.mark.parametrize(
    "line",
    [
        "198.18.0.11",
        "198.18.0.11 ssh-ed25519",
        "@bogus 198.18.0.11 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBYHvbeFFbI6Q0ZBJ2ANHgQYuOOSbn",
    ],
)
def test_malformed_known_hosts_lines_fail_closed(line: str) -> None:
    with pytest.raises(KeyFormatError, match="line 2"):
        parse_known_hosts(f"# header\n{line}\n")


# -- the pinned set ---------------------------------------------------------------------------


def test_pins_by_key_and_by_fingerprint(ed: PublicKey, ec: PublicKey) -> None:
    by_key = PinnedHostKeys([ed])
    by_fp = PinnedHostKeys.of(ed.fingerprint)
    mixed = PinnedHostKeys.of(ed.to_line(), ec.fingerprint)
    assert by_key.matches(ed) and not by_key.matches(ec)
    assert by_fp.matches(ed) and not by_fp.matches(ec)
    assert mixed.matches(ed) and mixed.matches(ec)
    assert mixed.fingerprints() == sorted([ed.fingerprint, ec.fingerprint])
    assert len(mixed) == 2 and set(mixed) == {ed.fingerprint, ec.fingerprint}


def test_verify_raises_host_key_mismatch_with_both_sides(ed: PublicKey, ec: PublicKey) -> None:
    pins = PinnedHostKeys([ed])
    pins.verify("hsm01", ed)
    with pytest.raises(HostKeyMismatch) as info:
        pins.verify("hsm01", ec)
    err = info.value
    assert err.exit_code == 3
    assert err.detail == {"host": "hsm01", "presented": ec.fingerprint, "pinned": [ed.fingerprint]}
    assert ec.fingerprint in str(err) and ed.fingerprint in str(err)


def test_empty_pins_match_nothing(ed: PublicKey) -> None:
    empty = PinnedHostKeys()
    assert not empty and len(empty) == 0
    assert not empty.matches(ed)
    with pytest.raises(HostKeyMismatch, match="no keys pinned"):
        empty.verify("hsm01", ed)


def test_key_types_in_pin_order(ed: PublicKey, ec: PublicKey) -> None:
    assert PinnedHostKeys([ec, ed, ec]).key_types() == ("ecdsa-sha2-nistp256", "ssh-ed25519")
    assert PinnedHostKeys.of(ed.fingerprint).key_types() == ()


def test_lab_style_inventory_lines(ed: PublicKey) -> None:
    """The lab inventory lists ``TYPE BASE64 COMMENT`` lines per appliance."""
    pins = PinnedHostKeys.of(f"{ed.key_type} {ed.base64} hsm01-mgmt")
    assert pins.keys[0].comment == "hsm01-mgmt" and pins.matches(ed)


def test_one_key_type_for_inventory_transport_and_handoff(keys: dict[str, Path]) -> None:
    """The inventory, the SSH transport and the hand-off read a key line the same way."""
    from hsmctl import sshkeys
    from hsmctl.handoff.identity import check_ssh_public_key, ssh_fingerprint, ssh_key_blob
    from hsmctl.inventory.model import HOST_KEY_TYPES
    from hsmctl.inventory.model import PublicKey as InventoryKey

    assert InventoryKey is PublicKey is sshkeys.PublicKey
    for path in keys.values():
        line = path.read_text()
        key = PublicKey.parse(line)
        assert PublicKey.parse(line, HOST_KEY_TYPES) == key
        assert ssh_fingerprint(line) == key.fingerprint == keygen_fingerprint(path)
        assert ssh_key_blob(line) == key.blob
        assert check_ssh_public_key(line) == key.line
        assert key.to_line() == line.strip() and key.algorithm == key.key_type


def test_key_format_errors_are_usage_errors_and_value_errors(ed: PublicKey) -> None:
    """Exit 2 where they surface; ``ValueError`` for callers that add their own context."""
    with pytest.raises(KeyFormatError) as info:
        PublicKey.parse(f"ssh-rsa {ed.base64}", frozenset({"ssh-ed25519"}))
    assert isinstance(info.value, ValueError) and info.value.exit_code == 2
    assert "not accepted" in str(info.value)
