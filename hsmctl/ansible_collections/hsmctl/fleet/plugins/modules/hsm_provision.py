#!/usr/bin/python
"""Ansible module: one provisioning step for one appliance, through the hsmctl library.

Runs on the controller. Its arguments are references only (config path, appliance id,
request id); the one-time password it makes never leaves the library except encrypted
to the tenant inside the hand-off bundle.
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: hsm_provision
short_description: Run one hsmctl provisioning step for one appliance
description:
  - Runs one step of hsmctl's journaled provisioning (SPEC section 6) for an appliance
    the provider's state store has allocated to a request - C(verify) (pinned management
    host key, the device's identity and factory state), C(attach) (the data port onto the
    tenant subnet, through the network fabric), C(network) (the data interface address),
    C(monitor) (health monitoring with the provider's monitoring key) or C(handoff) (the
    tenant key and a one-time password on the device, the signed hand-off bundle).
  - Runs on the controller with the Python that runs Ansible, which must have hsmctl
    installed; its arguments are references only. The one-time password never leaves the
    hsmctl library except encrypted to the tenant inside the bundle.
  - Every step is journaled in the state store and idempotent; C(hsmctl provision)
    allocates the appliance and runs C(hsmctl.fleet.provision) with this module.
author:
  - hsmctl maintainers (!UNKNOWN)
version_added: "0.1.0"
options:
  step:
    description:
      - The provisioning step to run.
      - V(all) runs the five in order (verify, attach, network, monitor, handoff), each
        journaled as when it runs alone, and stops at the first that fails; each step's
        result is in RV(steps). C(hsmctl.fleet.provision) runs it as its only task per
        appliance when C(hsmctl provision) runs the playbook (tag C(hsmctl_served)); a
        plain C(ansible-playbook) or AWX run of the playbook runs the five steps as five
        tasks.
    required: true
    type: str
    choices: [verify, attach, network, monitor, handoff, all]
  config:
    description: Path of the hsmctl provider configuration file.
    required: true
    type: path
  appliance:
    description: Appliance id (the inventory host name).
    required: true
    type: str
  request_id:
    description: The provisioning request the appliance is allocated to.
    required: true
    type: str
  reissue_otp:
    description:
      - For O(step=handoff) - make a new one-time password and bundle even when the
        appliance already holds the one-time password of this request's finished
        hand-off.
      - Without it such a hand-off is left as it is (C(changed=false), the journaled
        bundle path returned) - a password the tenant may hold is never silently
        replaced.
      - When the task (and its C(module_defaults)) gives none, the action plugin of the
        same name takes the value of the variable C(hsm_reissue_otp) (extra vars,
        inventory, play or task variables, with Ansible's precedence), else V(false).
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description:
      - Reads the device, the fabric and the state store, reports what would change, and
        changes nothing; nothing is journaled.
  diff_mode:
    support: full
    description: The data port's attachment, the network settings and the monitoring account.
notes:
  - Use with C(connection=local) and C(ansible_python_interpreter) set to
    C({{ ansible_playbook_python }}), as C(hsmctl.fleet.provision) does.
  - An action plugin of the same name runs first. When C(hsmctl provision) serves the
    steps (the C(HSMCTL_STEP_SOCKET) environment variable names its socket), the plugin
    forwards the step from Ansible's worker and no module process starts; otherwise it
    runs this module as usual.
"""

EXAMPLES = r"""
- name: Verify the appliance (pinned management host key, factory state)
  hsmctl.fleet.hsm_provision:
    step: verify
    config: /etc/hsmctl/hsmctl.yaml
    appliance: "{{ inventory_hostname }}"
    request_id: "{{ hsm_request_id }}"

- name: Write the hand-off bundle, with a new one-time password even if one was handed off
  hsmctl.fleet.hsm_provision:
    step: handoff
    config: "{{ hsm_config }}"
    appliance: "{{ inventory_hostname }}"
    request_id: "{{ hsm_request_id }}"
    reissue_otp: true
  register: hsm_handoff
"""

RETURN = r"""
step:
  description: The step that ran (V(all) for the five).
  type: str
  returned: success
  sample: handoff
steps:
  description:
    - For O(step=all), the result of each step that ran, in order, each with its RV(step)
      and the keys that step returns alone; on a failure, the steps before the one that
      failed.
  type: list
  elements: dict
  returned: step is all
failed_step:
  description: For O(step=all), the step that failed.
  type: str
  returned: failure of step all
  sample: network
owner_state:
  description: The device's owner state as C(verify) found it.
  type: str
  returned: step is verify
  sample: factory
attached:
  description: The tenant/vnet/subnet the data port is (or in check mode would be) on.
  type: str
  returned: step is attach
  sample: tenant1/vnet1/hsm
address:
  description: The data interface address (CIDR) set on the device.
  type: str
  returned: step is network
  sample: 198.19.0.229/24
gateway:
  description: The data interface's gateway (the subnet's first address).
  type: str
  returned: step is network
  sample: 198.19.0.1
diff:
  description: Before and after, for attach, network and monitor (shown with --diff).
  type: dict
  returned: step is attach, network or monitor and diff mode is on
handoff:
  description: Path of the signed hand-off bundle (in check mode, where it would be).
  type: str
  returned: step is handoff
  sample: /var/lib/hsmctl/handoff/tenant1/hsm29-7f3c.json
reissued:
  description: Whether this replaced a one-time password the device already held.
  type: bool
  returned: step is handoff
data_host_keys:
  description: The data interface's host keys, pinned in the store and in the bundle.
  type: list
  elements: str
  returned: step is handoff and a bundle was written
exit_code:
  description: hsmctl's exit code for the failure (SPEC section 6).
  type: int
  returned: failure
  sample: 5
error:
  description: The hsmctl error class of the failure.
  type: str
  returned: failure
  sample: ConflictError
"""

from typing import Any  # noqa: E402 - Ansible wants DOCUMENTATION first

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 - Ansible wants DOCUMENTATION first

# The action plugin of the same name (plugins/action/hsm_provision.py) checks a served
# step's arguments with the same spec (a unit test keeps the two equal).
ARGUMENT_SPEC = {
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


class _Failed(Exception):
    def __init__(self, msg: str, exit_code: int, error: str) -> None:
        super().__init__(msg)
        self.msg, self.exit_code, self.error = msg, exit_code, error


def _run(module: AnsibleModule, stepclient: Any, step: str) -> dict[str, Any]:
    """One step's result; raises _Failed."""
    p = module.params
    served = stepclient.served_socket()
    if served is not None:
        # Run by hsmctl provision: the step runs in that process, which has the library
        # loaded (hsmctl.runner.stepserver); this process only asks. (The action plugin
        # asks without starting this module at all; this path is for a module run by
        # other means, e.g. `ansible -m` beside a served run.)
        try:
            result: dict[str, Any] = stepclient.call(
                served,
                {
                    "config": p["config"],
                    "appliance": p["appliance"],
                    "request_id": p["request_id"],
                    "step": step,
                    "check": module.check_mode,
                    "reissue_otp": p["reissue_otp"],
                },
            )
        except stepclient.StepFailed as exc:
            raise _Failed(str(exc), exc.exit_code, exc.error) from None
        except OSError as exc:
            raise _Failed(f"hsmctl's step server: {exc}", 1, "OSError") from None
        return result
    try:
        from hsmctl.errors import HsmctlError
        from hsmctl.provider import provisioning
    except ImportError as exc:  # the interpreter is not hsmctl's virtualenv
        raise _Failed(f"hsmctl is not importable: {exc}", 1, "ImportError") from None
    try:
        return provisioning.run_step(
            p["config"],
            p["appliance"],
            p["request_id"],
            step,
            check=module.check_mode,
            reissue_otp=p["reissue_otp"],
        )
    except HsmctlError as exc:
        raise _Failed(str(exc), exc.exit_code, type(exc).__name__) from None


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    try:
        from hsmctl.runner import stepclient
    except ImportError as exc:  # the interpreter is not hsmctl's virtualenv
        module.fail_json(msg=f"hsmctl is not importable: {exc}")
        return
    names = STEPS if p["step"] == ALL else (p["step"],)
    done: list[dict[str, Any]] = []
    for name in names:
        try:
            result = _run(module, stepclient, name)
        except _Failed as exc:
            if p["step"] != ALL:
                module.fail_json(msg=exc.msg, exit_code=exc.exit_code, error=exc.error)
            else:  # the steps before it stand (each is journaled); the rest did not run
                module.fail_json(msg=f"{name}: {exc.msg}", exit_code=exc.exit_code,
                                 error=exc.error, failed_step=name, steps=done)  # fmt: skip
            return
        if not module._diff:
            result.pop("diff", None)
        done.append({"step": name, **result})
    if p["step"] != ALL:
        module.exit_json(**done[0])
    else:
        module.exit_json(step=ALL, changed=any(bool(r.get("changed")) for r in done), steps=done)


if __name__ == "__main__":
    main()
