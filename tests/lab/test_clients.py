"""Application access end to end (SPEC §11, issue 11): ``hsmctl client register`` as the
customer, then an application in the tenant's client namespace with only the kit —
pkcs11-tool through p11-kit-proxy.so, a non-root user, real sshd, real p11-kit remote,
the key-policy module, real SoftHSM — and what the device refuses and logs.

Appliances: ``APPLIANCE_SETS["clients"]`` (hsm27, tenant1; hsm28 stays spare).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import APPLIANCE_SETS, client_netns, ensure_lab
from tests.lab.p11_helpers import AppHost, app_host
from tests.lab.takeover_helpers import (
    LAB_DIR,
    audit_records,
    console,
)

pytestmark = pytest.mark.lab

TENANT, OTHER_TENANT = "tenant1", "tenant2"
APP_USER = "hsmtest-app"


Owned = AppHost


@pytest.fixture(scope="module")
def owned(_lab_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owned]:
    """hsm27 provisioned to tenant1 and taken over with ``hsmctl takeover``; a non-root
    application user with a home of its own on this host."""
    base = tmp_path_factory.mktemp("clients")
    with app_host(ensure_lab(), APPLIANCE_SETS["clients"][0], TENANT, base, APP_USER) as host:
        yield host


@pytest.fixture(scope="module")
def officer(owned: Owned) -> dict[str, Any]:
    return owned.register("app-officer", "crypto-officer")


def _records(owned: Owned, after: int = 0) -> list[dict[str, Any]]:
    return owned.records(after)


def _last_seq(owned: Owned) -> int:
    return owned.last_seq()


# -- registration and the kit ------------------------------------------------------------------


def test_register_writes_a_kit_with_no_pin(owned: Owned, officer: dict[str, Any]) -> None:
    assert set(officer) >= {"appliance", "client", "role", "kit"}
    assert (officer["appliance"], officer["client"], officer["role"]) == (
        owned.rig.appliance, "app-officer", "crypto-officer")  # fmt: skip
    kit = Path(officer["kit"])
    key = kit / "app-officer_key"
    assert key.stat().st_mode & 0o777 == 0o600
    module = (kit / "app-officer.module").read_text()
    remote = next(line for line in module.splitlines() if line.startswith("remote: |"))
    for part in (f"-i {key}", f"UserKnownHostsFile={kit / 'known_hosts'}",
                 "StrictHostKeyChecking=yes", "IdentitiesOnly=yes",
                 f"p11-app-officer@{owned.rig.ip}"):  # fmt: skip
        assert part in remote
    known = (kit / "known_hosts").read_text().split()
    assert known[0] == owned.rig.ip
    readme = (kit / "README").read_text()
    assert "pkcs11-tool" in readme and "openssl" in readme and "import pkcs11" in readme
    for path in kit.iterdir():
        assert owned.pin not in path.read_text(errors="replace"), path
    listed = json.loads(owned.hsmctl("client", "list", owned.rig.appliance, "--json").stdout)
    names = {c["name"]: c for c in listed["clients"]}
    assert names["app-officer"]["role"] == "crypto-officer"
    assert set(names["app-officer"]) == {"name", "role", "fingerprint", "registered"}


def test_bad_input_exits_2_and_wrong_state_5_with_nothing_changed(
    owned: Owned, officer: dict[str, Any], tmp_path: Path
) -> None:
    seq = _last_seq(owned)
    for name in ("App", "a/b", "x;id", "p" * 29, "-x"):
        proc = owned.hsmctl("client", "register", owned.rig.appliance, "--name", name,
                            "--json", check=False)  # fmt: skip
        assert proc.returncode == 2, (name, proc.stderr.decode())
    proc = owned.hsmctl("client", "register", owned.rig.appliance, "--name", "ok",
                        "--role", "admin", check=False)  # fmt: skip
    assert proc.returncode == 2
    weak = tmp_path / "weak.pub"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f",
                    str(tmp_path / "weak")], check=True)  # fmt: skip
    proc = owned.hsmctl("client", "register", owned.rig.appliance, "--name", "weak",
                        "--public-key", str(weak), "--output", str(tmp_path / "k1"),
                        check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr.decode()
    assert not (tmp_path / "k1").exists()
    proc = owned.hsmctl("client", "register", owned.rig.appliance, "--name", "app-officer",
                        "--output", str(tmp_path / "k2"), check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr.decode()
    assert not (tmp_path / "k2").exists()
    proc = owned.hsmctl("client", "register", "hsm28", "--name", "early", check=False)
    assert proc.returncode == 5, proc.stderr.decode()
    # Nothing registered: only the refused commands' records, no new client.
    listed = json.loads(owned.hsmctl("client", "list", owned.rig.appliance, "--json").stdout)
    assert not {"weak", "early"} & {c["name"] for c in listed["clients"]}
    assert not any(
        r["event"] == "result" and r["detail"].get("command", "").startswith("client register")
        and r["outcome"] == "ok" for r in _records(owned, seq)
    )  # fmt: skip


# -- an application, through p11-kit, with only the kit ----------------------------------------


@pytest.fixture(scope="module")
def officer_key(owned: Owned, officer: dict[str, Any]) -> int:
    """The officer's P-256 key pair (label e2e-p256, id a1), made by pkcs11-tool through
    its kit; the log position before it was made."""
    owned.use("app-officer")
    seq = _last_seq(owned)
    gen = owned.tool("--keypairgen", "--key-type", "EC:prime256v1", "--label", "e2e-p256",
                     "--id", "a1")  # fmt: skip
    assert gen.returncode == 0, gen.stderr.decode()
    return seq


def test_officer_generates_p256_signs_and_openssl_verifies(owned: Owned, officer_key: int) -> None:
    owned.use("app-officer")
    seq = officer_key
    work = owned.home / "work"
    work.mkdir(exist_ok=True)
    (work / "data.bin").write_bytes(os.urandom(1000))
    subprocess.run(["chown", "-R", f"{APP_USER}:", str(work)], check=True)
    digest = owned.run("openssl", "dgst", "-sha256", "-binary", "-out",
                       str(work / "digest.bin"), str(work / "data.bin"))  # fmt: skip
    assert digest.returncode == 0, digest.stderr.decode()
    sign = owned.tool("--sign", "--mechanism", "ECDSA", "--id", "a1",
                      "--input-file", str(work / "digest.bin"),
                      "--output-file", str(work / "sig.bin"),
                      "--signature-format", "openssl")  # fmt: skip
    assert sign.returncode == 0, sign.stderr.decode()
    pub = owned.tool("--read-object", "--type", "pubkey", "--id", "a1",
                     "--output-file", str(work / "pub.der"), login=False)  # fmt: skip
    assert pub.returncode == 0, pub.stderr.decode()
    verify = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(work / "pub.der"), "-keyform", "DER",
         "-signature", str(work / "sig.bin"), str(work / "data.bin")],
        capture_output=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and b"Verified OK" in verify.stdout, verify.stderr
    # A signature of other data does not verify: the check above is not vacuous.
    (work / "other.bin").write_bytes(b"other")
    bad = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(work / "pub.der"), "-keyform", "DER",
         "-signature", str(work / "sig.bin"), str(work / "other.bin")],
        capture_output=True, check=False,
    )  # fmt: skip
    assert bad.returncode != 0
    records = _records(owned, seq)
    mine = [r for r in records if r["actor"] == "p11-app-officer"]
    generated = [r for r in mine if r["event"] == "key-generated"]
    assert generated and generated[0]["detail"]["label"] == "e2e-p256"
    assert generated[0]["detail"]["curve"] == "P-256"
    closes = [r for r in mine if r["event"] == "pkcs11-session-close"]
    assert sum(r["detail"].get("ops", {}).get("sign", 0) for r in closes) >= 1
    connects = [r for r in mine if r["event"] == "pkcs11-connect"]
    assert connects and all(r["source"] == client_ip(owned) for r in connects)
    assert all(r["role"] == "crypto-officer" for r in mine)


def client_ip(owned: Owned) -> str:
    t = next(x for x in owned.rig.lab["tenants"] if x["name"] == TENANT)
    return str(t["client_ip"])


def test_rsa_1024_is_refused_and_logged_denied_with_the_rule(
    owned: Owned, officer: dict[str, Any]
) -> None:
    owned.use("app-officer")
    seq = _last_seq(owned)
    gen = owned.tool("--keypairgen", "--key-type", "rsa:1024", "--label", "weak-rsa")
    assert gen.returncode != 0
    assert b"CKR_KEY_SIZE_RANGE" in gen.stderr, gen.stderr.decode()
    denied = [r for r in _records(owned, seq) if r["outcome"] == "denied"
              and r["event"] == "pkcs11-call"]  # fmt: skip
    assert [r["detail"]["rule"] for r in denied] == ["rsa-size"]
    assert denied[0]["detail"]["bits"] == 1024 and denied[0]["actor"] == "p11-app-officer"
    listed = owned.tool("--list-objects", "--type", "privkey")
    assert b"weak-rsa" not in listed.stdout


def test_a_crypto_user_signs_but_cannot_generate_import_or_destroy(
    owned: Owned, officer_key: int
) -> None:
    owned.register("app-user", "crypto-user")
    owned.use("app-user")
    seq = _last_seq(owned)
    gen = owned.tool("--keypairgen", "--key-type", "EC:prime256v1", "--label", "user-key")
    assert gen.returncode != 0
    # CKR_ACTION_PROHIBITED (0x1b), which pkcs11-tool 0.23 does not name
    assert b"(0x1b)" in gen.stderr, gen.stderr.decode()
    work = owned.home / "work"
    work.mkdir(exist_ok=True)
    (work / "d32.bin").write_bytes(os.urandom(32))
    subprocess.run(["chown", "-R", f"{APP_USER}:", str(work)], check=True)
    sign = owned.tool("--sign", "--mechanism", "ECDSA", "--id", "a1",
                      "--input-file", str(work / "d32.bin"),
                      "--output-file", str(work / "u.sig"))  # fmt: skip
    assert sign.returncode == 0, sign.stderr.decode()
    gone = owned.tool("--delete-object", "--type", "privkey", "--id", "a1")
    assert gone.returncode != 0 and b"(0x1b)" in gone.stderr, gone.stderr.decode()
    # Import: a public key file is the one object pkcs11-tool writes that the policy lets
    # an officer create (C_CreateObject); the crypto-user may create nothing.
    pub = owned.tool("--read-object", "--type", "pubkey", "--id", "a1", "--output-file",
                     str(work / "u.pub.der"), login=False)  # fmt: skip
    assert pub.returncode == 0, pub.stderr.decode()
    put = owned.tool("--write-object", str(work / "u.pub.der"), "--type", "pubkey",
                     "--label", "user-import", "--id", "b1")  # fmt: skip
    assert put.returncode != 0 and b"(0x1b)" in put.stderr, put.stderr.decode()
    denied = [r for r in _records(owned, seq) if r["outcome"] == "denied"
              and r["actor"] == "p11-app-user"]  # fmt: skip
    assert [(r["detail"]["rule"], r["detail"]["function"]) for r in denied] == [
        ("role-crypto-user", "C_GenerateKeyPair"),
        ("role-crypto-user", "C_DestroyObject"),
        ("role-crypto-user", "C_CreateObject"),
    ]
    assert all(r["role"] == "crypto-user" for r in denied)
    still = owned.tool("--list-objects", "--type", "privkey").stdout
    assert b"e2e-p256" in still


# -- isolation ----------------------------------------------------------------------------------


def _ssh(
    owned: Owned,
    name: str,
    *options: str,
    command: str | None = None,
    key: Path | None = None,
    netns: str | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[bytes]:
    kit = owned.home / f"kit-{name}"
    argv = ["ssh", "-i", str(key or kit / f"{name}_key"),
            "-o", f"UserKnownHostsFile={kit / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", *options,
            f"p11-{name}@{owned.rig.ip}", *([command] if command else [])]  # fmt: skip
    full = ["ip", "netns", "exec", netns or owned.rig.netns, *argv]
    return subprocess.run(
        full, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )


def test_a_client_gets_no_shell_no_hsmsh_command_and_no_forwarding(
    owned: Owned, officer: dict[str, Any]
) -> None:
    seq = _last_seq(owned)
    tty = _ssh(owned, "app-officer", "-tt", command="/bin/sh")
    assert b"$ " not in tty.stdout and b"uid=" not in tty.stdout
    for command in ("hsm show", "audit export", "id", "/bin/sh -c id"):
        proc = _ssh(owned, "app-officer", command=command)
        assert b"owner_state" not in proc.stdout and b"uid=" not in proc.stdout, command
        assert b'"seq"' not in proc.stdout, command
    fwd = _ssh(owned, "app-officer", "-N", "-o", "ExitOnForwardFailure=yes",
               "-R", "127.0.0.1:2299:127.0.0.1:22")  # fmt: skip
    assert fwd.returncode != 0
    assert b"forwarding failed" in fwd.stderr.lower() or b"prohibited" in fwd.stderr.lower()
    records = [r for r in _records(owned, seq) if r["actor"] == "p11-app-officer"]
    assert not [r for r in records if r["event"] in ("command", "session-start")]


def test_other_tenant_provider_key_and_management_interface_get_nothing(
    owned: Owned, officer: dict[str, Any]
) -> None:
    lab = owned.rig.lab
    from_b = _ssh(owned, "app-officer", command="true", netns=client_netns(lab, OTHER_TENANT))
    assert from_b.returncode == 255  # no route, or refused: never a session
    provider = _ssh(owned, "app-officer", command="true", key=LAB_DIR / "provider" / "provider_key")
    assert provider.returncode == 255 and b"Permission denied" in provider.stderr
    # The management interface refuses the client's own key (from the host: provider net).
    kit = owned.home / "kit-app-officer"
    mgmt = subprocess.run(
        ["ssh", "-i", str(kit / "app-officer_key"), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
         "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
         f"p11-app-officer@{owned.rig.mgmt_ip}", "true"],
        capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert mgmt.returncode == 255 and b"Permission denied" in mgmt.stderr


def test_revoke_ends_an_open_session_within_a_second(owned: Owned, tmp_path: Path) -> None:
    owned.register("app-gone", "crypto-officer")
    owned.use("app-gone")
    assert owned.tool("--list-objects").returncode == 0
    kit = owned.home / "kit-app-gone"
    # An open PKCS#11 connection: p11-kit remote waits for the application's next call.
    argv = ["ip", "netns", "exec", owned.rig.netns, "ssh", "-i", str(kit / "app-gone_key"),
            "-o", f"UserKnownHostsFile={kit / 'known_hosts'}", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-T",
            f"p11-app-gone@{owned.rig.ip}"]  # fmt: skip
    held = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    ended: list[float] = []
    threading.Thread(target=lambda: (held.wait(), ended.append(time.time())), daemon=True).start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        shown = json.loads(console(owned.rig.appliance, "hsmsh", "-c", "client list").stdout)
        if any(c["name"] == "app-gone" and c["connections"] for c in shown["clients"]):
            break
        time.sleep(0.1)
    else:
        held.kill()
        held.communicate()
        raise AssertionError("the held PKCS#11 connection never reached the device")
    assert held.poll() is None
    owned.hsmctl("client", "revoke", owned.rig.appliance, "--name", "app-gone", "--json")
    held.wait(10)
    for pipe in (held.stdin, held.stdout, held.stderr):
        if pipe is not None:
            pipe.close()
    revoked = [
        r
        for r in audit_records(owned.rig.appliance)
        if r["event"] == "result" and r["detail"].get("command") == "client revoke app-gone"
    ]
    assert revoked and revoked[-1]["outcome"] == "ok"
    from hsmctl import utc

    at = utc.parse(revoked[-1]["time"]).timestamp()
    assert ended and ended[0] - at < 1.0, ended[0] - at
    # The next call from the application fails: no session, no token.
    again = owned.tool("--list-objects")
    assert again.returncode != 0
    denied = _ssh(owned, "app-gone", command="true")
    assert denied.returncode == 255 and b"Permission denied" in denied.stderr


def test_no_pin_in_any_kit_or_in_the_log(owned: Owned, officer: dict[str, Any]) -> None:
    log = console(owned.rig.appliance, "cat", "/var/log/hsm/audit.jsonl").stdout
    assert owned.pin.encode() not in log
    for kit in owned.home.glob("kit-*"):
        for path in kit.iterdir():
            assert owned.pin.encode() not in path.read_bytes(), path
    assert pwd.getpwnam(APP_USER).pw_uid != 0
