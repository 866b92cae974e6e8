"""Shared helpers for the sandbox benchmarks (bench_hotfix.py, bench_roll.py).

Drives the real `fab` CLI the way tests/e2e/fleet_helpers.py does: DEPLOY_CONFIG +
the sandbox's AWS env + an isolated HOME, never the operator's ~/.ssh or ~/.aws.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
FAB = str(Path(sys.executable).parent / "fab")
TRACE = str(BENCH / "_trace.py")
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "e2e")]

import fleet_helpers  # noqa: E402  (the e2e tests' Fleet: one way to drive a sandbox)

from fabfile import sandbox  # noqa: E402

# Benchmarks own 127.0.50 - 127.0.59 (tests and demos use other ranges).
SUBNETS = [f"127.0.{n}" for n in range(50, 60)]


def free_subnet(preferred: str | None = None) -> str:
    """A subnet in our range whose .1:22 is not listening (another bench run may hold one)."""
    import socket

    for subnet in ([preferred] if preferred else []) + SUBNETS:
        try:
            socket.create_connection((f"{subnet}.1", 22), timeout=0.2).close()
        except OSError:
            return subnet
    raise SystemExit("every bench subnet 127.0.50-59 is busy; bring the other bench sandboxes down")


@contextmanager
def fleet(
    root: Path,
    hosts: int,
    subnet: str,
    reboot_delay: float = 1.0,
    rtt: float = 0.0,
    handshake: bool = True,
):
    """sandbox.up in root/sb, yielded as a Fleet; always sandbox.down at the end.

    rtt > 0: through the sandbox's latency proxy (sandbox.set_rtt changes it later)."""
    root.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    sb = None
    try:
        sb = sandbox.up(
            root / "sb",
            hosts=hosts,
            subnet=subnet,
            s3_port=0,
            reboot_delay=reboot_delay,
            rtt=rtt,
            handshake=handshake,
        )
        home = root / "home"
        home.mkdir(exist_ok=True)
        f = Fleet(sb, home)
        f.up_seconds = time.monotonic() - t
        yield f
    finally:
        try:
            sandbox.down(root / "sb")
        except Exception as e:  # report, but never mask the benchmark's own error
            print(f"warning: sandbox.down({root / 'sb'}) failed: {e}", file=sys.stderr)


class Fleet(fleet_helpers.Fleet):
    """The e2e tests' Fleet, timing each `fab` run and failing the bench (not a test) on errors."""

    def __init__(self, sb: sandbox.Sandbox, home: Path) -> None:
        super().__init__(sb, home)
        self.up_seconds = 0.0

    @property
    def names(self) -> list[str]:
        return list(self.sb.hosts)

    def fab(
        self,
        *args: str,
        config: Path | None = None,
        check: bool = True,  # type: ignore[override]
        timeout: float = 300,
    ) -> tuple[float, subprocess.CompletedProcess[str]]:
        """(wall seconds, result) of one `fab` run."""
        t = time.perf_counter()
        r = super().fab(*args, config=config, check=False, timeout=timeout)
        wall = time.perf_counter() - t
        if check and r.returncode != 0:
            raise SystemExit(
                f"fab {' '.join(args)} exited {r.returncode}\n--- stdout\n{r.stdout}\n"
                f"--- stderr\n{r.stderr}"
            )
        return wall, r

    def fab_traced(
        self, out: Path, *args: str, config: Path | None = None, timeout: float = 300
    ) -> tuple[float, dict[str, Any], subprocess.CompletedProcess[str]]:
        """Like fab(), through bench/_trace.py: (wall, trace, result)."""
        t_spawn = time.time()
        c0 = cpu_busy()
        t = time.perf_counter()
        r = subprocess.run(
            [sys.executable, TRACE, str(out), *args],
            cwd=ROOT,
            env=self.env(config, {"BENCH_T_SPAWN": repr(t_spawn)}),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(
                f"(traced) fab {' '.join(args)} exited {r.returncode}\n--- stdout\n"
                f"{r.stdout}\n--- stderr\n{r.stderr}"
            )
        trace = json.loads(out.read_text())
        trace["milestones"]["returned"] = t_spawn + wall
        trace["cpu_busy_s"] = cpu_busy() - c0
        trace["loadavg_1m"] = os.getloadavg()[0]
        return wall, trace, r

    def ssh(self, host: str, cmd: str, check: bool = True) -> str:
        try:
            return super().ssh(host, cmd, check=check)
        except AssertionError as e:
            raise SystemExit(str(e)) from None

    def ssh_all(self, hosts: list[str], cmd_for) -> None:
        """Run cmd_for(host) on every host, in parallel (OpenSSH client)."""
        procs = [
            (
                h,
                subprocess.Popen(
                    ["ssh", "-F", str(self.sb.ssh_config), "-o", "BatchMode=yes", h, cmd_for(h)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
            for h in hosts
        ]
        for h, p in procs:
            out, err = p.communicate(timeout=60)
            if p.returncode != 0:
                raise SystemExit(f"ssh {h} exited {p.returncode}: {err}")


# --- reporting -----------------------------------------------------------------------------


def stats(xs: list[float]) -> dict[str, float]:
    xs = list(xs)
    if not xs:
        return {}
    return {
        "min": min(xs),
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "max": max(xs),
        "n": len(xs),
    }


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title]
    for j, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return p


def machine() -> dict[str, Any]:
    import platform

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_at_start": os.getloadavg(),
    }


def cpu_busy() -> float:
    """Machine-wide busy CPU seconds so far (all tenants: the sandbox hosts share our cores)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")
