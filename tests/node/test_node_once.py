"""Run-once hooks (migrations) on the node: `node.py once` extracts the bundle as activate
does, runs the before_swap hooks and then the once hooks in a release that never becomes
current, and removes it. Nothing else on the host changes, whatever the outcome.

Same rules as test_node_program.py: Python 3.8+, pytest only, node.py loaded as a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from node_program import node
from test_node_program import T0, deploy, good_bundle, make_cfg


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def once(cfg: node.Config, tmp_path: Path, commit: str, hooks: list[Any]) -> dict[str, Any]:
    bundle, sha = good_bundle(tmp_path, commit)
    return node.run_once(
        cfg,
        [node.Hook.from_json(h) for h in hooks],
        sha256=sha,
        commit=commit,
        source=node.Source("file", str(bundle)),
        now=lambda: T0 + 5,
    )


def cfg_with(tmp_path: Path, out: Path, **hooks: Any) -> node.Config:
    return make_cfg(
        tmp_path,
        hooks=hooks,
        stage="production",
        roles=["db", "web"],
        linked_dirs=["log"],
        env={"AWS_ACCESS_KEY_ID": "AKIASECRET"},
    )


def test_once_runs_in_a_release_that_never_becomes_current(tmp_path: Path, out: Path) -> None:
    cfg = cfg_with(tmp_path, out, before_swap=[f"echo before >> {out}/log"])
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    layout = node.Layout(cfg.deploy_to)
    os.makedirs(os.path.join(cfg.deploy_to, "shared", "log"), exist_ok=True)
    releases_before = node.list_releases(layout)
    result = once(
        cfg,
        tmp_path,
        "c2",
        [
            f"env > {out}/once.env; cat app/main.py >> {out}/log; echo >> {out}/log; pwd >> {out}/log",
            {"run": f"echo second >> {out}/log", "timeout": 5},
        ],
    )
    assert result["ok"] and result["ran"][1] == f"echo second >> {out}/log"
    lines = (out / "log").read_text().splitlines()
    # before_swap (once at the first deploy, once here), then the hooks in order, in the new code
    assert lines[0] == "before" and lines[1] == "before"
    assert lines[2] == "print('c2')" and lines[4] == "second"
    staging = lines[3]
    assert os.path.basename(staging).startswith(node.STAGING_PREFIX)
    assert not os.path.exists(staging)  # removed after
    env = read_env(out / "once.env")
    assert env["RELEASE_PATH"] == staging and env["REVISION"] == "c2"
    assert env["PREVIOUS_RELEASE"] == layout.release_path(first["release"])
    assert env["DEPLOY_TO"] == cfg.deploy_to and env["ROLE"] == "db,web"
    assert env["STAGE"] == "production" and "AWS_ACCESS_KEY_ID" not in env
    # current, the releases and revisions.log are as they were
    assert node.read_current(layout).release == first["release"]  # type: ignore[union-attr]
    assert node.list_releases(layout) == releases_before
    assert "c2" not in Path(layout.revisions_log).read_text()
    assert node.read_status(layout)["last_once"]["outcome"] == "ok"


def test_a_failing_once_hook_is_one_line_with_its_output_and_changes_nothing(
    tmp_path: Path, out: Path
) -> None:
    cfg = cfg_with(tmp_path, out)
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    layout = node.Layout(cfg.deploy_to)
    with pytest.raises(node.NodeError) as e:
        once(cfg, tmp_path, "c2", ["echo migrating; echo 'table users exists' >&2; exit 3"])
    msg = e.value.message
    assert "once hook `echo migrating" in msg and "failed with exit code 3" in msg
    assert "no host was changed" in msg and "\n" not in msg
    assert e.value.extra["output_tail"] == ["migrating", "table users exists"]
    assert node.read_current(layout).release == first["release"]  # type: ignore[union-attr]
    assert [n for n in os.listdir(layout.releases) if n.startswith(".")] == []
    assert node.read_status(layout)["last_once"]["outcome"] == "failed"


def test_a_once_hook_that_hangs_is_killed_at_its_timeout(tmp_path: Path, out: Path) -> None:
    cfg = cfg_with(tmp_path, out)
    with pytest.raises(node.NodeError, match=r"timed out after 0.5s"):
        once(cfg, tmp_path, "c1", [{"run": "sleep 30", "timeout": 0.5}])
    assert node.read_current(node.Layout(cfg.deploy_to)) is None


def test_a_failing_before_swap_hook_stops_before_the_once_hooks(tmp_path: Path, out: Path) -> None:
    cfg = cfg_with(tmp_path, out, before_swap=["exit 4"])
    with pytest.raises(node.NodeError, match=r"^before_swap hook `exit 4`"):
        once(cfg, tmp_path, "c1", [f"touch {out}/ran"])
    assert not (out / "ran").exists()


def test_once_cli(tmp_path: Path, out: Path, capsys: Any) -> None:
    cfg = cfg_with(tmp_path, out)
    bundle, sha = good_bundle(tmp_path, "c3")
    argv = ["--config", str(tmp_path / "node.json"), "once", "--sha256", sha, "--commit", "c3"]
    argv += ["--bundle-id", "c3-abcdefabcdef", "--file", str(bundle)]
    rc = node.main([*argv, "--hooks", json.dumps([f"echo $REVISION > {out}/rev"])])
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and reply["ok"] and reply["bundle_id"] == "c3-abcdefabcdef"
    assert (out / "rev").read_text().strip() == "c3"
    assert node.read_current(node.Layout(cfg.deploy_to)) is None
    rc = node.main([*argv, "--hooks", "[]"])
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and "non-empty JSON list" in reply["error"]
