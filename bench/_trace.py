"""Run the real `fab` CLI in-process with timing probes around fabdeploy's phases.

    python bench/_trace.py OUT.json deploy.hotfix [--parallel=20 ...]

Nothing in fabfile/ is changed: module attributes are wrapped at run time, then
`fabric.main.program.run()` is called exactly as the `fab` script calls it. The
probes cost microseconds per call. OUT.json gets every span (thread, label, start,
end, extra) as wall-clock floats plus process milestones, so the bench can tell
controller start-up, S3 calls, per-host connect / node program / health check apart.
BENCH_T_SPAWN (time.time() taken by the parent just before it spawned us) marks t0.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
import time

T_SPAWN = float(os.environ.get("BENCH_T_SPAWN") or time.time())
T_MAIN = time.time()  # interpreter up, site imported, this file compiled
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPANS: list[dict] = []
MILESTONES: dict[str, float] = {"spawn": T_SPAWN, "python_main": T_MAIN}
_lock = threading.Lock()


def _record(label: str, start: float, end: float, **extra) -> None:
    with _lock:
        SPANS.append(
            {
                "thread": threading.current_thread().name,
                "label": label,
                "start": start,
                "end": end,
                **extra,
            }
        )


def wrap(owner, name: str, label: str | None = None, extra=None) -> None:
    fn = getattr(owner, name)
    if getattr(fn, "_bench_wrapped", False):
        return

    @functools.wraps(fn)
    def inner(*a, **kw):
        t = time.time()
        ok = True
        result = None
        try:
            result = fn(*a, **kw)
            return result
        except BaseException:
            ok = False
            raise
        finally:
            more = {}
            if extra is not None:
                try:
                    more = extra(a, kw, result) or {}
                except Exception:  # a probe must never change the outcome
                    more = {}
            _record(label or name, t, time.time(), ok=ok, **more)

    inner._bench_wrapped = True  # type: ignore[attr-defined]
    setattr(owner, name, inner)


def install() -> None:
    # fab's program first: fabdeploy installs its executor into it when first imported.
    import fabric.main  # noqa: F401

    t = time.time()
    from fabdeploy.adapters import bundle, health, nodectl, store  # noqa: F401
    from fabdeploy.adapters import ssh as fleet
    from fabdeploy.ops import batches, hotfix, inplace, roll, rollback, status

    MILESTONES["fabfile_imported"] = time.time()
    MILESTONES["fabfile_import_s"] = MILESTONES["fabfile_imported"] - t

    def conn_host(a, kw, r):
        return {"host": a[1].name}

    # connect: only count opens that really open a transport.
    orig_open = fleet.open_connection

    def open_connection(cfg, host, conn):
        if conn.is_connected:
            return orig_open(cfg, host, conn)
        t0 = time.time()
        try:
            return orig_open(cfg, host, conn)
        finally:
            _record("ssh_connect", t0, time.time(), host=host.name)

    fleet.open_connection = open_connection

    def run_extra(a, kw, r):
        cmd = a[3] if len(a) > 3 else kw.get("command", "")
        kind = "other"
        for k in (
            "activate",
            "rollback",
            "status",
            "version",
            "reboot",
            "python=",
            "mkdir",
            "mv -f",
        ):
            if k in cmd:
                kind = k.rstrip("=")
                break
        out = {"host": a[1].name, "kind": kind}
        if r is not None:
            for line in reversed((r.stdout or "").strip().splitlines()):
                if line.startswith("{"):
                    try:
                        d = json.loads(line)
                    except ValueError:
                        break
                    if isinstance(d.get("seconds"), dict):
                        out["node_seconds"] = dict(d["seconds"])
                        health = d.get("health")
                        if isinstance(health, dict) and "seconds" in health:
                            # the node's own wait for the restarted app to answer
                            out["node_seconds"]["health"] = health["seconds"]
                    break
        return out

    # fleet.run = connect (if needed) + one exec channel; keep the module-level names in sync.
    wrap(fleet, "run", "ssh_run", run_extra)
    for mod in (nodectl, roll):
        mod.run = fleet.run
    for mod in (inplace, rollback, roll):
        wrap(
            mod,
            "wait_healthy",
            "health",
            lambda a, kw, r: {"address": a[1], "health_s": getattr(r, "seconds", None)},
        )
    wrap(
        nodectl,
        "call",
        "node_call",
        lambda a, kw, r: {"host": a[1].name, "cmd": a[3] if len(a) > 3 else ""},
    )
    wrap(nodectl, "install", "node_install", conn_host)
    wrap(
        roll,
        "_boot_id",
        "roll_status_poll",
        lambda a, kw, r: {"host": a[1].name, "up": bool(r and r[0])},
    )
    wrap(roll, "reboot_one", "roll_host", lambda a, kw, r: {"host": a[1].name})
    wrap(fleet, "connect", "conn_object", lambda a, kw, r: {"host": a[1].name})
    for mod in (fleet, hotfix, rollback, roll, nodectl):
        if hasattr(mod, "connect"):
            mod.connect = fleet.connect
    wrap(bundle, "ensure_bundle", "ensure_bundle")
    wrap(bundle, "publish_bundle", "publish_bundle")
    for m in (
        "acquire_lock",
        "release_lock",
        "presign_bundle",
        "read_pointer",
        "write_pointer",
        "head_bundle",
        "_make_client",
        "pointer_history",
    ):
        wrap(store.Store, m, f"s3.{m}")
    wrap(hotfix, "run_hotfix", "task_body")
    wrap(rollback, "run_rollback", "task_body")
    wrap(roll, "run_roll", "task_body")
    wrap(fleet, "run_parallel", "run_parallel")
    for mod in (batches, hotfix, rollback, status):  # hotfix/rollback go through ops/batches.py
        if hasattr(mod, "run_parallel"):
            mod.run_parallel = fleet.run_parallel


def dump(path: str) -> None:
    MILESTONES["exit"] = time.time()
    with open(path, "w") as f:
        json.dump({"milestones": MILESTONES, "spans": SPANS}, f)


def main() -> int:
    out, args = sys.argv[1], sys.argv[2:]
    atexit.register(dump, out)
    install()
    from fabric.main import program

    MILESTONES["program_start"] = time.time()
    # As the `fab` script runs: a successful run of fabdeploy tasks then ends the way it does
    # there (fabdeploy.cli.exit_now: atexit handlers, our dump included, then no teardown).
    sys.argv = ["fab", *args]
    try:
        program.run(["fab", *args])
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
