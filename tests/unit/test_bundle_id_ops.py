"""Every "unchanged" check of the controller keys on the bundle id (commit + build recipe)."""

from __future__ import annotations

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
