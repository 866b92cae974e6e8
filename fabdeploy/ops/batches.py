"""Changing a fleet a few hosts at a time: the batch plan and the fail-fast runner.

One plan for roll, hotfix and rollback: AZs interleaved when `aws:` is configured, an
optional canary group first, and every batch capped so that `min_healthy` of the live
fleet stays up (aws.min_healthy for AWS fleets, else the top-level min_healthy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fabric import Connection

from fabdeploy.adapters.ssh import HostResult, run_parallel
from fabdeploy.adapters.traffic import Drainer, balanced
from fabdeploy.basics.config import Config, Host, count_of
from fabdeploy.basics.errors import ConfigError
from fabdeploy.basics.output import progress_line, say, warn
from fabdeploy.ops.targets import resolve_hosts


def spread_by_az(hosts: list[Host]) -> list[Host]:
    """Interleave AZs (a1 b1 c1 a2 b2 ...), so a batch takes from each AZ in turn."""
    by_az: dict[str, list[Host]] = {}
    for h in hosts:
        by_az.setdefault(h.az or "", []).append(h)
    queues = [by_az[k] for k in sorted(by_az)]
    out: list[Host] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def max_down(min_healthy: str | None, live: int) -> int:
    """How many of `live` hosts may be out at once and still keep min_healthy up."""
    if not min_healthy:
        return live
    return live - count_of(min_healthy, live)


def min_healthy_of(cfg: Config) -> tuple[str, str] | None:
    """(key, value) of the min_healthy that applies: aws.min_healthy on AWS fleets, else the top-level one."""
    if cfg.aws is not None and cfg.aws.min_healthy:
        return "aws.min_healthy", cfg.aws.min_healthy
    if cfg.min_healthy:
        return "min_healthy", cfg.min_healthy
    return None


def cap_for(cfg: Config, live: int, *, keep_one: bool = False) -> int | None:
    """The most hosts min_healthy lets out at once (None: no limit); < 1 is an error.

    `keep_one` (hosts drained from a load balancer): without min_healthy, one host stays in."""
    mh = min_healthy_of(cfg)
    if mh is None:
        return max(1, live - 1) if keep_one else None
    cap = max_down(mh[1], live)
    if cap < 1:
        raise ConfigError(
            f"{mh[0]} {mh[1]} of {live} live host(s) leaves none to take out at once: "
            f"lower {mh[0]} in {cfg.path} or add hosts first"
        )
    return cap


@dataclass
class Plan:
    groups: list[list[Host]]
    canary: int = 0  # how many of the first groups are the canary

    def describe(self) -> list[str]:
        return [
            f"  {'canary' if i < self.canary else 'batch'} {i + 1}: "
            + ", ".join(h.name + (f" ({h.az})" if h.az else "") for h in g)
            for i, g in enumerate(self.groups)
        ]

    def show(self, cfg: Config, keep_going: bool = False) -> None:
        """For a dry run: the batches, when there is more than one, and the traffic steps."""
        if cfg.traffic.enabled:
            say(
                f"each host out of traffic around its change (traffic.drain/restore, run {cfg.traffic.run_on})"
            )
        if cfg.aws is not None and (cfg.aws.target_groups or cfg.aws.classic_elbs):
            say(
                "each host deregistered from the aws: target groups/classic ELBs and drained "
                "around its change, then registered again and waited healthy"
            )
        if len(self.groups) <= 1:
            return
        say(
            "in batches, each health-gated"
            + ("" if keep_going else "; a failed batch stops the run")
            + ":"
        )
        for line in self.describe():
            say(line)


def _split(cfg: Config, ordered: list[Host], size: int) -> list[list[Host]]:
    if cfg.aws is None:
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]
    # A batch must not take every host of an AZ that has more than one: shrink until it doesn't.
    per_az: dict[str, int] = {}
    for h in ordered:
        per_az[h.az or ""] = per_az.get(h.az or "", 0) + 1
    groups: list[list[Host]] = []
    i = 0
    while i < len(ordered):
        take = size
        while take > 1 and any(
            sum(1 for h in ordered[i : i + take] if (h.az or "") == az) >= count > 1
            for az, count in per_az.items()
        ):
            take -= 1
        groups.append(ordered[i : i + take])
        i += take
    return groups


def plan(
    cfg: Config,
    hosts: list[Host],
    batch: str | None,
    *,
    live: int,
    canary: int = 0,
    keep_one: bool = False,
) -> Plan:
    """The batches for changing `hosts` out of `live`: `batch` hosts at once (None: all),
    the first `canary` hosts alone first, each batch capped by min_healthy."""
    ordered = spread_by_az(hosts) if cfg.aws is not None else list(hosts)
    n = len(ordered)
    size = n if batch is None else count_of(batch, n)
    cap = cap_for(cfg, live, keep_one=keep_one)
    if cap is not None:
        size = min(size, cap)
    size = max(1, min(size, n or 1))
    canary = min(canary, n)
    first = _split(cfg, ordered[:canary], min(size, canary) or 1) if canary else []
    return Plan(first + _split(cfg, ordered[canary:], size), canary=len(first))


def batching_asked(cfg: Config, batch: str | None, canary: int | None) -> bool:
    """Without --batch, --canary, min_healthy and traffic settings (traffic: or aws: load
    balancers) a run is one parallel pass, as it always was."""
    return batch is not None or bool(canary) or min_healthy_of(cfg) is not None or balanced(cfg)


def plan_for(cfg: Config, hosts: list[Host], batch: str | None, canary: int | None) -> Plan:
    """hotfix/rollback: one parallel pass unless --batch, --canary, min_healthy or traffic ask for batches.

    With traffic settings and no min_healthy, a whole-fleet run keeps one host in traffic."""
    if not batching_asked(cfg, batch, canary) or len(hosts) <= 1 and min_healthy_of(cfg) is None:
        return Plan([list(hosts)] if hosts else [])
    return plan(
        cfg,
        hosts,
        batch,
        live=len(resolve_hosts(cfg)),
        canary=canary or 0,
        keep_one=balanced(cfg),
    )


@dataclass
class Outcome:
    results: list[HostResult] = field(default_factory=list)
    not_touched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results) and not self.not_touched


def prepare_first(
    cfg: Config,
    groups: list[list[Host]],
    prepare: Callable[[Host, Connection], dict[str, Any]],
    *,
    parallel: int | None = None,
    keep_going: bool = False,
    what: str = "prepared",
) -> tuple[list[list[Host]], Outcome, dict[str, dict[str, Any]]]:
    """Before any host leaves traffic: `prepare` on every host at once (`--parallel` at a time),
    e.g. a hotfix's download and extraction, so each host is out only for its switch.

    A host whose answer has no "needed" has nothing to do: its answer is its outcome and it is
    never drained. A failed host stops the run before any drain (the others "not touched")
    unless keep_going. Returns the batches left (needed hosts only), the outcomes so far, and
    the needed hosts' answers."""
    start = time.monotonic()
    hosts = [h for g in groups for h in g]
    res = run_parallel(cfg, hosts, prepare, parallel=parallel)
    needed = {r.host: r.data for r in res if r.ok and r.data.get("needed")}
    done = Outcome([r for r in res if r.host not in needed])
    failed = sum(1 for r in res if not r.ok)
    nothing = len(res) - len(needed) - failed
    say(
        f"{what} {len(needed)} host(s) in {time.monotonic() - start:.1f}s"
        + (f", {nothing} already on it" if nothing else "")
        + (f", {failed} failed" if failed else "")
    )
    if failed and not keep_going:
        done.not_touched = [h.name for h in hosts if h.name in needed]
        return [], done, needed
    left = [[h for h in g if h.name in needed] for g in groups]
    return [g for g in left if g], done, needed


def run_batches(
    cfg: Config,
    groups: list[list[Host]],
    work: Callable[[Host, Connection], dict[str, Any]],
    *,
    parallel: int | None = None,
    keep_going: bool = False,
    before_batch: Callable[[int], None] | None = None,
    traffic: Drainer | None = None,
    held: Any = None,
    pre: Any = None,
) -> Outcome:
    """Run `work` batch after batch; after a failed batch start no new one (unless keep_going).

    Every started host's outcome is collected; hosts of the batches not started are listed
    as not touched. With `traffic`, each host is out of the load balancer around its `work`,
    and none is left out at the end, whatever happened. `pre`: SSH connections opened ahead
    (adapters/ssh.py Preconnect).
    """
    out = Outcome()
    on_done = progress_line(time.monotonic())
    step = work
    if traffic is not None and traffic.enabled:

        def step(host: Host, conn: Connection) -> dict[str, Any]:
            with traffic.around(host, conn):
                return work(host, conn)

    try:
        for i, group in enumerate(groups):
            if (
                held is not None and held.lost is not None
            ):  # the fleet lock (ops/lock.py) was broken
                warn(f"stopped before batch {i + 1}: the deploy lock was lost ({held.lost})")
                out.not_touched = [h.name for g in groups[i:] for h in g]
                break
            if before_batch is not None:
                before_batch(i)
            if len(groups) > 1:
                say(f"batch {i + 1}/{len(groups)}: {', '.join(h.name for h in group)}")
            more: dict[str, Any] = {"pre": pre} if pre is not None else {}
            res = run_parallel(cfg, group, step, parallel=parallel, on_done=on_done, **more)
            out.results += res
            if not keep_going and not all(r.ok for r in res):
                out.not_touched = [h.name for g in groups[i + 1 :] for h in g]
                break
    finally:
        if traffic is not None:
            traffic.restore_all()
    return out
