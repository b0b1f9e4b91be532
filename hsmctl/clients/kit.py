"""The client kit: what an application's host needs to reach the HSM, and nothing secret
of the device (no PIN, ever). Pure builders; :mod:`workflow` writes the files.

A kit directory holds ``NAME_key`` (the client's private key, 0600, unless the customer
brought their own public key), ``NAME_key.pub``, ``known_hosts`` (the appliance's data
host keys from the customer's pins), ``NAME.module`` (a p11-kit module file whose
``remote:`` line runs ssh with the kit's absolute paths) and ``README``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# The device's rule (appliance/grammar.py CLIENT_NAME): it becomes the Unix account
# ``p11-NAME`` (at most 32 bytes) and part of file names here.
NAME = re.compile(r"[a-z][a-z0-9-]{0,27}")
ROLES = ("crypto-officer", "crypto-user")
ACCOUNT_PREFIX = "p11-"
PROXY = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name.endswith("-"):
        raise ValueError(
            f"--name {name[:40]!r}: 1 to 28 characters from a-z 0-9 -, a letter first, "
            "not ending with '-'"
        )
    return name


def key_path(kit: Path, name: str) -> Path:
    return kit / f"{name}_key"


def known_hosts(data_ip: str, host_keys: Sequence[str]) -> str:
    """One line per pinned data host key: ``IP TYPE BASE64``."""
    return "".join(f"{data_ip} {' '.join(k.split()[:2])}\n" for k in host_keys)


CIPHERS = "aes256-gcm@openssh.com,aes128-gcm@openssh.com"


def ssh_command(kit: Path, name: str, data_ip: str) -> list[str]:
    """The ssh command p11-kit runs: pinned host key, this key only, no tty, no agent.

    AES-GCM only: FIPS-approved (the device's policy is ``fips``; chacha20-poly1305,
    OpenSSH's default, is not), and about 40 % less ssh + sshd CPU per PKCS#11 call than
    chacha20-poly1305 on AES-NI hardware (``python -m bench clients``; docs/clients.md).
    The device's sshd offers both by default."""
    return [
        "/usr/bin/ssh",
        "-i", str(key_path(kit, name)),
        "-o", f"UserKnownHostsFile={kit / 'known_hosts'}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", f"Ciphers={CIPHERS}",
        "-o", "BatchMode=yes",
        "-o", "ForwardAgent=no",
        "-o", "ClearAllForwardings=yes",
        "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=15",
        "-o", "LogLevel=ERROR",
        "-T",
        f"{ACCOUNT_PREFIX}{name}@{data_ip}",
    ]  # fmt: skip


def module_file(kit: Path, name: str, data_ip: str) -> str:
    return (
        f"# p11-kit module: the HSM's customer token over SSH, as client {name}.\n"
        f"remote: |{' '.join(ssh_command(kit, name, data_ip))}\n"
    )


def readme(kit: Path, name: str, role: str, appliance: str, label: str | None) -> str:
    token = label or "TOKEN-LABEL"
    module = kit / f"{name}.module"
    return f"""\
Client kit: {name} ({role}) on appliance {appliance}

The application reaches the HSM's customer token over PKCS#11, remoted over SSH
(p11-kit). Keys never leave the HSM. The token's user PIN (the crypto-officer PIN) is
the application's secret: it is not in this kit; give it to the application the way
you give it any secret.

Install the module file (p11-kit reads user configuration only for non-root users):
  non-root:  mkdir -p ~/.config/pkcs11/modules && cp {module} ~/.config/pkcs11/modules/
  root:      cp {module} /etc/pkcs11/modules/
Then load {PROXY} and select the token by its label ({token}), never "the first slot":
the proxy also shows this host's own PKCS#11 modules.

pkcs11-tool (package opensc):
  pkcs11-tool --module {PROXY} --token-label {token} --list-objects
  pkcs11-tool --module {PROXY} --token-label {token} --login \\
      --keypairgen --key-type EC:prime256v1 --label app-key --id 01
  openssl dgst -sha256 -binary data.bin > digest.bin
  pkcs11-tool --module {PROXY} --token-label {token} --login \\
      --sign --mechanism ECDSA --id 01 --input-file digest.bin \\
      --output-file sig.bin --signature-format openssl
  pkcs11-tool --module {PROXY} --token-label {token} \\
      --read-object --type pubkey --id 01 --output-file pub.der
  openssl dgst -sha256 -verify pub.der -keyform DER -signature sig.bin data.bin
(pkcs11-tool asks for the PIN; --pin reads it from the command line, visible in ps.
 Choose the key by --id: pkcs11-tool 0.23 ignores --label when it signs and takes the
 first private key it finds.)

OpenSSL 3 (Debian 12: the pkcs11 engine, package libengine-pkcs11-openssl), with
OPENSSL_CONF naming a file that holds:
  openssl_conf = openssl_init
  [openssl_init]
  engines = engine_section
  [engine_section]
  pkcs11 = pkcs11_section
  [pkcs11_section]
  engine_id = pkcs11
  MODULE_PATH = {PROXY}
  init = 0
and the PIN in a file only the application's user can read:
  openssl pkeyutl -engine pkcs11 -keyform engine -passin file:PINFILE \\
      -inkey "pkcs11:token={token};id=%01;type=private" -sign -in digest.bin -out sig.der
  openssl dgst -sha256 -engine pkcs11 -keyform engine -passin file:PINFILE \\
      -sign "pkcs11:token={token};id=%02;type=private" -out sig.bin data.bin   (RSA)

python-pkcs11:
  import pkcs11
  lib = pkcs11.lib("{PROXY}")
  token = lib.get_token(token_label="{token}")
  with token.open(user_pin=PIN, rw=True) as session:
      key = session.get_key(label="app-key", object_class=pkcs11.ObjectClass.PRIVATE_KEY)
      signature = key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)

What the HSM enforces (policy fips, `hsm policy show`): RSA 2048-8192, EC P-256/384/521
and secp256k1, AES 128/192/256; private and secret keys sensitive and non-extractable;
no plaintext key import; no MD5, SHA-1 signatures or raw RSA; no SO login or PIN
management over this path. A crypto-user client may only use existing keys. Every
session, key generated or destroyed, and refusal is in the appliance's activity log.
"""  # noqa: S608 - a README, not SQL


CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"


def remote_line(module_text: str) -> str:
    """The ``remote:`` value of a p11-kit module file (``|COMMAND``); ValueError if there
    is not exactly one. Pure."""
    found = [
        line.split(":", 1)[1].strip()
        for line in module_text.splitlines()
        if line.strip().startswith("remote:")
    ]
    if len(found) != 1 or not found[0].startswith("|"):
        raise ValueError("expected exactly one 'remote: |COMMAND' line")
    return found[0]


def own_client_name(hostname: str) -> str:
    """The client hsmctl registers for itself on this host: ``hsmctl-HOST`` within the
    device's name rule (pure)."""
    host = re.sub(r"[^a-z0-9-]+", "-", hostname.split(".")[0].lower()).strip("-")
    return check_name(f"hsmctl-{host}"[:28].rstrip("-"))


# -- a kit for an HA group (SPEC §12) -------------------------------------------------------
#
# One client account of the same name and key on every member; ssh reaches the group
# through the kit's own ssh_config (``ssh -F``): the connector (connector.py, copied into
# the kit as ``connect.py``) picks a reachable member and hands ssh the connected socket
# (``ProxyUseFdpass``); ssh checks the member's host key against every member's pinned
# keys under one alias (``HostKeyAlias``): which member answered is the connector's
# choice, so a key pinned for one member is accepted from any member of the group.

CONNECTOR = "connect.py"
PYTHON = "/usr/bin/python3"
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+@-]*")


# ServerAliveInterval 1: a member lost after it acknowledged a request but before it
# answered leaves nothing unacknowledged on this side, so TCP_USER_TIMEOUT alone would
# wait for the next thing sent; ssh sends its keepalive after under a second without
# anything from the member (OpenSSH counts whole seconds of its monotonic clock), and
# that one is then unacknowledged. Healthy sessions answer it; only TCP_USER_TIMEOUT or
# six unanswered keepalives end a session.
# Key exchange for the group kit: ECDH on P-256 (FIPS-approved, OpenSSL's code) first.
# OpenSSH 9.2's default, sntrup761x25519, took 0.2-0.35 s of a new session's
# 0.5-1.3 s at load 8-12 on the lab's two cores (its portable C code, on both ends),
# ecdh-sha2-nistp256 0.01-0.03 s (tests/lab/test_ha_failover.py prints both): a new
# session is what failover waits for. The price: no post-quantum hybrid.
GROUP_KEX = "ecdh-sha2-nistp256,ecdh-sha2-nistp384,curve25519-sha256"


def group_alias(group: str) -> str:
    return f"hsm-group-{group}"


def check_kit_path(kit: Path) -> Path:
    """A group kit's paths go into ssh_config and a shell command line: only plain
    characters (ValueError otherwise)."""
    if not SAFE_PATH.fullmatch(str(kit)):
        raise ValueError(
            f"{str(kit)[:80]!r}: a group kit's directory must be an absolute path of "
            "letters, digits and . _ / + @ - only"
        )
    return kit


def group_known_hosts(group: str, host_keys: Sequence[str]) -> str:
    """Every member's pinned data host keys under the group's alias."""
    alias = group_alias(group)
    return "".join(f"{alias} {' '.join(k.split()[:2])}\n" for k in host_keys)


def ssh_config(kit: Path, name: str, group: str, members: Sequence[tuple[str, int]]) -> str:
    """The group kit's ssh_config: the per-appliance kit's options (pinned host keys, this
    key only, AES-GCM, no agent, no forwarding, no tty) plus the connector."""
    check_kit_path(kit)
    alias = group_alias(group)
    targets = " ".join(f"{ip}:{port}" for ip, port in members)
    return f"""\
# ssh_config of client {name} for HA group {group} (hsmctl client register --group).
# The connector tries the members (last good first) and passes ssh the connected socket.
Host {alias}
    User {ACCOUNT_PREFIX}{name}
    HostKeyAlias {alias}
    ProxyCommand {PYTHON} -I -S {kit / CONNECTOR} {kit} {targets}
    ProxyUseFdpass yes
    IdentityFile {key_path(kit, name)}
    IdentitiesOnly yes
    IdentityAgent none
    UserKnownHostsFile {kit / "known_hosts"}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    CheckHostIP no
    Ciphers {CIPHERS}
    KexAlgorithms {GROUP_KEX}
    BatchMode yes
    ForwardAgent no
    ForwardX11 no
    ClearAllForwardings yes
    PermitLocalCommand no
    ControlMaster no
    ControlPath none
    ServerAliveInterval 1
    ServerAliveCountMax 5
    RequestTTY no
    LogLevel ERROR
"""


def group_ssh_command(kit: Path, group: str) -> list[str]:
    return ["/usr/bin/ssh", "-F", str(kit / "ssh_config"), "-T", group_alias(group)]


def group_session_command(kit: Path, group: str, members: Sequence[tuple[str, int]]) -> list[str]:
    """p11-kit's command for a group kit: the connector's ``--session`` mode, which hands
    each session to the application's standby holder (connector.py)."""
    check_kit_path(kit)
    targets = [f"{ip}:{port}" for ip, port in members]
    return [PYTHON, "-I", "-S", str(kit / CONNECTOR), "--session", str(kit),
            group_alias(group), *targets]  # fmt: skip


def group_module_file(kit: Path, name: str, group: str,
                      members: Sequence[tuple[str, int]]) -> str:  # fmt: skip
    return (
        f"# p11-kit module: the customer token of HA group {group} over SSH, as client "
        f"{name}; each new session opens on a reachable member, a standby kept open on "
        "another.\n"
        f"remote: |{' '.join(group_session_command(kit, group, members))}\n"
    )


def connector_source() -> bytes:
    return (Path(__file__).with_name("connector.py")).read_bytes()


def group_readme(
    kit_dir: Path,
    name: str,
    role: str,
    group: str,
    members: Sequence[str],
    labels: dict[str, str],
) -> str:
    """The per-appliance README with the group's way of choosing the token and of
    carrying on after a member fails."""
    shown = ", ".join(f"{m} ({labels.get(m) or '?'})" for m in members)
    first = sorted(set(labels.values()))[0] if labels else None
    body = readme(kit_dir, name, role, f"HA group {group}", first).split("\n", 1)[1]
    return f"""\
Client kit: {name} ({role}) for HA group {group}: {shown}

Each new PKCS#11 session (each time p11-kit starts the kit's remote command: when the
application initialises the library) opens on a reachable member: the one that answered
last first, then the group's order; a member that does not accept the connection within
{STAGGER_NOTE}. While the application works, a small helper
process ({CONNECTOR} --session, one per application process, ending with it) keeps a
second session open ahead on another member (a standby). A member that fails in the
middle of a session fails the application's call within 0.5 to 1.5 s (CKR_DEVICE_ERROR,
CKR_DEVICE_REMOVED or CKR_GENERAL_ERROR): the application then finalises and
initialises the library again (python-pkcs11: lib.reinitialize()), finds the token and
logs in again, and gets the standby at once. Keys made on one member reach the others at
the next `hsmctl ha sync {group}`.

The members' tokens have their own labels (above): choose the token whose label is one
of them (one member's token is visible at a time). The user PIN is the same on every
member. Needs /usr/bin/python3 (3.9 or later) on this host for {CONNECTOR}.
{body}"""


STAGGER_NOTE = "0.1 s is left for the next one (no timeout to wait)"
