"""The takeover as a journaled state machine (SPEC §7; STYLE.md 4).

The steps are plain data (:data:`STEPS`, their actions in :mod:`.actions`), run by the
one step runner (:mod:`hsmctl.steps`) against the journal in the customer's state
directory (:mod:`.journal`, records in :mod:`.records`); what to do at each is decided
from the journal and what the device says, and every decision is recorded *before* the
action it leads to. Lifecycle of one run: open the bundle → load (or start) the journal
keyed by the bundle → connect (pins from the journal first, then the bundle) → run every
step not yet done → prove (:mod:`.proof`) → sign the receipt (:mod:`.receipt`). Interrupt
it anywhere (kill -9, a cut connection) and the same command finishes the job:

* every secret is escrowed (0600, fsynced) before the device hears of it;
* the password change is journaled ``pending`` before it is sent and ``committed`` only
  after a fresh login with the new password; on resume the new password is tried first,
  the one-time one only while the change may not have happened;
* host keys are staged, journaled, then activated; while a rotation is in flight both
  the old and the staged keys are accepted, and only those, until a connection shows
  the device serving a staged key;
* a client (``--client NAME:ROLE``) gets its key pair written and journaled before the
  device hears of it; a client the device already lists with that key is not registered
  again, one it lists with another key stops the run (exit 3); the set of clients is
  fixed once the step starts (another set on a rerun: exit 2, nothing sent);
* a journal whose password change was never sent (``one-time``) is not a commitment: a
  new bundle for the same appliance (the device re-provisioned, or the first bundle
  refused for a host-key mismatch) replaces it; otherwise another bundle exits 5.

The customer never loses access: at every instant one of the escrowed credentials logs in.
"""

from __future__ import annotations

from typing import Any

from hsmctl import steps
from hsmctl.customer.context import TenantContext
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import UsageError
from hsmctl.handoff import open_bundle
from hsmctl.handoff.identity import TenantIdentity
from hsmctl.progress import NullProgress, Progress
from hsmctl.takeover import faults
from hsmctl.takeover.actions import TakeoverSteps, check_client_kits
from hsmctl.takeover.journal import JOURNAL, open_journal
from hsmctl.takeover.journal import read as read_journal
from hsmctl.takeover.options import Options, check_client_set, check_inputs, token_label
from hsmctl.takeover.proof import export_log, transfer_window
from hsmctl.takeover.receipt import RECEIPT, RECEIPT_FORMAT, verify_receipt
from hsmctl.takeover.records import STEPS, PasswordState, TakeoverStep
from hsmctl.takeover.session import AdminSession

__all__ = [
    "JOURNAL",
    "RECEIPT",
    "RECEIPT_FORMAT",
    "STEPS",
    "Options",
    "PasswordState",
    "Takeover",
    "TakeoverStep",
    "check_inputs",
    "export_log",
    "preview",
    "takeover",
    "token_label",
    "transfer_window",
    "verify_receipt",
]


class Takeover:
    """One takeover run. Create with the context and options, call :meth:`run` once.

    ``ran`` lists the steps this run started (none: an earlier run finished the job).
    """

    def __init__(self, ctx: TenantContext, opts: Options, progress: Progress | None = None):
        self.ctx = ctx
        self.opts = opts
        self.progress = progress or NullProgress()
        self.identity = TenantIdentity.load(ctx.identity)
        self.session: AdminSession | None = None
        self.ran: list[TakeoverStep] = []

    def _open(self) -> AdminSession:
        # The signature and contents first; expiry only matters for a fresh start.
        bundle = open_bundle(
            self.opts.handoff, self.ctx.provider_public_key, self.identity, allow_expired=True
        )
        if self.ctx.tenant and bundle.tenant != self.ctx.tenant:
            raise UsageError(f"the bundle is for tenant {bundle.tenant}, not {self.ctx.tenant}")
        journal = open_journal(self.ctx.appliance(bundle.appliance), bundle, self.progress)
        return AdminSession(self.ctx, bundle, journal)

    def _before(self, step: TakeoverStep) -> None:
        assert self.session is not None
        faults.reached(f"before:{step.value}", self.session.conn)
        self.ran.append(step)

    def _after(self, step: TakeoverStep) -> None:
        assert self.session is not None
        faults.reached(f"after:{step.value}", self.session.conn)

    def run(self) -> dict[str, Any]:
        check_inputs(self.opts)
        session = self.session = self._open()
        record = session.journal.record
        # Nothing is sent yet: a --client set other than the journaled one, or a kit
        # directory taken, stops here (exit 2).
        check_client_set(session.bundle.appliance, self.opts.clients, record.client_set)
        check_client_kits(session.state, self.opts.clients, record.clients)
        try:
            steps.run(
                TakeoverSteps(session, self.opts, self.identity).plan(),
                session.journal,
                subject=session.bundle.appliance,
                progress=self.progress,
                hooks=steps.Hooks(before=self._before, after=self._after),
            )
        finally:
            session.drop()
        return {
            "appliance": session.bundle.appliance,
            "state": "customer-owned",
            "receipt": str(session.state.dir / RECEIPT),
            "clients": [
                {"client": c.name, "role": c.role, "kit": c.kit} for c in record.clients or ()
            ],
        }


def preview(ctx: TenantContext, opts: Options) -> dict[str, Any]:
    """What :meth:`Takeover.run` would do, reading only (Ansible's check mode): no
    connection, no journal, no directory made. ``changed`` is False only when this
    bundle's takeover already finished (its receipt is then returned)."""
    check_inputs(opts)
    identity = TenantIdentity.load(ctx.identity)
    bundle = open_bundle(opts.handoff, ctx.provider_public_key, identity, allow_expired=True)
    if ctx.tenant and bundle.tenant != ctx.tenant:
        raise UsageError(f"the bundle is for tenant {bundle.tenant}, not {ctx.tenant}")
    state = ApplianceDir.taken_over(ctx.state_dir, bundle.appliance)
    journal = read_journal(state) if state is not None else None
    if journal is not None and journal.bundle_id == bundle.bundle_id and journal.finished:
        assert state is not None
        return {
            "changed": False,
            "appliance": bundle.appliance,
            "state": "customer-owned",
            "receipt": str(state.dir / RECEIPT),
        }
    return {"changed": True, "appliance": bundle.appliance}


def takeover(ctx: TenantContext, opts: Options, progress: Progress | None = None) -> dict[str, Any]:
    return Takeover(ctx, opts, progress).run()
