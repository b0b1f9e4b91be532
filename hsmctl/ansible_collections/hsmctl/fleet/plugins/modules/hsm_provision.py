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
options:
  step:
    description: verify, attach, network, monitor or handoff
    required: true
    type: str
    choices: [verify, attach, network, monitor, handoff]
  config:
    description: Path of the hsmctl configuration file (provider side).
    required: true
    type: path
  appliance:
    description: Appliance id.
    required: true
    type: str
  request_id:
    description: The provisioning request the appliance is allocated to.
    required: true
    type: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402 - Ansible wants DOCUMENTATION first


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "step": {
                "type": "str",
                "required": True,
                "choices": ["verify", "attach", "network", "monitor", "handoff"],
            },
            "config": {"type": "path", "required": True},
            "appliance": {"type": "str", "required": True},
            "request_id": {"type": "str", "required": True},
        },
        supports_check_mode=True,
    )
    try:
        from hsmctl.errors import HsmctlError
        from hsmctl.provider import provisioning
    except ImportError as exc:  # the interpreter is not hsmctl's virtualenv
        module.fail_json(msg=f"hsmctl is not importable: {exc}")
        return
    p = module.params
    try:
        result = provisioning.run_step(
            p["config"], p["appliance"], p["request_id"], p["step"], check=module.check_mode
        )
    except HsmctlError as exc:
        module.fail_json(msg=str(exc), exit_code=exc.exit_code, error=type(exc).__name__)
        return
    module.exit_json(**result)


if __name__ == "__main__":
    main()
