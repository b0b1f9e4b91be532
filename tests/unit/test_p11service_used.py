"""``pkcs11-disconnect``'s ``used``: what tells a connection that did something from one
that was only opened (an HA group kit's warm standby never needed)."""

from __future__ import annotations

from hsmctl.appliance.p11service import did_something, to_record


def test_start_up_sessions_with_no_operation_are_not_use() -> None:
    for event in ({"event": "session-open", "session": 1, "slot": 5, "mode": "ro"},
                  {"event": "session-close", "session": 1, "ops": {"sign": 0, "find": 0}},
                  {"event": "session-close", "session": 2}):  # fmt: skip
        mapped = to_record(event)
        assert mapped is not None
        assert not did_something(mapped[0], mapped[2]), event


def test_a_login_a_key_event_a_refusal_or_an_operation_is_use() -> None:
    for event in ({"event": "login", "session": 3, "rv": "CKR_OK", "user_type": "user"},
                  {"event": "login", "session": 3, "rv": "CKR_PIN_INCORRECT"},
                  {"event": "key-generated", "label": "k"},
                  {"event": "key-destroyed", "label": "k"},
                  {"event": "denied", "rule": "so-login"},
                  {"event": "session-close", "session": 1, "ops": {"sign": 3}}):  # fmt: skip
        mapped = to_record(event)
        assert mapped is not None
        assert did_something(mapped[0], mapped[2]), event
