"""The PKCS#11 service: a registered application's SSH session becomes one
``p11-kit remote`` on the customer token, behind the key-policy module (SPEC §11).

Lifecycle of one connection: the client's forced command (``hsm-p11``, running as the
client's account, :mod:`p11entry`) connects to ``hsmd``'s socket and asks for the
service; the daemon identifies it from the kernel (SO_PEERCRED: uid -> ``p11-NAME`` ->
registered role; :mod:`origin`: the SSH connection's interface must be the data one),
then asks for the session's stdin and stdout, which arrive as descriptors (SCM_RIGHTS).
It starts ``p11-kit remote --provider <policy module> "pkcs11:token=<customer label>"``
on them with the device's privileges (the client's account never reads a token file),
the client's role and name in its environment and the write end of a pipe as the
module's event descriptor. The daemon reads the events until the pipe closes and turns
each into an activity-log record; sessions the process never closed (the application
vanished, ``client revoke`` killed it) are closed in the log with reason
``disconnected``. ``client revoke`` kills the client's processes at once
(:meth:`P11Service.revoke`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmctl.appliance import origin, paths, protocol, store, token, tokenlock
from hsmctl.appliance.logwriter import LogUnavailable
from hsmctl.appliance.roles import Access

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon

POLICY_NAME = "fips"
MAX_EVENT_LINE = 64 * 1024
MAX_TEXT = 256

# SPEC §11's ``fips`` policy as the module enforces it (appliance/p11/README.md).
POLICY: Mapping[str, Any] = {
    "policy": POLICY_NAME,
    "rules": [
        {"rule": "rsa-size", "allows": "RSA keys of 2048 to 8192 bits"},
        {"rule": "ec-curve", "allows": "EC keys on P-256, P-384, P-521, secp256k1"},
        {"rule": "aes-size", "allows": "AES keys of 128, 192, 256 bits"},
        {"rule": "key-type", "allows": "RSA, EC and AES keys only"},
        {"rule": "sensitive", "requires": "private and secret keys CKA_SENSITIVE=true"},
        {"rule": "extractable", "requires": "private and secret keys CKA_EXTRACTABLE=false"},
        {
            "rule": "plaintext-import",
            "refuses": "private or secret keys in plaintext (C_CreateObject); import is "
            "C_UnwrapKey only",
        },
        {"rule": "weakening-change", "refuses": "attribute changes that weaken a key"},
        {"rule": "sensitive-read", "refuses": "reading secret components of a key"},
        {"rule": "mechanism-md5", "refuses": "MD2/MD5 mechanisms and digests"},
        {"rule": "mechanism-sha1-sign", "refuses": "SHA-1 signatures and MACs"},
        {"rule": "mechanism-raw-rsa", "refuses": "CKM_RSA_X_509 (raw RSA)"},
        {"rule": "so-login", "refuses": "any login but CKU_USER over the remote path"},
        {"rule": "token-management", "refuses": "C_InitToken, C_InitPIN, C_SetPIN"},
        {
            "rule": "object-class",
            "refuses": "creating objects other than public keys, certificates and data",
        },
        {
            "rule": "operation-state",
            "refuses": "C_GetOperationState and C_SetOperationState (a session's state)",
        },
        {
            "rule": "domain-key",
            "refuses": "any use of the cloning domain's key but wrapping and unwrapping "
            "cloneable keys (SPEC §12)",
        },
        {
            "rule": "domain-wrap",
            "refuses": "wrapping a cloneable key under any key but the domain key, and the "
            "domain key wrapping anything that is not cloneable",
        },
        {
            "rule": "wrapping-key",
            "refuses": "any use of a BYOK wrapping key but the RSA-OAEP unwrap of an AES "
            "transport key (good for AES key wrap only), and any other key naming "
            "CKM_RSA_X_509 in CKA_ALLOWED_MECHANISMS",
        },
        {
            "rule": "oaep-params",
            "allows": "RSA-OAEP with SHA-256/MGF1-SHA-256 or SHA-1/MGF1-SHA-1, no label, "
            "for a BYOK unwrap",
        },
        {
            "rule": "byok-unwrap",
            "refuses": "a wrapped key that does not decrypt under the wrapping key (one answer "
            "and one record for every such failure)",
        },
        {
            "rule": "role-crypto-user",
            "refuses": "generating, importing, copying, changing or destroying keys for a "
            "crypto-user client",
        },
    ],
    "roles": {
        "crypto-officer": "generate, import (unwrap), destroy and use keys",
        "crypto-user": "use existing keys only",
    },
}

# What an event's detail may carry into the log: nothing else the module (or a module
# that misbehaves) writes reaches it, and never a PIN (the module writes none).
_DETAIL_KEYS = frozenset(
    {
        "session",
        "slot",
        "mode",
        "reason",
        "user_type",
        "rv",
        "function",
        "class",
        "label",
        "id",
        "key_type",
        "bits",
        "curve",
        "rule",
        "mechanism",
        "attribute",
        "ec_params",
        "value_len",
    }
)
_EVENTS = {
    "session-open": "pkcs11-session-open",
    "session-close": "pkcs11-session-close",
    "login": "pkcs11-login",
    "key-generated": "key-generated",
    "key-imported": "key-imported",
    "key-destroyed": "key-destroyed",
    "denied": "pkcs11-call",
}


def _value(value: object) -> object | None:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return value[:MAX_TEXT]
    return None


def to_record(event: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]] | None:
    """One module event -> (log event, outcome, detail), or None to drop it. Pure."""
    name = _EVENTS.get(str(event.get("event")))
    if name is None:
        return None
    detail: dict[str, Any] = {}
    for key in sorted(_DETAIL_KEYS & event.keys()):
        value = _value(event[key])
        if value is not None:
            detail[key] = value
    ops = event.get("ops")
    if isinstance(ops, dict):
        detail["ops"] = {
            str(k)[:32]: v for k, v in ops.items() if isinstance(v, int) and not isinstance(v, bool)
        }
    if event.get("event") == "denied":
        outcome = "denied"
    elif event.get("event") == "login" and event.get("rv") != "CKR_OK":
        outcome = "failed"
    else:
        outcome = "ok"
    return name, outcome, detail


def token_uri(label: str) -> str:
    """``pkcs11:token=LABEL``, percent-encoded (RFC 7512)."""
    return "pkcs11:token=" + urllib.parse.quote(label, safe="")


@dataclass(frozen=True)
class Client:
    name: str
    account: str
    role: str
    source: str
    pid: int


class Refused(Exception):
    """The caller gets no PKCS#11 service; the message is safe to show and to log."""


def load_clients() -> dict[str, dict[str, Any]]:
    data = store.read_json(paths.CLIENTS, {})
    return dict(data) if isinstance(data, dict) else {}


def save_clients(clients: Mapping[str, Mapping[str, Any]]) -> None:
    store.write_json(paths.CLIENTS, dict(clients))


def client_name_of(account: str) -> str | None:
    """``p11-app1`` -> ``app1`` if that client is registered, else None."""
    if not account.startswith(paths.CLIENT_PREFIX):
        return None
    name = account.removeprefix(paths.CLIENT_PREFIX)
    return name if name in load_clients() else None


class P11Service:
    """The running ``p11-kit remote`` processes, per client, and the way in."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        # Held while a connection is checked and its process started, and while a client
        # is revoked: no process starts for a client after its revocation.
        self.lock = threading.Lock()
        self.running: dict[str, set[subprocess.Popen[bytes]]] = {}

    # -- the log ---------------------------------------------------------------------------

    def _log(self, who: Client | None, account: str, source: str, event: str, outcome: str,
             detail: dict[str, Any]) -> None:  # fmt: skip
        role = who.role if who else "none"
        client = {"client": who.name} if who else {}
        try:
            self.daemon.record(account, role, source, event, outcome, {**client, **detail})
        except LogUnavailable as exc:
            print(f"hsmd: pkcs11 record not written: {exc}", file=sys.stderr, flush=True)

    # -- identification --------------------------------------------------------------------

    def identify(self, pid: int, uid: int) -> Client:
        try:
            account = pwd.getpwuid(uid).pw_name
        except KeyError as exc:
            raise Refused("no such account") from exc
        name = account.removeprefix(paths.CLIENT_PREFIX)
        entry = load_clients().get(name) if account.startswith(paths.CLIENT_PREFIX) else None
        came = origin.origin_of(pid)
        source = came.remote or "unknown"
        if entry is None:
            raise Refused(f"{account} is not a registered client")
        if not came.via_sshd or came.interface is not Access.DATA:
            raise Refused("the PKCS#11 service is served on the data interface only")
        if not store.customer_owned_fact():
            raise Refused("the device is not customer-owned")
        return Client(name, account, str(entry["role"]), source, pid)

    # -- one connection --------------------------------------------------------------------

    def serve(self, sock: socket.socket, pid: int, uid: int) -> None:
        try:
            client = self.identify(pid, uid)
        except Refused as exc:
            account = _account_name(uid)
            self._log(None, account, origin.origin_of(pid).remote or "unknown",
                      "pkcs11-connect", "denied", {"reason": str(exc)})  # fmt: skip
            protocol.send(sock, {"type": "refused", "error": str(exc)})
            return
        status = token.customer_status()
        if not status.initialised:
            self._log(client, client.account, client.source, "pkcs11-connect", "failed",
                      {"reason": "the token is not initialised"})  # fmt: skip
            protocol.send(sock, {"type": "refused", "error": "the token is not initialised"})
            return
        protocol.send(sock, {"type": "send-fds"})
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 4)
        except OSError:
            return
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            protocol.send(sock, {"type": "refused", "error": "expected stdin and stdout"})
            return
        read_end, write_end = os.pipe()
        try:
            proc = self._start(client, status.label, fds, write_end)
        finally:
            for fd in (*fds, write_end):
                os.close(fd)
        if proc is None:
            os.close(read_end)
            self._log(client, client.account, client.source, "pkcs11-connect", "denied",
                      {"reason": "revoked"})  # fmt: skip
            protocol.send(sock, {"type": "refused", "error": "the client has been revoked"})
            return
        self._log(client, client.account, client.source, "pkcs11-connect", "ok",
                  {"token": status.label, "pid": proc.pid})  # fmt: skip
        open_sessions, opened, used = self._follow(client, read_end)
        code = proc.wait()
        with self.lock:
            self.running.get(client.name, set()).discard(proc)
        for session in sorted(open_sessions):
            self._log(client, client.account, client.source, "pkcs11-session-close", "ok",
                      {"session": session, "reason": "disconnected"})  # fmt: skip
        # ``sessions``: PKCS#11 sessions opened over this connection (p11-kit remote's own
        # start-up opens some); ``used``: false when no login, key event, refusal or
        # operation happened over it (an HA group kit's warm standby that was not needed,
        # docs/clients.md).
        self._log(client, client.account, client.source, "pkcs11-disconnect", "ok",
                  {"exit": code, "pid": proc.pid, "sessions": opened,
                   "used": used})  # fmt: skip
        with contextlib.suppress(OSError):
            protocol.send(sock, {"type": "result", "exit": 0 if code == 0 else 1})

    def _start(
        self, client: Client, label: str, fds: list[int], events_fd: int
    ) -> subprocess.Popen[bytes] | None:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "SOFTHSM2_CONF": os.environ.get("SOFTHSM2_CONF", str(paths.SOFTHSM_CONF)),
            "HSM_P11_MODULE": str(paths.SOFTHSM_LIB),
            "HSM_P11_ROLE": client.role,
            "HSM_P11_CLIENT": client.name,
            "HSM_P11_EVENTS_FD": str(events_fd),
        }
        lock = tokenlock.lock_path(Path(env["SOFTHSM2_CONF"]))
        if lock is not None:  # the token store's lock, shared with the daemon (tokenlock)
            env["HSM_P11_TOKEN_LOCK"] = str(lock)
        argv = [paths.P11_KIT, "remote", "--provider", str(paths.P11_POLICY), token_uri(label)]
        with self.lock:
            if client.name not in load_clients():
                return None
            proc = subprocess.Popen(
                argv,
                stdin=fds[0],
                stdout=fds[1],
                stderr=subprocess.DEVNULL,
                env=env,
                pass_fds=(events_fd,),
                start_new_session=True,
            )
            self.running.setdefault(client.name, set()).add(proc)
        return proc

    def _follow(self, client: Client, read_end: int) -> tuple[set[int], int, bool]:
        """Log the module's events until the process ends; the sessions left open, how
        many were opened, and whether anything was done (:func:`did_something`)."""
        open_sessions: set[int] = set()
        opened = 0
        used = False
        with open(read_end, "rb") as events:
            for line in _lines(events):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                mapped = to_record(event)
                if mapped is None:
                    continue
                name, outcome, detail = mapped
                session = detail.get("session")
                if isinstance(session, int):
                    if name == "pkcs11-session-open":
                        open_sessions.add(session)
                        opened += 1
                    elif name == "pkcs11-session-close":
                        open_sessions.discard(session)
                used = used or did_something(name, detail)
                self._log(client, client.account, client.source, name, outcome, detail)
        return open_sessions, opened, used

    # -- revocation ------------------------------------------------------------------------

    def revoke(self, name: str) -> int:
        """Kill every PKCS#11 process of ``name`` now; the caller has removed it from the
        registry under :attr:`lock` (:meth:`forget`). Returns how many were killed."""
        with self.lock:
            procs = list(self.running.pop(name, set()))
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return len(procs)

    def forget(self, name: str) -> dict[str, Any] | None:
        """Remove ``name`` from the registry (no new process starts for it)."""
        with self.lock:
            clients = load_clients()
            entry = clients.pop(name, None)
            if entry is not None:
                save_clients(clients)
        return entry

    def sessions(self) -> dict[str, int]:
        with self.lock:
            return {name: len(procs) for name, procs in self.running.items() if procs}


def did_something(event: str, detail: Mapping[str, Any]) -> bool:
    """Whether a logged event shows the client used the service: a login, a key made,
    imported or destroyed, a refusal, or a session closed after any operation (pure).
    Sessions p11-kit remote opens and closes by itself when it starts do none of those."""
    if event in ("pkcs11-login", "key-generated", "key-imported", "key-destroyed",
                 "pkcs11-call"):  # fmt: skip
        return True
    ops = detail.get("ops")
    return (
        event == "pkcs11-session-close"
        and isinstance(ops, dict)
        and any(isinstance(v, int) and v > 0 for v in ops.values())
    )


def _account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid-{uid}"


def _lines(stream: Any) -> Iterable[bytes]:
    while True:
        line = stream.readline(MAX_EVENT_LINE + 1)
        if not line:
            return
        if len(line) > MAX_EVENT_LINE:
            # An over-long event: skip to its end, never buffer it whole.
            while line and not line.endswith(b"\n"):
                line = stream.readline(MAX_EVENT_LINE + 1)
            continue
        yield line
