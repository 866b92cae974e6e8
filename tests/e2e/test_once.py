"""Run-once hooks (hooks.once) on a sandbox fleet: the sample app's migration (migrate.py adds
one row per run to shared/migrations.sqlite) must run exactly once per deploy, on one host,
before any host swaps. web1 and web2 are web hosts, web3 a worker (worker.py, its own health
check). Real fab, real sshd, local S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

HOSTS = ("web1", "web2", "web3")
DB = "/srv/shop/shared/migrations.sqlite"
FAIL = "/srv/shop/shared/fail-migration"
COUNT = (
    f"test -e {DB} && python3 -c \"import sqlite3; print(sqlite3.connect('{DB}')"
    ".execute('select count(*) from deploys').fetchone()[0])\" || echo 0"
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("once"), subnet="127.0.57", hosts=3)
    yield f
    sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def cfg(fleet: Fleet) -> Path:
    path = fleet.variant(
        "once",
        hosts={"web1": {"roles": ["web"]}, "web2": {"roles": ["web"]}, "web3": {"roles": "worker"}},
        roles={
            "worker": {
                "restart": "systemctl restart shop && systemctl restart shop-worker",
                "health": {"command": "python3 worker.py --ping", "timeout": 20},
            }
        },
        hooks={"once": [{"run": "python3 migrate.py", "roles": ["web"], "timeout": 60}]},
    )
    fleet.ssh("web3", "systemctl enable shop-worker")  # as a worker's image would have it
    fleet.fab("deploy.setup", config=path)
    return path


def runs(fleet: Fleet) -> dict[str, int]:
    """Rows in each host's migrations.sqlite: how often the migration ran there."""
    return {h: int(fleet.ssh(h, COUNT).strip()) for h in HOSTS}


def currents(fleet: Fleet) -> dict[str, str]:
    return {h: fleet.current(h) for h in HOSTS}


def test_a_whole_fleet_hotfix_runs_the_migration_once_and_a_rerun_does_not(
    fleet: Fleet, cfg: Path
) -> None:
    commit = fleet.git("rev-parse", "HEAD")
    r = fleet.fab("deploy.hotfix", config=cfg)
    assert "3 ok, 0 failed" in r.stdout
    assert f"web1: run-once hooks for {commit[:8]}: `python3 migrate.py`" in r.stdout
    assert f"web1 | migrating {commit[:12]} in /srv/shop/releases/.staging-once-" in r.stdout
    assert "web1 | migrated: 1 deploys recorded" in r.stdout  # its output, live, host-prefixed
    assert runs(fleet) == {"web1": 1, "web2": 0, "web3": 0}
    for h in HOSTS:
        assert fleet.revision(h) == commit
    assert fleet.pointer()["commit"] == commit
    # The worker restarted onto the new release (its health check says so, here too).
    assert (
        fleet.ssh("web3", "cd /srv/shop/current && python3 worker.py --ping; echo rc=$?").strip()
        == "rc=0"
    )
    # The same bundle again: nothing to do, and the migration is not run again.
    again = fleet.fab("deploy.hotfix", config=cfg)
    assert f"run-once hooks already ran for {commit[:8]} (on web1" in again.stdout
    assert again.stdout.count("unchanged (already there)") == 3
    assert runs(fleet) == {"web1": 1, "web2": 0, "web3": 0}


def test_a_subset_runs_it_on_its_first_host_with_the_role(fleet: Fleet, cfg: Path) -> None:
    new = fleet.commit("a subset first")
    before = currents(fleet)
    r = fleet.fab("deploy.hotfix", "--hosts=web3", config=cfg, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: run-once hook `python3 migrate.py` runs on a host with role web, and none of "
        "the hosts of this run (web3) has one: include one (--hosts/--roles), or pass --skip-once"
    )
    assert currents(fleet) == before
    # --push: the bundle reaches the hook's host over SFTP too, and the copy is gone after.
    r = fleet.fab("deploy.hotfix", "--hosts=web3,web2", "--push", config=cfg)
    assert "web2: run-once hooks for" in r.stdout and "2 ok, 0 failed" in r.stdout
    assert runs(fleet) == {"web1": 1, "web2": 1, "web3": 0}
    assert fleet.ssh("web2", "ls -A /srv/shop/.fabdeploy | grep -c push || true").strip() == "0"
    # The rest of the fleet later: the migration already ran for this bundle.
    r = fleet.fab("deploy.hotfix", config=cfg)
    assert "run-once hooks already ran" in r.stdout
    assert runs(fleet) == {"web1": 1, "web2": 1, "web3": 0}
    assert all(fleet.revision(h) == new for h in HOSTS)


def test_skip_once_runs_no_migration(fleet: Fleet, cfg: Path) -> None:
    new = fleet.commit("skip it")
    r = fleet.fab("deploy.hotfix", "--skip-once", config=cfg)
    assert "3 ok, 0 failed" in r.stdout and "run-once" not in r.stdout
    assert all(fleet.revision(h) == new for h in HOSTS)
    assert sum(runs(fleet).values()) == 2


@pytest.mark.parametrize("task", ["deploy.hotfix", "deploy.roll"])
def test_a_failing_migration_changes_no_host_and_moves_no_pointer(
    fleet: Fleet, cfg: Path, task: str
) -> None:
    published = fleet.pointer()["commit"]
    fleet.commit(f"a broken migration ({task})")
    before = currents(fleet)
    boots = {h: len(fleet.boots(h)) for h in HOSTS}
    fleet.ssh("web1", f"touch {FAIL}")
    try:
        r = fleet.fab(task, config=cfg, check=False)
    finally:
        fleet.ssh("web1", f"rm -f {FAIL}")
    assert r.returncode == 1, r.stdout + r.stderr
    first, *tail = r.stderr.strip().splitlines()
    assert first.startswith(
        "error: web1: once hook `python3 migrate.py` failed with exit code 1 on web1"
    ), r.stderr
    assert "no host was changed" in first and "Traceback" not in r.stderr
    assert "  | 0002_add_orders: table orders already exists" in tail
    assert currents(fleet) == before
    assert {h: len(fleet.boots(h)) for h in HOSTS} == boots  # nothing rebooted
    assert fleet.pointer()["commit"] == published
    assert fleet.ssh("web1", "ls -A /srv/shop/releases | grep -c '^\\.' || true").strip() == "0"
    assert sum(runs(fleet).values()) == 2


def test_a_roll_runs_it_once_and_resume_and_rollback_do_not(fleet: Fleet, cfg: Path) -> None:
    new = fleet.commit("roll it")
    r = fleet.fab("deploy.roll", config=cfg)
    assert "web1: run-once hooks for" in r.stdout
    assert runs(fleet) == {"web1": 2, "web2": 1, "web3": 0}
    assert all(fleet.revision(h) == new for h in HOSTS) and fleet.pointer()["commit"] == new
    st = json.loads(fleet.fab("deploy.status", "--json", config=cfg).stdout)
    assert st["once"]["bundle_id"] == new and st["once"]["host"] == "web1"
    r = fleet.fab("deploy.roll", "--resume", config=cfg)
    assert "run-once hooks already ran" in r.stdout
    assert r.stdout.count("skipped (already on it)") == 3
    r = fleet.fab("deploy.rollback", config=cfg)
    assert "3 ok, 0 failed" in r.stdout and "run-once" not in r.stdout
    assert all(fleet.revision(h) != new for h in HOSTS)
    assert runs(fleet) == {"web1": 2, "web2": 1, "web3": 0}
