#!/usr/bin/env python3
"""The sample app's background worker (the `worker` role's process, unit shop-worker.service).

Every second it "processes jobs" and writes a heartbeat, {"revision", "pid", "at"}, to
$DEPLOY_TO/shared/tmp/pids/worker.json (linked_dirs: shared across releases).

`worker.py --ping` is the worker role's health check (health.command, run in the release):
healthy when the heartbeat is fresh and comes from this release's REVISION, i.e. the worker
was restarted onto the new code and runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

RELEASE_DIR = os.path.dirname(os.path.realpath(__file__))


def revision() -> str:
    try:
        with open(os.path.join(RELEASE_DIR, "REVISION")) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def heartbeat_path(deploy_to: str) -> str:
    return os.path.join(deploy_to, "shared", "tmp", "pids", "worker.json")


def ping(deploy_to: str, max_age: float) -> int:
    try:
        with open(heartbeat_path(deploy_to)) as f:
            beat = json.load(f)
    except (OSError, ValueError):
        print("worker: no heartbeat", file=sys.stderr)
        return 1
    if beat.get("revision") != revision():
        print(f"worker: runs {beat.get('revision')}, not {revision()}", file=sys.stderr)
        return 1
    if time.time() - float(beat.get("at", 0)) > max_age:
        print("worker: heartbeat is stale", file=sys.stderr)
        return 1
    return 0


def run(deploy_to: str, interval: float) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    path = heartbeat_path(deploy_to)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"worker: {RELEASE_DIR} (revision {revision()})", flush=True)
    while True:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"revision": revision(), "pid": os.getpid(), "at": time.time()}, f)
        os.replace(tmp, path)
        time.sleep(interval)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--deploy-to", default=os.path.dirname(os.path.dirname(RELEASE_DIR)))
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument(
        "--ping", action="store_true", help="health check: exit 0 if it runs this release"
    )
    p.add_argument("--max-age", type=float, default=5.0)
    args = p.parse_args()
    if args.ping:
        return ping(args.deploy_to, args.max_age)
    return run(args.deploy_to, args.interval)


if __name__ == "__main__":
    sys.exit(main())
