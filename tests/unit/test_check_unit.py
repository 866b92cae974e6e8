"""deploy.check's node part: the command built, the answer read, the unpacked size recorded."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tarfile
from pathlib import Path

import yaml

from fabdeploy.adapters import bundle, nodectl
from fabdeploy.basics import config
from fabdeploy.basics.config import Host
from fabdeploy.ops import check
from fabdeploy.ops.check import Published

BASE = {
    "app": "shop",
    "repo": ".",
    "s3": {"bucket": "b"},
    "deploy_to": "/srv/shop",
    "hosts": ["web1"],
    "ssh": {"user": "deploy", "sudo": True},
    "restart": "/usr/bin/systemctl restart shop",
}
HOST = Host("web1", "web1")
MB = 1 << 20


def load(tmp_path: Path, **over) -> config.Config:
    p = tmp_path / "deploy.yml"
    p.write_text(yaml.safe_dump({**BASE, **over}))
    return config.load(p)


def answer(cfg, **over) -> dict[str, str]:
    data = {
        "ok": True,
        "pointer": {"uri": "s3://b/shop/published.json", "ok": True, "commit": "c1"},
        "free": 500 * MB,
        "path": "/srv/shop/releases",
        "health": {"ok": True, "detail": "http://x answered 200"},
        **over,
    }
    return {"sha": nodectl.fingerprint(cfg, HOST), "node_check": json.dumps(data)}


def test_the_node_checks_as_the_boot_unit_runs_it(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    script = nodectl.check_script(cfg, HOST)
    own = script[script.index("node_check=") :]
    assert "env -i" in own and "node.json check" in own and "HOME=" in own
    assert "SSH_CONNECTION=" in own  # health.url's {host}; no AWS_* from the session
    assert script.index("python=ok") < script.index("node_check=")  # one command, node part last
    # The shell really prints one `node_check=<json>` line (a stand-in for the node program).
    fake = tmp_path / "node.py"
    fake.write_text("")
    shell = script[script.index("if test -f") :].replace(
        nodectl.node_command(cfg, "check"), 'echo log >&2; echo \'{"ok": true, "a": "b=c"}\''
    )
    shell = shell.replace(nodectl.q(cfg.node_dir + "/node.py"), str(fake))
    out = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True).stdout
    assert out == 'node_check={"ok": true, "a": "b=c"}\n'
    state = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert check.node_answer(state) == {"ok": True, "a": "b=c"}


def test_all_good_and_each_failure_in_one_phrase(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    pub = Published("c1", 100 * MB)
    cols, problems = check.findings(cfg, HOST, answer(cfg), pub)
    assert cols == ["ok", "126.0 MB needed, 500.0 MB free", "ok"] and problems == []

    denied = {
        "uri": "s3://b/shop/published.json",
        "ok": False,
        "code": "AccessDenied",
        "error": "access denied reading pointer s3://b/shop/published.json from web1 (AccessDenied)",
    }
    cols, problems = check.findings(
        cfg,
        HOST,
        answer(
            cfg,
            pointer=denied,
            free=50 * MB,
            health={"ok": False, "detail": "health check failed after 0s on web1: x answered 503"},
        ),
        pub,
    )
    assert cols == ["AccessDenied", "126.0 MB needed, 50.0 MB free", "FAILED"]
    assert problems == [
        "the node cannot read s3://b/shop/published.json with its own credentials: access "
        "denied reading pointer s3://b/shop/published.json from web1 (AccessDenied)",
        "not enough disk space at /srv/shop/releases: 126.0 MB needed for the published bundle "
        "(100.0 MB unpacked + 10% + 16.0 MB), 50.0 MB free",
        "health check failed after 0s on web1: x answered 503",
    ]


def test_unknowns_are_not_failures(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    # An old bundle: no unpacked size recorded.
    cols, problems = check.findings(cfg, HOST, answer(cfg), Published("c1", None, "older bundle"))
    assert cols[1] == "need unknown (older bundle), 500.0 MB free" and problems == []
    # Nothing published yet, and the node agrees; no release yet to health-check.
    missing = {"uri": "u", "ok": False, "code": "NoSuchKey", "error": "does not exist"}
    no_release = {"ok": None, "detail": "no current release yet"}
    cols, problems = check.findings(
        cfg,
        HOST,
        answer(cfg, pointer=missing, health=no_release),
        Published(None, None, "nothing published"),
    )
    assert cols == ["nothing published", "need unknown (nothing published), 500.0 MB free",
                    "no current release yet"]  # fmt: skip
    assert problems == []
    # ...but a node that sees no pointer where the deploying machine sees one is wrong.
    _, problems = check.findings(cfg, HOST, answer(cfg, pointer=missing), Published("c1", 1))
    assert problems and "the node cannot read u" in problems[0]
    # No node program: setup's probe already says "not set up".
    assert check.findings(cfg, HOST, {}, Published("c1", 1)) == (["-", "-", "-"], [])
    # A node program that cannot run its check (current, so nothing else explains it).
    state = {"sha": nodectl.fingerprint(cfg, HOST), "node_check": ""}
    cols, problems = check.findings(cfg, HOST, state, Published("c1", 1))
    assert cols == ["not checked"] * 3 and problems == [
        "the node program's check failed: no answer (no output)"
    ]
    # health.on: controller: the controller's probe fills the column.
    cols, problems = check.findings(
        cfg, HOST, answer(cfg, health=None), Published("c1", 1), {"ok": False, "detail": "down"}
    )
    assert cols[2] == "FAILED" and problems == ["down"]


def test_the_unpacked_size_is_recorded_with_the_bundle(tmp_path: Path) -> None:
    def member(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        m = tarfile.TarInfo(name)
        m.type, m.size = kind, size
        return m

    # Blocks as the node counts them: a file takes one at least; a block per directory.
    members = [member("a.txt", 1), member("d/b.bin", 5000), member("d/e/l", kind=tarfile.SYMTYPE)]
    assert bundle.unpacked_size(members) == 4096 + 8192 + 2 * 4096
    assert bundle.unpacked_size([member("./x", 0), member("./d", kind=tarfile.DIRTYPE)]) == 8192

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "app.py").write_bytes(b"x" * 10000)
    (repo / "lib").mkdir()
    (repo / "lib" / "a.py").write_text("a")
    (repo / "link").symlink_to("app.py")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    got = {m.name: (m.type, m.size, m.linkname) for m in bundle.tree_members(repo, "HEAD")}
    assert got == {
        "app.py": (tarfile.REGTYPE, 10000, ""),
        "lib/a.py": (tarfile.REGTYPE, 1, ""),
        "link": (tarfile.SYMTYPE, 0, "app.py"),
    }
    assert bundle.meta_int("12288") == 12288
    assert bundle.meta_int(None) is bundle.meta_int("x") is bundle.meta_int(-1) is None


def test_with_a_sudo_password_the_check_asks_sudo_s_with_it_on_stdin(tmp_path: Path) -> None:
    from fabric import Config as FabricConfig

    cfg = load(tmp_path)
    assert nodectl.check_stdin(cfg) is None and "sudo -n -l --" in nodectl.check_script(cfg, HOST)
    fc = FabricConfig()
    fc["sudo"]["password"] = "s3cret"
    cfg = dataclasses.replace(cfg, fabric=fc)
    script = nodectl.check_script(cfg, HOST)
    assert "s3cret" not in script and nodectl.check_stdin(cfg) == "s3cret\n"
    assert script.startswith("IFS= read -r pw; ") and "sudo -n" not in script
    assert """printf '%s\\n' "$pw" | sudo -S -p '' -l -- /usr/bin/systemctl reboot""" in script
    bad = {"sha": nodectl.fingerprint(cfg, HOST), "sudo0": "ok", "sudo1": "refused"}
    assert (
        "deploy may not run `sudo /usr/bin/systemctl reboot` (sudo -S -l, with the password)"
        in (nodectl.check_problems(cfg, HOST, bad))
    )


def test_a_source_the_node_cannot_read_is_a_problem_naming_it(tmp_path: Path) -> None:
    cfg = load(tmp_path, linked_files=[{"path": "config/database.yml", "ssm": "/shop/db"}])
    pub = Published("c1", 100 * MB)
    shared = [
        {
            "path": "config/database.yml",
            "source": "SSM parameter /shop/db",
            "ok": False,
            "error": "access denied (AccessDeniedException): the instance role needs "
            "ssm:GetParameter and kms:Decrypt",
        }
    ]
    cols, problems = check.findings(cfg, HOST, answer(cfg, shared=shared), pub)
    assert cols == ["ok", "126.0 MB needed, 500.0 MB free", "ok"]
    assert problems == [
        "the node cannot read SSM parameter /shop/db (for shared/config/database.yml) with its "
        "own credentials: access denied (AccessDeniedException): the instance role needs "
        "ssm:GetParameter and kms:Decrypt"
    ]
    shared[0].update(ok=True, error=None)
    assert check.findings(cfg, HOST, answer(cfg, shared=shared), pub)[1] == []
    # deploy.check does not ask for a sourced file in shared/: the node fetches it.
    assert "shared/config/database.yml" not in nodectl.check_script(cfg, HOST)
