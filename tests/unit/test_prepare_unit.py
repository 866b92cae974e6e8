"""hotfix with traffic settings: every host prepares (download, verify, extract) before any
leaves traffic; hosts already on the bundle are never drained; without traffic settings
nothing changes (no extra call per host)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fabdeploy.adapters.ssh import HostResult
from fabdeploy.basics import config
from fabdeploy.basics.config import Host
from fabdeploy.basics.errors import HostError
from fabdeploy.ops import batches
from fabdeploy.ops import hotfix as hotfix_mod
from fabdeploy.ops.batches import plan_for
from fabdeploy.ops.targets import Targets


def load(tmp_path: Path, traffic: bool = True) -> config.Config:
    log = tmp_path / "log"
    text = "app: shop\nrepo: .\ns3: {bucket: b}\ndeploy_to: /srv/shop\nhosts: [web1, web2, web3, web4]\n"
    if traffic:
        text += (
            f"traffic:\n  drain: {'echo drain {host} >> ' + str(log)!r}\n"
            f"  restore: {'echo restore {host} >> ' + str(log)!r}\n"
        )
    p = tmp_path / "deploy.yml"
    p.write_text(text)
    return config.load(p)


BUNDLE = SimpleNamespace(
    sha256="ab" * 32,
    commit="c" * 40,
    ref="main",
    committed_at=None,
    size=10,
    bundle_id=None,
    manifest=None,
)


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Hosts faked at the node program's door: `calls` is every node call in order, with
    what the balancer had been told at that moment; `answers` sets a host's prepare answer."""
    log = tmp_path / "log"
    state: dict[str, Any] = {"calls": [], "answers": {}}

    def call(cfg: Any, host: Host, conn: Any, *args: str, **kw: Any) -> dict[str, Any]:
        told = log.read_text().splitlines() if log.exists() else []
        state["calls"].append((host.name, args, told[-1] if told else None))
        if "--prepare" in args:
            answer = state["answers"].get(host.name, {"ok": True, "needed": True, "prepared": "p"})
            if not answer.get("ok"):
                raise HostError(host.name, f"{host.name}: {answer['error']}")
            return answer
        return {"ok": True, "changed": True, "release": "20260101000000", "commit": BUNDLE.commit}

    def run_parallel(
        cfg: Any, group: list[Host], work: Any, *, parallel: Any = None, on_done: Any = None
    ) -> list[HostResult]:
        out = []
        for h in group:
            try:
                out.append(HostResult(h.name, True, work(h, SimpleNamespace(host=h.name))))
            except HostError as e:
                out.append(HostResult(h.name, False, {}, e.message))
        return out

    monkeypatch.setattr(hotfix_mod.nodectl, "call", call)
    monkeypatch.setattr(hotfix_mod, "health_or_revert", lambda cfg, h, c, data, user: data)
    monkeypatch.setattr(batches, "run_parallel", run_parallel)
    state["log"] = log
    return state


def run(cfg: config.Config, **kw: Any) -> Any:
    store = SimpleNamespace(presign_bundle=lambda bid: "https://s3/presigned")
    hosts = list(cfg.hosts)
    groups = plan_for(cfg, hosts, kw.pop("batch", "1"), None).groups
    return hotfix_mod.hotfix(cfg, store, BUNDLE, Targets(hosts, True), groups=groups, **kw)


def test_every_host_prepares_before_any_host_leaves_traffic(tmp_path: Path, fleet) -> None:
    out = run(load(tmp_path))
    assert out.ok and [r.host for r in out.results] == ["web1", "web2", "web3", "web4"]
    calls = fleet["calls"]
    prepares = [c for c in calls if "--prepare" in c[1]]
    assert [c[0] for c in prepares] == ["web1", "web2", "web3", "web4"]
    assert calls[:4] == prepares and all(c[2] is None for c in prepares)  # nobody drained yet
    for _name, args, _told in prepares:
        assert "--restart" not in args and "--url-stdin" in args
    switches = calls[4:]
    # Each switch runs while its host (and only it) is out of traffic, and restarts.
    assert [(c[0], c[2]) for c in switches] == [(f"web{i}", f"drain web{i}") for i in range(1, 5)]
    assert all("--restart" in c[1] and "--prepare" not in c[1] for c in switches)


def test_a_host_already_on_the_bundle_is_not_drained(tmp_path: Path, fleet) -> None:
    fleet["answers"]["web2"] = {"ok": True, "changed": False, "release": "r", "commit": "c"}
    out = run(load(tmp_path))
    assert out.ok
    assert next(r for r in out.results if r.host == "web2").data["changed"] is False
    assert [r.host for r in out.results] == ["web1", "web2", "web3", "web4"]
    told = fleet["log"].read_text().splitlines()
    assert "drain web2" not in told and "drain web1" in told and "drain web4" in told
    assert [c[0] for c in fleet["calls"] if "--prepare" not in c[1]] == ["web1", "web3", "web4"]


def test_a_failed_prepare_stops_the_run_before_any_drain(tmp_path: Path, fleet) -> None:
    fleet["answers"]["web3"] = {"ok": False, "error": "sha256 mismatch"}
    out = run(load(tmp_path))
    assert not out.ok
    assert [(r.host, r.ok) for r in out.results] == [("web3", False)]
    assert out.not_touched == ["web1", "web2", "web4"]
    assert not fleet["log"].exists()  # nobody was drained
    assert all("--prepare" in c[1] for c in fleet["calls"])


def test_keep_going_switches_the_prepared_hosts_anyway(tmp_path: Path, fleet) -> None:
    fleet["answers"]["web3"] = {"ok": False, "error": "sha256 mismatch"}
    out = run(load(tmp_path), keep_going=True)
    assert [(r.host, r.ok) for r in out.results] == [
        ("web1", True),
        ("web2", True),
        ("web3", False),
        ("web4", True),
    ]
    assert "drain web3" not in fleet["log"].read_text().splitlines()


def test_push_mode_switches_with_the_prepared_release_and_sends_nothing_again(
    tmp_path: Path, fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    local = tmp_path / "bundle.tar.gz"
    local.write_bytes(b"x")
    monkeypatch.setattr(hotfix_mod, "_download_for_push", lambda store, b: str(local))
    cfg = load(tmp_path)

    def conn_for(h: Host) -> Any:
        return SimpleNamespace(
            host=h.name, sftp=lambda: SimpleNamespace(put=lambda a, b: sent.append(b))
        )

    def run_parallel(
        cfg: Any, group: list[Host], work: Any, *, parallel: Any = None, on_done: Any = None
    ) -> list[HostResult]:
        return [HostResult(h.name, True, work(h, conn_for(h))) for h in group]

    monkeypatch.setattr(batches, "run_parallel", run_parallel)
    out = run(cfg, push=True)
    assert out.ok and len(sent) == 4  # one copy per host, for its prepare
    switches = [c for c in fleet["calls"] if "--prepare" not in c[1] and c[1][0] != "version"]
    assert switches and all("--prepared" in c[1] and "--file" not in c[1] for c in switches)


def test_without_traffic_settings_there_is_no_prepare_call(tmp_path: Path, fleet) -> None:
    out = run(load(tmp_path, traffic=False), batch=None)
    assert out.ok
    assert len(fleet["calls"]) == 4 and not any("--prepare" in c[1] for c in fleet["calls"])


def test_rollback_checks_every_host_first_and_drains_only_those_that_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabdeploy.ops import rollback as rollback_mod

    cfg = load(tmp_path)
    log = tmp_path / "log"
    calls: list[tuple[str, tuple[str, ...], str | None]] = []

    def call(cfg: Any, host: Host, conn: Any, *args: str, **kw: Any) -> dict[str, Any]:
        told = log.read_text().splitlines() if log.exists() else []
        calls.append((host.name, args, told[-1] if told else None))
        if "--check" in args:
            if host.name == "web2":  # already on the release it would go to
                return {"ok": True, "changed": False, "release": "r1", "commit": "c1"}
            return {"ok": True, "needed": True, "release": f"r-{host.name}", "commit": "c1"}
        return {"ok": True, "changed": True, "release": args[-1], "commit": "c1"}

    def run_parallel(
        cfg: Any, group: list[Host], work: Any, *, parallel: Any = None, on_done: Any = None
    ) -> list[HostResult]:
        return [HostResult(h.name, True, work(h, SimpleNamespace(host=h.name))) for h in group]

    monkeypatch.setattr(rollback_mod.nodectl, "call", call)
    monkeypatch.setattr(
        rollback_mod, "wait_healthy", lambda cfg, a: SimpleNamespace(ok=True, detail="ok")
    )
    monkeypatch.setattr(batches, "run_parallel", run_parallel)
    hosts = list(cfg.hosts)
    out = rollback_mod.rollback(
        cfg, Targets(hosts, True), groups=plan_for(cfg, hosts, "1", None).groups
    )
    assert out.ok and [r.host for r in out.results] == ["web1", "web2", "web3", "web4"]
    checks = [c for c in calls if "--check" in c[1]]
    assert calls[:4] == checks and all(c[2] is None for c in checks)  # nobody drained yet
    moves = calls[4:]
    # Each host goes exactly where its check said, drained; web2 has nothing to do: not drained.
    assert [(c[0], c[1][-2:], c[2]) for c in moves] == [
        (h, ("--release", f"r-{h}"), f"drain {h}") for h in ("web1", "web3", "web4")
    ]
    assert "drain web2" not in log.read_text().splitlines()


def test_rollback_with_a_host_that_has_nowhere_to_go_drains_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabdeploy.ops import rollback as rollback_mod

    cfg = load(tmp_path)

    def call(cfg: Any, host: Host, conn: Any, *args: str, **kw: Any) -> dict[str, Any]:
        assert "--check" in args, "no host may change before every check passed"
        if host.name == "web3":
            raise HostError(host.name, "web3: no previous release to roll back to")
        return {"ok": True, "needed": True, "release": "r0", "commit": "c0"}

    def run_parallel(
        cfg: Any, group: list[Host], work: Any, *, parallel: Any = None, on_done: Any = None
    ) -> list[HostResult]:
        out = []
        for h in group:
            try:
                out.append(HostResult(h.name, True, work(h, SimpleNamespace(host=h.name))))
            except HostError as e:
                out.append(HostResult(h.name, False, {}, e.message))
        return out

    monkeypatch.setattr(rollback_mod.nodectl, "call", call)
    monkeypatch.setattr(batches, "run_parallel", run_parallel)
    hosts = list(cfg.hosts)
    out = rollback_mod.rollback(cfg, Targets(hosts, True), groups=[hosts])
    assert not out.ok and out.not_touched == ["web1", "web2", "web4"]
    assert not (tmp_path / "log").exists()
