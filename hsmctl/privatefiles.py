"""Files that hold secrets or state: written atomically and durably, read only when no one
else may read them. One home for both, shared by the client and the firmware (it is in
the firmware file list), standard library only.

Writing: a fresh temporary file in the same directory (``O_EXCL | O_NOFOLLOW``: a planted
link is never written through) gets the mode, the bytes and an fsync, then is renamed over
the target (or hard-linked to it with ``exclusive``, which fails if the target exists, so
two racing writers cannot both win), and the directory is fsynced. A reader sees the old
file or the whole new one; a crash loses nothing that was reported written.

Reading: the file is opened (symlinks followed, as OpenSSH does for keys: ``~/.ssh``
layouts use them) and the *opened* file is checked, so a swap between check and read is
impossible: a regular file that neither group nor others may access.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from hsmctl.errors import UsageError

MAX_PRIVATE_FILE = 1 << 20  # keys, secrets and small state: never more than this


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or an unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, exclusive: bool = False
) -> Path:
    """Write ``data`` to ``path`` with ``mode``, atomically and durably (see the module).

    Raises ``FileExistsError`` when ``exclusive`` and ``path`` exists.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, mode)  # the umask narrows a mode given to open(); be exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, p)
        else:
            os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(p.parent)
    return p


def read_private(path: str | os.PathLike[str], *, what: str) -> bytes:
    """The bytes of a file only its owner may access; anything else is exit 2 with a
    message naming ``what`` and the path (missing, not a regular file, too open, too big).
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang the caller
    except OSError as exc:
        raise UsageError(f"{what} {p}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {p}: not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UsageError(
                f"{what} {p}: permissions {stat.S_IMODE(st.st_mode):04o} are too open; "
                "it must not be accessible by group or others (chmod 600)"
            )
        if st.st_size > MAX_PRIVATE_FILE:
            raise UsageError(f"{what} {p}: larger than {MAX_PRIVATE_FILE} bytes")
        chunks = []
        total = 0
        while chunk := os.read(fd, 65536):
            total += len(chunk)
            if total > MAX_PRIVATE_FILE:
                raise UsageError(f"{what} {p}: larger than {MAX_PRIVATE_FILE} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
