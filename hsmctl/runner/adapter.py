"""The ansible-runner adapter: a pure function builds a run, a thin call executes it.

Secrets never enter a run: extravars carry references (the hsmctl config file, a request
id), the modules read what they need through the hsmctl library on the controller.
ansible-runner writes everything it is given to its private data directory (inventory,
extravars, the environment of the run, every event); that directory is made 0700 for
the run and removed afterwards. Outcomes are translated here and only here: a host that
failed or was unreachable becomes a :class:`HostOutcome`, never an exception from inside
ansible-runner.
"""

from __future__ import annotations

import enum
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmctl.errors import HsmctlError
from hsmctl.progress import NullProgress, Progress
from hsmctl.runner.guard import PARENT_ENV
from hsmctl.runner.stepserver import SOCKET_ENV, StepHandler, StepServer

# The Ansible content ships inside this package as the collection hsmctl.fleet: this
# package's directory is the collections path of every run (never the caller's cwd or a
# checkout), so an installed hsmctl runs its own playbooks and modules.
COLLECTION_NAME = "hsmctl.fleet"
COLLECTIONS_PATH = Path(__file__).resolve().parents[1]
COLLECTION = COLLECTIONS_PATH / "ansible_collections" / "hsmctl" / "fleet"
PLAYBOOKS = COLLECTION / "playbooks"
MODULES = COLLECTION / "plugins" / "modules"

INTERNAL_POLL_INTERVAL = 0.005
"""Seconds Ansible's main loop sleeps between its polls of the workers. Ansible's default,
0.001, made the main process spin: with every host waiting on its device the loop ran a
thousand times a second, about 0.15 CPU-s per second of the run (measured: a run of 16
hosts whose steps take 1 s each, 6.5 s long: the main process 1.9 -> 0.9 CPU-s at 0.01).
At 0.005 a task waits on average ~7 ms more to be picked up after its predecessor; the
setting exists only in a configuration file (no ANSIBLE_* variable)."""


def ansible_cfg() -> str:
    """The configuration file of hsmctl's runs (``ANSIBLE_CONFIG``; pure). A run reads
    only this one, never an operator's ``~/.ansible.cfg`` or ``/etc/ansible`` (what hsmctl
    needs set is set here or in the run's environment)."""
    return f"[defaults]\ninternal_poll_interval = {INTERNAL_POLL_INTERVAL}\n"


class HostStatus(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"


@dataclass
class HostOutcome:
    host: str
    status: HostStatus = HostStatus.OK
    failed_task: str | None = None
    message: str | None = None
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    playbook: Path
    inventory: dict[str, Any]
    extravars: dict[str, Any]
    forks: int
    tags: tuple[str, ...] = ()
    """Only the tasks with one of these tags run (``--tags``); none: every task."""


def build_run(
    playbook: str,
    hosts: Mapping[str, Mapping[str, Any]],
    extravars: Mapping[str, Any],
    *,
    forks: int = 8,
    tags: tuple[str, ...] = (),
) -> RunSpec:
    """Everything the run needs, as plain data (tested for exact output).

    Every host runs its tasks on the controller (the modules use the hsmctl library and
    talk to the device themselves, with pinned host keys), with the interpreter that runs
    ansible-playbook, i.e. this virtualenv.
    """
    for key, value in extravars.items():
        if not isinstance(value, str | int | bool | None):
            raise TypeError(f"extravar {key!r} must be a plain reference, not {type(value)}")
    host_vars = {
        name: {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            **dict(values),
        }
        for name, values in sorted(hosts.items())
    }
    return RunSpec(
        playbook=PLAYBOOKS / playbook,
        inventory={"all": {"hosts": host_vars}},
        extravars=dict(sorted(extravars.items())),
        forks=max(1, min(forks, len(host_vars) or 1)),
        tags=tuple(tags),
    )


def _modules_in(tasks: Any) -> set[str]:
    """The hsmctl.fleet modules a list of tasks (blocks included) calls."""
    found: set[str] = set()
    for task in tasks if isinstance(tasks, list) else []:
        if not isinstance(task, dict):
            continue
        found.update(
            k.removeprefix(f"{COLLECTION_NAME}.")
            for k in task
            if isinstance(k, str) and k.startswith(f"{COLLECTION_NAME}.")
        )
        for key in ("block", "rescue", "always"):
            found |= _modules_in(task.get(key))
    return found


def required_modules(plays: Any) -> set[str]:
    """The hsmctl.fleet modules a parsed playbook needs (tasks, handlers, module_defaults)."""
    found: set[str] = set()
    for play in plays if isinstance(plays, list) else []:
        if not isinstance(play, dict):
            continue
        for key in ("pre_tasks", "tasks", "post_tasks", "handlers"):
            found |= _modules_in(play.get(key))
        defaults = play.get("module_defaults")
        if isinstance(defaults, dict):
            found |= _modules_in([defaults])
    return found


def check_playbook(playbook: str) -> Path:
    """The installed playbook's path, once it and every module it calls are there.

    Called before anything is allocated or changed: a broken installation must fail
    first, not leave appliances half-provisioned."""
    import yaml

    path = PLAYBOOKS / playbook
    try:
        plays = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HsmctlError(
            f"hsmctl's playbook {playbook} is missing from the installation ({path}): "
            "reinstall hsmctl"
        ) from exc
    except yaml.YAMLError as exc:
        raise HsmctlError(f"hsmctl's playbook {path} is not valid YAML: {exc}") from exc
    missing = sorted(m for m in required_modules(plays) if not (MODULES / f"{m}.py").is_file())
    if missing:
        raise HsmctlError(
            f"{playbook} needs module(s) {', '.join(missing)} missing from the installation "
            f"({MODULES}): reinstall hsmctl"
        )
    return path


class _Events:
    """Turns ansible-runner events into progress lines and per-host outcomes.

    Returns False for every event: ansible-runner then writes no file of it to the run's
    artifact directory (hsmctl reads none; each was a JSON dump, a write and a rename in
    this process for every event, a result's data included)."""

    def __init__(self, hosts: Sequence[str], progress: Progress) -> None:
        self.outcomes = {h: HostOutcome(h) for h in hosts}
        self.progress = progress
        self.tasks_done = 0

    def __call__(self, event: Mapping[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host")
        task = data.get("task") or ""
        if kind == "playbook_on_task_start":
            self.progress.step(f"task: {task}")
        elif kind == "runner_on_ok" and host in self.outcomes:
            res = data.get("res") or {}
            self.outcomes[host].results[task] = {
                k: v for k, v in res.items() if not k.startswith("_") and k != "invocation"
            }
            self.tasks_done += 1
            self.progress.step(f"{host}: {task}: ok")
        elif kind in ("runner_on_failed", "runner_on_unreachable") and host in self.outcomes:
            if data.get("ignore_errors"):
                return False
            res = data.get("res") or {}
            outcome = self.outcomes[host]
            outcome.status = (
                HostStatus.UNREACHABLE if kind == "runner_on_unreachable" else HostStatus.FAILED
            )
            outcome.failed_task = task
            outcome.message = str(res.get("msg") or "failed")
            outcome.results[task] = {
                k: v for k, v in res.items() if not k.startswith("_") and k != "invocation"
            }
            self.progress.step(f"{host}: {task}: {outcome.status.value}: {outcome.message}")
        return False


def _guard_shim(private: Path, real: Path) -> Path:
    """A directory holding ``ansible-playbook``: the real one under :mod:`guard`."""
    shim_dir = private / "guard-bin"
    shim_dir.mkdir(mode=0o700)
    shim = shim_dir / "ansible-playbook"
    shim.write_text(
        "#!/bin/sh\n"
        f"exec {shlex.quote(sys.executable)} -m hsmctl.runner.guard {shlex.quote(str(real))}"
        ' "$@"\n'
    )
    shim.chmod(0o700)
    return shim_dir


def run(
    spec: RunSpec, progress: Progress | None = None, *, serve: StepHandler | None = None
) -> dict[str, HostOutcome]:
    """Run a playbook; returns each host's outcome. Raises only if the run itself broke.

    With ``serve``, this process runs the modules' steps (:mod:`hsmctl.runner.stepserver`:
    a socket in the run's private directory, named to the modules by an environment
    variable): each module task then costs a thin client, not a second import of the
    library."""
    import ansible_runner

    progress = progress or NullProgress()
    hosts = list(spec.inventory["all"]["hosts"])
    events = _Events(hosts, progress)
    private = Path(tempfile.mkdtemp(prefix="hsmctl-run-"))
    os.chmod(private, 0o700)
    # ansible-playbook must be this virtualenv's, so the modules import this hsmctl; and
    # it must end when this process does: the shim first on PATH runs it under the guard.
    venv_bin = str(Path(sys.executable).parent)
    shim_dir = _guard_shim(private, Path(venv_bin) / "ansible-playbook")
    path = os.pathsep.join((str(shim_dir), venv_bin, os.environ.get("PATH", "")))
    config = private / "ansible.cfg"
    config.write_text(ansible_cfg())
    server = StepServer(serve, private).start() if serve is not None else None
    served = {SOCKET_ENV: str(server.path)} if server is not None else {}
    try:
        result = ansible_runner.run(
            private_data_dir=str(private),
            playbook=str(spec.playbook),
            inventory=spec.inventory,
            extravars=spec.extravars,
            forks=spec.forks,
            tags=",".join(spec.tags) or None,
            event_handler=events,
            quiet=True,
            # No copy of the playbook's output in the artifact directory (nobody reads
            # it); the events still reach ``events`` from the output stream.
            settings={"suppress_output_file": True},
            envvars={
                "ANSIBLE_CONFIG": str(config),
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_RETRY_FILES_ENABLED": "0",
                # Every task runs on the controller (connection local): a module is piped
                # to its interpreter instead of copied into a temporary directory,
                # made executable and removed (four shell commands less per task).
                "ANSIBLE_PIPELINING": "1",
                # This package's collection only: not a different hsmctl.fleet installed
                # elsewhere (~/.ansible/collections), nor ansible_collections on sys.path.
                "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS_PATH),
                "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "0",
                PARENT_ENV: str(os.getpid()),
                "PATH": path,  # the run's only: this process's PATH is left alone
                **served,
            },
        )
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(private, ignore_errors=True)
    if result.status not in ("successful", "failed"):
        raise HsmctlError(f"ansible-runner: the run ended as {result.status} (rc {result.rc})")
    if result.status == "failed" and all(
        o.status is HostStatus.OK for o in events.outcomes.values()
    ):
        raise HsmctlError(f"ansible-runner: {spec.playbook.name} failed (rc {result.rc})")
    return events.outcomes
