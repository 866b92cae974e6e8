"""Round trips on the critical path: fab vs Capistrano vs OpenSSH at real network latencies.

    .venv/bin/python bench/bench_rtt.py                          # 20 hosts, RTT 0/50/100/200 ms
    .venv/bin/python bench/bench_rtt.py --hosts 5 --rtts 0,100 --no-cap --no-roll

One sandbox fleet (real sshd per host in namespaces + moto S3, on a free subnet in
127.0.50-59, always brought down) behind the sandbox's latency proxy (`fab sandbox.up --rtt`):
every byte between this machine and the hosts' sshd and app ports, and this machine's S3
endpoint, is delayed by RTT/2 each way, and each new TCP connection by one more RTT (its
handshake); the hosts reach S3 directly (split-horizon name). The proxy is restarted with
each RTT (sandbox.set_rtt); RTT 0 still goes through it, delay-free, so every point takes
the same path.

Per RTT (--runs runs; the slope uses the fastest, --stat):
  fab       `fab deploy.hotfix` of a new commit to every host (bundle already in S3: untimed),
            then `fab deploy.rollback`; both traced with bench/_trace.py
  cap       Capistrano 3 (bench/cap, as bench_hotfix.py runs it: git from a bare repo beside
            the nodes, restart after publishing): `cap production deploy`, `deploy:rollback`
  ssh       the OpenSSH floor: `ssh host true` to every host at once
  roll      `fab deploy.roll` (batch 1) of a new commit; overhead per host over the reboot
            floor, sum over hosts of (R + the host's own shutdown and boot), as bench_roll.py

The slope of time over RTT (least squares) is the number of round trips on the critical path:
it does not depend on the machine. For the roll, the slope of the overhead per host is the
round trips per hand-off. The traced runs at the lowest and highest RTT split the slope by
phase ("where each round trip goes"). Results: bench/results/bench_rtt.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Fleet, fleet, free_subnet, machine, stats, table, write_results  # noqa: E402
from bench_hotfix import Cap, breakdown  # noqa: E402
from bench_roll import floor_of, handoffs, new_boots  # noqa: E402

from fabfile import sandbox  # noqa: E402

TARGETS = {"hotfix": 9, "roll_handoff": 4}


def slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x: (b, a)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return float("nan"), my
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return b, my - b * mx


def theil_sen(points: list[tuple[float, float]]) -> float:
    """The median of the pairwise slopes: one point thrown off by a load spike barely moves it."""
    pairs = [
        (y2 - y1) / (x2 - x1)
        for i, (x1, y1) in enumerate(points)
        for x2, y2 in points[i + 1 :]
        if x2 != x1
    ]
    return statistics.median(pairs) if pairs else float("nan")


def ssh_floor(f: Fleet, hosts: list[str]) -> float:
    """Wall seconds of `ssh host true` to every host at once (OpenSSH, no connection sharing)."""
    t = time.perf_counter()
    f.ssh_all(hosts, lambda h: "true")
    return time.perf_counter() - t


def set_health_on(f: Fleet, where: str) -> None:
    import yaml

    data = yaml.safe_load(f.sb.deploy_yml.read_text())
    data.setdefault("health", {})["on"] = where
    f.sb.deploy_yml.write_text(yaml.safe_dump(data))


def trim_history(f: Fleet, keep: int) -> int:
    """Keep only the newest `keep` entries of the pointer's history in S3; returns how many were left.

    A rollback reads the whole history, one GET per entry, so its round trips grow with the
    number of publishes; every run publishes, so without this the slope would measure the
    history growing over the bench, not the RTT."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=f.sb.s3_direct,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    keys = sorted(
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=f.sb.bucket, Prefix="shop/history/"
        )
        for o in page.get("Contents", [])
    )
    for k in keys[keep:]:  # keys sort newest first (inverted millis)
        s3.delete_object(Bucket=f.sb.bucket, Key=k)
    return min(len(keys), keep)


# --- where the round trips go ----------------------------------------------------------------


def hotfix_phases(b: dict[str, Any]) -> dict[str, float]:
    """One traced hotfix/rollback as critical-path phases (seconds): the slowest host's chain."""
    ph, s3 = b["phases"], b["s3_and_bundle"]
    slowest = max(
        b["hosts"], key=lambda h: h["queued"] + h["connect"] + h["node_exec"] + h["health"]
    )
    out = {
        "controller start-up (python, imports, config)": ph["controller_startup"],
        "before the hosts (S3: bundle check, lock, pointer)": ph["before_pool"],
        "SSH connect (slowest host)": slowest["connect"],
        "node program over SSH (exec, activate/rollback)": slowest["node_exec"],
        "health check from here": slowest["health"],
        "pool, rest (queueing, spread between hosts)": ph["pool"]
        - slowest["connect"]
        - slowest["node_exec"]
        - slowest["health"],
        "after the hosts (publish / pointer, unlock)": ph["after_pool"],
        "exit": ph["exit"],
    }
    # Each S3 call (summed over calls; ensure_bundle and publish_bundle contain some of them).
    out.update({f"  {k}": v for k, v in sorted(s3.items())})
    out["total"] = ph["total"]
    return out


def per_phase_slopes(pts: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Least-squares slope over every RTT of each phase in pts[i][key]: round trips per phase."""
    phases = [k for k in pts[-1][key] if all(k in p[key] for p in pts)]
    return {k: slope([(p["rtt"], p[key][k]) for p in pts])[0] for k in phases}


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--rtts", default="0,50,100,200", help="round trips in ms, comma-separated")
    ap.add_argument(
        "--runs", type=int, default=3, help="timed runs per RTT for hotfix/rollback/cap/ssh"
    )
    ap.add_argument(
        "--stat",
        choices=("min", "median"),
        default="min",
        help="which run at each RTT the slope uses (default: the fastest)",
    )
    ap.add_argument(
        "--reboot-delay", type=float, default=1.0, help="R for the roll: seconds a host stays down"
    )
    ap.add_argument("--no-cap", action="store_true")
    ap.add_argument("--no-roll", action="store_true")
    ap.add_argument(
        "--no-handshake",
        action="store_true",
        help="do not charge one RTT per new TCP connection (pure per-chunk delay)",
    )
    ap.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="deploy.yml parallel for fab (default: every host at once, as cap and the ssh floor)",
    )
    ap.add_argument(
        "--history",
        type=int,
        default=5,
        help="pointer history entries in S3 before each timed rollback (it reads them all)",
    )
    ap.add_argument("--subnet", default=None)
    ap.add_argument(
        "--health-on",
        choices=("node", "controller"),
        default="node",
        help="where the health check runs (deploy.yml health.on): controller is the pre-issue-15 way",
    )
    ap.add_argument(
        "--report", metavar="JSON", help="only print the report of a saved results file"
    )
    args = ap.parse_args()
    if args.report:
        import json

        saved = json.loads(Path(args.report).read_text())
        saved["stat"] = args.stat
        report(saved)
        return 0
    parallel = args.parallel or args.hosts

    rtts = sorted({sandbox.parse_rtt(x) for x in args.rtts.split(",") if x.strip()})
    if len(rtts) < 2:
        raise SystemExit("--rtts needs at least two values to fit a slope")
    use_cap = not args.no_cap and shutil.which("cap") is not None
    if not args.no_cap and not use_cap:
        print(
            "note: `cap` not found (scripts/bootstrap --with-capistrano); skipping Capistrano",
            file=sys.stderr,
        )
    runs = max(1, args.runs)
    handshake = not args.no_handshake
    work = Path(tempfile.mkdtemp(prefix="fabdeploy-bench-rtt-"))
    subnet = free_subnet(args.subnet)
    res: dict[str, Any] = {
        "machine": machine(),
        "hosts": args.hosts,
        "rtts_ms": [r * 1000 for r in rtts],
        "runs": runs,
        "reboot_delay": args.reboot_delay,
        "handshake": handshake,
        "parallel": parallel,
        "history": args.history,
        "stat": args.stat,
        "subnet": subnet,
        "health_on": args.health_on,
        "points": {},
    }
    started = time.monotonic()
    n_commit = 0

    def new_commit(f: Fleet) -> str:
        nonlocal n_commit
        n_commit += 1
        return f.commit(f"bench rtt {n_commit}")

    try:
        with fleet(
            work,
            args.hosts,
            subnet,
            reboot_delay=args.reboot_delay,
            rtt=max(rtts),
            handshake=handshake,
        ) as f:
            hosts = f.names
            print(
                f"sandbox: {args.hosts} hosts on {subnet}.x behind the latency proxy, up in "
                f"{f.up_seconds:.1f}s",
                flush=True,
            )
            sandbox.set_rtt(f.sb.dir, 0.0, handshake)
            if args.health_on != "node":
                set_health_on(f, args.health_on)  # before the variant: it copies deploy.yml
            cfg = f.variant("rtt", parallel=parallel)
            f.fab("deploy.setup", config=cfg)
            f.fab("deploy.hotfix", config=cfg)  # warm-up: every host has a release
            cap = None
            if use_cap:
                cap = Cap(f, hosts, work)
                cap.prepare_hosts()
                cap.push()
                cap.run("deploy")  # the first deploy clones the repo on every host

            for rtt in rtts:
                sandbox.set_rtt(f.sb.dir, rtt, handshake)
                key = f"{rtt * 1000:g}"
                pt: dict[str, Any] = {"rtt": rtt}
                pt["ssh"] = stats([ssh_floor(f, hosts) for _ in range(runs)])
                hot, rb, traces = [], [], {"hotfix": [], "rollback": []}
                for i in range(runs):
                    new_commit(f)
                    f.fab("deploy.bundle", config=cfg)
                    for what, kind, task in (
                        ("hotfix", "activate", "deploy.hotfix"),
                        ("rollback", "rollback", "deploy.rollback"),
                    ):
                        if what == "rollback":
                            trim_history(f, args.history)
                        wall, tr, r = f.fab_traced(
                            work / f"trace-{what}-{key}-{i}.json", task, config=cfg
                        )
                        assert f"{len(hosts)} ok, 0 failed" in r.stdout, r.stdout
                        b = breakdown(tr, kind)
                        b["wall"] = wall
                        traces[what].append(b)
                        (hot if what == "hotfix" else rb).append(wall)
                pt["fab_hotfix"], pt["fab_rollback"] = stats(hot), stats(rb)
                # One traced run's phases, for the "where the round trips go" table.
                for what in ("hotfix", "rollback"):
                    ordered = sorted(traces[what], key=lambda b: b["wall"])
                    pick = ordered[0] if args.stat == "min" else ordered[len(ordered) // 2]
                    pt[f"{what}_phases"] = hotfix_phases(pick)
                if cap:
                    dep, crb = [], []
                    for _ in range(runs):
                        sha = new_commit(f)
                        cap.push()
                        dep.append(cap.run("deploy"))
                        assert cap.version(hosts[-1]) == sha, (
                            "cap deploy did not restart on the new commit"
                        )
                        crb.append(cap.run("deploy:rollback"))
                    pt["cap_deploy"], pt["cap_rollback"] = stats(dep), stats(crb)
                if not args.no_roll:
                    commit = new_commit(f)
                    before = {h: len(f.boots(h)) for h in hosts}
                    wall, tr, r = f.fab_traced(
                        work / f"trace-roll-{key}.json", "deploy.roll", config=cfg, timeout=1200
                    )
                    assert "not touched" not in r.stdout and "FAILED" not in r.stdout, r.stdout
                    boots = new_boots(f, before)
                    floor = sum(floor_of(boots, args.reboot_delay).values())
                    br = handoffs(tr, boots, hosts, args.reboot_delay)
                    pt["roll"] = {
                        "commit": commit,
                        "wall": wall,
                        "floor": floor,
                        "overhead_per_host": (wall - floor) / len(hosts),
                        "segments_mean": br["segments_mean"],
                        "phases": br["phases"],
                        "ssh_connects": br["ssh_connects"],
                        "status_polls": br["status_polls"],
                    }
                res["points"][key] = pt
                line = (
                    f"RTT {key:>4} ms: ssh {pt['ssh'][args.stat]:.2f}s, fab hotfix {pt['fab_hotfix'][args.stat]:.2f}s"
                    f" rollback {pt['fab_rollback'][args.stat]:.2f}s"
                )
                if cap:
                    line += f", cap deploy {pt['cap_deploy'][args.stat]:.2f}s rollback {pt['cap_rollback'][args.stat]:.2f}s"
                if "roll" in pt:
                    line += f", roll {pt['roll']['wall']:.1f}s (+{pt['roll']['overhead_per_host']:.2f}s/host)"
                print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["bench_seconds"] = time.monotonic() - started
    report(res)
    p = write_results("bench_rtt" if handshake else "bench_rtt_no_handshake", res)
    print(f"\nresults: {p} (bench took {res['bench_seconds']:.0f}s)")
    return 0


def report(res: dict[str, Any]) -> None:
    pts = [res["points"][k] for k in sorted(res["points"], key=float)]
    n = res["hosts"]
    # The fastest run at each RTT: on this shared machine the noise (CPU contention) only ever
    # adds time, and the network delay is the same in every run.
    st = res.get("stat", "min")
    series = {
        "fab deploy.hotfix": lambda p: p["fab_hotfix"][st],
        "fab deploy.rollback": lambda p: p["fab_rollback"][st],
        "cap deploy + restart": lambda p: p["cap_deploy"][st] if "cap_deploy" in p else None,
        "cap deploy:rollback + restart": lambda p: (
            p["cap_rollback"][st] if "cap_rollback" in p else None
        ),
        f"{n} x OpenSSH `ssh host true` (parallel)": lambda p: p["ssh"][st],
        "roll: overhead per host": lambda p: (
            p["roll"]["overhead_per_host"] if "roll" in p else None
        ),
    }
    slopes: dict[str, dict[str, float]] = {}
    rows = []
    for name, get in series.items():
        ys = [get(p) for p in pts]
        if any(y is None for y in ys):
            continue
        xy = [(p["rtt"], y) for p, y in zip(pts, ys, strict=True)]
        b, a = slope(xy)
        ts = theil_sen(xy)
        slopes[name] = {"round_trips": b, "at_0": a, "theil_sen": ts}
        rows.append([name, *[f"{y:.2f}" for y in ys], f"{b:.1f}", f"{ts:.1f}"])
    res["slopes"] = slopes
    print()
    table(
        f"seconds at each RTT ({n} hosts, fab parallel {res.get('parallel', n)}, {st} of {res['runs']}; "
        f"roll: 1 run); slope = round trips "
        f"on the critical path{'' if res['handshake'] else ' (no handshake charge)'}",
        ["", *[f"{p['rtt'] * 1000:g} ms" for p in pts], "slope (RTs)", "Theil-Sen"],
        rows,
    )
    fab_h = slopes.get("fab deploy.hotfix", {}).get("round_trips")
    fab_r = slopes.get("fab deploy.rollback", {}).get("round_trips")
    ssh = slopes.get(f"{n} x OpenSSH `ssh host true` (parallel)", {}).get("round_trips")
    ratios = []
    for label, f_rt, c_key in (
        ("hotfix vs cap deploy", fab_h, "cap deploy + restart"),
        ("rollback vs cap rollback", fab_r, "cap deploy:rollback + restart"),
    ):
        c_rt = slopes.get(c_key, {}).get("round_trips")
        ratios.append(
            [
                label,
                f"{f_rt:.1f}",
                f"{c_rt:.1f}" if c_rt else "-",
                f"{c_rt / f_rt:.1f}x" if c_rt and f_rt else "-",
                f"{ssh:.1f}",
                f"{f_rt / ssh:.1f}x" if ssh else "-",
            ]
        )
    print()
    table(
        "round trips: fab vs Capistrano vs the OpenSSH floor",
        ["", "fab", "cap", "cap/fab", "ssh floor", "fab/floor"],
        ratios,
    )
    if fab_h is not None:
        print(
            f"targets (issue 15): hotfix <= {TARGETS['hotfix']} RTs: {fab_h:.1f} "
            f"({'ok' if fab_h <= TARGETS['hotfix'] else 'MISSED'})",
            end="",
        )
        roll = slopes.get("roll: overhead per host")
        if roll:
            print(
                f"; roll <= {TARGETS['roll_handoff']} RTs per hand-off: {roll['round_trips']:.1f} "
                f"({'ok' if roll['round_trips'] <= TARGETS['roll_handoff'] else 'MISSED'})",
                end="",
            )
        print()

    lo, hi = pts[0], pts[-1]
    cols = [f"s @{p['rtt'] * 1000:g}" for p in pts]
    for what in ("hotfix", "rollback"):
        key = f"{what}_phases"
        rt = per_phase_slopes(pts, key)
        res[f"{what}_round_trips_by_phase"] = rt
        print()
        table(
            f"where each round trip of fab deploy.{what} goes (the {st} traced run at each RTT; RTs = "
            "least-squares slope)",
            ["phase", *cols, "RTs"],
            [[k, *[f"{p[key][k]:.2f}" for p in pts], f"{v:.1f}"] for k, v in rt.items()],
        )
    if all("roll" in p for p in pts):
        labels = {
            "detect": "detect: host's sshd up -> fab has seen the new boot id",
            "verify": "verify: -> host done (boot record, health check)",
            "next": "next: -> reboot sent to the next host (connect, status)",
            "shutdown": "shutdown: reboot cmd -> host down",
            "delay_excess": "down beyond R (sandbox)",
            "boot": "boot (floor)",
        }
        segs = [{"rtt": p["rtt"], "s": p["roll"]["segments_mean"]} for p in pts]
        rt = per_phase_slopes(segs, "s")
        rows = [
            [v, *[f"{p['s'][k]:.2f}" for p in segs], f"{rt[k]:.1f}"]
            for k, v in labels.items()
            if k in rt
        ]
        rt_sum = sum(rt[k] for k in ("detect", "verify", "next", "shutdown") if k in rt)
        rows.append(
            ["hand-off (detect + verify + next + shutdown)", *["" for _ in segs], f"{rt_sum:.1f}"]
        )
        res["roll_round_trips_by_segment"] = rt
        print()
        table(
            "where each round trip of a roll hand-off goes (mean s per host at each RTT; RTs = slope)",
            ["segment", *cols, "RTs"],
            rows,
        )
    del lo, hi


if __name__ == "__main__":
    sys.exit(main())
