"""Run-once hooks (`hooks.once`, e.g. database migrations): on exactly one host, before any
host swaps, under the fleet lock, never at boot and never on rollback.

The chosen host (the first of the run's hosts carrying the hook's roles) extracts the new
bundle with the node program's own code path into a release that never becomes `current`,
runs the before_swap hooks there and then the run-once hooks, in order, and removes it.
Only then does the hotfix, roll or instance refresh change anything.

Which bundles' run-once hooks succeeded is recorded in S3 at `{prefix}/state/once.json`
(next to the lock and the pointer; newest first): a rerun for the same bundle (a hotfix that
has nothing to do, `roll --resume`, a subset hotfix followed by the whole fleet) does not run
them again; `--force` on a hotfix does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.bundle import local_user
from fabdeploy.adapters.ssh import connect, q, run
from fabdeploy.adapters.store import now_iso
from fabdeploy.basics.config import Config, Hook, Host
from fabdeploy.basics.errors import ConfigError, HostError, StoreError
from fabdeploy.basics.output import say, short, warn

KEEP = 100  # entries kept in the record
# A run-once hook without `timeout:` may run this long (its SSH command's bound).
DEFAULT_TIMEOUT = 3600.0
TAIL_LINES = 20


class OnceError(HostError):
    """A run-once hook failed (or its host could not run it): nothing changed anywhere."""


def plan(
    cfg: Config, hosts: list[Host], hooks: tuple[Hook, ...] | None = None
) -> list[tuple[Host, list[Hook]]]:
    """Which host runs which run-once hooks, in their order: each on the first of `hosts`
    carrying one of its roles (the first host, for a hook without roles); consecutive hooks
    for the same host share one call. One line if a hook's roles match none of `hosts`."""
    hooks = cfg.hooks.once if hooks is None else hooks
    out: list[tuple[Host, list[Hook]]] = []
    for hook in hooks:
        host = next((h for h in hosts if _carries(h, hook)), None)
        if host is None:
            names = ", ".join(h.name for h in hosts) or "none"
            raise ConfigError(
                f"run-once hook `{hook.run}` runs on a host with role {' or '.join(hook.roles)}, "
                f"and none of the hosts of this run ({names}) has one: include one "
                "(--hosts/--roles), or pass --skip-once"
            )
        if out and out[-1][0].name == host.name:
            out[-1][1].append(hook)
        else:
            out.append((host, [hook]))
    return out


def describe(cfg: Config, hosts: list[Host]) -> str:
    """For --dry-run: what would run where."""
    return "; ".join(
        f"on {host.name}: " + ", ".join(f"`{h.run}`" for h in hooks)
        for host, hooks in plan(cfg, hosts)
    )


def done_for(store: Any, bundle_id: str) -> dict[str, Any] | None:
    """The record entry of `bundle_id`'s run-once hooks, if they already succeeded."""
    try:
        entries = store.read_once()
    except StoreError as e:
        warn(f"{e}; treating it as empty (the run-once hooks run again, and it is rewritten)")
        return None
    return next((e for e in entries if e.get("bundle_id") == bundle_id), None)


def _record(store: Any, entry: dict[str, Any]) -> None:
    try:
        entries = store.read_once()
    except StoreError:
        entries = []
    entries = [entry] + [e for e in entries if e.get("bundle_id") != entry["bundle_id"]]
    try:
        store.write_once(entries[:KEEP])
    except StoreError as e:
        warn(
            f"the run-once hooks succeeded but could not be recorded ({e}): a rerun runs them again"
        )


def run_once_hooks(
    cfg: Config,
    store: Any,
    bundle: Any,
    hosts: list[Host] | Callable[[], list[Host]],
    *,
    force: bool = False,
    held: Any = None,
    url: str | None = None,
    local_file: str | None = None,
) -> bool:
    """Run deploy.yml's run-once hooks for `bundle` on their host among `hosts` (in order).

    False if there are none, or they already succeeded for this bundle (and not `force`).
    Raises OnceError (nothing changed on any host) if one fails. `url`: a presigned URL of
    the bundle (default: signed here); `local_file`: send the bundle over SFTP instead."""
    if not cfg.hooks.once:
        return False
    bid = getattr(bundle, "bundle_id", None) or bundle.commit
    done = done_for(store, bid)
    if done is not None and not force:
        say(
            f"run-once hooks already ran for {short(bid)} (on {done.get('host')}, "
            f"{done.get('at')}): not running them again"
        )
        return False
    steps = plan(cfg, hosts() if callable(hosts) else hosts)
    if held is not None:
        held.check("running the run-once hooks")
    for host, hooks in steps:
        say(
            f"{host.name}: run-once hooks for {short(bid)}: "
            + ", ".join(f"`{h.run}`" for h in hooks)
        )
        _run_on(cfg, store, bundle, host, hooks, url, local_file)
    _record(
        store,
        {
            "bundle_id": bid,
            "commit": bundle.commit,
            "host": ", ".join(h.name for h, _ in steps),
            "hooks": [h.run for h in cfg.hooks.once],
            "at": now_iso(),
            "by": local_user(),
        },
    )
    return True


def _covered(cfg: Config, hosts: list[Host]) -> bool:
    """Every run-once hook has a host among `hosts`."""
    return all(any(_carries(h, hook) for h in hosts) for hook in cfg.hooks.once)


def _carries(host: Host, hook: Hook) -> bool:
    return not hook.roles or bool(set(hook.roles) & set(host.roles))


def reachable_hosts(cfg: Config, hosts: list[Host], what: str = "current instance") -> list[Host]:
    """The first of `hosts` (in their order) that answer over SSH now, probed `parallel` at a
    time until every run-once hook has one (a fleet of hundreds is not probed whole); one line
    if no host answers."""
    from concurrent.futures import ThreadPoolExecutor

    def answers(host: Host) -> bool:
        conn = connect(cfg, host)
        try:
            return run(cfg, host, conn, "true", timeout=cfg.ssh.connect_timeout + 10).exit_code == 0
        except HostError:
            return False
        finally:
            try:
                conn.close()
            except Exception:  # noqa: BLE001, S110 - a probe's close must not fail the run
                pass

    found: list[Host] = []
    step = max(1, cfg.parallel)
    with ThreadPoolExecutor(max_workers=step) as pool:
        for i in range(0, len(hosts), step):
            chunk = hosts[i : i + step]
            ok = list(pool.map(answers, chunk))
            found += [h for h, up in zip(chunk, ok, strict=True) if up]
            if found and _covered(cfg, found):
                break
    if not found:
        names = ", ".join(h.name for h in hosts) or "none found"
        raise OnceError(
            "",
            f"hooks.once (run-once hooks) must run on one {what} before anything changes, and "
            f"none answers over SSH ({names}); nothing was started: fix SSH from here, or pass "
            "--skip-once and run them yourself",
        )
    return found


def once_args(bundle: Any, hooks: list[Hook]) -> list[str]:
    """The node program's `once` command for `bundle` (the source is added by the caller)."""
    bid = getattr(bundle, "bundle_id", None) or bundle.commit
    args = ["once", "--sha256", bundle.sha256, "--commit", bundle.commit]
    if bid != bundle.commit:
        args += ["--bundle-id", bid]
    if bundle.committed_at:
        args += ["--committed-at", str(bundle.committed_at)]
    if bundle.size:
        args += ["--size", str(bundle.size)]
    hook_json = [{"run": h.run, "timeout": h.timeout} if h.timeout else h.run for h in hooks]
    return args + ["--hooks", json.dumps(hook_json)]


def _run_on(
    cfg: Config,
    store: Any,
    bundle: Any,
    host: Host,
    hooks: list[Hook],
    url: str | None,
    local_file: str | None,
) -> None:
    bid = getattr(bundle, "bundle_id", None) or bundle.commit
    args = once_args(bundle, hooks)
    stdin = ""
    remote = None
    # ssh.command_timeout for the node's own work (download, extraction), plus each hook's.
    timeout = cfg.ssh.command_timeout + sum(h.timeout or DEFAULT_TIMEOUT for h in hooks)
    conn = connect(cfg, host)
    try:
        if local_file is not None:
            remote = f"{cfg.deploy_to}/.fabdeploy/push-once-{bid}.tar.gz"
            nodectl.call(cfg, host, conn, "version")  # installs the node program and its dirs
            try:
                conn.sftp().put(str(local_file), remote)
            except BaseException:
                run(cfg, host, conn, f"rm -f -- {q(remote)}", timeout=30)
                raise
            args += ["--file", remote]
        else:
            args.append("--url-stdin")
            stdin = f"{url or store.presign_bundle(bid)}\n"
        if getattr(bundle, "manifest", None) is not None:
            args.append("--manifest-stdin")
            stdin += json.dumps(bundle.manifest, sort_keys=True) + "\n"
        nodectl.call(
            cfg, host, conn, *args, stdin=stdin or None, remove_after=remote, timeout=timeout
        )
    except HostError as e:
        tail = (e.data or {}).get("output_tail") or []
        shown = "\n".join(f"  | {line}" for line in tail[-TAIL_LINES:])
        if "output_tail" in (e.data or {}):  # the node's own line: which hook, how, where
            msg = f"{e.message} (nothing was published)"
        else:
            msg = (
                f"run-once hooks could not run on {host.name}, so no host was changed and "
                f"nothing was published: {e.message}"
            )
        raise OnceError(
            host.name, msg + (f". Its last lines:\n{shown}" if shown else ""), data=e.data
        ) from None
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001, S110 - closing must not mask the outcome
            pass
