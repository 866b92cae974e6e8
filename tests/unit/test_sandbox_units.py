"""Unit-file parsing and boot ordering of the sandbox's systemctl stand-in."""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

FILES = Path(__file__).resolve().parents[2] / "fabfile" / "sandbox_files"
SYSTEMCTL = FILES / "systemctl"


def _load() -> ModuleType:
    sys.path.insert(0, str(FILES))
    try:
        return importlib.import_module("systemctl_impl")
    finally:
        sys.path.remove(str(FILES))


sc = _load()

UNIT = """\
[Unit]
Description=Activate the current release
After=network.target
Before=shop.service
Wants=other.service

[Service]
Type=oneshot
ExecStart=-/usr/bin/python3 /opt/activate.py --app "my shop"
WorkingDirectory=/srv/shop
Environment=A=1 "B=two words"
Environment=C=3
EnvironmentFile=-/etc/default/shop
User=deploy

[Install]
WantedBy=multi-user.target
"""


def test_parse_unit_subset() -> None:
    unit = sc.parse_unit(UNIT, "fabdeploy-shop")
    assert unit.name == "fabdeploy-shop.service"
    assert unit.description == "Activate the current release"
    assert unit.type == "oneshot"
    assert unit.exec_start == ["/usr/bin/python3", "/opt/activate.py", "--app", "my shop"]
    assert unit.ignore_failure is True
    assert unit.working_directory == "/srv/shop"
    assert unit.environment == {"A": "1", "B": "two words", "C": "3"}
    assert unit.environment_files == [("/etc/default/shop", True)]
    assert unit.after == ["network.target"]
    assert unit.before == ["shop.service"]
    assert unit.wants == ["other.service"]
    assert unit.wanted_by == ["multi-user.target"]


def test_parse_unit_defaults_and_errors() -> None:
    unit = sc.parse_unit("[Service]\nExecStart=/bin/true\n", "x.service")
    assert (unit.type, unit.ignore_failure, unit.wanted_by) == ("simple", False, [])
    with pytest.raises(sc.UnitError, match="no ExecStart"):
        sc.parse_unit("[Service]\nType=simple\n", "x")
    with pytest.raises(sc.UnitError, match="unsupported Type=forking"):
        sc.parse_unit("[Service]\nType=forking\nExecStart=/bin/true\n", "x")


def test_parse_env_file() -> None:
    text = "# comment\nexport A=1\nB='two words'\nC=\"3\"\n\nnot an assignment\n"
    assert sc.parse_env_file(text) == {"A": "1", "B": "two words", "C": "3"}


def test_unit_env_is_clean_and_layers_files_then_environment(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("A=from-file\nB=from-file\n")
    unit = sc.parse_unit(
        f"[Service]\nExecStart=/bin/true\nEnvironmentFile={env_file}\nEnvironment=B=from-unit\n",
        "x",
    )
    env = sc.unit_env(unit)
    assert env["A"] == "from-file" and env["B"] == "from-unit"
    assert env["PATH"].startswith("/usr/local/sbin:/usr/local/bin")
    missing = sc.parse_unit("[Service]\nExecStart=/bin/true\nEnvironmentFile=/nope\n", "x")
    with pytest.raises(sc.UnitError, match="EnvironmentFile /nope not found"):
        sc.unit_env(missing)


def _unit(name: str, before: str = "", after: str = "") -> object:
    text = f"[Unit]\nBefore={before}\nAfter={after}\n[Service]\nType=oneshot\nExecStart=/bin/true\n"
    return sc.parse_unit(text, name)


def test_boot_order_is_name_order_adjusted_for_before_after() -> None:
    units = [_unit("c"), _unit("a", after="c"), _unit("b"), _unit("d", before="b")]
    assert [u.name for u in sc.boot_order(units)] == [
        "c.service",
        "a.service",
        "d.service",
        "b.service",
    ]


def test_boot_order_breaks_cycles_instead_of_hanging() -> None:
    units = [_unit("a", after="b"), _unit("b", after="a")]
    assert sorted(u.name for u in sc.boot_order(units)) == ["a.service", "b.service"]


def test_unit_name() -> None:
    assert sc.unit_name("shop") == "shop.service"
    assert sc.unit_name("shop.service") == "shop.service"


def test_user_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import pwd

    unit = sc.parse_unit(UNIT, "fabdeploy-shop")
    assert unit.user == "deploy"
    me = pwd.getpwuid(os.getuid())
    unit.user = me.pw_name
    env = {"HOME": "/root", "USER": "root"}
    creds = sc.credentials(unit, env)
    if me.pw_uid == 0:
        assert creds == {} and env["USER"] == "root"
    else:
        assert creds["user"] == me.pw_uid and env["USER"] == me.pw_name
    unit.user = "no-such-user-fabdeploy"
    monkeypatch.setattr(sc, "_log_line", lambda *a: None)
    with pytest.raises(sc.UnitError, match="217/USER"):
        sc.credentials(unit, {})


@pytest.mark.parametrize(
    "line",
    [
        "",
        "  /usr/bin/python3   app.py --bind 127.0.0.1\t--port 8080 ",
        "a\x0bb\x0cc\u00a0d",  # not shlex's whitespace: one word
        'A=1 "B=two words"',
        "--app 'my shop' x\\ y",
        "#not-a-comment x",
    ],
)
def test_split_words_is_shlex_split(line: str) -> None:
    assert sc.split_words(line) == shlex.split(line)


def test_host_info_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sc, "HOST_INFO", str(tmp_path / "host.env"))
    assert sc.host_info() == {}
    sc.write_host_info({"name": "web1", "ip": "127.0.10.1", "log_dir": str(tmp_path / "log")})
    assert sc.host_info()["ip"] == "127.0.10.1"
    assert sc.log_path("shop.service") == f"{tmp_path}/log/shop.service.log"
    assert (tmp_path / "log").is_dir()


# What the started program sees of its process; pids and the probe's own listdir fd aside.
PROBE = """
import os, sys
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))[:-1]
print(os.getcwd(), sorted(os.environ.items()), os.getsid(0) == os.getpid() == os.getpgid(0))
print(fds, os.readlink("/proc/self/fd/0"), os.getuid(), os.getgid(), sorted(os.getgroups()))
print("to stderr", file=sys.stderr)
"""
# Signal dispositions, by a program that does not set its own (as Python does for SIGPIPE).
SIGNALS = ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]


def _popen_and_spawn(tmp_path: Path, argv: list[str], creds: dict) -> tuple[str, str]:
    env = {"PATH": "/usr/bin:/bin", "A": "1"}
    logs = []
    for kind in ("popen", "spawn"):
        log = tmp_path / f"{kind}.log"
        with open(log, "wb") as f:
            if kind == "popen":
                subprocess.Popen(
                    argv,
                    cwd=tmp_path,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **creds,
                ).wait()
            else:
                pid = sc.spawn(argv, str(tmp_path), env, f.fileno(), creds)
                assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        logs.append(log.read_text())
    return logs[0], logs[1]


def test_spawn_starts_the_program_as_popen_does(tmp_path: Path) -> None:
    """spawn() stands in for subprocess.Popen (which costs ~10 ms to import): the same process."""
    tmp_path.chmod(0o755)
    argv = ["python3", "-S", "-c", PROBE]  # found on env's PATH
    popen, spawned = _popen_and_spawn(tmp_path, argv, {})
    assert "to stderr" in spawned and "True" in spawned
    assert spawned == popen
    popen, spawned = _popen_and_spawn(tmp_path, SIGNALS, {})
    assert spawned.startswith("SigBlk:") and spawned == popen
    if os.getuid() == 0:  # as another user: its groups too
        import pwd

        nobody = pwd.getpwnam("nobody")
        creds = {
            "user": nobody.pw_uid,
            "group": nobody.pw_gid,
            "extra_groups": os.getgrouplist(nobody.pw_name, nobody.pw_gid),
        }
        popen, spawned = _popen_and_spawn(tmp_path, argv, creds)
        assert f"{nobody.pw_uid} {nobody.pw_gid}" in spawned
        assert spawned == popen


def test_spawn_fails_as_popen_does(tmp_path: Path) -> None:
    for argv, cwd in (
        (["/nonexistent/program"], None),
        (["no-such-program-fabdeploy"], None),
        (["/bin/true"], str(tmp_path / "gone")),
    ):
        with pytest.raises(OSError) as popen:
            subprocess.Popen(argv, cwd=cwd, env={"PATH": "/usr/bin:/bin"})
        with pytest.raises(OSError) as spawned:
            sc.spawn(argv, cwd, {"PATH": "/usr/bin:/bin"}, 1, {})
        assert (type(spawned.value), str(spawned.value)) == (type(popen.value), str(popen.value))


def test_command_imports_its_logic_cheaply(tmp_path: Path) -> None:
    """As sandbox.py installs it: both files in one dir, run through a symlink too; the logic is
    a module, its bytecode cached, and none of the slow imports happen on the way."""
    bin_dir, link_dir = tmp_path / "bin", tmp_path / "link"
    bin_dir.mkdir()
    link_dir.mkdir()
    for name in ("systemctl", "systemctl_impl.py"):
        (bin_dir / name).write_bytes((FILES / name).read_bytes())
    (bin_dir / "systemctl").chmod(0o755)
    (link_dir / "systemctl").symlink_to(bin_dir / "systemctl")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for command in (bin_dir / "systemctl", link_dir / "systemctl"):
        r = subprocess.run([str(command)], capture_output=True, text=True, env=env)
        assert (r.returncode, r.stderr.split("{")[0]) == (2, "usage: systemctl ")
    assert [p.name.split(".")[0] for p in (bin_dir / "__pycache__").iterdir()] == ["systemctl_impl"]
    slow = ["subprocess", "json", "pathlib", "dataclasses", "typing", "signal", "shlex", "re"]
    r = subprocess.run(
        [
            "/usr/bin/python3",
            "-S",
            "-c",
            f"import sys; import systemctl_impl; print([m for m in {slow} if m in sys.modules])",
        ],
        cwd=bin_dir,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(bin_dir)},
    )
    assert r.stdout.strip() == "[]", r.stderr
