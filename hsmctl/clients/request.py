"""What the customer asks for a client: a name the device accepts and a role. Pure.

One rule for both ways in: ``hsmctl client register --name APP --role ROLE`` and
``hsmctl takeover --client APP:ROLE``. The name rule and the roles are :mod:`.kit`'s (the
device's own rule, mirrored); a bad one is a usage error (exit 2), raised before the
device is contacted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hsmctl.clients import kit
from hsmctl.errors import UsageError


def check_client(name: str, role: str) -> None:
    """``client register``'s checks of ``--name`` and ``--role``."""
    try:
        kit.check_name(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if role not in kit.ROLES:
        raise UsageError(f"--role must be one of {', '.join(kit.ROLES)}")


@dataclass(frozen=True)
class ClientRequest:
    """One ``--client NAME:ROLE`` of the takeover."""

    name: str
    role: str

    @classmethod
    def parse(cls, text: str) -> ClientRequest:
        shown = repr(text[:60])
        name, sep, role = text.partition(":")
        if not sep or not name or not role:
            raise UsageError(
                f"--client {shown}: expected NAME:ROLE, ROLE one of {', '.join(kit.ROLES)}"
            )
        if role not in kit.ROLES:
            raise UsageError(
                f"--client {shown}: unknown role {role[:40]!r}; one of {', '.join(kit.ROLES)}"
            )
        try:
            kit.check_name(name)
        except ValueError as exc:
            # The rule's wording is register's ("--name 'x': ..."): keep the rule, name ours.
            rule = str(exc).partition(": ")[2]
            raise UsageError(f"--client {shown}: bad NAME: {rule}") from exc
        return cls(name, role)

    def __str__(self) -> str:
        return f"{self.name}:{self.role}"


def parse_clients(texts: Iterable[str]) -> tuple[ClientRequest, ...]:
    """Every ``--client``, in the order given; a name given twice is a usage error."""
    return check_unique(ClientRequest.parse(t) for t in texts)


def check_unique(requests: Iterable[ClientRequest]) -> tuple[ClientRequest, ...]:
    out = tuple(requests)
    seen: set[str] = set()
    for r in out:
        if r.name in seen:
            raise UsageError(f"--client: {r.name} is given more than once (one role per client)")
        seen.add(r.name)
    return out
