"""The namespace lab (issue 2): appliances reachable with pinned keys, per-appliance
accounts and host keys, tenant isolation, the blackhole route."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest

from hsmctl.lab import rig
from tests.conftest import APPLIANCE_SETS, factory_reset, hsmctl

pytestmark = pytest.mark.lab


def pinned_client(known_hosts: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def provider_files(lab: dict[str, Any]) -> tuple[Path, Path]:
    key = Path(lab["provider_key"])
    return key, key.with_name("known_hosts")


def test_status_has_the_spec_keys(lab: dict[str, Any]) -> None:
    assert set(lab) == {"provider_key", "state_dir", "appliances", "tenants"}
    assert {a["stamp"] for a in lab["appliances"]} == {"stamp1", "stamp2"}
    for a in lab["appliances"]:
        assert set(a) == {"id", "stamp", "mgmt_ip"}
    for t in lab["tenants"]:
        assert set(t) == {"name", "client_netns", "client_ip", "identity", "state_dir", "vnets"}
        subnets = [s for v in t["vnets"] for s in v["subnets"]]
        assert any(s["delegated"] for s in subnets) and not all(s["delegated"] for s in subnets)
        assert Path(t["identity"]).read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        conf = Path("/etc/netns") / t["client_netns"] / "hsmctl" / "hsmctl.yaml"
        assert conf.exists()
    assert Path("/etc/hsmctl/hsmctl.yaml").exists()


def provider_logs_in(lab: dict[str, Any], appliances: list[str]) -> None:
    key, known = provider_files(lab)
    pkey = paramiko.Ed25519Key.from_private_key_file(str(key))
    for a in lab["appliances"]:
        if a["id"] not in appliances:
            continue
        client = pinned_client(known)
        client.connect(
            a["mgmt_ip"],
            username="provider",
            pkey=pkey,
            allow_agent=False,
            look_for_keys=False,
            timeout=10,
            banner_timeout=10,
            auth_timeout=10,
        )
        try:
            _, stdout, _ = client.exec_command("hsm show", timeout=20)
            info = json.loads(stdout.read())
            assert stdout.channel.recv_exit_status() == 0
        finally:
            client.close()
        assert info["id"] == a["id"]
        assert info["owner_state"] == "factory"


def test_provider_key_logs_in_with_pinned_host_keys(lab: dict[str, Any]) -> None:
    mine = APPLIANCE_SETS["lab"]
    factory_reset(*mine)
    provider_logs_in(lab, mine)


def test_unpinned_host_key_is_rejected(lab: dict[str, Any], tmp_path: Path) -> None:
    key, known = provider_files(lab)
    a, b = lab["appliances"][0], lab["appliances"][1]
    # Pin b's keys under a's address: a must now look like an impostor.
    lines = [
        line.split(" ", 1)[1]
        for line in known.read_text().splitlines()
        if line.startswith(b["mgmt_ip"] + " ")
    ]
    fake = tmp_path / "known_hosts"
    fake.write_text("".join(f"{a['mgmt_ip']} {rest}\n" for rest in lines))
    client = pinned_client(fake)
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(
            a["mgmt_ip"],
            username="provider",
            key_filename=str(key),
            allow_agent=False,
            look_for_keys=False,
            timeout=10,
        )


def test_provider_password_login_is_refused(lab: dict[str, Any]) -> None:
    _, known = provider_files(lab)
    a = lab["appliances"][0]
    client = pinned_client(known)
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(
            a["mgmt_ip"],
            username="provider",
            password="Provider-Password-1",
            allow_agent=False,
            look_for_keys=False,
            timeout=10,
        )


def console(appliance: str, *argv: str, input: bytes | None = None) -> bytes:
    proc = hsmctl("lab", "console", appliance, "--", *argv, input=input)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_each_appliance_has_its_own_accounts_and_host_keys(lab: dict[str, Any]) -> None:
    ids = [a["id"] for a in lab["appliances"]]
    # One console entry per appliance (the in-process path: a hundred appliances).
    seen = {}
    for i in ids:
        out = rig.console(
            i,
            "sh",
            "-c",
            "cat /etc/ssh/mgmt/ssh_host_ed25519_key.pub; echo ---;"
            " cat /etc/ssh/data/ssh_host_ed25519_key.pub; echo ---; hostname",
        ).stdout.split(b"---\n")
        seen[i] = out
        assert out[2].strip().decode() == i
    keys = {part for out in seen.values() for part in out[:2]}
    assert len(keys) == 2 * len(ids)

    # Other test modules change accounts on their own appliances at the same time: compare
    # only appliances of this module's set.
    ids = APPLIANCE_SETS["lab"]
    shadows = {i: console(i, "cat", "/etc/shadow") for i in ids}
    host_shadow = Path("/etc/shadow").read_bytes()
    first = ids[0]
    console(first, "chpasswd", input=b"monitor:Changed-Only-Here-1\n")
    try:
        assert console(first, "cat", "/etc/shadow") != shadows[first]
        for other in ids[1:]:
            assert console(other, "cat", "/etc/shadow") == shadows[other]
        assert Path("/etc/shadow").read_bytes() == host_shadow
        assert b"monitor:" not in host_shadow
    finally:
        console(first, "usermod", "--password", "*", "monitor")


def _listen(netns: str, ip: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "nc", "-lk", "-s", ip, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return proc


def _reaches(netns: str, ip: str, port: int) -> bool:
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, "nc", "-z", "-w", "2", ip, str(port)],
        capture_output=True,
        check=False,
        timeout=10,
    )
    return proc.returncode == 0


def test_tenants_are_isolated_from_each_other_and_from_management(lab: dict[str, Any]) -> None:
    t_a, t_b = lab["tenants"][0], lab["tenants"][1]
    listener = _listen(t_b["client_netns"], t_b["client_ip"], 7777)
    try:
        b_router = f"hsmlab-t{t_b['name'].removeprefix('tenant')}-vnet1"
        assert _reaches(b_router, t_b["client_ip"], 7777), "B's own network must reach B"
        assert not _reaches(t_a["client_netns"], t_b["client_ip"], 7777)
        for a in lab["appliances"]:
            assert not _reaches(t_a["client_netns"], a["mgmt_ip"], 22)
    finally:
        listener.kill()
        listener.wait()


def test_unassigned_lab_address_fails_at_once_from_the_host(lab: dict[str, Any]) -> None:
    routes = subprocess.run(
        ["ip", "route", "show", "198.18.0.0/15"], capture_output=True, text=True, check=True
    ).stdout
    assert "blackhole 198.18.0.0/15" in routes
    started = time.monotonic()
    with pytest.raises(OSError):
        socket.create_connection(("198.19.200.1", 22), timeout=5)
    assert time.monotonic() - started < 1.0


def test_lab_namespaces_have_no_ipv6_and_no_route_out(lab: dict[str, Any]) -> None:
    names = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    lab_ns = [line.split()[0] for line in names.splitlines() if line.startswith("hsmlab-")]
    assert lab_ns
    for ns in lab_ns:
        v6 = subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert v6 == "1", ns
        routes = subprocess.run(
            ["ip", "-n", ns, "-4", "route"], capture_output=True, text=True, check=True
        ).stdout
        for line in routes.splitlines():
            dest = line.split()[0]
            if dest == "default":
                via = line.split()[2]
                assert via.startswith("198.19."), f"{ns}: {line}"
            else:
                assert dest.startswith(("198.18.", "198.19.")), f"{ns}: {line}"


def test_console_runs_as_root_inside_the_appliance(lab: dict[str, Any]) -> None:
    a = lab["appliances"][0]["id"]
    assert console(a, "id", "-u").strip() == b"0"
    proc = hsmctl("lab", "console", "hsm999", "--", "true")
    assert proc.returncode == 2


def test_golden_image_is_at_factory_state(lab: dict[str, Any]) -> None:
    from hsmctl.lab import image

    root = image.image_path()
    assert (root / "etc/hsm/image-state").read_text().strip() == "factory"
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    assert not any((root / "etc/ssh/mgmt").iterdir())
    assert not any((root / "etc/ssh/data").iterdir())
    assert not any((root / "var/lib/softhsm/tokens").iterdir())
    assert not any((root / "etc/hsm/authorized_keys").iterdir())
    shadow = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/shadow").read_text().splitlines()
    }
    for user in ("provider", "monitor", "admin", "audit"):
        assert shadow[user][1] == "*", user  # no password anywhere
    for user in ("monitor", "audit", "admin"):
        assert shadow[user][7] == "1", user  # expired: locked even for keys
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    for user in ("provider", "monitor", "admin", "audit"):
        assert passwd[user][6] == "/usr/local/sbin/hsmsh"
