"""What the state store hands out: one frozen record per row kind, with ``as_dict`` (plain
JSON values) and ``from_dict`` (a row's mapping, or ``as_dict``'s output) so no caller
reads a ``dict[str, Any]`` by string keys.

``from_dict`` takes both a database row and JSON because SQLite returns naive datetimes
and JSON holds ISO strings: one constructor normalises either to aware UTC.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

from hsmctl.state.model import ApplianceState, Interface, Operation, RequestStatus, StepStatus

if TYPE_CHECKING:
    from sqlalchemy.engine import RowMapping

    Fields = Mapping[str, Any] | RowMapping


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything here is stored in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def plain(value: object) -> object:
    """A column or field value as JSON: times in ISO 8601 UTC, enums as their value."""
    if isinstance(value, datetime):
        return aware(value).isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def _time(value: object) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ValueError(f"not a time: {value!r}")
    return aware(value)


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class _Record:
    """``as_dict`` for every record: its fields in declaration order, as JSON values."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class ApplianceRecord(_Record):
    id: str
    region: str
    stamp: str
    serial: str
    model: str
    mgmt_ip: str
    state: ApplianceState
    tenant: str | None
    data_ip: str | None
    failure_reason: str | None
    updated_at: datetime

    @classmethod
    def from_dict(cls, d: Fields) -> Self:
        return cls(
            id=str(d["id"]),
            region=str(d["region"]),
            stamp=str(d["stamp"]),
            serial=str(d["serial"]),
            model=str(d["model"]),
            mgmt_ip=str(d["mgmt_ip"]),
            state=ApplianceState(d["state"]),
            tenant=_opt(d["tenant"]),
            data_ip=_opt(d["data_ip"]),
            failure_reason=_opt(d["failure_reason"]),
            updated_at=_time(d["updated_at"]),
        )


@dataclass(frozen=True)
class Allocation(_Record):
    """An appliance given to a request, with its address in the tenant's subnet."""

    appliance: str
    request_id: str
    tenant: str
    vnet: str
    subnet: str
    ip: str
    region: str
    stamp: str
    mgmt_ip: str

    @classmethod
    def from_dict(cls, d: Fields) -> Self:
        return cls(*(str(d[f.name]) for f in fields(cls)))


@dataclass(frozen=True)
class RequestRecord(_Record):
    """A provisioning request; ``result`` is the provisioner's JSON (never secrets)."""

    request_id: str
    tenant: str
    vnet: str
    subnet: str
    requested_ip: str | None
    stamp: str | None
    count: int
    status: RequestStatus
    result: Any
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_dict(cls, d: Fields) -> Self:
        return cls(
            request_id=str(d["request_id"]),
            tenant=str(d["tenant"]),
            vnet=str(d["vnet"]),
            subnet=str(d["subnet"]),
            requested_ip=_opt(d["requested_ip"]),
            stamp=_opt(d["stamp"]),
            count=int(d["count"]),
            status=RequestStatus(d["status"]),
            result=d["result"],
            created_at=_time(d["created_at"]),
            updated_at=_time(d["updated_at"]),
        )


@dataclass(frozen=True)
class JournalEntry(_Record):
    """One step of an operation; ``detail`` is free-form JSON checked for secrets."""

    id: int
    time: datetime
    appliance: str | None
    request_id: str | None
    operation: Operation
    step: str
    status: StepStatus
    detail: dict[str, Any]

    @classmethod
    def from_dict(cls, d: Fields) -> Self:
        return cls(
            id=int(d["id"]),
            time=_time(d["time"]),
            appliance=_opt(d["appliance"]),
            request_id=_opt(d["request_id"]),
            operation=Operation(d["operation"]),
            step=str(d["step"]),
            status=StepStatus(d["status"]),
            detail=dict(d["detail"]),
        )


@dataclass(frozen=True)
class PinnedHostKey(_Record):
    appliance: str
    interface: Interface
    algorithm: str
    fingerprint: str
    key_line: str
    pinned_at: datetime

    @classmethod
    def from_dict(cls, d: Fields) -> Self:
        return cls(
            appliance=str(d["appliance"]),
            interface=Interface(d["interface"]),
            algorithm=str(d["algorithm"]),
            fingerprint=str(d["fingerprint"]),
            key_line=str(d["key_line"]),
            pinned_at=_time(d["pinned_at"]),
        )


@dataclass(frozen=True)
class SyncReport(_Record):
    """What ``sync_inventory`` did. ``missing``: in the database, not in the inventory
    (kept: they may hold a tenant). ``host_key_mismatch``: the inventory's management keys
    differ from the pinned ones (kept pinned; re-pin deliberately)."""

    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    host_key_mismatch: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Fields) -> Self:
        return cls(*(tuple(str(x) for x in d.get(f.name, ())) for f in fields(cls)))
