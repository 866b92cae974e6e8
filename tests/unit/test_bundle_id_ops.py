"""Every "unchanged" check of the controller keys on the bundle id (commit + build recipe)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fabdeploy.adapters import bundle as bundles
from fabdeploy.adapters.bundle import Bundle
from fabdeploy.adapters.store import Pointer
from fabdeploy.basics.config import Config, Host, S3Config
from fabdeploy.basics.errors import HostError
from fabdeploy.ops import roll


class Conn:
    def close(self) -> None:
        pass


def cfg(tmp_path: Path) -> Config:
    return Config(
        path=tmp_path / "deploy.yml",
        app="shop",
        repo=tmp_path,
        s3=S3Config("b", "shop"),
        deploy_to="/srv/shop",
        hosts=(Host("web1", "web1"),),
    )


def prepared(cur: dict[str, Any]) -> roll.Prepared:
    return roll.Prepared(
        Conn(), {"current": {"ok": True, "release": "20260101000000", **cur}, "boot_id": "b1"}
    )


def test_roll_resume_skips_a_host_on_the_same_bundle_id(tmp_path: Path) -> None:
    res = roll.reboot_one(
        cfg(tmp_path),
        Host("web1", "web1"),
        "c1-aaaaaaaaaaaa",
        0.0,
        resume=True,
        prepared=prepared({"commit": "c1", "bundle_id": "c1-aaaaaaaaaaaa"}),
    )
    assert res.ok and res.skipped
    plain = roll.reboot_one(
        cfg(tmp_path),
        Host("web1", "web1"),
        "c1",
        0.0,
        resume=True,
        prepared=prepared({"commit": "c1"}),
    )  # older node program: no bundle_id
    assert plain.skipped


def test_roll_resume_reboots_a_host_on_the_same_commit_but_another_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rebooted: list[str] = []

    def fake_run(cfg: Any, host: Host, conn: Any, cmd: str, **kw: Any) -> Any:
        rebooted.append(host.name)
        raise HostError(host.name, "stop here")

    monkeypatch.setattr(roll, "run", fake_run)
    with pytest.raises(HostError, match="stop here"):
        roll.reboot_one(
            cfg(tmp_path),
            Host("web1", "web1"),
            "c1-bbbbbbbbbbbb",
            0.0,
            resume=True,
            prepared=prepared({"commit": "c1", "bundle_id": "c1-aaaaaaaaaaaa"}),
        )
    assert rebooted == ["web1"]


class PointerStore:
    def __init__(self, current: Pointer | None) -> None:
        self.current = current
        self.written: list[Pointer] = []
        self.pointer_key = "shop/published.json"

    def read_pointer(self, replacing: bool = False) -> tuple[Pointer | None, str | None]:
        return self.current, "etag"

    def write_pointer(self, p: Pointer, etag: str | None, *, defer_history: bool = False) -> str:
        self.written.append(p)
        return "etag2"

    def uri(self, key: str) -> str:
        return f"s3://b/{key}"


def pointer(commit: str, bid: str | None) -> Pointer:
    return Pointer(
        key=f"shop/bundles/{bid or commit}.tar.gz",
        commit=commit,
        sha256="0" * 64,
        ref="main",
        size=1,
        published_by="me",
        published_at="2026-01-01T00:00:00Z",
        bundle_id=bid,
    )


def bundle(commit: str, bid: str) -> Bundle:
    return Bundle(
        commit, "main", "1" * 64, 1, f"shop/bundles/{bid}.tar.gz", "s3://x", False, 0, bundle_id=bid
    )


def test_publish_compares_bundle_ids_not_commits() -> None:
    store = PointerStore(pointer("c1", None))  # a pointer from before recipes: its id is the commit
    assert bundles.publish_bundle(store, bundle("c1", "c1"), log=lambda _: None) is store.current  # type: ignore[arg-type]
    assert store.written == []
    new = bundles.publish_bundle(store, bundle("c1", "c1-aaaaaaaaaaaa"), log=lambda _: None)  # type: ignore[arg-type]
    assert (
        store.written == [new]
        and new.bundle_id == "c1-aaaaaaaaaaaa"
        and new.id == "c1-aaaaaaaaaaaa"
    )
    assert Pointer.from_json(new.to_json(), "p").bundle_id == "c1-aaaaaaaaaaaa"
    assert Pointer.from_json(pointer("c1", None).to_json(), "p").id == "c1"


# --- rollback: the pointer goes back to the bundle the hosts run, matched by bundle id ---------


class HistoryStore(PointerStore):
    def __init__(self, current: Pointer | None, history: list[Pointer]) -> None:
        super().__init__(current)
        self.history = history  # newest first, as Store.pointer_history returns it

    def pointer_history(self, limit: int = 20) -> list[Pointer]:
        return self.history[:limit]


def test_rollback_moves_the_pointer_to_the_same_commits_other_recipe(tmp_path: Path) -> None:
    from fabdeploy.ops import rollback

    a, b = pointer("c1", "c1-aaaaaaaaaaaa"), pointer("c1", "c1-bbbbbbbbbbbb")
    store = HistoryStore(b, [b, a])  # recipe A published, then recipe B of the same commit
    rollback._pointer_back(cfg(tmp_path), store, {"c1-aaaaaaaaaaaa"})
    assert [p.id for p in store.written] == ["c1-aaaaaaaaaaaa"]
    assert store.written[0].key == "shop/bundles/c1-aaaaaaaaaaaa.tar.gz"


def test_rollback_skips_a_newer_entry_of_the_same_commit_with_another_recipe(
    tmp_path: Path,
) -> None:
    from fabdeploy.ops import rollback

    a, b, d = (
        pointer("c1", "c1-aaaaaaaaaaaa"),
        pointer("c1", "c1-bbbbbbbbbbbb"),
        pointer("d2", None),
    )
    store = HistoryStore(d, [d, b, a])
    rollback._pointer_back(cfg(tmp_path), store, {"c1-aaaaaaaaaaaa"})
    assert [p.key for p in store.written] == ["shop/bundles/c1-aaaaaaaaaaaa.tar.gz"]


def test_rollback_leaves_the_pointer_when_it_already_names_the_bundle(tmp_path: Path) -> None:
    from fabdeploy.ops import rollback

    a = pointer("c1", "c1-aaaaaaaaaaaa")
    store = HistoryStore(a, [a])
    rollback._pointer_back(cfg(tmp_path), store, {"c1-aaaaaaaaaaaa"})
    assert store.written == []


def test_rollback_of_an_old_pointer_without_an_id_matches_the_commit(tmp_path: Path) -> None:
    from fabdeploy.ops import rollback

    old, recipe, now = pointer("c1", None), pointer("c1", "c1-aaaaaaaaaaaa"), pointer("d2", None)
    store = HistoryStore(now, [now, recipe, old])  # hosts report no bundle id: id = commit
    rollback._pointer_back(cfg(tmp_path), store, {rollback._bundle_of({"commit": "c1"})})
    assert [p.key for p in store.written] == ["shop/bundles/c1.tar.gz"]


def test_rollback_of_a_bundle_not_in_history_leaves_the_pointer_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabdeploy.ops import rollback

    b = pointer("c1", "c1-bbbbbbbbbbbb")
    store = HistoryStore(b, [b])
    rollback._pointer_back(cfg(tmp_path), store, {"c1-aaaaaaaaaaaa"})
    assert store.written == []
    err = capsys.readouterr().err
    assert "c1 (build aaaaaaaaaaaa) is not in the pointer history" in err


def test_node_rollback_reports_the_bundle_id_of_the_release_it_goes_to(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fabdeploy.node import node

    layout = node.Layout(str(tmp_path))
    for name, bid in (("20260101000000", "c1-aaaaaaaaaaaa"), ("20260102000000", "c1-bbbbbbbbbbbb")):
        path = layout.release_path(name)
        os.makedirs(path)
        node.write_revision(path, "c1", None, bid)
    plain = layout.release_path("20251231000000")
    os.makedirs(plain)
    node.write_revision(plain, "c0", None)
    node.swap_current(layout, layout.release_path("20260102000000"))
    ncfg = SimpleNamespace(deploy_to=str(tmp_path), restart=None, lock_timeout=5)
    check = node.rollback_check(ncfg)  # type: ignore[arg-type]
    assert (check["commit"], check["bundle_id"]) == ("c1", "c1-aaaaaaaaaaaa")
    done = node._rollback(ncfg, layout, None, "me", False)  # type: ignore[arg-type]
    assert (done["release"], done["bundle_id"]) == ("20260101000000", "c1-aaaaaaaaaaaa")
    older = node._rollback(ncfg, layout, None, "me", False)  # type: ignore[arg-type]
    assert older["commit"] == "c0" and "bundle_id" not in older  # no recipe: the id is the commit
