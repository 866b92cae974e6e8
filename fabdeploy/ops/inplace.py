"""What hotfix and rollback share: the health gate with its revert, the results table, drift."""

from __future__ import annotations

from typing import Any

from fabric import Connection

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.health import wait_healthy
from fabdeploy.adapters.ssh import HostResult
from fabdeploy.basics.config import Config, Host, for_host
from fabdeploy.basics.errors import HostError
from fabdeploy.basics.output import say, short, table, warn
from fabdeploy.ops.targets import Targets


def health_or_revert(
    cfg: Config, host: Host, conn: Connection, data: dict[str, Any], user: str
) -> dict[str, Any]:
    """Health-check a host that just changed; on failure put its previous release back.

    With health.on: node the node program already did both, in the same command."""
    cfg = for_host(cfg, host)  # its role's health check
    if cfg.health.on == "node":
        return data
    h = wait_healthy(cfg, conn.host)
    data["health"] = h.detail
    if h.ok:
        return data
    prev = (data.get("previous") or {}).get("release")
    reverted = ""
    if prev:
        try:
            nodectl.call(
                cfg,
                host,
                conn,
                "rollback",
                "--release",
                prev,
                "--user",
                user,
                "--restart",
                "--reason",
                "health check failed",
            )
            reverted = f"; put back on {prev}"
        except HostError as e:
            reverted = f"; reverting to {prev} ALSO failed: {e.message}"
    raise HostError(host.name, f"{host.name}: {h.detail}{reverted}", data=data)


def print_results(
    title: str, results: list[HostResult], not_touched: list[str] | None = None
) -> None:
    rows = []
    for r in results:
        d = r.data
        prev = d.get("previous") or {}
        if r.ok:
            outcome = "ok" if d.get("changed", True) else "unchanged (already there)"
            if d.get("config_changed"):  # sourced linked files the node fetched anew
                what = f"config changed: {', '.join(d['config_changed'])}"
                outcome = (
                    f"ok; {what}"
                    if d.get("changed", True)
                    else f"{what}; {'restarted' if d.get('restarted') else 'not restarted'}"
                )
        else:
            outcome = f"FAILED: {r.error}"
        rows.append(
            [
                r.host,
                f"{prev.get('release', '')} {short(prev.get('commit'))}".strip() or "-",
                f"{d.get('release', '')} {short(d.get('commit'))}".strip() or "-",
                f"{r.seconds:.1f}s",
                outcome,
            ]
        )
    rows += [[name, "", "", "", "not touched"] for name in not_touched or ()]
    table(title, ["host", "previous", "now", "time", "outcome"], rows)
    failed = [r for r in results if not r.ok]
    say(
        f"{len(results) - len(failed)} ok, {len(failed)} failed"
        + (
            f", {len(not_touched)} not touched (the run stopped after a failed batch; they keep their release)"
            if not_touched
            else ""
        )
    )


def drift_note(cfg: Config, targets: Targets, what: str, commit: str) -> None:
    if targets.whole_fleet:
        return
    names = ", ".join(h.name for h in targets.hosts)
    warn(
        f"{names} now run{'s' if len(targets.hosts) == 1 else ''} {what}, which is NOT the published "
        "bundle: a reboot or a new instance would get the published one. To make it stick, "
        f"run `fab deploy.publish --ref={commit}` (or hotfix the whole fleet)."
    )
