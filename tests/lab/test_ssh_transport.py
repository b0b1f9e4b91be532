"""The SSH transport against real OpenSSH: the lab's appliances (read-only commands as
``provider``), and a private loopback sshd configured like a data interface.

The lab has no provisioned appliance to log in to as ``admin`` without changing device
state other people test against, so the key-then-password sequence is proven against a
real sshd on 127.0.0.1 with ``AuthenticationMethods publickey,password`` (the appliance's
data-interface setting), for a throwaway account that exists only inside that sshd's own
mount namespace (bind-mounted passwd/shadow): nothing on the host changes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsmctl.errors import ConflictError, HostKeyMismatch, HsmctlError, UnreachableError, UsageError
from hsmctl.lab import control as lab_mod
from hsmctl.lab.netns import socket_factory
from hsmctl.secret import Secret
from hsmctl.ssh import (
    AuthenticationFailed,
    DeviceCommandFailed,
    DeviceConnection,
    DeviceDenied,
    DeviceIntegrityError,
    DeviceUnavailable,
    DeviceUsageError,
    PinnedHostKeys,
    PublicKey,
    Timeouts,
    scan_host_keys,
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: lab namespaces and sshd"),
]

UNASSIGNED_LAB_ADDRESS = "198.19.200.1"  # inside the lab range, on no subnet: blackholed
LAB_WAIT_SECONDS = 120


# -- the lab ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Appliance:
    id: str
    ip: str
    pins: PinnedHostKeys
    sshd_log: Path


@dataclass(frozen=True)
class Lab:
    provider_key: Path
    known_hosts: str
    appliances: list[Appliance]
    tenant_client_netns: str


def _lab_status() -> dict[str, object] | None:
    try:
        return lab_mod.status()
    except ConflictError:
        return None


@pytest.fixture(scope="module")
def lab(_lab_session: None) -> Lab:
    """The shared lab (brought up by the session fixtures if it is not up)."""
    from tests.conftest import ensure_lab

    status: dict[str, object] = ensure_lab()
    provider_key = Path(str(status["provider_key"]))
    known_hosts = (provider_key.parent / "known_hosts").read_text()
    raw = status["appliances"]
    assert isinstance(raw, list)
    appliances = [
        Appliance(
            a["id"],
            a["mgmt_ip"],
            PinnedHostKeys.from_known_hosts(known_hosts, a["mgmt_ip"]),
            lab_mod.appliance_dir(a["id"]) / "upper/var/log/hsm/sshd-mgmt.log",
        )
        for a in raw
    ]
    tenants = status["tenants"]
    assert isinstance(tenants, list) and tenants
    return Lab(provider_key, known_hosts, appliances, tenants[0]["client_netns"])


@pytest.fixture(scope="module")
def appliance(lab: Lab) -> Appliance:
    """An appliance the provider may still log in to. Others share this lab and may have
    taken some over (then the provider key is refused there, as it should be)."""
    for candidate in lab.appliances:
        try:
            provider(lab, candidate).connect().close()
        except AuthenticationFailed:
            continue
        return candidate
    pytest.fail("no lab appliance accepts the provider key (all customer-owned?)")


def other(lab: Lab, appliance: Appliance) -> Appliance:
    return next(a for a in lab.appliances if a.id != appliance.id)


def provider(lab: Lab, appliance: Appliance, **kwargs: object) -> DeviceConnection:
    args: dict[str, object] = {
        "username": "provider",
        "key": lab.provider_key,
        "pinned": appliance.pins,
    }
    args.update(kwargs)
    return DeviceConnection(appliance.ip, **args)  # type: ignore[arg-type]


def _session_lines(log: Path, port: int, timeout: float = 5.0) -> list[str]:
    """The device sshd's log lines about our TCP source port, once the session has ended."""
    pattern = re.compile(rf"\bport {port}\b")
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            line for line in log.read_text(errors="replace").splitlines() if pattern.search(line)
        ]
        ended = any(("closed" in line or "Disconnected" in line) for line in lines)
        if ended or time.monotonic() > deadline:
            return lines


def test_provider_logs_in_with_pinned_key_and_runs_hsm_show(lab: Lab, appliance: Appliance) -> None:
    with provider(lab, appliance) as dev:
        result = dev.run("hsm show")
        assert dev.host_key().fingerprint in appliance.pins.fingerprints()
    assert result.ok and result.status == 0
    assert json.loads(result.stdout)["id"] == appliance.id
    assert not dev.connected


def test_every_appliance_presents_its_pinned_key(lab: Lab) -> None:
    """The host key is checked before authentication, so a refused provider key (a
    customer-owned appliance) still proves the pin matched."""
    for each in lab.appliances:
        dev = provider(lab, each)
        with contextlib.suppress(AuthenticationFailed):
            dev.connect().close()
        assert each.pins.matches(dev.host_key())


def test_wrong_pin_is_refused_before_any_authentication(lab: Lab, appliance: Appliance) -> None:
    target = appliance
    dev = provider(lab, target, pinned=other(lab, target).pins)
    with pytest.raises(HostKeyMismatch) as info:
        dev.connect()
    assert info.value.exit_code == 3
    assert info.value.detail["presented"] in target.pins.fingerprints()
    assert not dev.connected
    with pytest.raises(HsmctlError, match="no verified host key"):
        dev.host_key()
    assert dev.local_address is not None
    lines = _session_lines(target.sshd_log, dev.local_address[1])
    assert any(line.startswith("Connection from") for line in lines), lines
    auth_words = ("publickey", "password", "Accepted", "Failed", "Postponed", "provider")
    assert not [line for line in lines if any(word in line for word in auth_words)], lines


def test_fingerprint_only_pins_work(lab: Lab, appliance: Appliance) -> None:
    """Hand-off bundles carry fingerprints, not keys."""
    pins = PinnedHostKeys.of(*appliance.pins.fingerprints())
    with provider(lab, appliance, pinned=pins) as dev:
        assert dev.run("hsm show").ok


def test_provider_password_only_is_refused(lab: Lab, appliance: Appliance) -> None:
    secret = "Not-the-Provider-Key-1"
    dev = DeviceConnection(
        appliance.ip,
        username="provider",
        password=Secret(secret),
        pinned=appliance.pins,
    )
    with pytest.raises(AuthenticationFailed) as info:
        dev.connect()
    assert info.value.exit_code == 1
    assert secret not in str(info.value) and secret not in repr(info.value.detail)


def test_unassigned_lab_address_is_unreachable_fast(lab: Lab, appliance: Appliance) -> None:
    dev = provider(lab, appliance)
    dev.host = UNASSIGNED_LAB_ADDRESS
    started = time.monotonic()
    with pytest.raises(UnreachableError) as info:
        dev.connect()
    assert time.monotonic() - started < 1.0
    assert info.value.exit_code == 4


def test_injection_is_refused_by_the_device_with_its_usage_status(
    lab: Lab, appliance: Appliance
) -> None:
    with provider(lab, appliance) as dev:
        with pytest.raises(DeviceUsageError) as info:
            dev.run("hsm show; id")
        assert dev.run("hsm show", check=False).ok  # the connection is still usable
    err = info.value
    assert err.status == 64 and err.exit_code == 2
    assert isinstance(err, UsageError) and isinstance(err, DeviceCommandFailed)
    assert err.argv == ["hsm show; id"] and err.detail["status"] == 64
    assert err.output_tail and "not allowed" in err.output_tail
    assert not err.result.stdout  # id never ran


def test_device_denial_maps_to_device_denied(lab: Lab, appliance: Appliance) -> None:
    """``audit show`` is valid but belongs to the customer's roles; the provider is denied
    (read-only either way: nothing on the device changes)."""
    with provider(lab, appliance) as dev, pytest.raises(DeviceDenied) as info:
        dev.run("audit show")
    assert info.value.status == 77 and info.value.exit_code == 1
    assert "not permitted" in info.value.output_tail


def test_stdin_secrets_never_reach_the_command_line(lab: Lab, appliance: Appliance) -> None:
    secret = Secret("Stdin-Only-Secret-42")
    with provider(lab, appliance) as dev:
        result = dev.run("help", [secret, "plain line"])
    assert result.ok and "hsm show" in result.stdout
    assert result.command == "help"
    assert "Stdin-Only-Secret-42" not in repr(result)
    # The API refuses anything that could smuggle a secret into the command line or
    # split it into two stdin lines.
    with provider(lab, appliance) as dev:
        with pytest.raises(UsageError):
            dev.run(secret)  # type: ignore[arg-type]
        with pytest.raises(UsageError) as info:
            dev.run("help", [Secret("two\nlines")])
        assert "two" not in str(info.value)
        with pytest.raises(UsageError):
            dev.run("help", secret)  # type: ignore[arg-type]


def test_run_stream_help_into_bytesio(lab: Lab, appliance: Appliance) -> None:
    sink = io.BytesIO()
    with provider(lab, appliance) as dev:
        result = dev.run_stream("help", sink)
        plain = dev.run("help")
    assert result.ok and result.stdout == ""
    assert result.stdout_bytes == len(sink.getvalue()) > 0
    assert sink.getvalue().decode() == plain.stdout


def test_netns_connection_from_inside_the_management_network(
    lab: Lab, appliance: Appliance
) -> None:
    """The socket is made in another namespace (another appliance's, a peer on the
    management network), so the device sees that namespace's address, not the host's."""
    target, peer = appliance, other(lab, appliance)
    with provider(lab, target, connect_socket=socket_factory(f"hsmlab-{peer.id}")) as dev:
        assert dev.run("hsm show").ok
        assert dev.local_address is not None and dev.local_address[0] == peer.ip


def test_tenant_network_cannot_reach_management(lab: Lab, appliance: Appliance) -> None:
    dev = provider(lab, appliance, connect_socket=socket_factory(lab.tenant_client_netns))
    with pytest.raises(UnreachableError):
        dev.connect()


def test_scan_host_keys_returns_both_factory_keys(lab: Lab, appliance: Appliance) -> None:
    scanned = scan_host_keys(appliance.ip)
    assert sorted(k.key_type for k in scanned) == ["ecdsa-sha2-nistp256", "ssh-ed25519"]
    assert set(scanned) == set(appliance.pins.keys)


def test_pinned_key_type_is_asked_for_first(lab: Lab, appliance: Appliance) -> None:
    """A device holds ed25519 and ecdsa keys; pinning only one must still connect."""
    for key in appliance.pins.keys:
        with provider(lab, appliance, pinned=PinnedHostKeys([key])) as dev:
            assert dev.host_key() == key


def test_key_exchange_is_ecdh_p256_and_the_cipher_gcm(
    lab: Lab, appliance: Appliance, caplog: pytest.LogCaptureFixture
) -> None:
    """What hsmctl asks the device for first, and what a real appliance's sshd agrees to:
    ECDH on P-256 (OpenSSL on both sides; the device's curve25519 is OpenSSH's reference
    code, ~2-3 ms more of its CPU a connection) and AES-GCM (one pass a packet)."""
    caplog.set_level(logging.DEBUG, logger="paramiko.transport")
    with provider(lab, appliance) as dev:
        assert dev.host_key() in appliance.pins.keys
    agreed = {r.getMessage() for r in caplog.records if r.name == "paramiko.transport"}
    assert "Kex: ecdh-sha2-nistp256" in agreed
    assert "Cipher: aes128-gcm@openssh.com" in agreed


def _activity(appliance: Appliance) -> list[dict[str, object]]:
    log = lab_mod.appliance_dir(appliance.id) / "upper/var/log/hsm/audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_batch_is_one_device_session_and_ends_at_the_first_failure(
    lab: Lab, appliance: Appliance
) -> None:
    """``run_batch`` against a real appliance (read-only commands): every command is
    authorised, logged and answered as on its own, all in one device session; the
    first refused command ends the batch, and the one after it never runs."""
    before = _activity(appliance)[-1]["seq"]
    reads = [("hsm show", []), ("audit key show", []), ("sysconf hostkey show", [])]
    with provider(lab, appliance) as dev:
        done = dev.run_batch(reads)  # type: ignore[arg-type]
        with pytest.raises(DeviceDenied) as info:
            dev.run_batch([("hsm show", []), ("audit show", []), ("audit key show", [])])
    assert [r.command for r in done] == [c for c, _ in reads] and all(r.ok for r in done)
    assert json.loads(done[0].stdout)["id"] == appliance.id
    assert json.loads(done[2].stdout)["active"]
    assert info.value.result.command == "audit show" and info.value.status == 77
    ours = [
        r for r in _activity(appliance)
        if int(r["seq"]) > int(before) and r["event"] in ("session-start", "command")  # type: ignore[call-overload]
    ]  # fmt: skip
    assert [r["event"] for r in ours].count("session-start") == 2
    commands = [r["detail"]["command"] for r in ours if r["event"] == "command"]  # type: ignore[index]
    assert commands == ["hsm show", "audit key show", "sysconf hostkey show", "hsm show",
                        "audit show"]  # fmt: skip


# -- a real sshd on loopback for key + password ----------------------------------------------

TWOFA_USER = "hsmtwofa"
TWOFA_UID = 64999


@dataclass(frozen=True)
class TwoFactorSshd:
    port: int
    key: Path
    password: str
    pins: PinnedHostKeys
    log: Path

    def connect(self, **kwargs: object) -> DeviceConnection:
        args: dict[str, object] = {
            "username": TWOFA_USER,
            "key": self.key,
            "password": Secret(self.password),
            "pinned": self.pins,
            "port": self.port,
        }
        args.update(kwargs)
        return DeviceConnection("127.0.0.1", **args)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def twofa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoFactorSshd]:
    if shutil.which("unshare") is None or not Path("/usr/sbin/sshd").exists():
        pytest.fail("openssh-server and util-linux (unshare) are required")
    d = tmp_path_factory.mktemp("sshd-2fa")
    d.chmod(0o700)
    for name in ("host_ed25519", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / name)],
            check=True,
        )
    password = "Loopback-Only-Pw-7"
    hashed = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Minimal account files for sshd's namespace only: root, the privilege-separation user
    # and the test account. No host credential is copied.
    (d / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "sshd:x:102:65534::/run/sshd:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        f"{TWOFA_USER}:x:{TWOFA_UID}:65534:hsmctl test:/:/bin/sh\n"
    )
    (d / "shadow").write_text(f"{TWOFA_USER}:{hashed}:19000:0:99999:7:::\n")
    (d / "shadow").chmod(0o600)
    # sshd reads authorized keys as the user, who cannot enter the 0700 pytest directory:
    # the keys are bind-mounted into the namespace's private /run.
    (d / "authorized").mkdir(mode=0o755)
    (d / "authorized" / TWOFA_USER).write_text((d / "client.pub").read_text())
    (d / "authorized" / TWOFA_USER).chmod(0o644)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {d / 'host_ed25519'}\n"
        "PidFile none\nLogLevel VERBOSE\nUsePAM no\nStrictModes no\n"
        "AuthorizedKeysFile /run/hsm-authorized/%u\n"
        "PubkeyAuthentication yes\nPasswordAuthentication yes\nPermitEmptyPasswords no\n"
        "KbdInteractiveAuthentication no\nAuthenticationMethods publickey,password\n"
        f"AllowUsers {TWOFA_USER}\nPermitRootLogin no\nDisableForwarding yes\n"
        "MaxAuthTries 6\nMaxSessions 8\nPrintMotd no\n"
    )
    # /etc is an overlay whose upper layer (on the private /run) holds the account files:
    # a file bind-mounted over /etc/passwd is lost the moment anything on the host
    # replaces /etc/passwd by rename (useradd does), and the user then no longer exists.
    script = (
        "mount -t tmpfs -o mode=755 tmpfs /run && "
        "mkdir -m 755 /run/sshd /run/hsm-authorized /run/etc /run/etc-work && "
        f"cp {d}/passwd /run/etc/passwd && cp -p {d}/shadow /run/etc/shadow && "
        "mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/etc,workdir=/run/etc-work /etc && "
        f"mount --bind {d}/authorized /run/hsm-authorized && "
        f"exec /usr/sbin/sshd -D -e -f {d}/sshd_config"
    )
    log = d / "sshd.log"
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"loopback sshd did not start: {log.read_text()}")
                time.sleep(0.05)
        pins = PinnedHostKeys.of((d / "host_ed25519.pub").read_text())
        yield TwoFactorSshd(port, d / "client", password, pins, log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_key_then_password_partial_success(twofa: TwoFactorSshd) -> None:
    with twofa.connect() as dev:
        local = dev.local_address
        assert dev.run("echo two-factor ok").stdout == "two-factor ok\n"
    assert local is not None
    time.sleep(0.2)
    lines = [line for line in twofa.log.read_text().splitlines() if f"port {local[1]}" in line]
    assert any(line.startswith(f"Partial publickey for {TWOFA_USER}") for line in lines), lines
    assert any(line.startswith(f"Accepted password for {TWOFA_USER}") for line in lines), lines


def test_key_without_the_required_password_fails(twofa: TwoFactorSshd) -> None:
    dev = twofa.connect(password=None)
    with pytest.raises(AuthenticationFailed, match="also requires password"):
        dev.connect()


def test_wrong_password_fails_without_echoing_it(twofa: TwoFactorSshd) -> None:
    wrong = "Wrong-Password-Xyz-9"
    dev = twofa.connect(password=Secret(wrong))
    with pytest.raises(AuthenticationFailed) as info:
        dev.connect()
    assert wrong not in str(info.value) and twofa.password not in str(info.value)


def test_password_without_key_fails(twofa: TwoFactorSshd) -> None:
    with pytest.raises(AuthenticationFailed):
        twofa.connect(key=None).connect()


def test_stdin_lines_arrive_on_stdin(twofa: TwoFactorSshd) -> None:
    with twofa.connect() as dev:
        result = dev.run("cat", [Secret("s3cret-line"), "second"])
        # The command line the server ran is exactly the one given: no secret in it.
        argv = dev.run("cat /proc/$$/cmdline | tr '\\0' ' '", [Secret("s3cret-line")])
    assert result.stdout == "s3cret-line\nsecond\n"
    assert "s3cret-line" not in argv.stdout


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (64, DeviceUsageError),
        (65, DeviceIntegrityError),
        (69, DeviceUnavailable),
        (77, DeviceDenied),
        (3, DeviceCommandFailed),
    ],
)
def test_exit_status_mapping(
    twofa: TwoFactorSshd, status: int, error: type[DeviceCommandFailed]
) -> None:
    with twofa.connect() as dev:
        with pytest.raises(error) as info:
            dev.run(f"echo on-stdout; echo why-{status} >&2; exit {status}")
        assert not dev.run(f"exit {status}", check=False).ok
    err = info.value
    assert type(err) is error and err.status == status
    assert err.output_tail == f"why-{status}"  # stderr's tail; stdout is not in the report
    assert str(err).endswith(f"(exit {status})\nwhy-{status}")
    assert err.exit_code == {64: 2, 65: 3, 69: 4, 77: 1, 3: 1}[status]


def test_command_timeout_is_unreachable(twofa: TwoFactorSshd) -> None:
    with twofa.connect() as dev:
        started = time.monotonic()
        with pytest.raises(UnreachableError, match="timed out"):
            dev.run("sleep 10", timeout=0.5)
        assert time.monotonic() - started < 3
        assert dev.run("echo still here").stdout == "still here\n"


def test_run_stream_is_fast_for_bulk_output(twofa: TwoFactorSshd) -> None:
    """``audit export`` of a big log: 64 MiB through the transport, counted, in bounded time."""

    class Counter:
        total = 0

        def write(self, chunk: bytes) -> int:
            self.total += len(chunk)
            return len(chunk)

    size = 64 * 1024 * 1024
    sink = Counter()
    with twofa.connect(timeouts=Timeouts(command=60)) as dev:
        started = time.monotonic()
        result = dev.run_stream(f"head -c {size} /dev/zero", sink)  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
    assert result.ok and result.stdout_bytes == sink.total == size
    print(f"run_stream: {size / elapsed / 1e6:.1f} MB/s")
    assert size / elapsed > 20 * 1024 * 1024, f"{size / elapsed / 1e6:.1f} MB/s"


def test_host_key_of_loopback_server(twofa: TwoFactorSshd) -> None:
    with twofa.connect() as dev:
        key = dev.host_key()
    assert isinstance(key, PublicKey) and twofa.pins.matches(key)


def test_a_failing_sink_is_a_local_error_not_unreachable(twofa: TwoFactorSshd) -> None:
    class Full:
        def write(self, chunk: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    with twofa.connect() as dev:
        with pytest.raises(HsmctlError, match="No space left") as info:
            dev.run_stream("echo data", Full())  # type: ignore[arg-type]
        assert not isinstance(info.value, UnreachableError)
        assert dev.run("echo fine").ok
