"""`activate --prepare`: download, verify and extract before the host leaves traffic; the later
activate of the same bundle only switches. Prepared releases survive other node runs until
they are switched to, and are cleaned once stale.

Same rules as test_node_program.py: Python 3.8+, pytest only, node.py loaded as a file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from node_program import node
from test_node_program import T0, deploy, good_bundle, make_cfg, pointer_for


@pytest.fixture
def cfg(tmp_path: Path) -> node.Config:
    return make_cfg(tmp_path)


def prepare(cfg: node.Config, bundle: Path, sha: str, commit: str, **kw: Any) -> dict[str, Any]:
    return node.prepare(
        cfg, sha256=sha, commit=commit, source=node.Source("file", str(bundle)), **kw
    )


def prepared_dirs(layout: node.Layout) -> list[str]:
    return sorted(n for n in os.listdir(layout.releases) if n.startswith(node.PREPARED_PREFIX))


def test_prepare_then_activate_switches_without_downloading(
    tmp_path: Path, cfg: node.Config
) -> None:
    layout = node.Layout(cfg.deploy_to)
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    bundle, sha = good_bundle(tmp_path, "c2")
    out = prepare(cfg, bundle, sha, "c2", now=lambda: T0 + 1)
    assert out["ok"] and out["needed"] and out["prepared"].startswith(node.PREPARED_PREFIX)
    assert prepared_dirs(layout) == [out["prepared"]]
    assert node.read_current(layout).commit == "c1"  # type: ignore[union-attr]
    # Hidden from Capistrano, listed by status, not "stray".
    assert node.list_releases(layout) == ["20231114221320"]
    st = node.status(cfg)
    assert st["prepared"] == [out["prepared"]] and st["stray"] == []

    bundle.unlink()  # the switch must not need the bundle any more
    done = node.activate(
        cfg, sha256=sha, commit="c2", source=node.Source("prepared", ""), now=lambda: T0 + 2
    )
    assert done["changed"] and done["release"] == "20231114221322"
    cur = node.read_current(layout)
    assert cur is not None and cur.commit == "c2"
    release = Path(cur.path)
    assert (release / "app/main.py").read_text() == "print('c2')"
    assert not (release / node.PREPARED_MARKER).exists()
    assert not (release / node.PENDING_MARKER).exists()
    assert prepared_dirs(layout) == []


def test_activate_with_a_url_uses_the_prepared_release_too(
    tmp_path: Path, cfg: node.Config
) -> None:
    layout = node.Layout(cfg.deploy_to)
    bundle, sha = good_bundle(tmp_path, "c2")
    prepare(cfg, bundle, sha, "c2")
    gone = node.Source("url", "http://127.0.0.1:9/never-fetched")
    done = node.activate(cfg, sha256=sha, commit="c2", source=gone)
    assert done["changed"] and node.read_current(layout).commit == "c2"  # type: ignore[union-attr]


def test_without_a_prepared_release_prepared_source_is_one_clear_error(
    tmp_path: Path, cfg: node.Config
) -> None:
    deploy(cfg, tmp_path, "c1")
    with pytest.raises(node.NodeError, match="no prepared release of c2"):
        node.activate(cfg, sha256="ab" * 32, commit="c2", source=node.Source("prepared", ""))


def test_prepare_of_what_current_runs_is_nothing_to_do(tmp_path: Path, cfg: node.Config) -> None:
    layout = node.Layout(cfg.deploy_to)
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    bundle, sha = good_bundle(tmp_path, "c1")
    out = prepare(cfg, bundle, sha, "c1")
    assert out == {"ok": True, "changed": False, "release": first["release"], "commit": "c1"}
    assert prepared_dirs(layout) == []
    forced = prepare(cfg, bundle, sha, "c1", force=True)
    assert forced["needed"] and forced["prepared"]


def test_prepare_after_a_died_restart_leaves_the_restart_to_the_switch(
    tmp_path: Path, cfg: node.Config
) -> None:
    cfg = make_cfg(tmp_path, restart="true")
    layout = node.Layout(cfg.deploy_to)
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    marker = {"release": first["release"], "boot_id": node.boot_id()}
    Path(layout.state, node.RESTART_MARKER).write_text(json.dumps(marker))
    bundle, sha = good_bundle(tmp_path, "c1")
    out = prepare(cfg, bundle, sha, "c1")
    assert out["needed"] and out["restart_pending"] and "prepared" not in out
    assert prepared_dirs(layout) == []


def test_prepare_again_reuses_and_a_wrong_sha_is_not_used(tmp_path: Path, cfg: node.Config) -> None:
    layout = node.Layout(cfg.deploy_to)
    bundle, sha = good_bundle(tmp_path, "c2")
    one = prepare(cfg, bundle, sha, "c2")
    two = prepare(cfg, bundle, sha, "c2")
    assert one["prepared"] == two["prepared"] and prepared_dirs(layout) == [one["prepared"]]
    assert node.find_prepared(layout, "c2", "00" * 32) is None
    assert node.find_prepared(layout, "c3", sha) is None
    assert node.find_prepared(layout, "c2", sha.upper()) == layout.release_path(one["prepared"])


def test_prepared_release_survives_other_runs_and_stale_ones_go(
    tmp_path: Path, cfg: node.Config
) -> None:
    layout = node.Layout(cfg.deploy_to)
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    bundle, sha = good_bundle(tmp_path, "c2")
    wanted = prepare(cfg, bundle, sha, "c2")["prepared"]
    # Another run on the host (a hotfix of something else, a cleanup, a boot) keeps it.
    deploy(cfg, tmp_path, "c3", now=lambda: T0 + 10)
    node.cleanup(cfg)
    assert prepared_dirs(layout) == [wanted]

    # A stale one (older than PREPARED_MAX_AGE), one without a marker (half made) and an
    # older one of the same bundle are leftovers.
    def fake(name: str, bundle_id: str, age: float, marker: bool = True) -> str:
        path = layout.release_path(node.PREPARED_PREFIX + name)
        os.makedirs(path)
        if marker:
            info = {"bundle_id": bundle_id, "sha256": sha, "at": time.time() - age}
            Path(path, node.PREPARED_MARKER).write_text(json.dumps(info))
        return path

    stale = fake("20231114000000-1", "c4", node.PREPARED_MAX_AGE + 60)
    broken = fake("20231114000000-2", "c5", 0, marker=False)
    older_twin = fake("20231114000000-3", "c2", 30)
    future = fake("20231114000000-4", "c6", -3600)
    removed = node.cleanup(cfg)["removed"]
    assert sorted(removed) == sorted([stale, broken, older_twin, future])
    assert prepared_dirs(layout) == [wanted]

    # At most PREPARED_KEEP are kept, the newest.
    newer = [fake(f"2023111500000{i}-9", f"n{i}", -i) for i in range(node.PREPARED_KEEP)]
    node.cleanup(cfg)
    assert prepared_dirs(layout) == sorted(os.path.basename(p) for p in newer)


def test_boot_switches_to_a_prepared_release_of_the_published_bundle(
    tmp_path: Path, cfg: node.Config
) -> None:
    layout = node.Layout(cfg.deploy_to)
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    pointer, bundle = pointer_for(tmp_path, "c2")
    prepare(cfg, bundle, pointer["sha256"], "c2")

    def never(_p: Any) -> node.Source:
        return node.Source("url", "http://127.0.0.1:9/never-fetched")

    out = node.boot(cfg, pointer_source=lambda: pointer, source_for=never)
    assert out["outcome"] == "activated" and node.read_current(layout).commit == "c2"  # type: ignore[union-attr]


def test_cli_prepare_then_prepared(tmp_path: Path, cfg: node.Config, capsys: Any) -> None:
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    bundle, sha = good_bundle(tmp_path, "c2")
    conf = str(tmp_path / "node.json")
    base = ["--config", conf, "activate", "--sha256", sha, "--commit", "c2"]
    assert node.main([*base, "--file", str(bundle), "--prepare"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["prepared"]
    assert node.main([*base, "--prepared"]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["changed"] and second["commit"] == "c2"


def test_rollback_check_says_where_without_changing_anything(
    tmp_path: Path, cfg: node.Config
) -> None:
    layout = node.Layout(cfg.deploy_to)
    with pytest.raises(node.NodeError, match="nothing to roll back to"):
        node.rollback_check(cfg)
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    with pytest.raises(node.NodeError, match="no previous release"):
        node.rollback_check(cfg)
    second = deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)
    before = os.readlink(layout.current)
    out = node.rollback_check(cfg)
    assert out == {"ok": True, "needed": True, "release": first["release"], "commit": "c1"}
    assert os.readlink(layout.current) == before  # nothing moved
    same = node.rollback_check(cfg, release=second["release"])
    assert same["changed"] is False and same["release"] == second["release"]
    assert "needed" not in same
    with pytest.raises(node.NodeError, match="does not exist"):
        node.rollback_check(cfg, release="20991231000000")
    # What the check named is what the rollback does.
    done = node.rollback(cfg, release=out["release"])
    assert done["changed"] and done["release"] == first["release"]
