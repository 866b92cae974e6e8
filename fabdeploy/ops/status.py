"""deploy.status: what every host runs, and whether it matches the published bundle."""

from __future__ import annotations

from typing import Any

from fabric import Connection

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.ssh import HostResult, run_parallel
from fabdeploy.basics.config import Config, Host
from fabdeploy.basics.output import dump_json, short, table


def collect(cfg: Config, targets: list[Host], store: Any) -> tuple[Any, list[HostResult]]:
    pointer, pointer_error = None, None
    try:
        pointer, _ = store.read_pointer()
    except Exception as e:  # status must still show the hosts when S3 is unreachable
        pointer_error = str(e)

    def work(host: Host, conn: Connection) -> dict[str, Any]:
        data = nodectl.call(cfg, host, conn, "status", timeout=30, reinstall=False)  # reads only
        data["address"] = conn.host
        return data

    results = run_parallel(cfg, targets, work)
    aws_ids = {h.name: (h.instance_id, h.az) for h in targets if h.instance_id}
    roles = {h.name: list(h.roles) for h in targets if h.roles}
    for r in results:
        if r.host in roles:
            r.data["roles"] = roles[r.host]
        if (
            r.host in aws_ids
        ):  # also for unreachable hosts: the id is what you look up in the console
            r.data["instance_id"], r.data["az"] = aws_ids[r.host]
        cur = (r.data or {}).get("current") or {}
        r.data["drift"] = bool(
            pointer and r.ok and (cur.get("bundle_id") or cur.get("commit")) != pointer.id
        )
    return (pointer, pointer_error), results


def shared_note(last: Any) -> str:
    """Sourced linked files the node could not fetch last time (it kept a copy, or had none)."""
    files = last.get("files") if isinstance(last, dict) else None
    bad = [f for f in files or [] if isinstance(f, dict) and f.get("outcome") in ("kept", "failed")]
    if not bad:
        return ""
    return "; shared config " + ", ".join(
        f"{f.get('path')} {'kept (source unreadable)' if f.get('outcome') == 'kept' else 'MISSING'}"
        for f in bad
    )


def once_record(cfg: Config, store: Any) -> dict[str, Any] | None:
    """The newest entry of the run-once record in S3 ({} if none yet), when deploy.yml has
    run-once hooks; None without them."""
    if not cfg.hooks.once:
        return None
    try:
        entries = store.read_once()
    except Exception as e:  # status must still show the hosts when S3 is unreachable
        return {"error": str(e)}
    return entries[0] if entries else {}


def _once_text(once: dict[str, Any]) -> str:
    if once.get("error"):
        return f"run-once hooks: unknown ({once['error']})"
    if not once.get("bundle_id"):
        return "run-once hooks: not run yet"
    return (
        f"run-once hooks: last ran for {short(once['bundle_id'])} on {once.get('host')} "
        f"at {once.get('at')} by {once.get('by')}"
    )


def _deployed(last: dict[str, Any], log_tail: list[str]) -> str:
    """When, and by whom (from revisions.log, which Capistrano writes too)."""
    by = log_tail[-1].rsplit(" by ", 1)[1] if log_tail and " by " in log_tail[-1] else ""
    if log_tail and " rolled back to release " in log_tail[-1]:
        by = log_tail[-1].split(" rolled back", 1)[0] + " (rollback)"
    return f"{last.get('at', '')} {by}".strip() or "-"


def show(
    cfg: Config,
    pointer_info: tuple[Any, str | None],
    results: list[HostResult],
    as_json: bool,
    once: dict[str, Any] | None = None,
) -> None:
    """`once`: the run-once record's newest entry (once_record), shown when not None."""
    pointer, pointer_error = pointer_info
    if as_json:
        dump_json(
            {
                "app": cfg.app,
                "stage": cfg.stage,
                "published": None if pointer is None else pointer.__dict__,
                "published_error": pointer_error,
                **({"once": once} if once is not None else {}),
                "hosts": [
                    {"host": r.host, "reachable": r.ok, "error": r.error, **r.data} for r in results
                ],
            }
        )
        return
    if pointer is not None:
        print(
            f"published: {short(pointer.commit)} ({pointer.ref}) by {pointer.published_by} at {pointer.published_at}"
        )
    elif pointer_error:
        print(f"published: unknown ({pointer_error})")
    else:
        print("published: nothing yet (run `fab deploy.publish`)")
    if once is not None:
        print(_once_text(once))
    rows = []
    # Hosts discovered from AWS: show which instance and AZ each one is.
    ids = any(r.data.get("instance_id") for r in results)
    with_roles = any(r.data.get("roles") for r in results)
    for r in results:
        d = r.data
        aws_cols = [d.get("instance_id") or "-", d.get("az") or "-"] if ids else []
        aws_cols += [",".join(d.get("roles") or []) or "-"] if with_roles else []
        cur = d.get("current") or {}
        last_boot = d.get("last_boot") or {}
        boot = last_boot.get("outcome", "")
        if last_boot.get("reason") and boot != "activated":
            boot = f"{boot}: {last_boot['reason']}"
        if not r.ok:
            rows.append(
                [r.host, *aws_cols, "-", "-", "-", "-", "-", f"UNREACHABLE/ERROR: {r.error}"]
            )
            continue
        state = "ok"
        if not cur:
            state = "no current release"
        elif not cur.get("ok"):
            state = f"BROKEN current -> {cur.get('path')}"
        elif d.get("drift"):
            state = "DRIFT (differs from published)"
        if d.get("outdated"):
            state += "; outdated node program/config (fab deploy.setup)"
        state += shared_note(d.get("shared_config"))
        if d.get("staging"):
            state += f"; {len(d['staging'])} staging leftover(s)"
        if d.get("stray"):
            state += f"; stray in releases/: {', '.join(d['stray'])}"
        last = d.get("last") or {}
        rows.append(
            [
                r.host,
                *aws_cols,
                cur.get("release", "-"),
                short(cur.get("commit")) or "-",
                _deployed(last, d.get("revision_log_tail") or []),
                str(len(d.get("releases") or [])),
                boot or "-",
                state,
            ]
        )
    table(
        f"{cfg.app}{f' ({cfg.stage})' if cfg.stage else ''}: {len(results)} host(s)",
        [
            "host",
            *(["instance", "az"] if ids else []),
            *(["roles"] if with_roles else []),
            "release",
            "commit",
            "deployed at / by",
            "releases",
            "last boot",
            "state",
        ],
        rows,
    )
