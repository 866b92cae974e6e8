"""Benchmark `deploy.bundle` against the plain `git archive | aws s3 cp -` floor.

Rerunnable: generated repositories are cached under /tmp keyed by size, a
private moto server is started on a free port and always stopped. Every ratio
is computed from timings taken in the same run, so machine speed cancels out.

    .venv/bin/python bench/bench_bundle.py            # in-process API via `python -c`
    .venv/bin/python bench/bench_bundle.py --cli      # the real `fab deploy.bundle`
    .venv/bin/python bench/bench_bundle.py --gen-only # just build the cached repos
    .venv/bin/python bench/bench_bundle.py --build    # a bundle with a `build:` step vs
                                                      # the build commands alone + the floor
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("FABDEPLOY_BENCH_CACHE", "/tmp/fabdeploy-bench"))
BUCKET = "fabdeploy-bench"
SEED = 20240601

WORDS = (
    "deploy bundle fleet node release current shared revision commit rollback hotfix "
    "import return class def self value config server request response health check "
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
).split()


# --- fixture repositories ---------------------------------------------------------


def generate_repo(total_mb: int, files: int) -> Path:
    """A committed repo of ~total_mb spread over `files` files; cached by size."""
    dest = CACHE / f"repo-{total_mb}mb-{files}f"
    if (dest / ".git" / "bench-complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    rng = random.Random(SEED + total_mb)
    avg = total_mb * 1024 * 1024 // files
    for i in range(files):
        d = dest / f"pkg{i % 97:02d}" / f"mod{i % 13}"
        d.mkdir(parents=True, exist_ok=True)
        size = max(64, int(rng.expovariate(1 / avg)))
        # Roughly half text (compresses ~4x) and half incompressible bytes, like
        # a real app with sources plus images/wheels.
        if i % 2:
            (d / f"f{i}.bin").write_bytes(rng.randbytes(size))
        else:
            line_words = [rng.choice(WORDS) for _ in range(size // 6 + 1)]
            (d / f"f{i}.py").write_text(" ".join(line_words)[:size])
    env = _git_env()
    subprocess.run(["git", "init", "-q", "-b", "main", str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(dest), "commit", "-q", "-m", "bench"], check=True, env=env)
    (dest / ".git" / "bench-complete").write_text("ok\n")
    return dest


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@example.com",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@example.com",
        GIT_AUTHOR_DATE="2024-01-01T00:00:00Z",
        GIT_COMMITTER_DATE="2024-01-01T00:00:00Z",
    )
    return env


def repo_size_mb(repo: Path) -> float:
    out = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", "HEAD"],
        stdout=subprocess.PIPE,
        check=True,
    ).stdout
    return len(out) / 1e6


# --- a private S3 ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("moto server did not start") from None
                time.sleep(0.05)
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_creds_kwargs()).create_bucket(
            Bucket=BUCKET
        )

    def reset(self) -> None:
        # moto keeps every object in memory; forgetting them keeps later runs honest.
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=30).read()
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_creds_kwargs()).create_bucket(
            Bucket=BUCKET
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _creds_kwargs() -> dict[str, str]:
    return {
        "region_name": "us-east-1",
        "aws_access_key_id": "bench",
        "aws_secret_access_key": "bench",
    }


def bench_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        HOME=str(home),
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


# --- measurements -------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            pass
    return out


def _hwm(pid: int) -> tuple[str, int] | None:
    try:
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if ":" in line
        )
        return fields["Name"].strip(), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def timed(
    cmd: list[str], env: dict[str, str], cwd: Path | None = None
) -> tuple[float, dict[str, int], str]:
    """(wall seconds, peak RSS KiB per process name in the command's tree, stdout).

    Per process, because git's own peak is its mmap of the pack (file-backed,
    grows with the repo, identical in the floor) and would hide ours.
    """
    peaks: dict[str, int] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err)
        while proc.poll() is None:
            for pid in _tree(proc.pid):
                got = _hwm(pid)
                if got:
                    peaks[got[0]] = max(peaks.get(got[0], 0), got[1])
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{stdout}\n{stderr}")
    return wall, peaks, stdout


def python_peak(peaks: dict[str, int]) -> int:
    return max((v for k, v in peaks.items() if k.startswith(("python", "fab"))), default=0)


FLOOR_PY = textwrap.dedent(
    """
    import sys, boto3
    from botocore.config import Config
    c = boto3.client("s3", endpoint_url=sys.argv[1], config=Config(
        request_checksum_calculation="when_required", response_checksum_validation="when_required"))
    c.upload_fileobj(sys.stdin.buffer, sys.argv[2], sys.argv[3])
    """
)


def floor_cmd(repo: Path, endpoint: str, key: str) -> tuple[list[str], str]:
    archive = f"git -C {repo} archive --format=tar.gz HEAD"
    if shutil.which("aws"):
        up = f"aws --endpoint-url {endpoint} s3 cp --only-show-errors - s3://{BUCKET}/{key}"
        label = "git archive --format=tar.gz | aws s3 cp -"
    else:
        up = f"{VENV_BIN}/python -c '{FLOOR_PY}' {endpoint} {BUCKET} {key}"
        label = "git archive --format=tar.gz | python boto3 upload_fileobj (aws CLI not installed)"
    return ["sh", "-c", f"set -e; {archive} | {up}"], label


def write_config(dir: Path, repo: Path, endpoint: str, prefix: str) -> Path:
    dir.mkdir(parents=True, exist_ok=True)
    p = dir / f"{prefix}.yml"
    p.write_text(
        textwrap.dedent(
            f"""\
            app: bench
            repo: {repo}
            ref: HEAD
            s3: {{bucket: {BUCKET}, prefix: {prefix}, region: us-east-1, endpoint_url: "{endpoint}"}}
            deploy_to: /srv/bench
            hosts: [h1]
            """
        )
    )
    return p


API_PY = textwrap.dedent(
    """
    import importlib
    config = importlib.import_module("fabdeploy.basics.config")
    publish = importlib.import_module("fabdeploy.ops.publish")
    publish.bundle_for(config.load())
    """
)


# --- --build: a build step that vendors a wheel (no index) and writes compiled assets --------

ASSETS_PY = (
    "import os, random; r = random.Random(7); os.makedirs('public/assets', exist_ok=True)\n"
    "for i in range(2000):\n"
    "    open(f'public/assets/a{i}.js', 'w').write(' '.join(r.choice(['var','x','=','1;','function']) "
    "for _ in range(800)))"
)


def sample_wheel(work: Path) -> Path:
    src = work / "dep-src"
    (src / "benchdep").mkdir(parents=True)
    for i in range(200):  # a dependency of a few hundred modules, like a real one
        (src / "benchdep" / f"m{i}.py").write_text(
            f"VALUE = {i}\n" + "def f(x):\n    return x\n" * 50
        )
    (src / "benchdep" / "__init__.py").write_text("VERSION = '1.0'\n")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "benchdep"\nversion = "1.0"\n[tool.setuptools]\npackages = ["benchdep"]\n'
    )
    out = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
    )
    return out


def build_commands(wheels: Path) -> list[str]:
    return [
        f"{sys.executable} -m pip install -q --no-index --find-links {wheels} --target vendor benchdep",
        f'{sys.executable} -c "{ASSETS_PY}"',
    ]


def build_alone(repo: Path, commands: list[str], env: dict[str, str], work: Path) -> float:
    """The build commands by themselves, in an already exported tree (export not counted)."""
    d = Path(tempfile.mkdtemp(prefix="alone-", dir=work))
    subprocess.run(
        f"git -C {repo} archive --format=tar HEAD | tar -x -C {d}", shell=True, check=True
    )
    t0 = time.perf_counter()
    for c in commands:
        timed(["sh", "-c", c], env, cwd=d)
    wall = time.perf_counter() - t0
    shutil.rmtree(d, ignore_errors=True)
    return wall


def run_build_bench(args: argparse.Namespace) -> None:
    repo = generate_repo(args.small_mb, args.small_mb * 100)
    work = Path(tempfile.mkdtemp(prefix="fabdeploy-bench-"))
    home = work / "home"
    home.mkdir()
    env = bench_env(home)
    moto = Moto()
    n = 0
    try:
        runs = max(1, args.runs)
        commands = build_commands(sample_wheel(work))
        floors, label = [], ""
        for _ in range(runs):
            n += 1
            cmd, label = floor_cmd(repo, moto.endpoint, f"floor/{n}.tar.gz")
            floors.append(timed(cmd, env)[0])
        floor = min(floors)
        alone = min(build_alone(repo, commands, env, work) for _ in range(runs))
        plain, built, built_shm = [], [], []
        shm = Path("/dev/shm")
        for _ in range(runs):
            n += 1
            cfg = write_config(work, repo, moto.endpoint, f"p{n}")
            plain.append(
                timed(bundle_cmd(args.cli), {**env, "DEPLOY_CONFIG": str(cfg)}, cwd=ROOT)[0]
            )
            cfg = write_config(work, repo, moto.endpoint, f"b{n}")
            with cfg.open("a") as fh:
                fh.write(
                    "build:\n  commands:\n" + "".join(f"    - {json.dumps(c)}\n" for c in commands)
                )
            built.append(
                timed(bundle_cmd(args.cli), {**env, "DEPLOY_CONFIG": str(cfg)}, cwd=ROOT)[0]
            )
            if shm.is_dir():  # the same build with its export on tmpfs (TMPDIR), new prefix
                n += 1
                cfg2 = write_config(work, repo, moto.endpoint, f"t{n}")
                cfg2.write_text(cfg.read_text().replace(f"prefix: b{n - 1}", f"prefix: t{n}"))
                built_shm.append(
                    timed(
                        bundle_cmd(args.cli),
                        {**env, "DEPLOY_CONFIG": str(cfg2), "TMPDIR": str(shm)},
                        cwd=ROOT,
                    )[0]
                )
        rebundle = min(
            timed(bundle_cmd(args.cli), {**env, "DEPLOY_CONFIG": str(cfg)}, cwd=ROOT)[0]
            for _ in range(runs)
        )
        size = repo_size_mb(repo)
        with_build, today = min(built), min(plain)
        budget = alone + floor
        rows = [
            (f"floor: {label} ({size:.0f} MB tar)", f"{floor:.2f} s", "", ""),
            ("build commands alone (pip --target vendor + 2000 assets)", f"{alone:.2f} s", "", ""),
            (
                "bundle, no build step (today's path)",
                f"{today:.2f} s",
                f"{today / floor:.2f}x floor",
                "",
            ),
            (
                "bundle with the build step",
                f"{with_build:.2f} s",
                f"{with_build / budget:.2f}x budget",
                _ok(with_build <= budget),
            ),
            ("  budget = build alone + floor", f"{budget:.2f} s", "", ""),
            *(
                [
                    (
                        "bundle with the build step, TMPDIR=/dev/shm (export on tmpfs)",
                        f"{min(built_shm):.2f} s",
                        f"{min(built_shm) / budget:.2f}x budget",
                        _ok(min(built_shm) <= budget),
                    )
                ]
                if built_shm
                else []
            ),
            ("re-bundle, same commit + recipe", f"{rebundle:.2f} s", "", ""),
        ]
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    w = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{w}}  {'value':>9}  {'ratio':<14} target")
    for name, value, ratio_s, ok in rows:
        print(f"{name:<{w}}  {value:>9}  {ratio_s:<14} {ok}")
    print(f"(best of {args.runs} runs; target: bundle with build <= build commands alone + floor)")


def bundle_cmd(cli: bool) -> list[str]:
    if cli:
        return [str(VENV_BIN / "fab"), "deploy.bundle"]
    return [sys.executable, "-c", API_PY]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cli", action="store_true", help="time the real `fab deploy.bundle` instead of the API"
    )
    ap.add_argument("--big-mb", type=int, default=200)
    ap.add_argument("--small-mb", type=int, default=50)
    ap.add_argument("--runs", type=int, default=2, help="repeats per measurement (best is kept)")
    ap.add_argument("--gen-only", action="store_true")
    ap.add_argument(
        "--build",
        action="store_true",
        help="bundle with a build step vs the build commands alone + the floor (--small-mb repo)",
    )
    args = ap.parse_args()
    if args.build:
        run_build_bench(args)
        return

    big = generate_repo(args.big_mb, args.big_mb * 100)
    small = generate_repo(args.small_mb, args.small_mb * 100)
    if args.gen_only:
        print(big, small)
        return

    work = Path(tempfile.mkdtemp(prefix="fabdeploy-bench-"))
    home = work / "home"
    home.mkdir()
    env = bench_env(home)
    moto = Moto()
    rows: list[tuple[str, str, str, str]] = []
    n = 0
    try:
        runs = max(1, args.runs)
        mode = "fab deploy.bundle" if args.cli else "python -c bundle_for() (use --cli for fab)"

        floors, label = [], ""
        for _ in range(runs):
            n += 1
            cmd, label = floor_cmd(big, moto.endpoint, f"floor/{n}.tar.gz")
            floors.append(timed(cmd, env)[0])
            moto.reset()
        floor = min(floors)

        git_rss: dict[str, int] = {}

        def bundle_run(repo: Path, prefix: str) -> tuple[float, int]:
            cfg = write_config(work, repo, moto.endpoint, prefix)
            wall, peaks, _ = timed(
                bundle_cmd(args.cli), {**env, "DEPLOY_CONFIG": str(cfg)}, cwd=ROOT
            )
            git_rss[repo.name] = max(git_rss.get(repo.name, 0), peaks.get("git", 0))
            return wall, python_peak(peaks)

        firsts = []
        for _ in range(runs):
            n += 1
            firsts.append(bundle_run(big, f"b{n}"))
            if _ < runs - 1:
                moto.reset()
        first, rss_big = min(f[0] for f in firsts), max(f[1] for f in firsts)
        rebundle = min(bundle_run(big, f"b{n}")[0] for _ in range(3))
        moto.reset()
        fab_list = min(timed([str(VENV_BIN / "fab"), "--list"], env, cwd=ROOT)[0] for _ in range(3))
        n += 1
        _, rss_small = bundle_run(small, f"s{n}")

        size_big = repo_size_mb(big)
        size_small = repo_size_mb(small)
        ratio = first / floor
        rows = [
            ("floor: " + label, f"{floor:.2f} s", "", ""),
            (
                f"bundle {size_big:.0f} MB tar ({mode})",
                f"{first:.2f} s",
                f"{ratio:.2f}x floor",
                _ok(ratio <= 1.3),
            ),
            ("re-bundle same commit", f"{rebundle:.2f} s", "", ""),
            (
                "fab --list",
                f"{fab_list:.2f} s",
                f"+{rebundle - fab_list:.2f} s",
                _ok(rebundle - fab_list <= 0.5),
            ),
            (
                f"peak RSS python, bundle {size_small:.0f} MB tar",
                f"{rss_small / 1024:.0f} MB",
                "",
                _ok(rss_small < 150 * 1024),
            ),
            (
                f"peak RSS python, bundle {size_big:.0f} MB tar",
                f"{rss_big / 1024:.0f} MB",
                f"{rss_big / rss_small:.2f}x small",
                _ok(rss_big < 150 * 1024 and rss_big / rss_small < 1.25),
            ),
            (
                f"  (git archive's own peak: {git_rss.get(small.name, 0) / 1024:.0f} MB / "
                f"{git_rss.get(big.name, 0) / 1024:.0f} MB = its pack mmap, same in the floor)",
                "",
                "",
                "",
            ),
        ]
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)

    w = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{w}}  {'value':>9}  {'ratio':<14} target")
    for name, value, ratio_s, ok in rows:
        print(f"{name:<{w}}  {value:>9}  {ratio_s:<14} {ok}")
    print(
        f"(best of {args.runs} runs; targets: bundle <= 1.3x floor, re-bundle <= fab --list + 0.5 s, RSS < 150 MB, flat)"
    )


def _ok(good: bool) -> str:
    return "ok" if good else "MISSED"


if __name__ == "__main__":
    main()
