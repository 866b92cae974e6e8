#!/usr/bin/env python3
"""The sample app's database migration: a run-once hook (hooks.once in deploy.yml).

It must run exactly once per deploy: each run adds one row to the `deploys` table of
$DEPLOY_TO/shared/migrations.sqlite (created on the first run), so counting rows counts runs.
With $DEPLOY_TO/shared/fail-migration present it fails the way a broken migration does.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import time


def main() -> int:
    shared = os.path.join(os.environ["DEPLOY_TO"], "shared")
    revision = os.environ.get("REVISION", "unknown")
    print(f"migrating {revision[:12]} in {os.environ.get('RELEASE_PATH', os.getcwd())}", flush=True)
    if os.path.exists(os.path.join(shared, "fail-migration")):
        print("0002_add_orders: table orders already exists", file=sys.stderr, flush=True)
        return 1
    db = sqlite3.connect(os.path.join(shared, "migrations.sqlite"))
    with db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS deploys "
            "(id INTEGER PRIMARY KEY, revision TEXT, host TEXT, role TEXT, at REAL)"
        )
        db.execute(
            "INSERT INTO deploys (revision, host, role, at) VALUES (?, ?, ?, ?)",
            (revision, socket.gethostname(), os.environ.get("ROLE", ""), time.time()),
        )
    count = db.execute("SELECT COUNT(*) FROM deploys").fetchone()[0]
    db.close()
    print(f"migrated: {count} deploys recorded", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
