"""The `deploy` collection: each task parses its flags, loads deploy.yml, calls one operation.

Expected failures (`DeployError`) become one line and a non-zero exit (`invoke.Exit`),
never a traceback. Importing this module installs fabdeploy's executor into a running
`fab` (see cli.py), so `-H` means "these hosts, one run" in any app repo.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from invoke import Collection, Exit, task

from fabdeploy import cli
from fabdeploy.basics.errors import DeployError


def deploy_task(
    *, name: str, help: dict[str, str] | None = None
) -> Callable[[Callable[..., Any]], Any]:
    """@task for fabdeploy: one-line errors, never run once per -H host, marked as ours."""

    def wrap(fn: Callable[..., Any]) -> Any:
        takes_dry_run = cli.takes(fn, "dry_run")

        @functools.wraps(fn)
        def body(c: Any, *args: Any, **kwargs: Any) -> Any:
            cli.refuse_per_host_call(c, name)
            cli.mark_ran(c, name)
            if cli.check_flags(getattr(c, "config", None), name, takes_dry_run):
                kwargs["dry_run"] = True  # fab -R/--dry: change nothing
            try:
                return fn(c, *args, **kwargs)
            except DeployError as e:
                raise Exit(f"error: {e}", 1) from None
            except KeyboardInterrupt:
                raise Exit("interrupted", 130) from None

        # No auto short flags: `-h` after a task name must stay --help, not --hosts.
        t = task(name=name, help=help or {}, auto_shortflags=False)(body)
        t.fabdeploy = True
        t.fabdeploy_name = f"deploy.{name}"
        return t

    return wrap


def stage_task(name: str) -> Any:
    """`fab <name> deploy.X`: the fabdeploy tasks after it in this run work on stage `name`."""

    def body(c: Any) -> None:
        cli.select_stage(c, name)

    body.__doc__ = (
        f"Deploy to stage {name}: name it before the deploy tasks (fab {name} deploy.roll)."
    )
    t = task(name=name)(body)
    t.fabdeploy = True
    t.fabdeploy_stage = name
    return t


def stage_tasks(start: Any = None) -> list[Any]:
    """One task per stage of deploy.yml; none if it has no stages or cannot be read.

    Only the names are read here (cheaply, never failing): the deploy task loads and validates
    the whole file and reports any problem in it.
    """
    try:
        import yaml

        from fabdeploy.basics import config

        data = yaml.safe_load(config.find_config_path(start=start).read_text())
        names = (
            list(data["stages"])
            if isinstance(data, dict) and isinstance(data.get("stages"), dict)
            else []
        )
        return [stage_task(n) for n in names if isinstance(n, str) and config.is_name(n)]
    except Exception:  # noqa: BLE001 - any problem: no stage tasks, the deploy task will say what is wrong
        return []


def _cfg(c: Any = None, stage: str | None = None):
    """deploy.yml (for the run's stage, or `stage`), with Fabric's flags and config files applied."""
    from fabdeploy.basics import config

    fc = getattr(c, "config", None)
    if stage is None and fc is not None and hasattr(fc, "get"):
        stage = fc.get(cli.STAGE_KEY)
    return cli.apply_flags(config.load(start=cli.config_start(fc), stage=stage), fc)


def _targets(cfg, hosts, roles=None):
    from fabdeploy.ops.targets import targets_for

    return targets_for(cfg, hosts, roles)


_ROLES_HELP = (
    "only hosts with one of these roles, comma-separated (Capistrano's ROLES=), e.g. worker"
)
_SKIP_ONCE_HELP = "do not run hooks.once (migrations) for this bundle"


def _count(value, flag: str) -> int | None:
    if value is None:
        return None
    if not str(value).isdigit() or int(value) < 1:
        raise Exit(f"error: {flag} must be a whole number >= 1 (got {value!r})", 1)
    return int(value)


def _batch(value) -> str | None:
    """--batch: a count or a percentage, through the one parser deploy.yml uses too."""
    if value is None:
        return None
    from fabdeploy.basics.config import parse_count

    try:
        return parse_count(value)
    except TypeError as e:
        raise Exit(f"error: --batch must be {e} (got {value!r})", 1) from None


_BATCH_HELP = {
    "batch": "hosts changed (swap, restart, health) at once: a count (2) or a percentage (25%); "
    "default: all, capped by min_healthy",
    "canary": "the first N hosts go alone and must pass health before the rest",
    "keep_going": "run every batch even after one failed (default: stop; the rest are 'not touched')",
}


def _fail_unless(ok: bool) -> None:
    if not ok:
        raise Exit(code=1)


@deploy_task(
    name="bundle",
    help={
        "ref": "branch, tag or sha to bundle (default: ref in deploy.yml)",
        "verify": "rebuild even if the bundle exists and compare sha256",
    },
)
def bundle_task(c, ref=None, verify=False):
    """Pack a ref (git archive, or the result of `build:` in a clean export) and upload it to S3 under its bundle id."""
    cfg = _cfg(c)
    from fabdeploy.ops.publish import bundle_for

    bundle_for(cfg, ref, verify=verify)


@deploy_task(
    name="publish",
    help={
        "ref": "branch, tag or sha to publish (bundled first if missing)",
        "from": "another stage: publish the exact bundle it has published, no rebuild",
    },
)
def publish_task(c, ref=None, from_=None):
    """Point booting nodes at the bundle of a ref (conditional write, history kept)."""
    cfg = _cfg(c)
    if from_ is None:
        from fabdeploy.ops.publish import publish_for

        publish_for(cfg, ref)
        return
    if ref is not None:
        raise Exit(
            "error: give --ref or --from, not both: --from publishes what that stage has published",
            1,
        )
    if from_ == cfg.stage:
        raise Exit(f"error: --from={from_} is the stage being published; name another stage", 1)
    from fabdeploy.ops.publish import promote_for

    promote_for(cfg, _cfg(c, stage=from_))


@deploy_task(
    name="setup",
    help={
        "hosts": "comma-separated deploy.yml host names (default: all)",
        "roles": _ROLES_HELP,
        "admin_user": "login for what needs root (root, or a user with full sudo); default: "
        "ssh.admin_user, else ssh.user through sudo",
    },
)
def setup_task(c, hosts=None, roles=None, admin_user=None):
    """Install/update the node program, its config and boot unit; create the layout."""
    cfg = _cfg(c)
    from fabdeploy.ops.setup import run_setup

    _fail_unless(run_setup(cfg, _targets(cfg, hosts, roles), admin_user=admin_user))


@deploy_task(
    name="check",
    help={"hosts": "comma-separated deploy.yml host names (default: all)", "roles": _ROLES_HELP},
)
def check_task(c, hosts=None, roles=None):
    """Preflight, changing nothing: SSH, sudo rights, shared files, Python/boto3, node program and
    unit, the node's own S3 read of the pointer, free disk for the bundle, the health check."""
    cfg = _cfg(c)
    from fabdeploy.ops.check import run_check

    _fail_unless(run_check(cfg, _targets(cfg, hosts, roles)))


@deploy_task(
    name="export-node",
    help={
        "out": "folder to write the files into (default: node-bundle/)",
        "role": "write the node config of this role (its restart and health; see roles: in deploy.yml)",
        "sudoers": "also write the sudoers drop-in for the deploy user (ssh.user, with ssh.sudo)",
    },
)
def export_node_task(c, out="node-bundle", role=None, sudoers=False):
    """Write the node program, its config, boot unit and install.sh, for AMIs and user-data."""
    from pathlib import Path

    from fabdeploy.adapters import nodectl

    cfg = _cfg(c)
    host = None
    if role is not None:
        from fabdeploy.basics.config import Host, known_roles

        if role not in known_roles(cfg):
            raise Exit(
                f"error: unknown role {role!r}; known roles: {', '.join(known_roles(cfg)) or 'none'}",
                1,
            )
        host = Host(name=f"role-{role}", host="", roles=(role,))
    for p in nodectl.export(cfg, Path(out), host, sudoers=sudoers):
        print(p)
    print(
        f"bake these into the image (or ship them in user-data) and run install.sh as root; "
        f"node.json holds node_env ({'empty: the node uses its instance role' if not cfg.node_env else 'set'})"
    )


@deploy_task(
    name="hotfix",
    help={
        "hosts": "comma-separated host names (default: all, which also publishes)",
        "ref": "branch, tag or sha (default: ref in deploy.yml)",
        "push": "send the bundle over SFTP instead of letting nodes fetch it from S3",
        "dry_run": "print what would happen and change nothing",
        "force": "activate even if a host already runs that commit (and rerun the run-once hooks)",
        "parallel": "SSH sessions at once within a batch (default: parallel in deploy.yml)",
        "roles": _ROLES_HELP,
        "skip_once": _SKIP_ONCE_HELP,
        **_BATCH_HELP,
    },
)
def hotfix_task(
    c,
    hosts=None,
    ref=None,
    push=False,
    dry_run=False,
    force=False,
    parallel=None,
    batch=None,
    canary=None,
    keep_going=False,
    roles=None,
    skip_once=False,
):
    """Activate a bundle on running hosts over SSH now (new release, swap, restart)."""
    cfg = _cfg(c)
    from fabdeploy.ops.events import deploy_run
    from fabdeploy.ops.hotfix import run_hotfix

    targets = _targets(cfg, hosts, roles)
    with deploy_run(cfg, "hotfix", targets, ref=ref, dry_run=dry_run) as run:
        run.ok = run_hotfix(
            cfg,
            targets,
            ref,
            push=push,
            force=force,
            dry_run=dry_run,
            parallel=_count(parallel, "--parallel"),
            batch=_batch(batch),
            canary=_count(canary, "--canary"),
            keep_going=keep_going,
            skip_once=skip_once,
            run=run,
        )
    _fail_unless(run.ok)


@deploy_task(
    name="rollback",
    help={
        "hosts": "comma-separated host names (default: all, which also moves the pointer back)",
        "release": "release timestamp to go back to (default: each host's previous one)",
        "dry_run": "print what would happen and change nothing",
        "parallel": "SSH sessions at once within a batch (default: parallel in deploy.yml)",
        "roles": _ROLES_HELP,
        **_BATCH_HELP,
    },
)
def rollback_task(
    c,
    hosts=None,
    release=None,
    dry_run=False,
    parallel=None,
    batch=None,
    canary=None,
    keep_going=False,
    roles=None,
):
    """Swap hosts back to their previous (or a named) release, restart, health-check."""
    cfg = _cfg(c)
    from fabdeploy.ops.events import deploy_run
    from fabdeploy.ops.rollback import run_rollback

    targets = _targets(cfg, hosts, roles)
    with deploy_run(cfg, "rollback", targets, dry_run=dry_run) as run:
        run.ok = run_rollback(
            cfg,
            targets,
            release=release,
            dry_run=dry_run,
            parallel=_count(parallel, "--parallel"),
            batch=_batch(batch),
            canary=_count(canary, "--canary"),
            keep_going=keep_going,
            run=run,
        )
    _fail_unless(run.ok)


@deploy_task(
    name="status",
    help={
        "hosts": "comma-separated host names (default: all)",
        "json": "machine-readable output",
        "roles": _ROLES_HELP,
    },
)
def status_task(c, hosts=None, json=False, roles=None):
    """What every host runs, its last boot, and drift from the published bundle."""
    cfg = _cfg(c)
    targets = _targets(cfg, hosts, roles)
    from fabdeploy.adapters.store import store_for
    from fabdeploy.ops import status as st

    store = store_for(cfg)
    pointer, results = st.collect(cfg, targets.hosts, store)
    st.show(cfg, pointer, results, as_json=json, once=st.once_record(cfg, store))
    _fail_unless(all(r.ok for r in results))


@deploy_task(
    name="roll",
    help={
        "hosts": "comma-separated host names (default: all)",
        "ref": "branch, tag or sha (default: ref in deploy.yml)",
        "batch": "hosts rebooted at once: a count (2) or a percentage (25%)",
        "resume": "skip hosts already on the published commit",
        "dry_run": "print the plan and change nothing",
        "rollback_on_failure": "on failure, move the pointer back and reboot the failed host",
        "engine": "ssh (reboot each host over SSH, default) or instance-refresh (ASG replaces instances)",
        "roles": "only hosts with these roles, rolled in the order given (worker,web: workers first; "
        "default order: roll.role_order)",
        "skip_once": _SKIP_ONCE_HELP,
    },
)
def roll_task(
    c,
    hosts=None,
    ref=None,
    batch=None,
    resume=False,
    dry_run=False,
    rollback_on_failure=False,
    engine="ssh",
    roles=None,
    skip_once=False,
):
    """Publish, then reboot hosts in turn; each must come back healthy on the new release."""
    cfg = _cfg(c)
    if engine == "instance-refresh":
        if hosts or batch or resume or rollback_on_failure or roles:
            raise Exit(
                "error: --engine=instance-refresh replaces the whole group; --hosts, --roles, --batch, --resume "
                "and --rollback-on-failure are for the ssh engine (batching: aws.instance_refresh)",
                1,
            )
        from fabdeploy.ops.events import deploy_run
        from fabdeploy.ops.refresh import run_instance_refresh

        with deploy_run(cfg, "roll", ref=ref, dry_run=dry_run) as run:
            run.ok = run_instance_refresh(cfg, ref, dry_run=dry_run, skip_once=skip_once, run=run)
        _fail_unless(run.ok)
        return
    if engine != "ssh":
        raise Exit(f"error: --engine must be ssh or instance-refresh (got {engine!r})", 1)
    from fabdeploy.ops.events import deploy_run
    from fabdeploy.ops.roll import run_roll
    from fabdeploy.ops.targets import parse_roles

    targets = _targets(cfg, hosts, roles)
    with deploy_run(cfg, "roll", targets, ref=ref, dry_run=dry_run) as run:
        run.ok = run_roll(
            cfg,
            targets,
            ref,
            batch=_batch(batch),
            resume=resume,
            dry_run=dry_run,
            rollback_on_failure=rollback_on_failure,
            role_order=parse_roles(roles) if roles else None,
            skip_once=skip_once,
            run=run,
        )
    _fail_unless(run.ok)


@deploy_task(name="unlock", help={"force": "break the lock even if it has not expired yet"})
def unlock_task(c, force=False):
    """Break a stale deploy lock (only once it has expired, unless --force); then put back what
    the run that held it left out of traffic or in Standby."""
    cfg = _cfg(c)
    from fabdeploy.adapters.store import store_for

    store = store_for(cfg)
    lock = store.break_lock(force=force)
    if lock is None:
        print("no deploy lock was held")
    elif lock.unparsable:
        print("removed an unreadable deploy lock (it was not valid lock JSON)")
    else:
        print(f"broke the deploy lock of {lock.holder} ({lock.action}, {lock.age:.0f}s old)")
    from fabdeploy.ops.undo import reconcile_after_unlock

    reconcile_after_unlock(cfg, store)  # what the run that held it left out of traffic


@deploy_task(
    name="config",
    help={
        "path": "the linked file to work on (default: every linked file with a source)",
        "push": "a local file to store as --path's source (SSM, Secrets Manager or S3)",
        "diff": "a local file to compare with --path's source (exit 1 when they differ)",
        "nodes": "compare each source with every node's copy in shared/ (exit 1 on any difference)",
        "sync": "have the nodes fetch their sourced linked files now (no restart; a hotfix restarts)",
        "show_secrets": "print values (show) and changed lines (push, diff); default: hashes only",
        "json": "machine-readable output (show)",
        "dry_run": "with --push: say what would change, store nothing",
        "hosts": "with --nodes/--sync: comma-separated host names (default: all)",
        "roles": _ROLES_HELP,
    },
)
def config_task(
    c,
    path=None,
    push=None,
    diff=None,
    nodes=False,
    sync=False,
    show_secrets=False,
    json=False,
    dry_run=False,
    hosts=None,
    roles=None,
):
    """Shared config: show, push and diff the linked files that live in SSM, Secrets Manager or S3."""
    chosen = [name for name, on in (("--push", push), ("--diff", diff), ("--nodes", nodes),
                                    ("--sync", sync)) if on]  # fmt: skip
    if len(chosen) > 1:
        raise Exit(f"error: {' and '.join(chosen)} do different things: give one", 1)
    if dry_run and not push:
        raise Exit("error: --dry-run goes with --push (the other modes change nothing)", 1)
    if (hosts or roles) and not (nodes or sync):
        raise Exit("error: --hosts/--roles go with --nodes or --sync", 1)
    cfg = _cfg(c)
    from fabdeploy.adapters.sources import Sources
    from fabdeploy.ops import sharedconfig as sc

    if push:
        sc.push(cfg, Sources(cfg), path, push, dry_run=dry_run, show_secrets=show_secrets)
    elif diff:
        _fail_unless(sc.diff_local(cfg, Sources(cfg), path, diff, show_secrets=show_secrets))
    elif nodes:
        _fail_unless(sc.diff_nodes(cfg, Sources(cfg), _targets(cfg, hosts, roles).hosts, path))
    elif sync:
        _fail_unless(sc.sync(cfg, _targets(cfg, hosts, roles).hosts))
    else:
        _fail_unless(sc.show(cfg, Sources(cfg), path, show_secrets=show_secrets, as_json=json))


deploy = Collection(
    "deploy",
    bundle_task,
    publish_task,
    setup_task,
    check_task,
    hotfix_task,
    rollback_task,
    roll_task,
    status_task,
    unlock_task,
    export_node_task,
    config_task,
)

cli.install(stage_tasks)
