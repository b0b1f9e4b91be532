"""The run's management connections (hsmctl.provider.sessions), against a real OpenSSH
sshd on loopback (:mod:`.loopback_sshd`, root): a lease reuses the appliance's
connection, a device's refusal keeps it, a connection the device dropped is replaced, a
connection failure on a reused connection runs the step once more (never on a fresh
one), close() closes everything, and threads of different appliances never share one.
``$SSH_CONNECTION`` (the client's address and port) tells the device's connections apart.
The lab test (tests/lab/test_provision.py) counts the device's ``login`` records."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hsmctl.errors import UnreachableError
from hsmctl.provider import context, provisioning
from hsmctl.provider.sessions import SessionPool
from hsmctl.ssh import DeviceCommandFailed, DeviceConnection, DeviceDenied, PinnedHostKeys
from tests.unit.loopback_sshd import USER, Sshd, needs_root
from tests.unit.loopback_sshd import sshd as sshd  # the module-scoped fixture

pytestmark = [pytest.mark.unit, needs_root()]


def maker(
    server: Sshd, made: list[DeviceConnection] | None = None
) -> Callable[[], DeviceConnection]:
    def make() -> DeviceConnection:
        conn = DeviceConnection(
            "127.0.0.1",
            port=server.port,
            username=USER,
            pinned=PinnedHostKeys.of(server.host_key),
            key=server.key,
        )
        if made is not None:
            made.append(conn)
        return conn

    return make


def whoami(conn: DeviceConnection) -> str:
    return conn.run("echo $SSH_CONNECTION").stdout.strip()


def test_steps_of_one_appliance_share_one_connection(sshd: Sshd) -> None:
    made: list[DeviceConnection] = []
    with SessionPool() as pool:
        seen = []
        for _ in range(4):
            with pool.lease("hsm01", maker(sshd, made)) as conn:
                seen.append(whoami(conn))
            assert conn.connected  # returned to the pool, not closed
        # A device's refusal is a reply: the connection stays.
        for status, error in ((77, DeviceDenied), (3, DeviceCommandFailed)):
            with pytest.raises(error), pool.lease("hsm01", maker(sshd, made)) as conn:
                conn.run(f"exit {status}")
        with pool.lease("hsm01", maker(sshd, made)) as conn:
            seen.append(whoami(conn))
        assert len(set(seen)) == 1 and len(made) == 1 and pool.opened == 1
        # Another appliance: a connection of its own.
        with pool.lease("hsm02", maker(sshd, made)) as other:
            assert whoami(other) != seen[0]
        assert pool.opened == 2
    assert not conn.connected and not other.connected  # closed with the pool


def test_a_connection_the_device_dropped_is_replaced(sshd: Sshd) -> None:
    with SessionPool() as pool:

        def step() -> tuple[str, str]:
            with pool.lease("hsm01", maker(sshd)) as conn:
                # $PPID is the login shell; its parent is the connection's sshd (audit@notty).
                return whoami(conn), conn.run("ps -o ppid= -p $PPID").stdout.strip()

        first, session = pool.run("hsm01", step)
        # The device ends that session between two steps (from a connection of its own).
        with maker(sshd)() as killer:
            killer.run(f"kill -9 {session}")
        # Whether the pool sees the transport dead when leasing, or the step's command
        # meets the dead link (then it runs once more): the step succeeds on a new one.
        second, _ = pool.run("hsm01", step)
        assert second != first
        assert pool.opened == 2


def test_a_connection_failure_on_a_reused_connection_runs_the_step_once_more(
    sshd: Sshd,
) -> None:
    with SessionPool() as pool:
        calls: list[str] = []

        def step() -> str:
            with pool.lease("hsm01", maker(sshd)) as conn:
                calls.append(whoami(conn))
                if len(calls) == 2:  # the reused connection "fails"
                    raise UnreachableError("127.0.0.1: the connection was lost")
                return calls[-1]

        first = pool.run("hsm01", step)
        again = pool.run("hsm01", step)
        assert calls[1] == first  # the failure was on the reused connection
        assert again == calls[2] != first  # the retry had a new one
        assert len(calls) == 3 and pool.opened == 2


def test_a_failure_on_a_fresh_connection_is_reported_not_retried(sshd: Sshd) -> None:
    with SessionPool() as pool:
        calls = 0

        def step() -> None:
            nonlocal calls
            with pool.lease("hsm01", maker(sshd)):
                calls += 1
                raise UnreachableError("127.0.0.1: the connection was lost")

        with pytest.raises(UnreachableError):
            pool.run("hsm01", step)
        assert calls == 1
        # Dropped: the next lease connects again.
        with pool.lease("hsm01", maker(sshd)) as conn:
            assert conn.connected
        assert pool.opened == 2


def test_close_closes_all_and_later_leases_are_their_own(sshd: Sshd) -> None:
    made: list[DeviceConnection] = []
    pool = SessionPool()
    with pool.lease("hsm01", maker(sshd, made)) as a:
        whoami(a)
        with pool.lease("hsm01", maker(sshd, made)) as b:  # out already: not pooled
            assert whoami(b) != whoami(a)
        assert not b.connected
    with pool.lease("hsm02", maker(sshd, made)) as c:
        whoami(c)
        pool.close()  # c is still leased: closed when it comes back
        assert c.connected
    assert not c.connected and not a.connected
    with pool.lease("hsm01", maker(sshd, made)) as d:
        whoami(d)
    assert not d.connected
    assert len(made) == 4
    pool.close()  # twice is harmless


def test_an_interrupt_drops_the_connection(sshd: Sshd) -> None:
    with SessionPool() as pool:
        with pytest.raises(KeyboardInterrupt), pool.lease("hsm01", maker(sshd)) as conn:
            raise KeyboardInterrupt
        assert not conn.connected


def test_threads_of_different_appliances_never_share(sshd: Sshd) -> None:
    appliances = [f"hsm{n:02d}" for n in range(1, 7)]
    seen: dict[str, set[str]] = {a: set() for a in appliances}
    errors: list[BaseException] = []
    with SessionPool() as pool:

        def work(appliance: str) -> None:
            try:
                for _ in range(4):
                    with pool.lease(appliance, maker(sshd)) as conn:
                        seen[appliance].add(whoami(conn))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(a,)) for a in appliances]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert all(len(s) == 1 for s in seen.values()), seen
    assert len(set().union(*seen.values())) == len(appliances)
    assert pool.opened == len(appliances)


def test_served_steps_get_the_runs_pool_and_a_plain_context_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``serve_steps`` hands the run's pool to every step's context; a context of its own
    (plain ansible-playbook, AWX: the module's process) has none, so ``management`` is a
    connection of its own."""
    from tests.provider_env import make_env

    env = make_env(tmp_path / "env")
    got: list[context.ProviderContext] = []

    def fake_run_step(config: str, appliance: str, request_id: str, step: str, **kw: Any) -> Any:
        ctx = kw["opener"](config)
        got.append(ctx)
        ctx.close()
        return {"changed": False}

    monkeypatch.setattr(provisioning, "run_step", fake_run_step)
    with SessionPool() as pool:
        handle = provisioning.serve_steps({"unit01"}, pool)
        for step in ("verify", "handoff"):
            handle({"config": str(env.config), "appliance": "unit01", "request_id": "r",
                    "step": step})  # fmt: skip
    assert [c.sessions for c in got] == [pool, pool]
    assert got[0].inventory is got[1].inventory  # the run's one parse
    plain = context.ProviderContext(got[0].config)
    assert plain.sessions is None


def test_served_steps_share_the_runs_store_and_leave_it_open(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Given the run's open store, every step of that configuration writes through its
    one database (one engine, its compiled statements shared), from many threads at once;
    a step closing its context leaves the run's store open. Another configuration's step
    gets a store of its own, closed with its context."""
    from hsmctl.state.model import Operation, StepStatus
    from tests.provider_env import make_env

    env, other = make_env(tmp_path / "env"), make_env(tmp_path / "other")
    run_ctx = context.open_context(str(env.config))
    run_store = run_ctx.store
    pool = run_store._db.engine.pool  # Engine.dispose() (a store's close) replaces it
    seen: list[Any] = []
    lock = threading.Lock()

    def fake_run_step(config: str, appliance: str, request_id: str, step: str, **kw: Any) -> Any:
        ctx = kw["opener"](config)
        try:
            for _ in range(5):
                ctx.store.record_step(Operation.PROVISION, step, StepStatus.STARTED,
                                      appliance=appliance, request_id=request_id)  # fmt: skip
            with lock:
                seen.append((config, ctx.store._db))
        finally:
            ctx.close()
        return {"changed": False}

    monkeypatch.setattr(provisioning, "run_step", fake_run_step)
    try:
        handle = provisioning.serve_steps({"unit01"}, None, run_ctx)
        request = {"config": str(env.config), "appliance": "unit01", "request_id": "r"}
        errors: list[BaseException] = []

        def work(step: str) -> None:
            try:
                handle({**request, "step": step})
            except BaseException as exc:
                errors.append(exc)

        steps = ["verify", "attach", "network", "monitor", "handoff"] * 5  # 25 at once
        threads = [threading.Thread(target=work, args=(s,)) for s in steps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert {db for _, db in seen} == {run_store._db}
        assert run_store._db.engine.pool is pool
        # Still open after every step closed its context: the run's own writes go on.
        run_store.record_step(Operation.PROVISION, "end", StepStatus.OK, appliance="unit01",
                              request_id="r")  # fmt: skip
        entries = run_store.journal(appliance="unit01", request_id="r")
        assert len(entries) == 25 * 5 + 1

        handle({"config": str(other.config), "appliance": "unit01", "request_id": "o",
                "step": "verify"})  # fmt: skip
        own = seen[-1][1]
        assert seen[-1][0] == str(other.config) and own is not run_store._db
    finally:
        run_ctx.close()
