"""The sandbox fleet itself: real sshd hosts in namespaces, reboots, isolation, teardown."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
import yaml

from fabfile import sandbox as sandbox_mod
from fabfile.sandbox import Sandbox

pytestmark = pytest.mark.e2e

HOSTS = {"web1": "127.0.20.1", "web2": "127.0.20.2", "web3": "127.0.20.3"}
SshRun = Callable[..., str]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def boots(sb: Sandbox, host: str) -> list[dict]:
    path = sandbox_mod.host_dir(sb.dir, host) / "boots.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def listening(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    # Zombies count as gone: orphans wait for the machine's init to reap them.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def boot_id(ssh_run: SshRun, host: str) -> str:
    return ssh_run(host, "cat /proc/sys/kernel/random/boot_id").strip()


def reboot_and_wait_down(sb: Sandbox, ssh_run: SshRun, host: str) -> None:
    # The session may be cut while the host goes down, so the exit status is not checked.
    ssh_run(host, "systemctl reboot", check=False)
    wait_for(lambda: not listening(sb.hosts[host], 22), 10, f"{host} to go down")


def test_fleet_is_up(sandbox: Sandbox) -> None:
    assert sandbox.hosts == HOSTS
    assert sandbox_mod.load(sandbox.dir).hosts == HOSTS
    for host in HOSTS:
        (record,) = boots(sandbox, host)
        assert record["down_at"] is None
        assert record["boot_start"] <= record["units_done"] <= record["sshd_ready"]
        uuid.UUID(record["boot_id"])
    assert http_ok(f"{sandbox.s3_endpoint}/{sandbox.bucket}")


def test_generated_files(sandbox: Sandbox) -> None:
    cfg = yaml.safe_load(sandbox.deploy_yml.read_text())
    assert cfg["hosts"] == list(HOSTS)
    assert cfg["s3"]["endpoint_url"] == sandbox.s3_endpoint
    assert cfg["s3"]["bucket"] == sandbox.bucket == "fabdeploy-sandbox"
    assert (sandbox.deploy_yml.parent / cfg["ssh"]["config"]) == sandbox.ssh_config
    assert (sandbox.deploy_yml.parent / cfg["repo"]) == sandbox.app_repo
    log = subprocess.run(
        ["git", "log", "--format=%s", "main"],
        cwd=sandbox.app_repo,
        capture_output=True,
        text=True,
        check=True,
    )
    assert log.stdout.splitlines() == ["initial"]
    assert (sandbox.app_repo / "app.py").is_file()
    env = (sandbox.dir / "env").read_text()
    assert f"export DEPLOY_CONFIG={sandbox.deploy_yml}" in env
    assert "export AWS_ACCESS_KEY_ID=testing" in env


def test_ssh_with_strict_host_keys(sandbox: Sandbox, ssh_run: SshRun) -> None:
    for host in HOSTS:
        assert ssh_run(host, "hostname").strip() == host
    # Strictness is real: without the sandbox's known_hosts the connection is refused.
    proc = subprocess.run(
        [
            "ssh",
            "-F",
            str(sandbox.ssh_config),
            "-o",
            "UserKnownHostsFile=/dev/null",
            "web1",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr


def test_paramiko_finds_host_keys_by_ip(sandbox: Sandbox) -> None:
    client = paramiko.SSHClient()
    client.load_host_keys(str(sandbox.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        HOSTS["web3"],
        username="root",
        key_filename=str(sandbox.key),
        look_for_keys=False,
        allow_agent=False,
        timeout=5,
    )
    try:
        _, stdout, _ = client.exec_command("hostname")
        assert stdout.read().decode().strip() == "web3"
    finally:
        client.close()


def test_private_srv_etc_usr_local(sandbox: Sandbox, ssh_run: SshRun) -> None:
    token = f"sbtest-{uuid.uuid4().hex}"
    paths = [f"/srv/{token}", f"/etc/{token}", f"/usr/local/{token}"]
    ssh_run("web1", " && ".join(f"echo {token} > {p}" for p in paths))
    try:
        check = " ; ".join(f"test -e {p} && echo yes || echo no" for p in paths)
        assert ssh_run("web1", check).split() == ["yes", "yes", "yes"]
        assert ssh_run("web2", check).split() == ["no", "no", "no"]
        assert not any(Path(p).exists() for p in paths)
    finally:
        ssh_run("web1", f"rm -f {' '.join(paths)}")


def test_standins_and_app_layout(sandbox: Sandbox, ssh_run: SshRun) -> None:
    assert ssh_run("web1", "which systemctl").strip() == "/usr/local/bin/systemctl"
    assert ssh_run("web1", "which reboot").strip() == "/usr/local/sbin/reboot"
    for host in HOSTS:
        db = ssh_run(host, "cat /srv/shop/shared/config/database.yml")
        assert yaml.safe_load(db)["production"]["host"] == host
        ssh_run(host, "test -d /srv/shop/shared/log && test -d /srv/shop/shared/tmp/pids")
        assert ssh_run(host, "systemctl is-enabled shop").strip() == "enabled"
        # No release yet, so the app could not start at boot.
        assert ssh_run(host, "systemctl is-active shop; echo rc=$?").split() == ["inactive", "rc=3"]
    assert ssh_run("web1", "systemctl start nope; echo rc=$?", check=False).split()[-1] == "rc=5"
    assert ssh_run("web1", "systemctl status nope; echo rc=$?", check=False).split()[-1] == "rc=4"


ONESHOT_UNIT = """\
[Unit]
Description=sandbox test: record every boot
Before=sbtest-app.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'cat /proc/sys/kernel/random/boot_id >> /srv/sbtest/boots.txt'

[Install]
WantedBy=multi-user.target
"""

APP_UNIT = """\
[Unit]
Description=sandbox test: second copy of the sample app

[Service]
Type=simple
WorkingDirectory=/srv/sbtest
Environment=UNUSED=1
ExecStart=/usr/bin/python3 /srv/sbtest/app.py --bind {ip} --port 8081

[Install]
WantedBy=multi-user.target
"""


def test_reboot_renews_boot_id_and_reruns_units(sandbox: Sandbox, ssh_run: SshRun) -> None:
    ip = HOSTS["web2"]
    app_py = (sandbox.app_repo / "app.py").read_text()
    ssh_run(
        "web2",
        "mkdir -p /srv/sbtest && echo test-rev > /srv/sbtest/REVISION && "
        f"cat > /srv/sbtest/app.py <<'EOF'\n{app_py}EOF\n"
        f"cat > /etc/systemd/system/sbtest-boot.service <<'EOF'\n{ONESHOT_UNIT}EOF\n"
        f"cat > /etc/systemd/system/sbtest-app.service <<'EOF'\n{APP_UNIT.format(ip=ip)}EOF\n"
        "systemctl daemon-reload && systemctl enable sbtest-boot sbtest-app && "
        "systemctl start sbtest-app",
    )
    try:
        wait_for(lambda: http_ok(f"http://{ip}:8081/health"), 10, "sbtest-app to serve")
        assert ssh_run("web2", "systemctl is-active sbtest-app").strip() == "active"
        web1_before, web2_before = boot_id(ssh_run, "web1"), boot_id(ssh_run, "web2")
        n_boots = len(boots(sandbox, "web2"))

        reboot_and_wait_down(sandbox, ssh_run, "web2")
        assert not http_ok(f"http://{ip}:8081/health"), "the app must go down with its host"
        wait_for(lambda: len(boots(sandbox, "web2")) > n_boots, 15, "web2 to boot again")

        record = boots(sandbox, "web2")[-1]
        assert record["boot_id"] != web2_before
        assert boot_id(ssh_run, "web2") == record["boot_id"]
        assert record["boot_start"] - record["down_at"] >= 0.45  # reboot_delay=0.5
        assert ssh_run("web2", "tail -n 1 /srv/sbtest/boots.txt").strip() == record["boot_id"]
        wait_for(lambda: http_ok(f"http://{ip}:8081/health"), 10, "enabled app to start at boot")
        with urllib.request.urlopen(f"http://{ip}:8081/version", timeout=2) as r:
            assert r.read().decode().strip() == "test-rev"
        assert boot_id(ssh_run, "web1") == web1_before
        assert len(boots(sandbox, "web1")) == 1
    finally:
        ssh_run(
            "web2",
            "systemctl disable --now sbtest-app sbtest-boot; "
            "rm -rf /srv/sbtest /etc/systemd/system/sbtest-*.service",
        )
    assert not http_ok(f"http://{ip}:8081/health")


def test_held_host_stays_down_until_released(sandbox: Sandbox, ssh_run: SshRun) -> None:
    ip = HOSTS["web3"]
    hold = sandbox_mod.host_dir(sandbox.dir, "web3") / "hold"
    n_boots = len(boots(sandbox, "web3"))
    hold.touch()
    try:
        reboot_and_wait_down(sandbox, ssh_run, "web3")
        # Observe for three reboot delays: the host must not come back while held.
        held_until = time.monotonic() + 1.5
        while time.monotonic() < held_until:
            assert not listening(ip, 22)
            assert len(boots(sandbox, "web3")) == n_boots
            time.sleep(0.05)
    finally:
        hold.unlink()
    wait_for(lambda: len(boots(sandbox, "web3")) > n_boots, 15, "web3 to boot after release")
    record = boots(sandbox, "web3")[-1]
    assert record["boot_start"] - record["down_at"] >= 1.5
    assert ssh_run("web3", "hostname").strip() == "web3"


def _namespace_pids(unshare_pid: int) -> list[int]:
    """All processes in the PID namespace whose init is unshare_pid's child."""
    (init,) = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    ns = os.readlink(f"/proc/{init}/ns/pid")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns/pid") == ns:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_up_refuses_twice_and_down_stops_everything(needs_sandbox: None, tmp_path: Path) -> None:
    started = time.monotonic()
    sb = sandbox_mod.up(tmp_path, hosts=2, subnet="127.0.21", s3_port=0, reboot_delay=0.2)
    elapsed = time.monotonic() - started
    state = json.loads((tmp_path / "sandbox.json").read_text())
    try:
        assert elapsed < 10, f"up() took {elapsed:.1f}s"
        s3_port = state["s3"]["port"]
        pids = [state["s3"]["pid"], *state["pids"].values()]
        for unshare_pid in state["pids"].values():
            in_ns = _namespace_pids(unshare_pid)
            assert len(in_ns) >= 2  # host_init and sshd at least
            pids += in_ns
        with pytest.raises(sandbox_mod.SandboxError, match="already up"):
            sandbox_mod.up(tmp_path, hosts=2, subnet="127.0.21", s3_port=0)
    finally:
        stopped = sandbox_mod.down(tmp_path)
    assert sorted(stopped) == sorted(
        [
            f"web1 (pid {state['pids']['web1']})",
            f"web2 (pid {state['pids']['web2']})",
            f"s3 (pid {state['s3']['pid']})",
        ]
    )
    assert [p for p in pids if alive(p)] == []
    assert not any(listening(ip, 22) for ip in sb.hosts.values())
    assert not listening("127.0.0.1", s3_port)
    assert sandbox_mod.down(tmp_path) == []
    with pytest.raises(sandbox_mod.SandboxError, match="fab sandbox.up"):
        sandbox_mod.load(tmp_path)
