"""Benchmark `fab deploy.hotfix` / `fab deploy.rollback` against Capistrano 3 on a sandbox fleet.

    .venv/bin/python bench/bench_hotfix.py                 # everything (~3-4 min on 2 cores)
    .venv/bin/python bench/bench_hotfix.py --no-cap        # fabdeploy only
    .venv/bin/python bench/bench_hotfix.py --scale 1,5,20  # smaller scaling sweep (no 50-host fleet)

One sandbox fleet (real sshd per host in namespaces + moto S3) of max(--hosts, --scale)
hosts is brought up on a free subnet in 127.0.50-59 and always brought down.

1. fab vs cap on --hosts hosts (default 20). fabdeploy: `fab deploy.setup`, one warm-up
   hotfix; then per run a NEW commit is bundled (untimed: "the bundle is already in S3")
   and `fab deploy.hotfix` (timed) activates it on every host, then `fab deploy.rollback`
   (timed). Capistrano 3 (Debian's, `cap production deploy` / `deploy:rollback`, config in
   bench/cap/): git SCM from a local bare clone of the same app (the same commit is pushed),
   same hosts, same layout, deploy_to /srv/capshop (fabdeploy uses /srv/shop), same
   linked_files/linked_dirs with shared/config/database.yml created first; one warm-up deploy
   (the first one clones the repo on every host), then per run a NEW commit is pushed and
   deployed, then rolled back. For parity with hotfix's restart, cap runs
   `systemctl restart capshop` (a unit for the same sample app on port 8081) after publishing;
   cap does no health check (fabdeploy does). Ratios are cap / fab from this run.
2. Scaling: hotfix (new commit each) on 1, 5, 20, 50 hosts (a deploy.yml listing only the
   first N hosts, so it is a whole-fleet hotfix each time: lock + publish included), with
   the default parallel (10) and with --parallel=N.
3. Profile: one traced hotfix/rollback (bench/_trace.py wraps fabfile functions at run time:
   no source change) split into controller start-up, S3/bundle work, per-host SSH connect,
   node program start-up, download, extract, restart & co, health check, publish, exit;
   plus host-side micro costs (python start-up, node.py version/status, systemctl restart).

net-ssh (Capistrano's SSH) needs the `x25519` gem for curve25519 key exchange; Debian does
not package it, and the sandbox's sshd only offers curve25519. So the bench appends
ecdh-sha2-nistp256 to each sandbox host's generated sshd_config and HUPs its sshd (paramiko
keeps negotiating curve25519: it prefers it). Results: bench/results/bench_hotfix.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH, Fleet, fleet, free_subnet, machine, stats, table, write_results  # noqa: E402

CAP_DIR = BENCH / "cap"
CAP_DEPLOY_TO = "/srv/capshop"
CAP_PORT = 8081
TARGET = 20.0


# --- Capistrano ------------------------------------------------------------------------------


class Cap:
    def __init__(self, f: Fleet, hosts: list[str], work: Path) -> None:
        self.f = f
        self.hosts = hosts
        self.bare = work / "app.git"
        subprocess.run(
            ["git", "clone", "-q", "--bare", str(f.sb.app_repo), str(self.bare)], check=True
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SSH_", "CAP_"))}
        self.env.update(
            HOME=str(f.home),
            CAP_REPO_URL=f"file://{self.bare}",
            CAP_SSH_CONFIG=str(f.sb.ssh_config),
            CAP_SSH_KEY=str(f.sb.key),
            CAP_KNOWN_HOSTS=str(f.sb.known_hosts),
            CAP_HOSTS=",".join(hosts),
            CAP_DEPLOY_TO=CAP_DEPLOY_TO,
            CAP_RESTART="systemctl restart capshop",
            CAP_FORMAT="dot",
        )

    def prepare_hosts(self) -> None:
        # 1) let net-ssh in: add a kex it implements without the x25519 gem, reload sshd.
        for h in self.hosts:
            cfg = self.f.sb.dir / "hosts" / h / "sshd_config"
            text = cfg.read_text()
            if "ecdh-sha2-nistp256" not in text:
                cfg.write_text(
                    text.replace(
                        "curve25519-sha256@libssh.org\n",
                        "curve25519-sha256@libssh.org,ecdh-sha2-nistp256\n",
                    )
                )
        self.f.ssh_all(self.hosts, lambda h: "kill -HUP $(cat /run/sshd.pid)")
        time.sleep(0.3)  # sshd re-execs on HUP
        # 2) shared/config/database.yml (deploy:check:linked_files needs it) and a unit for the app.
        ips = self.f.sb.hosts

        def prep(h: str) -> str:
            unit = (
                f"[Unit]\\nDescription=capshop sample app (bench)\\n\\n[Service]\\nType=simple\\n"
                f"WorkingDirectory={CAP_DEPLOY_TO}/current\\n"
                f"ExecStart=/usr/bin/python3 {CAP_DEPLOY_TO}/current/app.py --bind {ips[h]} "
                f"--port {CAP_PORT}\\n"
            )
            return (
                f"mkdir -p {CAP_DEPLOY_TO}/shared/config && "
                f"cp /srv/shop/shared/config/database.yml {CAP_DEPLOY_TO}/shared/config/ && "
                f"printf '{unit}' > /etc/systemd/system/capshop.service"
            )

        self.f.ssh_all(self.hosts, prep)

    def push(self) -> None:
        subprocess.run(
            ["git", "-C", str(self.f.sb.app_repo), "push", "-q", str(self.bare), "HEAD:main"],
            check=True,
            capture_output=True,
        )

    def run(self, *task: str) -> float:
        t = time.perf_counter()
        r = subprocess.run(
            ["cap", "production", *task],
            cwd=CAP_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(
                f"cap {' '.join(task)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            )
        return wall

    def version(self, host: str) -> str:
        import urllib.request

        with urllib.request.urlopen(
            f"http://{self.f.sb.hosts[host]}:{CAP_PORT}/version", timeout=5
        ) as r:
            return r.read().decode().strip()


# --- profile ---------------------------------------------------------------------------------


def _spans(trace: dict, label: str, **match: Any) -> list[dict]:
    return [
        s
        for s in trace["spans"]
        if s["label"] == label and all(s.get(k) == v for k, v in match.items())
    ]


def breakdown(trace: dict, kind: str) -> dict[str, Any]:
    """Split one traced hotfix/rollback into phases (seconds)."""
    m = trace["milestones"]
    t0 = m["spawn"]
    body = _spans(trace, "task_body")[0]
    pool = _spans(trace, "run_parallel")[0]
    runs = _spans(trace, "ssh_run", kind=kind)
    connects = {s["host"]: s["end"] - s["start"] for s in _spans(trace, "ssh_connect")}
    connect_spans = {s["host"]: s for s in _spans(trace, "ssh_connect")}
    health = {}
    for s in _spans(trace, "health"):
        health.setdefault(s["thread"], []).append(s)
    per_host = []
    for r in runs:
        # The connect counts inside the command only where it happened there: hotfix opens
        # its connections ahead, while it takes the lock (adapters/ssh.py Preconnect).
        c = connect_spans.get(r["host"])
        inside = max(0.0, min(c["end"], r["end"]) - max(c["start"], r["start"])) if c else 0.0
        exec_s = (r["end"] - r["start"]) - inside
        ns = r.get("node_seconds") or {}
        hs = [s for s in health.get(r["thread"], []) if s["start"] >= r["end"]]
        h = min(hs, key=lambda s: s["start"]) if hs else None
        row = {
            "host": r["host"],
            "queued": r["start"] - pool["start"],
            "connect": connects.get(r["host"], 0.0),
            "node_exec": exec_s,
            "health": (h["end"] - h["start"]) if h else 0.0,
        }
        if ns:
            row.update(
                node_total=ns.get("total", 0.0),
                download=ns.get("download", 0.0),
                extract=ns.get("extract", 0.0),
            )
            row["node_health"] = ns.get("health", 0.0)
            row["node_other"] = (
                row["node_total"] - row["download"] - row["extract"] - row["node_health"]
            )
            row["node_startup"] = exec_s - row["node_total"]
        per_host.append(row)
    s3 = {}
    for s in trace["spans"]:
        if s["label"].startswith("s3.") or s["label"] in ("ensure_bundle", "publish_bundle"):
            s3[s["label"]] = s3.get(s["label"], 0.0) + s["end"] - s["start"]
    phases = {
        "controller_startup": body["start"] - t0,
        "fabfile_import": m.get("fabfile_import_s", 0.0),
        "before_pool": pool["start"] - body["start"],
        "pool": pool["end"] - pool["start"],
        "after_pool": body["end"] - pool["end"],
        "exit": m["returned"] - body["end"],
        "total": m["returned"] - t0,
    }
    keys = [
        k
        for k in (
            "queued",
            "connect",
            "node_exec",
            "node_startup",
            "download",
            "extract",
            "node_health",
            "node_other",
            "node_total",
            "health",
        )
        if any(k in r for r in per_host)
    ]
    host_stats = {k: stats([r[k] for r in per_host if k in r]) for k in keys}
    return {"phases": phases, "s3_and_bundle": s3, "per_host": host_stats, "hosts": per_host}


def host_micro(f: Fleet, host: str) -> dict[str, float]:
    """Host-side costs, best of 3, measured on the host itself (seconds)."""
    script = r"""
import json, os, subprocess, time
D = "/usr/local/lib/fabdeploy/shop"
def t(cmd, n=3):
    best = 9.0
    for _ in range(n):
        s = time.perf_counter(); subprocess.run(cmd, capture_output=True); best = min(best, time.perf_counter() - s)
    return best
out = {
  "python3 -c pass": t(["python3", "-c", "pass"]),
  "python3 -c 'import argparse,tarfile,urllib.request'": t(["python3", "-c", "import argparse,tarfile,urllib.request,hashlib"]),
  "node.py version (1500-line script, compiled every run)": t(["python3", D + "/node.py", "version"]),
  "node.py status": t(["python3", D + "/node.py", "--config", D + "/node.json", "status"]),
  "systemctl restart shop (sandbox stand-in)": t(["systemctl", "restart", "shop"]),
  "python3 -c 'import boto3' (boot unit only)": t(["python3", "-c", "import boto3"], 1),
}
print(json.dumps(out))
"""
    import json

    return json.loads(f.ssh(host, f"python3 - <<'EOF'\n{script}\nEOF").strip().splitlines()[-1])


def controller_micro(f: Fleet) -> dict[str, float]:
    def best(cmd: list[str], n: int = 3) -> float:
        b = 9.0
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env=f.env(), cwd=str(BENCH.parent))
            b = min(b, time.perf_counter() - t)
        return b

    py = sys.executable
    return {
        "python -c pass": best([py, "-c", "pass"]),
        "fab --list": best([str(Path(py).parent / "fab"), "--list"]),
        "python -c 'import boto3'": best([py, "-c", "import boto3"]),
        "python -c 'import fabric'": best([py, "-c", "import fabric"]),
        "ssh hostname (OpenSSH, connect+auth+exec)": best(
            ["ssh", "-F", str(f.sb.ssh_config), f.names[0], "true"]
        ),
    }


# --- main ----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hosts", type=int, default=20, help="hosts for the fab-vs-cap comparison")
    ap.add_argument(
        "--scale", default="1,5,20,50", help="host counts for the scaling sweep ('' = skip)"
    )
    ap.add_argument(
        "--runs", type=int, default=3, help="timed runs per measurement (median reported)"
    )
    ap.add_argument("--no-cap", action="store_true", help="skip Capistrano")
    ap.add_argument("--subnet", default=None, help="127.0.5X (default: first free in 127.0.50-59)")
    args = ap.parse_args()

    scale = [int(x) for x in args.scale.split(",") if x.strip()]
    n_hosts = max([args.hosts, *scale])
    use_cap = not args.no_cap and shutil.which("cap") is not None
    if not args.no_cap and not use_cap:
        print(
            "note: `cap` not found (apt-get install -y capistrano); skipping Capistrano",
            file=sys.stderr,
        )
    runs = max(1, args.runs)
    work = Path(tempfile.mkdtemp(prefix="fabdeploy-bench-hotfix-"))
    subnet = free_subnet(args.subnet)
    res: dict[str, Any] = {
        "machine": machine(),
        "hosts": args.hosts,
        "runs": runs,
        "subnet": subnet,
    }
    started = time.monotonic()
    n_commit = 0

    def new_commit(f: Fleet) -> str:
        nonlocal n_commit
        n_commit += 1
        return f.commit(f"bench {n_commit}")

    try:
        with fleet(work, n_hosts, subnet) as f:
            res["sandbox_up_s"] = f.up_seconds
            print(f"sandbox: {n_hosts} hosts on {subnet}.x up in {f.up_seconds:.1f}s", flush=True)
            cmp_hosts = f.names[: args.hosts]
            cfg_cmp = f.variant(f"n{args.hosts}", hosts=cmp_hosts)
            t, _ = f.fab("deploy.setup")
            res["setup_s"] = t
            t, _ = f.fab(
                "deploy.hotfix"
            )  # warm-up on the whole sandbox (every host gets a release)
            res["warmup_hotfix_s"] = t
            print(f"setup {res['setup_s']:.1f}s, warm-up hotfix {t:.1f}s", flush=True)

            # --- 1. fab hotfix / rollback on the comparison hosts. Every timed run goes through
            # bench/_trace.py (probes cost microseconds), so an outlier can be explained.
            runs_by: dict[str, list[dict[str, Any]]] = {}

            def timed(key: str, kind: str, *fab_args: str, config: Path) -> float:
                i = len(runs_by.setdefault(key, []))
                wall, tr, r = f.fab_traced(work / f"trace-{key}-{i}.json", *fab_args, config=config)
                assert f"{args.hosts} ok, 0 failed" in r.stdout, r.stdout
                b = breakdown(tr, kind)
                b.update(wall=wall, cpu_busy_s=tr["cpu_busy_s"], loadavg_1m=tr["loadavg_1m"])
                runs_by[key].append(b)
                return wall

            fab_hot, fab_rb, fab_bundle = [], [], []
            for _ in range(runs):
                new_commit(f)
                fab_bundle.append(f.fab("deploy.bundle", config=cfg_cmp)[0])
                fab_hot.append(timed("hotfix", "activate", "deploy.hotfix", config=cfg_cmp))
                fab_rb.append(timed("rollback", "rollback", "deploy.rollback", config=cfg_cmp))
            res["fab"] = {
                "hotfix": stats(fab_hot),
                "rollback": stats(fab_rb),
                "bundle_new_commit": stats(fab_bundle),
            }
            print(
                f"fab hotfix {statistics.median(fab_hot):.2f}s, rollback {statistics.median(fab_rb):.2f}s",
                flush=True,
            )

            # --- profile: the median run of each, plus --parallel=N
            prof: dict[str, Any] = {}
            for _ in range(runs):
                new_commit(f)
                f.fab("deploy.bundle", config=cfg_cmp)
                timed(
                    f"hotfix_parallel_{args.hosts}",
                    "activate",
                    "deploy.hotfix",
                    f"--parallel={args.hosts}",
                    config=cfg_cmp,
                )
            for key, rs in runs_by.items():
                ordered = sorted(rs, key=lambda b: b["wall"])
                prof[key] = ordered[len(ordered) // 2]
                fastest = ordered[0]["wall"]
                prof[key]["outliers"] = [
                    {
                        "wall": b["wall"],
                        "phases": b["phases"],
                        "loadavg_1m": b["loadavg_1m"],
                        "slowest_host": max(
                            b["hosts"],
                            key=lambda h: (
                                h.get("queued", 0)
                                + h.get("connect", 0)
                                + h.get("node_exec", 0)
                                + h.get("health", 0)
                            ),
                        ),
                    }
                    for b in rs
                    if b["wall"] > 1.4 * fastest
                ]
                prof[key]["all_walls"] = [b["wall"] for b in rs]
            res["fab"]["hotfix_parallel_n"] = stats(
                [b["wall"] for b in runs_by[f"hotfix_parallel_{args.hosts}"]]
            )
            prof["host_micro"] = host_micro(f, f.names[0])
            prof["controller_micro"] = controller_micro(f)
            # What-if, config only: poll the health URL every 20 ms instead of 200 ms.
            cfg_fast = f.variant(
                f"n{args.hosts}-fasthealth", hosts=cmp_hosts, health={"interval": 0.02}
            )
            fast = []
            for _ in range(runs):
                new_commit(f)
                f.fab("deploy.bundle", config=cfg_fast)
                fast.append(f.fab("deploy.hotfix", config=cfg_fast)[0])
            prof["what_if_health_interval_0.02"] = stats(fast)
            res["profile"] = prof

            # --- Capistrano on the same hosts
            if use_cap:
                cap = Cap(f, cmp_hosts, work)
                cap.prepare_hosts()
                cap.push()
                res["cap_warmup_deploy_s"] = cap.run("deploy")  # first deploy clones the repo
                cap_dep, cap_rb = [], []
                for _ in range(runs):
                    sha = new_commit(f)
                    cap.push()
                    cap_dep.append(cap.run("deploy"))
                    assert cap.version(cmp_hosts[-1]) == sha, (
                        "cap deploy did not restart on the new commit"
                    )
                    cap_rb.append(cap.run("deploy:rollback"))
                res["cap"] = {
                    "deploy": stats(cap_dep),
                    "rollback": stats(cap_rb),
                    "restart": "systemctl restart capshop after deploy:publishing (both tasks)",
                    "kex": "ecdh-sha2-nistp256 (net-ssh lacks x25519 on Debian)",
                }
                print(
                    f"cap deploy {statistics.median(cap_dep):.2f}s, rollback {statistics.median(cap_rb):.2f}s",
                    flush=True,
                )

            # --- 2. scaling sweep
            sweep = []
            for n in scale:
                cfg_n = f.variant(f"n{n}", hosts=f.names[:n])
                for par in sorted({min(10, n), n}):
                    times = []
                    for _ in range(runs):
                        new_commit(f)
                        f.fab("deploy.bundle", config=cfg_n)
                        t, r = f.fab("deploy.hotfix", f"--parallel={par}", config=cfg_n)
                        assert f"{n} ok, 0 failed" in r.stdout, r.stdout
                        times.append(t)
                    sweep.append({"hosts": n, "parallel": par, **stats(times)})
                    print(
                        f"scale: {n} hosts, parallel {par}: {statistics.median(times):.2f}s",
                        flush=True,
                    )
            res["scaling"] = sweep
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["bench_seconds"] = time.monotonic() - started
    report(res)
    p = write_results("bench_hotfix", res)
    print(f"\nresults: {p} (bench took {res['bench_seconds']:.0f}s)")
    return 0


def report(res: dict[str, Any]) -> None:
    n = res["hosts"]
    fab, cap = res["fab"], res.get("cap")
    print()
    rows = [
        [
            "fab deploy.bundle (new commit; not in the ratio)",
            f"{fab['bundle_new_commit']['median']:.2f}",
            "",
            "",
            "",
        ]
    ]
    ratios = {}
    for what, fk, ck in (
        ("hotfix / deploy", "hotfix", "deploy"),
        ("rollback", "rollback", "rollback"),
    ):
        f_s = fab[fk]["median"]
        if cap:
            c_s = cap[ck]["median"]
            ratio = c_s / f_s
            ratios[fk] = ratio
            rows.append(
                [
                    what,
                    f"{f_s:.2f}",
                    f"{c_s:.2f}",
                    f"{ratio:.1f}x",
                    "ok" if ratio >= TARGET else "MISSED",
                ]
            )
        else:
            rows.append([what, f"{f_s:.2f}", "-", "-", "-"])
    res["ratios_cap_over_fab"] = ratios
    table(
        f"fab vs Capistrano 3 on {n} hosts (median of {res['runs']} runs, seconds)",
        ["", "fab", "cap", "cap/fab", f">= {TARGET:.0f}x"],
        rows,
    )

    sweep = res.get("scaling") or []
    if sweep:
        print()
        base = {s["parallel"]: s["median"] for s in sweep if s["hosts"] == 1}
        b1 = base.get(10) or next(iter(base.values()), None)
        rows = []
        for s in sweep:
            rows.append(
                [
                    s["hosts"],
                    s["parallel"],
                    f"{s['median']:.2f}",
                    f"{s['median'] / b1:.2f}x" if b1 else "-",
                    f"{(s['median'] - b1) / max(1, s['hosts'] - 1) * 1000:.0f}"
                    if b1 and s["hosts"] > 1
                    else "-",
                ]
            )
        table(
            "hotfix scaling (median seconds; growth vs 1 host; marginal ms per extra host)",
            ["hosts", "parallel", "seconds", "vs 1 host", "ms/extra host"],
            rows,
        )

    prof = res.get("profile")
    if prof:
        for key in [k for k in prof if k.startswith(("hotfix", "rollback"))]:
            b = prof[key]
            print()
            ph = b["phases"]
            rows = [[k, f"{v:.3f}"] for k, v in ph.items()]
            rows += [[f"  {k}", f"{v:.3f}"] for k, v in sorted(b["s3_and_bundle"].items())]
            table(
                f"profile: {key} on {n} hosts (median run of {len(b.get('all_walls', [1]))}; seconds; "
                f"machine busy CPU {b.get('cpu_busy_s', 0):.1f}s, load {b.get('loadavg_1m', 0):.1f})",
                ["phase", "s"],
                rows,
            )
            rows = [
                [k, f"{v['mean']:.3f}", f"{v['median']:.3f}", f"{v['max']:.3f}"]
                for k, v in b["per_host"].items()
            ]
            table(
                "  per host (node_exec = ssh exec incl. node start-up; node_* = node program's own JSON)",
                ["per host", "mean", "median", "max"],
                rows,
            )
            for o in b.get("outliers", []):
                sh = {
                    k: round(v, 2) if isinstance(v, float) else v
                    for k, v in o["slowest_host"].items()
                }
                print(
                    f"  outlier run {o['wall']:.2f}s (load {o['loadavg_1m']:.1f}): pool "
                    f"{o['phases']['pool']:.2f}s; slowest host {sh}"
                )
        print()
        rows = [[k, f"{v * 1000:.0f}"] for k, v in prof["host_micro"].items()]
        rows += [
            [f"controller: {k}", f"{v * 1000:.0f}"] for k, v in prof["controller_micro"].items()
        ]
        w = prof.get("what_if_health_interval_0.02")
        if w:
            rows.append(
                [
                    f"what-if: hotfix {n} hosts with health.interval 0.02 (median)",
                    f"{w['median'] * 1000:.0f}",
                ]
            )
        table("micro costs (ms, best of 3)", ["", "ms"], rows)


if __name__ == "__main__":
    sys.exit(main())
