"""`--engine=instance-refresh`: publish, then let each ASG replace its instances."""

from __future__ import annotations

from fabdeploy.adapters import bundle as bundles
from fabdeploy.adapters.aws import (
    Clients,
    _group_instances,
    follow_refresh,
    refresh_preferences,
    start_refresh,
)
from fabdeploy.adapters.store import store_for
from fabdeploy.basics.config import Config
from fabdeploy.basics.errors import AWSError
from fabdeploy.basics.output import say, short
from fabdeploy.ops.events import DeployRun
from fabdeploy.ops.lock import fleet_lock
from fabdeploy.ops.once import reachable_hosts, run_once_hooks
from fabdeploy.ops.targets import resolve_hosts


def run_instance_refresh(
    cfg: Config,
    ref: str | None,
    *,
    dry_run: bool = False,
    clients: Clients | None = None,
    poll: float = 15.0,
    skip_once: bool = False,
    run: DeployRun | None = None,
) -> bool:
    """Publish, then replace every instance of each ASG (one group at a time) by an instance refresh."""
    aws = cfg.aws
    if aws is None or not aws.autoscaling_groups:
        raise AWSError(f"--engine=instance-refresh needs aws.autoscaling_groups in {cfg.path}")
    if dry_run:
        commit, _ = bundles.resolve_commit(cfg.repo, ref or cfg.ref)
        say(
            f"dry run: would publish {short(commit)} ({ref or cfg.ref}) and start an instance refresh of "
            f"{', '.join(aws.autoscaling_groups)} with {refresh_preferences(cfg)}"
        )
        if cfg.hooks.once and not skip_once:
            say(
                "before that, the run-once hooks (unless they already ran for this bundle) over "
                "SSH on the first reachable current instance with their roles"
            )
        return True
    c = clients or Clients(cfg)
    _group_instances(cfg, c, aws.autoscaling_groups)  # fail on a missing group before publishing
    store = store_for(cfg)
    with fleet_lock(cfg, store, "roll (instance refresh)") as held:
        b = bundles.ensure_bundle(cfg, store, ref)
        if run is not None:
            run.bundle(b)
        if cfg.hooks.once and not skip_once:
            # No SSH in an instance refresh, except this: one current instance runs them.
            run_once_hooks(
                cfg, store, b, lambda: reachable_hosts(cfg, resolve_hosts(cfg)), held=held
            )
        held.check(f"publishing {short(b.commit)}")
        bundles.publish_bundle(store, b, log=say, cfg=cfg)
        for group in aws.autoscaling_groups:
            held.check(f"starting an instance refresh of {group}")
            rid = start_refresh(cfg, c, group)
            say(f"instance refresh {rid} of {group} started ({refresh_preferences(cfg)})")
            status = follow_refresh(cfg, c, group, rid, poll=poll)
            if status != "Successful":
                say(
                    f"instance refresh of {group} ended {status}; the published pointer stays at "
                    f"{short(b.commit)}: instances that boot from now on run it"
                )
                return False
    return True
