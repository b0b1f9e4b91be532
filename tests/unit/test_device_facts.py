"""Device facts from recorded outputs (``data/device/*.json``: command, the reply as the
firmware wrote it, the typed value expected), and hostile replies: every one an
IntegrityError (exit 3) naming the appliance, never a KeyError or a wrong exit code."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

import pytest

from hsmctl import device
from hsmctl.contract import OwnerState
from hsmctl.device import Fact
from hsmctl.errors import IntegrityError

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "device"
FACTS: dict[str, Fact[Any]] = {
    f.command: f
    for f in (
        device.HSM_INFO,
        device.HOST_KEYS,
        device.STAGE_HOST_KEYS,
        device.AUDIT_KEY,
        device.ROTATE_AUDIT_KEY,
        device.PROVIDER_ACCESS,
        device.CLIENTS,
        device.NETWORK,
    )
}
CASES = sorted(DATA.glob("*.json"))


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def test_every_fact_has_a_recorded_output() -> None:
    recorded = {json.loads(p.read_text())["command"] for p in CASES}
    assert recorded == set(FACTS)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_recorded_output(path: Path) -> None:
    case = json.loads(path.read_text())
    fact = FACTS[case["command"]]
    value = fact.process(case["output"], "hsm01")
    assert {k: _plain(v) for k, v in dataclasses.asdict(value).items()} == case["expected"]
    # The same bytes parse the same way (the SSH transport hands over str or bytes).
    assert fact.process(case["output"].encode(), "hsm01") == value


def _recorded(command: str, state: str = "") -> dict[str, Any]:
    name = command.replace(" ", "-") + (f".{state}" if state else "") + ".json"
    out: dict[str, Any] = json.loads(json.loads((DATA / name).read_text())["output"])
    return out


def test_typed_values_read_as_the_workflows_need_them() -> None:
    info = device.HSM_INFO.process(json.dumps(_recorded("hsm show", "customer-owned")))
    assert info.owner_state is OwnerState.CUSTOMER_OWNED and info.monitor is device.Switch.DISABLED
    access = device.PROVIDER_ACCESS.process(
        json.dumps(_recorded("sysconf provider-access show", "revoked"))
    )
    assert access.revoked
    assert access.as_dict() == _recorded("sysconf provider-access show", "revoked")
    assert not device.PROVIDER_ACCESS.process(
        json.dumps(_recorded("sysconf provider-access show"))
    ).revoked


def _with(command: str, **changes: Any) -> str:
    reply = _recorded(command)
    for key, value in changes.items():
        if value is ...:
            del reply[key]
        else:
            reply[key] = value
    return json.dumps(reply)


def _with_client(**changes: Any) -> str:
    reply = _recorded("client list")
    first = reply["clients"][0]
    for key, value in changes.items():
        if value is ...:
            del first[key]
        else:
            first[key] = value
    return json.dumps(reply)


KEY = _recorded("sysconf hostkey show")["active_keys"][0]
HOSTILE: dict[str, tuple[Fact[Any], str | bytes, str]] = {
    "not JSON": (device.HSM_INFO, "hsm01 ready", "not valid JSON"),
    "not an object": (device.HSM_INFO, "[]", "not a JSON object"),
    "200k [": (device.HSM_INFO, "[" * 200_000, "nested"),
    "duplicate member": (device.HSM_INFO, '{"id":"hsm01","id":"hsm02"}', "duplicate member"),
    "not UTF-8": (device.AUDIT_KEY, b'{"key_id":"\xff"}', "not UTF-8"),
    "id missing": (device.HSM_INFO, _with("hsm show", id=...), "no 'id'"),
    "id null": (device.HSM_INFO, _with("hsm show", id=None), "no 'id'"),
    "owner state unknown": (
        device.HSM_INFO,
        _with("hsm show", owner_state="owned-by-mallory"),
        "'owner_state' is 'owned-by-mallory', not one of 'factory', 'provisioned'",
    ),
    "owner state a list": (
        device.HSM_INFO,
        _with("hsm show", owner_state=["factory"]),
        "'owner_state' is not a string",
    ),
    "flag as a string": (
        device.HSM_INFO,
        _with("hsm show", initialised="false"),
        "'initialised' is not true or false",
    ),
    "count as a flag": (device.HSM_INFO, _with("hsm show", objects=True), "not an integer"),
    "monitor unknown": (device.HSM_INFO, _with("hsm show", monitor="on"), "'monitor' is 'on'"),
    "keys not a list": (
        device.HOST_KEYS,
        _with("sysconf hostkey show", active_keys=KEY),
        "'active_keys' is not a list",
    ),
    "a key of another type": (
        device.HOST_KEYS,
        _with("sysconf hostkey show", staged_keys=[KEY, 7]),
        "'staged_keys' is not a list of strings",
    ),
    "a key that is no key": (
        device.HOST_KEYS,
        _with("sysconf hostkey show", active_keys=["ssh-ed25519 bm90IGEga2V5"]),
        "'active_keys' holds what is no SSH public key",
    ),
    "a key of one type said to be another": (
        device.HOST_KEYS,
        _with("sysconf hostkey show", active_keys=["ssh-rsa " + KEY.split()[1]]),
        "'active_keys' holds what is no SSH public key",
    ),
    "staged missing": (device.STAGE_HOST_KEYS, "{}", "no 'staged'"),
    "audit key id a number": (
        device.AUDIT_KEY,
        _with("audit key show", key_id=42),
        "'key_id' is not a string",
    ),
    "rotation seq a string": (
        device.ROTATE_AUDIT_KEY,
        json.dumps({"key_id": "k", "public_key": "p", "previous_key_id": "o", "rotation_seq": "9"}),
        "'rotation_seq' is not an integer",
    ),
    "5000-digit seq": (
        device.ROTATE_AUDIT_KEY,
        '{"rotation_seq":' + "9" * 5000 + "}",
        "not valid JSON",
    ),
    "provider flag missing": (
        device.PROVIDER_ACCESS,
        _with("sysconf provider-access show", provider_enabled=...),
        "no 'provider_enabled'",
    ),
    "clients not a list": (device.CLIENTS, '{"clients": {}}', "'clients' is not a list"),
    "a client that is no object": (
        device.CLIENTS,
        '{"clients": ["app1"]}',
        "'clients' is not a list of objects",
    ),
    "a client without a fingerprint": (
        device.CLIENTS,
        _with_client(fingerprint=...),
        "clients[0]: no 'fingerprint'",
    ),
    "a fingerprint that is none": (
        device.CLIENTS,
        _with_client(fingerprint="MD5:00:11"),
        "clients[0]: 'fingerprint' is no SHA256 key fingerprint",
    ),
    "a client listed twice": (
        device.CLIENTS,
        json.dumps({"clients": [_recorded("client list")["clients"][0]] * 2}),
        "a client is listed twice",
    ),
    "register answers no name": (
        device.register_client("app1", "crypto-user"),
        json.dumps({"role": "crypto-user", "fingerprint": "SHA256:" + "A" * 43, "registered": "t"}),
        "no 'client'",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_replies_are_integrity_errors_naming_the_appliance(
    case: tuple[Fact[Any], str | bytes, str],
) -> None:
    fact, output, message = case
    with pytest.raises(IntegrityError) as err:
        fact.process(output, "hsm-7")
    assert err.value.exit_code == 3
    assert str(err.value).startswith(f"hsm-7: reply to {fact.command!r}: "), err.value
    assert message in str(err.value)
    assert err.value.detail == {"appliance": "hsm-7", "what": f"reply to {fact.command!r}"}


def test_the_path_a_reply_came_by_is_named() -> None:
    with pytest.raises(IntegrityError) as err:
        device.HSM_INFO.process("{}", "hsm-7", via="console reply")
    assert str(err.value) == "hsm-7: console reply to 'hsm show': no 'id'"


def test_clients_read_as_the_takeover_needs_them() -> None:
    listed = device.CLIENTS.process(json.dumps(_recorded("client list")), "hsm12")
    app1 = listed.named("app1")
    assert app1 is not None and app1.role == "crypto-officer"
    assert app1.as_dict() == {
        "client": "app1",
        "role": "crypto-officer",
        "fingerprint": _recorded("client list")["clients"][0]["fingerprint"],
    }
    assert listed.named("app3") is None
    assert device.CLIENTS.process('{"clients": []}').clients == ()
    # client register answers the same fields, the name as "client" (the firmware's reply).
    reply = {"client": "app1", "account": "p11-app1", "key_type": "ED25519 256"}
    reply |= {k: v for k, v in _recorded("client list")["clients"][0].items() if k != "name"}
    fact = device.register_client("app1", "crypto-officer")
    assert fact.command == "client register app1 --role crypto-officer"
    assert fact.process(json.dumps(reply)) == app1


def test_extra_fields_are_ignored() -> None:
    # A newer firmware may say more; what this client reads is unchanged.
    reply = _recorded("hsm show") | {"temperature": 41}
    assert device.HSM_INFO.process(json.dumps(reply)).id == "hsm01"


class _Conn:
    def run(self, command: str) -> Any:
        assert command == "audit key show"
        return dataclasses.make_dataclass("R", ["stdout"])(json.dumps(_recorded(command)))


def test_a_fact_runs_its_command_on_a_connection() -> None:
    assert device.AUDIT_KEY.on(_Conn(), "hsm01").key_id == _recorded("audit key show")["key_id"]


def test_the_network_is_read_as_provisioning_needs_it() -> None:
    configured = device.NETWORK.process(_recorded_text("network show"), "hsm29")
    assert (configured.address, configured.gateway) == ("198.19.0.229/24", "198.19.0.1")
    assert configured.is_live("198.19.0.229/24")
    assert not configured.is_live("198.19.0.230/24") and not configured.is_live("198.18.0.39/24")
    factory = device.NETWORK.process(_recorded_text("network show", "factory"), "hsm29")
    assert (factory.address, factory.gateway) == (None, None)
    assert not factory.is_live("198.19.0.229/24")
    with pytest.raises(IntegrityError, match=r"hsm29: .*'data' is not an object"):
        device.NETWORK.process('{"data": [], "interfaces": []}', "hsm29")
    with pytest.raises(IntegrityError, match=r"data: 'address' is not a string"):
        device.NETWORK.process('{"data": {"address": 7}, "interfaces": []}', "hsm29")


def _recorded_text(command: str, state: str = "") -> str:
    name = command.replace(" ", "-") + (f".{state}" if state else "") + ".json"
    return str(json.loads((DATA / name).read_text())["output"])
