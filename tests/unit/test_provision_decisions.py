"""Provisioning's decisions that make its modules tell the truth (issue 13): when the
one-time password is issued, kept or refused. Pure; the lab tests run them for real."""

from __future__ import annotations

import pytest

from hsmctl.contract import OwnerState
from hsmctl.provider.provisioning import HandoffAction, decide_handoff

pytestmark = pytest.mark.unit

ISSUE, KEEP = HandoffAction.ISSUE, HandoffAction.KEEP
P, F = OwnerState.PROVISIONED, OwnerState.FACTORY


@pytest.mark.parametrize(
    ("owner", "handed_off", "reissue", "expect"),
    [
        (F, False, False, ISSUE),  # first hand-off
        (F, True, False, ISSUE),  # the device was reset since: its OTP is gone
        (P, True, False, KEEP),  # a rerun (any host): the tenant may hold this bundle
        (P, False, False, ISSUE),  # interrupted after `otp set`, before the journal's ok
        (P, True, True, ISSUE),  # told to
        (F, False, True, ISSUE),
    ],
)
def test_decide_handoff(
    owner: OwnerState, handed_off: bool, reissue: bool, expect: HandoffAction
) -> None:
    assert decide_handoff(owner, handed_off, reissue) is expect
