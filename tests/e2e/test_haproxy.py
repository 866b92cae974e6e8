"""Issue 16's proof: Debian's HAProxy in front of 4 sandbox hosts, health-checked, no retries, no
redispatch, under a steady client load. A whole-fleet hotfix and a whole-fleet rollback drained
through HAProxy's runtime API (traffic.drain/restore run locally) fail no request.

Real fab, real sshd, real HAProxy, local S3. The same run without the drain settings, and what
it costs, is bench/bench_drain.py (its failures are a count there, not an assertion here).
"""

from __future__ import annotations

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox
from fabfile.haproxy_lb import Balancer, Load, servers

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

HOSTS = ("web1", "web2", "web3", "web4")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("haproxy"), subnet="127.0.46", hosts=len(HOSTS))
    try:
        f.fab("deploy.hotfix")  # a first release everywhere, so every backend serves
        yield f
    finally:
        sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def lb(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Balancer:
    subnet = fleet.sb.hosts["web1"].rpartition(".")[0]
    b = Balancer(
        tmp_path_factory.mktemp("lb"),
        f"{subnet}.250:8080",
        {h: f"{fleet.sb.hosts[h]}:8080" for h in HOSTS},
    )
    yield b
    b.stop()


def run_under_load(fleet: Fleet, lb: Balancer, *fab_args: str, config) -> tuple[Load, str]:
    with Load(lb.bind) as load:
        load.wait_requests(20)  # the load runs before the deploy starts...
        r = fleet.fab(*fab_args, config=config)
        load.wait_requests(20)  # ...and after it ends
    return load, r.stdout


def test_whole_fleet_hotfix_and_rollback_fail_no_request(fleet: Fleet, lb: Balancer) -> None:
    cfg = fleet.variant(
        "haproxy",
        traffic={"drain": lb.command("drain"), "restore": lb.command("restore"), "run_on": "local"},
    )
    old = fleet.git("rev-parse", "HEAD")
    new = fleet.commit("a hotfix behind HAProxy")

    load, out = run_under_load(fleet, lb, "deploy.hotfix", config=cfg)
    assert load.failed == 0, f"{load.failed} of {load.ok + load.failed} failed: {load.errors}"
    assert load.versions.get(old) and load.versions.get(new), load.versions  # across the switch
    assert out.count("out of traffic") == 4 and out.count("back in traffic") == 4, out
    assert out.index("prepared 4 host(s)") < out.index("out of traffic"), out
    for h in HOSTS:
        assert fleet.revision(h) == new and fleet.version(h) == new
    assert fleet.pointer()["commit"] == new
    assert {s["status"] for s in servers(lb.sock, lb.backend).values()} == {"UP"}

    load, out = run_under_load(fleet, lb, "deploy.rollback", config=cfg)
    assert load.failed == 0, f"{load.failed} of {load.ok + load.failed} failed: {load.errors}"
    assert load.versions.get(old) and load.versions.get(new), load.versions
    assert out.count("out of traffic") == 4 and out.count("back in traffic") == 4, out
    assert out.index("checked 4 host(s)") < out.index("out of traffic"), out
    for h in HOSTS:
        assert fleet.revision(h) == old and fleet.version(h) == old
    assert fleet.pointer()["commit"] == old
    assert {s["status"] for s in servers(lb.sock, lb.backend).values()} == {"UP"}
