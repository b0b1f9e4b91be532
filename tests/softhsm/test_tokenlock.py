"""The token store's lock (hsmctl/appliance/tokenlock.py and appliance/p11/policy.c)
against real SoftHSM2: processes that load the token and log in at the same moment, as a
tenant's applications do when they start together, never lose the token.

SoftHSM 2.6.1 truncates ``token.object``, releases its fcntl lock, and only then writes
the file again (every ``C_Login`` does this). Without the lock a process that loads or
refreshes the token in that window finds no token (``get_token`` fails) or gets
``CKR_GENERAL_ERROR`` at login; this is what failed one CI run (8 clients connecting at
once, one found no token). Each case here first shows the race happening without the
lock, so a harness that no longer makes it cannot pass.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsmctl.appliance import tokenlock
from tests.softhsm import test_p11policy as base

pytestmark = base.pytestmark

ROUNDS = 12  # rounds of PROCESSES started together, with the lock
CONTROL_ROUNDS = 40  # at most, without the lock, until the race shows
PROCESSES = 8
LABEL = "lock-test"
SO_PIN, USER_PIN = "so-pin-Lk44", "user-pin-Lk55"

# One application start: load the module (C_Initialize), find the token by label, log
# in, sign nothing. Prints what happened; the PIN comes on stdin.
START = """
import json, sys
import pkcs11
req = json.loads(sys.stdin.read())
lib = pkcs11.lib(req["module"])  # C_Initialize: a failure here is a traceback, exit 1
try:
    token = lib.get_token(token_label=req["label"])
except pkcs11.exceptions.PKCS11Error as exc:  # NoSuchToken, or GeneralError reading it
    print(json.dumps({"outcome": "token-" + type(exc).__name__})); sys.exit(0)
try:
    with token.open(user_pin=req["pin"], rw=True):
        pass
except pkcs11.exceptions.PKCS11Error as exc:
    print(json.dumps({"outcome": "login-" + type(exc).__name__})); sys.exit(0)
print(json.dumps({"outcome": "ok"}))
"""


@dataclass
class Store:
    conf: Path
    root: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_P11_")}
        return env | {"SOFTHSM2_CONF": str(self.conf), "HSM_P11_ROLE": "crypto-officer"} | extra


@pytest.fixture
def store(tmp_path: Path) -> Store:
    root = tmp_path / "tokens"
    root.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root}\nobjectstore.backend = file\n")
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", LABEL,
         "--so-pin", SO_PIN, "--pin", USER_PIN],
        check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )  # fmt: skip
    return Store(conf, root)


def _spawn(argv: list[str], env: dict[str, str], request: object) -> subprocess.Popen[str]:
    """Start a child with ``request`` (JSON) on its stdin; its stderr joins its stdout."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, text=True, cwd=base.ROOT,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(request))
    proc.stdin.close()
    return proc


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    assert proc.stdout is not None
    with proc.stdout:
        output = proc.stdout.read()
    return proc.wait(timeout=120), output


def _start(module: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    request = {"module": str(module), "label": LABEL, "pin": USER_PIN}
    return _spawn([sys.executable, "-c", START], env, request)


def _outcomes(procs: list[subprocess.Popen[str]]) -> list[str]:
    out = []
    try:
        for proc in procs:
            code, output = _finish(proc)
            assert code == 0, output[-2000:]
            out.append(json.loads(output.splitlines()[-1])["outcome"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return out


def _round(module: Path, env: dict[str, str]) -> list[str]:
    return _outcomes([_start(module, env) for _ in range(PROCESSES)])


def _lost_without_lock(module: Path, store: Store) -> int:
    for _ in range(CONTROL_ROUNDS):
        lost = sum(o != "ok" for o in _round(module, store.env()))
        if lost:
            return lost
    return 0


def test_applications_starting_together_never_lose_the_token(policy_so: Path, store: Store) -> None:
    """Through the key-policy module (as every PKCS#11 client on the device reaches
    SoftHSM): without HSM_P11_TOKEN_LOCK some of 8 processes that start together lose
    the token; with it none does, in ROUNDS rounds."""
    assert _lost_without_lock(policy_so, store) > 0, "the race did not show without the lock"
    lock = tokenlock.lock_path(store.conf)
    assert lock == store.root / tokenlock.LOCK_NAME
    env = store.env(HSM_P11_TOKEN_LOCK=str(lock))
    outcomes = [o for _ in range(ROUNDS) for o in _round(policy_so, env)]
    assert outcomes == ["ok"] * ROUNDS * PROCESSES, sorted(set(outcomes))
    # SoftHSM ignores a plain file in its token directory: the token is still one token.
    listed = subprocess.run(["softhsm2-util", "--show-slots"], env=store.env(),
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert listed.count(f"Label:            {LABEL}") == 1


def test_the_module_refuses_to_start_without_its_lock(policy_so: Path, store: Store) -> None:
    """HSM_P11_TOKEN_LOCK set but not openable: C_Initialize fails (fail closed), the
    process serves nothing rather than racing."""
    env = store.env(HSM_P11_TOKEN_LOCK=str(store.root / "no-such-dir" / "lock"))
    code, output = _finish(_start(policy_so, env))
    assert code != 0 and "GeneralError" in output, output[-1000:]


def test_the_token_helper_and_the_service_share_the_lock(policy_so: Path, store: Store) -> None:
    """The token helper (``tokencli``, the daemon's way to the customer token: ``hsm
    show``, PIN checks) and the service's processes log in and read at the same time:
    every status the helper reads shows the token, every login succeeds. The helper
    finds the lock from SOFTHSM2_CONF alone, as on the device."""
    env = store.env(HSM_P11_TOKEN_LOCK=str(tokenlock.lock_path(store.conf)))
    helper_env = {**store.env(), "PYTHONPATH": str(base.ROOT)}

    def helper(op: str, args: dict[str, str]) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "hsmctl.appliance.tokencli", op]
        return _spawn(argv, helper_env, {"args": args})

    for _ in range(ROUNDS // 2):
        apps = [_start(policy_so, env) for _ in range(PROCESSES // 2)]
        helpers = [helper("customer_status", {}) for _ in range(3)]
        helpers.append(helper("customer_check_co_pin", {"pin": USER_PIN}))
        assert _outcomes(apps) == ["ok"] * (PROCESSES // 2)
        replies = []
        for proc in helpers:
            code, output = _finish(proc)
            assert code == 0, output[-2000:]
            replies.append(json.loads(output.splitlines()[-1])["result"])
        for status in replies[:3]:
            assert status["initialised"] and status["label"] == LABEL, status
        assert replies[3] == {"match": True}


# Steps a client takes one at a time, each after the test's "go" on stdin, saying what it
# did on stdout: log in; generate an RSA-2048 token key pair; relabel the private key.
STEPS = """
import json, sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
req = json.loads(sys.stdin.readline())
def step(name):
    assert sys.stdin.readline() == "go\\n"
    return name
lib = pkcs11.lib(req["module"])
token = lib.get_token(token_label=req["label"])
step("login")
session = token.open(user_pin=req["pin"], rw=True)
print("logged-in", flush=True)
step("generate")
pub, priv = session.generate_keypair(KeyType.RSA, 2048, store=True, label="held")
print("generated", flush=True)
step("relabel")
priv[Attribute.LABEL] = "relabelled"
print("relabelled", flush=True)
session.close()
"""


def test_a_key_generation_holds_nobody_a_login_and_an_attribute_change_wait(
    policy_so: Path, store: Store
) -> None:
    """Which calls the module holds exclusively, seen from outside: while the test holds
    the lock shared (as another client mid-call would), the client's key generation
    completes but its login and its attribute change wait until the test lets go. No
    timing decides the result: a call that must wait cannot finish while the lock is
    held, however slow the machine; one that must not wait is awaited without bound."""
    lock = tokenlock.lock_path(store.conf)
    assert lock is not None
    env = store.env(HSM_P11_TOKEN_LOCK=str(lock))
    proc = subprocess.Popen(
        [sys.executable, "-c", STEPS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    holder = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        proc.stdin.write(json.dumps({"module": str(policy_so), "label": LABEL,
                                     "pin": USER_PIN}) + "\n")  # fmt: skip
        proc.stdin.flush()

        def go_and_wait_while_held(expect: str) -> None:
            fcntl.flock(holder, fcntl.LOCK_SH)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            time.sleep(1.0)  # the call has had time to finish if it were not waiting
            assert proc.poll() is None
            ready, _, _ = select.select([proc.stdout], [], [], 0)
            assert not ready, f"{expect}: finished while the lock was held shared"
            fcntl.flock(holder, fcntl.LOCK_UN)
            assert proc.stdout.readline().strip() == expect

        go_and_wait_while_held("logged-in")
        fcntl.flock(holder, fcntl.LOCK_SH)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # no bound would hang
        assert ready, "the key generation waited for the shared lock"
        assert proc.stdout.readline().strip() == "generated"  # under our shared hold
        fcntl.flock(holder, fcntl.LOCK_UN)
        go_and_wait_while_held("relabelled")
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0, proc.stdout.read()[-2000:]
    finally:
        os.close(holder)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture
def lock(tmp_path: Path) -> Iterator[tokenlock.TokenLock]:
    yield tokenlock.TokenLock(tmp_path / tokenlock.LOCK_NAME)


def _other_can(path: Path, how: int) -> bool:
    """Whether another holder (another open file description) could take ``how`` now."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_holds_nest_and_an_exclusive_hold_inside_a_shared_one_upgrades_it(
    lock: tokenlock.TokenLock,
) -> None:
    assert lock.path is not None
    with lock.hold(exclusive=False):
        assert lock.mode == "shared"
        assert _other_can(lock.path, fcntl.LOCK_SH)
        assert not _other_can(lock.path, fcntl.LOCK_EX)
        with lock.hold(exclusive=True):
            assert lock.mode == "exclusive"
            assert not _other_can(lock.path, fcntl.LOCK_SH)
            with lock.hold(exclusive=False):
                assert lock.mode == "exclusive"
        assert lock.mode == "shared"
        assert _other_can(lock.path, fcntl.LOCK_SH)
    assert lock.mode == "unlocked"
    assert _other_can(lock.path, fcntl.LOCK_EX)


def test_a_hold_is_released_when_its_block_raises(lock: tokenlock.TokenLock) -> None:
    assert lock.path is not None
    with pytest.raises(RuntimeError), lock.hold(exclusive=True):
        raise RuntimeError("boom")
    assert lock.mode == "unlocked" and _other_can(lock.path, fcntl.LOCK_EX)


def test_no_token_store_no_lock_and_an_unopenable_lock_fails_closed(tmp_path: Path) -> None:
    conf = tmp_path / "softhsm2.conf"
    conf.write_text("log.level = ERROR\n")
    assert tokenlock.lock_path(conf) is None
    with tokenlock.TokenLock(None).hold(exclusive=True):
        pass
    blocked = tokenlock.TokenLock(tmp_path / "no-such-dir" / tokenlock.LOCK_NAME)
    refused = pytest.raises(tokenlock.TokenLockError, match="cannot be opened")
    with refused, blocked.hold(exclusive=False):
        pass
