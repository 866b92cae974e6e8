"""Reliability report (issue #8): inject faults on a sandbox fleet, count broken hosts.

    .venv/bin/python bench/reliability.py [--reps 3] [--subnet 127.0.78]

Reuses the scenarios of tests/e2e/test_faults.py (kill -9 of `fab` during a hotfix and a roll
at several points, kill -9 of the node program mid-activation), each repeated --reps times on
a fresh 3-host fleet, and checks every touched host with the same broken-host check as the
tests. Prints a table; exit code 1 if any host was found broken. Needs root (sandbox).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "e2e")]

import test_faults as T  # noqa: E402

from fabfile import sandbox  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--subnet", default="127.0.78")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fabdeploy-reliability-"))
    fleet = T.start_fleet(root, subnet=args.subnet, hosts=3, reboot_delay=0.2)
    rows: list[tuple[str, int, int, int, int]] = []
    started = time.monotonic()
    try:
        fleet.commit(
            "ballast", {"ballast.bin": T.os.urandom(3 * 1024 * 1024).hex()[: 4 * 1024 * 1024]}
        )
        fast = fleet.variant("fast", **T.FAST)
        hook = fleet.variant("slowhook", **T.FAST, hooks={"before_swap": ["sleep 0.5"]})
        slow_restart = fleet.variant(
            "slowrestart", **T.FAST, restart="sleep 0.5; systemctl restart shop"
        )
        slow_node = fleet.variant(
            "slownode",
            **T.FAST,
            hooks={"before_swap": ["sleep 0.5"]},
            restart="sleep 0.5; systemctl restart shop",
        )
        fleet.fab("deploy.setup", config=fast)
        fleet.fab("deploy.hotfix", config=fast)
        scenarios = []
        for delay in (0.2, 0.5, 0.9, 1.4, 2.0, 3.0):
            scenarios.append(
                (
                    f"kill -9 fab, hotfix, +{delay}s",
                    lambda d=delay: T.scenario_hotfix_kill(fleet, fast, "delay", d),
                )
            )
        scenarios += [
            (
                "kill -9 fab, hotfix --push, after upload",
                lambda: T.scenario_hotfix_kill(fleet, fast, "pushed", push=True),
            ),
            (
                "kill -9 fab, hotfix, during extraction",
                lambda: T.scenario_hotfix_kill(fleet, fast, "staging"),
            ),
            (
                "kill -9 fab, hotfix, between link and swap",
                lambda: T.scenario_hotfix_kill(fleet, hook, "pending"),
            ),
            (
                "kill -9 fab, hotfix, between swap and restart",
                lambda: T.scenario_hotfix_kill(fleet, slow_restart, "swapped"),
            ),
        ]
        for after, delay in (
            ("published", 0.0),
            ("web1: rebooting", 0.0),
            ("web1: rebooting", 0.6),
            ("web2: rebooting", 0.2),
        ):
            scenarios.append(
                (
                    f"kill -9 fab, roll, {after} +{delay}s",
                    lambda a=after, d=delay: T.scenario_roll_kill(fleet, fast, a, d),
                )
            )
        for point in ("staging", "pending", "swapped"):
            scenarios.append(
                (
                    f"kill -9 node program, {point}",
                    lambda p=point: T.scenario_node_kill(fleet, slow_node, p),
                )
            )
        for name, run in scenarios:
            runs = hosts = broken = missed = 0
            for _ in range(args.reps):
                r = run()
                runs += 1
                hosts += r["hosts"]
                broken += len({p.split(":")[0] for p in r["problems"]})
                missed += 0 if r["hit"] else 1
                for p in r["problems"]:
                    print(f"BROKEN ({name}): {p}", file=sys.stderr)
            rows.append((name, runs, hosts, broken, missed))
            print(f"  {name}: {runs} runs, {hosts} hosts checked, {broken} broken", file=sys.stderr)
    finally:
        sandbox.down(fleet.sb.dir)
    total = tuple(sum(r[i] for r in rows) for i in (1, 2, 3, 4))
    print(
        "| fault injected | runs | hosts checked | broken hosts | kill point missed |\n"
        "|---|---:|---:|---:|---:|"
    )
    for name, runs, hosts, broken, missed in rows:
        print(f"| {name} | {runs} | {hosts} | {broken} | {missed} |")
    print(
        f"| **total** ({time.monotonic() - started:.0f}s) | {total[0]} | {total[1]} | {total[2]} | {total[3]} |"
    )
    return 1 if total[2] else 0


if __name__ == "__main__":
    sys.exit(main())
