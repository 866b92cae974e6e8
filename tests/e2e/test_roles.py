"""Roles on a sandbox fleet: web1 is web (HTTP check, the top-level restart), web2 and web3 are
workers (a command check and their own restart). Real fab, real sshd, local S3."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

LOG = "/srv/shop/shared/restarts.log"
FAIL = "/srv/shop/shared/fail-worker-check"
WORKERS = ("web2", "web3")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("roles"), subnet="127.0.42", hosts=3)
    yield f
    sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def cfg(fleet: Fleet) -> Path:
    return fleet.variant(
        "roles",
        hosts={
            "web1": {"roles": ["web"]},
            "web2": {"roles": ["worker"]},
            "web3": {"roles": "worker"},
        },
        restart=f"systemctl restart shop && echo web >> {LOG}",
        roles={
            "worker": {
                "restart": f"systemctl restart shop && echo worker >> {LOG}",
                "health": {"command": f"test ! -e {FAIL}", "timeout": 2},
            }
        },
    )


def restarts(fleet: Fleet, host: str) -> list[str]:
    return fleet.ssh(host, f"cat {LOG} 2>/dev/null || true").split()


def test_hotfix_restarts_each_role_with_its_own_command(fleet: Fleet, cfg: Path) -> None:
    commit = fleet.git("rev-parse", "HEAD")
    r = fleet.fab("deploy.hotfix", config=cfg)
    assert "3 ok, 0 failed" in r.stdout
    assert restarts(fleet, "web1") == ["web"]
    for h in WORKERS:
        assert restarts(fleet, h) == ["worker"]
        assert fleet.revision(h) == commit and fleet.version(h) == commit
    # The installed node config is the role's: a worker's names its restart and command check.
    node_json = fleet.ssh("web2", "cat /usr/local/lib/fabdeploy/shop/node.json")
    assert "echo worker" in node_json and FAIL in node_json and "8080/health" not in node_json
    assert "8080/health" in fleet.ssh("web1", "cat /usr/local/lib/fabdeploy/shop/node.json")


def test_a_failing_worker_check_reverts_only_that_host(fleet: Fleet, cfg: Path) -> None:
    old = fleet.git("rev-parse", "HEAD")
    new = fleet.commit("web3's worker check will fail")
    fleet.ssh("web3", f"touch {FAIL}")
    try:
        r = fleet.fab("deploy.hotfix", config=cfg, check=False)
    finally:
        fleet.ssh("web3", f"rm -f {FAIL}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 ok, 1 failed" in r.stdout
    assert fleet.revision("web3") == old and fleet.version("web3") == old  # put back, restarted
    assert fleet.revision("web1") == new and fleet.revision("web2") == new
    assert restarts(fleet, "web3")[-2:] == [
        "worker",
        "worker",
    ]  # the new release, then the old one again
    assert fleet.pointer()["commit"] == old  # a failed host: nothing published


def test_roles_worker_touches_only_workers(fleet: Fleet, cfg: Path) -> None:
    new = fleet.commit("for the workers only")
    web_before = (fleet.current("web1"), restarts(fleet, "web1"))
    r = fleet.fab("deploy.hotfix", "--roles=worker", config=cfg)
    assert "2 ok, 0 failed" in r.stdout
    for h in WORKERS:
        assert fleet.revision(h) == new and restarts(fleet, h)[-1] == "worker"
    assert (fleet.current("web1"), restarts(fleet, "web1")) == web_before
    st = fleet.fab("deploy.status", "--roles=web", config=cfg)
    assert "web1" in st.stdout and "web2" not in st.stdout


def test_unknown_role_is_one_line_listing_known_ones(fleet: Fleet, cfg: Path) -> None:
    r = fleet.fab("deploy.hotfix", "--roles=db", config=cfg, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"error: unknown role db (no host in {cfg} has it); known roles: worker, web"
    )


def test_a_roll_goes_in_the_role_order_given(fleet: Fleet, cfg: Path) -> None:
    r = fleet.fab("deploy.roll", "--roles=worker,web", "--dry-run", config=cfg)
    lines = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("batch")]
    assert lines == ["batch 1: web2", "batch 2: web3", "batch 3: web1"]
