"""Fleet plumbing that needs no hosts: host-key policy, quoting, batching, node commands."""

from __future__ import annotations

import shlex
from pathlib import Path

import paramiko
import pytest

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.ssh import connect
from fabdeploy.basics import config
from fabdeploy.ops.batches import plan
from fabdeploy.ops.targets import select_hosts


def make_cfg(tmp_path: Path, extra: str = "", ssh_config: str = "") -> config.Config:
    (tmp_path / "ssh_config").write_text(
        ssh_config or "Host web1\n  HostName 10.1.2.3\n  Port 2222\n"
    )
    (tmp_path / "known_hosts").write_text("")
    p = tmp_path / "deploy.yml"
    p.write_text(
        "app: shop\nrepo: .\ns3: {bucket: b}\ndeploy_to: /srv/shop\nhosts: [web1, web2, web3, web4, web5]\n"
        "ssh: {config: ssh_config, known_hosts: known_hosts" + extra + "}\n"
    )
    return config.load(p)


def test_connections_reject_unknown_host_keys_by_default(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    conn = connect(cfg, cfg.hosts[0])
    assert isinstance(conn.client._policy, paramiko.RejectPolicy)
    assert (conn.host, conn.port) == ("10.1.2.3", 2222)  # resolved through ssh_config


def test_gateways_are_strict_too(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        ssh_config=(
            "Host web1\n  HostName 10.0.0.1\n  ProxyJump bastion\nHost bastion\n  HostName 192.0.2.1\n"
        ),
    )
    conn = connect(cfg, cfg.hosts[0])
    assert conn.gateway is not None and conn.gateway.host == "192.0.2.1"
    assert isinstance(conn.gateway.client._policy, paramiko.RejectPolicy)


def test_opting_out_checks_no_unknown_host_key_and_writes_no_known_hosts(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, extra=", strict_host_keys: false")
    conn = connect(cfg, cfg.hosts[0])
    assert isinstance(conn.client._policy, paramiko.AutoAddPolicy)
    assert conn.client._host_keys_filename is None  # paramiko would save added keys there


def test_unknown_key_message_does_not_promise_trust_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is remembered with strict_host_keys: false, so the hint must not call it TOFU."""
    from fabdeploy.adapters.ssh import HostError, open_connection

    cfg = make_cfg(tmp_path)
    conn = connect(cfg, cfg.hosts[0])

    def refuse() -> None:
        raise paramiko.SSHException("Server 'web1' not found in known_hosts")

    monkeypatch.setattr(conn, "open", refuse)
    with pytest.raises(HostError) as e:
        open_connection(cfg, cfg.hosts[0], conn)
    msg = str(e.value)
    assert "first use" not in msg and "skip host key checking" in msg and "\n" not in msg


def test_batches_by_count_and_percent(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    hosts = list(cfg.hosts)

    def batches(hs, b):
        return plan(cfg, hs, b, live=len(hs)).groups

    assert [[h.name for h in b] for b in batches(hosts, "2")] == [
        ["web1", "web2"],
        ["web3", "web4"],
        ["web5"],
    ]
    assert [len(b) for b in batches(hosts, "40%")] == [2, 2, 1]
    assert [len(b) for b in batches(hosts, "1%")] == [1] * 5
    assert [len(b) for b in batches(hosts, "100")] == [5]


def test_select_hosts_keeps_order_given(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    assert [h.name for h in select_hosts(cfg, "web3,web1")] == ["web3", "web1"]
    assert len(select_hosts(cfg, None)) == 5


def test_node_commands_are_quoted(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cmd = nodectl.guarded(
        cfg, "activate", "--ref", "feature/x; rm -rf /", "--url", "http://h/k?a=1&b=2"
    )
    # The shell sees the hostile ref as one argument, never as a command.
    words = shlex.split(cmd.split("exec ", 1)[1])
    assert words[words.index("--ref") + 1] == "feature/x; rm -rf /"
    assert words[words.index("--url") + 1] == "http://h/k?a=1&b=2"
    assert f"exit {nodectl.NEEDS_INSTALL}" in cmd


def test_fingerprint_changes_with_node_config(tmp_path: Path) -> None:
    a = make_cfg(tmp_path)
    p = tmp_path / "deploy.yml"
    p.write_text(p.read_text() + "keep_releases: 3\n")
    b = config.load(p)
    assert nodectl.fingerprint(a) != nodectl.fingerprint(b)
    assert nodectl.node_json(b)["keep_releases"] == 3


def test_boot_unit_orders_before_app(tmp_path: Path) -> None:
    p = tmp_path / "deploy.yml"
    make_cfg(tmp_path)
    p.write_text(p.read_text() + "node: {app_unit: shop.service}\n")
    text = nodectl.unit_text(config.load(p))
    assert "Type=oneshot" in text and "Before=shop.service" in text
    assert "WantedBy=multi-user.target" in text
    assert "node.py --config /usr/local/lib/fabdeploy/shop/node.json boot" in text


@pytest.mark.parametrize(
    "stdout,expected",
    [
        ('log line\n{"ok": true, "release": "1"}\n', {"ok": True, "release": "1"}),
        ('{"ok": false, "error": "x"}', {"ok": False, "error": "x"}),
    ],
)
def test_parse_takes_last_json_line(tmp_path: Path, stdout: str, expected: dict) -> None:
    cfg = make_cfg(tmp_path)
    assert nodectl.parse(cfg.hosts[0], "cmd", stdout, "", 0) == expected


def test_parse_without_answer_carries_output(tmp_path: Path) -> None:
    from fabdeploy.adapters.ssh import HostError

    cfg = make_cfg(tmp_path)
    with pytest.raises(HostError) as e:
        nodectl.parse(cfg.hosts[0], "cmd", "", "python3: can't open file\n", 2)
    assert e.value.exit_code == 2 and "can't open file" in str(e.value) and e.value.host == "web1"


def test_tcp_keepalive_is_set_so_dead_peers_are_noticed() -> None:
    import socket

    from fabdeploy.adapters.ssh import _tcp_keepalive

    s = socket.socket()
    try:
        _tcp_keepalive(s, 15)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    finally:
        s.close()
    _tcp_keepalive(object(), 15)  # a gateway channel: left alone, no error


def test_proxyjump_chain_in_its_order_and_every_hop_hardened(tmp_path: Path) -> None:
    """ProxyJump a,b: connect to a, reach b through a, the host through b (Fabric builds it backwards)."""
    import paramiko

    cfg = make_cfg(
        tmp_path,
        extra=", identity_file: /k/deploy",
        ssh_config=(
            "Host web1\n  HostName 10.0.0.1\n  ProxyJump hopa,hopb\n"
            "Host hopa\n  HostName 192.0.2.1\nHost hopb\n  HostName 192.0.2.2\n"
        ),
    )
    conn = connect(cfg, cfg.hosts[0])
    hop_b = conn.gateway
    assert (
        hop_b.host == "192.0.2.2"
        and hop_b.gateway.host == "192.0.2.1"
        and hop_b.gateway.gateway is None
    )
    for hop in (conn, hop_b, hop_b.gateway):
        assert isinstance(hop.client._policy, paramiko.RejectPolicy)
        assert hop.connect_kwargs["banner_timeout"] == cfg.ssh.connect_timeout
        assert hop.connect_kwargs["key_filename"][0] == "/k/deploy"
        assert hop.connect_timeout == int(cfg.ssh.connect_timeout)


@pytest.mark.parametrize("exit_code", [0, 3])
def test_pushed_file_is_removed_whatever_the_node_program_answers(
    tmp_path: Path, exit_code: int
) -> None:
    """issue 13 §2.17: --push copies were left in .fabdeploy after an "unchanged" or failed
    activation. The removal rides in the same command (no extra round trip), run here by a real sh."""
    import dataclasses
    import subprocess
    import sys

    cfg = make_cfg(tmp_path)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    cfg = dataclasses.replace(
        cfg, node=dataclasses.replace(cfg.node, install_dir=str(node_dir), python=sys.executable)
    )
    (node_dir / "node.py").write_text(
        f"import json\ndef main():\n    print(json.dumps({{'ok': {exit_code == 0}, 'changed': False}}))\n"
        f"    return {exit_code}\n"
    )
    pushed = tmp_path / "push-abc.tar.gz"
    pushed.write_bytes(b"bundle")
    cmd = nodectl.guarded(cfg, "activate", "--file", str(pushed), remove_after=str(pushed))

    # The guard bails (node program missing or different): the copy stays for the retry after install.
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    assert r.returncode == nodectl.NEEDS_INSTALL and pushed.exists()

    (node_dir / "node.sha").write_text(nodectl.fingerprint(cfg) + "\n")
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    assert r.returncode == exit_code, r.stderr
    assert '"changed": false' in r.stdout  # the node program's answer still comes through
    assert not pushed.exists()
