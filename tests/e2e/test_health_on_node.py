"""Health checked on the node (health.on: node, the default) where the deploying machine cannot
reach the app: the fleet sits behind the latency proxy, which forwards only sshd and port 8080,
and health.url names port 8090, which the sample app serves on the host's own address only.

This is a bastion in small: the controller reaches sshd, the node reaches its app. With the
check on the controller every host is reverted; on the node hotfix, rollback and roll pass.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

SUBNET = "127.0.44"
PRIVATE = 8090
HOSTS = ("web1", "web2")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    f = start_fleet(
        tmp_path_factory.mktemp("nodehealth"),
        subnet=SUBNET,
        hosts=2,
        rtt=0.01,
        private_port=PRIVATE,
    )
    try:
        f.fab("deploy.setup")
        yield f
    finally:
        sandbox.down(f.sb.dir)


def private_health(fleet: Fleet, name: str, **health: object):
    return fleet.variant(
        name, health={"url": f"http://{{host}}:{PRIVATE}/health", "timeout": 5, **health}
    )


def node_status(fleet: Fleet, host: str) -> dict:
    out = fleet.ssh(host, "/usr/bin/python3 /usr/local/lib/fabdeploy/shop/node.py status")
    return json.loads(out.strip().splitlines()[-1])


def test_the_app_port_is_reachable_from_the_node_only(fleet: Fleet) -> None:
    fleet.fab("deploy.hotfix")  # the app runs a release that serves the private port
    controller_side = sandbox.latency_ip(fleet.sb.hosts["web1"])
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{controller_side}:{PRIVATE}/health", timeout=3)
    # The same address through the proxy serves the forwarded port: the host is up, the port is not reachable.
    with urllib.request.urlopen(f"http://{controller_side}:8080/health", timeout=5) as r:
        assert r.status == 200
    probe = f"import urllib.request as u; print(u.urlopen('http://{fleet.sb.hosts['web1']}:{PRIVATE}/health').status)"
    assert fleet.ssh("web1", f'python3 -c "{probe}"').strip() == "200"


def test_checked_from_the_controller_every_host_is_reverted(fleet: Fleet) -> None:
    before = {h: fleet.current(h) for h in HOSTS}
    fleet.commit("unreachable from here")
    cfg = private_health(fleet, "from-controller", on="controller", timeout=2)
    r = fleet.fab("deploy.hotfix", config=cfg, check=False)
    assert r.returncode != 0 and "0 ok, 2 failed" in r.stdout, r.stdout
    assert "health check failed" in r.stdout and "unreachable" in r.stdout
    assert {h: fleet.current(h) for h in HOSTS} == before


def test_checked_on_the_node_hotfix_and_rollback_pass(fleet: Fleet) -> None:
    sha = fleet.commit("checked on the node")
    cfg = private_health(fleet, "on-node")
    r = fleet.fab("deploy.hotfix", config=cfg)
    assert "2 ok, 0 failed" in r.stdout, r.stdout
    for h in HOSTS:
        assert fleet.revision(h) == sha and fleet.version(h) == sha
        health = node_status(fleet, h)["last_health"]
        assert (
            health["ok"]
            and f"{fleet.sb.hosts[h]}:{PRIVATE}/health answered 200" in health["detail"]
        )
    r = fleet.fab("deploy.rollback", "--hosts=web1", config=cfg)
    assert "1 ok, 0 failed" in r.stdout and fleet.revision("web1") != sha


def test_a_broken_app_is_reverted_by_the_node(fleet: Fleet) -> None:
    app = (fleet.sb.app_repo / "app.py").read_text()
    bad = fleet.commit("break /health", {"app.py": app.replace('"/health"', '"/healthz-moved"')})
    cfg = private_health(fleet, "on-node-quick", timeout=2)
    before = fleet.current("web2")
    r = fleet.fab("deploy.hotfix", "--hosts=web2", config=cfg, check=False)
    assert (
        r.returncode != 0
        and "health check failed" in r.stdout
        and f":{PRIVATE}/health answered 404" in r.stdout
    )
    assert fleet.current("web2") == before and fleet.revision("web2") != bad
    assert "rolled back to release" in fleet.ssh("web2", "tail -1 /srv/shop/revisions.log")
    fleet.commit("fix /health", {"app.py": app})


def test_checked_on_the_node_the_roll_passes(fleet: Fleet) -> None:
    sha = fleet.git("rev-parse", "HEAD")
    cfg = private_health(fleet, "on-node")
    boots = {h: len(fleet.boots(h)) for h in HOSTS}
    r = fleet.fab("deploy.roll", config=cfg)
    assert "not touched" not in r.stdout and r.stdout.count("healthy (") == 2, r.stdout
    for h in HOSTS:
        assert len(fleet.boots(h)) == boots[h] + 1
        assert fleet.revision(h) == sha and fleet.version(h) == sha
        st = node_status(fleet, h)
        # Checked after this boot, by the status command the roll sent.
        assert st["last_health"]["ok"] and st["last_health"]["boot_id"] == st["boot_id"]


def test_behind_a_bastion_hotfix_and_roll_pass(fleet: Fleet) -> None:
    """web2 by a private name only its gateway resolves (ProxyJump web1), as in a VPC: the
    deploying machine can neither resolve nor reach it, its node checks its own health."""
    sb = fleet.sb
    fleet.ssh(
        "web1",
        f"grep -q web2.internal /etc/hosts || echo '{sb.hosts['web2']} web2.internal' >> /etc/hosts",
    )
    ssh_config = sb.ssh_config.read_text().replace(
        f"Host web2\n    HostName {sandbox.latency_ip(sb.hosts['web2'])}\n",
        "Host web2\n    HostName web2.internal\n    ProxyJump web1\n",
    )
    assert "ProxyJump web1" in ssh_config
    (sb.dir / "ssh_config_bastion").write_text(ssh_config)
    (sb.dir / "known_hosts_bastion").write_text(
        sb.known_hosts.read_text().replace("web2,", "web2,web2.internal,")
    )
    via = {"ssh": {"config": "ssh_config_bastion", "known_hosts": "known_hosts_bastion"}}

    sha = fleet.commit("through the bastion")
    from_here = fleet.variant(
        "bastion-controller",
        **via,
        health={"url": f"http://{{host}}:{PRIVATE}/health", "timeout": 2, "on": "controller"},
    )
    r = fleet.fab("deploy.hotfix", "--hosts=web2", config=from_here, check=False)
    assert r.returncode != 0 and "health check failed" in r.stdout, r.stdout
    assert fleet.revision("web2") != sha

    on_node = fleet.variant(
        "bastion-node", **via, health={"url": f"http://{{host}}:{PRIVATE}/health", "timeout": 5}
    )
    r = fleet.fab("deploy.hotfix", "--hosts=web2", config=on_node)
    assert "1 ok, 0 failed" in r.stdout and fleet.revision("web2") == sha
    assert (
        f"{sb.hosts['web2']}:{PRIVATE}/health answered 200"
        in node_status(fleet, "web2")["last_health"]["detail"]
    )

    sha = fleet.commit("rolled through the bastion")
    boots = len(fleet.boots("web2"))
    r = fleet.fab("deploy.roll", "--hosts=web2", config=on_node)
    assert "healthy (" in r.stdout and "FAILED" not in r.stdout, r.stdout
    assert (
        len(fleet.boots("web2")) == boots + 1
        and fleet.revision("web2") == sha
        and fleet.version("web2") == sha
    )
    st = node_status(fleet, "web2")
    assert st["last_health"]["ok"] and st["last_health"]["boot_id"] == st["boot_id"]
