"""The node's "unchanged" checks key on the bundle id (commit + build recipe), not the commit.

Same rules as test_node_program.py: Python 3.8+, pytest only, node.py loaded as a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from node_program import node
from test_node_program import T0, deploy, good_bundle, make_cfg, pointer_for


@pytest.fixture
def cfg(tmp_path: Path) -> node.Config:
    return make_cfg(tmp_path)


def test_same_commit_new_recipe_activates_and_same_id_is_unchanged(
    tmp_path: Path, cfg: node.Config
) -> None:
    layout = node.Layout(cfg.deploy_to)
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)  # no recipe: id is the commit
    assert first["changed"] and "bundle_id" not in first
    rebuilt = deploy(cfg, tmp_path, "c1", now=lambda: T0 + 1, bundle_id="c1-aaaaaaaaaaaa")
    assert rebuilt["changed"] and rebuilt["bundle_id"] == "c1-aaaaaaaaaaaa"
    cur = node.read_current(layout)
    assert cur is not None and cur.commit == "c1" and cur.bundle_id == "c1-aaaaaaaaaaaa"
    assert cur.as_dict()["bundle_id"] == "c1-aaaaaaaaaaaa"
    assert Path(cur.path, "REVISION").read_text() == "c1\n"  # Capistrano's file is still the commit
    again = deploy(cfg, tmp_path, "c1", now=lambda: T0 + 2, bundle_id="c1-aaaaaaaaaaaa")
    assert not again["changed"]
    plain = deploy(cfg, tmp_path, "c1", now=lambda: T0 + 3)  # back to no recipe: a change too
    assert plain["changed"] and "bundle_id" not in node.read_current(layout).as_dict()  # type: ignore[union-attr]


def test_boot_compares_the_pointers_bundle_id(tmp_path: Path, cfg: node.Config) -> None:
    layout = node.Layout(cfg.deploy_to)
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    pointer, bundle = pointer_for(tmp_path, "c1")
    same: dict[str, Any] = dict(pointer)
    assert (
        node.boot(cfg, pointer_source=lambda: same, source_for=lambda p: pytest.fail("no fetch"))[
            "outcome"
        ]
        == "unchanged"
    )
    rebuilt = {**pointer, "bundle_id": "c1-bbbbbbbbbbbb"}
    result = node.boot(
        cfg, pointer_source=lambda: rebuilt, source_for=lambda p: node.Source("file", str(bundle))
    )
    assert result["outcome"] == "activated" and result["bundle_id"] == "c1-bbbbbbbbbbbb"
    assert node.read_current(layout).bundle_id == "c1-bbbbbbbbbbbb"  # type: ignore[union-attr]
    assert (
        node.boot(
            cfg, pointer_source=lambda: rebuilt, source_for=lambda p: pytest.fail("no fetch")
        )["outcome"]
        == "unchanged"
    )


def test_a_bad_bundle_id_in_the_pointer_is_refused(tmp_path: Path, cfg: node.Config) -> None:
    pointer, _ = pointer_for(tmp_path, "c1")
    with pytest.raises(node.NodeError, match="invalid 'bundle_id'"):
        node.validate_pointer({**pointer, "bundle_id": 7}, cfg)


def test_activate_cli_takes_bundle_id(tmp_path: Path, cfg: node.Config, capsys: Any) -> None:
    bundle, sha = good_bundle(tmp_path, "c9")
    rc = node.main(
        [
            "--config",
            str(tmp_path / "node.json"),
            "activate",
            "--sha256",
            sha,
            "--commit",
            "c9",
            "--bundle-id",
            "c9-cccccccccccc",
            "--file",
            str(bundle),
        ]
    )
    assert rc == 0
    assert node.read_current(node.Layout(cfg.deploy_to)).bundle_id == "c9-cccccccccccc"  # type: ignore[union-attr]
