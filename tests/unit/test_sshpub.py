"""The in-process ``ssh-keygen -l`` (hsmctl/appliance/sshpub.py) against OpenSSH's own:
wherever it answers, ssh-keygen accepts the line and prints the same bits, fingerprint
and kind; on the device's key types it always answers; hostile lines (mutated blobs,
types, curves, base64, crafted EC points OpenSSH refuses) never get an answer that
ssh-keygen would not give."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hsmctl.appliance import accounts, sshpub
from hsmctl.appliance.commands import sysconf

pytestmark = pytest.mark.unit

KEY_SPECS = [
    ("ed25519", []),
    ("ecdsa", ["-b", "256"]),
    ("ecdsa", ["-b", "384"]),
    ("ecdsa", ["-b", "521"]),
    ("rsa", ["-b", "2048"]),
]


def keygen_l(line: str) -> sshpub.KeyInfo | None:
    proc = subprocess.run(
        ["ssh-keygen", "-l", "-f", "-"],
        input=line + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    fields = proc.stdout.split()
    return sshpub.KeyInfo(int(fields[0]), fields[1], fields[-1].strip("()"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    d = tmp_path_factory.mktemp("keys")
    for kind, extra in KEY_SPECS:
        path = d / f"{kind}{''.join(extra)}"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", "hsm78-data", "-f", path],
            check=True,
        )
        out[path.name] = (path.with_suffix(".pub")).read_text().strip()
    return out


def _blob(line: str) -> tuple[str, bytes, str]:
    kind, text, *rest = line.split(" ", 2)
    return kind, base64.b64decode(text), (rest[0] if rest else "")


def _line(kind: str, blob: bytes, comment: str = "") -> str:
    text = base64.b64encode(blob).decode()
    return f"{kind} {text} {comment}".strip()


def _ssh_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def test_every_key_the_device_makes_is_answered_in_process_as_ssh_keygen_does(
    keys: dict[str, str],
) -> None:
    for name, line in keys.items():
        mine = sshpub.key_info(line)
        if name.startswith("rsa"):
            assert mine is None  # not proven here: ssh-keygen decides
            continue
        assert mine is not None, name
        assert mine == keygen_l(line), name
        # without the comment too (how keys are pinned and stored)
        assert sshpub.key_info(" ".join(line.split()[:2])) == mine


def test_the_host_key_listing_matches_ssh_keygen_on_a_file(
    keys: dict[str, str], tmp_path: Path
) -> None:
    for name, line in keys.items():
        pub = tmp_path / f"{name}.pub"
        pub.write_text(line + "\n")
        proc = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True,
                              text=True, check=True)  # fmt: skip
        assert sysconf._fingerprint(pub) == proc.stdout.split()[1]
    # A file that does not parse: no fingerprint, as before (ssh-keygen refused it).
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-ed25519 AAAA\n")
    assert sysconf._fingerprint(bad) is None


def test_accounts_check_keys_as_before(keys: dict[str, str]) -> None:
    for name, line in keys.items():
        expected = keygen_l(line)
        assert expected is not None
        assert accounts.check_public_key(line) == expected.fingerprint
        assert accounts.check_client_key(line) == (
            expected.fingerprint,
            f"{expected.kind} {expected.bits}",
        ), name
    with pytest.raises(accounts.AccountError):
        accounts.check_public_key("ssh-ed25519 " + "A" * 68)


# --- hostile lines -----------------------------------------------------------------------

P256 = 2**256 - 2**224 + 2**192 + 2**96 - 1
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
P256_N = sshpub._ORDER["nistp256"]


def _p256_point(x: int) -> bytes | None:
    """An uncompressed point on P-256 with this x, if there is one (p = 3 mod 4)."""
    rhs = (x**3 - 3 * x + P256_B) % P256
    y = pow(rhs, (P256 + 1) // 4, P256)
    if y * y % P256 != rhs:
        return None
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


def _p256_line(point: bytes) -> str:
    blob = _ssh_string(b"ecdsa-sha2-nistp256") + _ssh_string(b"nistp256") + _ssh_string(point)
    return _line("ecdsa-sha2-nistp256", blob)


def test_points_on_the_curve_that_openssh_refuses_get_no_answer() -> None:
    # A small x (OpenSSH wants more than half the order's bits) and an x >= order - 1:
    # both on the curve, so only OpenSSH's own checks tell them apart.
    small = next(p for x in range(1, 200) if (p := _p256_point(x)) is not None)
    large = next(p for x in range(P256_N - 1, P256_N + 400) if (p := _p256_point(x)))
    for point in (small, large):
        line = _p256_line(point)
        assert keygen_l(line) is None
        assert sshpub.key_info(line) is None
    # ... and a point off the curve.
    off = b"\x04" + (12345).to_bytes(32, "big") * 2
    assert sshpub.key_info(_p256_line(off)) is None


MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 200), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 200), st.just(0)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=8), st.just(0)),
    st.tuples(st.just("type"), st.sampled_from([*sorted(sshpub._SHAPES), "ssh-rsa"]), st.just(0)),
    st.tuples(st.just("text"), st.integers(0, 300), st.sampled_from("A/+=9a- \t")),
    st.tuples(st.just("length"), st.integers(0, 2), st.integers(0, 200)),
    st.tuples(st.just("body"), st.integers(0, 2), st.binary(max_size=140)),
)


def _mutate(line: str, op: str, a: object, b: object) -> str:
    kind, blob, comment = _blob(line)
    text = line.split(" ")[1]
    if op == "flip" and isinstance(a, int) and isinstance(b, int):
        i = a % len(blob)
        blob = blob[:i] + bytes([blob[i] ^ b]) + blob[i + 1 :]
    elif op == "cut" and isinstance(a, int):
        blob = blob[: a % len(blob)]
    elif op == "append" and isinstance(a, bytes):
        blob = blob + a
    elif op == "type" and isinstance(a, str):
        kind = a
    elif op == "text" and isinstance(a, int) and isinstance(b, str):
        i = a % len(text)
        return f"{kind} {text[:i]}{b}{text[i + 1 :]} {comment}".strip()
    elif op in ("length", "body") and isinstance(a, int):
        parts = sshpub._strings(blob) or [blob]
        i = a % len(parts)
        if op == "length" and isinstance(b, int):
            blob = b"".join(
                (b.to_bytes(4, "big") + p) if j == i else _ssh_string(p)
                for j, p in enumerate(parts)
            )
        elif isinstance(b, bytes):
            parts[i] = b
            blob = b"".join(_ssh_string(p) for p in parts)
    return _line(kind, blob, comment)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(KEY_SPECS) - 1), mutation=MUTATIONS)
def test_no_hostile_line_gets_an_answer_ssh_keygen_would_not_give(
    keys: dict[str, str], which: int, mutation: tuple[str, object, object]
) -> None:
    line = _mutate(list(keys.values())[which], *mutation)
    mine = sshpub.key_info(line)
    theirs = keygen_l(line)
    event(f"{mutation[0]}: {'answered' if mine else 'deferred'}, "
          f"ssh-keygen {'accepts' if theirs else 'refuses'}")  # fmt: skip
    if mine is not None:
        assert theirs == mine, line
