"""Backup and restore of many keys (SPEC §12, issue 12): ``hsmctl backup`` of N keys and
``hsmctl restore`` of them onto a second appliance of the same cloning domain (time and
bytes), against the raw PKCS#11 loop on the same devices in the same run: one
python-pkcs11 session through the same kit wrapping every key under the domain key, and
one unwrapping every blob (as session keys) on the target.

Appliances: hsm45 (source) and hsm46 (target), ``APPLIANCE_SETS["keys"]``, tenant1, both
taken over with ``--domain-file`` (one secret). Do not run beside
``tests/lab/test_keys_domain.py`` (same appliances).

Usage (root, lab up): ``python -m bench keys [--keys N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SOURCE, TARGET, TENANT = "hsm45", "hsm46", "tenant1"
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench keys", description=__doc__)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench keys: needs root and the lab (hsmctl lab up); skipped", file=sys.stderr)
        return 0
    from hsmctl.clients import kit
    from hsmctl.keys.workflow import remote_of
    from hsmctl.lab.rig import HSMCTL, Rig, escrowed, provision_all, takeover_cli

    status = subprocess.run([HSMCTL, "lab", "status", "--json"], capture_output=True, check=False)
    if status.returncode != 0:
        print("bench keys: no lab is up (hsmctl lab up); skipped", file=sys.stderr)
        return 0
    lab = json.loads(status.stdout)
    work = Path(tempfile.mkdtemp(prefix="bench-keys-"))
    os.chmod(work, 0o700)
    print(f"setting up {SOURCE}, {TARGET} (provision, takeover into one domain) ...", flush=True)
    rigs = [Rig(lab, a, TENANT, work / a) for a in (SOURCE, TARGET)]
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
    return 0
