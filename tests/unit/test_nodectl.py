"""The controller's side of the node program, without hosts: the exact commands it sends,
run locally where that is cheap (a real python3, a real sh)."""

from __future__ import annotations

import io
import json
import os
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.ssh import CommandResult
from fabdeploy.basics import config
from fabdeploy.basics.errors import HostError


def make_cfg(tmp_path: Path, extra: str = "") -> config.Config:
    p = tmp_path / "deploy.yml"
    p.write_text(
        f"app: shop\nrepo: .\ns3: {{bucket: b}}\ndeploy_to: {tmp_path / 'srv'}\nhosts: [web1]\n"
        f"node_env: {{AWS_SECRET_ACCESS_KEY: s3cr3t}}\n"
        f"node: {{install_dir: {tmp_path / 'lib'}{extra}}}\n"
    )
    return config.load(p)


def test_node_command_ignores_modules_in_the_working_directory(tmp_path: Path) -> None:
    """`python -c` puts the working directory first on sys.path: a json.py in the SSH user's
    home would replace the real module. The node command runs isolated (-I)."""
    cfg = make_cfg(tmp_path)
    lib = Path(cfg.node_dir)
    lib.mkdir()
    (lib / "node.py").write_bytes(nodectl.NODE_SRC.read_bytes())
    home = tmp_path / "home"
    home.mkdir()
    (home / "json.py").write_text("raise SystemExit('the json.py of the home directory ran')\n")
    cmd = nodectl.node_command(cfg, "version")
    assert shlex.split(cmd)[1] == "-I"
    r = subprocess.run(["sh", "-c", cmd], cwd=home, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    assert (lib / "__pycache__").is_dir()  # the bytecode cache still works


def test_boot_unit_is_isolated_and_memory_capped(tmp_path: Path) -> None:
    text = nodectl.unit_text(make_cfg(tmp_path))
    assert f"ExecStart=/usr/bin/python3 -I {tmp_path / 'lib'}/node.py --config" in text
    assert f"MemoryMax={nodectl.BOOT_MEMORY_MAX}\n" in text


class FakeSFTP:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def putfo(self, fo: io.BytesIO, remote: str) -> None:
        # Like sftp-server: open(O_WRONLY|O_CREAT|O_TRUNC, 0666 & ~umask) keeps an existing
        # file's mode. Record what others could read the moment the secret lands.
        existed = os.path.exists(remote)
        with open(remote, "wb") as fh:
            fh.write(fo.getvalue())
        if not existed:
            os.chmod(remote, 0o644)
        self.log.append(("put", remote, stat.S_IMODE(os.stat(remote).st_mode)))


class FakeConn:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def sftp(self) -> FakeSFTP:
        return FakeSFTP(self.log)


def fake_run(log: list[Any], probe: str) -> Any:
    def run(cfg: config.Config, host: Any, conn: Any, command: str, **kw: Any) -> CommandResult:
        log.append(("run", command))
        if command.startswith("if ! test -x"):
            return CommandResult(probe, "", 0)
        if "systemctl" in command:  # the finishing step: no systemd here
            return CommandResult("", "", 0)
        r = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
        return CommandResult(r.stdout, r.stderr, r.returncode)

    return run


PROBE_OK = "python=ok\npyver=3.11\nboto3=ok\nsha=\nenabled=no\nlayout=missing\n"


def test_node_json_is_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(tmp_path)
    log: list[Any] = []
    monkeypatch.setattr(nodectl, "run", fake_run(log, PROBE_OK))
    old = os.umask(0o022)
    try:
        assert nodectl.install(cfg, cfg.hosts[0], FakeConn(log)) == "installed"
    finally:
        os.umask(old)
    puts = {Path(e[1]).name: e[2] for e in log if e[0] == "put"}
    assert puts["node.json.fabdeploy-new"] == 0o600, puts
    secret = (Path(cfg.node_dir) / "node.json.fabdeploy-new").read_text()
    assert "s3cr3t" in secret
    # deploy_to is created without group/other write, which the node program refuses.
    assert stat.S_IMODE(os.stat(cfg.deploy_to).st_mode) & 0o022 == 0


@pytest.mark.parametrize(
    "probe,expected",
    [
        ("python=ok\npyver=3.7\nboto3=ok\n", "is Python 3.7; the node program needs Python >= 3.8"),
        (
            "python=ok\npyver=\nboto3=missing\n",
            "is Python unknown; the node program needs Python >= 3.8",
        ),
        ("python=ok\npyver=3.8\nboto3=missing\n", "boto3 is missing for /usr/bin/python3 on web1"),
        ("python=missing\n", "/usr/bin/python3 not found on web1: install python3 >= 3.8"),
    ],
)
def test_setup_checks_python_version_and_boto3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probe: str, expected: str
) -> None:
    cfg = make_cfg(tmp_path)
    monkeypatch.setattr(nodectl, "run", fake_run([], probe))
    with pytest.raises(HostError) as e:
        nodectl.install(cfg, cfg.hosts[0], FakeConn([]), require_boto3=True)
    assert expected in e.value.message and "\n" not in e.value.message
    assert "--user" not in e.value.message  # -I hides user site-packages


def test_probe_reads_the_python_version_as_the_node_program_runs(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    r = subprocess.run(["sh", "-c", nodectl._probe_script(cfg)], capture_output=True, text=True)
    state = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert nodectl._version(state["pyver"]) >= nodectl.MIN_PYTHON
    assert "/usr/bin/python3 -I -c 'import boto3'" in nodectl._probe_script(cfg)


def test_export_writes_node_json_0600_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(tmp_path)
    modes: dict[str, int] = {}
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        modes[Path(path).name] = mode
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(nodectl.os, "open", spy)
    out = tmp_path / "out"
    nodectl.export(cfg, out)
    assert modes["node.json"] == 0o600
    assert stat.S_IMODE((out / "node.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "install.sh").stat().st_mode) == 0o755


def test_hotfix_sends_the_presigned_url_on_stdin_not_in_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every local user can read a remote command's argv (ps) for the URL's whole hour."""
    from types import SimpleNamespace

    from fabdeploy.adapters.ssh import HostResult
    from fabdeploy.ops import batches as batches_mod
    from fabdeploy.ops import hotfix as hotfix_mod

    cfg = make_cfg(tmp_path)
    url = "https://s3.example/b/shop/bundles/c.tar.gz?X-Amz-Signature=abc&X-Amz-Credential=k"
    calls: list[tuple[tuple[str, ...], Any]] = []

    def call(
        cfg: Any, host: Any, conn: Any, *args: str, stdin: str | None = None, **kw: Any
    ) -> dict:
        calls.append((args, stdin))
        return {"ok": True, "changed": False}

    monkeypatch.setattr(nodectl, "call", call)
    monkeypatch.setattr(
        batches_mod,
        "run_parallel",
        lambda cfg, hosts, work, parallel=None, on_done=None: [
            HostResult(h.name, True, work(h, None)) for h in hosts
        ],
    )
    bundle = SimpleNamespace(
        sha256="0" * 64, commit="c" * 40, ref="main", committed_at=None, size=12345
    )
    store = SimpleNamespace(presign_bundle=lambda commit: url)
    hotfix_mod.hotfix(cfg, store, bundle, SimpleNamespace(hosts=cfg.hosts))
    ((args, stdin),) = calls
    assert all("X-Amz" not in a for a in args) and "--url-stdin" in args
    assert stdin == url + "\n"
    assert args[args.index("--size") + 1] == "12345"
    # One SSH command per host: the guard and the node program, stdin and all.
    cmd = nodectl.guarded(cfg, *args, stdin=True)
    assert "X-Amz" not in cmd


def test_guard_drains_stdin_before_asking_for_an_install(tmp_path: Path) -> None:
    """The sender must never write into a closed channel: the guard reads stdin to EOF."""
    cfg = make_cfg(tmp_path)
    cmd = nodectl.guarded(cfg, "activate", "--url-stdin", stdin=True)
    r = subprocess.run(["sh", "-c", cmd], input="x" * (1 << 20), capture_output=True, text=True)
    assert r.returncode == nodectl.NEEDS_INSTALL
    assert "cat >/dev/null" not in nodectl.guarded(cfg, "status")  # no stdin, no EOF: no drain


def test_run_hands_stdin_to_the_next_session_and_never_to_a_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from fabdeploy.adapters import ssh

    cfg = make_cfg(tmp_path)
    host = cfg.hosts[0]
    conn = ssh._Connection("127.0.0.1")
    seen: dict[str, Any] = {}

    def fake_run(command: str, **kw: Any) -> Any:
        seen.update(stdin=conn._stdin, in_stream=kw["in_stream"])
        return SimpleNamespace(stdout="", stderr="", exited=0)

    monkeypatch.setattr(ssh, "open_connection", lambda *a: None)
    monkeypatch.setattr(conn, "run", fake_run)
    ssh.run(cfg, host, conn, "cat", stdin="secret\n")
    assert seen == {"stdin": b"secret\n", "in_stream": False}  # not invoke's 1-byte pump
    assert conn._stdin is None  # cleared even though no session took it here
    big = "x" * (ssh.INLINE_STDIN + 1)  # more than the window may take: invoke's thread sends it
    ssh.run(cfg, host, conn, "cat", stdin=big)
    assert seen["stdin"] is None and seen["in_stream"].read(1) == big  # whole, in one read


def test_ssh_run_feeds_stdin_then_eof(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fabdeploy.adapters import ssh

    seen: dict[str, Any] = {}

    class Conn:
        def run(self, command: str, **kw: Any) -> Any:
            stream = kw["in_stream"]
            seen["stdin"] = stream.read() if stream is not False else False
            from types import SimpleNamespace

            return SimpleNamespace(stdout="", stderr="", exited=0)

    monkeypatch.setattr(ssh, "open_connection", lambda *a: None)
    cfg = make_cfg(tmp_path)
    ssh.run(cfg, cfg.hosts[0], Conn(), "cat", stdin="secret\n")  # type: ignore[arg-type]
    assert seen["stdin"] == "secret\n"
    ssh.run(cfg, cfg.hosts[0], Conn(), "true")  # type: ignore[arg-type]
    assert seen["stdin"] is False  # no stdin given: none forwarded, as before
