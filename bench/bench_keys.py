"""Keys that outlive a device (SPEC §12, issue 12), N keys (default 1,000), each against
the raw PKCS#11 loop on the same devices in the same run:

- ``hsmctl backup`` of N keys and ``hsmctl restore`` of them onto a second appliance of
  the same cloning domain (time and bytes), against one python-pkcs11 session through
  the same kit wrapping every key under the domain key, and one unwrapping every blob
  (as session keys) on the target;
- ``hsmctl ha sync`` of a group of two (source and a third appliance) copying the N keys,
  ``--runs`` times (the copies are destroyed on the member between runs, by raw PKCS#11,
  so no destroy is journaled), against the raw loop that does the same work: one
  session wrapping every key on the source, one unwrapping every blob into a token
  object on the member (then destroyed, untimed). Medians of the runs, and a sync with
  nothing to copy.

Appliances: hsm78 (source), hsm79 (restore target), hsm80 (the second group member),
tenant1, data addresses 198.19.0.98/.99/.100, all taken over with one ``--domain-file``;
factory-reset at the end (``--keep`` leaves them taken over).

Usage (root, lab up): ``python -m bench keys [--keys N] [--runs R] [--json] [--keep]``.

``python -m bench keys --describe-only [--keys N]`` needs no lab: N AES keys in a SoftHSM2
token of its own (temporary directory), described as backup and sync describe them
through p11-kit's RPC (``p11-kit remote`` over a pipe: the round trips without SSH), one
batched attribute read per object against one read per attribute, twice each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SOURCE, TARGET, MEMBER, TENANT = "hsm78", "hsm79", "hsm80", "tenant1"
# Rig's ``.200 + N`` does not fit hsm78-80: addresses of their own in tenant1's hsm subnet.
ADDRESSES = {SOURCE: "198.19.0.98", TARGET: "198.19.0.99", MEMBER: "198.19.0.100"}
GROUP = "bench"
CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"

_PRELUDE = f"""
import json, os, sys, time
req = json.load(sys.stdin)
os.environ["P11_KIT_SERVER_ADDRESS"] = req["remote"]
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
(token,) = list(pkcs11.lib({CLIENT_MODULE!r}).get_tokens())
se = token.open(user_pin=req["pin"], rw=True)
(dk,) = list(se.get_objects({{Attribute.CLASS: ObjectClass.SECRET_KEY,
                              Attribute.LABEL: "hsm-domain"}}))
KWP = Mechanism(0x400)
out = {{}}
"""

_GENERATE = """
for i in range(req["n"]):
    se.generate_key(KeyType.AES, 256, label=f"bench-{i:04d}", id=i.to_bytes(4, "big"),
                    store=True)
out["made"] = req["n"]
"""

_WRAP = """
keys = [k for k in se.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
        if k[Attribute.LABEL].startswith("bench-")]
t0 = time.monotonic()
blobs = [bytes(dk.wrap_key(k, mechanism=KWP)).hex() for k in keys]
out["seconds"] = time.monotonic() - t0
out["blobs"] = blobs
"""

_UNWRAP = """
t0 = time.monotonic()
for b in req["blobs"]:
    dk.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, bytes.fromhex(b), mechanism=KWP,
                  store=False).destroy()
out["seconds"] = time.monotonic() - t0
"""

_UNWRAP_STORE = """
t0 = time.monotonic()
made = []
for i, b in enumerate(req["blobs"]):
    made.append(dk.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, bytes.fromhex(b),
                              mechanism=KWP, label=f"raw-{i:04d}", store=True))
out["seconds"] = time.monotonic() - t0
for k in made:
    k.destroy()
"""

_CLEAR = """
gone = 0
for k in list(se.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})):
    if k[Attribute.LABEL].startswith(("bench-", "raw-")):
        k.destroy()
        gone += 1
out["destroyed"] = gone
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench keys", description=__doc__)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3, help="ha sync runs (median)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="no factory reset at the end")
    parser.add_argument("--describe-only", action="store_true",
                        help="no lab: batched against per-attribute reads, local RPC")  # fmt: skip
    args = parser.parse_args(argv)
    if args.describe_only:
        return _describe_only(args.keys, args.json)
    if os.geteuid() != 0:
        print("bench keys: needs root and the lab (hsmctl lab up); skipped", file=sys.stderr)
        return 0
    from hsmctl.lab.rig import HSMCTL, Rig, factory_reset

    class BenchRig(Rig):
        @property
        def ip(self) -> str:
            return ADDRESSES[self.appliance]

    status = subprocess.run([HSMCTL, "lab", "status", "--json"], capture_output=True, check=False)
    if status.returncode != 0:
        print("bench keys: no lab is up (hsmctl lab up); skipped", file=sys.stderr)
        return 0
    lab = json.loads(status.stdout)
    work = Path(tempfile.mkdtemp(prefix="bench-keys-"))
    os.chmod(work, 0o700)
    print(f"setting up {SOURCE}, {TARGET}, {MEMBER} (provision, takeover into one domain) ...",
          flush=True)  # fmt: skip
    rigs = [BenchRig(lab, a, TENANT, work / a) for a in (SOURCE, TARGET, MEMBER)]
    try:
        return _run(args, rigs, work)
    finally:
        if not args.keep:
            factory_reset(SOURCE, TARGET, MEMBER)


def _run(args: argparse.Namespace, rigs: list[Any], work: Path) -> int:
    from hsmctl.clients import kit
    from hsmctl.keys.workflow import remote_of
    from hsmctl.lab.rig import HSMCTL, escrowed, provision_all, takeover_cli

    provision_all(rigs)
    conf = rigs[0].tenant_conf(work / "customer")
    secret = work / "domain"
    secret.write_text(os.urandom(24).hex() + "\n")
    secret.chmod(0o600)
    for rig in rigs:
        proc = takeover_cli(rig.netns, conf, rig.handoff, "--domain-file", str(secret))
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.decode())
    netns = rigs[0].netns

    def hsmctl(*a: str) -> tuple[dict[str, Any], float]:
        argv_ = ["ip", "netns", "exec", netns, HSMCTL, "--config", str(conf), *a, "--json"]
        t0 = time.monotonic()
        proc = subprocess.run(argv_, capture_output=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.decode())
        return json.loads(proc.stdout), time.monotonic() - t0

    def p11(appliance: str, body: str, **data: Any) -> dict[str, Any]:
        hsmctl("key", "list", appliance)  # registers hsmctl's own kit on first use
        state = work / "customer" / f"{TENANT}-state" / "appliances" / appliance
        own = state / "clients" / kit.own_client_name(socket.gethostname())
        req = {"remote": remote_of(own), "pin": escrowed(conf, appliance, "co-pin"), **data}
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", _PRELUDE + body
             + "\nprint(json.dumps(out))\n"],
            input=json.dumps(req).encode(), capture_output=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.decode()[-2000:])
        result: dict[str, Any] = json.loads(proc.stdout.decode().splitlines()[-1])
        return result

    print(f"generating {args.keys} AES-256 keys on {SOURCE} ...", flush=True)
    p11(SOURCE, _GENERATE, n=args.keys)
    backup_file = work / "bench.backup"
    made, t_backup = hsmctl("backup", SOURCE, "--output", str(backup_file))
    restored, t_restore = hsmctl("restore", TARGET, "--backup", str(backup_file))
    again, t_again = hsmctl("restore", TARGET, "--backup", str(backup_file))
    wrapped = p11(SOURCE, _WRAP)
    unwrapped = p11(TARGET, _UNWRAP, blobs=wrapped["blobs"])
    raw_bytes = sum(len(b) // 2 for b in wrapped["blobs"])
    print(f"  backup {t_backup:.1f} s ({made['bytes']} bytes), raw wrap {wrapped['seconds']:.1f} s;"
          f" restore {t_restore:.1f} s, raw unwrap {unwrapped['seconds']:.1f} s; restore "
          f"again {t_again:.1f} s", flush=True)  # fmt: skip

    hsmctl("ha", "create", GROUP, SOURCE, MEMBER)
    syncs: list[float] = []
    raw_wraps: list[float] = []
    raw_unwraps: list[float] = []
    for run in range(args.runs):
        p11(MEMBER, _CLEAR)
        synced, t_sync = hsmctl("ha", "sync", GROUP)
        if synced["copied"] != args.keys:
            raise SystemExit(f"ha sync copied {synced['copied']}, expected {args.keys}")
        syncs.append(t_sync)
        w = p11(SOURCE, _WRAP)
        u = p11(MEMBER, _UNWRAP_STORE, blobs=w["blobs"])
        raw_wraps.append(w["seconds"])
        raw_unwraps.append(u["seconds"])
        print(f"  run {run + 1}: ha sync {t_sync:.1f} s; raw wrap {w['seconds']:.1f} s + "
              f"unwrap (token objects) {u['seconds']:.1f} s", flush=True)  # fmt: skip
    idle, t_idle = hsmctl("ha", "sync", GROUP)
    status, t_status = hsmctl("ha", "status", GROUP)
    if idle["copied"] != 0 or not all(m["in_sync"] for m in status["members"]):
        raise SystemExit(f"not in sync after the runs: {idle} {status}")
    results = {
        "keys": args.keys,
        "backup_seconds": t_backup,
        "backup_bytes": made["bytes"],
        "restore_seconds": t_restore,
        "restored": len(restored["restored"]),
        "restore_again_seconds": t_again,
        "restore_again_added": len(again["restored"]),
        "raw_wrap_seconds": wrapped["seconds"],
        "raw_wrapped_bytes": raw_bytes,
        "raw_unwrap_seconds": unwrapped["seconds"],
        "ha_sync_runs": syncs,
        "ha_sync_seconds": statistics.median(syncs),
        "ha_raw_wrap_seconds": statistics.median(raw_wraps),
        "ha_raw_unwrap_seconds": statistics.median(raw_unwraps),
        "ha_sync_nothing_to_copy_seconds": t_idle,
        "ha_status_seconds": t_status,
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        n = args.keys
        raw_wrap = wrapped["seconds"]
        print(f"backup  {n} keys: {t_backup:7.1f} s  {made['bytes']:>9} bytes "
              f"(raw wrap loop {raw_wrap:.1f} s, {raw_bytes} bytes of blobs)")  # fmt: skip
        print(f"restore {n} keys: {t_restore:7.1f} s  (raw unwrap loop "
              f"{unwrapped['seconds']:.1f} s); again: {t_again:.1f} s, "
              f"{len(again['restored'])} added")  # fmt: skip
        raw = statistics.median(raw_wraps) + statistics.median(raw_unwraps)
        print(f"ha sync {n} keys: {statistics.median(syncs):7.1f} s  median of {len(syncs)} "
              f"(raw wrap + unwrap loop {raw:.1f} s); nothing to copy: {t_idle:.1f} s; "
              f"status: {t_status:.1f} s")  # fmt: skip
    return 0


SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"

_DESCRIBE = f"""
import json, os, sys, time
import pkcs11
from pkcs11 import Attribute, KeyType
n = int(sys.argv[1])
soft = pkcs11.lib({SOFTHSM!r})
with soft.get_token(token_label="bench").open(user_pin="87654321", rw=True) as se:
    for i in range(n):
        se.generate_key(KeyType.AES, 256, label=f"k{{i:04d}}", id=i.to_bytes(4, "big"),
                        store=True, template={{Attribute.EXTRACTABLE: True,
                                               Attribute.WRAP_WITH_TRUSTED: True}})
pkcs11.unload({SOFTHSM!r})
os.environ["P11_KIT_SERVER_ADDRESS"] = "|p11-kit remote {SOFTHSM}"
lib = pkcs11.lib({CLIENT_MODULE!r})
from hsmctl.keys import domain
from hsmctl.keys.domain import DomainToken
se = lib.get_token(token_label="bench").open(user_pin="87654321", rw=True)
token = DomainToken("local", "|unused", None)
token._session = se
batched = domain._batch_getter
out = {{"batched": [], "one_by_one": []}}
for name in ("batched", "one_by_one", "batched", "one_by_one"):
    domain._batch_getter = batched if name == "batched" else (lambda o, c: domain._getter(o))
    t0 = time.monotonic()
    described = [token.describe(c, o) for c, o in token._objects()]
    out[name].append(time.monotonic() - t0)
    assert len(described) == n
print(json.dumps(out))
"""


def _describe_only(n: int, as_json: bool) -> int:
    if not Path(SOFTHSM).exists():
        print("bench keys --describe-only: SoftHSM2 is not installed; skipped", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-describe-") as tmp:
        conf = Path(tmp) / "softhsm2.conf"
        (Path(tmp) / "tokens").mkdir()
        conf.write_text(f"directories.tokendir = {tmp}/tokens\n")
        env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench",
                        "--so-pin", "12345678", "--pin", "87654321"],
                       env=env, check=True, capture_output=True)  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", _DESCRIBE, str(n)], env=env,
                              capture_output=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.decode()[-2000:])
    times = json.loads(proc.stdout.decode().splitlines()[-1])
    result = {
        "keys": n,
        "describe_batched_seconds": statistics.median(times["batched"]),
        "describe_one_by_one_seconds": statistics.median(times["one_by_one"]),
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(f"describe {n} keys through p11-kit's RPC (local pipe): batched "
              f"{result['describe_batched_seconds']:.2f} s, one read per attribute "
              f"{result['describe_one_by_one_seconds']:.2f} s")  # fmt: skip
    return 0
