"""deploy.check: a preflight per host that changes nothing, one table, non-zero on any failure.

Per host, in one SSH command: SSH itself, `sudo -n -l` for the privileged commands (with
ssh.sudo), the linked files in shared/, the node's Python and boto3, whether the node
program, its config and the boot unit are current, and then the node program's own `check`,
run as the boot unit runs it (same user, a clean environment): can it read the published
pointer with its own credentials, how much space is free on deploy_to's filesystem, does the
health check answer now. The free space is compared here with the published bundle's
unpacked size (recorded by deploy.bundle; "unknown" for older bundles).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fabric import Connection

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.bundle import meta_int
from fabdeploy.adapters.health import wait_healthy
from fabdeploy.adapters.ssh import run, run_parallel
from fabdeploy.adapters.store import store_for
from fabdeploy.basics.config import Config, Host, for_host
from fabdeploy.basics.errors import DeployError
from fabdeploy.basics.output import table, warn
from fabdeploy.ops.targets import Targets

# Free space wanted beyond the unpacked bundle: 10% for the filesystem's own overhead, plus
# the floor the node's extraction never goes below (node.py: SPACE_SLACK).
SPACE_MARGIN = 0.10
SPACE_FLOOR = 16 * 1024 * 1024
# deploy.check asks whether the app answers now: a controller-side check polls this long at most.
HEALTH_PROBE_SECONDS = 5.0


@dataclass(frozen=True)
class Published:
    """What the deploying machine sees published: the disk check's side of the comparison."""

    commit: str | None  # None: nothing published (or unreadable from here: `note` says)
    unpacked: int | None  # bytes the extracted bundle takes; None: unknown (`note` says why)
    note: str = ""


def read_published(cfg: Config) -> Published:
    """The published bundle's unpacked size, from its object's metadata (one GET, one HEAD)."""
    store = store_for(cfg)
    try:
        p, _ = store.read_pointer()
        if p is None:
            return Published(None, None, "nothing published")
        meta = store.head_bundle(p.id)
    except DeployError as e:
        warn(f"cannot read the published pointer from here, disk needs unknown: {e}")
        return Published(None, None, "pointer unreadable here")
    if meta is None:
        return Published(p.commit, None, f"bundle {p.id[:12]} missing")
    unpacked = meta_int(meta.get("unpacked-size"))
    return Published(p.commit, unpacked, "" if unpacked is not None else "older bundle")


def needed_space(unpacked: int) -> int:
    return int(unpacked * (1 + SPACE_MARGIN)) + SPACE_FLOOR


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MB" if n < 10 << 30 else f"{n / (1 << 30):.1f} GB"


def node_answer(state: dict[str, str]) -> dict[str, Any] | None:
    """The node program's `check` answer (None: no node program on the host)."""
    raw = state.get("node_check")
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return {"ok": False, "error": f"no answer ({raw[:80] or 'no output'})"}
    return data


def findings(
    cfg: Config,
    host: Host,
    state: dict[str, str],
    published: Published,
    health: dict[str, Any] | None = None,
) -> tuple[list[str], list[str]]:
    """([pointer, disk, health] columns, problems) from the node's `check` answer.
    `health`: a controller-side probe's result (health.on: controller)."""
    problems: list[str] = []
    answer = node_answer(state)
    if answer is None:  # not set up: check_problems says so
        return ["-", "-", "-"], problems
    if not answer.get("ok"):
        if state.get("sha") == nodectl.fingerprint(cfg, host):  # else "not current" says it
            problems.append(f"the node program's check failed: {answer.get('error')}")
        return ["not checked"] * 3, problems
    cols = []
    ptr: dict[str, Any] = answer["pointer"] if isinstance(answer.get("pointer"), dict) else {}
    if ptr.get("ok"):
        cols.append("ok")
    elif ptr.get("code") in ("NoSuchKey", "404", "NotFound") and published.commit is None:
        cols.append("nothing published")  # the node agrees with the deploying machine
    else:
        cols.append(str(ptr.get("code") or "FAILED"))
        problems.append(
            f"the node cannot read {ptr.get('uri', 'the pointer')} with its own credentials: "
            f"{ptr.get('error') or 'no answer'}"
        )
    for src in answer.get("shared") or []:
        if isinstance(src, dict) and not src.get("ok"):
            problems.append(
                f"the node cannot read {src.get('source')} (for shared/{src.get('path')}) with its "
                f"own credentials: {src.get('error') or 'no answer'}"
            )
    free = meta_int(answer.get("free"))
    where = str(answer.get("path") or cfg.deploy_to)
    if free is None:
        cols.append("free space unknown")
    elif published.unpacked is None:
        cols.append(f"need unknown ({published.note}), {_mb(free)} free")
    else:
        need = needed_space(published.unpacked)
        cols.append(f"{_mb(need)} needed, {_mb(free)} free")
        if free < need:
            problems.append(
                f"not enough disk space at {where}: {_mb(need)} needed for the published bundle "
                f"({_mb(published.unpacked)} unpacked + {SPACE_MARGIN:.0%} + {_mb(SPACE_FLOOR)}), "
                f"{_mb(free)} free"
            )
    h = answer.get("health") if isinstance(answer.get("health"), dict) else health
    if not h:
        cols.append("-")  # no health check configured
    elif h.get("ok"):
        cols.append("ok")
    elif h.get("ok") is None:
        cols.append(str(h.get("detail") or "not checked"))
    else:
        cols.append("FAILED")
        problems.append(str(h.get("detail") or "health check failed"))
    return cols, problems


def run_check(cfg: Config, targets: Targets) -> bool:
    published = read_published(cfg)

    def work(host: Host, conn: Connection) -> dict[str, Any]:
        r = run(cfg, host, conn, nodectl.check_script(cfg, host), stdin=nodectl.check_stdin(cfg))
        state = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        hcfg = for_host(cfg, host)
        probe = None
        if hcfg.health.on == "controller" and hcfg.health.url:
            h = wait_healthy(
                hcfg, conn.host, timeout=min(hcfg.health.timeout, HEALTH_PROBE_SECONDS)
            )
            probe = {"ok": h.ok, "detail": h.detail}
        cols, more = findings(cfg, host, state, published, probe)
        return {"cols": cols, "problems": nodectl.check_problems(cfg, host, state) + more}

    results = run_parallel(cfg, targets.hosts, work)
    rows = []
    for r in results:
        problems = r.data.get("problems") if r.ok else [f"SSH: {r.error}"]
        cols: list[str] = r.data.get("cols") or ["-", "-", "-"] if r.ok else ["-", "-", "-"]
        rows.append(
            [r.host, "ok" if not problems else "FAILED", *cols, "; ".join(problems or []) or "-"]
        )
    table(
        f"check {cfg.app}",
        ["host", "result", "S3 pointer (node's credentials)", "disk", "health", "problems"],
        rows,
    )
    return all(row[1] == "ok" for row in rows)
