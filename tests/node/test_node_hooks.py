"""Node hooks: before_swap / after_swap / after_restart, with boot, roles and timeout options;
what their environment holds (and never holds: the node's credentials).

Same rules as test_node_program.py: Python 3.8+, pytest only, node.py loaded as a file.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from node_program import node
from test_node_program import T0, deploy, make_cfg, pointer_for


def hooks_cfg(tmp_path: Path, out: Path, roles: Any = (), **hooks: Any) -> node.Config:
    return make_cfg(
        tmp_path,
        hooks=hooks,
        restart=f"echo restarted >> {out}/log",
        stage="staging",
        env={"AWS_ACCESS_KEY_ID": "AKIASECRET", "AWS_SECRET_ACCESS_KEY": "shh"},
        roles=list(roles),
    )


def dump_env(out: Path, name: str) -> str:
    return f"env > {out}/{name}.env; echo {name} >> {out}/log"


def read_env(out: Path, name: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in (out / f"{name}.env").read_text().splitlines() if "=" in line
    )


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_stages_run_in_order_with_their_environment_and_no_credentials(
    tmp_path: Path, out: Path
) -> None:
    cfg = hooks_cfg(
        tmp_path,
        out,
        ["web", "worker"],
        before_swap=[dump_env(out, "before")],
        after_swap=[dump_env(out, "after")],
        after_restart=[dump_env(out, "restarted_hook")],
    )
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0, restart=True)
    second = deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1, restart=True)
    assert (out / "log").read_text().split() == [
        "before",
        "after",
        "restarted",
        "restarted_hook",
    ] * 2
    layout = node.Layout(cfg.deploy_to)
    env = read_env(out, "before")
    assert env["RELEASE_PATH"] == layout.release_path(second["release"])
    assert env["PREVIOUS_RELEASE"] == layout.release_path(first["release"])
    assert (
        env["REVISION"] == "c2"
        and env["DEPLOY_TO"] == cfg.deploy_to
        and env["ROLE"] == "web,worker"
    )
    assert env["STAGE"] == "staging"
    for name in ("before", "after", "restarted_hook"):
        e = read_env(out, name)
        assert "AWS_ACCESS_KEY_ID" not in e and "AWS_SECRET_ACCESS_KEY" not in e


def test_node_env_credentials_never_reach_hooks_even_after_s3_use(
    tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = hooks_cfg(tmp_path, out, before_swap=[dump_env(out, "before")])
    # What s3_client does at boot: node_env into os.environ for boto3.
    monkeypatch.setattr(os, "environ", {**os.environ, **cfg.env})
    deploy(cfg, tmp_path, "c1")
    assert "AKIASECRET" not in (out / "before.env").read_text()


def test_boot_false_hooks_do_not_run_at_boot(tmp_path: Path, out: Path) -> None:
    cfg = hooks_cfg(
        tmp_path,
        out,
        before_swap=[
            {"run": f"echo always >> {out}/log"},
            {"run": f"echo migrate >> {out}/log", "boot": False},
        ],
    )
    pointer, bundle = pointer_for(tmp_path, "c2")
    node.boot(
        cfg, pointer_source=lambda: pointer, source_for=lambda p: node.Source("file", str(bundle))
    )
    assert (out / "log").read_text().split() == ["always"]
    deploy(cfg, tmp_path, "c3")
    assert (out / "log").read_text().split() == ["always", "always", "migrate"]


def test_roles_pick_the_hosts(tmp_path: Path, out: Path) -> None:
    cfg = hooks_cfg(
        tmp_path,
        out,
        ["worker"],
        after_swap=[
            {"run": f"echo web-only >> {out}/log", "roles": ["web"]},
            {"run": f"echo worker-only >> {out}/log", "roles": ["worker"]},
        ],
    )
    deploy(cfg, tmp_path, "c1")
    assert (out / "log").read_text().split() == ["worker-only"]
    pointer, bundle = pointer_for(tmp_path, "c2")  # at boot too: node.json holds the host's roles
    node.boot(
        cfg, pointer_source=lambda: pointer, source_for=lambda p: node.Source("file", str(bundle))
    )
    assert (out / "log").read_text().split() == ["worker-only", "worker-only"]


def test_a_hook_over_its_timeout_is_killed_and_the_release_dropped(
    tmp_path: Path, out: Path
) -> None:
    cfg = hooks_cfg(
        tmp_path, out, before_swap=[{"run": "echo waiting; sleep 30 & sleep 30", "timeout": 0.5}]
    )
    layout = node.Layout(cfg.deploy_to)
    t0 = time.monotonic()
    with pytest.raises(
        node.NodeError,
        match=r"before_swap hook `echo waiting; sleep 30 & sleep 30` timed out "
        r"after 0.5s \(killed\).*current unchanged.*waiting",
    ):
        deploy(cfg, tmp_path, "c1")
    assert time.monotonic() - t0 < 10
    assert node.read_current(layout) is None and node.complete_releases(layout) == []


def test_failing_after_swap_puts_the_previous_release_back(tmp_path: Path, out: Path) -> None:
    ok = make_cfg(tmp_path)
    first = deploy(ok, tmp_path, "c1", now=lambda: T0)
    cfg = hooks_cfg(tmp_path, out, after_swap=["echo cache warm failed; exit 4"])
    layout = node.Layout(cfg.deploy_to)
    with pytest.raises(
        node.NodeError,
        match="after_swap hook .* failed with exit code 4 .* current is back on "
        + first["release"],
    ):
        deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1, restart=True)
    cur = node.read_current(layout)
    assert cur is not None and cur.release == first["release"] and cur.commit == "c1"
    assert node.list_releases(layout) == [first["release"]]
    assert not (out / "log").exists()  # never restarted onto the bad release


def test_failing_after_restart_goes_back_like_a_failed_restart(tmp_path: Path, out: Path) -> None:
    ok = hooks_cfg(tmp_path, out)
    first = deploy(ok, tmp_path, "c1", now=lambda: T0, restart=True)
    cfg = hooks_cfg(tmp_path, out, after_restart=["exit 9"])
    layout = node.Layout(cfg.deploy_to)
    with pytest.raises(
        node.NodeError,
        match="after_restart hook `exit 9` failed with exit code 9 .* current is "
        "back on " + first["release"] + " and restarted OK",
    ):
        deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1, restart=True)
    assert node.read_current(layout).release == first["release"]  # type: ignore[union-attr]


def test_hook_options_load_from_node_json(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        hooks={"before_swap": ["a", {"run": "b", "boot": False, "roles": ["db"], "timeout": 5}]},
    )
    a, b = cfg.hooks["before_swap"]
    assert (a.run, a.boot, a.roles, a.timeout) == ("a", True, [], None)
    assert (b.run, b.boot, b.roles, b.timeout) == ("b", False, ["db"], 5.0)
    assert cfg.before_swap == ["a", "b"] and cfg.hooks["after_swap"] == []
    with pytest.raises(node.NodeError, match="not a command"):
        make_cfg(tmp_path, hooks={"after_swap": [{"boot": False}]})


def test_hook_output_is_framed_on_stderr_and_a_boot_keeps_it_for_the_roll(
    tmp_path: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = hooks_cfg(
        tmp_path,
        out,
        before_swap=["echo checking config; echo 'all | good' >&2"],
        after_swap=["true"],  # prints nothing: nothing relayed
    )
    deploy(cfg, tmp_path, "c1", restart=True)
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout is the JSON answer's alone (main prints it)
    framed = [ln for ln in captured.err.splitlines() if re.match(r"fabdeploy-node: \w+ \| ", ln)]
    assert framed == [
        "fabdeploy-node: before_swap | checking config",
        "fabdeploy-node: before_swap | all | good",
    ]  # the restart's own output (`echo restarted >> log`: none here) is never framed as a hook's
    pointer, bundle = pointer_for(tmp_path, "c2")
    node.boot(
        cfg, pointer_source=lambda: pointer, source_for=lambda p: node.Source("file", str(bundle))
    )
    last_boot = node.read_status(node.Layout(cfg.deploy_to))["last_boot"]
    assert last_boot["hook_output"] == [
        ["before_swap", "checking config"],
        ["before_swap", "all | good"],
    ]
    capsys.readouterr()
    node.status(cfg, after_boot="the-boot-before")  # what a roll asks after the reboot
    err = capsys.readouterr().err.splitlines()
    assert [ln for ln in err if re.match(r"fabdeploy-node: \w+ \| ", ln)] == [
        "fabdeploy-node: before_swap | checking config",
        "fabdeploy-node: before_swap | all | good",
    ]
    node.status(cfg)  # a plain status repeats nothing
    assert "before_swap | " not in capsys.readouterr().err
