"""Who may zeroize an appliance (SPEC §6 ``deprovision``): checked before anything is
written, and changing nothing when refused.

The tenant's signed release (``hsmctl release``), checked against the tenant's key in
the inventory, the appliance and tenant in the store, and the start of the current
allocation (an older release cannot be replayed); or ``--force`` with a reason, which is
recorded. The :class:`Authorization` is journaled with the run, so a resumed run needs
none again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hsmctl.errors import ConflictError, HsmctlError, IntegrityError, UsageError
from hsmctl.handoff import RELEASE_FORMAT, read_document, verify_release
from hsmctl.provider.context import ProviderContext
from hsmctl.state.records import ApplianceRecord


class AuthKind(enum.StrEnum):
    RELEASE = "release"
    FORCE = "force"


@dataclass(frozen=True)
class Authorization:
    """Why the provider may zeroize this appliance; journaled (no secret in it)."""

    kind: AuthKind
    reason: str | None = None
    tenant: str | None = None
    issued_at: str | None = None
    signer: str | None = None
    release_file: str | None = None

    def as_detail(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in {
                "kind": self.kind.value,
                "reason": self.reason,
                "tenant": self.tenant,
                "issued_at": self.issued_at,
                "signer": self.signer,
                "release_file": self.release_file,
            }.items()
            if v is not None
        }


def check_flags(*, yes: bool, release: str | None, force: bool, reason: str | None) -> None:
    """The command line on its own (before any file or database is read)."""
    if not yes:
        raise UsageError(
            "deprovisioning zeroizes the appliance (keys, accounts, host keys) for good; "
            "add --yes to confirm"
        )
    if release and force:
        raise UsageError("give either --release FILE or --force --reason TEXT, not both")
    if force and not (reason and reason.strip()):
        raise UsageError("--force needs --reason TEXT (it is recorded in the journal)")
    if reason and not force:
        raise UsageError("--reason goes with --force; a release carries the tenant's reason")


def require_authority(release: str | None, force: bool) -> None:
    """A new run needs one; resuming a journaled run does not (its authority carries)."""
    if not release and not force:
        raise UsageError(
            "deprovisioning needs the tenant's signed release (--release FILE, made with "
            "'hsmctl release' inside the tenant network) or --force --reason TEXT"
        )


def _read_release(path: str) -> dict[str, Any]:
    """A wrong file (missing, not JSON, not a release) is an input error (exit 2); a
    release whose signature does not verify is an integrity violation (exit 3)."""
    try:
        doc = read_document(path, what="release")
    except IntegrityError as exc:
        raise UsageError(f"--release {path}: not a release document ({exc.message})") from exc
    if doc.get("format") != RELEASE_FORMAT:
        raise UsageError(
            f"--release {path}: not a release document (format {doc.get('format')!r}, "
            f"expected {RELEASE_FORMAT!r})"
        )
    return doc


def authorize(
    ctx: ProviderContext,
    record: ApplianceRecord,
    *,
    release: str | None,
    force: bool,
    reason: str | None,
) -> Authorization:
    """Check the release (or accept --force); raises before anything is written."""
    if force:
        return Authorization(AuthKind.FORCE, reason=(reason or "").strip(), tenant=record.tenant)
    assert release is not None
    doc = _read_release(release)
    alloc = ctx.store.allocation(record.id)
    if alloc is None or record.tenant is None:
        raise ConflictError(
            f"{record.id} is not allocated to a tenant, so no release can authorise its "
            "deprovisioning; use --force --reason TEXT",
            detail={"appliance": record.id, "state": record.state.value},
        )
    request = ctx.store.get_request(alloc.request_id)
    not_before: datetime | None = request.created_at if request is not None else None
    tenant = ctx.inventory.tenant(alloc.tenant)
    try:
        verify_release(
            doc,
            appliance=record.id,
            tenant=alloc.tenant,
            tenant_public_key_line=tenant.identity_public_key.line,
            not_before=not_before,
        )
    except HsmctlError as exc:
        raise type(exc)(f"--release {release}: {exc.message}", detail=exc.detail) from exc
    return Authorization(
        AuthKind.RELEASE,
        reason=doc.get("reason"),
        tenant=alloc.tenant,
        issued_at=str(doc.get("issued_at")),
        signer=str(doc["signature"]["fingerprint"]),
        release_file=str(Path(release).resolve()),
    )
