"""deploy.setup: install the node program, its config and the boot unit on every host.

With a deploy user (ssh.user not root), what needs root goes through an admin login:
`--admin-user` / ssh.admin_user (root, or a user with full sudo), else ssh.user via sudo.
"""

from __future__ import annotations

import time
from typing import Any

from fabric import Connection

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.ssh import connect, run_parallel
from fabdeploy.basics.config import Config, Host
from fabdeploy.basics.output import progress_line, table
from fabdeploy.ops.targets import Targets


def admin_for(cfg: Config, admin_user: str | None) -> tuple[str | None, bool]:
    """The login for the root part, and whether it goes through sudo."""
    user = admin_user or cfg.ssh.admin_user or cfg.ssh.user
    return user, user != "root"


def run_setup(cfg: Config, targets: Targets, *, admin_user: str | None = None) -> bool:
    user, sudo = admin_for(cfg, admin_user)

    def work(host: Host, conn: Connection) -> dict[str, Any]:
        if not cfg.run_as:
            return {"outcome": nodectl.install(cfg, host, conn, require_boto3=True)}
        own = user == cfg.ssh.user
        aconn = conn if own else connect(cfg, host, user=user)
        try:
            admin = nodectl.Admin(aconn, user, sudo)
            return {"outcome": nodectl.install(cfg, host, conn, require_boto3=True, admin=admin)}
        finally:
            if not own:
                aconn.close()

    results = run_parallel(cfg, targets.hosts, work, on_done=progress_line(time.monotonic()))
    table(
        f"setup {cfg.app}",
        ["host", "outcome"],
        [[r.host, r.data.get("outcome") if r.ok else f"FAILED: {r.error}"] for r in results],
    )
    if all(r.ok and r.data.get("outcome") == "unchanged" for r in results):
        print("no changes: every host already has this node program, config and boot unit")
    return all(r.ok for r in results)
