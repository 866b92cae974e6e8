"""deploy.check: a preflight per host that changes nothing, one table, non-zero on any failure.

Per host, in one SSH command: SSH itself, `sudo -n -l` for the privileged commands (with
ssh.sudo), the linked files in shared/, the node's Python and boto3, and whether the node
program, its config and the boot unit are current.
"""

from __future__ import annotations

from typing import Any

from fabric import Connection

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.ssh import run, run_parallel
from fabdeploy.basics.config import Config, Host
from fabdeploy.basics.output import table
from fabdeploy.ops.targets import Targets


def run_check(cfg: Config, targets: Targets) -> bool:
    def work(host: Host, conn: Connection) -> dict[str, Any]:
        r = run(cfg, host, conn, nodectl.check_script(cfg, host))
        state = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        return {"problems": nodectl.check_problems(cfg, host, state)}

    results = run_parallel(cfg, targets.hosts, work)
    rows = []
    for r in results:
        problems = r.data.get("problems") if r.ok else [f"SSH: {r.error}"]
        rows.append([r.host, "ok" if not problems else "FAILED", "; ".join(problems or []) or "-"])
    table(f"check {cfg.app}", ["host", "result", "problems"], rows)
    return all(row[1] == "ok" for row in rows)
