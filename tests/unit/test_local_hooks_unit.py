"""Local hooks on the deploying machine: before_bundle (in the clean export, gates the bundle),
after_deploy / after_failure (after a roll, hotfix or rollback; never change its exit code)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from gitrepo import git
from test_build_unit import FakeStore

from fabdeploy.adapters import bundle as bundles
from fabdeploy.adapters import nodectl
from fabdeploy.adapters.localhooks import LocalHookFailed, run_local_hooks
from fabdeploy.basics.config import Hook, _build
from fabdeploy.basics.errors import BundleError, ConfigError, DeployError
from fabdeploy.ops.events import DeployRun, deploy_run
from fabdeploy.ops.targets import Targets


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "app"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "app.py").write_text("print('hello')\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "one")
    (r / "uncommitted.txt").write_text("not in the commit\n")
    return r


def with_hooks(repo: Path, hooks: dict[str, Any], build: dict[str, Any] | None = None) -> Any:
    data = {
        "app": "shop",
        "repo": str(repo),
        "s3": {"bucket": "b"},
        "deploy_to": "/srv/shop",
        "hosts": ["web1", "web2"],
        "hooks": hooks,
        **({"build": build} if build else {}),
    }
    return _build(data, repo / "deploy.yml")


# --- deploy.yml ----------------------------------------------------------------------------


def test_local_hooks_are_declared_with_the_node_hooks_and_never_reach_the_nodes(
    repo: Path,
) -> None:
    plain = with_hooks(repo, {})
    cfg = with_hooks(
        repo,
        {
            "before_bundle": "bin/check-assets",
            "after_deploy": [{"run": "bin/notify", "timeout": 5}],
            "after_failure": ["echo failed"],
        },
    )
    assert cfg.hooks.before_bundle == (Hook("bin/check-assets"),)
    assert cfg.hooks.after_deploy == (Hook("bin/notify", timeout=5.0),)
    assert nodectl.node_json(cfg)["hooks"] == {}  # nothing for the nodes: no reinstall either
    assert nodectl.fingerprint(cfg) == nodectl.fingerprint(plain)


@pytest.mark.parametrize(
    "hooks",
    [
        {"after_deploy": [{"run": "x", "roles": ["web"]}]},
        {"before_bundle": [{"run": "x", "boot": False}]},
    ],
)
def test_node_only_options_are_refused_on_local_hooks(repo: Path, hooks: Any) -> None:
    with pytest.raises(ConfigError, match="local hooks with keys run, timeout only") as e:
        with_hooks(repo, hooks)
    assert "\n" not in str(e.value)


# --- the runner ----------------------------------------------------------------------------


def test_output_streams_prefixed_by_the_stage_and_a_failure_keeps_the_last_lines(
    tmp_path: Path,
) -> None:
    shown: list[str] = []
    run_local_hooks("after_deploy", [Hook("echo one; echo two >&2")], tmp_path, {}, shown.append)
    assert shown == ["after_deploy | one", "after_deploy | two"]
    script = "for i in $(seq 1 30); do echo line$i; done; exit 4"
    with pytest.raises(LocalHookFailed) as e:
        run_local_hooks(
            "before_bundle", [Hook(script), Hook("touch never")], tmp_path, {}, shown.append
        )
    assert str(e.value) == f"before_bundle hook `{script}` failed with exit code 4"
    assert e.value.tail == [f"line{i}" for i in range(11, 31)]
    assert not (tmp_path / "never").exists()  # the first failure stops the rest


def test_a_hook_over_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(LocalHookFailed, match="timed out after 0.5s"):
        # The child sleep holds stdout open: only killing the whole group ends the read.
        run_local_hooks("after_deploy", [Hook("sleep 30 & sleep 30", timeout=0.5)], tmp_path, {})
    assert time.monotonic() - start < 10


# --- before_bundle ------------------------------------------------------------------------------


CHECK = 'test -f app.py && test ! -e uncommitted.txt && echo "$REVISION $BUNDLE_ID $REF" > "$REPO/../seen"'


@pytest.mark.parametrize("build", [None, {"commands": ["echo built > built.txt"]}])
def test_before_bundle_runs_in_the_clean_export_before_the_build(repo: Path, build: Any) -> None:
    store = FakeStore()
    cfg = with_hooks(repo, {"before_bundle": [CHECK + " && test ! -e built.txt"]}, build)
    b = bundles.build_and_upload(cfg, store, log=lambda _: None)  # type: ignore[arg-type]
    assert b.uploaded
    assert (repo.parent / "seen").read_text().split() == [b.commit, b.bundle_id, "HEAD"]
    (repo.parent / "seen").unlink()
    bundles.ensure_bundle(cfg, store, log=lambda _: None)  # type: ignore[arg-type]
    assert not (repo.parent / "seen").exists()  # already there: nothing is built, nothing checked


def test_a_failing_before_bundle_stops_the_bundle_with_its_last_lines(repo: Path) -> None:
    store = FakeStore()
    cfg = with_hooks(
        repo,
        {"before_bundle": ["echo checking assets; echo 'missing: app.css'; exit 2"]},
        {"commands": ["touch ran-the-build"]},
    )
    with pytest.raises(BundleError) as e:
        bundles.ensure_bundle(cfg, store, log=lambda _: None)  # type: ignore[arg-type]
    first, *rest = str(e.value).splitlines()
    assert first.startswith("before_bundle hook `echo checking assets;") and "exit code 2" in first
    assert "nothing was built or uploaded" in first
    assert rest == ["  | checking assets", "  | missing: app.css"]
    assert store.objects == {}


# --- after_deploy / after_failure ---------------------------------------------------------------


def env_hook(out: Path) -> str:
    return f"env > {out}"


def read_env(p: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in p.read_text().splitlines() if "=" in line)


class B:
    commit, ref, bundle_id = "c" * 40, "main", "c" * 40 + "-abc"


def test_after_deploy_gets_the_run_in_its_environment(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "env"
    cfg = with_hooks(repo, {"after_deploy": [env_hook(out)], "after_failure": ["touch ../bad"]})
    targets = Targets(list(cfg.hosts), True)
    with deploy_run(cfg, "hotfix", targets) as run:
        run.bundle(B)
        run.counts.ok, run.counts.unchanged = 1, 1
        run.ok = True
    env = read_env(out)
    assert env["DEPLOY_TASK"] == "hotfix" and env["DEPLOY_OUTCOME"] == "success"
    assert env["REVISION"] == B.commit and env["BUNDLE_ID"] == B.bundle_id and env["REF"] == "main"
    assert env["HOSTS_OK"] == "1" and env["HOSTS_UNCHANGED"] == "1" and env["HOSTS_FAILED"] == "0"
    assert env["DEPLOY_HOSTS"] == "web1,web2" and env["DEPLOY_USER"] == run.user
    assert float(env["DEPLOY_SECONDS"]) >= 0 and "STAGE" not in env
    assert not (repo.parent / "bad").exists()


def test_after_failure_runs_on_a_failed_or_raising_run_and_the_error_goes_on(
    repo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "env"
    cfg = with_hooks(repo, {"after_failure": [env_hook(out)], "after_deploy": ["touch ../good"]})
    with deploy_run(cfg, "roll") as run:
        run.counts.failed, run.counts.not_touched = 1, 2
        run.ok = False
    env = read_env(out)
    assert env["DEPLOY_OUTCOME"] == "failure" and env["HOSTS_NOT_TOUCHED"] == "2"
    with pytest.raises(DeployError, match="the deploy lock is held"):
        with deploy_run(cfg, "rollback"):
            raise DeployError("the deploy lock is held by alice")
    env = read_env(out)
    assert env["DEPLOY_TASK"] == "rollback" and env["DEPLOY_ERROR"].startswith("the deploy lock")
    assert not (repo.parent / "good").exists()


def test_a_failing_after_hook_warns_and_changes_nothing(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = with_hooks(repo, {"after_deploy": ["echo nope; exit 9"], "after_failure": ["exit 3"]})
    with deploy_run(cfg, "hotfix") as run:
        run.ok = True
    assert run.ok is True
    err = capsys.readouterr().err
    assert "warning: after_deploy hook `echo nope; exit 9` failed with exit code 9" in err
    assert "exit code unchanged" in err
    with deploy_run(cfg, "hotfix") as run:
        run.ok = False
    assert "after_failure hook `exit 3` failed" in capsys.readouterr().err


def test_a_dry_run_runs_no_hooks(repo: Path) -> None:
    cfg = with_hooks(repo, {"after_deploy": ["touch ../good"], "after_failure": ["touch ../bad"]})
    with deploy_run(cfg, "roll", dry_run=True) as run:
        run.ok = True
    assert not (repo.parent / "good").exists() and not (repo.parent / "bad").exists()


def test_counts_from_each_kind_of_result() -> None:
    from fabdeploy.adapters.ssh import HostResult
    from fabdeploy.ops.roll import HostRoll

    run = DeployRun(cfg=None, task="hotfix", user="me")  # type: ignore[arg-type]
    run.count(
        [
            HostResult("web1", True, {"changed": True}),
            HostResult("web2", True, {"changed": False}),
            HostResult("web3", False, {}, "boom"),
        ],
        ["web4", "web5"],
    )
    assert json.loads(json.dumps(run.counts.__dict__)) == {
        "ok": 1,
        "unchanged": 1,
        "failed": 1,
        "not_touched": 2,
    }
    run.count(
        [HostRoll("web1", ok=True), HostRoll("web2", ok=True, skipped=True), HostRoll("web3")]
    )
    assert run.counts.line() == "1 ok, 1 failed, 1 unchanged"
