"""Benchmark node activation of big apps against the `curl <url> | tar xz && sync -f` floor.

Issue 15 §4. Builds synthetic apps locally (2k and 20k files, ~8.5 KB each on average, ~12 a directory, half
compressible text and half random bytes, like sources plus assets), serves their bundles
over HTTP from this process, and times on the same filesystem (all under --dir):

- floor: `curl -s <url> | tar xz -C <dir> && sync -f <dir>`;
- full:  `node.py activate --url <url>` into an empty deploy_to (no previous release);
- one:   `node.py activate` of the same app with ONE file changed, over a deploy_to whose
         current release is the unchanged app (its files can be hardlinked);
- the same two with the node program of --baseline (a git revision; default: the last one
  before the one-pass activation), to show before/after.

Each command runs under `sh -c '...; grep write_bytes /proc/$$/io'`: the shell's write_bytes
includes its reaped children (curl, tar, gzip, sync, python), so "bytes written" is what the
command itself sent to the storage layer (file data it dirtied); the device's sectors written
(/sys/dev/block/M:m/stat) are reported too, but other processes on the machine add to them.
Disk-bound timings are noisy here: the median of --runs (3) interleaved runs is reported.

    .venv/bin/python bench/bench_activation.py                 # 2k and 20k files
    .venv/bin/python bench/bench_activation.py --files 2000 --runs 5
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "fabdeploy" / "node" / "node.py"
BASELINE = "b8e0c10"  # main before the one-pass activation
SEED = 20261129
AVG_SIZE = 8500


def build_app(root: Path, files: int) -> tuple[Path, Path]:
    """Two bundles of a `files`-file app: v1, and v2 with one file changed. Cached."""
    out = root / f"app-{files}-v2"
    v1, v2 = out / "v1.tar.gz", out / "v2.tar.gz"
    if (out / "complete").exists():
        return v1, v2
    shutil.rmtree(out, ignore_errors=True)
    src = out / "src"
    src.mkdir(parents=True)
    rng = random.Random(SEED + files)
    words = b"def class return import self value config request response release node ".split()
    ndirs = max(4, files // 48 * 4)  # ~12 files a directory, as in real apps
    for i in range(files):
        d = src / f"pkg{(i % ndirs) // 4:03d}" / f"mod{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        size = max(32, int(rng.expovariate(1 / AVG_SIZE)))
        if i % 2:
            data = rng.randbytes(size)
        else:
            data = b" ".join(rng.choice(words) for _ in range(size // 6))[:size]
        (d / f"f{i}.{'bin' if i % 2 else 'py'}").write_bytes(data)
    subprocess.run(["tar", "-C", str(src), "-czf", str(v1), "."], check=True)
    changed = src / "pkg000" / "mod0" / "f0.py"
    changed.write_bytes(changed.read_bytes() + b"\n# hotfix\n")
    subprocess.run(["tar", "-C", str(src), "-czf", str(v2), "."], check=True)
    shutil.rmtree(src)
    (out / "complete").touch()
    return v1, v2


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(directory), **kw
    )
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def device_sectors(path: Path) -> int | None:
    st = os.stat(path)
    try:
        fields = Path(
            f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
        ).read_text()
        return int(fields.split()[6])
    except (OSError, IndexError, ValueError):
        return None


def measured(script: str, work: Path) -> dict[str, float]:
    """Run `script` under sh; time it, its (and its children's) write_bytes, disk sectors."""
    os.sync()
    sectors = device_sectors(work)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(
        ["sh", "-c", f"{script}\nrc=$?\ngrep ^write_bytes /proc/$$/io\nexit $rc"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    after_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after_ru.ru_utime - before.ru_utime) + (after_ru.ru_stime - before.ru_stime)
    if r.returncode != 0:
        sys.exit(f"failed: {script}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    written = int(r.stdout.strip().splitlines()[-1].split()[1])
    os.sync()
    after = device_sectors(work)
    disk = (after - sectors) * 512 if sectors is not None and after is not None else float("nan")
    return {"seconds": seconds, "written": written, "disk": disk, "cpu": cpu}


def node_json(path: Path, deploy_to: Path, link: bool) -> Path:
    path.write_text(
        json.dumps(
            {
                "app": "bench",
                "deploy_to": str(deploy_to),
                "keep_releases": 5,
                "s3": {"bucket": "unused"},
                "link_unchanged": link,
            }
        )
    )
    return path


def activate_cmd(python: str, node: Path, config: Path, url: str, sha: str, commit: str) -> str:
    return (
        f"{python} -I {node} --config {config} activate --sha256 {sha} --commit {commit} "
        f"--url {url} >/dev/null 2>&1"
    )


def bench(files: int, runs: int, work: Path, python: str, baseline_node: Path | None) -> dict:
    v1, v2 = build_app(work / "apps", files)
    sha1 = hashlib.sha256(v1.read_bytes()).hexdigest()
    sha2 = hashlib.sha256(v2.read_bytes()).hexdigest()
    server, base = serve(v1.parent)
    url1, url2 = f"{base}/v1.tar.gz", f"{base}/v2.tar.gz"
    nodes = {"now": NODE}
    if baseline_node is not None:
        nodes["before"] = baseline_node
    results: dict[str, list[dict[str, float]]] = {}
    try:
        for _ in range(runs):
            floor_dir = work / "floor"
            shutil.rmtree(floor_dir, ignore_errors=True)
            floor_dir.mkdir()
            results.setdefault("floor", []).append(
                measured(f"curl -s {url1} | tar xz -C {floor_dir} && sync -f {floor_dir}", work)
            )
            shutil.rmtree(floor_dir)
            for label, node in nodes.items():
                deploy_to = work / f"deploy-{label}"
                shutil.rmtree(deploy_to, ignore_errors=True)
                cfg = node_json(work / f"node-{label}.json", deploy_to, True)
                results.setdefault(f"full/{label}", []).append(
                    measured(activate_cmd(python, node, cfg, url1, sha1, "c1"), work)
                )
                results.setdefault(f"one/{label}", []).append(
                    measured(activate_cmd(python, node, cfg, url2, sha2, "c2"), work)
                )
                shutil.rmtree(deploy_to)
            print(
                f"  {files} files, run {len(results['floor'])}: "
                + ", ".join(f"{k} {v[-1]['seconds']:.1f}s" for k, v in results.items()),
                file=sys.stderr,
            )
    finally:
        server.shutdown()
    summary = {
        k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "written", "disk", "cpu")}
        for k, v in results.items()
    }
    summary["bundle"] = {
        "bytes": v1.stat().st_size,
        "files": files,
        "tar_bytes": sum(m.size for m in tarfile.open(v1)),
    }
    return {"summary": summary, "runs": results}


def baseline_node(rev: str, work: Path) -> Path | None:
    try:
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:fabdeploy/node/node.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except subprocess.CalledProcessError:
        return None
    path = work / f"node-{rev}.py"
    path.write_text(text)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", default="2000,20000", help="comma-separated app sizes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--dir",
        default="/var/tmp/fabdeploy-bench-activation",
        help="work dir: bundles, releases and the floor's dir (one filesystem)",
    )
    ap.add_argument("--python", default="/usr/bin/python3", help="the node's interpreter")
    ap.add_argument(
        "--baseline", default=BASELINE, help="git rev of the 'before' node.py; '' for none"
    )
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    before = baseline_node(args.baseline, work) if args.baseline else None
    load = os.getloadavg()[0]
    report = {"load_average": load, "sizes": {}}
    print(
        f"activation of a big app vs `curl | tar xz && sync -f` (median of {args.runs}; "
        f"load {load:.1f})"
    )
    print(
        f"{'files':>6} {'case':<12} {'seconds':>8} {'CPU s':>6} {'MB written':>11} {'disk MB':>8}  ratio"
    )
    for files in (int(f) for f in args.files.split(",")):
        res = bench(files, args.runs, work, args.python, before)
        report["sizes"][files] = res
        s = res["summary"]
        floor, full = s["floor"], s["full/now"]
        for case in [k for k in s if k != "bundle"]:
            row = s[case]
            if case == "floor":
                ratio = ""
            elif case.startswith("full/"):
                ratio = f"time {row['seconds'] / floor['seconds']:.2f}x floor"
            else:
                ref = s[case.replace("one/", "full/")]
                ratio = (
                    f"time {row['seconds'] / ref['seconds']:.0%}, bytes "
                    f"{row['written'] / max(1, ref['written']):.1%}, CPU "
                    f"{row['cpu'] / max(1e-9, ref['cpu']):.0%} of full"
                )
            print(
                f"{files:>6} {case:<12} {row['seconds']:>8.2f} {row['cpu']:>6.2f} "
                f"{row['written'] / 1e6:>11.1f} "
                f"{row['disk'] / 1e6:>8.1f}  {ratio}"
            )
        b = s["bundle"]
        print(
            f"{'':>6} bundle {b['bytes'] / 1e6:.1f} MB gz, {b['tar_bytes'] / 1e6:.1f} MB of file data; "
            f"full/floor {full['seconds'] / floor['seconds']:.2f}x"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "activation.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
