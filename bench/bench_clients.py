"""Remote PKCS#11 sign rates (SPEC §11, issue 11): an application's signatures through
the kit's path — p11-kit's client module running the kit's ssh (TCP_NODELAY on both
ends: OpenSSH 9.2 sets it for every session channel), the device's sshd, ``hsm-p11``'s
hand-off, ``p11-kit remote``, the key-policy module, SoftHSM — against SoftHSM signing
locally on this machine in the same run, with python-pkcs11 and the same mechanism.

Scenarios: P-256 (``CKM_ECDSA`` over random 32-byte digests) and RSA-2048
(``CKM_SHA256_RSA_PKCS`` over random 32 bytes), 1 and 8 sessions. A session is one
worker process with its own module, login and (remote) SSH connection; workers log in,
then sign for ``--seconds`` together. Each rate is the median of ``--runs`` runs; the
ratio is remote/local. Where the time goes: CPU seconds per 1,000 signatures of each
part, read from ``/proc`` before and after a run — the client workers (python-pkcs11 +
p11-kit RPC), their ssh, and on the device (same kernel, same two cores) sshd, and
``p11-kit remote`` (policy module + SoftHSM, which includes the signing itself).

The appliance: hsm28 (``APPLIANCE_SETS["clients"]``), provisioned to tenant1, taken over,
one crypto-officer client ``bench`` (not timed). Do not run beside
``tests/lab/test_clients_crypto.py`` (same appliance).

Usage (root, lab up): ``python -m bench clients [--runs N] [--seconds S] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

APPLIANCE, TENANT, CLIENT = "hsm28", "tenant1", "bench"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
KEYS = {"p256": "bench-p256", "rsa2048": "bench-rsa2048"}
TICK = os.sysconf("SC_CLK_TCK")


# -- a worker: one session, signing until told to stop ------------------------------------------


def worker(module: str, label: str, key: str, pin_file: str, seconds: float) -> None:
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=label)
    pin = Path(pin_file).read_text().rstrip("\n")
    mech = Mechanism.ECDSA if key == "p256" else Mechanism.SHA256_RSA_PKCS
    with token.open(user_pin=pin, rw=True) as session:
        priv = session.get_key(label=KEYS[key], object_class=ObjectClass.PRIVATE_KEY)
        digests = [os.urandom(32) for _ in range(64)]
        priv.sign(digests[0], mechanism=mech)
        print("ready", flush=True)
        sys.stdin.readline()  # go
        n, start = 0, time.perf_counter()
        end = start + seconds
        while True:
            priv.sign(digests[n & 63], mechanism=mech)
            n += 1
            if n & 15 == 0 and time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - start
    print(json.dumps({"signatures": n, "seconds": elapsed}), flush=True)


# -- CPU accounting from /proc ------------------------------------------------------------------


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _syscalls(pid: int) -> int:
    """read(2)-like plus write(2)-like calls so far (/proc/PID/io)."""
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except (OSError, ValueError):
        return 0
    return int(fields.get("syscr", 0)) + int(fields.get("syscw", 0))


def _procs() -> dict[str, list[int]]:
    """The processes of the remote path, by part (found by their command lines)."""
    parts: dict[str, list[int]] = {"ssh": [], "sshd": [], "p11-kit remote": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("/usr/bin/ssh ") and f"p11-{CLIENT}@" in cmd:
            parts["ssh"].append(int(entry.name))
        elif cmd.startswith(f"sshd: p11-{CLIENT}"):
            parts["sshd"].append(int(entry.name))
        elif (
            cmd.startswith(
                (
                    "remote --provider",
                    "p11-kit remote",
                    "/usr/bin/p11-kit remote",
                    "/usr/libexec/p11-kit/p11-kit-remote",
                )
            )
            and "hsm-policy.so" in cmd
        ):
            # p11-kit runs its remote tool with argv[0] "remote"
            parts["p11-kit remote"].append(int(entry.name))
    return parts


def run_once(
    argv: Sequence[str], sessions: int, env: dict[str, str], netns: str | None
) -> dict[str, Any]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    procs: list[subprocess.Popen[str]] = []
    try:
        # One after another: SoftHSM's file store does not take several processes
        # opening one token at the same instant (NoSuchToken, CKR_GENERAL_ERROR).
        for _ in range(sessions):
            p = subprocess.Popen(
                [*prefix, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
            procs.append(p)
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a worker did not start: {line!r}")
        parts = _procs() if netns else {}
        before = {k: sum(_cpu(p) for p in v) for k, v in parts.items()}
        io_before = {k: sum(_syscalls(p) for p in v) for k, v in parts.items()}
        workers_before = sum(_cpu(p.pid) for p in procs)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        cpu: dict[str, float] = {}
        for p in procs:
            assert p.stdout is not None
            results.append(json.loads(p.stdout.readline()))
        cpu["client (python-pkcs11, p11-kit rpc)"] = (
            sum(_cpu(p.pid) for p in procs) - workers_before
        )
        io: dict[str, int] = {}
        for k, v in parts.items():
            cpu[k] = sum(_cpu(p) for p in v) - before[k]
            io[k] = sum(_syscalls(p) for p in v) - io_before[k]
        for p in procs:
            p.communicate(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    total = sum(r["signatures"] for r in results)
    wall = max(r["seconds"] for r in results)
    return {"rate": total / wall, "signatures": total, "cpu": cpu, "io": io}


# -- set-up (not timed) -------------------------------------------------------------------------


@contextlib.contextmanager
def local_token(work: Path) -> Iterator[tuple[dict[str, str], str]]:
    """A throwaway SoftHSM token on this host with the same two keys."""
    import pkcs11
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    tokens = work / "tokens"
    tokens.mkdir()
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    pin = os.urandom(8).hex()
    # A throwaway local token: its PINs are not the device's and die with the run.
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "bench-local",
            "--so-pin",
            os.urandom(8).hex(),
            "--pin",
            pin,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    lib = pkcs11.lib(SOFTHSM)
    hold = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
    with lib.get_token(token_label="bench-local").open(user_pin=pin, rw=True) as s:
        s.generate_keypair(
            KeyType.RSA, 2048, label=KEYS["rsa2048"], store=True, private_template=hold
        )
        params = s.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        params.generate_keypair(label=KEYS["p256"], store=True, private_template=hold)
    pkcs11.unload(SOFTHSM)
    pin_file = work / "local-pin"
    pin_file.write_text(pin)
    pin_file.chmod(0o600)
    yield env, str(pin_file)


def remote_setup(lab: dict[str, Any], work: Path) -> tuple[dict[str, str], str, str, str]:
    """hsm28 taken over by tenant1, client ``bench`` registered, its two keys made with
    ``hsmctl key generate`` (the remote path). Returns env, token label, PIN file, netns."""
    from hsmctl.lab.rig import HSMCTL, Rig, console, escrowed, takeover_cli

    rig = Rig(lab, APPLIANCE, TENANT, work / "rig").provision()
    conf = rig.tenant_conf(work / "rig")
    proc = takeover_cli(rig.netns, conf, rig.handoff)
    assert proc.returncode == 0, proc.stderr.decode()
    pin = escrowed(conf, APPLIANCE, "co-pin")
    assert pin is not None
    label = json.loads(console(APPLIANCE, "hsmsh", "-c", "hsm show").stdout)["label"]
    kit = work / "kit"

    def hsmctl(*args: str) -> None:
        p = subprocess.run(
            ["ip", "netns", "exec", rig.netns, HSMCTL, "--config", str(conf), *args],
            capture_output=True,
            check=False,
        )
        assert p.returncode == 0, p.stderr.decode()

    hsmctl(
        "client",
        "register",
        APPLIANCE,
        "--name",
        CLIENT,
        "--role",
        "crypto-officer",
        "--output",
        str(kit),
    )
    pin_file = work / "pin"
    pin_file.write_text(pin)
    pin_file.chmod(0o600)
    for key, spec in (("p256", "ec:P-256"), ("rsa2048", "rsa:2048")):
        hsmctl(
            "key",
            "generate",
            APPLIANCE,
            "--label",
            KEYS[key],
            "--type",
            spec,
            "--kit",
            str(kit),
            "--pin-file",
            str(pin_file),
        )
    from hsmctl.clients.kit import remote_line

    remote = remote_line((kit / f"{CLIENT}.module").read_text())
    env = {**os.environ, "P11_KIT_SERVER_ADDRESS": remote}
    return env, str(label), str(pin_file), rig.netns


# -- the report ---------------------------------------------------------------------------------


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{'scenario':<22} {'local/s':>9} {'remote/s':>9} {'ratio':>6}   remote CPU ms "
        "per 1,000 signatures (client | ssh | sshd | p11-kit remote)   "
        "read/write calls per signature (ssh | sshd | p11-kit remote)"
    ]
    for name, r in results.items():
        cpu = r["remote_cpu_ms_per_1000"]
        parts = " | ".join(
            f"{cpu.get(k, 0):.0f}"
            for k in ("client (python-pkcs11, p11-kit rpc)", "ssh", "sshd", "p11-kit remote")
        )
        io = r["remote_io_calls_per_signature"]
        calls = " | ".join(f"{io.get(k, 0):.1f}" for k in ("ssh", "sshd", "p11-kit remote"))
        lines.append(
            f"{name:<22} {r['local']:>9.0f} {r['remote']:>9.0f} {r['ratio']:>6.2f}   {parts}"
            f"   {calls}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench clients", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sessions", default="1,8")
    parser.add_argument("--keys", default="p256,rsa2048")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker[:4], seconds=args.seconds)
        return 0
    if os.geteuid() != 0:
        print("bench clients: needs root and the lab (hsmctl lab up); skipped", file=sys.stderr)
        return 0
    from hsmctl.lab.rig import HSMCTL

    status = subprocess.run([HSMCTL, "lab", "status", "--json"], capture_output=True, check=False)
    if status.returncode != 0:
        print("bench clients: no lab is up (hsmctl lab up); skipped", file=sys.stderr)
        return 0
    lab = json.loads(status.stdout)
    work = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    os.chmod(work, 0o700)
    me = [sys.executable, "-m", "bench", "clients", "--seconds", str(args.seconds)]
    results: dict[str, dict[str, Any]] = {}
    try:
        print(f"setting up {APPLIANCE} (provision, takeover, client, keys) ...", flush=True)
        renv, rlabel, rpin, netns = remote_setup(lab, work)
        with local_token(work) as (lenv, lpin):
            for key in args.keys.split(","):
                for n in (int(s) for s in args.sessions.split(",")):
                    local, remote, cpus = [], [], []
                    ios: list[dict[str, float]] = []
                    for i in range(args.runs):
                        loc = run_once(
                            [*me, "--worker", SOFTHSM, "bench-local", key, lpin], n, lenv, None
                        )
                        rem = run_once(
                            [*me, "--worker", CLIENT_MODULE, rlabel, key, rpin], n, renv, netns
                        )
                        local.append(loc["rate"])
                        remote.append(rem["rate"])
                        cpus.append({k: 1e6 * v / rem["signatures"] for k, v in rem["cpu"].items()})
                        ios.append({k: v / rem["signatures"] for k, v in rem["io"].items()})
                        print(
                            f"  {key} x{n} run {i + 1}: local {loc['rate']:.0f}/s, "
                            f"remote {rem['rate']:.0f}/s",
                            flush=True,
                        )
                    name = f"{key} x{n} session{'s' if n > 1 else ''}"
                    lo, re_ = statistics.median(local), statistics.median(remote)
                    results[name] = {
                        "local": lo,
                        "remote": re_,
                        "ratio": re_ / lo,
                        "runs_local": local,
                        "runs_remote": remote,
                        "remote_cpu_ms_per_1000": {
                            k: statistics.median(c[k] for c in cpus) for k in cpus[0]
                        },
                        "remote_io_calls_per_signature": {
                            k: statistics.median(c[k] for c in ios) for k in ios[0]
                        },
                    }
        print(table(results))
        load = os.getloadavg()
        print(
            f"(cores: {os.cpu_count()}, load average {load[0]:.1f} {load[1]:.1f} "
            f"{load[2]:.1f}; median of {args.runs} runs of {args.seconds:g} s)"
        )
        if args.json:
            print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
