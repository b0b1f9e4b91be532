"""Where things live on the appliance. One place, so the image script, the daemon, the
shell and the lab agree."""

from __future__ import annotations

from pathlib import Path

ETC = Path("/etc/hsm")
FACTORY = ETC / "factory.json"  # personalisation input (lab: written by lab up)
LOG_CONFIG = ETC / "log.json"  # log segments and limits (logwriter.RetentionConfig)
DEVICE = ETC / "device.json"  # personalisation result: id, serial, model, ...
AUTHORIZED_KEYS = ETC / "authorized_keys"
SSHD_MGMT_CONFIG = ETC / "sshd_mgmt_config"
SSHD_DATA_CONFIG = ETC / "sshd_data_config"
HOSTKEY_DIRS = {"mgmt": Path("/etc/ssh/mgmt"), "data": Path("/etc/ssh/data")}
HOSTKEY_STAGED = Path("/etc/ssh/data.staged")
HOSTKEY_TYPES = ("ed25519", "ecdsa")

STATE = Path("/var/lib/hsm/state")  # root-only (0700)
NETWORK = STATE / "network.json"
ACCOUNTS = STATE / "accounts.json"
OWNER = STATE / "owner.json"
OWNED = STATE / "customer-owned.json"  # the one-way fact (store.record_ownership)
SHADOW = Path("/etc/shadow")
FAULTS = Path("/run/hsm/faults")  # fault-injection points armed by tests (root only)
AUDIT_TOKEN_SECRETS = STATE / "audit-token.json"
CUSTOMER_TOKEN = STATE / "customer-token.json"
CLIENTS = STATE / "clients.json"  # registered applications: name -> role, key, when

# Application clients (SPEC §11): each its own account ``p11-NAME`` in one group that the
# data sshd forces onto the PKCS#11 entry, which is also their login shell.
CLIENT_PREFIX = "p11-"
CLIENT_GROUP = "hsm-p11"
CLIENT_ENTRY = "/usr/local/sbin/hsm-p11"
CLIENT_HOMES = Path("/var/lib/hsm/home")
# The key-policy module, built from appliance/p11/policy.c next to its source in the
# firmware tree (the lab builds it into its firmware snapshot, the image script in a VM).
P11_POLICY = Path(__file__).resolve().parent / "p11" / "hsm-policy.so"
P11_KIT = "/usr/bin/p11-kit"

LOG_DIR = Path("/var/log/hsm")
AUDIT_LOG = LOG_DIR / "audit.jsonl"
SSHD_LOGS = {"mgmt": LOG_DIR / "sshd-mgmt.log", "data": LOG_DIR / "sshd-data.log"}

RUN = Path("/run/hsm")
SOCKET = RUN / "hsmd.sock"
BOOT_PID = RUN / "boot.pid"
SSHD_PIDS = {"mgmt": RUN / "sshd-mgmt.pid", "data": RUN / "sshd-data.pid"}

SOFTHSM_CONF = Path("/etc/softhsm/softhsm2.conf")
SOFTHSM_LIB = Path("/usr/lib/softhsm/libsofthsm2.so")
FIRMWARE_VERSION = "7.8.4-hsmctl"
MODEL = "hsmctl-softhsm2"
