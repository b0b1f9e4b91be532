"""The token store's lock: one ``flock`` file beside SoftHSM's token store that every
SoftHSM user on the device takes, so no process ever reads a token file another process
is rewriting.

Why: SoftHSM 2.6.1 (Debian 12) rewrites a file under its ``fcntl`` lock but releases the
lock *before* its buffered data reaches the file (truncate, unlock, write: seen with
strace). ``token.object`` is rewritten at every ``C_Login`` (the PIN-count flags), and a
process that loads or refreshes the token in that window reads an empty or torn file and
loses the token: ``get_token`` finds no token, or a login fails with
``CKR_GENERAL_ERROR``. Measured: 8 processes that initialise and log in together lose the
token in about 40 % of them; with this lock, in none (tests/unit/test_tokenlock.py).

The rule, the same in ``appliance/p11/policy.c`` (the PKCS#11 service's side): a call
that rewrites a file other processes read (a login rewrites ``token.object``; PIN and
token management; changing an object's attributes; deleting a token) holds the lock
exclusively; every other call into SoftHSM, loading the library included, holds it
shared. A new object needs no exclusive hold: SoftHSM writes it completely before it
bumps the token's generation (which is what makes other processes look), and keeps an
object it read too early to read it again; so a long RSA key generation holds nobody.
The token helper holds the lock shared for a status read and exclusively for the whole of
any other operation (they are short); the audit signer shared per call, exclusively to
log in. Here: :func:`shared` and :func:`exclusive`, re-entrant within a process (an
exclusive hold inside a shared one upgrades it for its duration). A process has one
descriptor for the lock, so its own holds never conflict with each other.

Where: ``<directories.tokendir>/.hsmctl-token.lock`` (SoftHSM looks only at directories
there). No token store configured: no lock (nothing to protect). A store whose lock file
cannot be opened: :class:`TokenLockError` (fail closed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from hsmctl.appliance import tokenstore
from hsmctl.errors import HsmctlError

LOCK_NAME = ".hsmctl-token.lock"


class TokenLockError(HsmctlError):
    """The token store's lock file cannot be opened: no SoftHSM call is made."""


def lock_path(conf: Path | None = None) -> Path | None:
    """The lock file of the token store ``$SOFTHSM2_CONF`` names, or None."""
    root = tokenstore.token_dir(conf)
    return root / LOCK_NAME if root is not None else None


class TokenLock:
    """One process's hold on one lock file: a stack of shared/exclusive holds."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._holds: list[int] = []
        self._mode = fcntl.LOCK_UN
        self._mutex = threading.RLock()

    def _wanted(self) -> int:
        if not self._holds:
            return fcntl.LOCK_UN
        return fcntl.LOCK_EX if fcntl.LOCK_EX in self._holds else fcntl.LOCK_SH

    def _apply(self) -> None:
        wanted = self._wanted()
        if wanted == self._mode or self._fd is None:
            return
        fcntl.flock(self._fd, wanted)  # retried by Python on EINTR (PEP 475)
        self._mode = wanted

    def _open(self) -> int:
        if self._fd is None:
            assert self.path is not None
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                self._fd = os.open(self.path, flags, 0o600)
            except OSError as exc:
                raise TokenLockError(
                    f"the token store's lock {self.path} cannot be opened: {exc.strerror}"
                ) from exc
        return self._fd

    @contextlib.contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        with self._mutex:
            if self.path is None:
                yield
                return
            self._open()
            self._holds.append(fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                self._apply()
                yield
            finally:
                self._holds.pop()
                self._apply()

    @property
    def mode(self) -> str:
        """``unlocked``, ``shared`` or ``exclusive`` (for tests and diagnostics)."""
        return {fcntl.LOCK_UN: "unlocked", fcntl.LOCK_SH: "shared"}.get(self._mode, "exclusive")


_PROCESS: TokenLock | None = None
_PROCESS_MUTEX = threading.Lock()


def process_lock() -> TokenLock:
    """This process's :class:`TokenLock` for the token store of ``$SOFTHSM2_CONF``."""
    global _PROCESS
    with _PROCESS_MUTEX:
        if _PROCESS is None:
            _PROCESS = TokenLock(lock_path())
        return _PROCESS


@contextlib.contextmanager
def shared() -> Iterator[None]:
    """Hold the token store's lock shared: SoftHSM calls that only read."""
    with process_lock().hold(exclusive=False):
        yield


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the token store's lock exclusively: SoftHSM calls that may write a file."""
    with process_lock().hold(exclusive=True):
        yield
