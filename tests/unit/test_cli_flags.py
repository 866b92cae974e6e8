"""Fabric's own flags mean what Fabric users think: honoured, or refused with one line.

The command-line tests run the real `fab` on a scratch app repo with a two-line fabfile;
only dry runs and refusals, so no host is contacted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fabric import Config as FabricConfig

from fabdeploy import cli
from fabdeploy.adapters import ssh
from fabdeploy.basics import config

FAB = Path(sys.executable).parent / "fab"
FABFILE = "from fabdeploy import deploy\nfrom invoke import Collection\nns = Collection(deploy)\n"
DEPLOY_YML = """\
app: shop
repo: .
s3: {bucket: b}
deploy_to: /srv/shop
hosts: [web1, web2]
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    repo = tmp_path / "app"
    (repo / "fabfile").mkdir(parents=True)
    (repo / "fabfile" / "__init__.py").write_text(FABFILE)
    (repo / "deploy.yml").write_text(DEPLOY_YML)
    (repo / ".git").mkdir()
    return repo


def fab(
    app: Path, *args: str, cwd: Path | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(app.parent)}  # no DEPLOY_CONFIG, no ~/.fabric.yaml
    return subprocess.run(
        [str(FAB), *args],
        cwd=cwd or app,
        env=env,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


def test_dash_h_after_a_task_is_help(app: Path) -> None:
    r = fab(app, "deploy.rollback", "-h")
    assert r.returncode == 0 and "Usage: fab" in r.stdout and "--hosts" in r.stdout


def test_dash_H_is_one_run_over_those_hosts(app: Path) -> None:
    r = fab(app, "-H", "web1", "deploy.rollback", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("dry run") == 1 and "web1" in r.stdout and "web2" not in r.stdout
    assert "pointer" not in r.stdout  # a subset: the published pointer is not moved


def test_dash_H_and_a_different_hosts_is_an_error(app: Path) -> None:
    r = fab(app, "-H", "web1", "deploy.rollback", "--hosts=web2", "--dry-run")
    assert (
        r.returncode == 1
        and r.stderr.strip()
        == "error: -H web1 and --hosts=web2 name different hosts; give one of them"
    )


def test_dry_flag_is_a_dry_run_or_refused(app: Path) -> None:
    r = fab(app, "-R", "deploy.rollback", "--hosts=web2")
    assert r.returncode == 0 and r.stdout.startswith("dry run: would roll back web2"), r.stderr
    r = fab(app, "-R", "deploy.unlock")
    assert r.returncode == 1 and "-R/--dry must change nothing" in r.stderr


@pytest.mark.parametrize(
    "flag,needle", [("-p", "-p/--pty"), ("-w", "-w/--warn-only"), ("--hide=both", "--hide")]
)
def test_run_flags_we_cannot_honour_are_refused(app: Path, flag: str, needle: str) -> None:
    r = fab(app, flag, "deploy.rollback", "--dry-run")
    assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sudo_password_prompt_is_refused(app: Path) -> None:
    r = fab(app, "--prompt-for-sudo-password", "deploy.rollback", "--dry-run", stdin="secret\n")
    assert r.returncode == 1 and "needs no sudo password" in r.stderr


def test_sudo_password_prompt_is_honoured_with_ssh_sudo(app: Path) -> None:
    (app / "deploy.yml").write_text(
        DEPLOY_YML + "ssh: {user: deploy, sudo: true}\nrestart: /usr/bin/systemctl restart shop\n"
    )
    r = fab(app, "--prompt-for-sudo-password", "deploy.rollback", "--dry-run", stdin="secret\n")
    assert r.returncode == 0 and "dry run" in r.stdout, r.stderr


def test_search_root_finds_deploy_yml_beside_the_fabfile(app: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = fab(app, "-r", str(app), "deploy.rollback", "--dry-run", cwd=elsewhere)
    assert r.returncode == 0 and "web1, web2" in r.stdout, r.stderr


def test_subfolder_finds_deploy_yml_up_to_the_repo_root(app: Path) -> None:
    sub = app / "lib" / "deep"
    sub.mkdir(parents=True)
    r = fab(app, "-r", str(app), "deploy.rollback", "--dry-run", cwd=sub)
    assert r.returncode == 0 and "web1, web2" in r.stdout, r.stderr


def test_a_task_given_a_per_host_connection_refuses() -> None:
    from fabric import Connection
    from invoke import Exit

    with pytest.raises(Exit) as e:
        cli.refuse_per_host_call(Connection("web1"), "hotfix")
    assert "fabdeploy's executor is not in charge" in str(e.value.message)


# --- -i, -t, -T, -S and Fabric's config files, as `fab` leaves them in the task's config ---


def _cfg(tmp_path: Path, extra: str = "") -> config.Config:
    p = tmp_path / "deploy.yml"
    p.write_text(DEPLOY_YML + extra)
    return config.load(p)


def test_identity_and_timeouts_from_the_command_line_win(tmp_path: Path) -> None:
    fc = FabricConfig(
        overrides={
            "connect_kwargs": {"key_filename": ["/k/one", "/k/two"], "timeout": 7},
            "timeouts": {"command": 9},
        }
    )
    cfg = cli.apply_flags(
        _cfg(tmp_path, "ssh: {identity_file: /k/yml, connect_timeout: 3, command_timeout: 4}\n"), fc
    )
    assert cfg.ssh.identity_files == (Path("/k/one"), Path("/k/two"))
    assert (cfg.ssh.connect_timeout, cfg.ssh.command_timeout) == (7.0, 9.0)
    conn = ssh.connect(cfg, cfg.hosts[0])
    assert conn.connect_kwargs["key_filename"] == ["/k/one", "/k/two"]  # not /k/yml: -i wins
    assert conn.connect_kwargs["timeout"] == 7


def test_deploy_yml_beats_fabric_config_files_which_fill_the_rest(tmp_path: Path) -> None:
    fc = FabricConfig()
    fc.timeouts.connect = 33  # as from ~/.fabric.yaml or FABRIC_TIMEOUTS_CONNECT
    fc.timeouts.command = 44
    cfg = cli.apply_flags(_cfg(tmp_path, "ssh: {connect_timeout: 3}\n"), fc)
    assert (cfg.ssh.connect_timeout, cfg.ssh.command_timeout) == (3.0, 44.0)


def test_connect_kwargs_from_fabric_config_reach_the_connection(tmp_path: Path) -> None:
    fc = FabricConfig()
    fc.connect_kwargs = {"passphrase": "from-fabric-yaml", "look_for_keys": False}
    cfg = cli.apply_flags(_cfg(tmp_path), fc)
    conn = ssh.connect(cfg, cfg.hosts[0])
    assert (
        conn.connect_kwargs["passphrase"] == "from-fabric-yaml"
        and conn.connect_kwargs["look_for_keys"] is False
    )


def test_ssh_config_flag_beats_deploy_yml(tmp_path: Path) -> None:
    flag_file = tmp_path / "flag_ssh_config"
    flag_file.write_text("Host web1\n  HostName 10.9.9.9\n  Port 2222\n")
    yml_file = tmp_path / "yml_ssh_config"
    yml_file.write_text("Host web1\n  HostName 10.1.1.1\n")
    fc = FabricConfig(lazy=True)
    fc.set_runtime_ssh_path(str(flag_file))
    fc.load_ssh_config()
    cfg = cli.apply_flags(_cfg(tmp_path, f"ssh: {{config: {yml_file}}}\n"), fc)
    assert cfg.ssh.config == flag_file
    conn = ssh.connect(cfg, cfg.hosts[0])
    assert (conn.host, conn.port) == ("10.9.9.9", 2222)
    # Without -S, deploy.yml's ssh.config is the one read.
    cfg2 = cli.apply_flags(_cfg(tmp_path, f"ssh: {{config: {yml_file}}}\n"), FabricConfig())
    assert ssh.connect(cfg2, cfg2.hosts[0]).host == "10.1.1.1"


def test_echo_flag_prints_each_remote_command(tmp_path: Path, monkeypatch, capsys) -> None:
    fc = FabricConfig(overrides={"run": {"echo": True}})
    cfg = cli.apply_flags(_cfg(tmp_path), fc)

    class Result:
        stdout, stderr, exited = "", "", 0

    class Conn:
        def run(self, command: str, **kw):
            return Result()

    monkeypatch.setattr(ssh, "open_connection", lambda *a: None)
    ssh.run(cfg, cfg.hosts[0], Conn(), "echo hi")  # type: ignore[arg-type]
    assert "web1$ echo hi" in capsys.readouterr().out


# --- the end of a successful run skips the interpreter's teardown -------------------------


def test_exit_now_only_for_the_fab_script_after_flushing_and_atexit(tmp_path: Path) -> None:
    """~0.25 s of freeing boto3/paramiko/Fabric objects per run is skipped, but nothing
    printed or registered to run at exit is lost, and the exit status stays 0."""
    script = tmp_path / "fab"  # argv[0] is `fab`, as for the console script
    script.write_text(
        "import atexit, sys\n"
        "from fabdeploy import cli\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "sys.stdout.write('buffered line\\n')\n"
        "cli.exit_now()\n"
        "print('not reached')\n"
        "sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "buffered line\natexit ran\n")
    other = tmp_path / "embedder.py"  # a program embedding Fabric: its own exit, untouched
    other.write_text(script.read_text())
    r = subprocess.run([sys.executable, str(other)], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (3, "buffered line\nnot reached\natexit ran\n")


def test_fast_exit_only_when_every_task_of_the_run_was_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fabric.executor import Executor
    from invoke import task

    @task
    def theirs(c: object) -> None:
        pass

    ours = task(lambda c: None)
    ours.fabdeploy = True  # type: ignore[attr-defined]
    exits: list[bool] = []
    monkeypatch.setattr(cli, "exit_now", lambda: exits.append(True))
    for ran, expect in (({ours: None}, [True]), ({ours: None, theirs: None}, []), ({}, [])):
        monkeypatch.setattr(Executor, "execute", lambda self, *t, _r=ran: _r)
        exits.clear()
        ex = cli.FleetExecutor.__new__(cli.FleetExecutor)
        assert ex.execute() is ran
        assert exits == expect
