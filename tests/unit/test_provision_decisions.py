"""Provisioning's decisions that make its modules tell the truth (issue 13): when the
one-time password is issued, kept or refused. Pure; the lab tests run them for real."""

from __future__ import annotations

import pytest

from hsmctl.contract import OwnerState
from hsmctl.provider.provisioning import HandoffAction, decide_handoff

pytestmark = pytest.mark.unit

ISSUE, KEEP, REFUSE = HandoffAction.ISSUE, HandoffAction.KEEP, HandoffAction.REFUSE
P, F = OwnerState.PROVISIONED, OwnerState.FACTORY


@pytest.mark.parametrize(
    ("owner", "bundle", "handed_off", "reissue", "expect"),
    [
        (F, False, False, False, ISSUE),  # first hand-off
        (F, True, True, False, ISSUE),  # the device was reset since: its OTP is gone
        (P, True, True, False, KEEP),  # a rerun: the tenant may hold this bundle
        (P, True, False, False, KEEP),
        (P, False, False, False, ISSUE),  # interrupted after `otp set`, before the bundle
        (P, False, True, False, REFUSE),  # handed off, bundle gone: not silently replaced
        (P, True, True, True, ISSUE),  # told to
        (P, False, True, True, ISSUE),
    ],
)
def test_decide_handoff(
    owner: OwnerState, bundle: bool, handed_off: bool, reissue: bool, expect: HandoffAction
) -> None:
    assert decide_handoff(owner, bundle, handed_off, reissue) is expect
