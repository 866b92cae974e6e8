"""Run-once hooks (hooks.once): the config, which host runs them, the S3 record that keeps a
rerun from running them again, and where hotfix / roll / instance refresh call them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fabdeploy.adapters import nodectl
from fabdeploy.basics.config import Hook, _build
from fabdeploy.basics.errors import ConfigError, HostError, StoreError
from fabdeploy.ops import once
from fabdeploy.ops.targets import Targets


def cfg_with(tmp_path: Path, once_hooks: Any, **extra: Any) -> Any:
    raw = {
        "app": "shop",
        "repo": ".",
        "s3": {"bucket": "b"},
        "deploy_to": "/srv/shop",
        "hosts": {"web1": {"roles": ["web"]}, "db1": {"roles": ["db", "web"]}, "w1": {}},
        "hooks": {"once": once_hooks},
        **extra,
    }
    return _build(raw, tmp_path / "deploy.yml")


def test_once_takes_commands_or_run_roles_timeout(tmp_path: Path) -> None:
    cfg = cfg_with(
        tmp_path, ["bin/rails db:migrate", {"run": "bin/seed", "roles": "db", "timeout": 60}]
    )
    assert cfg.hooks.once == (
        Hook("bin/rails db:migrate", boot=False),
        Hook("bin/seed", boot=False, roles=("db",), timeout=60.0),
    )
    # Never in node.json: boots never see them, and adding one reinstalls no node.
    assert "once" not in nodectl.node_json(cfg)["hooks"]


@pytest.mark.parametrize(
    ("hooks", "msg"),
    [
        ([{"run": "x", "boot": False}], "hooks.once must be run-once hooks never run at boot"),
        ([{"run": "x", "host": "db1"}], "(unknown: host)"),
        ([{"roles": ["db"]}], "a `run:` command"),
        (7, "a list of commands or of {run, roles, timeout} mappings"),
        ([{"run": "x", "timeout": -1}], "hooks.once"),
    ],
)
def test_bad_once_hooks_are_one_line(tmp_path: Path, hooks: Any, msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg_with(tmp_path, hooks)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_each_hook_runs_on_the_first_host_with_its_roles(tmp_path: Path) -> None:
    cfg = cfg_with(
        tmp_path,
        ["a", {"run": "b", "roles": ["web"]}, {"run": "c", "roles": ["db"]}, "d"],
    )
    hosts = list(cfg.hosts)
    steps = once.plan(cfg, hosts)
    assert [(h.name, [k.run for k in ks]) for h, ks in steps] == [
        ("web1", ["a", "b"]),
        ("db1", ["c"]),
        ("web1", ["d"]),
    ]
    # A subset: its first host (with the role).
    assert [h.name for h, _ in once.plan(cfg, [hosts[2], hosts[1]])] == ["w1", "db1", "w1"]
    with pytest.raises(
        ConfigError,
        match=r"`b` runs on a host with role web, and none of the hosts of this run \(w1\)",
    ):
        once.plan(cfg, [hosts[2]])


class FakeStore:
    def __init__(self, record: Any = None) -> None:
        self.record = record
        self.writes: list[list[dict[str, Any]]] = []

    def read_once(self) -> list[dict[str, Any]]:
        if isinstance(self.record, Exception):
            raise self.record
        return list(self.record or [])

    def write_once(self, entries: list[dict[str, Any]]) -> None:
        self.writes.append(entries)
        self.record = entries

    def presign_bundle(self, bid: str) -> str:
        return f"https://s3.example/{bid}?sig"

    def read_pointer(self, replacing: bool = False) -> tuple[None, None]:
        return None, None  # hotfix reads it while its hosts work

    def finish_deferred(self) -> None:
        pass


def bundle(commit: str = "c" * 40, bid: str | None = None) -> Any:
    return SimpleNamespace(
        sha256="0" * 64,
        commit=commit,
        bundle_id=bid or commit,
        ref="main",
        committed_at=1700000000,
        size=100,
        manifest=None,
    )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[str, ...], Any]]:
    seen: list[tuple[str, tuple[str, ...], Any]] = []

    def call(cfg: Any, host: Any, conn: Any, *args: str, stdin: Any = None, **kw: Any) -> dict:
        seen.append((host.name, args, stdin))
        return {"ok": True}

    monkeypatch.setattr(nodectl, "call", call)
    monkeypatch.setattr(once, "connect", lambda cfg, host: SimpleNamespace(close=lambda: None))
    return seen


def test_run_records_the_bundle_and_a_rerun_skips_it(
    tmp_path: Path, calls: list, capsys: Any
) -> None:
    cfg = cfg_with(tmp_path, ["bin/migrate", {"run": "bin/seed", "timeout": 5}])
    store = FakeStore()
    b = bundle(bid="c" * 40 + "-abcdefabcdef")
    assert once.run_once_hooks(cfg, store, b, list(cfg.hosts)) is True
    ((host, args, stdin),) = calls
    assert host == "web1" and args[0] == "once" and "--url-stdin" in args
    assert args[args.index("--bundle-id") + 1] == b.bundle_id
    assert json.loads(args[args.index("--hooks") + 1]) == [
        "bin/migrate",
        {"run": "bin/seed", "timeout": 5.0},
    ]
    assert stdin == f"https://s3.example/{b.bundle_id}?sig\n"  # a credential: never in argv
    assert store.record[0]["bundle_id"] == b.bundle_id and store.record[0]["host"] == "web1"
    # Same bundle again: nothing runs, and it says so.
    assert once.run_once_hooks(cfg, store, b, list(cfg.hosts)) is False
    assert len(calls) == 1
    assert "run-once hooks already ran for cccccccc (on web1" in capsys.readouterr().out
    # --force runs them again; another bundle runs them.
    assert once.run_once_hooks(cfg, store, b, list(cfg.hosts), force=True) is True
    assert once.run_once_hooks(cfg, store, bundle("d" * 40), list(cfg.hosts)) is True
    assert len(calls) == 3
    assert [e["bundle_id"] for e in store.record] == ["d" * 40, b.bundle_id]  # newest first


def test_no_once_hooks_no_call(tmp_path: Path, calls: list) -> None:
    cfg = cfg_with(tmp_path, [])
    assert once.run_once_hooks(cfg, FakeStore(), bundle(), list(cfg.hosts)) is False
    assert calls == []


def test_a_damaged_record_warns_and_runs_them(tmp_path: Path, calls: list, capsys: Any) -> None:
    cfg = cfg_with(tmp_path, ["bin/migrate"])
    store = FakeStore(StoreError("s3://b/shop/state/once.json is not valid JSON (x)"))
    assert once.run_once_hooks(cfg, store, bundle(), list(cfg.hosts)) is True
    assert "treating it as empty" in capsys.readouterr().err
    assert store.writes and store.writes[-1][0]["bundle_id"] == "c" * 40


def test_a_failing_hook_is_one_line_plus_its_last_lines_and_is_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_with(tmp_path, ["bin/migrate"])

    def call(cfg: Any, host: Any, conn: Any, *args: str, **kw: Any) -> dict:
        raise HostError(
            host.name,
            f"{host.name}: once hook `bin/migrate` failed with exit code 1 on {host.name} (...); "
            "no host was changed: fix it and deploy again",
            data={"ok": False, "output_tail": ["migrating 0042", "table users already exists"]},
        )

    monkeypatch.setattr(nodectl, "call", call)
    monkeypatch.setattr(once, "connect", lambda cfg, host: SimpleNamespace(close=lambda: None))
    store = FakeStore()
    with pytest.raises(once.OnceError) as e:
        once.run_once_hooks(cfg, store, bundle(), list(cfg.hosts))
    first, *rest = str(e.value).splitlines()
    assert first.startswith("web1: once hook `bin/migrate` failed with exit code 1")
    assert first.endswith("(nothing was published). Its last lines:")
    assert rest == ["  | migrating 0042", "  | table users already exists"]
    assert store.writes == []


def test_no_reachable_host_refuses_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_with(tmp_path, ["bin/migrate"])

    def unreachable(cfg: Any, host: Any, conn: Any, cmd: str, **kw: Any) -> Any:
        raise HostError(host.name, f"cannot connect to {host.name}")

    monkeypatch.setattr(once, "connect", lambda cfg, host: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(once, "run", unreachable)
    with pytest.raises(once.OnceError) as e:
        once.reachable_hosts(cfg, list(cfg.hosts))
    assert str(e.value) == (
        "hooks.once (run-once hooks) must run on one current instance before anything changes, "
        "and none answers over SSH (web1, db1, w1); nothing was started: fix SSH from here, or "
        "pass --skip-once and run them yourself"
    )
    up = {"db1"}
    monkeypatch.setattr(
        once,
        "run",
        lambda cfg, host, conn, cmd, **kw: SimpleNamespace(exit_code=0 if host.name in up else 1),
    )
    assert [h.name for h in once.reachable_hosts(cfg, list(cfg.hosts))] == ["db1"]


# --- where the operations call them ----------------------------------------------------------


class Held:
    lost = None

    def check(self, what: str) -> None:
        pass


def fake_lock(events: list[str]) -> Any:
    from contextlib import contextmanager

    @contextmanager
    def lock(cfg: Any, store: Any, what: str, enabled: bool = True) -> Any:
        events.append(f"lock {enabled}")
        try:
            yield Held() if enabled else None
        finally:
            events.append("unlock")

    return lock


def test_hotfix_runs_them_first_under_the_lock_and_a_failure_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabdeploy.ops import hotfix as hf

    cfg = cfg_with(tmp_path, ["bin/migrate"])
    events: list[str] = []
    monkeypatch.setattr(hf, "store_for", lambda cfg: FakeStore())
    monkeypatch.setattr(hf.bundles, "ensure_bundle", lambda cfg, store, ref: bundle())
    monkeypatch.setattr(hf.bundles, "publish_bundle", lambda *a, **kw: events.append("publish"))
    monkeypatch.setattr(hf, "fleet_lock", fake_lock(events))
    monkeypatch.setattr(hf, "drainer_for", lambda cfg, store, action, held: None)

    def hotfix(cfg: Any, store: Any, b: Any, targets: Any, **kw: Any) -> Any:
        events.append("hotfix " + ",".join(h.name for h in targets.hosts))
        return SimpleNamespace(ok=True, results=[], not_touched=[])

    monkeypatch.setattr(hf, "hotfix", hotfix)

    def ran(cfg: Any, store: Any, b: Any, hosts: Any, **kw: Any) -> bool:
        events.append("once " + ",".join(h.name for h in hosts))
        return True

    monkeypatch.setattr(hf, "run_once_hooks", ran)
    hosts = list(cfg.hosts)
    assert hf.run_hotfix(cfg, Targets(hosts, True), None)
    assert events == ["lock True", "once web1,db1,w1", "hotfix web1,db1,w1", "publish", "unlock"]
    # A subset takes the lock for them too; --skip-once leaves both out.
    events.clear()
    assert hf.run_hotfix(cfg, Targets(hosts[1:], False), None)
    assert events == ["lock True", "once db1,w1", "hotfix db1,w1", "unlock"]
    events.clear()
    assert hf.run_hotfix(cfg, Targets(hosts[1:], False), None, skip_once=True)
    assert events == ["lock False", "hotfix db1,w1", "unlock"]

    def fails(*a: Any, **kw: Any) -> bool:
        events.append("once")
        raise once.OnceError("web1", "web1: once hook `bin/migrate` failed")

    monkeypatch.setattr(hf, "run_once_hooks", fails)
    events.clear()
    with pytest.raises(once.OnceError):
        hf.run_hotfix(cfg, Targets(hosts, True), None)
    assert events == ["lock True", "once", "unlock"]  # no host touched, nothing published


def test_roll_runs_them_on_the_first_host_in_roll_order_before_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabdeploy.ops import roll

    cfg = cfg_with(tmp_path, ["bin/migrate"])
    events: list[str] = []

    class Store(FakeStore):
        def read_pointer(self, replacing: bool = False) -> Any:
            return None, None

    monkeypatch.setattr(roll, "store_for", lambda cfg: Store())
    monkeypatch.setattr(roll, "reconcile", lambda *a: None)
    monkeypatch.setattr(roll.bundles, "ensure_bundle", lambda cfg, store, ref: bundle())
    monkeypatch.setattr(roll.bundles, "publish_bundle", lambda *a, **kw: events.append("publish"))
    monkeypatch.setattr(roll, "fleet_lock", fake_lock(events))

    def fails(cfg: Any, store: Any, b: Any, hosts: Any, **kw: Any) -> bool:
        events.append("once " + ",".join(h.name for h in hosts))
        raise once.OnceError("db1", "db1: once hook failed")

    monkeypatch.setattr(roll, "run_once_hooks", fails)
    with pytest.raises(once.OnceError):
        roll.run_roll(cfg, Targets(list(cfg.hosts), True), None, role_order=["db"])
    assert events == ["lock True", "once db1,web1,w1", "unlock"]  # the pointer never moved


def test_instance_refresh_runs_them_over_ssh_before_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabdeploy.ops import refresh

    cfg = cfg_with(
        tmp_path, ["bin/migrate"], aws={"region": "eu-west-1", "autoscaling_groups": ["shop"]}
    )
    events: list[str] = []
    monkeypatch.setattr(refresh, "_group_instances", lambda *a: None)
    monkeypatch.setattr(refresh, "store_for", lambda cfg: FakeStore())
    monkeypatch.setattr(refresh.bundles, "ensure_bundle", lambda cfg, store, ref: bundle())
    monkeypatch.setattr(
        refresh.bundles, "publish_bundle", lambda *a, **kw: events.append("publish")
    )
    monkeypatch.setattr(refresh, "fleet_lock", fake_lock(events))
    monkeypatch.setattr(refresh, "resolve_hosts", lambda cfg: list(cfg.hosts))
    monkeypatch.setattr(
        refresh,
        "reachable_hosts",
        lambda cfg, hosts: (events.append("probe"), hosts[1:])[1],
    )

    def ran(cfg: Any, store: Any, b: Any, hosts: Any, **kw: Any) -> bool:
        events.append("once " + ",".join(h.name for h in hosts()))
        raise once.OnceError("db1", "db1: once hook failed")

    monkeypatch.setattr(refresh, "run_once_hooks", ran)
    with pytest.raises(once.OnceError):
        refresh.run_instance_refresh(cfg, None, clients=SimpleNamespace())
    assert events == ["lock True", "probe", "once db1,w1", "unlock"]


def test_probing_stops_once_every_hook_has_a_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_with(tmp_path, [{"run": "bin/migrate", "roles": ["db"]}], parallel=1)
    probed: list[str] = []

    def answers(cfg: Any, host: Any, conn: Any, cmd: str, **kw: Any) -> Any:
        probed.append(host.name)
        return SimpleNamespace(exit_code=0)

    monkeypatch.setattr(once, "connect", lambda cfg, host: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(once, "run", answers)
    found = once.reachable_hosts(cfg, list(cfg.hosts))
    assert probed == ["web1", "db1"] and [h.name for h in found] == ["web1", "db1"]
    assert [(h.name, [k.run for k in ks]) for h, ks in once.plan(cfg, found)] == [
        ("db1", ["bin/migrate"])
    ]


def test_dry_run_says_where_they_would_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from fabdeploy.ops import hotfix as hf

    cfg = cfg_with(tmp_path, [{"run": "bin/migrate", "roles": ["db"]}])
    monkeypatch.setattr(hf.bundles, "resolve_commit", lambda repo, ref: ("c" * 40, None))
    assert hf.run_hotfix(cfg, Targets(list(cfg.hosts), True), None, dry_run=True)
    out = capsys.readouterr().out
    assert (
        "the run-once hooks (unless they already ran for this bundle) on db1: `bin/migrate`" in out
    )
    assert hf.run_hotfix(cfg, Targets(list(cfg.hosts), True), None, dry_run=True, skip_once=True)
    assert "run-once" not in capsys.readouterr().out


def test_instance_refresh_refuses_to_start_when_no_instance_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabdeploy.ops import refresh

    cfg = cfg_with(
        tmp_path, ["bin/migrate"], aws={"region": "eu-west-1", "autoscaling_groups": ["shop"]}
    )
    events: list[str] = []
    monkeypatch.setattr(refresh, "_group_instances", lambda *a: None)
    monkeypatch.setattr(refresh, "store_for", lambda cfg: FakeStore())
    monkeypatch.setattr(refresh.bundles, "ensure_bundle", lambda cfg, store, ref: bundle())
    monkeypatch.setattr(
        refresh.bundles, "publish_bundle", lambda *a, **kw: events.append("publish")
    )
    monkeypatch.setattr(refresh, "start_refresh", lambda *a: events.append("refresh") or "r-1")
    monkeypatch.setattr(refresh, "follow_refresh", lambda *a, **kw: "Successful")
    monkeypatch.setattr(refresh, "fleet_lock", fake_lock(events))
    monkeypatch.setattr(refresh, "resolve_hosts", lambda cfg: list(cfg.hosts))
    monkeypatch.setattr(once, "connect", lambda cfg, host: SimpleNamespace(close=lambda: None))

    def down(cfg: Any, host: Any, conn: Any, cmd: str, **kw: Any) -> Any:
        raise HostError(host.name, f"cannot connect to {host.name}")

    monkeypatch.setattr(once, "run", down)
    with pytest.raises(once.OnceError, match="none answers over SSH"):
        refresh.run_instance_refresh(cfg, None, clients=SimpleNamespace())
    assert events == ["lock True", "unlock"]  # nothing published, no refresh started
    # Once an instance answers: the hooks there, then publish, then the refresh.
    monkeypatch.setattr(once, "run", lambda *a, **kw: SimpleNamespace(exit_code=0))
    monkeypatch.setattr(
        nodectl, "call", lambda cfg, host, conn, *args, **kw: events.append(args[0]) or {}
    )
    events.clear()
    assert refresh.run_instance_refresh(cfg, None, clients=SimpleNamespace())
    assert events == ["lock True", "once", "publish", "refresh", "unlock"]
    # --skip-once: no SSH at all.
    monkeypatch.setattr(once, "run", down)
    events.clear()
    assert refresh.run_instance_refresh(cfg, None, clients=SimpleNamespace(), skip_once=True)
    assert events == ["lock True", "publish", "refresh", "unlock"]


def test_status_shows_the_last_run_once_record(tmp_path: Path, capsys: Any) -> None:
    from fabdeploy.ops import status

    cfg = cfg_with(tmp_path, ["bin/migrate"])
    entry = {"bundle_id": "d" * 40, "host": "web1", "at": "2026-11-29T07:00:00Z", "by": "ann@x"}
    rec = status.once_record(cfg, FakeStore([entry, {"bundle_id": "c" * 40}]))
    assert rec == entry
    status.show(cfg, (None, None), [], as_json=False, once=rec)
    assert "run-once hooks: last ran for dddddddd on web1 at 2026-11-29T07:00:00Z by ann@x" in (
        capsys.readouterr().out
    )
    status.show(cfg, (None, None), [], as_json=True, once=status.once_record(cfg, FakeStore()))
    assert json.loads(capsys.readouterr().out)["once"] == {}
    broken = status.once_record(cfg, FakeStore(StoreError("s3://b/x: access denied")))
    status.show(cfg, (None, None), [], as_json=False, once=broken)
    assert "run-once hooks: unknown (s3://b/x: access denied)" in capsys.readouterr().out
    assert status.once_record(cfg_with(tmp_path, []), FakeStore([entry])) is None
