"""Controller operations (ops/) against moto's S3 server (the session fixture `s3_server`),
with the SSH side replaced: what is checked is the order of S3 changes and what is printed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from fabdeploy.adapters.bundle import Bundle
from fabdeploy.adapters.ssh import HostResult
from fabdeploy.adapters.store import Pointer, Store, store_for
from fabdeploy.basics.config import Config, Host, S3Config
from fabdeploy.basics.errors import ConflictError, StoreError
from fabdeploy.ops import publish as publish_op
from fabdeploy.ops import rollback as rollback_op
from fabdeploy.ops.batches import Outcome
from fabdeploy.ops.lock import HeldLock, fleet_lock
from fabdeploy.ops.targets import Targets
from fabfile import sandbox


@pytest.fixture
def cfg(s3_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Config:
    for k, v in sandbox.AWS_ENV.items():
        monkeypatch.setenv(k, v)
    s3 = S3Config(s3_server.bucket, f"o-{uuid.uuid4().hex[:10]}", "us-east-1", s3_server.endpoint)
    return Config(
        path=tmp_path / "deploy.yml",
        app="shop",
        repo=tmp_path,
        s3=s3,
        deploy_to="/srv/shop",
        hosts=(Host("web1", "web1"), Host("web2", "web2")),
    )


@pytest.fixture
def store(cfg: Config) -> Store:
    return store_for(cfg)


def ptr(store: Store, c: str) -> Pointer:
    return Pointer(
        store.bundle_key(c * 40), c * 40, "s" * 64, "main", 1, "ann@a", "2024-01-01T00:00:00Z"
    )


def publish_history(store: Store, *commits: str) -> None:
    etag = None
    for c in commits:
        etag = store.write_pointer(ptr(store, c), etag)


# --- rollback and history (issue 13 §2.7) ----------------------------------------------------


def test_damaged_history_entry_is_skipped_with_a_warning(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
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
    store.client.put_object(
        Bucket=store.s3.bucket, Key=f"{store.history_prefix}0000000000000-x.json", Body=b"{oops"
    )
    results = [
        HostResult(h.name, True, {"commit": "a" * 40, "release": "20240101000000"})
        for h in cfg.hosts
    ]
    monkeypatch.setattr(rollback_op, "rollback", lambda *a, **k: Outcome(results))
    ok = rollback_op.run_rollback(cfg, Targets(list(cfg.hosts), whole_fleet=True))
    out = capsys.readouterr().out
    assert ok
    assert store.read_pointer()[0].commit == "a" * 40  # type: ignore[union-attr]
    assert out.index("web2") < out.index("published pointer moved back to aaaaaaaa")


def test_fleet_rollback_prints_results_before_a_pointer_failure(
    cfg: Config, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    publish_history(store, "a", "b")
    results = [
        HostResult(h.name, True, {"commit": "a" * 40, "release": "20240101000000"})
        for h in cfg.hosts
    ]
    monkeypatch.setattr(rollback_op, "rollback", lambda *a, **k: Outcome(results))

    def broken(*a: Any, **k: Any) -> None:
        raise StoreError("S3 listing history failed")

    monkeypatch.setattr(store.__class__, "pointer_history", broken)
    with pytest.raises(StoreError):
        rollback_op.run_rollback(cfg, Targets(list(cfg.hosts), whole_fleet=True))
    out = capsys.readouterr().out
    assert "web1" in out and "web2" in out  # the hosts did roll back: the table says so
    assert store.read_lock() is None


def a_bundle(store: Store, c: str = "b") -> Bundle:
    key = store.bundle_key(c * 40)
    return Bundle(
        c * 40, "main", "f" * 64, 10, key, store.uri(key), uploaded=True, committed_at=1700000000
    )


# --- publish under the fleet lock (issue 13 §2.12) -------------------------------------------


def test_publish_is_refused_while_a_roll_holds_the_lock(
    cfg: Config, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish_op, "ensure_bundle", lambda cfg, store, ref, log: a_bundle(store))
    roll = store.acquire_lock("ann@ci-runner", "roll", expiry=600)
    with pytest.raises(StoreError) as e:
        publish_op.publish_for(cfg, "main", log=lambda line: None)
    assert str(e.value).startswith("deploy lock held by ann@ci-runner (roll)")
    assert store.read_pointer() == (None, None)  # the pointer did not move
    assert store.read_lock() == roll
    store.release_lock(roll)
    _, p = publish_op.publish_for(cfg, "main", log=lambda line: None)
    assert store.read_pointer()[0] == p and store.read_lock() is None  # its own lock is released


# --- lock renewal (issue 13 §2.21) ------------------------------------------------------------


def wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def force_unlock(store: Store) -> None:
    """`fab deploy.unlock --force`, retried: a renewal may land between its read and its delete."""
    for _ in range(100):
        try:
            store.break_lock(force=True)
            return
        except ConflictError:
            continue
    raise AssertionError("could not break the lock")


def test_held_lock_is_renewed_then_a_broken_one_is_reported(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    first = store.acquire_lock("ann@a", "roll", expiry=5)
    held = HeldLock(store, first, expiry=5, every=0.05).start()
    try:
        wait_for(lambda: held.lock.etag != first.etag)
        on_s3 = store.read_lock()
        assert (
            on_s3 is not None
            and on_s3.etag == held.lock.etag
            and on_s3.expires_at > first.expires_at
        )
        assert on_s3.created_at == first.created_at
        force_unlock(store)
        thief = store.acquire_lock("bob@b", "hotfix", expiry=600)
        wait_for(lambda: held.lost is not None)
        assert "was broken" in held.lost  # type: ignore[operator]
        with pytest.raises(
            ConflictError, match="not moving the pointer: our deploy lock .* was broken"
        ):
            held.check("moving the pointer")
    finally:
        held.stop()
    assert "LOST THE DEPLOY LOCK" in capsys.readouterr().err
    assert store.read_lock() == thief  # bob's lock was not overwritten by a renewal


def test_fleet_lock_stops_renewing_and_releases(cfg: Config, store: Store) -> None:
    fast = dataclasses.replace(cfg, roll=dataclasses.replace(cfg.roll, lock_expiry=0.3))
    with fleet_lock(fast, store, "roll") as held:
        first = held.lock
        wait_for(
            lambda: held.lock.etag != first.etag
        )  # renewed every 0.1 s, kept past its 0.3 s expiry
    assert store.read_lock() is None
    assert not held._thread.is_alive()


def test_roll_stops_before_the_next_batch_when_its_lock_is_broken(
    cfg: Config, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabdeploy.adapters import bundle as bundles
    from fabdeploy.ops import lock as lock_op
    from fabdeploy.ops import roll as roll_op

    cfg = dataclasses.replace(
        cfg,
        roll=dataclasses.replace(cfg.roll, lock_expiry=0.3),
        hosts=(Host("web1", "web1"), Host("web2", "web2"), Host("web3", "web3")),
    )
    monkeypatch.setattr(bundles, "ensure_bundle", lambda cfg, store, ref: a_bundle(store))
    monkeypatch.setattr(roll_op, "prepare", lambda cfg, h: roll_op.Prepared(conn=mock.Mock()))
    lost = threading.Event()
    real_warn = lock_op.warn

    def warn(msg: str) -> None:
        real_warn(msg)
        if "LOST THE DEPLOY LOCK" in msg:
            lost.set()

    monkeypatch.setattr(lock_op, "warn", warn)
    rebooted: list[str] = []

    def attempt(cfg: Config, h: Host, *a: Any) -> Any:
        rebooted.append(h.name)
        force_unlock(store)  # someone runs `fab deploy.unlock --force` mid-roll...
        store.acquire_lock("bob@b", "roll", expiry=600)  # ...and starts their own roll
        assert lost.wait(20)
        return roll_op.HostRoll(h.name, ok=True)

    monkeypatch.setattr(roll_op, "_attempt", attempt)
    ok = roll_op.run_roll(cfg, Targets(list(cfg.hosts), whole_fleet=True), "main")
    captured = capsys.readouterr()
    assert not ok and rebooted == ["web1"]
    assert "stopped before batch 2: the deploy lock was lost" in captured.err
    assert captured.out.count("not touched") == 2
    assert store.read_lock().holder == "bob@b"  # type: ignore[union-attr]


def test_batched_hotfix_or_rollback_stops_before_the_next_batch_when_the_lock_is_lost(
    cfg: Config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabdeploy.ops import batches

    held = mock.Mock(lost=None)
    ran: list[str] = []

    def run_parallel(cfg: Config, group: list[Host], work: Any, **kw: Any) -> list[HostResult]:
        ran.extend(h.name for h in group)
        held.lost = "our deploy lock s3://b/lock.json was broken: now held by bob@b (roll)"
        return [HostResult(h.name, True) for h in group]

    monkeypatch.setattr(batches, "run_parallel", run_parallel)
    hosts = [Host(f"web{i}", f"web{i}") for i in (1, 2, 3)]
    out = batches.run_batches(cfg, [[h] for h in hosts], lambda h, c: {}, held=held)
    assert ran == ["web1"] and out.not_touched == ["web2", "web3"] and not out.ok
    assert "stopped before batch 2: the deploy lock was lost" in capsys.readouterr().err


def test_roll_without_a_reboot_right_stops_before_it_publishes(
    cfg: Config, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabdeploy.adapters import bundle as bundles
    from fabdeploy.basics.errors import HostError
    from fabdeploy.ops import roll as roll_op

    cfg = dataclasses.replace(
        cfg, hosts=(Host("web1", "web1"), Host("web2", "web2"), Host("web3", "web3"))
    )
    monkeypatch.setattr(bundles, "ensure_bundle", lambda cfg, store, ref: a_bundle(store))
    asked: list[list[str]] = []

    def rights(cfg: Config, hosts: list[Host]) -> list[HostError]:
        asked.append([h.name for h in hosts])
        return [
            HostError(h.name, f"{h.name}: deploy may not run `sudo /sbin/reboot`: add it")
            for h in hosts
            if h.name != "web1"
        ]

    monkeypatch.setattr(roll_op, "missing_reboot_rights", rights)
    monkeypatch.setattr(roll_op, "_attempt", mock.Mock(side_effect=AssertionError("rebooted")))
    with pytest.raises(HostError) as e:
        roll_op.run_roll(cfg, Targets(list(cfg.hosts), whole_fleet=True), "main")
    assert asked == [["web1", "web2", "web3"]]  # every host, not just the first batch
    assert str(e.value) == (
        "web2: deploy may not run `sudo /sbin/reboot`: add it; nothing was published or "
        "rebooted (also refused: web3)"
    )
    assert store.read_pointer()[0] is None and store.read_lock() is None
