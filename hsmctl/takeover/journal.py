"""The takeover journal on disk: opened (or started) for a bundle, saved before every
irreversible action, and the step runner's :class:`~hsmctl.steps.Journal` for the
takeover (SPEC §7: "the journal is keyed by bundle").

A takeover records only what a resume needs: the steps done, and the decisions taken
inside them (password ``pending``, staged host keys...). ``started`` and ``failed`` leave
no trace in the file: an interrupted step is redone from what the journal says inside
it, and a failure reaches the user as the error itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hsmctl import utc
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import ConflictError, HsmctlError
from hsmctl.handoff import BundleExpired, OpenedBundle
from hsmctl.progress import Progress
from hsmctl.takeover.records import HostKeyRotation, PasswordState, TakeoverJournal, TakeoverStep

JOURNAL = "takeover.json"


class FileJournal:
    """``takeover.json`` of one appliance and the record it holds (:attr:`record`)."""

    def __init__(self, state: ApplianceDir, record: TakeoverJournal) -> None:
        self.state = state
        self.record = record

    def save(self) -> None:
        """Atomic and fsynced: what is saved survives a crash right after."""
        self.state.write(JOURNAL, self.record.as_dict())

    # the step runner's Journal -----------------------------------------------------------

    def is_done(self, step: TakeoverStep) -> bool:
        return step in self.record.done

    def started(self, step: TakeoverStep) -> None:
        pass

    def ok(self, step: TakeoverStep, detail: Mapping[str, Any]) -> None:
        self.record.done.add(step)
        self.save()

    def failed(self, step: TakeoverStep, error: HsmctlError) -> None:
        pass


def read(state: ApplianceDir) -> TakeoverJournal | None:
    data = state.read(JOURNAL)
    if data is None:
        return None
    return TakeoverJournal.from_dict(data, where=str(state.dir / JOURNAL))


def open_journal(state: ApplianceDir, bundle: OpenedBundle, progress: Progress) -> FileJournal:
    """The journal of ``bundle``'s takeover: the one on disk, or a new one.

    A journal of another bundle is replaced only if it committed to nothing: finished (a
    re-provisioned device), or its password change never sent (``one-time``); its escrow
    is then moved aside, never deleted. Otherwise the other bundle's takeover must be
    finished first (exit 5). Expiry blocks only a fresh start.
    """
    journal = read(state)
    replaced: TakeoverJournal | None = None
    if journal is not None and journal.bundle_id != bundle.bundle_id:
        untouched = journal.password is PasswordState.ONE_TIME
        if not (journal.finished or untouched):
            raise ConflictError(
                f"{bundle.appliance} has an unfinished takeover from another hand-off "
                f"bundle (request {journal.request_id}); finish that one first"
            )
        replaced, journal = journal, None
    if journal is not None:
        return FileJournal(state, journal)
    if bundle.expired:
        raise BundleExpired(
            f"hand-off bundle for {bundle.appliance} expired at "
            f"{bundle.expires_at.isoformat()}; ask the provider for a new one"
        )
    if replaced is not None:
        retired = state.retire_secrets(replaced.bundle_id[:16])
        if retired is not None:
            progress.step(f"{bundle.appliance}: earlier escrow kept in {retired}")
    new = FileJournal(
        state,
        TakeoverJournal(
            bundle_id=bundle.bundle_id,
            appliance=bundle.appliance,
            request_id=bundle.request_id,
            # Before any connection: every admin session of this takeover is later.
            started_at=utc.precise(),
            host_keys=HostKeyRotation(current=list(bundle.data_host_keys)),
        ),
    )
    pins = state.load_pins()
    pins.data_host_keys = list(bundle.data_host_keys)
    pins.audit_keys.setdefault(bundle.audit_key_id, bundle.audit_public_key)
    pins.initial_audit_key_id = bundle.audit_key_id
    pins.data_ip = bundle.data_ip
    state.save_pins(pins)
    new.save()
    return new
