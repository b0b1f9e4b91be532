"""The store tier's databases: each test gets a fresh one on each backend (the
PostgreSQL server itself is tests/postgres.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.postgres import postgres_url, reset_postgres

__all__ = ["db_url", "postgres_url", "reset_postgres"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database per test, on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "state" / "hsmctl.db")
    url: str = request.getfixturevalue("postgres_url")
    reset_postgres(url)
    return url
