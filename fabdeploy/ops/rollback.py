"""Rollback over SSH: hosts back to their previous (or a named) release; fleet-wide, the pointer too."""

from __future__ import annotations

import time
from typing import Any

from fabric import Connection

from fabdeploy.adapters import bundle as bundles
from fabdeploy.adapters import nodectl
from fabdeploy.adapters.bundle import local_user
from fabdeploy.adapters.health import wait_healthy
from fabdeploy.adapters.store import store_for
from fabdeploy.adapters.traffic import Drainer, balanced
from fabdeploy.basics.config import Config, Host, for_host
from fabdeploy.basics.errors import HostError
from fabdeploy.basics.output import say, short, warn
from fabdeploy.ops.batches import Outcome, plan_for, prepare_first, run_batches
from fabdeploy.ops.events import DeployRun
from fabdeploy.ops.inplace import drift_note, print_results
from fabdeploy.ops.lock import fleet_lock
from fabdeploy.ops.targets import Targets
from fabdeploy.ops.undo import drainer_for


def rollback(
    cfg: Config,
    targets: Targets,
    *,
    release: str | None = None,
    parallel: int | None = None,
    groups: list[list[Host]] | None = None,
    keep_going: bool = False,
    held: Any = None,
    drainer: Drainer | None = None,
) -> Outcome:
    user = local_user()
    args = ["rollback", "--user", user, "--restart"]
    if release:
        args += ["--release", release]

    checked: dict[str, dict[str, Any]] = {}  # the release each checked host goes to

    def work(host: Host, conn: Connection) -> dict[str, Any]:
        mine_args = list(args)
        if host.name in checked and not release:
            mine_args += ["--release", str(checked[host.name]["release"])]  # what was checked
        data = nodectl.call(cfg, host, conn, *mine_args)
        mine = for_host(cfg, host)  # its role's health check
        if mine.health.on == "node":
            return data  # the node checked health itself after its restart
        h = wait_healthy(mine, conn.host)
        data["health"] = h.detail
        if not h.ok:
            raise HostError(
                host.name,
                f"{host.name}: rolled back to {data.get('release')} but {h.detail}",
                data=data,
            )
        return data

    groups = groups if groups is not None else [targets.hosts]
    drainer = drainer if drainer is not None else Drainer(cfg)
    done = Outcome()
    if drainer.enabled:
        # Before any host leaves traffic: where each goes. One already there stays in; one
        # with nowhere to go fails before anything moves.
        check = ["rollback", "--check", *(["--release", release] if release else [])]
        groups, done, answers = prepare_first(
            cfg,
            groups,
            lambda h, c: nodectl.call(cfg, h, c, *check),
            parallel=parallel,
            keep_going=keep_going,
            what="checked",
        )
        checked.update(answers)
        if done.not_touched:
            return done
    out = run_batches(
        cfg, groups, work, parallel=parallel, keep_going=keep_going, traffic=drainer, held=held
    )
    order = {h.name: i for i, h in enumerate(targets.hosts)}
    out.results = sorted(done.results + out.results, key=lambda r: order.get(r.host, 0))
    return out


def run_rollback(
    cfg: Config,
    targets: Targets,
    *,
    release: str | None = None,
    dry_run: bool = False,
    parallel: int | None = None,
    batch: str | None = None,
    canary: int | None = None,
    keep_going: bool = False,
    run: DeployRun | None = None,
) -> bool:
    the_plan = plan_for(cfg, targets.hosts, batch, canary)
    if dry_run:
        say(
            f"dry run: would roll back {', '.join(h.name for h in targets.hosts)} to "
            + (release or "each host's previous release")
            + (" and move the published pointer back" if targets.whole_fleet else "")
        )
        the_plan.show(cfg, keep_going)
        return True
    store = store_for(cfg)
    # Hosts leave traffic only under the lock (see hotfix); a killed run's leftovers go back first.
    enabled = targets.whole_fleet or balanced(cfg)
    with fleet_lock(cfg, store, "rollback", enabled=enabled) as held:
        drainer = drainer_for(cfg, store, "rollback", held)
        start = time.monotonic()
        out = rollback(
            cfg,
            targets,
            release=release,
            parallel=parallel,
            groups=the_plan.groups,
            keep_going=keep_going,
            held=held,
            drainer=drainer,
        )
        results = out.results
        ok = out.ok
        if run is not None:
            run.count(results, out.not_touched)
            commits = {r.data.get("commit") for r in results if r.ok}
            if len(commits) == 1:
                run.commit = next(iter(commits))
            ids = {_bundle_of(r.data) for r in results if r.ok}
            if len(ids) == 1:
                run.bundle_id = next(iter(ids))
        # The hosts' outcomes first: whatever happens to the pointer, they have already changed.
        print_results(f"rollback in {time.monotonic() - start:.1f}s", results, out.not_touched)
        if targets.whole_fleet and ok:
            if held is not None:
                held.check("moving the published pointer back")
            _pointer_back(cfg, store, {_bundle_of(r.data) for r in results})
    ids = {_bundle_of(r.data) for r in results}
    if ok and len(ids) == 1 and next(iter(ids)):
        bid = str(next(iter(ids)))
        drift_note(cfg, targets, f"rolled-back {_named(bid)}", bid.split("-", 1)[0])
    return ok


def _bundle_of(data: dict[str, Any]) -> str | None:
    """The bundle id a host went back to (commit + build recipe); the commit when the release
    was built without a recipe, or by an older node program (which reports no id)."""
    return data.get("bundle_id") or data.get("commit")


def _pointer_back(cfg: Config, store: Any, ids: set[str | None]) -> None:
    """Point the published bundle at what the fleet now runs, taken from the history: as a
    new publish (signed, with a newer sequence), since nodes refuse a replayed pointer.

    Matched by bundle id, not commit: two bundles of one commit with different build recipes
    are different bundles, and the pointer must name the one the hosts run."""
    current, etag = store.read_pointer(replacing=True)  # a damaged pointer is replaced, not fatal
    if len(ids) != 1:
        warn("hosts rolled back to different bundles; the published pointer was left alone")
        return
    bid = next(iter(ids))
    if bid is None:
        warn("the hosts reported no commit; the published pointer was left alone")
        return
    if current is not None and current.id == bid:
        return
    for p in store.pointer_history(limit=100):
        if p.id == bid:
            new = bundles.new_pointer(
                cfg, bundles.bundle_of_pointer(cfg, store, p, log=say), current
            )
            store.write_pointer(new, etag)
            say(f"published pointer moved back to {_named(bid)} ({p.ref})")
            return
    commit = bid.split("-", 1)[0]
    warn(
        f"{_named(bid)} is not in the pointer history; the published pointer was left alone. "
        f"Run `fab deploy.publish --ref={commit}`"
        + (" with the build recipe it was built with" if bid != commit else "")
        + " to make reboots keep it."
    )


def _named(bid: str) -> str:
    """A bundle id for a message: the short commit, plus the recipe hash when there is one."""
    commit, _, recipe = bid.partition("-")
    return short(commit) + (f" (build {recipe})" if recipe else "")
