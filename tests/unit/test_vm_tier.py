"""The Vagrant tier's pure parts (issue 16): the factory record on the kernel command
line (hostile input included), the address plan, the fabric's parsing of virsh, the
QEMU settings and the emulator wrapper, and the uplink capture's filter."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmctl.appliance.boot import factory_from_cmdline
from hsmctl.lab import plan as ns_plan
from hsmctl.lab.vm import control, host
from hsmctl.lab.vm import plan as vm_plan
from hsmctl.lab.vm.fabric import parse_domiflist
from tests.vm.test_vagrant import UplinkCapture

pytestmark = pytest.mark.unit


def _blob(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def test_factory_record_is_read_from_the_kernel_command_line() -> None:
    record = {"id": "hsm01", "serial": "VM000001", "mgmt": {"iface": "mgmt0"}}
    line = f"root=/dev/vda rw console=ttyS0 hsmctl.factory={_blob(record)} quiet"
    assert factory_from_cmdline(line) == record
    assert factory_from_cmdline("root=/dev/vda rw") is None


@pytest.mark.parametrize(
    "word",
    [
        "hsmctl.factory=",
        "hsmctl.factory=!!!",
        "hsmctl.factory=" + _blob([1, 2]),
        "hsmctl.factory=" + _blob("text"),
        "hsmctl.factory=" + base64.urlsafe_b64encode(b"\xff\xfe{").decode(),
    ],
)
def test_a_malformed_factory_record_is_no_record(word: str) -> None:
    assert factory_from_cmdline(f"root=/dev/vda {word}") is None


@given(st.text(max_size=300))
def test_any_command_line_gives_a_mapping_or_nothing(line: str) -> None:
    result = factory_from_cmdline(line)
    assert result is None or isinstance(result, dict)


def test_the_vm_plan_stays_apart_from_the_namespace_lab() -> None:
    plan = vm_plan.make_plan(vm_plan.MAX_TENANTS, vm_plan.MAX_APPLIANCES)
    ns = ns_plan.make_plan(ns_plan.MAX_TENANTS, ns_plan.MAX_APPLIANCES)
    ns_nets = [ns.mgmt_net] + [v.cidr for t in ns.tenants for v in t.vnets]
    vm_nets = [plan.mgmt_net] + [v.cidr for t in plan.tenants for v in t.vnets]
    for net in vm_nets:
        assert net.subnet_of(vm_plan.VM_RANGE)
        assert net.subnet_of(ipaddress.IPv4Network("198.18.0.0/15"))
        assert not any(net.overlaps(other) for other in ns_nets), net
    assert len({str(n) for n in vm_nets}) == len(vm_nets)
    macs = [v.mgmt_mac for v in vm_plan.vm_appliances(plan)]
    macs += [v.data_mac for v in vm_plan.vm_appliances(plan)]
    assert len(set(macs)) == len(macs)
    first = vm_plan.vm_appliances(plan)[0]
    assert (first.plan.mgmt_ip, first.domain) == (
        ipaddress.IPv4Address("198.18.200.11"),
        "hsmvm-hsm01",
    )


@pytest.mark.parametrize(("tenants", "appliances"), [(0, 1), (5, 1), (1, 0), (1, 9)])
def test_vm_sizes_out_of_range_are_refused(tenants: int, appliances: int) -> None:
    from hsmctl.errors import UsageError

    with pytest.raises(UsageError):
        vm_plan.make_plan(tenants, appliances)


def test_appliances_are_pre_wired_round_robin_to_tenants() -> None:
    plan = vm_plan.make_plan(2, 4)
    assert [v.tenant for v in vm_plan.vm_appliances(plan)] == [
        "tenant1",
        "tenant2",
        "tenant1",
        "tenant2",
    ]


def test_domiflist_is_parsed_by_mac() -> None:
    text = (
        " vnet0   network   hsmvm-mgmt   virtio   52:54:00:18:c8:01\n"
        " vnet1   network   hsmvm-t1     virtio   52:54:00:18:c9:01\n"
    )
    assert parse_domiflist(text, "52:54:00:18:c9:01") == "hsmvm-t1"
    assert parse_domiflist(text, "52:54:00:18:C8:01") == "hsmvm-mgmt"
    assert parse_domiflist(text, "52:54:00:18:c9:02") is None
    assert parse_domiflist("garbage\n\n", "52:54:00:18:c9:01") is None


def test_qemu_runs_as_root_and_the_edit_is_idempotent(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# comment\n#user = "libvirt-qemu"\n#group = "libvirt-qemu"\nother = 1\n')
    assert host.configure_qemu(conf) is True
    text = conf.read_text()
    assert 'user = "root"' in text and 'group = "root"' in text and "other = 1" in text
    assert host.configure_qemu(conf) is False
    bare = tmp_path / "bare.conf"
    bare.write_text("")
    host.configure_qemu(bare)
    assert 'user = "root"' in bare.read_text()


def test_the_emulator_wrapper_shrinks_only_the_tcg_cache(tmp_path: Path) -> None:
    wrapper = tmp_path / "qemu"
    wrapper.write_text(control.EMULATOR.replace("/usr/bin/qemu-system-x86_64", "printf '%s\\n'"))
    wrapper.chmod(0o755)
    argv = ["-name", "guest=x", "-accel", "tcg", "-append", "a b", "-accel", "kvm"]
    out = subprocess.run([str(wrapper), *argv], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "-name",
        "guest=x",
        "-accel",
        "tcg,tb-size=128",
        "-append",
        "a b",
        "-accel",
        "kvm",
    ]


def _ipv4_frame(src: str, dst: str, mac: bytes = b"\x02\x00\x00\x00\x00\x01") -> bytes:
    header = b"\x45" + b"\x00" * 11 + ipaddress.IPv4Address(src).packed
    header += ipaddress.IPv4Address(dst).packed
    return mac + b"\x02\x00\x00\x00\x00\x02" + struct.pack("!H", 0x0800) + header


def test_the_capture_flags_lab_addresses_and_vm_macs_only() -> None:
    assert UplinkCapture.offends(_ipv4_frame("10.0.0.1", "93.184.216.34")) is None
    assert UplinkCapture.offends(_ipv4_frame("10.0.0.1", "198.18.200.11"))
    assert UplinkCapture.offends(_ipv4_frame("198.19.0.5", "10.0.0.1"))
    vm_mac = bytes.fromhex("52540018c901")
    assert UplinkCapture.offends(_ipv4_frame("10.0.0.1", "10.0.0.2", vm_mac))
    arp = b"\xff" * 6 + b"\x02" * 6 + struct.pack("!H", 0x0806) + b"\x00" * 14
    arp += ipaddress.IPv4Address("10.0.0.1").packed + b"\x00" * 6
    arp += ipaddress.IPv4Address("198.18.208.5").packed
    assert UplinkCapture.offends(arp)
    assert UplinkCapture.offends(b"\x00" * 5) is None


def test_the_vm_cleanup_never_runs_over_another_labs_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A namespace lab's record (its route, its directory) is never the VM tier's to
    remove: vm.down refuses before touching anything."""
    from hsmctl.errors import ConflictError
    from hsmctl.lab import workdir

    touched: list[str] = []
    monkeypatch.setattr(workdir, "require_root", lambda: None)
    monkeypatch.setattr(workdir, "load_state", lambda: {"phase": "up", "tenants": 2})
    monkeypatch.setattr(control, "_vagrant", lambda *a, **k: touched.append("vagrant"))
    monkeypatch.setattr(control.shutil, "rmtree", lambda *a, **k: touched.append("rmtree"))
    with pytest.raises(ConflictError):
        control.down()
    assert touched == []


def test_guest_agent_replies_are_device_bytes() -> None:
    """Malformed replies are integrity failures (exit 3), never a traceback; an error
    reply fails the command without echoing what the device said beyond its reason."""
    from hsmctl.errors import CommandFailed, IntegrityError
    from hsmctl.lab.vm import console

    assert console.parse_reply("d", '{"return": {"pid": 7}}') == {"return": {"pid": 7}}
    for bad in ("", "{", "[1]", '"x"', "1", "{" * 10_000, "[" * 100_000):
        with pytest.raises(IntegrityError):
            console.parse_reply("d", bad)
    with pytest.raises(CommandFailed):
        console.parse_reply("d", '{"error": {"class": "GenericError", "desc": "nope"}}')
    good = {"exited": True, "exitcode": 3, "out-data": "aGk=", "err-data": ""}
    assert console.exec_result("d", good) == (3, b"hi", b"")
    assert console.exec_result("d", {"exited": True, "signal": 9})[0] == 137
    for bad_status in (
        None,
        [],
        {"exitcode": "0"},
        {"exitcode": True},
        {"exitcode": -1},
        {"exitcode": 0, "out-data": "!!"},
        {"exitcode": 0, "err-data": 5},
        {"signal": "x"},
    ):
        with pytest.raises(IntegrityError):
            console.exec_result("d", bad_status)


@given(st.text(max_size=200))
def test_any_agent_reply_parses_or_is_refused(text: str) -> None:
    from hsmctl.errors import CommandFailed, IntegrityError
    from hsmctl.lab.vm import console

    with contextlib.suppress(IntegrityError, CommandFailed):
        assert isinstance(console.parse_reply("d", text), dict)


def test_persisted_lists_only_the_tiers_definitions_on_disk(tmp_path: Path) -> None:
    (tmp_path / "networks" / "autostart").mkdir(parents=True)
    for name in ("hsmvm-hsm01.xml", "other-vm.xml", "hsmvmx.xml"):
        (tmp_path / name).write_text("<domain/>")
    for name in ("hsmvm-mgmt.xml", "hsmvm-t1.xml", "default.xml"):
        (tmp_path / "networks" / name).write_text("<network/>")
    (tmp_path / "networks" / "autostart" / "hsmvm-t2.xml").write_text("<network/>")
    assert host.persisted("hsmvm", tmp_path) == ["hsmvm-hsm01", "hsmvm-mgmt", "hsmvm-t1"]
    assert host.persisted("hsmvm", tmp_path / "absent") == []


def test_a_leftover_blackhole_is_refused_not_taken_as_another_labs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lab range's blackhole with no namespace lab behind it is a leftover: lab up
    asks for lab down first (as the namespace lab does) instead of sharing it — and then
    leaving it behind at its own lab down. Beside a namespace lab, the route is shared."""
    from hsmctl.errors import ConflictError

    monkeypatch.setattr(control.safety, "blackhole_present", lambda rng: True)
    monkeypatch.setattr(control.netns, "list_netns", lambda prefix="": [])
    with pytest.raises(ConflictError, match="left from an earlier run"):
        control._check_vm_range_free()
    monkeypatch.setattr(control.netns, "list_netns", lambda prefix="": ["hsmlab-t1-client"])
    monkeypatch.setattr(control.netns, "ip_json", lambda *args: [])
    assert control._check_vm_range_free() is True
