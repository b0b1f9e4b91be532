"""The token store's fingerprint (hsmctl.appliance.tokenstore): every change SoftHSM can
make to a store (an object file added, removed or rewritten, a token directory added or
removed, the generation counter) changes it, even a rewrite that keeps size and mtime;
a status is answered from the cache only while the fingerprint holds, and never kept
when the store changed during the read or too recently to tell. One test runs the real
helper against a real SoftHSM store."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from hsmctl.appliance import tokenstore
from hsmctl.appliance.tokenstore import StatusCache, fingerprint

pytestmark = pytest.mark.unit


def _store(tmp_path: Path) -> Path:
    root = tmp_path / "tokens"
    token = root / "162f6024-bb45-532e-402d-ecd2154cd3f7"
    token.mkdir(parents=True)
    (token / "token.object").write_bytes(b"T" * 320)
    (token / "token.lock").write_bytes(b"")
    (token / "generation").write_bytes(b"\0" * 7 + b"\1")
    (token / "a.object").write_bytes(b"A" * 615)
    return root


def test_token_dir_from_softhsms_configuration(tmp_path: Path) -> None:
    conf = tmp_path / "softhsm2.conf"
    conf.write_text("# x\ndirectories.tokendir = /var/lib/softhsm/tokens\nlog.level = ERROR\n")
    assert tokenstore.token_dir(conf) == Path("/var/lib/softhsm/tokens")
    conf.write_text("log.level = ERROR\n")
    assert tokenstore.token_dir(conf) is None
    assert tokenstore.token_dir(tmp_path / "absent.conf") is None


CHANGES: dict[str, Callable[[Path], None]] = {
    "object added": lambda t: (t / "b.object").write_bytes(b"B"),
    "object removed": lambda t: (t / "a.object").unlink(),
    "token removed": lambda t: shutil.rmtree(t),
    "token added": lambda t: (t.parent / "new-token").mkdir(),
    "generation": lambda t: (t / "generation").write_bytes(b"\0" * 7 + b"\2"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_changes_the_fingerprint(tmp_path: Path, change: str) -> None:
    root = _store(tmp_path)
    token = next(root.iterdir())
    before = fingerprint(root)
    CHANGES[change](token)
    assert fingerprint(root) != before


def test_a_rewrite_that_keeps_size_and_mtime_still_changes_it(tmp_path: Path) -> None:
    root = _store(tmp_path)
    obj = next(root.iterdir()) / "a.object"
    before = fingerprint(root)
    st = obj.stat()
    obj.write_bytes(b"Z" * 615)
    os.utime(obj, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = fingerprint(root)
    assert after is not None and before is not None
    assert after != before  # the ctime moved
    assert fingerprint(root) == after  # and reading it changes nothing


def test_a_generation_counter_rewritten_unchanged_does_not(tmp_path: Path) -> None:
    """SoftHSM rewrites it in place, same value, each time a process opens the token."""
    root = _store(tmp_path)
    generation = next(root.iterdir()) / "generation"
    before = fingerprint(root)
    generation.write_bytes(generation.read_bytes())
    assert fingerprint(root) == before


def test_an_unreadable_store_has_no_fingerprint(tmp_path: Path) -> None:
    assert fingerprint(tmp_path / "absent") is None


class _Reads:
    def __init__(self, change: Callable[[], None] | None = None) -> None:
        self.count = 0
        self.change = change

    def __call__(self) -> int:
        self.count += 1
        if self.change:
            self.change()
        return self.count


def _later(seconds: float) -> Callable[[], float]:
    import time

    return lambda: time.time() + seconds


def test_answered_from_the_cache_while_the_store_is_unchanged(tmp_path: Path) -> None:
    root = _store(tmp_path)
    cache = StatusCache[int](lambda: root, clock=_later(5))
    read = _Reads()
    assert [cache.get(read) for _ in range(3)] == [1, 1, 1]
    assert read.count == 1
    (next(root.iterdir()) / "b.object").write_bytes(b"B")  # a client made an object
    assert cache.get(read) == 2
    cache.clear()
    assert cache.get(read) == 3


def test_a_store_changed_too_recently_is_read_every_time(tmp_path: Path) -> None:
    root = _store(tmp_path)
    cache = StatusCache[int](lambda: root)  # the real clock: the files are seconds young
    read = _Reads()
    assert [cache.get(read) for _ in range(3)] == [1, 2, 3]


def test_a_store_that_changes_during_the_read_is_not_kept(tmp_path: Path) -> None:
    root = _store(tmp_path)
    token = next(root.iterdir())
    n = iter(range(1000))
    cache = StatusCache[int](lambda: root, clock=_later(5))
    read = _Reads(lambda: (token / f"{next(n)}.object").write_bytes(b"x"))
    assert [cache.get(read) for _ in range(3)] == [1, 2, 3]


def test_no_store_no_cache(tmp_path: Path) -> None:
    cache = StatusCache[int](lambda: None, clock=_later(5))
    read = _Reads()
    assert [cache.get(read) for _ in range(2)] == [1, 2]
    cache = StatusCache[int](lambda: tmp_path / "absent", clock=_later(5))
    assert [cache.get(read) for _ in range(2)] == [3, 4]


@pytest.mark.skipif(shutil.which("softhsm2-util") is None, reason="needs SoftHSM (softhsm2)")
def test_the_real_helper_and_a_real_softhsm_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """customer_status through the cache: a token initialised behind its back (another
    process, as the PKCS#11 service's) is seen at the next read."""
    from hsmctl.appliance import customertoken

    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    cache = StatusCache[object](clock=_later(5))
    monkeypatch.setattr(customertoken, "_STATUS", cache)
    # The store's first reader creates its lock file (appliance/tokenlock.py): a change.
    customertoken.customer_status()
    assert (tokens / ".hsmctl-token.lock").is_file()
    first = customertoken.customer_status()
    assert not first.initialised
    assert customertoken.customer_status() is first  # answered from the cache
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "customer",
         "--so-pin", "12345678", "--pin", "87654321"],
        check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )  # fmt: skip
    second = customertoken.customer_status()
    assert second.initialised and second.label == "customer"
    # Reading rewrites SoftHSM's generation counter; the status is kept all the same.
    assert customertoken.customer_status() is second
    subprocess.run(
        ["softhsm2-util", "--delete-token", "--token", "customer"],
        check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )  # fmt: skip
    assert not customertoken.customer_status().initialised
