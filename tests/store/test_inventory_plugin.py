"""The hsmctl_state inventory plugin through the real ansible-inventory and ansible-doc,
against real SQLite and PostgreSQL stores: read-only, hsm_-prefixed, constructable,
cached, claiming only its own file names, and loud when it cannot read the store."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from hsmctl.inventory import check_placement, load_inventory
from hsmctl.state import ApplianceState, Store
from hsmctl.state.schema import LATEST
from tests.postgres import reset_postgres
from tests.provider_env import ProviderEnv, make_env

pytestmark = pytest.mark.store

REPO = Path(__file__).resolve().parents[2]
COLLECTIONS = REPO / "hsmctl"  # holds ansible_collections/hsmctl/fleet
PLUGINS = COLLECTIONS / "ansible_collections/hsmctl/fleet/plugins/inventory"
BIN = Path(sys.executable).parent


def _plain(value: Any) -> Any:
    """ansible-inventory marks strings from a plugin unsafe (never templated)."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def inventory(
    source: Path, home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """ansible-inventory as an engineer runs it from the repository (its ansible.cfg)."""
    return subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(source), *(args or ("--list",))],
        cwd=REPO,
        env={
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(home),
            **(env or {}),
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def listing(proc: subprocess.CompletedProcess[str]) -> tuple[dict[str, list[str]], Any]:
    assert proc.returncode == 0, proc.stderr
    data = _plain(json.loads(proc.stdout))
    groups = {g: sorted(v.get("hosts", [])) for g, v in data.items() if g != "_meta"}
    return groups, data["_meta"]["hostvars"]


def source(tmp: Path, name: str, **options: Any) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({"plugin": "hsmctl.fleet.hsmctl_state", **options}))
    return path


def populate(env: ProviderEnv, target: str) -> None:
    """unit01 (t1) and unit02 (t2, 10.20.1.9) provisioning, unit03 (t1) customer-owned,
    unit04 available."""
    inv = load_inventory(env.inventory)
    with Store.open(target) as store:
        store.sync_inventory(inv)
        store.allocate("req-a", check_placement(inv, "t1", "v1", "hsm"))
        store.allocate("req-b", check_placement(inv, "t1", "v1", "hsm"))
        store.allocate("req-c", check_placement(inv, "t2", "v1", "hsm", ip="10.20.1.9"))
        store.set_state("unit03", ApplianceState.PROVISIONED)
        store.set_state("unit03", ApplianceState.CUSTOMER_OWNED)


@pytest.fixture
def env(tmp_path: Path) -> ProviderEnv:
    return make_env(tmp_path / "env")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_config(request: pytest.FixtureRequest, env: ProviderEnv, tmp_path: Path) -> Path:
    """A provider configuration whose (fresh, populated) store is SQLite or PostgreSQL."""
    if request.param == "sqlite":
        conf = env.write_config("sqlite.yaml", state_dir=str(tmp_path / "state"))
        target = str(tmp_path / "state" / "hsmctl.db")
    else:
        target = request.getfixturevalue("postgres_url")
        reset_postgres(target)
        conf = env.write_config("pg.yaml", database_url=target)
    populate(env, target)
    return conf


def load_plugin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hsmctl_state", PLUGINS / "hsmctl_state.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- what it shows -----------------------------------------------------------------------


def test_empty_store_and_no_fleet_file(tmp_path: Path) -> None:
    """A configuration with no `inventory:` and a store with no appliances: an empty
    inventory, exit 0."""
    state = tmp_path / "state"
    Store.open(state / "hsmctl.db").close()
    conf = tmp_path / "provider.yaml"
    conf.write_text(yaml.safe_dump({"role": "provider", "state_dir": str(state)}))
    proc = inventory(source(tmp_path, "hsmctl.yml"), tmp_path, env={"HSMCTL_CONFIG": str(conf)})
    groups, hostvars = listing(proc)
    assert hostvars == {}
    assert all(hosts == [] for hosts in groups.values())


def test_populated_store_prefixed_vars_compose_and_groups(
    store_config: Path, tmp_path: Path
) -> None:
    src = source(
        tmp_path,
        "lab.hsmctl.yml",
        compose={
            "ansible_host": "hsm_mgmt_ip",
            "hsm_label": "hsm_stamp ~ '/' ~ inventory_hostname",
        },
        groups={"unallocated": "hsm_tenant is none"},
        keyed_groups=[
            {"key": "hsm_model", "prefix": "model"},
            {"key": "hsm_tenant", "prefix": "customer", "default_value": "none"},
        ],
    )
    groups, hv = listing(inventory(src, tmp_path, env={"HSMCTL_CONFIG": str(store_config)}))
    # The built-in groups.
    assert groups["tenant_t1"] == ["unit01", "unit03"]
    assert groups["tenant_t2"] == ["unit02"]
    assert groups["stamp_s1"] == ["unit01", "unit02"]
    assert groups["region_r2"] == ["unit04"]
    assert groups["state_provisioning"] == ["unit01", "unit02"]
    assert groups["state_customer_owned"] == ["unit03"]
    assert groups["state_available"] == ["unit04"]
    # groups / keyed_groups.
    assert groups["unallocated"] == ["unit04"]
    assert groups["model_unit_test"] == ["unit01", "unit02", "unit03", "unit04"]
    assert groups["customer_t1"] == ["unit01", "unit03"]
    assert groups["customer_none"] == ["unit04"]
    # Every variable the plugin sets is hsm_-prefixed; compose adds the others.
    assert hv["unit02"] == {
        "hsm_mgmt_ip": "127.0.0.12",
        "hsm_data_ip": "10.20.1.9",
        "hsm_tenant": "t2",
        "hsm_stamp": "s1",
        "hsm_region": "r1",
        "hsm_state": "provisioning",
        "hsm_serial": "UNIT0002",
        "hsm_model": "unit-test",
        "hsm_vnet": "v1",
        "hsm_subnet": "hsm",
        "hsm_request_id": "req-c",
        "hsm_config": str(store_config),
        "ansible_host": "127.0.0.12",
        "hsm_label": "s1/unit02",
    }
    assert hv["unit04"]["hsm_tenant"] is None and "hsm_request_id" not in hv["unit04"]


def test_database_url_option_needs_no_configuration(
    env: ProviderEnv, postgres_url: str, tmp_path: Path
) -> None:
    reset_postgres(postgres_url)
    populate(env, postgres_url)
    src = source(tmp_path, "hsmctl.yaml")
    groups, hv = listing(inventory(src, tmp_path, env={"HSMCTL_DATABASE_URL": postgres_url}))
    assert groups["state_customer_owned"] == ["unit03"]
    assert "hsm_config" not in hv["unit03"]


def test_cache_hit_does_not_read_the_store(store_config: Path, tmp_path: Path) -> None:
    """With the cache on, a second run shows the first run's picture although the store
    changed in between; --flush-cache reads the store again."""
    cache = tmp_path / "cache"
    src = source(
        tmp_path,
        "cached.hsmctl.yml",
        cache=True,
        cache_plugin="ansible.builtin.jsonfile",
        cache_connection=str(cache),
        cache_timeout=3600,
    )
    run_env = {"HSMCTL_CONFIG": str(store_config)}
    groups, _ = listing(inventory(src, tmp_path, env=run_env))
    assert groups["state_provisioning"] == ["unit01", "unit02"]
    assert len(list(cache.iterdir())) == 1

    with _store(store_config) as store:
        store.set_state("unit01", ApplianceState.PROVISIONED)

    groups, _ = listing(inventory(src, tmp_path, env=run_env))
    assert groups["state_provisioning"] == ["unit01", "unit02"]  # from the cache
    assert "state_provisioned" not in groups
    groups, _ = listing(inventory(src, tmp_path, "--list", "--flush-cache", env=run_env))
    assert groups["state_provisioning"] == ["unit02"]
    assert groups["state_provisioned"] == ["unit01"]
    # Without the cache every run reads the store.
    uncached = source(tmp_path, "plain.hsmctl.yml")
    groups, _ = listing(inventory(uncached, tmp_path, env=run_env))
    assert groups["state_provisioned"] == ["unit01"]


def _store(conf: Path) -> Store:
    from hsmctl.config import load

    config = load(str(conf))
    return Store.for_config(config)


# -- what it claims, and how it fails ----------------------------------------------------


def test_claims_only_its_file_names(env: ProviderEnv, tmp_path: Path) -> None:
    plugin = load_plugin()
    for name in ("hsmctl.yml", "hsmctl.yaml", "prod.hsmctl.yml", "/x/a.b.hsmctl.yaml"):
        assert plugin.claims(name), name
    for name in ("inventory.yml", "hsmctl.yml.bak", "myhsmctl.yml", "hsmctl.json", "x.hsmctl"):
        assert not plugin.claims(name), name
    # Through ansible-inventory: a file of another name is not this plugin's.
    other = source(tmp_path, "inventory.yml")
    proc = inventory(other, tmp_path, env={"HSMCTL_CONFIG": str(env.config)})
    assert proc.returncode != 0
    assert "could not be verified by inventory plugin 'hsmctl.fleet.hsmctl_state'" in proc.stderr
    # playbooks/inventory/hsmctl.yml is claimed (and sets ansible_host through compose).
    proc = inventory(
        REPO / "playbooks/inventory/hsmctl.yml", tmp_path, env={"HSMCTL_CONFIG": str(env.config)}
    )
    _, hv = listing(proc)
    assert hv["unit01"]["ansible_host"] == hv["unit01"]["hsm_mgmt_ip"] == "127.0.0.11"


def test_missing_store_fails_loudly_and_is_not_created(tmp_path: Path) -> None:
    state = tmp_path / "state"
    conf = tmp_path / "provider.yaml"
    conf.write_text(yaml.safe_dump({"role": "provider", "state_dir": str(state)}))
    proc = inventory(source(tmp_path, "hsmctl.yml"), tmp_path, env={"HSMCTL_CONFIG": str(conf)})
    assert proc.returncode != 0
    assert f"state store {state / 'hsmctl.db'} does not exist" in proc.stderr
    assert not state.exists()


def test_unreachable_postgres_fails_loudly(tmp_path: Path) -> None:
    src = source(tmp_path, "hsmctl.yml", database_url="postgresql://u:pw-never-shown@127.0.0.1:1/x")
    proc = inventory(src, tmp_path)
    assert proc.returncode != 0
    assert "state store postgresql+psycopg://u:***@127.0.0.1:1/x" in proc.stderr
    assert "refused" in proc.stderr
    assert "pw-never-shown" not in proc.stderr + proc.stdout


def test_unmigrated_stores_fail_loudly_and_stay_unmigrated(
    postgres_url: str, tmp_path: Path
) -> None:
    # A SQLite file that is no hsmctl store (no schema).
    bare = tmp_path / "bare.db"
    sqlite3.connect(bare).close()
    proc = inventory(source(tmp_path, "a.hsmctl.yml", database_url=str(bare)), tmp_path)
    assert proc.returncode != 0
    assert "is not an hsmctl state store (no schema)" in proc.stderr
    assert bare.stat().st_size == 0  # not migrated
    # An empty PostgreSQL database: the same, and still no tables after.
    reset_postgres(postgres_url)
    proc = inventory(source(tmp_path, "b.hsmctl.yml", database_url=postgres_url), tmp_path)
    assert proc.returncode != 0
    assert "is not an hsmctl state store (no schema)" in proc.stderr
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    # A store migrated by a newer hsmctl.
    newer = tmp_path / "newer" / "hsmctl.db"
    Store.open(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute(
            "INSERT INTO schema_version (version, description, applied_at)"
            " VALUES (?, 'future', '2099-01-01 00:00:00')",
            (LATEST + 1,),
        )
    conn.close()
    proc = inventory(source(tmp_path, "c.hsmctl.yml", database_url=str(newer)), tmp_path)
    assert proc.returncode != 0
    assert f"has schema version {LATEST + 1}; this hsmctl reads {LATEST}" in proc.stderr
    assert "upgrade hsmctl" in proc.stderr


def test_bad_configurations_fail_loudly(env: ProviderEnv, tmp_path: Path) -> None:
    proc = inventory(
        source(tmp_path, "hsmctl.yml", bogus=1), tmp_path, env={"HSMCTL_CONFIG": str(env.config)}
    )
    assert proc.returncode != 0
    assert "unknown option(s) bogus" in proc.stderr
    missing = tmp_path / "missing.yaml"
    proc = inventory(source(tmp_path, "hsmctl.yml"), tmp_path, env={"HSMCTL_CONFIG": str(missing)})
    assert proc.returncode != 0
    assert f"configuration file {missing} does not exist" in proc.stderr
    tenant = tmp_path / "tenant.yaml"
    tenant.write_text(yaml.safe_dump({"role": "tenant", "tenant": "t1"}))
    proc = inventory(source(tmp_path, "hsmctl.yml"), tmp_path, env={"HSMCTL_CONFIG": str(tenant)})
    assert proc.returncode != 0
    assert "is a tenant configuration, not a provider's" in proc.stderr


# -- read-only ---------------------------------------------------------------------------


def _fingerprint(db: Path) -> tuple[str, int, int]:
    return hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns, db.stat().st_size


def test_reading_changes_nothing(env: ProviderEnv, tmp_path: Path) -> None:
    """The database file's bytes and mtime, its schema version and every row are the
    same after inventory runs (a migration or a sync would journal; a pin would write)."""
    db = tmp_path / "state" / "hsmctl.db"
    populate(env, str(db))
    conf = env.write_config("provider-ro.yaml", state_dir=str(db.parent))
    with Store.open(db) as store:
        version, rows = store.schema_version(), store.snapshot()
    before = _fingerprint(db)
    for name in ("hsmctl.yml", "cached.hsmctl.yml"):
        opts: dict[str, Any] = (
            {
                "cache": True,
                "cache_plugin": "ansible.builtin.jsonfile",
                "cache_connection": str(tmp_path / "cache"),
            }
            if "cached" in name
            else {}
        )
        listing(
            inventory(source(tmp_path, name, **opts), tmp_path, env={"HSMCTL_CONFIG": str(conf)})
        )
    assert _fingerprint(db) == before
    with Store.open_read_only(db) as store:
        assert store.schema_version() == version == LATEST
        assert store.snapshot() == rows


def test_reads_a_store_on_a_read_only_filesystem(env: ProviderEnv, tmp_path: Path) -> None:
    """A copy of the store on a read-only bind mount (in a mount namespace of its own):
    as root, file modes stop nothing, a read-only filesystem stops every write — any
    create, migrate, sync or pin would fail the run."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private read-only mount")
    live = tmp_path / "live" / "hsmctl.db"
    populate(env, str(live))
    copy = tmp_path / "ro"
    copy.mkdir()
    shutil.copy2(live, copy / "hsmctl.db")
    assert sorted(p.name for p in copy.iterdir()) == ["hsmctl.db"]  # no -wal, no -shm
    (copy / "hsmctl.db").chmod(0o444)
    copy.chmod(0o555)
    before = _fingerprint(copy / "hsmctl.db")
    src = source(tmp_path, "hsmctl.yml", database_url=str(copy / "hsmctl.db"))
    script = (
        f'mount --bind -o ro "{copy}" "{copy}" && '
        f'exec "{BIN / "ansible-inventory"}" -i "{src}" --list'
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        cwd=REPO,
        env={"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    groups, hv = listing(proc)
    assert groups["state_customer_owned"] == ["unit03"]
    assert hv["unit02"]["hsm_data_ip"] == "10.20.1.9"
    assert _fingerprint(copy / "hsmctl.db") == before
    assert sorted(p.name for p in copy.iterdir()) == ["hsmctl.db"]
    copy.chmod(0o755)


# -- documentation ----------------------------------------------------------------------


def test_ansible_doc_renders_the_plugin(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "inventory", "hsmctl.fleet.hsmctl_state"],
        env={
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path),
            "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        },
        cwd=tmp_path,  # no project ansible.cfg: found through the collections path alone
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    for word in (
        "keyed_groups",
        "compose",
        "cache_plugin",
        "database_url",
        "hsm_mgmt_ip",
        ".hsmctl.yml",
        "EXAMPLES",
    ):
        assert word in proc.stdout, word
