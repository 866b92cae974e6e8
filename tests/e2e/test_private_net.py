"""Nodes in a private network behind a bastion (issue 15, "Done when"): the fleet sits in its
own network namespace (a veth pair to this machine, whose only way in is the bastion's
address and whose only way out is S3's), so the deploying machine reaches the nodes only
through the bastion (ssh_config: ProxyJump gw, known_hosts strict for the bastion too).
Hotfix and roll pass with the health check on the node; checked from here, it fails.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox


def _why_not() -> str | None:
    reason = can_run_sandbox()
    if reason:
        return reason
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return "needs `ip` and `nsenter` (iproute2, util-linux)"
    if not Path("/run/netns").exists() and not Path("/var/run").exists():
        return "no /run for network namespaces"
    return None


pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "")]

SUBNET = "127.0.46"
HOSTS = ("web1", "web2")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    f = start_fleet(
        tmp_path_factory.mktemp("privnet"),
        subnet=SUBNET,
        hosts=len(HOSTS),
        reboot_delay=0.3,
        private_net=True,
    )
    ns = Path("/run/netns", sandbox.netns_name(sandbox.isolated_subnet(f.sb)))
    try:
        assert ns.exists()
        f.fab("deploy.setup")
        yield f
    finally:
        sandbox.down(f.sb.dir)
    assert not ns.exists()  # down removes the namespace (and with it the veth pair)


def node_status(fleet: Fleet, host: str) -> dict:
    out = fleet.ssh(host, "/usr/bin/python3 /usr/local/lib/fabdeploy/shop/node.py status")
    return json.loads(out.strip().splitlines()[-1])


def served(fleet: Fleet, host: str) -> str:
    """The app's /version, asked on the node itself (from here it cannot be reached)."""
    ip = fleet.sb.hosts[host]
    return fleet.ssh(host, f"curl -fsS http://{ip}:8080/version").strip()


def test_the_nodes_are_reachable_only_through_the_bastion(fleet: Fleet) -> None:
    sb = fleet.sb
    assert sb.gateway == "gw" and set(sb.hosts) == set(HOSTS)
    for host in HOSTS:
        with pytest.raises(OSError):
            socket.create_connection((sb.hosts[host], 22), timeout=3).close()
        assert fleet.ssh(host, "hostname").strip() == host  # OpenSSH, through the bastion
    assert sandbox._ssh_banner(sb.gateway_ip or "")  # the bastion is reachable from here
    assert sb.ssh_config.read_text().count("ProxyJump gw\n") == len(HOSTS)
    assert any(line.startswith("gw,") for line in sb.known_hosts.read_text().splitlines())
    # S3 is at the one address the nodes can reach outside their network.
    subnet = sandbox.isolated_subnet(sb)
    assert sb.s3_endpoint.startswith(f"http://{sandbox.private_ip(subnet, 254)}:")


def test_hotfix_passes_with_the_health_check_on_the_node(fleet: Fleet) -> None:
    sha = fleet.commit("hotfix behind the bastion")
    r = fleet.fab("deploy.hotfix")
    assert "2 ok, 0 failed" in r.stdout, r.stdout
    for host in HOSTS:
        assert fleet.revision(host) == sha and served(fleet, host) == sha
        health = node_status(fleet, host)["last_health"]
        assert (
            health["ok"] and f"{fleet.sb.hosts[host]}:8080/health answered 200" in health["detail"]
        )


def test_checked_from_here_the_health_check_fails(fleet: Fleet) -> None:
    before = fleet.current("web1")
    fleet.commit("checked from the deploying machine")
    cfg = fleet.variant("from-here", health={"on": "controller", "timeout": 2})
    r = fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg, check=False)
    assert r.returncode != 0 and "health check failed" in r.stdout, r.stdout
    assert fleet.current("web1") == before


def test_roll_passes_with_the_health_check_on_the_node(fleet: Fleet) -> None:
    sha = fleet.commit("rolled behind the bastion")
    boots = {h: len(fleet.boots(h)) for h in HOSTS}
    r = fleet.fab("deploy.roll")
    assert "not touched" not in r.stdout and r.stdout.count("healthy (") == len(HOSTS), r.stdout
    for host in HOSTS:
        assert len(fleet.boots(host)) == boots[host] + 1
        assert fleet.revision(host) == sha and served(fleet, host) == sha
        st = node_status(fleet, host)
        # Checked after this boot, on the node, by the status command the roll sent.
        assert st["last_health"]["ok"] and st["last_health"]["boot_id"] == st["boot_id"]
