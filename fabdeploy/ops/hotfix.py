"""Hotfix over SSH: activate a bundle on running nodes now.

It goes through the node program on each host (the same code path the boot unit
runs), in parallel over a bounded pool, and ends in one table. A host that fails
keeps (or is put back on) its previous `current`.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fabric import Connection

from fabdeploy.adapters import bundle as bundles
from fabdeploy.adapters import nodectl
from fabdeploy.adapters.bundle import local_user
from fabdeploy.adapters.ssh import Preconnect, q, run
from fabdeploy.adapters.store import store_for
from fabdeploy.adapters.traffic import Drainer, balanced
from fabdeploy.basics.config import Config, Host
from fabdeploy.basics.errors import BundleError
from fabdeploy.basics.output import say, short, warn
from fabdeploy.ops.batches import Outcome, plan_for, prepare_first, run_batches
from fabdeploy.ops.events import DeployRun
from fabdeploy.ops.inplace import drift_note, health_or_revert, print_results
from fabdeploy.ops.lock import fleet_lock
from fabdeploy.ops.once import describe as describe_once
from fabdeploy.ops.once import plan as once_plan
from fabdeploy.ops.once import run_once_hooks
from fabdeploy.ops.targets import Targets
from fabdeploy.ops.undo import drainer_for


def hotfix(
    cfg: Config,
    store: Any,
    bundle: Any,
    targets: Targets,
    *,
    push: bool = False,
    force: bool = False,
    parallel: int | None = None,
    groups: list[list[Host]] | None = None,
    keep_going: bool = False,
    held: Any = None,
    local_file: str | None = None,
    drainer: Drainer | None = None,
    pre: Preconnect | None = None,
) -> Outcome:
    """`local_file`: the verified bundle already downloaded for --push (else fetched here)."""
    user = local_user()
    base = [
        "activate",
        "--sha256",
        bundle.sha256,
        "--commit",
        bundle.commit,
        "--ref",
        bundle.ref,
        "--user",
        user,
        "--restart",
    ]
    if bundle.committed_at:
        base += ["--committed-at", str(bundle.committed_at)]
    if bundle.size:
        base += ["--size", str(bundle.size)]  # the node stops a download there
    bid = getattr(bundle, "bundle_id", None) or bundle.commit
    if bid != bundle.commit:  # built with a recipe: "unchanged" compares this id
        base += ["--bundle-id", bid]
    if force:
        base.append("--force")
    url: list[str | None] = [None]
    own_file = push and local_file is None
    if own_file:
        local_file = _download_for_push(store, bundle)

    drainer = drainer if drainer is not None else Drainer(cfg)
    prepared: set[str] = set()  # hosts whose release is ready: only the switch is left

    def work(host: Host, conn: Connection, prepare_only: bool = False) -> dict[str, Any]:
        args = list(base)
        remote = None
        if host.name in prepared:
            # Downloaded and extracted before the host left traffic; in push mode there is no
            # copy to send again (--prepared), from S3 the URL is the fallback if it went away.
            args += ["--prepared"] if push else ["--url-stdin"]
        elif push:
            remote = f"{cfg.deploy_to}/.fabdeploy/push-{bid}.tar.gz"
            nodectl.call(cfg, host, conn, "version")  # installs the node program and its dirs
            try:
                conn.sftp().put(str(local_file), remote)
            except BaseException:
                run(
                    cfg, host, conn, f"rm -f -- {q(remote)}", timeout=30
                )  # a partial copy: only on failure
                raise
            args += ["--file", remote]
        else:
            args.append("--url-stdin")  # the presigned URL is a credential: not in argv (ps)
        stdin = "" if push else f"{url[0]}\n"
        if prepare_only:
            args = [a for a in args if a != "--restart"] + ["--prepare"]
        if getattr(bundle, "manifest", None) is not None:
            # The node checks the signed manifest against its trusted signers before downloading.
            args.append("--manifest-stdin")
            stdin += json.dumps(bundle.manifest, sort_keys=True) + "\n"
        # The pushed copy goes on every outcome (activated, unchanged, failed) in the same command.
        data = nodectl.call(cfg, host, conn, *args, stdin=stdin or None, remove_after=remote)
        if prepare_only:
            return data
        if data.get("changed"):
            data = health_or_revert(cfg, host, conn, data, user)
        return data

    def fresh_url(_i: int) -> None:
        # Signed per batch: a long batched run must not outlive the presigned URL.
        if not push:
            url[0] = store.presign_bundle(bid)

    groups = groups if groups is not None else [targets.hosts]
    try:
        done = Outcome()
        if drainer.enabled:
            fresh_url(0)
            groups, done, ready = prepare_first(
                cfg,
                groups,
                lambda h, c: work(h, c, prepare_only=True),
                parallel=parallel,
                keep_going=keep_going,
            )
            prepared.update(ready)
            if done.not_touched:
                return done
        out = run_batches(
            cfg,
            groups,
            work,
            parallel=parallel,
            keep_going=keep_going,
            before_batch=fresh_url,
            traffic=drainer,
            held=held,
            pre=pre,
        )
        order = {h.name: i for i, h in enumerate(targets.hosts)}
        out.results = sorted(done.results + out.results, key=lambda r: order.get(r.host, 0))
        return out
    finally:
        if own_file and local_file:
            os.unlink(local_file)


def _download_for_push(store: Any, bundle: Any) -> str:
    """The bundle in a local temp file, verified, for nodes that cannot reach S3 themselves."""
    import hashlib
    import tempfile

    tmp = tempfile.NamedTemporaryFile(prefix="fabdeploy-push-", suffix=".tar.gz", delete=False)
    h = hashlib.sha256()
    with tmp, store.open_bundle(getattr(bundle, "bundle_id", None) or bundle.commit) as src:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            tmp.write(chunk)
    if h.hexdigest() != bundle.sha256:
        os.unlink(tmp.name)
        raise BundleError(
            f"bundle {store.uri(bundle.key)} does not match its sha256 {bundle.sha256} "
            f"(got {h.hexdigest()}): something rewrote it; rebuild with `fab deploy.bundle --verify`"
        )
    return tmp.name


def run_hotfix(
    cfg: Config,
    targets: Targets,
    ref: str | None,
    *,
    push: bool = False,
    force: bool = False,
    dry_run: bool = False,
    parallel: int | None = None,
    batch: str | None = None,
    canary: int | None = None,
    keep_going: bool = False,
    skip_once: bool = False,
    run: DeployRun | None = None,
) -> bool:
    the_plan = plan_for(cfg, targets.hosts, batch, canary)
    once = bool(cfg.hooks.once) and not skip_once
    if once:
        once_plan(cfg, targets.hosts)  # a hook whose roles no selected host has: before anything
    if dry_run:
        commit, _ = bundles.resolve_commit(cfg.repo, ref or cfg.ref)
        say(
            f"dry run: would hotfix {short(commit)} ({ref or cfg.ref}) onto "
            + ", ".join(h.name for h in targets.hosts)
            + (f" via {'SFTP push' if push else 'S3'}; ")
            + (
                "then publish it (whole fleet), under the deploy lock"
                if targets.whole_fleet
                else "without publishing (subset: these hosts would drift from the published bundle)"
            )
        )
        if once:
            say(
                "then, before any host changes, the run-once hooks (unless they already ran for "
                f"this bundle) {describe_once(cfg, targets.hosts)}"
            )
        the_plan.show(cfg, keep_going)
        return True
    store = store_for(cfg)
    first = [h for g in the_plan.groups for h in g][: parallel or cfg.parallel]
    # The first hosts' SSH handshakes run while the S3 work below does (bundle check, lock,
    # a killed run's leftovers): opening a connection changes nothing on a host, and the
    # node program only runs once the lock is held.
    with Preconnect(cfg, first) as pre, ThreadPoolExecutor(1, thread_name_prefix="s3") as bg:
        b = bundles.ensure_bundle(cfg, store, ref)
        if run is not None:
            run.bundle(b)
        # Run-once hooks run under the fleet lock, on a subset too; so do runs whose hosts leave
        # traffic: two runs must not take out more than the fleet can spare, and what they take out
        # is recorded (ops/undo.py) by one writer.
        locked = targets.whole_fleet or once or balanced(cfg)
        local_file = _download_for_push(store, b) if push else None
        try:
            with fleet_lock(cfg, store, f"hotfix {short(b.commit)}", enabled=locked) as held:
                # What a killed run left out of traffic or in Standby is put back first (under the lock).
                drainer = drainer_for(cfg, store, "hotfix", held)
                # The pointer the publish replaces, read under the lock while the hosts work (its
                # write stays conditional on this ETag: a publish meanwhile is a lost race).
                pointer = (
                    bg.submit(store.read_pointer, replacing=True) if targets.whole_fleet else None
                )
                start = time.monotonic()
                if once:
                    run_once_hooks(
                        cfg, store, b, targets.hosts, force=force, held=held, local_file=local_file
                    )
                out = hotfix(
                    cfg,
                    store,
                    b,
                    targets,
                    push=push,
                    force=force,
                    parallel=parallel,
                    groups=the_plan.groups,
                    keep_going=keep_going,
                    held=held,
                    local_file=local_file,
                    drainer=drainer,
                    pre=pre,
                )
                ok = out.ok
                if run is not None:
                    run.count(out.results, out.not_touched)
                if targets.whole_fleet and ok:
                    if held is not None and held.lost is not None:
                        print_results(
                            f"hotfix {short(b.commit)} ({b.ref}) in {time.monotonic() - start:.1f}s",
                            out.results,
                            out.not_touched,
                        )
                        held.check(f"publishing {short(b.commit)}")
                    assert pointer is not None
                    # The history entry is written while the lock is released: a round trip less.
                    bundles.publish_bundle(
                        store, b, log=say, cfg=cfg, read=pointer.result(), defer_history=True
                    )
            store.finish_deferred()
        finally:
            if local_file:
                os.unlink(local_file)
    print_results(
        f"hotfix {short(b.commit)} ({b.ref}) in {time.monotonic() - start:.1f}s",
        out.results,
        out.not_touched,
    )
    if targets.whole_fleet and not ok:
        warn(
            "some hosts failed, so the published bundle was NOT moved; fix them and run the hotfix again"
        )
    elif ok:
        drift_note(cfg, targets, f"{short(b.commit)} ({b.ref})", b.commit)
    return ok
