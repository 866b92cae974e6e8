"""fabdeploy: bundle to S3, boot-time activation, reboot rolls and SSH hotfixes.

    fab deploy.bundle    git archive a ref into S3 (content-addressed, verified)
    fab deploy.publish   point booting nodes at a bundle
    fab deploy.setup     install the node program and its boot unit on the hosts
    fab deploy.roll      publish, then reboot the fleet in turn, health-gated
    fab deploy.hotfix    activate a bundle on running hosts over SSH, now
    fab deploy.rollback  swap hosts back to their previous release
    fab deploy.status    what every host runs, and drift from the published bundle
    fab deploy.unlock    break a stale deploy lock
    fab sandbox.up/down  a local fleet (real sshd in namespaces) + local S3 to try it on

Each task is a thin shell: it loads deploy.yml, calls one core module, and turns
expected failures into one line and a non-zero exit (invoke.Exit), never a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from invoke import Collection, Exit, task


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .fleet import HostError

    errors: list[type[BaseException]] = [ConfigError, HostError]
    try:
        from .bundle import BundleError
        from .store import StoreError

        errors += [BundleError, StoreError]
    except ImportError:
        pass
    try:
        from .aws import AWSError

        errors.append(AWSError)
    except ImportError:
        pass
    try:
        from .sandbox import SandboxError

        errors.append(SandboxError)
    except ImportError:
        pass
    return tuple(errors)


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Expected failures become one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _expected_errors() as e:
            raise Exit(f"error: {e}", 1) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", 130) from None

    return wrapper


def _cfg():
    from . import config

    return config.load()


def _plan(cfg, hosts):
    from .fleet import is_whole_fleet, select_hosts
    from .hotfix import Plan

    targets = select_hosts(cfg, hosts)
    return Plan(targets, is_whole_fleet(cfg, targets))


def _count(value, flag: str) -> int | None:
    if value is None:
        return None
    if not str(value).isdigit() or int(value) < 1:
        raise Exit(f"error: {flag} must be a whole number >= 1 (got {value!r})", 1)
    return int(value)


def _fail_unless(ok: bool) -> None:
    if not ok:
        raise Exit(code=1)


# --- deploy.* -------------------------------------------------------------------


@task(name="bundle", help={"ref": "branch, tag or sha to bundle (default: ref in deploy.yml)",
            "verify": "rebuild even if the bundle exists and compare sha256"})
@clean_errors
def bundle_task(c, ref=None, verify=False):
    """git archive a ref into a tar.gz and upload it to S3 under its commit sha."""
    cfg = _cfg()
    from .bundle import bundle_for

    bundle_for(cfg, ref, verify=verify)


@task(name="publish", help={"ref": "branch, tag or sha to publish (bundled first if missing)"})
@clean_errors
def publish_task(c, ref=None):
    """Point booting nodes at the bundle of a ref (conditional write, history kept)."""
    cfg = _cfg()
    from .bundle import publish_for

    publish_for(cfg, ref)


@task(name="setup", help={"hosts": "comma-separated deploy.yml host names (default: all)"})
@clean_errors
def setup_task(c, hosts=None):
    """Install/update the node program, its config and boot unit; create the layout."""
    cfg = _cfg()
    from . import nodectl
    from .fleet import run_parallel
    from .report import table

    plan = _plan(cfg, hosts)
    results = run_parallel(cfg, plan.targets, lambda h, conn: {
        "outcome": nodectl.install(cfg, h, conn, require_boto3=True)})
    table(f"setup {cfg.app}", ["host", "outcome"],
          [[r.host, r.data.get("outcome") if r.ok else f"FAILED: {r.error}"] for r in results])
    if all(r.ok and r.data.get("outcome") == "unchanged" for r in results):
        print("no changes: every host already has this node program, config and boot unit")
    _fail_unless(all(r.ok for r in results))


@task(name="export-node", help={"out": "folder to write the files into (default: node-bundle/)"})
@clean_errors
def export_node_task(c, out="node-bundle"):
    """Write the node program, its config, boot unit and install.sh, for AMIs and user-data."""
    from pathlib import Path

    from . import nodectl

    cfg = _cfg()
    for p in nodectl.export(cfg, Path(out)):
        print(p)
    print(f"bake these into the image (or ship them in user-data) and run install.sh as root; "
          f"node.json holds node_env ({'empty: the node uses its instance role' if not cfg.node_env else 'set'})")


@task(name="hotfix", help={"hosts": "comma-separated host names (default: all, which also publishes)",
            "ref": "branch, tag or sha (default: ref in deploy.yml)",
            "push": "send the bundle over SFTP instead of letting nodes fetch it from S3",
            "dry_run": "print what would happen and change nothing",
            "force": "activate even if a host already runs that commit",
            "parallel": "hosts at once (default: parallel in deploy.yml)"})
@clean_errors
def hotfix_task(c, hosts=None, ref=None, push=False, dry_run=False, force=False, parallel=None):
    """Activate a bundle on running hosts over SSH now (new release, swap, restart)."""
    cfg = _cfg()
    from .hotfix import run_hotfix

    _fail_unless(run_hotfix(cfg, _plan(cfg, hosts), ref, push=push, force=force, dry_run=dry_run,
                            parallel=_count(parallel, '--parallel')))


@task(name="rollback", help={"hosts": "comma-separated host names (default: all, which also moves the pointer back)",
            "release": "release timestamp to go back to (default: each host's previous one)",
            "dry_run": "print what would happen and change nothing"})
@clean_errors
def rollback_task(c, hosts=None, release=None, dry_run=False):
    """Swap hosts back to their previous (or a named) release, restart, health-check."""
    cfg = _cfg()
    from .hotfix import run_rollback

    _fail_unless(run_rollback(cfg, _plan(cfg, hosts), release=release, dry_run=dry_run))


@task(name="status", help={"hosts": "comma-separated host names (default: all)", "json": "machine-readable output"})
@clean_errors
def status_task(c, hosts=None, json=False):
    """What every host runs, its last boot, and drift from the published bundle."""
    cfg = _cfg()
    plan = _plan(cfg, hosts)
    from . import status as st
    from .bundle import store_for

    pointer, results = st.collect(cfg, plan.targets, store_for(cfg))
    st.show(cfg, pointer, results, as_json=json)
    _fail_unless(all(r.ok for r in results))


@task(name="roll", help={"hosts": "comma-separated host names (default: all)",
            "ref": "branch, tag or sha (default: ref in deploy.yml)",
            "batch": "hosts rebooted at once: a count (2) or a percentage (25%)",
            "resume": "skip hosts already on the published commit",
            "dry_run": "print the plan and change nothing",
            "rollback_on_failure": "on failure, move the pointer back and reboot the failed host",
            "engine": "ssh (reboot each host over SSH, default) or instance-refresh (ASG replaces instances)"})
@clean_errors
def roll_task(c, hosts=None, ref=None, batch=None, resume=False, dry_run=False, rollback_on_failure=False,
              engine="ssh"):
    """Publish, then reboot hosts in turn; each must come back healthy on the new release."""
    cfg = _cfg()
    if engine == "instance-refresh":
        if hosts or batch or resume or rollback_on_failure:
            raise Exit("error: --engine=instance-refresh replaces the whole group; --hosts, --batch, --resume "
                       "and --rollback-on-failure are for the ssh engine (batching: aws.instance_refresh)", 1)
        from .aws import run_instance_refresh

        _fail_unless(run_instance_refresh(cfg, ref, dry_run=dry_run))
        return
    if engine != "ssh":
        raise Exit(f"error: --engine must be ssh or instance-refresh (got {engine!r})", 1)
    from .config import _batch
    from .roll import run_roll

    if batch is not None:
        try:
            batch = _batch(batch)
        except TypeError as e:
            raise Exit(f"error: --batch must be {e} (got {batch!r})", 1) from None
    _fail_unless(run_roll(cfg, _plan(cfg, hosts), ref, batch=batch, resume=resume, dry_run=dry_run,
                          rollback_on_failure=rollback_on_failure))


@task(name="unlock", help={"force": "break the lock even if it has not expired yet"})
@clean_errors
def unlock_task(c, force=False):
    """Break a stale deploy lock (only once it has expired, unless --force)."""
    cfg = _cfg()
    from .bundle import store_for

    lock = store_for(cfg).break_lock(force=force)
    print("no deploy lock was held" if lock is None else
          f"broke the deploy lock of {lock.holder} ({lock.action}, {lock.age:.0f}s old)")


# --- sandbox.* ------------------------------------------------------------------


def _sandbox_dir(dir):
    from pathlib import Path

    return Path(dir) if dir else Path(__file__).resolve().parent.parent / ".sandbox"


@task(name="up", help={"hosts": "number of hosts (web1..webN)", "dir": "state dir (default .sandbox/)",
                       "reboot_delay": "seconds a host stays down on reboot",
                       "s3_port": "port of the local S3"})
@clean_errors
def sandbox_up(c, hosts=3, dir=None, reboot_delay=1.0, s3_port=9555):
    """Start a local fleet: N hosts with real sshd in namespaces, a local S3, a sample app."""
    from . import sandbox

    sb = sandbox.up(_sandbox_dir(dir), hosts=int(hosts), reboot_delay=float(reboot_delay), s3_port=int(s3_port))
    print(f"sandbox up: {', '.join(f'{n} ({ip})' for n, ip in sb.hosts.items())}; S3 at {sb.s3_endpoint}")
    print(f"config: {sb.deploy_yml}\nshell:  . {sb.dir / 'env'}   # AWS creds + DEPLOY_CONFIG for fab")


@task(name="down", help={"dir": "state dir (default .sandbox/)"})
@clean_errors
def sandbox_down(c, dir=None):
    """Stop every process the sandbox started."""
    from . import sandbox

    stopped = sandbox.down(_sandbox_dir(dir))
    print("sandbox down" + (f": stopped {', '.join(stopped)}" if stopped else " (nothing was running)"))


deploy = Collection(
    "deploy", bundle_task, publish_task, setup_task, hotfix_task, rollback_task, roll_task,
    status_task, unlock_task, export_node_task,
)
sandbox_ns = Collection("sandbox")
sandbox_ns.add_task(sandbox_up, "up")
sandbox_ns.add_task(sandbox_down, "down")

# -H before the task name means the same as --hosts after it: fabric.yaml names
# fleet.FleetExecutor as the executor (a collection's own config is read too late for that).
ns = Collection(deploy, sandbox_ns)
