"""What the client reads from a device, as facts: a command and a pure parser of its reply.

Every device reply is hostile until parsed here (through :mod:`hsmctl.devicejson`): a
malformed one, or one that breaks the contract of its fields, is an
:class:`~hsmctl.errors.IntegrityError` (exit 3) naming the appliance. Workflows run the
command their own way (a pinned SSH session, the out-of-band console, a step with fault
points) and hand the output to :meth:`Fact.process`.
"""

from hsmctl.device.fact import Fact, Fields
from hsmctl.device.facts import (
    AUDIT_KEY,
    CLIENTS,
    HOST_KEYS,
    HSM_INFO,
    NETWORK,
    PROVIDER_ACCESS,
    ROTATE_AUDIT_KEY,
    STAGE_HOST_KEYS,
    AuditKey,
    AuditKeyRotation,
    Client,
    Clients,
    HostKeys,
    HsmInfo,
    NetworkConfig,
    ProviderAccess,
    StagedHostKeys,
    Switch,
    register_client,
)

__all__ = [
    "AUDIT_KEY",
    "CLIENTS",
    "HOST_KEYS",
    "HSM_INFO",
    "NETWORK",
    "PROVIDER_ACCESS",
    "ROTATE_AUDIT_KEY",
    "STAGE_HOST_KEYS",
    "AuditKey",
    "AuditKeyRotation",
    "Client",
    "Clients",
    "Fact",
    "Fields",
    "HostKeys",
    "HsmInfo",
    "NetworkConfig",
    "ProviderAccess",
    "StagedHostKeys",
    "Switch",
    "register_client",
]
