"""The lab fabric finds a data port by its exact name."""

from __future__ import annotations

import pytest

from hsmctl.lab.fabric import parse_link_names

pytestmark = pytest.mark.unit

IP_O_LINK = (
    "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT\\"
    "    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n"
    "11: d-hsm100@if3: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue master br-hsm"
    " state UP mode DEFAULT group default qlen 1000\\    link/ether 5e:e3:94:d4:f3:d1 brd"
    " ff:ff:ff:ff:ff:ff link-netns hsmlab-hsm100\n"
    "12: br-hsm: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP\\"
    "    link/ether 1a:2b:3c:4d:5e:6f brd ff:ff:ff:ff:ff:ff\n"
)


def test_names_are_whole_interface_names() -> None:
    names = parse_link_names(IP_O_LINK)
    assert names == {"lo", "d-hsm100", "br-hsm"}
    assert "d-hsm10" not in names and "d-hsm1" not in names


def test_empty_output_has_no_names() -> None:
    assert parse_link_names("") == set()
    assert parse_link_names("\n\n") == set()
