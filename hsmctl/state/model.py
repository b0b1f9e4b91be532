"""The provider's domain vocabulary: appliance states and the moves between them, request
statuses, interfaces, journal operations and step outcomes.

Plain enums with no database in sight, so workflows, the CLI and pure decisions
(:mod:`hsmctl.state.allocation`) can import them without SQLAlchemy; the schema stores
each as its value.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class ApplianceState(enum.StrEnum):
    """An appliance's lifecycle (SPEC §6, ``fleet list``)."""

    AVAILABLE = "available"
    PROVISIONING = "provisioning"
    PROVISIONED = "provisioned"
    CUSTOMER_OWNED = "customer-owned"
    DEPROVISIONING = "deprovisioning"
    FAILED = "failed"


class RequestStatus(enum.StrEnum):
    """A provisioning request: allocated in the store, then run by the provisioner."""

    ALLOCATED = "allocated"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RELEASED = "released"


class Interface(enum.StrEnum):
    MGMT = "mgmt"
    DATA = "data"


class Operation(enum.StrEnum):
    """What a journal entry belongs to."""

    SYNC = "sync"
    ALLOCATE = "allocate"
    PROVISION = "provision"
    STATE = "state"
    HOST_KEYS = "host-keys"
    HEALTH = "health"
    DEPROVISION = "deprovision"
    RELEASE = "release"
    RECONCILE = "reconcile"  # a fix made by `fleet reconcile --apply`


class StepStatus(enum.StrEnum):
    STARTED = "started"
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


A = ApplianceState
# Allowed `set_state` moves. `available` is reached only through `release` (which frees
# the address) and `provisioning` from `available` only through `allocate`.
TRANSITIONS: Mapping[ApplianceState, frozenset[ApplianceState]] = {
    A.AVAILABLE: frozenset({A.FAILED}),
    A.PROVISIONING: frozenset({A.PROVISIONED, A.FAILED}),
    A.PROVISIONED: frozenset({A.CUSTOMER_OWNED, A.DEPROVISIONING, A.FAILED}),
    A.CUSTOMER_OWNED: frozenset({A.DEPROVISIONING, A.FAILED}),
    A.DEPROVISIONING: frozenset({A.FAILED}),
    A.FAILED: frozenset({A.PROVISIONING, A.DEPROVISIONING}),
}
# States from which `release` may return an appliance to the pool without zeroizing it
# first: the tenant never owned it, or deprovisioning has done the zeroize.
RELEASABLE = frozenset({A.PROVISIONING, A.DEPROVISIONING, A.FAILED})
