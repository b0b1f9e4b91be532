#!/usr/bin/python
"""Ansible module: the takeover of one appliance (SPEC §7), through the hsmctl library.

Runs on the controller, which sits inside the tenant network (the customer's VM; in the
lab ``ip netns exec CLIENT_NETNS``). Its arguments are references only: the tenant's
hsmctl configuration, the hand-off bundle, optional secret *files* (0600) for the new
admin password and the PINs. Secrets not given are generated and escrowed in the
customer's state directory by the library; none is ever an argument, a fact or a result.
Rerunning the play finishes interrupted takeovers (the journal is keyed by bundle).
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: hsm_takeover
short_description: Take one dedicated HSM appliance over from the provider
description:
  - Runs hsmctl's journaled takeover for the appliance named in the hand-off bundle
    (password change, provider access revoked, host keys rotated, token initialised,
    audit key rotated, collector key installed, proofs, signed receipt).
  - Idempotent and resumable; a finished takeover returns its receipt unchanged.
  - Runs on the controller (inside the tenant network) with the Python that runs Ansible,
    which must have hsmctl installed. Only references go in (files); secrets not given
    are generated and escrowed in the tenant's state directory, never returned.
author:
  - hsmctl maintainers (!UNKNOWN)
version_added: "0.1.0"
attributes:
  check_mode:
    support: full
    description:
      - Opens and verifies the bundle and reads the tenant's journal; no connection to the
        device, nothing written. C(changed=false) only when this bundle's takeover
        already finished.
  diff_mode:
    support: none
    description: Nothing a takeover changes is shown as a diff (secrets and keys).
notes:
  - Use with C(connection=local) and C(ansible_python_interpreter) set to
    C({{ ansible_playbook_python }}), as C(hsmctl.fleet.takeover) does.
options:
  handoff:
    description: The hand-off bundle from the provider.
    required: true
    type: path
  config:
    description: The tenant's hsmctl configuration (default $HSMCTL_CONFIG, /etc/hsmctl).
    type: path
  identity:
    description: Tenant identity (OpenSSH private key); default from the configuration.
    type: path
  new_password_file:
    description: File (0600) holding the new admin password; default generated.
    type: path
  so_pin_file:
    description: File (0600) holding the token's SO PIN; default generated.
    type: path
  co_pin_file:
    description: File (0600) holding the crypto-officer PIN; default generated.
    type: path
  keep_monitor:
    description: Keep the provider's health monitoring account enabled.
    type: bool
    default: false
  clients:
    description:
      - Application clients to register as part of the takeover, each C(NAME:ROLE) with
        ROLE crypto-officer or crypto-user (hsmctl takeover --client). Their kits go to
        the state directory. Default none.
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- name: Take the appliance over with generated secrets
  hsmctl.fleet.hsm_takeover:
    handoff: /home/ops/handoff/hsm29-7f3c.json

- name: Take it over with a chosen admin password and register an application client
  hsmctl.fleet.hsm_takeover:
    handoff: "{{ hsm_handoff }}"
    config: /etc/hsmctl/hsmctl.yaml
    new_password_file: /root/secrets/hsm29-admin
    clients:
      - app1:crypto-user
  register: hsm_takeover_result
"""

RETURN = r"""
appliance:
  description: Appliance id.
  type: str
  returned: success
  sample: hsm29
state:
  description: The owner state after the takeover.
  type: str
  returned: success (in check mode only when the takeover had already finished)
  sample: customer-owned
receipt:
  description: Path of the signed takeover receipt.
  type: str
  returned: success (in check mode only when the takeover had already finished)
steps:
  description: The steps this run did (empty when the takeover had already finished, and
    in check mode).
  type: list
  elements: str
  returned: success
clients:
  description: The application clients registered (client, role, kit).
  type: list
  elements: dict
  returned: success and not in check mode
exit_code:
  description: hsmctl's exit code for the failure (SPEC section 6).
  type: int
  returned: failure
  sample: 3
error:
  description: The hsmctl error class of the failure.
  type: str
  returned: failure
"""

from pathlib import Path  # noqa: E402 - Ansible wants DOCUMENTATION first

from ansible.module_utils.basic import AnsibleModule  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "handoff": {"type": "path", "required": True},
            "config": {"type": "path"},
            "identity": {"type": "path"},
            "new_password_file": {"type": "path", "no_log": False},  # a path, not the secret
            "so_pin_file": {"type": "path", "no_log": False},  # a path, not the secret
            "co_pin_file": {"type": "path", "no_log": False},  # a path, not the secret
            "keep_monitor": {"type": "bool", "default": False},
            "clients": {"type": "list", "elements": "str", "default": []},
        },
        supports_check_mode=True,
    )
    try:
        from hsmctl.clients.request import parse_clients
        from hsmctl.customer.context import open_tenant_context
        from hsmctl.errors import HsmctlError
        from hsmctl.secret import read_secret_file
        from hsmctl.takeover.workflow import Options, Takeover, preview
    except ImportError as exc:  # the interpreter is not hsmctl's virtualenv
        module.fail_json(msg=f"hsmctl is not importable: {exc}")
        return
    p = module.params
    try:
        files = {
            name: read_secret_file(p[name], what=name) if p[name] else None
            for name in ("new_password_file", "so_pin_file", "co_pin_file")
        }
        opts = Options(
            handoff=Path(p["handoff"]),
            new_password=files["new_password_file"],
            so_pin=files["so_pin_file"],
            co_pin=files["co_pin_file"],
            keep_monitor=p["keep_monitor"],
            clients=parse_clients(p["clients"]),
        )
        ctx = open_tenant_context(p["config"], p["identity"])
        if module.check_mode:
            module.exit_json(steps=[], **preview(ctx, opts))
            return
        run = Takeover(ctx, opts)
        result = run.run()
    except HsmctlError as exc:
        module.fail_json(msg=str(exc), exit_code=exc.exit_code, error=type(exc).__name__)
        return
    module.exit_json(changed=bool(run.ran), steps=[s.value for s in run.ran], **result)


if __name__ == "__main__":
    main()
