"""The provider's state: appliances, allocations, requests, the operations journal and
pinned host keys, in SQLite (default) or PostgreSQL with the same schema."""

from hsmctl.state.model import ApplianceState, Interface, Operation, RequestStatus, StepStatus
from hsmctl.state.records import (
    Allocation,
    ApplianceRecord,
    JournalEntry,
    PinnedHostKey,
    RequestRecord,
    SyncReport,
)
from hsmctl.state.store import Store

__all__ = [
    "Allocation",
    "ApplianceRecord",
    "ApplianceState",
    "Interface",
    "JournalEntry",
    "Operation",
    "PinnedHostKey",
    "RequestRecord",
    "RequestStatus",
    "StepStatus",
    "Store",
    "SyncReport",
]
