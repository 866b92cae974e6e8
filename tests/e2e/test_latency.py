"""The sandbox with network latency (`fab sandbox.up --rtt`): a userspace proxy between the
deploying machine and the fleet and its S3, while the hosts reach S3 directly."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, isolated, start_fleet

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

SUBNET = "127.0.36"
RTT = 0.05


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    f = start_fleet(tmp_path_factory.mktemp("latency"), subnet=SUBNET, hosts=2, rtt=RTT)
    try:
        yield f
    finally:
        sandbox.down(f.sb.dir)


def _ssh_true(f: Fleet) -> float:
    t = time.perf_counter()
    subprocess.run(
        ["ssh", "-F", str(f.sb.ssh_config), "web1", "true"],
        check=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return time.perf_counter() - t


def test_the_deploying_machine_goes_through_the_proxy(fleet: Fleet) -> None:
    f = fleet
    name = sandbox.s3_name(isolated(SUBNET))
    assert f.sb.rtt == RTT
    assert f.sb.s3_endpoint.startswith(f"http://{name}:")
    # Here the S3 name resolves to the proxy; on a host (private /etc) to S3 itself.
    assert socket.gethostbyname(name) == sandbox.latency_ip(f"{isolated(SUBNET)}.255")
    assert f.ssh("web1", f"getent hosts {name}").split()[0] == "127.0.0.1"
    assert f"HostName {sandbox.latency_ip(f.sb.hosts['web1'])}" in f.sb.ssh_config.read_text()
    # An OpenSSH login + one command is about 8 round trips (TCP, banners, kex, auth, channel).
    assert min(_ssh_true(f) for _ in range(2)) >= 5 * RTT


def test_hotfix_through_the_latency(fleet: Fleet) -> None:
    f = fleet
    f.fab("deploy.setup")
    sha = f.commit("through latency", {"VERSION_NOTE": "rtt\n"})
    r = f.fab("deploy.hotfix")
    assert "2 ok, 0 failed" in r.stdout, r.stdout
    for host in ("web1", "web2"):
        assert f.revision(host) == sha
        assert f.version(host) == sha
    assert (f.pointer() or {}).get("commit") == sha


def test_set_rtt_restarts_the_proxy_with_the_new_delay(fleet: Fleet) -> None:
    f = fleet
    try:
        sandbox.set_rtt(f.sb.dir, 0.3)
        assert sandbox.load(f.sb.dir).rtt == 0.3
        assert _ssh_true(f) >= 5 * 0.3
    finally:
        sandbox.set_rtt(f.sb.dir, RTT)


def test_down_removes_the_proxy_and_the_hosts_line(tmp_path: Path) -> None:
    sb = sandbox.up(tmp_path / "sb", hosts=1, subnet=isolated("127.0.43"), s3_port=0, rtt=0.02)
    name = sandbox.s3_name(isolated("127.0.43"))
    try:
        assert name in Path("/etc/hosts").read_text()
        proxy_ip = sandbox.latency_ip(sb.hosts["web1"])
        socket.create_connection((proxy_ip, 22), timeout=2).close()
    finally:
        stopped = sandbox.down(sb.dir)
    assert any("latency proxy" in s for s in stopped), stopped
    assert name not in Path("/etc/hosts").read_text()
    with pytest.raises(OSError):
        socket.create_connection((proxy_ip, 22), timeout=2).close()
