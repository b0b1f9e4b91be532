"""Action plugin for hsmctl.fleet.hsm_provision: a served step costs no module process.

When ``hsmctl provision`` runs the playbook it serves the steps itself
(:mod:`hsmctl.runner.stepserver`, a Unix socket named by ``HSMCTL_STEP_SOCKET``). A
module task is then still a new Python process that only forwards the step (Ansible's
module wrapper, ~0.1 s of CPU and a process start per task and host); this plugin, which
runs in Ansible's worker on the controller, forwards the same request itself: the same
references (configuration file, appliance, request id, step, check mode), the same
argument checks as the module (its argument spec, below), the same result keys.

Without the socket (plain ``ansible-playbook``, AWX) it runs the module as any task
does: the module runs the step in its own process, as before.

On both paths a task that gives no ``reissue_otp`` gets the value of the variable
``hsm_reissue_otp`` (``-e``, inventory, play or task vars, with Ansible's precedence),
else false: what ``provision.yml``'s ``module_defaults`` did with ``{{ hsm_reissue_otp |
default(false) }}``. Read here, the variable costs no template with a filter in every
worker (``default`` made each worker load all of Ansible's filter plugins: ~60 % of a
worker's CPU under ``hsmctl provision``).
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.module_utils.errors import UnsupportedError
from ansible.plugins.action import ActionBase

# Exactly the module's argument_spec (plugins/modules/hsm_provision.py; a unit test keeps
# the two equal).
ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "step": {
        "type": "str",
        "required": True,
        "choices": ["verify", "attach", "network", "monitor", "handoff", "all"],
    },
    "config": {"type": "path", "required": True},
    "appliance": {"type": "str", "required": True},
    "request_id": {"type": "str", "required": True},
    "reissue_otp": {"type": "bool", "default": False},
}

STEPS = ("verify", "attach", "network", "monitor", "handoff")
ALL = "all"
"""``step: all``: the five steps in order, each its own request (journaled as when it
runs alone), stopping at the first that fails; each step's result in ``steps``."""

REISSUE_VAR = "hsm_reissue_otp"
"""The variable a task without ``reissue_otp`` takes it from (absent: false)."""


class ActionModule(ActionBase):  # type: ignore[misc]
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(ARGUMENT_SPEC)

    def _module_args(self, task_vars: dict[str, Any] | None) -> dict[str, Any]:
        """The task's arguments (module_defaults merged in by Ansible), with
        ``reissue_otp`` from :data:`REISSUE_VAR` when the task gives none: an argument
        set on the task or in module_defaults wins, as it did over the playbook's
        module_defaults; the variable's value comes from wherever Ansible's precedence
        puts it, templated as ``{{ hsm_reissue_otp }}`` was (an undefined variable is not
        an error: the module's default, false)."""
        args = dict(self._task.args)
        if "reissue_otp" not in args and task_vars is not None and REISSUE_VAR in task_vars:
            args["reissue_otp"] = self._templar.resolve_variable_expression(REISSUE_VAR)
        return args

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = super().run(tmp, task_vars)
        module_args = self._module_args(task_vars)
        try:
            from hsmctl.runner import stepclient
        except ImportError:
            stepclient = None  # type: ignore[assignment]  # the module says why
        served = stepclient.served_socket() if stepclient is not None else None
        if served is None:
            result.update(
                self._execute_module(
                    module_name="hsmctl.fleet.hsm_provision",
                    module_args=module_args,
                    task_vars=task_vars,
                )
            )
            return result
        # As ActionBase.validate_argument_spec, which checks self._task.args only.
        checked = ArgumentSpecValidator(ARGUMENT_SPEC).validate(module_args)
        if checked.error_messages:
            msg = checked.errors.msg
            if isinstance(checked.errors.errors[0], UnsupportedError):
                msg = f"Unsupported parameters for ({self._load_name}) module: {msg}"
            raise AnsibleActionFail(msg, obj=self._task.args)
        args = checked.validated_parameters
        names = STEPS if args["step"] == ALL else (args["step"],)
        done: list[dict[str, Any]] = []
        for name in names:
            try:
                reply = stepclient.call(
                    served,
                    {
                        "config": args["config"],
                        "appliance": args["appliance"],
                        "request_id": args["request_id"],
                        "step": name,
                        "check": bool(self._task.check_mode),
                        "reissue_otp": args["reissue_otp"],
                    },
                )
            except (stepclient.StepFailed, OSError) as exc:
                if isinstance(exc, stepclient.StepFailed):
                    msg, code, error = str(exc), exc.exit_code, exc.error
                else:
                    msg, code, error = f"hsmctl's step server: {exc}", 1, "OSError"
                if args["step"] == ALL:  # the steps before it stand (each journaled)
                    result.update(failed_step=name, steps=done)
                    msg = f"{name}: {msg}"
                result.update(failed=True, msg=msg, exit_code=code, error=error)
                return result
            if not self._task.diff:
                reply.pop("diff", None)
            done.append({"changed": bool(reply.pop("changed", False)), "step": name, **reply})
        if args["step"] == ALL:
            result.update(changed=any(r["changed"] for r in done), step=ALL, steps=done)
        else:
            result.update(done[0])
        return result
