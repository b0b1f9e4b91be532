"""The takeover journal (``appliances/ID/takeover.json``) as typed records.

The file's format is fixed by the journals customers already have: a takeover
interrupted under an earlier release must resume under this one. So :meth:`as_dict`
writes exactly the keys the format has always had (optional ones only once they are
set), :meth:`from_dict` reads every journal that format allows, and a unit test holds
journals as they were written before these records existed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hsmctl.auditlog import Head
from hsmctl.errors import HsmctlError
from hsmctl.ssh import PublicKey


class TakeoverStep(enum.StrEnum):
    ESCROW = "escrow"  # the new admin password, SO PIN, CO PIN, collector key
    PASSWORD = "password"  # noqa: S105 - a step name: one-time -> escrowed password
    REVOKE = "revoke"  # provider access, monitor
    HOSTKEYS = "hostkeys"  # stage, journal, activate, re-pin
    HSM_INIT = "hsm-init"  # token with the customer's SO PIN
    CO_PIN = "co-pin"  # crypto-officer PIN
    DOMAIN = "domain"  # --domain-file: the cloning domain (nothing to do without it)
    AUDIT_KEY = "audit-key"  # rotate, pin the new public key
    COLLECTOR = "collector"  # the audit account's key for log collection
    CLIENTS = "clients"  # --client NAME:ROLE: key pair, registration, kit (none by default)
    PROVE = "prove"  # the checks of the receipt
    RECEIPT = "receipt"


STEPS: tuple[TakeoverStep, ...] = tuple(TakeoverStep)


class PasswordState(enum.StrEnum):
    ONE_TIME = "one-time"  # nothing sent yet
    PENDING = "pending"  # the change may have happened
    COMMITTED = "committed"  # proved by a fresh login with the new password


def same_keys(a: Sequence[str], b: Sequence[str]) -> bool:
    """The same set of public keys, whatever their comments."""
    return {PublicKey.parse(k).to_line() for k in a} == {PublicKey.parse(k).to_line() for k in b}


@dataclass
class HostKeyRotation:
    """The data interface's host keys: pinned now (``current``), staged and journaled
    before activation, and whether a connection showed the device serving the staged."""

    current: list[str]
    staged: list[str] = field(default_factory=list)
    previous: list[str] | None = None
    rotated: bool = False
    staged_fingerprints: list[str] | None = None

    @property
    def pinned(self) -> list[str]:
        """While a rotation is in flight both the old and the staged keys, and only those."""
        return self.current + self.staged

    def observe(self, presented: PublicKey) -> bool:
        """A staged key answering means activation happened: the staged keys become the
        current ones. True if that changed anything (the journal must be saved)."""
        if presented.to_line() not in [PublicKey.parse(k).to_line() for k in self.staged]:
            return False
        self.previous, self.current, self.staged = self.current, self.staged, []
        self.rotated = True
        return True

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"current": list(self.current), "staged": list(self.staged)}
        if self.previous is not None:
            out["previous"] = list(self.previous)
        if self.rotated:
            out["rotated"] = True
        if self.staged_fingerprints is not None:
            out["staged_fingerprints"] = list(self.staged_fingerprints)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HostKeyRotation:
        previous, fingerprints = d.get("previous"), d.get("staged_fingerprints")
        return cls(
            current=[str(k) for k in d["current"]],
            staged=[str(k) for k in d.get("staged") or ()],
            previous=None if previous is None else [str(k) for k in previous],
            rotated=bool(d.get("rotated")),
            staged_fingerprints=None if fingerprints is None else [str(f) for f in fingerprints],
        )


@dataclass(frozen=True)
class Check:
    """One check of the proof (SPEC §7 step 7), as the receipt lists it."""

    name: str
    ok: bool
    detail: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Check:
        return cls(str(d["name"]), bool(d["ok"]), d.get("detail"))


@dataclass
class ClientKit:
    """One application client the takeover registers (``--client NAME:ROLE``). Its key
    pair is made, written and journaled (``public_key``) before the device hears of it;
    ``kit`` is set once the kit is in place, and the client is then done."""

    name: str
    role: str
    public_key: str | None = None  # "TYPE BASE64 COMMENT"
    kit: str | None = None  # the kit directory, once complete

    @property
    def fingerprint(self) -> str | None:
        return None if self.public_key is None else PublicKey.parse(self.public_key).fingerprint

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "role": self.role}
        optional = {"public_key": self.public_key, "kit": self.kit}
        return out | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClientKit:
        key, kit = d.get("public_key"), d.get("kit")
        return cls(
            name=str(d["name"]),
            role=str(d["role"]),
            public_key=None if key is None else str(key),
            kit=None if kit is None else str(kit),
        )


@dataclass
class TakeoverJournal:
    """One takeover of one appliance, keyed by the hand-off bundle."""

    bundle_id: str
    appliance: str
    request_id: str | None
    started_at: str  # before the first connection: every admin session of ours is later
    host_keys: HostKeyRotation
    password: PasswordState = PasswordState.ONE_TIME
    done: set[TakeoverStep] = field(default_factory=set)
    first_login_at: str | None = None
    hsm_init_sent: bool = False
    audit_key_before: str | None = None
    audit_key_id: str | None = None
    checks: list[Check] | None = None
    log_head: Head | None = None
    provisioned_seq: int | None = None
    transfer_seq: int | None = None
    clients: list[ClientKit] | None = None  # set when the clients step starts

    @property
    def finished(self) -> bool:
        return TakeoverStep.RECEIPT in self.done

    @property
    def client_set(self) -> list[ClientKit] | None:
        """The clients this takeover is committed to, or None while any set may be asked
        for: the clients step journals its set when it starts; a journal that went past
        it without one (an earlier release's) is committed to none."""
        if self.clients is not None:
            return self.clients
        if self.done & {TakeoverStep.CLIENTS, TakeoverStep.PROVE, TakeoverStep.RECEIPT}:
            return []
        return None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bundle_id": self.bundle_id,
            "appliance": self.appliance,
            "request_id": self.request_id,
            "started_at": self.started_at,
            "password": self.password.value,
            "host_keys": self.host_keys.as_dict(),
            "done": sorted(s.value for s in self.done),
        }
        optional: dict[str, Any] = {
            "first_login_at": self.first_login_at,
            "hsm_init_sent": self.hsm_init_sent or None,
            "audit_key_before": self.audit_key_before,
            "audit_key_id": self.audit_key_id,
            "checks": None if self.checks is None else [c.as_dict() for c in self.checks],
            "log_head": None if self.log_head is None else self.log_head.as_dict(),
            "provisioned_seq": self.provisioned_seq,
            "clients": None if self.clients is None else [c.as_dict() for c in self.clients],
        }
        out |= {k: v for k, v in optional.items() if v is not None}
        if self.log_head is not None:  # written together by the proof, null or not
            out["transfer_seq"] = self.transfer_seq
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "takeover journal") -> TakeoverJournal:
        try:
            head, checks, clients = d.get("log_head"), d.get("checks"), d.get("clients")
            return cls(
                bundle_id=str(d["bundle_id"]),
                appliance=str(d["appliance"]),
                request_id=None if d.get("request_id") is None else str(d["request_id"]),
                started_at=str(d["started_at"]),
                host_keys=HostKeyRotation.from_dict(d["host_keys"]),
                password=PasswordState(d["password"]),
                done={TakeoverStep(s) for s in d["done"]},
                first_login_at=d.get("first_login_at"),
                hsm_init_sent=bool(d.get("hsm_init_sent")),
                audit_key_before=d.get("audit_key_before"),
                audit_key_id=d.get("audit_key_id"),
                checks=None if checks is None else [Check.from_dict(c) for c in checks],
                log_head=None if head is None else Head(int(head["seq"]), str(head["hash"])),
                provisioned_seq=d.get("provisioned_seq"),
                transfer_seq=d.get("transfer_seq"),
                clients=None if clients is None else [ClientKit.from_dict(c) for c in clients],
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise HsmctlError(
                f"{where} is damaged ({type(exc).__name__}: {exc}); restore it from backup "
                "(the escrowed secrets beside it still log in)"
            ) from exc
