"""A real PostgreSQL for the tests that need one (the store tier, and the lab's two
orchestrator hosts on one database): Debian's cluster, a throwaway role and database.

``HSMCTL_TEST_DATABASE_URL`` points the tests at an existing PostgreSQL database instead
(its tables are dropped between tests). Otherwise, as root, the fixture starts the
local Debian cluster if it is down (CI starts from a clean machine; there is no
systemd, see LAB-FACTS), creates a role and a database for this session with a random
password, and talks to it over 127.0.0.1 only. At the end it drops both and stops the
cluster again if it started it and no other session's database is left.
Without root and without the variable the PostgreSQL tests are skipped — except under
CI, where that is a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

ENV_URL = "HSMCTL_TEST_DATABASE_URL"
PREFIX = "hsmctl_test_"


def _psql(sql: str, *, db: str = "postgres", port: int) -> str:
    """Run SQL as the postgres superuser over the unix socket (peer auth); SQL on stdin,
    so the role's password never appears in a process list."""
    out = subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "psql",
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-p",
            str(port),
            "-d",
            db,
        ],
        input=sql,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"psql failed: {out.stderr.strip()}")
    return out.stdout


def _cluster() -> tuple[str, str, int, bool] | None:
    """(version, name, port, online) of the first local cluster, if any."""
    if shutil.which("pg_lsclusters") is None:
        return None
    out = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            return parts[0], parts[1], int(parts[2]), parts[3].startswith("online")
    return None


def _wait_ready(port: int, deadline: float) -> None:
    while True:
        ok = subprocess.run(
            ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)], check=False
        ).returncode
        if ok == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("PostgreSQL did not become ready in 60 s")
        time.sleep(0.2)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL store tests cannot run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A URL to an empty PostgreSQL database that lives for this test session."""
    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL]
        return
    if os.geteuid() != 0:
        _unavailable(f"not root and {ENV_URL} is not set")
    cluster = _cluster()
    if cluster is None:
        _unavailable("no PostgreSQL cluster (apt-get install postgresql)")
    assert cluster is not None
    version, name, port, online = cluster
    we_started = False
    if not online:
        subprocess.run(["pg_ctlcluster", version, name, "start"], check=True, timeout=120)
        we_started = True
    _wait_ready(port, time.monotonic() + 60)
    token = secrets.token_hex(4)
    role = db = f"{PREFIX}{os.getpid()}_{token}"
    password = secrets.token_urlsafe(24)
    _psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}';", port=port)
    _psql(f"CREATE DATABASE {db} OWNER {role};", port=port)
    url = f"postgresql+psycopg://{role}:{password}@127.0.0.1:{port}/{db}"
    try:
        yield url
    finally:
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE);", port=port)
        _psql(f"DROP ROLE IF EXISTS {role};", port=port)
        if we_started:
            others = _psql(
                f"SELECT count(*) FROM pg_database WHERE datname LIKE '{PREFIX}%';", port=port
            ).strip()
            if others == "0":
                subprocess.run(["pg_ctlcluster", version, name, "stop"], check=False, timeout=120)


def reset_postgres(url: str) -> None:
    """Empty the database: drop everything in the public schema (the role owns it)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()
