"""The PKCS#11 service's pure parts: module events -> activity-log records, the URI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hsmctl.appliance import p11service
from hsmctl.appliance.p11service import POLICY, POLICY_NAME, to_record, token_uri

pytestmark = pytest.mark.unit

BASE = {"ts": "2026-12-06T13:47:14.739Z", "client": "app1", "role": "crypto-officer", "pid": 7}


def test_a_refusal_is_denied_with_its_rule() -> None:
    event = {**BASE, "event": "denied", "rule": "rsa-size", "function": "C_GenerateKeyPair",
             "session": 2, "rv": "CKR_KEY_SIZE_RANGE", "bits": 1024}  # fmt: skip
    assert to_record(event) == (
        "pkcs11-call",
        "denied",
        {"bits": 1024, "function": "C_GenerateKeyPair", "rule": "rsa-size",
         "rv": "CKR_KEY_SIZE_RANGE", "session": 2},
    )  # fmt: skip


def test_session_close_keeps_the_operation_counts() -> None:
    ops = {"sign": 3, "verify": 0, "denied": 1}
    event, outcome, detail = to_record(
        {**BASE, "event": "session-close", "session": 1, "reason": "closed", "ops": ops}
    ) or ("", "", {})
    assert (event, outcome) == ("pkcs11-session-close", "ok")
    assert detail == {"session": 1, "reason": "closed", "ops": ops}


@pytest.mark.parametrize(("rv", "outcome"), [("CKR_OK", "ok"), ("CKR_PIN_INCORRECT", "failed")])
def test_logins_never_carry_a_pin(rv: str, outcome: str) -> None:
    record = to_record({**BASE, "event": "login", "session": 1, "user_type": "user", "rv": rv,
                        "pin": "123456", "data": "123456"})  # fmt: skip
    assert record is not None
    assert record[1] == outcome
    assert "123456" not in repr(record)


def test_unknown_events_and_values_are_dropped() -> None:
    assert to_record({**BASE, "event": "whatever"}) is None
    record = to_record({**BASE, "event": "key-generated", "label": "x" * 1000, "id": ["a"],
                        "key_type": "ec", "curve": "P-256"})  # fmt: skip
    assert record is not None
    assert record[2] == {"label": "x" * 256, "key_type": "ec", "curve": "P-256"}


def test_token_uri_is_percent_encoded() -> None:
    assert token_uri("tenant-a.prod_1") == "pkcs11:token=tenant-a.prod_1"
    assert token_uri("a b;c") == "pkcs11:token=a%20b%3Bc"


def test_the_policy_table_names_every_rule_of_the_module() -> None:
    """``hsm policy show`` lists every rule the module refuses by (policy.c's denied
    records), but for the two that are not policy: a malformed call and an unknown role."""
    assert POLICY["policy"] == POLICY_NAME == "fips"
    rules = {r["rule"] for r in POLICY["rules"]}
    source = (Path(p11service.__file__).parent / "p11" / "policy.c").read_text()
    named = set(re.findall(r'deny(?:_num|_dec)?\([^,]+, [^,]+, "([a-z0-9-]+)"', source))
    named |= {"weakening-change", "role-crypto-user"}  # passed to deny() in a variable
    assert len(named) > 20, named  # the pattern still finds the module's rules
    assert named - {"malformed", "role-unknown"} <= rules, sorted(named - rules)
