"""The scheduling files in deploy/ (issue 13, item 4), checked by the tools that will read
them: ``systemd-analyze verify`` and ``security --offline``, ``systemd-sysusers`` and
``systemd-tmpfiles`` on a temporary root, ``logrotate`` on a temporary log directory.

``MemoryDenyWriteExecute=`` is tested for real: the venv's cffi/cryptography, paramiko
(a whole SSH handshake) and python-pkcs11, and ``hsmctl logs collect`` itself, run under
the same W^X restriction systemd applies — its seccomp filter (systemd 249 and later)
and, where the kernel has it, the kernel's ``PR_SET_MDWE`` (newer systemd prefers it).
Through ``systemd-run`` as well when systemd is PID 1 (it is not in every CI container).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVICE = DEPLOY / "systemd" / "hsmctl-collect.service"
TIMER = DEPLOY / "systemd" / "hsmctl-collect.timer"
DROPIN = DEPLOY / "systemd" / "hsmctl-collect.service.d" / "collector-keys.conf"
SYSUSERS = DEPLOY / "sysusers.d" / "hsmctl.conf"
TMPFILES = DEPLOY / "tmpfiles.d" / "hsmctl.conf"
LOGROTATE = DEPLOY / "logrotate" / "hsmctl"
CRON = DEPLOY / "cron" / "hsmctl-collect"
VENV_HSMCTL = "/opt/hsmctl/.venv/bin/hsmctl"
HERE_HSMCTL = str(Path(sys.executable).with_name("hsmctl"))

EXPOSURE = 1.1
"""``systemd-analyze security --offline=true`` of the shipped service (systemd 252: 1.1;
3.2 before issue 13). What is left: the network (PrivateNetwork=, IPAddressDeny=,
AF_INET/AF_INET6/AF_UNIX), the host's root directory, ProtectClock='s char-rtc:r."""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def settings(text: str) -> list[tuple[str, str]]:
    """``(key, value)`` of a unit file's assignments, comments and sections left out."""
    pairs = []
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def install_units(tmp_path: Path, service: str | None = None) -> Path:
    """The units as an administrator installs them, ExecStart pointed at this checkout's
    hsmctl (the unit's /opt path does not exist here), the drop-in beside them."""
    text = SERVICE.read_text() if service is None else service
    assert VENV_HSMCTL in text
    (tmp_path / SERVICE.name).write_text(text.replace(VENV_HSMCTL, HERE_HSMCTL))
    (tmp_path / TIMER.name).write_text(TIMER.read_text())
    dropins = tmp_path / DROPIN.parent.name
    dropins.mkdir(exist_ok=True)
    (dropins / DROPIN.name).write_text(DROPIN.read_text())
    return tmp_path


def verify(where: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("systemd-analyze"), "verify", *units],
        cwd=where, capture_output=True, text=True, check=False,
    )  # fmt: skip


# -- systemd units -------------------------------------------------------------------------------


def test_units_verify_and_a_broken_one_does_not(tmp_path: Path) -> None:
    """``systemd-analyze verify`` reads the units and the drop-in (from the working
    directory) and warns about every setting it cannot parse, with exit 0 all the same:
    the check is that no warning names our files. The user ``hsmctl`` need not exist."""
    where = install_units(tmp_path)
    ok = verify(where, SERVICE.name, TIMER.name)
    assert ok.returncode == 0, ok.stderr
    assert "hsmctl-collect" not in ok.stderr and "collector-keys" not in ok.stderr, ok.stderr

    broken = SERVICE.read_text().replace("ProtectProc=invisible", "ProtectProc=invsible")
    bad = verify(install_units(tmp_path, broken), SERVICE.name)
    assert "invsible" in bad.stderr and "hsmctl-collect.service" in bad.stderr
    where = install_units(tmp_path)
    (where / DROPIN.parent.name / DROPIN.name).write_text(
        "[Service]\nLoadCredential=x:relative/x\n"
    )
    bad = verify(where, SERVICE.name)
    assert "collector-keys.conf" not in ok.stderr and "collector-keys.conf" in bad.stderr


def test_exposure_score(tmp_path: Path) -> None:
    where = install_units(tmp_path)
    proc = subprocess.run(
        [need("systemd-analyze"), "security", "--offline=true", "--no-pager", SERVICE.name],
        cwd=where, capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for hsmctl-collect\.service: ([0-9.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= EXPOSURE, proc.stdout


def test_the_unit_runs_on_systemd_249() -> None:
    """Nothing newer than 249 (Ubuntu 22.04) in the unit itself: no %d specifier and no
    directory credential (both 251); a missing absolute LoadCredential= path fails the
    unit, so the base unit loads only the configuration, which it asserts first."""
    unit = settings(SERVICE.read_text())
    values = " ".join(v for _, v in unit)
    assert "%d" not in values
    creds = [v for k, v in unit if k == "LoadCredential"]
    assert creds == ["hsmctl.yaml:/etc/hsmctl/hsmctl.yaml"]
    assert ("AssertPathExists", "/etc/hsmctl/hsmctl.yaml") in unit
    start = dict(unit)["ExecStart"]
    assert start.startswith(VENV_HSMCTL + " --config ${CREDENTIALS_DIRECTORY}/hsmctl.yaml ")
    assert "--key-dir" not in start  # its default is $CREDENTIALS_DIRECTORY
    for needed in (
        ("SystemCallFilter", "@system-service"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("RemoveIPC", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ):
        assert needed in unit


def test_the_key_directory_is_made_by_tmpfiles() -> None:
    """The drop-in's directory credential (systemd 251+) names the directory tmpfiles.d
    creates empty, so the unit starts before any key is put there; the 249 form, one
    credential per appliance, is what hsmctl reads as collector-key_<ID>."""
    from hsmctl.collect.collector import CREDENTIAL_PREFIX

    creds = [v for k, v in settings(DROPIN.read_text()) if k == "LoadCredential"]
    assert creds == ["collector-key:/etc/hsmctl/collector-keys"]
    assert f"#LoadCredential={CREDENTIAL_PREFIX}hsm01:/etc/hsmctl/collector-keys/hsm01" in (
        DROPIN.read_text()
    )
    assert CREDENTIAL_PREFIX == "collector-key_"  # systemd joins ID and file name with _
    lines = [line.split() for line in TMPFILES.read_text().splitlines() if line[:1] == "d"]
    assert ["d", "/etc/hsmctl/collector-keys", "0700", "root", "root", "-"] in lines


def test_timer() -> None:
    timer = settings(TIMER.read_text())
    for key in ("OnCalendar", "RandomizedDelaySec", "Persistent"):
        assert key in dict(timer)


# -- MemoryDenyWriteExecute= -------------------------------------------------------------------

WORKLOAD = r"""
import ctypes, json, os, socket, subprocess, sys, tempfile, threading

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
# The restriction is on: a writable and executable mapping is refused.
assert libc.mmap(None, 4096, 0x2 | 0x4, 0x22, -1, 0) in (None, ctypes.c_void_p(-1).value)

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
key = Ed25519PrivateKey.generate()
key.public_key().verify(key.sign(b"record"), b"record")
AESGCM(AESGCM.generate_key(256)).encrypt(b"\0" * 12, b"x", None)
ChaCha20Poly1305(ChaCha20Poly1305.generate_key()).encrypt(b"\0" * 12, b"x", None)

import pkcs11
if os.path.exists("/usr/lib/softhsm/libsofthsm2.so"):
    pkcs11.lib("/usr/lib/softhsm/libsofthsm2.so")

import paramiko
host, user = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
class Server(paramiko.ServerInterface):
    def get_allowed_auths(self, username): return "publickey"
    def check_auth_publickey(self, username, key):
        return paramiko.AUTH_SUCCESSFUL if key == user else paramiko.AUTH_FAILED
a, b = socket.socketpair()
server = paramiko.Transport(b)
server.add_server_key(host)
threading.Thread(target=server.start_server, kwargs={"server": Server()}).start()
client = paramiko.Transport(a)
client.start_client(timeout=30)
assert client.get_remote_server_key() == host
client.auth_publickey("audit", user)
assert client.is_authenticated()
client.close(); server.close()

# ctypes callbacks (libffi closures), as cffi's ffi.callback would make.
assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7

state = tempfile.mkdtemp()
conf = os.path.join(state, "hsmctl.yaml")
with open(conf, "w") as f:
    f.write(f"role: tenant\nstate_dir: {state}\n")
proc = subprocess.run([sys.argv[1], "--config", conf, "logs", "collect", "--all", "--json"],
                      capture_output=True, text=True)
assert proc.returncode == 0 and json.loads(proc.stdout) == {"appliances": []}, proc
print("workload ok")
"""

SECCOMP_MDWE = r"""
# systemd's MemoryDenyWriteExecute= seccomp filter (src/shared/seccomp-util.c,
# seccomp_memory_deny_write_execute), through libseccomp as systemd builds it: EPERM for
# mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC, shmat SHM_EXEC.
import ctypes, os, sys

lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

ALLOW, EPERM, MASKED_EQ = 0x7FFF0000, 0x00050000 | 1, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
ctx = lib.seccomp_init(ALLOW)
for name, mask in (("mmap", PROT_WRITE | PROT_EXEC), ("mprotect", PROT_EXEC),
                   ("pkey_mprotect", PROT_EXEC), ("shmat", SHM_EXEC)):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    rule = Cmp(2, MASKED_EQ, mask, mask)
    assert lib.seccomp_rule_add_array(ctx, EPERM, nr, 1, ctypes.byref(rule)) == 0, name
assert lib.seccomp_load(ctx) == 0
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
"""

KERNEL_MDWE = r"""
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)  # kernel older than 6.3
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
"""


def run_restricted(wrapper: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", wrapper, WORKLOAD, HERE_HSMCTL],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_mdwe_seccomp_filter() -> None:
    """MemoryDenyWriteExecute=yes as systemd 249 applies it: a seccomp filter."""
    try:
        import ctypes

        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp2 is not installed")
    proc = run_restricted(SECCOMP_MDWE)
    assert proc.returncode == 0 and "workload ok" in proc.stdout, proc.stdout + proc.stderr


def test_mdwe_kernel_prctl() -> None:
    """The kernel's own W^X (Linux 6.3+), which newer systemd uses when it can."""
    proc = run_restricted(KERNEL_MDWE)
    if proc.returncode == 77:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert proc.returncode == 0 and "workload ok" in proc.stdout, proc.stdout + proc.stderr


def test_mdwe_under_systemd_run() -> None:
    """The real thing, where systemd is the init system (the unit's own sandbox minus
    User=, which may not exist on a build host)."""
    if not Path("/run/systemd/system").is_dir() or os.geteuid() != 0:
        pytest.skip("systemd is not PID 1 here (or not root): see the two tests above")
    props = [
        f"{k}={v}"
        for k, v in settings(SERVICE.read_text())
        if k not in {"Type", "User", "Group", "ExecStart", "LoadCredential", "StateDirectory",
                     "StateDirectoryMode", "TimeoutStartSec", "AssertPathExists", "Description",
                     "Documentation", "Wants", "After"}
    ]  # fmt: skip
    argv = [need("systemd-run"), "--wait", "--pipe", "--quiet", "--collect"]
    for p in props:
        argv += ["-p", p]
    proc = subprocess.run(
        [*argv, sys.executable, "-c", WORKLOAD, HERE_HSMCTL],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "workload ok" in proc.stdout, proc.stdout + proc.stderr


# -- sysusers.d, tmpfiles.d ---------------------------------------------------------------------


def test_sysusers_and_tmpfiles_on_a_temporary_root(tmp_path: Path) -> None:
    """``systemd-sysusers --root`` makes the user in a scratch /etc (not the host's);
    ``systemd-tmpfiles --create --root`` then makes the directories, owned by it."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    proc = subprocess.run(
        [need("systemd-sysusers"), f"--root={root}", str(SYSUSERS)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    users = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    assert users["hsmctl"][5] == "/var/lib/hsmctl"
    assert users["hsmctl"][6].strip().endswith("nologin")
    uid, gid = int(users["hsmctl"][2]), int(users["hsmctl"][3])
    assert uid < 1000 and "hsmctl" in (root / "etc/group").read_text()
    unit = dict(settings(SERVICE.read_text()))
    assert (unit["User"], unit["Group"], unit["StateDirectory"]) == ("hsmctl",) * 3

    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --create changes owners: needs root")
    proc = subprocess.run(
        [need("systemd-tmpfiles"), "--create", f"--root={root}", str(TMPFILES)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    expected = {
        "var/lib/hsmctl": (0o700, uid, gid),
        "etc/hsmctl": (0o750, 0, gid),
        "etc/hsmctl/collector-keys": (0o700, 0, 0),
        "var/log/hsmctl": (0o750, uid, gid),
    }
    for path, want in expected.items():
        st = (root / path).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == want, path
    # Run again on directories an administrator left wrong: the modes are put right.
    os.chmod(root / "etc/hsmctl/collector-keys", 0o755)
    subprocess.run([need("systemd-tmpfiles"), "--create", f"--root={root}", str(TMPFILES)],
                   check=True)  # fmt: skip
    assert (root / "etc/hsmctl/collector-keys").stat().st_mode & 0o777 == 0o700


# -- cron and logrotate -------------------------------------------------------------------------


def test_cron_example_is_a_cron_d_line() -> None:
    text = CRON.read_text()
    lines = [
        line
        for line in text.splitlines()
        if line and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert len(lines) == 1
    fields = lines[0].split(maxsplit=6)
    assert fields[:5] == ["*/5", "*", "*", "*", "*"] and fields[5] == "hsmctl"
    assert "logs collect --all --json" in fields[6]
    assert "%" not in fields[6].replace("\\%", "")  # cron would cut the command there
    logs = set(re.findall(r"/var/log/hsmctl/[\w.]+", fields[6]))
    assert logs == {"/var/log/hsmctl/collect.jsonl", "/var/log/hsmctl/collect.err"}
    assert "deploy/logrotate/hsmctl" in text


def test_logrotate_bounds_the_cron_logs(tmp_path: Path) -> None:
    """``logrotate -d`` parses the snippet; then real rotations, in a scratch directory
    as the current user (the paths and the owner swapped, the rest verbatim)."""
    logrotate = need("logrotate")
    text = LOGROTATE.read_text()
    for needle in ("/var/log/hsmctl/*.jsonl", "/var/log/hsmctl/*.err", "compress",
                   "maxsize", "rotate", "maxage", "su hsmctl hsmctl",
                   "create 0640 hsmctl hsmctl"):  # fmt: skip
        assert needle in text
    me = pwd.getpwuid(os.geteuid())
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True, check=True).stdout
    logs = tmp_path / "log"
    logs.mkdir(mode=0o750)
    conf = tmp_path / "hsmctl.logrotate"
    conf.write_text(
        text.replace("/var/log/hsmctl", str(logs)).replace(
            "hsmctl hsmctl", f"{me.pw_name} {group.strip()}"
        )
    )
    state = tmp_path / "state"

    def rotate(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [logrotate, *flags, "-s", str(state), str(conf)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip

    debug = rotate("-d")
    assert debug.returncode == 0 and "error" not in debug.stderr.lower(), debug.stderr
    for name in ("collect.jsonl", "collect.err"):
        (logs / name).write_text('{"appliances": []}\n')
    assert rotate("-f").returncode == 0
    assert (logs / "collect.jsonl.1").exists() and (logs / "collect.err.1").exists()
    assert (logs / "collect.jsonl").stat().st_mode & 0o777 == 0o640  # create, for cron's >>
    (logs / "collect.jsonl").write_text("{}\n")
    assert rotate("-f").returncode == 0
    assert (logs / "collect.jsonl.2.gz").exists()  # compressed one rotation later
    assert not (logs / "collect.jsonl.1.gz.1").exists()  # *.jsonl: never the rotated ones
    json.loads((logs / "collect.jsonl.1").read_text())


# -- the provider's health poll (issue 15) -------------------------------------------------------

HEALTH_SERVICE = DEPLOY / "systemd" / "hsmctl-health.service"
HEALTH_TIMER = DEPLOY / "systemd" / "hsmctl-health.timer"


def test_health_units_verify_and_are_sandboxed(tmp_path: Path) -> None:
    """The health service and timer parse without a warning naming them, run the real
    command, every 10 minutes, with the collector's sandbox (exposure as low)."""
    text = HEALTH_SERVICE.read_text()
    assert VENV_HSMCTL in text
    (tmp_path / HEALTH_SERVICE.name).write_text(text.replace(VENV_HSMCTL, HERE_HSMCTL))
    (tmp_path / HEALTH_TIMER.name).write_text(HEALTH_TIMER.read_text())
    ok = verify(tmp_path, HEALTH_SERVICE.name, HEALTH_TIMER.name)
    assert ok.returncode == 0 and "hsmctl-health" not in ok.stderr, ok.stderr
    unit = settings(text)
    start = dict(unit)["ExecStart"]
    assert start.startswith(VENV_HSMCTL + " --config ${CREDENTIALS_DIRECTORY}/hsmctl.yaml ")
    assert " health --all " in start and "--textfile " in start
    assert [v for k, v in unit if k == "LoadCredential"] == ["hsmctl.yaml:/etc/hsmctl/hsmctl.yaml"]
    shared = {"NoNewPrivileges", "ProtectSystem", "SystemCallFilter", "PrivateUsers",
              "MemoryDenyWriteExecute", "RestrictAddressFamilies"}  # fmt: skip
    for needed in settings(SERVICE.read_text()):
        if needed[0] in shared:
            assert needed in unit, needed
    timer = dict(settings(HEALTH_TIMER.read_text()))
    assert timer["OnCalendar"] == "*:0/10" and timer["Persistent"] == "true"
    proc = subprocess.run(
        [need("systemd-analyze"), "security", "--offline=true", "--no-pager",
         HEALTH_SERVICE.name],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for hsmctl-health\.service: ([0-9.]+)", proc.stdout)
    assert found and float(found.group(1)) <= EXPOSURE + 0.1, proc.stdout
