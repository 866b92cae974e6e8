"""hotfix in batches on a sandbox fleet: --batch, --canary, fail fast. Real fab, real sshd, local S3."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

HOSTS = ("web1", "web2", "web3", "web4")
MARKER = "/srv/shop/shared/break-the-canary"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("batches"), subnet="127.0.37", hosts=len(HOSTS))
    yield f
    sandbox.down(f.sb.dir)


def test_dry_run_prints_the_batches(fleet: Fleet) -> None:
    r = fleet.fab("deploy.hotfix", "--canary=1", "--batch=2", "--dry-run")
    assert (
        "canary 1: web1" in r.stdout
        and "batch 2: web2, web3" in r.stdout
        and "batch 3: web4" in r.stdout
    )
    assert fleet.pointer() is None  # nothing was published


def test_batch_of_one_updates_the_whole_fleet(fleet: Fleet) -> None:
    commit = fleet.git("rev-parse", "HEAD")
    r = fleet.fab("deploy.hotfix", "--batch=1")
    for i, h in enumerate(HOSTS, 1):
        assert f"batch {i}/4: {h}" in r.stdout
        assert fleet.revision(h) == commit and fleet.version(h) == commit
    assert "4 ok, 0 failed" in r.stdout
    assert fleet.pointer()["commit"] == commit


def test_failed_canary_leaves_the_rest_untouched(fleet: Fleet) -> None:
    old = fleet.git("rev-parse", "HEAD")
    before = {h: fleet.current(h) for h in HOSTS}
    new = fleet.commit("a hotfix the canary rejects")
    # The hook fails only where the marker exists: on web1, the canary.
    cfg = fleet.variant(
        "canary",
        hooks={"before_swap": [f"test ! -e {MARKER} || {{ echo canary says no; exit 4; }}"]},
        health={"timeout": 10},
    )
    fleet.ssh("web1", f"mkdir -p /srv/shop/shared && touch {MARKER}")
    try:
        r = fleet.fab("deploy.hotfix", "--canary=1", config=cfg, check=False)
    finally:
        fleet.ssh("web1", f"rm -f {MARKER}")
    assert r.returncode != 0, r.stdout
    assert "canary says no" in r.stdout + r.stderr
    assert {h: fleet.current(h) for h in HOSTS} == before  # the canary kept its release too
    for h in HOSTS:
        assert fleet.revision(h) == old != new
    lines = r.stdout.splitlines()
    for h in ("web2", "web3", "web4"):
        assert any(h in line and "not touched" in line for line in lines), r.stdout
    assert any("web1" in line and "FAILED" in line for line in lines), r.stdout
    assert "0 ok, 1 failed, 3 not touched" in r.stdout
    assert fleet.pointer()["commit"] == old  # a failed run publishes nothing


def test_each_host_is_out_of_traffic_for_its_swap_and_back_after(fleet: Fleet) -> None:
    """traffic.drain/restore run on the node; the before_swap hook fails unless its host is drained."""
    flag = "/srv/shop/shared/drained"
    cfg = fleet.variant(
        "drain",
        traffic={"drain": f"touch {flag}", "restore": f"rm {flag}", "run_on": "node"},
        hooks={"before_swap": [f"test -e {flag} || {{ echo not drained; exit 5; }}"]},
    )
    new = fleet.commit("a hotfix behind a drained balancer")
    r = fleet.fab("deploy.hotfix", "--batch=2", config=cfg)
    assert "batch 1/2: web1, web2" in r.stdout and "batch 2/2: web3, web4" in r.stdout
    assert r.stdout.count("out of traffic") == 4 and r.stdout.count("back in traffic") == 4, (
        r.stdout
    )
    # Every host downloaded and extracted before the first one left traffic.
    assert r.stdout.index("prepared 4 host(s)") < r.stdout.index("out of traffic"), r.stdout
    for h in HOSTS:
        assert fleet.revision(h) == new and fleet.version(h) == new
        assert fleet.ssh(h, f"test -e {flag} && echo left || echo gone").strip() == "gone"
        assert fleet.ssh(h, "ls -A /srv/shop/releases | grep -c '^\\.' || true").strip() == "0"
    # Hosts already on the bundle have nothing to do: none leaves traffic.
    r = fleet.fab("deploy.hotfix", "--batch=2", config=cfg)
    assert "out of traffic" not in r.stdout and "4 already on it" in r.stdout, r.stdout
    r = fleet.fab("deploy.rollback", config=cfg)
    # No min_healthy: traffic settings keep one host in, so 4 hosts go as 3 + 1.
    assert "batch 1/2: web1, web2, web3" in r.stdout and "batch 2/2: web4" in r.stdout
    for h in HOSTS:
        assert fleet.revision(h) != new
        assert fleet.ssh(h, f"test -e {flag} && echo left || echo gone").strip() == "gone"


def test_a_hotfix_killed_while_a_host_is_drained_is_put_back_by_the_next_run(
    fleet: Fleet, tmp_path: Path
) -> None:
    """kill -9 of fab while web1 is drained (its drain command says so through a marker file,
    then holds until released); the next run, under the lock, runs traffic.restore for it."""
    d = tmp_path
    cfg = fleet.variant(
        "killdrain",
        traffic={
            "drain": f"touch {d}/drained-{{host}} {d}/ready; "
            f"while [ ! -e {d}/go ]; do sleep 0.05; done",
            "restore": f"rm -f {d}/drained-{{host}}; echo {{host}} >> {d}/restored",
        },
    )
    fleet.commit("a hotfix killed while web1 is out of traffic")
    p = fleet.fab_bg("deploy.hotfix", "--batch=1", config=cfg)
    try:
        wait_for(lambda: (d / "ready").exists() or p.poll() is not None, 120, what="web1 drained")
        assert p.poll() is None, p.communicate()
        p.kill()
        p.wait(30)
    finally:
        (d / "go").touch()  # the orphaned drain command exits too
        if p.poll() is None:
            p.kill()
    assert [f.name for f in d.glob("drained-*")] == ["drained-web1"]
    assert not (d / "restored").exists()  # nobody put it back
    r = fleet.fab("deploy.hotfix", "--hosts=web2", config=cfg)
    line = next(ln for ln in r.stdout.splitlines() if "reconciled an interrupted hotfix" in ln)
    assert "web1 put back in traffic" in line, r.stdout
    assert (d / "restored").read_text().split() == ["web1", "web2"]  # web1 first, then its own
    assert list(d.glob("drained-*")) == []
    r = fleet.fab("deploy.hotfix", "--hosts=web3", config=cfg)
    assert "reconciled" not in r.stdout  # nothing left to put back
