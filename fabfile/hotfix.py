"""In-place deploys over SSH: hotfix and rollback on running nodes.

Both go through the node program on each host (the same code path the boot unit
runs), in parallel over a bounded pool, and end in one table. A host that fails
keeps (or is put back on) its previous `current`.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fabric import Connection

from . import nodectl
from .bundle import local_user
from .config import Config, Host
from .fleet import HostError, HostResult, run_parallel, say, warn
from .health import wait_healthy
from .report import short, table


@contextmanager
def fleet_lock(cfg: Config, store: Any, action: str, enabled: bool = True):
    """The app's deploy lock in S3, held for the duration of a fleet-wide change."""
    if not enabled:
        yield None
        return
    lock = store.acquire_lock(local_user(), action, cfg.roll.lock_expiry)
    try:
        yield lock
    finally:
        try:
            store.release_lock(lock)
        except Exception as e:  # the deploy's outcome matters more than a tidy lock
            warn(f"could not release the deploy lock ({e}); run `fab deploy.unlock` if it stays")


@dataclass
class Plan:
    targets: list[Host]
    whole_fleet: bool


def _health_or_revert(cfg: Config, host: Host, conn: Connection, data: dict[str, Any], user: str) -> dict[str, Any]:
    """Health-check a host that just changed; on failure put its previous release back."""
    h = wait_healthy(cfg, conn.host)
    data["health"] = h.detail
    if h.ok:
        return data
    prev = (data.get("previous") or {}).get("release")
    reverted = ""
    if prev:
        try:
            nodectl.call(cfg, host, conn, "rollback", "--release", prev, "--user", user,
                         "--restart", "--reason", "health check failed")
            reverted = f"; put back on {prev}"
        except HostError as e:
            reverted = f"; reverting to {prev} ALSO failed: {e.message}"
    raise HostError(host.name, f"{host.name}: {h.detail}{reverted}", data=data)


def hotfix(
    cfg: Config,
    store: Any,
    bundle: Any,
    plan: Plan,
    *,
    push: bool = False,
    force: bool = False,
    parallel: int | None = None,
) -> list[HostResult]:
    user = local_user()
    base = ["activate", "--sha256", bundle.sha256, "--commit", bundle.commit, "--ref", bundle.ref,
            "--user", user, "--restart"]
    if bundle.committed_at:
        base += ["--committed-at", str(bundle.committed_at)]
    if force:
        base.append("--force")
    url = None if push else store.presign_bundle(bundle.commit)
    local_file = _download_for_push(store, bundle) if push else None

    def work(host: Host, conn: Connection) -> dict[str, Any]:
        args = list(base)
        if push:
            remote = f"{cfg.deploy_to}/.fabdeploy/push-{bundle.commit}.tar.gz"
            nodectl.call(cfg, host, conn, "version")  # installs the node program and its dirs
            conn.sftp().put(str(local_file), remote)
            args += ["--file", remote]
        else:
            args += ["--url", url]
        data = nodectl.call(cfg, host, conn, *args)
        if data.get("changed"):
            data = _health_or_revert(cfg, host, conn, data, user)
        return data

    try:
        return run_parallel(cfg, plan.targets, work, parallel=parallel)
    finally:
        if local_file:
            os.unlink(local_file)


def _download_for_push(store: Any, bundle: Any) -> str:
    """The bundle in a local temp file, verified, for nodes that cannot reach S3 themselves."""
    import hashlib
    import tempfile

    from .bundle import BundleError

    tmp = tempfile.NamedTemporaryFile(prefix="fabdeploy-push-", suffix=".tar.gz", delete=False)
    h = hashlib.sha256()
    with tmp, store.open_bundle(bundle.commit) as src:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            tmp.write(chunk)
    if h.hexdigest() != bundle.sha256:
        os.unlink(tmp.name)
        raise BundleError(f"bundle {store.uri(bundle.key)} does not match its sha256 {bundle.sha256} "
                          f"(got {h.hexdigest()}): something rewrote it; rebuild with `fab deploy.bundle --verify`")
    return tmp.name


def rollback(cfg: Config, plan: Plan, *, release: str | None = None, parallel: int | None = None) -> list[HostResult]:
    user = local_user()
    args = ["rollback", "--user", user, "--restart"]
    if release:
        args += ["--release", release]

    def work(host: Host, conn: Connection) -> dict[str, Any]:
        data = nodectl.call(cfg, host, conn, *args)
        h = wait_healthy(cfg, conn.host)
        data["health"] = h.detail
        if not h.ok:
            raise HostError(host.name, f"{host.name}: rolled back to {data.get('release')} but {h.detail}",
                            data=data)
        return data

    return run_parallel(cfg, plan.targets, work, parallel=parallel)


def print_results(title: str, results: list[HostResult]) -> None:
    rows = []
    for r in results:
        d = r.data
        prev = d.get("previous") or {}
        if r.ok:
            outcome = "ok" if d.get("changed", True) else "unchanged (already there)"
        else:
            outcome = f"FAILED: {r.error}"
        rows.append([
            r.host,
            f"{prev.get('release', '')} {short(prev.get('commit'))}".strip() or "-",
            f"{d.get('release', '')} {short(d.get('commit'))}".strip() or "-",
            f"{r.seconds:.1f}s",
            outcome,
        ])
    table(title, ["host", "previous", "now", "time", "outcome"], rows)
    failed = [r for r in results if not r.ok]
    say(f"{len(results) - len(failed)} ok, {len(failed)} failed")


def drift_note(cfg: Config, plan: Plan, what: str, commit: str) -> None:
    if plan.whole_fleet:
        return
    names = ", ".join(h.name for h in plan.targets)
    warn(
        f"{names} now run{'s' if len(plan.targets) == 1 else ''} {what}, which is NOT the published "
        "bundle: a reboot or a new instance would get the published one. To make it stick, "
        f"run `fab deploy.publish --ref={commit}` (or hotfix the whole fleet)."
    )


def run_hotfix(
    cfg: Config,
    plan: Plan,
    ref: str | None,
    *,
    push: bool = False,
    force: bool = False,
    dry_run: bool = False,
    parallel: int | None = None,
) -> bool:
    from . import bundle as bundles

    if dry_run:
        commit, _ = bundles.resolve_commit(cfg.repo, ref or cfg.ref)
        say(f"dry run: would hotfix {short(commit)} ({ref or cfg.ref}) onto "
            + ", ".join(h.name for h in plan.targets)
            + (f" via {'SFTP push' if push else 'S3'}; " )
            + ("then publish it (whole fleet), under the deploy lock" if plan.whole_fleet
               else "without publishing (subset: these hosts would drift from the published bundle)"))
        return True
    store = bundles.store_for(cfg)
    b = bundles.ensure_bundle(cfg, store, ref)
    with fleet_lock(cfg, store, f"hotfix {short(b.commit)}", enabled=plan.whole_fleet):
        start = time.monotonic()
        results = hotfix(cfg, store, b, plan, push=push, force=force, parallel=parallel)
        ok = all(r.ok for r in results)
        if plan.whole_fleet and ok:
            bundles.publish_bundle(store, b, log=say)
    print_results(f"hotfix {short(b.commit)} ({b.ref}) in {time.monotonic() - start:.1f}s", results)
    if plan.whole_fleet and not ok:
        warn("some hosts failed, so the published bundle was NOT moved; fix them and run the hotfix again")
    elif ok:
        drift_note(cfg, plan, f"{short(b.commit)} ({b.ref})", b.commit)
    return ok


def run_rollback(cfg: Config, plan: Plan, *, release: str | None = None, dry_run: bool = False,
                 parallel: int | None = None) -> bool:

    from . import bundle as bundles

    if dry_run:
        say(f"dry run: would roll back {', '.join(h.name for h in plan.targets)} to "
            + (release or "each host's previous release")
            + (" and move the published pointer back" if plan.whole_fleet else ""))
        return True
    store = bundles.store_for(cfg)
    with fleet_lock(cfg, store, "rollback", enabled=plan.whole_fleet):
        start = time.monotonic()
        results = rollback(cfg, plan, release=release, parallel=parallel)
        ok = all(r.ok for r in results)
        if plan.whole_fleet and ok:
            _pointer_back(cfg, store, {r.data.get("commit") for r in results})
    print_results(f"rollback in {time.monotonic() - start:.1f}s", results)
    commits = {r.data.get("commit") for r in results}
    if ok and len(commits) == 1:
        drift_note(cfg, plan, f"rolled-back {short(next(iter(commits)))}", str(next(iter(commits))))
    return ok


def _pointer_back(cfg: Config, store: Any, commits: set[str | None]) -> None:
    """Point the published bundle at what the fleet now runs, taken from the history."""
    import dataclasses

    from .store import now_iso

    current, etag = store.read_pointer()
    if len(commits) != 1:
        warn("hosts rolled back to different commits; the published pointer was left alone")
        return
    commit = next(iter(commits))
    if current is not None and current.commit == commit:
        return
    for p in store.pointer_history(limit=100):
        if p.commit == commit:
            new = dataclasses.replace(p, published_by=local_user(), published_at=now_iso())
            store.write_pointer(new, etag)
            say(f"published pointer moved back to {short(commit)} ({p.ref})")
            return
    warn(f"{short(commit)} is not in the pointer history; the published pointer was left alone. "
         f"Run `fab deploy.publish --ref={commit}` to make reboots keep it.")
