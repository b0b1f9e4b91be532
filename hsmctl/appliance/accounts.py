"""Device accounts: passwords, authorised keys, enabled/locked, the password policy.

Locking uses the account expiry date, which pam_unix checks for every authentication
method (keys included) under ``UsePAM yes``; an empty authorised-keys file closes key
logins as well. Password hashes are set with ``chpasswd`` reading from stdin: a password
never appears in a process's arguments.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import subprocess
from pathlib import Path

from hsmctl import contract, privatefiles
from hsmctl.appliance import paths, sshpub

ACCOUNTS = ("provider", "monitor", "admin", "audit")


class AccountError(Exception):
    """A refused account change; the message is safe to show and to log."""


def check_password_policy(password: str) -> None:
    """The device's policy (:mod:`hsmctl.contract`), refused as an account error."""
    try:
        contract.check_password_policy(password)
    except contract.PasswordPolicyError as exc:
        raise AccountError(str(exc)) from exc


_KEY = re.compile(
    r"^(ssh-ed25519|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|ssh-rsa)"
    r" [A-Za-z0-9+/=]{40,4096}( [\x21-\x7e ]{0,200})?$"
)


def _keygen_l(line: str) -> sshpub.KeyInfo:
    """``ssh-keygen -l`` of one key line: in-process where :mod:`sshpub` can prove the
    same answer (Ed25519, ECDSA), else ssh-keygen itself. AccountError: it refuses."""
    info = sshpub.key_info(line)
    if info is not None:
        return info
    proc = subprocess.run(
        ["ssh-keygen", "-l", "-f", "-"],
        input=line + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    fields = proc.stdout.split()
    if proc.returncode != 0 or len(fields) < 3:
        raise AccountError("the public key does not parse")
    return sshpub.KeyInfo(int(fields[0]), fields[1], fields[-1].strip("()"))


def check_public_key(line: str) -> str:
    """One OpenSSH public key line, validated as ssh-keygen does; returns its
    fingerprint."""
    line = line.strip()
    if not _KEY.match(line):
        raise AccountError("not an OpenSSH public key line (type, base64 blob, comment)")
    return _keygen_l(line).fingerprint


def check_client_key(line: str) -> tuple[str, str]:
    """An application's key: Ed25519, ECDSA or RSA of at least 2048 bits. Returns
    (fingerprint, "TYPE BITS")."""
    line = line.strip()
    fingerprint = check_public_key(line)
    info = _keygen_l(line)
    bits, kind = info.bits, info.kind
    if kind not in ("ED25519", "ECDSA", "RSA"):
        raise AccountError(f"a client key must be Ed25519, ECDSA or RSA, not {kind}")
    if kind == "RSA" and bits < 2048:
        raise AccountError(f"an RSA client key must have at least 2048 bits, not {bits}")
    return fingerprint, f"{kind} {bits}"


def client_account(name: str) -> str:
    """The Unix account of client ``name``: prefixed, so no client is named like a device
    account (``admin``) or a system one (``root``)."""
    return paths.CLIENT_PREFIX + name


def create_client(name: str, key_line: str) -> None:
    """The client's account (no password, login shell the PKCS#11 entry, in the group
    the data sshd forces onto it) and its key, restricted in authorized_keys as well."""
    user = client_account(name)
    home = paths.CLIENT_HOMES / user
    if subprocess.run(["id", user], capture_output=True, check=False).returncode != 0:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", str(home),
             "--shell", paths.CLIENT_ENTRY, "--gid", paths.CLIENT_GROUP, "--no-user-group",
             "--password", "*", user],
            check=True, capture_output=True,
        )  # fmt: skip
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o755)  # noqa: S103 - sshd changes into it as the client; it holds nothing
    entry = paths.CLIENT_ENTRY
    set_authorized_key(user, f'restrict,command="{entry}" {key_line.strip()}')


def delete_client(name: str) -> int:
    """Key gone, sessions ended, account removed. Returns how many processes were ended."""
    user = client_account(name)
    remove_authorized_key(user)
    try:
        pwd.getpwnam(user)
    except KeyError:
        return 0
    disable(user)
    killed = end_sessions(user)
    subprocess.run(["userdel", user], check=False, capture_output=True)
    with contextlib.suppress(OSError):
        (paths.CLIENT_HOMES / user).rmdir()
    return killed


def set_password(user: str, password: str) -> None:
    proc = subprocess.run(
        ["chpasswd"], input=f"{user}:{password}\n", capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise AccountError(f"could not set the password of {user}")


def clear_password(user: str) -> None:
    subprocess.run(["usermod", "--password", "*", user], check=True, capture_output=True)


def authorized_key_path(user: str) -> Path:
    return paths.AUTHORIZED_KEYS / user


def set_authorized_key(user: str, line: str) -> None:
    privatefiles.write_atomic(authorized_key_path(user), (line.strip() + "\n").encode(), mode=0o644)


def remove_authorized_key(user: str) -> None:
    authorized_key_path(user).unlink(missing_ok=True)


def has_key(user: str) -> bool:
    path = authorized_key_path(user)
    return path.exists() and path.stat().st_size > 0


def enable(user: str) -> None:
    subprocess.run(["usermod", "--expiredate", "", user], check=True, capture_output=True)


def disable(user: str) -> None:
    subprocess.run(["usermod", "--expiredate", "1", user], check=True, capture_output=True)


def is_enabled(user: str) -> bool:
    """True when the account never expires, as ``chage -l`` says it ("Account expires:
    never"); a date, even a future one, is disabled. Read from the shadow entry where
    :func:`shadow_expiry` can prove chage's answer (every health poll's and
    provisioning's ``hsm show`` asks), else from chage itself."""
    try:
        pwd.getpwnam(user)
        text: str | None = paths.SHADOW.read_text(encoding="utf-8")
    except (KeyError, OSError, UnicodeDecodeError):
        text = None
    known = shadow_expiry(text, user) if text is not None else None
    if known is not None:
        return known == "never"
    out = subprocess.run(["chage", "-l", user], capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("Account expires"):
            return line.split(":", 1)[1].strip() == "never"
    return False


_SHADOW_NUMBER = re.compile(r"[0-9]{1,9}")


def shadow_expiry(shadow: str, user: str) -> str | None:
    """``"never"`` or ``"date"``: what ``chage -l`` shows as "Account expires" for
    ``user``, read from the text of /etc/shadow; None where that is not certain, so the
    caller asks chage (the user not there, there twice, or an entry that is not exactly
    9 fields of which the 7 numeric ones are empty or plain small numbers: chage's parser
    drops an entry it cannot read and then shows "never"). An empty expiry field is
    "never" (``usermod --expiredate ''``), a number a date (``--expiredate 1``: locked).
    """
    found = [line for line in shadow.split("\n") if line.split(":", 1)[0] == user]
    if len(found) != 1:
        return None
    fields = found[0].split(":")
    if len(fields) != 9 or not all(f == "" or _SHADOW_NUMBER.fullmatch(f) for f in fields[2:]):
        return None
    return "never" if fields[7] == "" else "date"


def password_set(user: str) -> bool:
    out = subprocess.run(["passwd", "-S", user], capture_output=True, text=True, check=False)
    fields = out.stdout.split()
    return len(fields) > 1 and fields[1] == "P"


def end_sessions(user: str) -> int:
    """Kill every process of ``user`` (their sessions end at once)."""
    uid = pwd.getpwnam(user).pw_uid
    killed = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    # sshd's privileged monitor for those sessions runs as root: end it too.
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(f"sshd: {user} ".encode()) or cmdline.startswith(
            f"sshd: {user}@".encode()
        ):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def listing() -> list[dict[str, object]]:
    return [
        {
            "name": user,
            "enabled": is_enabled(user),
            "key": has_key(user),
            "password": password_set(user),
        }
        for user in ACCOUNTS
    ]
