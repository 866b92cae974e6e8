"""fabdeploy/ops/batches.py: the batch plan of hotfix/rollback/roll and the fail-fast runner (no hosts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fabdeploy.adapters.ssh import HostResult
from fabdeploy.basics import config
from fabdeploy.basics.config import ConfigError, Host
from fabdeploy.ops import batches
from fabdeploy.ops.batches import plan, plan_for, run_batches
from fabdeploy.ops.inplace import print_results


def load(tmp_path: Path, extra: str = "", n: int = 6) -> config.Config:
    p = tmp_path / "deploy.yml"
    hosts = ", ".join(f"web{i}" for i in range(1, n + 1))
    p.write_text(
        f"app: shop\nrepo: .\ns3: {{bucket: b}}\ndeploy_to: /srv/shop\nhosts: [{hosts}]\n{extra}"
    )
    return config.load(p)


def names(groups: list[list[Host]]) -> list[list[str]]:
    return [[h.name for h in g] for g in groups]


# --- the plan ----------------------------------------------------------------------------


def test_without_batch_canary_or_min_healthy_it_is_one_parallel_pass(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    p = plan_for(cfg, list(cfg.hosts), None, None)
    assert names(p.groups) == [[f"web{i}" for i in range(1, 7)]] and p.canary == 0


def test_batch_sizes_by_count_and_percent(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    hs = list(cfg.hosts)
    assert names(plan_for(cfg, hs, "4", None).groups) == [
        ["web1", "web2", "web3", "web4"],
        ["web5", "web6"],
    ]
    assert [len(g) for g in plan_for(cfg, hs, "50%", None).groups] == [3, 3]
    assert [len(g) for g in plan_for(cfg, hs, "1", None).groups] == [1] * 6
    assert [len(g) for g in plan_for(cfg, hs, "100", None).groups] == [6]


def test_canary_goes_alone_first_then_the_rest_in_batches(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    hs = list(cfg.hosts)
    p = plan_for(cfg, hs, None, 1)
    assert names(p.groups) == [["web1"], ["web2", "web3", "web4", "web5", "web6"]] and p.canary == 1
    p = plan_for(cfg, hs, "2", 2)
    assert (
        names(p.groups) == [["web1", "web2"], ["web3", "web4"], ["web5", "web6"]] and p.canary == 1
    )
    assert (
        p.describe()[0] == "  canary 1: web1, web2" and p.describe()[1] == "  batch 2: web3, web4"
    )
    # A canary bigger than the batch is still only the canary hosts, split to the batch size.
    p = plan_for(cfg, hs, "1", 2)
    assert names(p.groups)[:2] == [["web1"], ["web2"]] and p.canary == 2 and len(p.groups) == 6


def test_top_level_min_healthy_caps_every_batch(tmp_path: Path) -> None:
    cfg = load(tmp_path, "min_healthy: 4\n")
    hs = list(cfg.hosts)
    # 6 live, keep 4: at most 2 out at once, even with no --batch (the default is as many as allowed).
    assert [len(g) for g in plan_for(cfg, hs, None, None).groups] == [2, 2, 2]
    assert [len(g) for g in plan_for(cfg, hs, "100%", None).groups] == [2, 2, 2]
    assert [len(g) for g in plan_for(cfg, hs, "1", None).groups] == [1] * 6
    # A subset is capped against the live fleet too.
    assert [len(g) for g in plan_for(cfg, hs[:3], None, None).groups] == [2, 1]
    pct = load(tmp_path, "min_healthy: 50%\n")
    assert [len(g) for g in plan_for(pct, hs, None, None).groups] == [3, 3]


def test_min_healthy_that_leaves_none_is_one_clear_line(tmp_path: Path) -> None:
    cfg = load(tmp_path, "min_healthy: 100%\n")
    with pytest.raises(ConfigError) as e:
        plan_for(cfg, list(cfg.hosts), None, None)
    msg = str(e.value)
    assert "min_healthy 100% of 6 live host(s) leaves none to take out" in msg and "\n" not in msg
    assert str(cfg.path) in msg


def test_aws_min_healthy_wins_over_the_top_level_one(tmp_path: Path) -> None:
    cfg = load(tmp_path, "min_healthy: 5\naws: {min_healthy: 3}\n")
    assert batches.min_healthy_of(cfg) == ("aws.min_healthy", "3")
    assert batches.cap_for(cfg, live=6) == 3
    assert batches.min_healthy_of(load(tmp_path, "min_healthy: 5\n")) == ("min_healthy", "5")
    assert batches.min_healthy_of(load(tmp_path)) is None


def test_min_healthy_key_is_validated_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_healthy must be"):
        load(tmp_path, "min_healthy: 150%\n")
    assert load(tmp_path, "min_healthy: 0\n").min_healthy == "0"


def test_plan_interleaves_azs_only_with_aws(tmp_path: Path) -> None:
    hs = [Host("a1", "a1", az="x-1a"), Host("a2", "a2", az="x-1a"), Host("b1", "b1", az="x-1b")]
    assert names(plan(load(tmp_path), hs, "1", live=3).groups) == [["a1"], ["a2"], ["b1"]]
    aws_cfg = load(tmp_path, "aws: {}\n")
    assert names(plan(aws_cfg, hs, "1", live=3).groups) == [["a1"], ["b1"], ["a2"]]


# --- the runner: fail fast, bookkeeping ----------------------------------------------------


@pytest.fixture
def fake_ssh(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """run_parallel replaced: hosts named in `failing` fail; records which batches ran."""
    ran: list[list[str]] = []

    def run_parallel(
        cfg: Any, group: list[Host], work: Any, *, parallel: int | None = None, on_done: Any = None
    ) -> list[HostResult]:
        ran.append([h.name for h in group])
        return [
            HostResult(
                h.name,
                h.name not in fake_ssh_failing,
                {},
                None if h.name not in fake_ssh_failing else f"{h.name}: health check failed",
            )
            for h in group
        ]

    monkeypatch.setattr(batches, "run_parallel", run_parallel)
    return ran


fake_ssh_failing: set[str] = set()


@pytest.fixture(autouse=True)
def _reset_failing() -> None:
    fake_ssh_failing.clear()


def test_a_failed_batch_starts_no_new_one_and_the_rest_are_not_touched(
    tmp_path: Path, fake_ssh
) -> None:
    cfg = load(tmp_path)
    p = plan_for(cfg, list(cfg.hosts), "2", 1)
    fake_ssh_failing.add("web1")
    out = run_batches(cfg, p.groups, lambda h, c: {})
    assert fake_ssh == [["web1"]]
    assert [r.host for r in out.results] == ["web1"] and not out.ok
    assert out.not_touched == ["web2", "web3", "web4", "web5", "web6"]


def test_every_started_host_is_collected_even_in_a_failed_batch(tmp_path: Path, fake_ssh) -> None:
    cfg = load(tmp_path)
    fake_ssh_failing.add("web3")
    out = run_batches(cfg, plan_for(cfg, list(cfg.hosts), "2", None).groups, lambda h, c: {})
    assert fake_ssh == [["web1", "web2"], ["web3", "web4"]]
    assert {r.host: r.ok for r in out.results} == {
        "web1": True,
        "web2": True,
        "web3": False,
        "web4": True,
    }
    assert out.not_touched == ["web5", "web6"]


def test_keep_going_runs_every_batch(tmp_path: Path, fake_ssh) -> None:
    cfg = load(tmp_path)
    fake_ssh_failing.add("web1")
    out = run_batches(
        cfg, plan_for(cfg, list(cfg.hosts), "3", None).groups, lambda h, c: {}, keep_going=True
    )
    assert len(fake_ssh) == 2 and len(out.results) == 6 and out.not_touched == [] and not out.ok


def test_all_batches_ok(tmp_path: Path, fake_ssh) -> None:
    cfg = load(tmp_path)
    out = run_batches(cfg, plan_for(cfg, list(cfg.hosts), "1", None).groups, lambda h, c: {})
    assert len(fake_ssh) == 6 and out.ok


def test_results_table_lists_hosts_not_touched(capsys: pytest.CaptureFixture[str]) -> None:
    print_results(
        "hotfix", [HostResult("web1", False, {}, "web1: health check failed")], ["web2", "web3"]
    )
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("not touched") >= 3  # two rows and the summary
    assert "0 ok, 1 failed, 2 not touched" in text


# --- traffic.drain / traffic.restore around each host ------------------------------------------


def traffic_cfg(
    tmp_path: Path, log: Path, extra: str = "", drain: str = "echo drain {host} {address} >> LOG"
) -> Any:
    text = (
        f"traffic:\n  drain: {drain.replace('LOG', str(log))!r}\n"
        f"  restore: {'echo restore {host} >> ' + str(log)!r}\n{extra}"
    )
    return load(tmp_path, text, n=4)


@pytest.fixture
def real_steps(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """run_parallel replaced by a loop that calls the (traffic-wrapped) step like the real one."""
    from types import SimpleNamespace

    from fabdeploy.basics.errors import HostError

    ran: list[list[str]] = []

    def run_parallel(
        cfg: Any, group: list[Host], work: Any, *, parallel: int | None = None, on_done: Any = None
    ) -> list[HostResult]:
        ran.append([h.name for h in group])
        out = []
        for h in group:
            try:
                out.append(
                    HostResult(h.name, True, work(h, SimpleNamespace(host=f"10.0.0.{h.name[-1]}")))
                )
            except HostError as e:
                out.append(HostResult(h.name, False, {}, e.message))
        return out

    monkeypatch.setattr(batches, "run_parallel", run_parallel)
    return ran


def test_command_placeholders_are_shell_quoted() -> None:
    from fabdeploy.adapters.traffic import command_for

    cmd = command_for("drain {host} at {address}", Host("web 1;rm", "x"), "10.0.0.1")
    assert cmd == "drain 'web 1;rm' at 10.0.0.1"


def test_traffic_settings_batch_the_fleet_and_keep_one_host_in(tmp_path: Path) -> None:
    cfg = traffic_cfg(tmp_path, tmp_path / "log")
    assert [len(g) for g in plan_for(cfg, list(cfg.hosts), None, None).groups] == [3, 1]
    assert [len(g) for g in plan_for(cfg, list(cfg.hosts)[:1], None, None).groups] == [
        1
    ]  # one host: no batching


def test_each_host_is_drained_around_its_change_and_put_back(tmp_path: Path, real_steps) -> None:
    from fabdeploy.adapters.traffic import Drainer

    log = tmp_path / "log"
    cfg = traffic_cfg(tmp_path, log)
    seen: list[str] = []

    def work(h: Host, conn: Any) -> dict:
        seen.append(log.read_text().splitlines()[-1])  # what the balancer had been told last
        return {}

    out = run_batches(
        cfg, plan_for(cfg, list(cfg.hosts), "1", None).groups, work, traffic=Drainer(cfg)
    )
    assert out.ok
    assert seen == [f"drain web{i} 10.0.0.{i}" for i in range(1, 5)]
    assert log.read_text().splitlines()[-2:] == ["drain web4 10.0.0.4", "restore web4"]
    assert sum(1 for line in log.read_text().splitlines() if line.startswith("restore")) == 4


def test_a_failed_host_is_put_back_and_the_run_stops(tmp_path: Path, real_steps) -> None:
    from fabdeploy.adapters.traffic import Drainer
    from fabdeploy.basics.errors import HostError

    log = tmp_path / "log"
    cfg = traffic_cfg(tmp_path, log)

    def work(h: Host, conn: Any) -> dict:
        raise HostError(h.name, f"{h.name}: health check failed")

    out = run_batches(
        cfg, plan_for(cfg, list(cfg.hosts), None, 1).groups, work, traffic=Drainer(cfg)
    )
    assert log.read_text().splitlines() == ["drain web1 10.0.0.1", "restore web1"]
    assert out.not_touched == ["web2", "web3", "web4"]


def test_a_failing_drain_fails_the_host_in_one_line_and_changes_nothing(
    tmp_path: Path, real_steps
) -> None:
    from fabdeploy.adapters.traffic import Drainer

    log = tmp_path / "log"
    cfg = traffic_cfg(tmp_path, log, drain="echo no such backend >&2; exit 3")
    changed: list[str] = []
    out = run_batches(
        cfg, [list(cfg.hosts)[:1]], lambda h, c: changed.append(h.name) or {}, traffic=Drainer(cfg)
    )
    assert changed == [] and not out.ok
    err = out.results[0].error or ""
    assert "traffic.drain failed (exit 3, local): no such backend" in err and "\n" not in err
    assert log.read_text().splitlines() == ["restore web1"]  # a drain cut short is put back too


def test_interrupted_run_leaves_no_host_drained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from fabdeploy.adapters import traffic as traffic_mod
    from fabdeploy.adapters.traffic import Drainer

    log = tmp_path / "log"
    cfg = traffic_cfg(tmp_path, log)

    def run_parallel(
        cfg: Any, group: list[Host], work: Any, *, parallel: int | None = None, on_done: Any = None
    ) -> list[HostResult]:
        d.drain(group[0], SimpleNamespace(host="10.0.0.1"))  # drained, then Ctrl-C before the rest
        raise KeyboardInterrupt

    d = Drainer(cfg)
    monkeypatch.setattr(batches, "run_parallel", run_parallel)
    monkeypatch.setattr(
        traffic_mod, "connect", lambda cfg, h: SimpleNamespace(host="10.0.0.1", close=lambda: None)
    )
    with pytest.raises(KeyboardInterrupt):
        run_batches(cfg, [list(cfg.hosts)], lambda h, c: {}, traffic=d)
    assert log.read_text().splitlines() == ["drain web1 10.0.0.1", "restore web1"]


def test_traffic_run_on_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="traffic.run_on must be local"):
        load(tmp_path, "traffic: {drain: x, run_on: lb}\n")
