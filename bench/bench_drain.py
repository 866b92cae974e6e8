"""The cost of a hotfix without an outage: HAProxy drain vs the plain parallel hotfix (issue 16).

    .venv/bin/python bench/bench_drain.py              # 20 hosts, 2 runs per mode (~4-6 min on 2 cores)
    .venv/bin/python bench/bench_drain.py --reps 1 --hosts 8

One sandbox fleet of --hosts hosts on a free subnet in 127.0.50-59 (always brought down) with
Debian's HAProxy (fabfile/haproxy_lb.py: health checks every 300 ms, `retries 0`, no
`option redispatch`) in front of every host's app port, and a steady client load through it
(2 threads, GET /version at 100 requests/s in all, each on a new connection; a non-200
answer or a connection error is a failed request). Per run a NEW commit is bundled (untimed), then one
whole-fleet `fab deploy.hotfix` is timed under that load, alternating:

- plain: today's default, no traffic settings: one parallel pass (`parallel` 10 at a time);
- drain: `--batch=25%` with traffic.drain/restore through HAProxy's admin socket (drain, wait
  until scur is 0, maint; back: ready, wait until UP), run on this machine.

The same two modes also run on a 4-host deploy.yml (HAProxy over web1-4 only), issue 16's
setup, where the plain hotfix restarts every backend at once. Failed requests are counted, not
asserted (tests/e2e/test_haproxy.py asserts 0 with drain). Results: bench/results/bench_drain.json.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Fleet, fleet, free_subnet, machine, table, write_results  # noqa: E402

from fabfile.haproxy_lb import Balancer, Load  # noqa: E402


def one_run(f: Fleet, lb: Balancer, cfg: Path, args: list[str], i: int) -> dict[str, Any]:
    commit = f.commit(f"bench_drain run {i}")
    f.fab("deploy.bundle", config=cfg)  # untimed: "the bundle is already in S3"
    with Load(lb.bind) as load:
        load.wait_requests(20)
        wall, r = f.fab("deploy.hotfix", *args, config=cfg)
        load.wait_requests(20)
    names = lb.names
    wrong = [h for h in names if f.version(h) != commit]
    if wrong:
        raise SystemExit(f"after the hotfix {', '.join(wrong)} do not serve {commit[:12]}")
    prep = re.search(r"prepared \d+ host\(s\) in ([\d.]+)s", r.stdout)
    drains = [float(x) for x in re.findall(r"out of traffic \(([\d.]+)s\)", r.stdout)]
    return {
        "wall_s": round(wall, 3),
        "prepare_s": float(prep.group(1)) if prep else None,  # all hosts, before any drain
        "drain_s_median": statistics.median(drains) if drains else None,  # per host
        "batches": len(re.findall(r"^batch \d+/\d+:", r.stdout, re.M)),
        "stdout_tail": r.stdout.splitlines()[-40:],
        "requests": load.ok + load.failed,
        "failed": load.failed,
        "errors": sorted(set(load.errors)),
    }


def brief(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "stdout_tail"}


def measure(
    f: Fleet, work: Path, hosts: list[str], reps: int, tag: str
) -> dict[str, list[dict[str, Any]]]:
    plain = f.variant(f"plain-{tag}", hosts=hosts)
    f.fab("deploy.hotfix", config=plain)  # warm-up: the node program and a release everywhere
    lb = Balancer(
        work / f"lb-{tag}",
        f"{f.sb.hosts['web1'].rpartition('.')[0]}.250:8080",
        {h: f"{f.sb.hosts[h]}:8080" for h in hosts},
    )
    try:
        drain = f.variant(
            f"drain-{tag}",
            hosts=hosts,
            traffic={
                "drain": lb.command("drain"),
                "restore": lb.command("restore"),
                "run_on": "local",
            },
        )
        out: dict[str, list[dict[str, Any]]] = {"plain": [], "drain": []}
        for i in range(reps):
            out["plain"].append(one_run(f, lb, plain, [], i))
            print(f"{tag} plain run {i + 1}: {brief(out['plain'][-1])}", flush=True)
            out["drain"].append(one_run(f, lb, drain, ["--batch=25%"], i))
            print(f"{tag} drain run {i + 1}: {brief(out['drain'][-1])}", flush=True)
        return out
    finally:
        lb.stop()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    results: dict[str, Any] = {"machine": machine(), "hosts": a.hosts, "reps": a.reps}
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        work = Path(tmp)
        with fleet(work, a.hosts, free_subnet()) as f:
            names = f.names
            results["small"] = measure(f, work, names[:4], a.reps, "4")
            results["fleet"] = measure(f, work, names, a.reps, str(a.hosts))
    rows = []
    for key, n in (("small", 4), ("fleet", a.hosts)):
        for mode, label in (("plain", "plain parallel"), ("drain", "--batch=25% + drain")):
            runs = results[key][mode]
            rows.append(
                [
                    f"{n} hosts, {label}",
                    f"{statistics.median(r['wall_s'] for r in runs):.1f}",
                    " / ".join(f"{r['wall_s']:.1f}" for r in runs),
                    " / ".join(f"{r['failed']} of {r['requests']}" for r in runs),
                ]
            )
    for key, _n in (("small", 4), ("fleet", a.hosts)):
        p = statistics.median(r["wall_s"] for r in results[key]["plain"])
        d = statistics.median(r["wall_s"] for r in results[key]["drain"])
        results[f"cost_{key}"] = {"plain_s": p, "drain_s": d, "ratio": round(d / p, 2)}
    results["table"] = table(
        "whole-fleet hotfix under load through HAProxy (seconds; failed requests per run)",
        ["run", "median s", "runs s", "failed requests"],
        rows,
    )
    print(f"results: {write_results('bench_drain', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
