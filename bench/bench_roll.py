"""Benchmark `fab deploy.roll` overhead against the reboot floor on a sandbox fleet.

    .venv/bin/python bench/bench_roll.py                    # 20 hosts, R = 1 s (~2 min)
    .venv/bin/python bench/bench_roll.py --hosts 10 --reboot-delay 0.5 --no-reference

A 20-host sandbox (real sshd per host in namespaces, real reboots, moto S3) on a free subnet
in 127.0.50-59 is brought up and always brought down. `fab deploy.setup` and a warm-up
hotfix first (every host runs a release), then each roll gets a NEW commit, so every host
really activates a new release at boot:

1. `fab deploy.roll` (batch 1) vs the floor = sum over hosts of (R + that host's boot time),
   boot time = sshd_ready - boot_start from DIR/hosts/webK/boots.jsonl. Target: overhead
   <= 0.3 s per host.
2. `fab deploy.roll --batch=5` vs 4 x the single-host floor (mean R + boot time from run 1)
   and vs the sum over batches of the slowest host's (R + boot time).
3. Where the overhead goes, per host hand-off (from a traced run, bench/_trace.py: fabfile
   functions wrapped at run time, no source change, microseconds per call):
     detect   previous host's sshd_ready -> fab has seen its new boot id (poll interval +
              one fresh SSH connection + `node.py status` per poll)
     verify   -> previous host done (boot-record check, health check)
     next     -> the reboot command is sent to the next host (new connection + `node.py status`)
     shutdown reboot command sent -> host fully down (down_at): the sandbox's own 0.25 s grace
              for the ssh session + stopping its processes
     delay+   (boot_start - down_at) - R: the sandbox's down-loop granularity
   plus start-up (spawn -> first reboot command) and tail (last sshd_ready -> fab exits).
4. A reference controller (OpenSSH + a TCP banner probe every 10 ms, no Python on the host
   before the reboot), same fleet, same publish-then-reboot order: how low the overhead can
   go on this sandbox. Skip it with --no-reference.

Results: bench/results/bench_roll.json.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Fleet, fleet, free_subnet, machine, stats, table, write_results  # noqa: E402

TARGET_PER_HOST = 0.3


def new_boots(f: Fleet, before: dict[str, int]) -> dict[str, dict[str, Any]]:
    out = {}
    for h, n in before.items():
        b = f.boots(h)[n:]
        if len(b) != 1:
            raise SystemExit(f"{h}: expected exactly one new boot, got {len(b)}")
        out[h] = b[0]
    return out


def floor_of(boots: dict[str, dict[str, Any]], r: float) -> dict[str, float]:
    """R + the host's own reboot time, read from the host: its shutdown (reboot requested →
    everything stopped) and its boot (boot start → sshd ready)."""

    def own(b: dict[str, Any]) -> float:
        shutdown = b["down_at"] - b["reboot_requested_at"] if b.get("reboot_requested_at") else 0.0
        return shutdown + (b["sshd_ready"] - b["boot_start"])

    return {h: r + own(b) for h, b in boots.items()}


def _spans(trace: dict, label: str, **match: Any) -> list[dict]:
    return sorted(
        (
            s
            for s in trace["spans"]
            if s["label"] == label and all(s.get(k) == v for k, v in match.items())
        ),
        key=lambda s: s["start"],
    )


def handoffs(
    trace: dict, boots: dict[str, dict[str, Any]], order: list[str], r: float
) -> dict[str, Any]:
    """Split a batch-1 roll's wall time into per-host segments (all wall-clock seconds)."""
    m = trace["milestones"]
    t0, end = m["spawn"], m["returned"]
    reboot_cmd = {s["host"]: s["start"] for s in _spans(trace, "ssh_run", kind="reboot")}
    host_span = {s["host"]: s for s in _spans(trace, "roll_host")}
    polls = {h: _spans(trace, "roll_status_poll", host=h) for h in order}
    seg: dict[str, list[float]] = {
        k: [] for k in ("detect", "verify", "next", "shutdown", "delay_excess", "boot")
    }
    for i, h in enumerate(order):
        b = boots[h]
        seg["shutdown"].append(b["down_at"] - reboot_cmd[h])
        seg["delay_excess"].append(b["boot_start"] - b["down_at"] - r)
        seg["boot"].append(b["sshd_ready"] - b["boot_start"])
        seen = [p for p in polls[h] if p["up"] and p["end"] > b["sshd_ready"]]
        detected = seen[0]["end"] if seen else host_span[h]["end"]
        seg["detect"].append(detected - b["sshd_ready"])
        seg["verify"].append(host_span[h]["end"] - detected)
        if i + 1 < len(order):
            seg["next"].append(reboot_cmd[order[i + 1]] - host_span[h]["end"])
    # The `next` hand-off of each host, split: connect, node.py status, reboot command.
    detail = []
    for h in order[1:]:
        hs = host_span[h]
        inside = [
            x
            for x in trace["spans"]
            if x.get("host") == h and hs["start"] <= x["start"] <= reboot_cmd[h]
        ]
        conn = [x["end"] - x["start"] for x in inside if x["label"] == "ssh_connect"]
        st = [
            x["end"] - x["start"]
            for x in inside
            if x["label"] == "ssh_run" and x.get("kind") == "status"
        ]
        detail.append(
            {
                "host": h,
                "next": reboot_cmd[h] - host_span[order[order.index(h) - 1]]["end"],
                "connect": sum(conn),
                "status_run_incl_connect": sum(st),
            }
        )
    n_polls = sum(len(p) for p in polls.values())
    poll_up = [p["end"] - p["start"] for ps in polls.values() for p in ps if p["up"]]
    startup = reboot_cmd[order[0]] - t0
    tail = end - host_span[order[-1]]["end"]
    total = startup + tail + sum(sum(v) for v in seg.values())
    phases = {
        "startup (spawn -> 1st reboot cmd)": startup,
        "tail (last host verified -> exit)": tail,
    }
    return {
        "segments_sum": {k: sum(v) for k, v in seg.items()},
        "segments_mean": {k: statistics.fmean(v) for k, v in seg.items() if v},
        "segments_median": {k: statistics.median(v) for k, v in seg.items() if v},
        "segments_per_host": seg,
        "next_detail": detail,
        "phases": phases,
        "accounted": total,
        "wall": end - t0,
        "status_polls": n_polls,
        "status_poll_when_up_mean": statistics.fmean(poll_up) if poll_up else 0.0,
        "ssh_connects": len(_spans(trace, "ssh_connect")),
        "ssh_connect_mean": statistics.fmean(
            [s["end"] - s["start"] for s in _spans(trace, "ssh_connect")] or [0.0]
        ),
        "health_mean": statistics.fmean(
            [s["end"] - s["start"] for s in _spans(trace, "health")] or [0.0]
        ),
    }


def batch_phases(
    trace: dict, boots: dict[str, dict[str, Any]], groups: list[list[str]]
) -> list[dict[str, float]]:
    """Per batch: lead (prev batch done -> first reboot cmd), reboot -> every host's sshd up,
    detect+verify (last sshd_ready -> batch done)."""
    m = trace["milestones"]
    reboot_cmd = {s["host"]: s["start"] for s in _spans(trace, "ssh_run", kind="reboot")}
    host_end = {s["host"]: s["end"] for s in _spans(trace, "roll_host")}
    out, prev = [], None
    for g in groups:
        first = min(reboot_cmd[h] for h in g)
        up = max(boots[h]["sshd_ready"] for h in g)
        done = max(host_end[h] for h in g)
        out.append(
            {
                "lead": first - (prev if prev is not None else m["spawn"]),
                "reboot_to_all_up": up - first,
                "detect_verify": done - up,
                "boot_max": max(boots[h]["sshd_ready"] - boots[h]["boot_start"] for h in g),
            }
        )
        prev = done
    return out


# --- reference controller -----------------------------------------------------------------


def _banner(ip: str) -> bool | None:
    """True: sshd answers; False: refused / no banner; None: timeout."""
    try:
        with socket.create_connection((ip, 22), timeout=0.5) as s:
            s.settimeout(0.5)
            ok = s.recv(64).startswith(b"SSH-")
            if ok:
                s.sendall(b"SSH-2.0-bench-probe\r\n")
            return ok
    except TimeoutError:
        return None
    except OSError:
        return False


def reference_roll(f: Fleet, hosts: list[str], commit: str) -> float:
    """Sequential publish-then-reboot with OpenSSH and a 10 ms banner probe; returns wall seconds."""
    ssh = ["ssh", "-F", str(f.sb.ssh_config), "-o", "BatchMode=yes"]
    t = time.perf_counter()
    for h in hosts:
        ip = f.sb.hosts[h]
        old = subprocess.run(
            [*ssh, h, "cat /proc/sys/kernel/random/boot_id; systemctl reboot"],
            capture_output=True,
            text=True,
        ).stdout.split()[0]
        while _banner(ip):  # until it is down
            time.sleep(0.01)
        while not _banner(ip):  # until sshd is back
            time.sleep(0.01)
        out = subprocess.run(
            [*ssh, h, "cat /proc/sys/kernel/random/boot_id /srv/shop/current/REVISION"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if out[0] == old or out[1] != commit:
            raise SystemExit(
                f"reference roll: {h} came back with {out} (old boot {old}, want {commit})"
            )
        with urllib.request.urlopen(f"http://{ip}:8080/health", timeout=5) as resp:
            assert resp.status == 200
    return time.perf_counter() - t


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--reboot-delay", type=float, default=1.0, help="R: seconds a host stays down")
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference controller")
    ap.add_argument("--subnet", default=None, help="127.0.5X (default: first free in 127.0.50-59)")
    args = ap.parse_args()
    R = args.reboot_delay
    work = Path(tempfile.mkdtemp(prefix="fabdeploy-bench-roll-"))
    subnet = free_subnet(args.subnet)
    res: dict[str, Any] = {
        "machine": machine(),
        "hosts": args.hosts,
        "reboot_delay": R,
        "batch": args.batch,
        "subnet": subnet,
    }
    started = time.monotonic()
    try:
        with fleet(work, args.hosts, subnet, reboot_delay=R) as f:
            order = f.names
            print(
                f"sandbox: {args.hosts} hosts on {subnet}.x (R = {R:g}s) up in {f.up_seconds:.1f}s",
                flush=True,
            )
            res["setup_s"] = f.fab("deploy.setup")[0]
            res["warmup_hotfix_s"] = f.fab("deploy.hotfix")[0]

            # --- 1. batch 1, traced
            commit = f.commit("bench roll 1")
            before = {h: len(f.boots(h)) for h in order}
            wall1, tr1, r = f.fab_traced(work / "trace-roll1.json", "deploy.roll", timeout=600)
            assert "not touched" not in r.stdout and "FAILED" not in r.stdout, r.stdout
            boots1 = new_boots(f, before)
            fl1 = floor_of(boots1, R)
            floor1 = sum(fl1.values())
            b1 = handoffs(tr1, boots1, order, R)
            res["batch1"] = {
                "commit": commit,
                "wall": wall1,
                "floor": floor1,
                "overhead": wall1 - floor1,
                "overhead_per_host": (wall1 - floor1) / len(order),
                "boot_time": stats([b["sshd_ready"] - b["boot_start"] for b in boots1.values()]),
                "breakdown": b1,
            }
            print(f"roll batch 1: {wall1:.1f}s vs floor {floor1:.1f}s", flush=True)

            # --- 2. batch N, traced
            commit = f.commit("bench roll 2")
            before = {h: len(f.boots(h)) for h in order}
            wall2, tr2, r = f.fab_traced(
                work / "trace-roll2.json", "deploy.roll", f"--batch={args.batch}", timeout=600
            )
            assert "not touched" not in r.stdout and "FAILED" not in r.stdout, r.stdout
            boots2 = new_boots(f, before)
            fl2 = floor_of(boots2, R)
            groups = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
            floor_batches = sum(max(fl2[h] for h in g) for g in groups)
            single = statistics.fmean(fl1.values())
            floor_nx = len(groups) * single
            res["batchN"] = {
                "commit": commit,
                "batches": len(groups),
                "wall": wall2,
                "floor_n_x_single": floor_nx,
                "floor_sum_of_batch_max": floor_batches,
                "overhead_vs_n_x_single": wall2 - floor_nx,
                "overhead_per_batch": (wall2 - floor_nx) / len(groups),
                "boot_time": stats([b["sshd_ready"] - b["boot_start"] for b in boots2.values()]),
                "per_batch": batch_phases(tr2, boots2, groups),
            }
            print(
                f"roll batch {args.batch}: {wall2:.1f}s vs {len(groups)} x single floor {floor_nx:.1f}s",
                flush=True,
            )

            # --- 3. reference controller (publish, then reboot with OpenSSH + banner probe)
            if not args.no_reference:
                commit = f.commit("bench roll 3")
                t_pub, _ = f.fab("deploy.publish")
                before = {h: len(f.boots(h)) for h in order}
                wall3 = reference_roll(f, order, commit)
                boots3 = new_boots(f, before)
                floor3 = sum(floor_of(boots3, R).values())
                shut = [boots3[h]["down_at"] for h in order]
                res["reference"] = {
                    "wall_reboots": wall3,
                    "publish_s": t_pub,
                    "wall": wall3 + t_pub,
                    "floor": floor3,
                    "overhead": wall3 + t_pub - floor3,
                    "overhead_per_host": (wall3 + t_pub - floor3) / len(order),
                    "n_down_at": len(shut),
                }
                print(f"reference roll: {wall3 + t_pub:.1f}s vs floor {floor3:.1f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["bench_seconds"] = time.monotonic() - started
    report(res)
    p = write_results("bench_roll", res)
    print(f"\nresults: {p} (bench took {res['bench_seconds']:.0f}s)")
    return 0


def report(res: dict[str, Any]) -> None:
    n, R = res["hosts"], res["reboot_delay"]
    a, b = res["batch1"], res["batchN"]
    print()
    rows = [
        [
            f"roll, batch 1 ({n} hosts)",
            f"{a['wall']:.1f}",
            f"{a['floor']:.1f}",
            f"{a['overhead']:.1f}",
            f"{a['overhead_per_host']:.2f} /host",
            "ok" if a["overhead_per_host"] <= TARGET_PER_HOST else "MISSED",
        ],
        [
            f"roll, batch {res['batch']} ({b['batches']} batches) vs {b['batches']} x single floor",
            f"{b['wall']:.1f}",
            f"{b['floor_n_x_single']:.1f}",
            f"{b['overhead_vs_n_x_single']:.1f}",
            f"{b['overhead_per_batch']:.2f} /batch",
            f"{b['wall'] / b['floor_n_x_single']:.2f}x floor",
        ],
        [
            "  same, vs sum of each batch's slowest (R + boot)",
            "",
            f"{b['floor_sum_of_batch_max']:.1f}",
            f"{b['wall'] - b['floor_sum_of_batch_max']:.1f}",
            "",
            "",
        ],
    ]
    ref = res.get("reference")
    if ref:
        rows.append(
            [
                "reference controller, batch 1 (OpenSSH + 10 ms probe)",
                f"{ref['wall']:.1f}",
                f"{ref['floor']:.1f}",
                f"{ref['overhead']:.1f}",
                f"{ref['overhead_per_host']:.2f} /host",
                "",
            ]
        )
    table(
        f"deploy.roll vs the reboot floor (R = {R:g}s; seconds)",
        ["", "wall", "floor", "overhead", "per unit", f"target {TARGET_PER_HOST}s/host"],
        rows,
    )
    print(
        f"boot time per host (sshd_ready - boot_start): batch 1 mean {a['boot_time']['mean']:.2f}s, "
        f"batch {res['batch']} mean {b['boot_time']['mean']:.2f}s (5 hosts booting at once on 2 cores)"
    )
    br = a["breakdown"]
    print()
    rows = [[k, f"{v:.2f}", ""] for k, v in br["phases"].items()]
    labels = {
        "detect": "detect: prev sshd_ready -> fab sees new boot id",
        "verify": "verify: -> prev host done (boot record, health)",
        "next": "next: -> reboot cmd sent (connect + node status)",
        "shutdown": "shutdown: reboot cmd -> down_at (sandbox grace+stop)",
        "delay_excess": "delay+: down time beyond R (sandbox)",
        "boot": "boot: boot_start -> sshd_ready (floor)",
    }
    for k, label in labels.items():
        rows.append([label, f"{br['segments_sum'][k]:.2f}", f"{br['segments_mean'][k] * 1000:.0f}"])
    rows.append(["R x hosts (floor)", f"{R * n:.2f}", f"{R * 1000:.0f}"])
    rows.append(["accounted / wall", f"{br['accounted'] + R * n:.2f} / {br['wall']:.2f}", ""])
    for row in rows:
        k = next((k for k, v in labels.items() if v == row[0]), None)
        row.append(f"{br['segments_median'][k] * 1000:.0f}" if k else "")
    table(
        "where batch-1 roll time goes (traced run)",
        ["segment", "total s", "mean ms/host", "median"],
        rows,
    )
    slow = sorted(br["next_detail"], key=lambda d: -d["next"])[:3]
    print(
        "slowest `next` hand-offs: "
        + "; ".join(
            f"{d['host']} {d['next']:.2f}s (connect {d['connect']:.2f}s, status incl. connect "
            f"{d['status_run_incl_connect']:.2f}s)"
            for d in slow
        )
    )
    rows = [
        [
            i,
            f"{p['lead']:.2f}",
            f"{p['reboot_to_all_up']:.2f}",
            f"{p['boot_max']:.2f}",
            f"{p['detect_verify']:.2f}",
        ]
        for i, p in enumerate(b["per_batch"], 1)
    ]
    print()
    table(
        f"batch {res['batch']} roll, per batch (s): lead = previous batch done (or fab start) -> first reboot cmd",
        ["batch", "lead", "reboot->all sshd up", "slowest boot", "detect+verify"],
        rows,
    )
    print(
        f"status polls: {br['status_polls']} ({br['status_poll_when_up_mean'] * 1000:.0f} ms each when the "
        f"host is up: fresh SSH connection + node.py status); SSH connections opened: {br['ssh_connects']} "
        f"(mean {br['ssh_connect_mean'] * 1000:.0f} ms); health check mean {br['health_mean'] * 1000:.0f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
