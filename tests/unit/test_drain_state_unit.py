"""Saved drain state (ops/undo.py + adapters/traffic.py): what traffic.drain took out is recorded
before the command runs, cleared once traffic.restore worked, and put back by the next run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fabdeploy.adapters import traffic as traffic_mod
from fabdeploy.adapters.traffic import Drainer
from fabdeploy.basics import config
from fabdeploy.basics.config import Host
from fabdeploy.basics.errors import ConflictError, HostError, StoreError
from fabdeploy.ops.undo import S3Journal, drainer_for, reconcile


class FakeStore:
    """The undo object of Store, in memory, with its conditional writes."""

    undo_key = "shop/state/undo.json"

    def __init__(self) -> None:
        self.body: dict[str, Any] | None = None
        self.etag = 0
        self.writes: list[dict[str, Any] | None] = []
        self.fail = False

    def uri(self, key: str) -> str:
        return f"s3://b/{key}"

    def read_undo(self) -> tuple[Any, str | None]:
        return self.body, (str(self.etag) if self.body is not None else None)

    def write_undo(self, state: dict[str, Any], expected: str | None) -> str:
        if self.fail:
            raise StoreError("S3 is unreachable")
        if expected != (str(self.etag) if self.body is not None else None):
            raise ConflictError("changed meanwhile")
        self.body, self.etag = state, self.etag + 1
        self.writes.append(state)
        return str(self.etag)

    def delete_undo(self, expected: str | None) -> None:
        self.body = None
        self.writes.append(None)

    def acquire_lock(self, holder: str, action: str, expiry: float) -> Any:
        self.locked = action
        return SimpleNamespace(holder=holder)

    def release_lock(self, lock: Any) -> None:
        self.locked = None


def load(tmp_path: Path, log: Path, restore: str | None = "echo restore {host} >> LOG") -> Any:
    p = tmp_path / "deploy.yml"
    text = (
        "app: shop\nrepo: .\ns3: {bucket: b}\ndeploy_to: /srv/shop\nhosts: [web1, web2, web3]\n"
        f"traffic:\n  drain: {'echo drain {host} >> ' + str(log)!r}\n"
    )
    if restore:
        text += f"  restore: {restore.replace('LOG', str(log))!r}\n"
    p.write_text(text)
    return config.load(p)


@pytest.fixture(autouse=True)
def no_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        traffic_mod, "connect", lambda cfg, h: SimpleNamespace(host=h.host, close=lambda: None)
    )


def conn(host: str) -> Any:
    return SimpleNamespace(host=host)


def test_drained_host_is_in_s3_before_its_drain_runs_and_gone_once_restored(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log"
    cfg = load(tmp_path, log)
    store = FakeStore()
    d = Drainer(cfg, journal=S3Journal(store, "hotfix"))
    web2 = cfg.hosts[1]
    d.drain(web2, conn("10.0.0.2"))
    assert log.read_text() == "drain web2\n"
    first = store.writes[0]
    assert first is not None and first["action"] == "hotfix"
    assert first["drained"] == {"web2": {"host": "web2", "address": "10.0.0.2"}}
    d.restore(web2, conn("10.0.0.2"))
    assert store.body is None and store.writes[-1] is None  # cleared once it is back


def test_a_record_that_cannot_be_written_fails_the_host_before_its_drain(tmp_path: Path) -> None:
    log = tmp_path / "log"
    cfg = load(tmp_path, log)
    store = FakeStore()
    store.fail = True
    d = Drainer(cfg, journal=S3Journal(store, "hotfix"))
    with pytest.raises(HostError) as e:
        d.drain(cfg.hosts[0], conn("10.0.0.1"))
    assert "S3 is unreachable" in e.value.message and "not taken out of traffic" in e.value.message
    assert not log.exists()  # not drained
    d.restore_all()
    assert not log.exists()  # nothing to put back


def test_killed_run_is_put_back_by_the_next_one_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log"
    cfg = load(tmp_path, log)
    store = FakeStore()
    killed = Drainer(cfg, journal=S3Journal(store, "hotfix"))
    killed.drain(cfg.hosts[0], conn("10.0.0.1"))
    killed.drain(cfg.hosts[2], conn("10.0.0.3"))
    del killed  # kill -9: no restore_all
    capsys.readouterr()
    d = drainer_for(cfg, store, "rollback", held=object())  # the next run, under the lock
    out = capsys.readouterr().out.strip().splitlines()
    assert log.read_text().splitlines()[-2:] == ["restore web1", "restore web3"]
    assert store.body is None
    assert len(out) == 1 and out[0].startswith("reconciled an interrupted hotfix (")
    assert "web1, web3 put back in traffic" in out[0]
    # The run's own drains are recorded through the same journal, from a clean state.
    d.drain(cfg.hosts[1], conn("10.0.0.2"))
    assert store.body is not None and list(store.body["drained"]) == ["web2"]
    assert store.body["action"] == "rollback"
    capsys.readouterr()
    reconcile(cfg, FakeStore())  # nothing recorded: silent
    assert capsys.readouterr().out == ""


def test_a_restore_that_fails_stays_recorded_for_the_next_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log"
    cfg = load(tmp_path, log, restore="exit 7")
    store = FakeStore()
    Drainer(cfg, journal=S3Journal(store, "hotfix")).drain(cfg.hosts[0], conn("10.0.0.1"))
    capsys.readouterr()
    reconcile(cfg, store)
    cap = capsys.readouterr()
    assert "traffic.restore failed (exit 7" in cap.err
    assert "web1 NOT fully put back" in cap.out and len(cap.out.strip().splitlines()) == 1
    assert store.body is not None and list(store.body["drained"]) == ["web1"]


def test_no_restore_command_to_put_back_with_is_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log"
    store = FakeStore()
    Drainer(load(tmp_path, log), journal=S3Journal(store)).drain(Host("web1", "web1"), conn("x"))
    capsys.readouterr()
    cfg = load(tmp_path, log, restore=None)
    journal = S3Journal(store, "hotfix")
    d = Drainer(cfg, journal=journal)
    reconcile(cfg, store, journal=journal, drainer=d)
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and "web1 drained" in err[0] and "no traffic.restore" in err[0]
    assert cap.out == "" and store.body is not None  # left for a run that can
    # The run's own records keep it: a save of its instances does not drop web1.
    journal.save({})
    assert store.body is not None and sorted(store.body["drained"]) == ["web1"]


@pytest.mark.parametrize(
    "drained",
    [
        {"web1": {"host": "-oProxyCommand=x", "address": "10.0.0.1"}},
        {"a b": {"host": "web1", "address": "10.0.0.1"}},
        {"web1": "web1"},
        ["web1"],
    ],
)
def test_damaged_drained_record_is_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], drained: Any
) -> None:
    log = tmp_path / "log"
    store = FakeStore()
    store.body = {"version": 1, "instances": {}, "drained": drained}
    reconcile(load(tmp_path, log), store)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a valid undo state" in err[0] and not log.exists()


def test_unlock_puts_back_what_the_killed_run_left_under_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabdeploy.ops.undo import reconcile_after_unlock

    log = tmp_path / "log"
    cfg = load(tmp_path, log)
    store = FakeStore()
    Drainer(cfg, journal=S3Journal(store, "rollback")).drain(cfg.hosts[1], conn("10.0.0.2"))
    seen: list[Any] = []
    store.read_undo = lambda: (seen.append(store.locked), (store.body, str(store.etag)))[1]  # type: ignore[method-assign]
    store.locked = None
    capsys.readouterr()
    reconcile_after_unlock(cfg, store)
    assert log.read_text().splitlines()[-1] == "restore web2" and store.body is None
    assert seen[-1] is not None and "unlock" in seen[-1]  # read again holding the lock
    assert "reconciled an interrupted rollback" in capsys.readouterr().out
    assert store.locked is None  # released
