"""The ownership transfer as a one-way fact (issue 10, defect 1): no write of the owner
file clears it, the first change is recognised from the shadow entry, and only a caller
that is root without sshd is the console (defect 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsmctl.appliance import daemon, origin, paths, store
from hsmctl.appliance.roles import Access, Role
from hsmctl.contract import OwnerState

pytestmark = pytest.mark.unit


@pytest.fixture
def device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(paths, "OWNER", tmp_path / "owner.json")
    monkeypatch.setattr(paths, "OWNED", tmp_path / "customer-owned.json")
    monkeypatch.setattr(paths, "SHADOW", tmp_path / "shadow")
    (tmp_path / "shadow").write_text("root:*:1::::::\nadmin:$y$otp-hash:1::::::\n")
    return tmp_path


def provisioned() -> store.Owner:
    owner = store.Owner(state=OwnerState.PROVISIONED, otp_expires=1.0)
    owner.otp_hash = store.shadow_hash("admin")
    owner.save()
    return owner


def test_no_owner_write_clears_the_fact(device: Path) -> None:
    provisioned()
    store.record_ownership(5.0)
    # A handler that loaded the owner before the transfer and saves it after it.
    stale = store.Owner(state=OwnerState.PROVISIONED, provider_access=True)
    with pytest.raises(store.OwnershipError):
        stale.save()
    # Even an owner file edited behind the daemon's back does not bring the provider back.
    raw = json.loads((device / "owner.json").read_text())
    raw.update(state="provisioned", provider_access=True, otp_expires=1.0)
    (device / "owner.json").write_text(json.dumps(raw))
    owner = store.Owner.load()
    assert owner.state is OwnerState.CUSTOMER_OWNED and owner.provider_access is False
    assert owner.device_state().customer_owned
    assert not owner.otp_expired  # the one-time password never expires mid-transfer
    store.clear_ownership()  # the out-of-band factory reset
    assert store.Owner.load().state is OwnerState.PROVISIONED


def test_a_crash_between_the_password_and_the_flag_is_recognised(device: Path) -> None:
    provisioned()
    store.record_ownership(5.0)
    owner = store.Owner.load()
    owner.state = OwnerState.CUSTOMER_OWNED
    owner.save()
    # Crash before chpasswd: the admin must still finish the change.
    assert not store.Owner.load().device_state().otp_changed
    # Crash after chpasswd, before otp_changed was saved: the shadow entry moved.
    (device / "shadow").write_text("root:*:1::::::\nadmin:$y$new-hash:1::::::\n")
    assert store.Owner.load().device_state().otp_changed


def test_only_root_without_sshd_is_the_console(monkeypatch: pytest.MonkeyPatch) -> None:
    class Pw:
        pw_name = "console"

    monkeypatch.setattr(daemon.pwd, "getpwuid", lambda uid: Pw())
    monkeypatch.setattr(origin, "origin_of", lambda pid: origin.LOCAL)
    caller = daemon.identify(1234, 1001)  # a non-root account named "console"
    assert caller.role is None
    root = daemon.identify(1234, 0)
    assert root.role is Role.CONSOLE and root.interface is Access.CONSOLE
