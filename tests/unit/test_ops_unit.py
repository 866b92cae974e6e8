"""Controller operations (ops/) against moto's S3 server (the session fixture `s3_server`),
with the SSH side replaced: what is checked is the order of S3 changes and what is printed.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from fabdeploy.adapters.ssh import HostResult
from fabdeploy.adapters.store import Pointer, Store, store_for
from fabdeploy.basics.config import Config, Host, S3Config
from fabdeploy.ops import rollback as rollback_op
from fabdeploy.ops.batches import Outcome
from fabdeploy.ops.targets import Targets
from fabfile import sandbox


@pytest.fixture
def cfg(s3_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Config:
    for k, v in sandbox.AWS_ENV.items():
        monkeypatch.setenv(k, v)
    s3 = S3Config(s3_server.bucket, f"o-{uuid.uuid4().hex[:10]}", "us-east-1", s3_server.endpoint)
    return Config(path=tmp_path / "deploy.yml", app="shop", repo=tmp_path, s3=s3, deploy_to="/srv/shop",
                  hosts=(Host("web1", "web1"), Host("web2", "web2")))


@pytest.fixture
def store(cfg: Config) -> Store:
    return store_for(cfg)


def ptr(store: Store, c: str) -> Pointer:
    return Pointer(store.bundle_key(c * 40), c * 40, "s" * 64, "main", 1, "ann@a", "2024-01-01T00:00:00Z")


def publish_history(store: Store, *commits: str) -> None:
    etag = None
    for c in commits:
        etag = store.write_pointer(ptr(store, c), etag)


# --- rollback and history (issue 13 §2.7) ----------------------------------------------------


def test_damaged_history_entry_is_skipped_with_a_warning(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    publish_history(store, "a", "b")
    # sorts first (newest) under history/
    bad = f"{store.history_prefix}0000000000000-damaged.json"
    store.client.put_object(Bucket=store.s3.bucket, Key=bad, Body=b"[" * 100_000)
    assert [p.commit[0] for p in store.pointer_history()] == ["b", "a"]
    err = capsys.readouterr().err
    assert "skipped a damaged history entry" in err and bad in err


def test_fleet_rollback_moves_the_pointer_past_damaged_history_and_prints_results_first(
    cfg: Config, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    publish_history(store, "a", "b")
    store.client.put_object(Bucket=store.s3.bucket, Key=f"{store.history_prefix}0000000000000-x.json", Body=b"{oops")
    results = [HostResult(h.name, True, {"commit": "a" * 40, "release": "20240101000000"}) for h in cfg.hosts]
    monkeypatch.setattr(rollback_op, "rollback", lambda *a, **k: Outcome(results))
    ok = rollback_op.run_rollback(cfg, Targets(list(cfg.hosts), whole_fleet=True))
    out = capsys.readouterr().out
    assert ok
    assert store.read_pointer()[0].commit == "a" * 40  # type: ignore[union-attr]
    assert out.index("web2") < out.index("published pointer moved back to aaaaaaaa")


def test_fleet_rollback_prints_results_before_a_pointer_failure(
    cfg: Config, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabdeploy.basics.errors import StoreError

    publish_history(store, "a", "b")
    results = [HostResult(h.name, True, {"commit": "a" * 40, "release": "20240101000000"}) for h in cfg.hosts]
    monkeypatch.setattr(rollback_op, "rollback", lambda *a, **k: Outcome(results))

    def broken(*a: Any, **k: Any) -> None:
        raise StoreError("S3 listing history failed")

    monkeypatch.setattr(store.__class__, "pointer_history", broken)
    with pytest.raises(StoreError):
        rollback_op.run_rollback(cfg, Targets(list(cfg.hosts), whole_fleet=True))
    out = capsys.readouterr().out
    assert "web1" in out and "web2" in out  # the hosts did roll back: the table says so
    assert store.read_lock() is None
