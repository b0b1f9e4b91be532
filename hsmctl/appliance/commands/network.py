"""The data interface: ``network show|set``."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

from hsmctl.appliance import paths, store
from hsmctl.appliance.commands.common import Context, Reply, as_json, signal_boot
from hsmctl.appliance.commands.users import provider_guard
from hsmctl.appliance.grammar import Command

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon


def network_show(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    config = store.read_json(paths.NETWORK, {})
    addrs = subprocess.run(
        ["ip", "-br", "-4", "addr"], capture_output=True, text=True, check=False
    ).stdout
    return Reply(output=as_json({"data": config, "interfaces": addrs.splitlines()}))


def network_set(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    provider_guard(ctx)
    iface = cmd.get_interface("ip")
    gateway = cmd.get_address("gateway")
    dev = "data0"
    steps = [
        ["ip", "addr", "flush", "dev", dev],
        ["ip", "addr", "add", str(iface), "dev", dev],
        ["ip", "link", "set", dev, "up"],
        ["ip", "route", "replace", "default", "via", str(gateway), "dev", dev],
    ]
    for argv in steps:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return Reply.failure(f"{' '.join(argv[:3])}: {proc.stderr.strip()}")
    store.write_json(paths.NETWORK, {"address": str(iface), "gateway": str(gateway), "device": dev})
    signal_boot()
    return Reply(
        output=f"data interface {iface} via {gateway}",
        log_detail={"address": str(iface), "gateway": str(gateway)},
    )
