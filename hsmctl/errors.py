"""The one exception tree of hsmctl; each class carries the process exit code (SPEC §6).

::

    HsmctlError (1)                      operation failed
    ├── UsageError (2)                   bad input or usage; nothing was changed
    │   └── ConfigError (2)              missing or malformed configuration
    ├── IntegrityError (3)               tampered log/bundle, broken chain or signature
    │   └── HostKeyMismatch (3)          a device answered with an unpinned host key
    ├── UnreachableError (4)             unreachable or timed out
    ├── ConflictError (5)                no capacity, quota, busy, wrong state
    ├── CommandFailed (1)                a command (local or on a device) failed; holds
    │                                    the result: command, exit status, output tail
    └── PartialFailure (3|4|1|5)         a command over several appliances: some failed;
                                         holds each one's exit code, exits the worst

Lower-level errors (paramiko, socket, PKCS#11, ansible-runner, subprocess) are translated
at their own boundary with ``raise ... from exc``; only the CLI turns these into an exit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


class HsmctlError(Exception):
    """Base of every error hsmctl raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, detail: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}


class UsageError(HsmctlError):
    exit_code = 2


class ConfigError(UsageError):
    pass


class IntegrityError(HsmctlError):
    exit_code = 3


class HostKeyMismatch(IntegrityError):
    pass


class UnreachableError(HsmctlError):
    exit_code = 4


class ConflictError(HsmctlError):
    exit_code = 5


class CommandFailed(HsmctlError):
    """A command exited non-zero. The result rides along for the report."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        status: int | None = None,
        output: str = "",
    ) -> None:
        tail = "\n".join(output.strip().splitlines()[-10:])
        super().__init__(message, detail={"command": list(argv), "status": status})
        self.argv = list(argv)
        self.status = status
        self.output_tail = tail

    def __str__(self) -> str:
        if self.output_tail:
            return f"{self.message}\n{self.output_tail}"
        return self.message


# Precedence when one command covers several appliances (SPEC §6): 3, then 4, then 1, then 5.
_SEVERITY = {3: 4, 4: 3, 1: 2, 5: 1, 2: 0, 0: -1}


def most_severe(codes: Iterable[int]) -> int:
    """The exit code of a multi-appliance command: the most severe of its parts."""
    worst = 0
    for code in codes:
        if _SEVERITY.get(code, 2) > _SEVERITY.get(worst, -1):
            worst = code
    return worst


class PartialFailure(HsmctlError):
    """Some of the appliances one command covered failed (Fabric's ``GroupException``).

    ``results`` maps each appliance to its exit code (0: it succeeded); the error's own
    exit code is the most severe of them (SPEC §6), and ``detail`` carries the command's
    whole report so ``--json`` still prints every appliance's outcome.
    """

    def __init__(
        self, message: str, *, results: Mapping[str, int], detail: dict[str, object]
    ) -> None:
        super().__init__(message, detail=detail)
        self.results = dict(results)
        self.exit_code = most_severe(self.results.values()) or 1
