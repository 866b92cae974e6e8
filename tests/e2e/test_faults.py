"""Issue #8: no host is ever left broken. Faults injected on purpose on a sandbox fleet.

Every scenario ends with the same "broken host" check (`problems`), run on every host it
touched:

- `current` is a symlink to an existing releases/<14 digits> dir with a REVISION and no
  `.fabdeploy-pending` marker;
- the app answers /version with that REVISION, *without* a manual restart: when a kill
  interrupted a restart, the rerun of the same command must restart it (node.py keeps a
  restart-pending marker for that), so the check after the rerun is strict;
- after the next successful run there are no releases/.staging-* dirs.

The host's /srv is a bind mount of DIR/hosts/webK/srv, so the layout is read (and watched
for kill points) straight from this machine: no ssh round trip, and it works while a host's
sshd is hung. Scenario functions are plain functions so bench/reliability.py can repeat them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

HOSTS = ("web1", "web2", "web3")
SUBNET = "127.0.70"
RELEASE_RE = re.compile(r"^\d{14}$")
# Small timeouts so a fault costs seconds, not minutes.
FAST = {
    "health": {"timeout": 10},
    "roll": {"reboot_timeout": 30, "boot_timeout": 30},
    "ssh": {"connect_timeout": 3, "command_timeout": 60, "keepalive": 2},
    "node": {
        "boot_attempts": 2,
        "first_boot_attempts": 2,
        "boot_backoff": 0.2,
        "download_timeout": 3,
    },
}


# --- the broken-host check ---------------------------------------------------------------


def srv(fleet: Fleet, host: str) -> Path:
    return sandbox.host_dir(fleet.sb.dir, host) / "srv"


REMOTE_LAYOUT = """
import json, os, sys
b = sys.argv[1]; c = b + "/current"; r = b + "/releases"
t = os.readlink(c) if os.path.islink(c) else None
f = lambda *p: os.path.join(t or "", *p)
print(json.dumps({"names": sorted(os.listdir(r)) if os.path.isdir(r) else [], "target": t,
    "rev": open(f("REVISION")).read().strip() if t and os.path.isfile(f("REVISION")) else None,
    "pending": bool(t) and os.path.lexists(f(".fabdeploy-pending"))}))
"""


def layout(fleet: Fleet, host: str, deploy_to: str = "/srv/shop") -> dict[str, Any]:
    """What the host has on disk (read through the bind mount; over ssh for a deploy_to on a
    mount private to the host)."""
    if deploy_to != "/srv/shop":
        import shlex

        d = json.loads(
            fleet.ssh(host, f"python3 -c {shlex.quote(REMOTE_LAYOUT)} {shlex.quote(deploy_to)}")
        )
        t = d["target"] or ""
        name = (
            t[len(deploy_to + "/releases/") :] if t.startswith(deploy_to + "/releases/") else None
        )
        return {
            "target": d["target"],
            "release": name,
            "revision": d["rev"] if name else None,
            "pending": d["pending"],
            "staging": [n for n in d["names"] if n.startswith(".staging-")],
            "releases": [n for n in d["names"] if RELEASE_RE.match(n)],
        }
    root = srv(fleet, host)
    base = root / deploy_to.removeprefix("/srv/")
    rel = base / "releases"
    names = sorted(os.listdir(rel)) if rel.is_dir() else []
    out: dict[str, Any] = {
        "target": None,
        "release": None,
        "revision": None,
        "pending": None,
        "staging": [n for n in names if n.startswith(".staging-")],
        "releases": [n for n in names if RELEASE_RE.match(n)],
    }
    cur = base / "current"
    if not cur.is_symlink():
        return out
    target = os.readlink(cur)
    out["target"] = target
    prefix = deploy_to + "/releases/"
    if not target.startswith(prefix):
        return out
    name = target[len(prefix) :]
    out["release"] = name
    local = rel / name
    if RELEASE_RE.match(name) and local.is_dir():
        rev = local / "REVISION"
        out["revision"] = rev.read_text().strip() if rev.is_file() else None
        out["pending"] = (local / ".fabdeploy-pending").exists()
    return out


def problems(
    fleet: Fleet,
    host: str,
    *,
    after_success: bool = False,
    app: bool | str = True,
    deploy_to: str = "/srv/shop",
) -> list[str]:
    """app=True: /version must equal current's REVISION; app="up": it must answer at all
    (right after the node program itself was killed between swap and restart)."""
    """Empty when the host is not broken (see the module docstring)."""
    wait_node_idle(fleet, host)
    lay = layout(fleet, host, deploy_to)
    found = []
    if lay["target"] is None:
        return [f"{host}: current is not a symlink"]
    if not lay["release"] or not RELEASE_RE.match(lay["release"]):
        found.append(f"{host}: current -> {lay['target']} is not releases/<14 digits>")
    elif not lay["revision"]:
        found.append(f"{host}: current -> {lay['target']} is missing or has no REVISION")
    elif lay["pending"]:
        found.append(f"{host}: current -> {lay['target']} still has the pending marker")
    if after_success and lay["staging"]:
        found.append(f"{host}: staging leftovers {lay['staging']}")
    if app == "up" and not found:
        if not wait_for(lambda: fleet.version(host), timeout=20, what=f"{host} app"):
            found.append(f"{host}: app does not answer")
    elif app and lay["revision"] and not found:
        try:
            wait_for(
                lambda: fleet.version(host) == lay["revision"],
                timeout=20,
                what=f"{host} to serve {lay['revision'][:12]}",
            )
        except AssertionError:
            found.append(
                f"{host}: app serves {fleet.version(host)!r}, current is {lay['revision']}"
            )
    return found


def assert_fleet_ok(fleet: Fleet, hosts=HOSTS, commit: str | None = None, **kw: Any) -> None:
    found = [p for h in hosts for p in problems(fleet, h, **kw)]
    assert not found, found
    if commit is not None:
        assert {h: layout(fleet, h)["revision"] for h in hosts} == {h: commit for h in hosts}


# --- processes inside a host (PID namespaces are visible from here) -----------------------


def host_pids(fleet: Fleet, host: str) -> dict[int, str]:
    """pid -> command line of every process of `host` except its init."""
    state = json.loads((fleet.sb.dir / "sandbox.json").read_text())
    init = sandbox._child_pids(state["pids"][host])[0]
    ns = os.readlink(f"/proc/{init}/ns/pid")
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == init:
            continue
        try:
            if os.readlink(f"/proc/{p}/ns/pid") == ns:
                out[int(p)] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return out


def node_pids(fleet: Fleet, host: str, action: str = "") -> list[int]:
    return [
        p
        for p, cmd in host_pids(fleet, host).items()
        if cmd.startswith("/usr/bin/python3")
        and "/usr/local/lib/fabdeploy/shop" in cmd
        and action in cmd
        and not cmd.rstrip().endswith(" status")
    ]


def wait_node_idle(fleet: Fleet, host: str, timeout: float = 60) -> None:
    """An orphaned activation (its controller was killed) may still be finishing."""
    wait_for(
        lambda: not node_pids(fleet, host),
        timeout=timeout,
        interval=0.05,
        what=f"node program on {host} to finish",
    )


def descendants(pid: int) -> list[int]:
    out = []
    for c in sandbox._child_pids(pid):
        out += [c, *descendants(c)]
    return out


def signal_tree(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


# --- kill points -------------------------------------------------------------------------


def watch(fleet: Fleet, host: str, point: str, timeout: float = 30.0, proc=None) -> bool:
    """Poll the host's layout every 2 ms until `point` is reached; False if the run ended first."""
    base = srv(fleet, host) / "shop"
    before = os.readlink(base / "current") if (base / "current").is_symlink() else None
    known = set(os.listdir(base / "releases"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = set(os.listdir(base / "releases"))
        if point == "staging" and any(n.startswith(".staging-") for n in names):
            return True
        if point == "pending" and any(
            RELEASE_RE.match(n) and (base / "releases" / n / ".fabdeploy-pending").exists()
            for n in names - known
        ):
            return True
        if (
            point == "swapped"
            and (base / "current").is_symlink()
            and os.readlink(base / "current") != before
        ):
            return True
        if point == "pushed" and any(
            n.startswith("push-") for n in os.listdir(base / ".fabdeploy")
        ):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def kill9(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate(timeout=30)


# --- scenarios (reused by bench/reliability.py) ---------------------------------------------


def scenario_hotfix_kill(
    fleet: Fleet, cfg: Path, point: str, delay: float = 0.0, push: bool = False
) -> dict[str, Any]:
    """kill -9 `fab deploy.hotfix` (whole fleet) at a point; check; rerun; check strictly."""
    commit = fleet.commit(f"hotfix killed at {point}+{delay}")
    args = ["deploy.hotfix", *(["--push"] if push else [])]
    p = fleet.fab_bg(*args, config=cfg)
    hit = True
    if point == "delay":
        time.sleep(delay)  # the point itself is a delay after start
    else:
        hit = watch(fleet, "web2", point, proc=p)
        time.sleep(delay)
    kill9(p)
    found = [x for h in HOSTS for x in problems(fleet, h)]
    again = fleet.fab(*args, config=cfg, check=False)
    if again.returncode != 0:
        found.append(f"rerun failed: {again.stdout[-800:]} {again.stderr[-800:]}")
    found += [x for h in HOSTS for x in problems(fleet, h, after_success=True)]
    found += [
        f"{h}: not on {commit[:12]} after the rerun"
        for h in HOSTS
        if layout(fleet, h)["revision"] != commit
    ]
    return {"hit": hit, "problems": found, "hosts": len(HOSTS)}


def scenario_roll_kill(fleet: Fleet, cfg: Path, after: str, delay: float) -> dict[str, Any]:
    """kill -9 `fab deploy.roll` `delay` s after a stdout line containing `after`."""
    hosts = ("web1", "web2")
    commit = fleet.commit(f"roll killed {delay}s after {after}")
    boots = {h: len(fleet.boots(h)) for h in hosts}
    p = fleet.fab_bg("deploy.roll", "--hosts=" + ",".join(hosts), config=cfg)
    hit = False
    assert p.stdout is not None
    for line in p.stdout:
        if after in line:
            hit = True
            break
    time.sleep(delay)
    kill9(p)
    for h in hosts:  # a host killed mid-reboot comes back on its own; wait for its boot unit
        wait_for(
            lambda h=h: booted(fleet, h, boots[h]),
            timeout=60,
            interval=0.2,
            what=f"{h} up after the kill",
        )
    found = [x for h in hosts for x in problems(fleet, h)]
    again = fleet.fab("deploy.roll", "--hosts=" + ",".join(hosts), config=cfg, check=False)
    if again.returncode != 0:
        found.append(f"rerun failed: {again.stdout[-800:]} {again.stderr[-800:]}")
    found += [x for h in hosts for x in problems(fleet, h, after_success=True)]
    found += [
        f"{h}: not on {commit[:12]} after the rerun"
        for h in hosts
        if layout(fleet, h)["revision"] != commit
    ]
    return {"hit": hit, "problems": found, "hosts": len(hosts)}


def booted(fleet: Fleet, host: str, boots_before: int) -> bool:
    """Not rebooted since, or back with sshd up and the boot unit's outcome recorded."""
    if fleet.is_down(host):
        return False
    if len(fleet.boots(host)) == boots_before:
        return True
    try:
        st = fleet.node_status(host)
    except (AssertionError, ValueError, subprocess.TimeoutExpired):
        return False
    return (st.get("last_boot") or {}).get("boot_id") == st.get("boot_id")


def scenario_node_kill(fleet: Fleet, cfg: Path, point: str) -> dict[str, Any]:
    """kill -9 the node program (and its children) on web1 during activation."""
    commit = fleet.commit(f"node killed at {point}")
    p = fleet.fab_bg("deploy.hotfix", "--hosts=web1", config=cfg)
    hit = watch(fleet, "web1", point, proc=p)
    pids = node_pids(fleet, "web1", "activate")
    signal_tree([x for pid in pids for x in (pid, *descendants(pid))], signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    found = problems(fleet, "web1", app="up")
    if p.returncode == 0 and hit and pids:
        found.append("fab reported success although the node program was killed")
    again = fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg, check=False)
    if again.returncode != 0:
        found.append(f"rerun failed: {again.stdout[-800:]}")
    found += problems(fleet, "web1", after_success=True)
    if layout(fleet, "web1")["revision"] != commit:
        found.append(f"web1 not on {commit[:12]} after the rerun")
    return {"hit": hit and bool(pids), "problems": found, "hosts": 1}


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    f = start_fleet(tmp_path_factory.mktemp("faults"), subnet=SUBNET, hosts=3, reboot_delay=0.2)
    try:
        # An incompressible 4 MB file: download and extraction take long enough to be hit.
        f.commit("ballast", {"ballast.bin": os.urandom(3 * 1024 * 1024).hex()[: 4 * 1024 * 1024]})
        cfg = f.variant("fast", **FAST)
        f.fab("deploy.setup", config=cfg)
        f.fab("deploy.hotfix", config=cfg)
        yield f
    finally:
        for h in HOSTS:  # a test that failed half-way must not leave a host held down
            (sandbox.host_dir(f.sb.dir, h) / "hold").unlink(missing_ok=True)
        s3 = json.loads((f.sb.dir / "sandbox.json").read_text())["s3"]["pid"]
        try:
            os.kill(s3, signal.SIGCONT)
        except ProcessLookupError:
            pass
        sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def fast(fleet: Fleet) -> Path:
    return fleet.variant("fast", **FAST)


def s3_pid(fleet: Fleet) -> int:
    return json.loads((fleet.sb.dir / "sandbox.json").read_text())["s3"]["pid"]


def s3_client(fleet: Fleet):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=fleet.sb.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# --- kill -9 of fab ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point,delay",
    [
        ("delay", 0.4),  # bundling / lock / connecting
        ("pushed", 0.0),  # (with --push) right after the upload
        ("staging", 0.0),  # during download + extraction
        ("pending", 0.0),  # between link and swap (before_swap hook running)
        ("swapped", 0.0),  # between swap and restart
        ("delay", 2.5),  # restart / health check
    ],
)
def test_kill_fab_during_hotfix(fleet: Fleet, fast: Path, point: str, delay: float) -> None:
    cfg = fast
    if point == "pending":
        cfg = fleet.variant("slowhook", **FAST, hooks={"before_swap": ["sleep 0.5"]})
    if point == "swapped":
        cfg = fleet.variant("slowrestart", **FAST, restart="sleep 0.5; systemctl restart shop")
    r = scenario_hotfix_kill(fleet, cfg, point, delay, push=point == "pushed")
    assert r["hit"], f"kill point {point} was never reached"
    assert r["problems"] == []


@pytest.mark.parametrize(
    "after,delay",
    [
        ("published", 0.0),
        ("web1: rebooting", 0.0),
        ("web1: rebooting", 0.6),
        ("web2: rebooting", 0.2),
    ],
)
def test_kill_fab_during_roll(fleet: Fleet, fast: Path, after: str, delay: float) -> None:
    r = scenario_roll_kill(fleet, fast, after, delay)
    assert r["hit"], f"never saw {after!r}"
    assert r["problems"] == []


@pytest.mark.parametrize("point", ["staging", "pending", "swapped"])
def test_node_program_killed_during_activation(fleet: Fleet, point: str) -> None:
    cfg = fleet.variant(
        "slownode",
        **FAST,
        hooks={"before_swap": ["sleep 0.5"]},
        restart="sleep 0.5; systemctl restart shop",
    )
    r = scenario_node_kill(fleet, cfg, point)
    assert r["hit"], f"kill point {point} was never reached"
    assert r["problems"] == []


# --- S3 down -------------------------------------------------------------------------------


def test_s3_unreachable_during_bundle_and_hotfix(fleet: Fleet, fast: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = fleet.variant("s3closed", **FAST, s3={"endpoint_url": f"http://127.0.0.1:{port}"})
    fleet.commit("never reaches S3")
    before = {h: layout(fleet, h)["target"] for h in HOSTS}
    for task in ("deploy.bundle", "deploy.hotfix"):
        t0 = time.monotonic()
        r = fleet.fab(task, config=cfg, check=False, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"cannot reach S3 endpoint http://127.0.0.1:{port}" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 60
    assert {h: layout(fleet, h)["target"] for h in HOSTS} == before
    assert_fleet_ok(fleet)


def test_s3_stalls_during_hotfix_download(fleet: Fleet, fast: Path) -> None:
    """S3 hangs (SIGSTOP) right after fab checked the bundle: the nodes' presigned download
    times out (node.download_timeout), every host keeps its release, the message says so."""
    fleet.fab("deploy.bundle", config=fast)  # upload first: the hotfix then only HEADs it
    log = fleet.sb.dir / "log" / "s3.log"
    start = log.stat().st_size
    pid = s3_pid(fleet)
    before = {h: layout(fleet, h)["target"] for h in HOSTS}
    p = fleet.fab_bg("deploy.hotfix", "--hosts=web1,web2", config=fast)
    try:
        wait_for(
            lambda: b"HEAD /fabdeploy-sandbox/shop/bundles/" in log.read_bytes()[start:],
            timeout=30,
            interval=0.005,
            what="fab to HEAD the bundle",
        )
        os.kill(pid, signal.SIGSTOP)
        out, err = p.communicate(timeout=90)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert p.returncode == 1
    # Each host says it twice: its progress line as it finishes, and its row in the table.
    assert out.count("cannot download") == 4 and "deploy again" in out, out
    assert {h: layout(fleet, h)["target"] for h in HOSTS} == before
    assert_fleet_ok(fleet)
    # S3 back: the same command completes.
    fleet.fab("deploy.hotfix", "--hosts=web1,web2", config=fast)
    assert_fleet_ok(
        fleet, ("web1", "web2"), commit=fleet.git("rev-parse", "HEAD"), after_success=True
    )


def test_s3_down_during_boot_keeps_last_good_release(fleet: Fleet, fast: Path) -> None:
    old = layout(fleet, "web3")["revision"]
    new = fleet.commit("published while S3 is down at boot")
    fleet.fab("deploy.publish", config=fast)
    pid = s3_pid(fleet)
    os.kill(pid, signal.SIGSTOP)
    try:
        fleet.reboot("web3")
        wait_for(lambda: booted(fleet, "web3", 0), timeout=60, what="web3 boot unit")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert layout(fleet, "web3")["revision"] == old != new
    last = fleet.node_status("web3")["last_boot"]
    assert last["outcome"] == "kept" and "cannot read pointer" in last["reason"], last
    assert_fleet_ok(fleet, ("web3",))


# --- disk full -----------------------------------------------------------------------------


def test_disk_full_during_activation(fleet: Fleet, fast: Path) -> None:
    host, tiny = "web3", "/srv/tiny"
    fleet.ssh(
        host,
        f"mkdir -p {tiny} && mount -t tmpfs -o size=40m tmpfs {tiny} && "
        f"mkdir -p {tiny}/shop/shared/config && touch {tiny}/shop/shared/config/database.yml",
    )
    try:
        cfg = fleet.variant("tiny", **FAST, deploy_to=f"{tiny}/shop")
        fleet.fab("deploy.hotfix", f"--hosts={host}", config=cfg)
        good = layout(fleet, host, f"{tiny}/shop")
        assert good["revision"]
        fleet.commit("does not fit")
        # Leave 6 MB: the bundle downloads, the pre-flight check (members + slack) refuses.
        fleet.ssh(
            host, f"fallocate -l $(( $(stat -f -c '%a*%S' {tiny}) - 6*1048576 )) {tiny}/filler"
        )
        for _ in range(2):
            r = fleet.fab("deploy.hotfix", f"--hosts={host}", config=cfg, check=False)
            assert r.returncode == 1
            assert f"not enough disk space on {host}" in r.stdout, r.stdout
            after = layout(fleet, host, f"{tiny}/shop")
            assert after["target"] == good["target"] and after["staging"] == []
            assert after["releases"] == good["releases"]
            assert not [
                n
                for n in fleet.ssh(host, f"ls -a {tiny}/shop/.fabdeploy").split()
                if n.startswith("dl-")
            ]
            # Second round: completely full, so the download itself hits ENOSPC.
            fleet.ssh(
                host, f"fallocate -l $(( $(stat -f -c '%a*%S' {tiny}) )) {tiny}/filler2 || true"
            )
        assert "MB needed" in r.stdout or "MB free" in r.stdout
        fleet.ssh(host, f"rm -f {tiny}/filler {tiny}/filler2")
        fleet.fab("deploy.hotfix", f"--hosts={host}", config=cfg)
        assert problems(fleet, host, after_success=True, app=False, deploy_to=f"{tiny}/shop") == []
    finally:
        fleet.ssh(host, f"umount {tiny}", check=False)
        fleet.fab("deploy.setup", f"--hosts={host}", config=fast)  # node.json back to /srv/shop
    assert_fleet_ok(fleet, (host,))


# --- hung and unreachable hosts, host keys --------------------------------------------------


def test_hook_hanging_is_bounded_by_command_timeout(fleet: Fleet) -> None:
    cfg = fleet.variant(
        "hang",
        **{**FAST, "ssh": {**FAST["ssh"], "command_timeout": 4}},
        hooks={"before_swap": ["sleep 600"]},
    )
    fleet.commit("hook hangs")
    before = layout(fleet, "web1")["target"]
    t0 = time.monotonic()
    r = fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg, check=False, timeout=120)
    took = time.monotonic() - t0
    # ssh.command_timeout, plus health.timeout (10 s): the node checks health in the same command.
    assert r.returncode == 1 and "timed out after 14s" in r.stdout, r.stdout
    assert took < 30, took
    assert layout(fleet, "web1")["target"] == before
    # The remote hook is still sleeping (sshd does not signal a no-pty command): end it.
    sleepers = [p for p, cmd in host_pids(fleet, "web1").items() if cmd.startswith("sleep 600")]
    assert sleepers
    signal_tree(sleepers, signal.SIGKILL)
    assert_fleet_ok(fleet, ("web1",))


def test_sshd_hanging_mid_command_is_bounded(fleet: Fleet) -> None:
    """SIGSTOP web2's sshd processes while its activation runs: fab gives up on web2 after
    ssh.command_timeout, the other hosts finish, nothing hangs; after SIGCONT web2 is whole."""
    # The 2 s hook keeps every activation in flight long enough for the SIGSTOP to land
    # mid-command (without it a fast activation could finish first and the test would flake).
    cfg = fleet.variant(
        "hang2",
        **{
            **FAST,
            "ssh": {**FAST["ssh"], "command_timeout": 5},
            "hooks": {"before_swap": ["sleep 2"]},
        },
    )
    commit = fleet.commit("sshd hangs on web2")
    p = fleet.fab_bg("deploy.hotfix", config=cfg)
    stopped: list[int] = []
    try:
        assert watch(fleet, "web2", "staging", proc=p)
        stopped = [pid for pid, cmd in host_pids(fleet, "web2").items() if "sshd" in cmd]
        signal_tree(stopped, signal.SIGSTOP)
        out, err = p.communicate(timeout=60)
    finally:
        signal_tree(stopped, signal.SIGCONT)
    assert p.returncode == 1
    row = next(line for line in out.splitlines() if line.lstrip("│| ").startswith("web2"))
    assert "FAILED" in row and "timed out" in row, out
    assert "2 ok, 1 failed" in out
    assert_fleet_ok(fleet, ("web1", "web3"), commit=commit)
    assert problems(fleet, "web2") == []
    fleet.fab("deploy.hotfix", config=cfg)
    assert_fleet_ok(fleet, commit=commit, after_success=True)


def test_unreachable_host_is_bounded(fleet: Fleet, fast: Path) -> None:
    """sshd listener stopped: TCP connects but no banner ever comes -> bounded by connect_timeout."""
    listener = [
        pid
        for pid, cmd in host_pids(fleet, "web3").items()
        if "sshd" in cmd and ("[listener]" in cmd or cmd.startswith("/usr/sbin/sshd -D"))
    ]
    assert len(listener) == 1
    commit = fleet.commit("web3 hangs at connect")
    os.kill(listener[0], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = fleet.fab("deploy.hotfix", config=fast, check=False, timeout=120)
        took = time.monotonic() - t0
    finally:
        os.kill(listener[0], signal.SIGCONT)
    assert r.returncode == 1 and took < 40, (took, r.stdout)
    row = next(line for line in r.stdout.splitlines() if line.lstrip("│| ").startswith("web3"))
    assert "FAILED" in row and "web3" in row, r.stdout
    assert_fleet_ok(fleet, ("web1", "web2"), commit=commit)
    assert_fleet_ok(fleet, ("web3",))


def test_changed_host_key_refused_for_hotfix(fleet: Fleet) -> None:
    forged = fleet.forged_known_hosts("web2", "web1", "known_hosts.changed")
    cfg = fleet.variant("changedkey", **{**FAST, "ssh": {**FAST["ssh"], "known_hosts": forged}})
    before = layout(fleet, "web2")["target"]
    fleet.commit("must not reach web2")
    r = fleet.fab("deploy.hotfix", "--hosts=web2", config=cfg, check=False)
    assert r.returncode == 1 and "host key of web2" in r.stdout and "CHANGED" in r.stdout
    assert layout(fleet, "web2")["target"] == before


# --- concurrent deploys --------------------------------------------------------------------


def test_concurrent_rolls_one_refused(fleet: Fleet, fast: Path) -> None:
    commit = fleet.commit("two rolls at once")
    a = fleet.fab_bg("deploy.roll", "--hosts=web1,web2", config=fast)
    b = fleet.fab_bg("deploy.roll", "--hosts=web1,web2", config=fast)
    outs = [p.communicate(timeout=180) for p in (a, b)]
    codes = sorted(p.returncode for p in (a, b))
    assert codes == [0, 1], outs
    loser = outs[[a, b].index(next(p for p in (a, b) if p.returncode == 1))]
    assert "deploy lock held by" in loser[1], loser
    assert_fleet_ok(fleet, ("web1", "web2"), commit=commit, after_success=True)


def test_roll_and_whole_fleet_hotfix_one_refused(fleet: Fleet, fast: Path) -> None:
    rolled = fleet.commit("roll wins")
    # web2 stays down after its reboot until the hotfix has tried: the roll still holds the
    # lock then, however long the hotfix takes to build its bundle on a busy machine.
    hold = sandbox.host_dir(fleet.sb.dir, "web2") / "hold"
    hold.touch()
    try:
        roll = fleet.fab_bg("deploy.roll", "--hosts=web1,web2", config=fast)
        assert roll.stdout is not None
        seen = []
        for line in roll.stdout:  # the lock is held once the roll publishes
            seen.append(line)
            if "published" in line:
                break
        fleet.commit("hotfix loses")
        r = fleet.fab("deploy.hotfix", config=fast, check=False)
    finally:
        hold.unlink(missing_ok=True)
    out, err = roll.communicate(timeout=180)
    assert roll.returncode == 0, "".join(seen) + out + err
    assert r.returncode == 1 and "deploy lock held by" in r.stderr and "(roll)" in r.stderr, (
        r.stderr
    )
    assert_fleet_ok(fleet, ("web1", "web2"), commit=rolled)
    assert fleet.pointer()["commit"] == rolled


# --- damaged layouts -------------------------------------------------------------------------


def status_of(fleet: Fleet, cfg: Path, host: str) -> dict[str, Any]:
    r = fleet.fab("deploy.status", "--json", f"--hosts={host}", config=cfg, check=False)
    return json.loads(r.stdout)["hosts"][0]


def test_damaged_layout_reported_and_repaired(fleet: Fleet, fast: Path) -> None:
    host = "web3"
    fleet.fab("deploy.hotfix", f"--hosts={host}", "--force", config=fast)  # >= 2 releases
    lay = layout(fleet, host)
    assert len(lay["releases"]) >= 2
    base = srv(fleet, host) / "shop"
    # A stray dir and a dir with no REVISION: reported, never picked, never pruned.
    (base / "releases" / "backup-old").mkdir()
    prev, cur = lay["releases"][-2], lay["release"]
    hole = str(int(cur) - 1)
    if hole > prev:  # between previous and current: a REVISION-less dir rollback must skip
        (base / "releases" / hole).mkdir()
    st = status_of(fleet, fast, host)
    assert st["stray"] == ["backup-old"] and st["current"]["ok"] is True
    # current's release deleted by hand -> status says BROKEN; rollback picks the previous
    # complete release (not the REVISION-less one), activate rebuilds.
    fleet.ssh(host, f"rm -rf /srv/shop/releases/{lay['release']}")
    st = status_of(fleet, fast, host)
    assert st["current"]["ok"] is False
    table = re.sub(
        r"[\s│┃]+",
        " ",
        fleet.fab("deploy.status", f"--hosts={host}", config=fast, check=False).stdout,
    )
    assert "BROKEN" in table, table
    fleet.fab("deploy.rollback", f"--hosts={host}", config=fast)
    now = layout(fleet, host)
    assert now["release"] == prev
    assert problems(fleet, host) == []
    # current pointing nowhere at all -> a hotfix activates a fresh release.
    fleet.ssh(host, "ln -sfn /srv/shop/releases/nowhere /srv/shop/current")
    assert status_of(fleet, fast, host)["current"]["ok"] is False
    fleet.fab("deploy.hotfix", f"--hosts={host}", config=fast)
    assert problems(fleet, host, after_success=True) == []
    assert (base / "releases" / "backup-old").is_dir()  # cleanup never touches strays
    fleet.ssh(host, f"rm -rf /srv/shop/releases/backup-old /srv/shop/releases/{hole}")


# --- hostile bundles and pointers, end to end -------------------------------------------------


def tar_gz(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:

        def add(name: str, data: bytes = b"x", **attrs: Any) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
            for k, v in attrs.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if ti.size else None)

        add("app.py", b"print('hostile')\n")
        if kind == "dotdot":
            add("../../../../srv/evil-dotdot")
        elif kind == "absolute":
            add("/srv/evil-absolute")
        elif kind == "symlink":
            add("escape", type=tarfile.SYMTYPE, linkname="../../../../srv")
            add("escape/evil-symlink")
        elif kind == "hardlink":
            add(
                "hard", type=tarfile.LNKTYPE, linkname="etc/passwd"
            )  # not in the bundle: the host's
        elif kind == "device":
            add("dev-null", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        elif kind == "many":
            for i in range(60):
                add(f"f/{i}")
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


def upload_bad_bundle(fleet: Fleet, kind: str) -> tuple[str, str]:
    """A commit whose bundle in S3 is hostile; its metadata is consistent, so only the node's
    checks stand between it and `current` (for "sha", the metadata lies about the sha256)."""
    commit = fleet.commit(f"hostile bundle: {kind}")
    body = tar_gz(kind)
    sha = hashlib.sha256(b"something else" if kind == "sha" else body).hexdigest()
    s3_client(fleet).put_object(
        Bucket=fleet.sb.bucket,
        Key=f"shop/bundles/{commit}.tar.gz",
        Body=body,
        Metadata={
            "commit": commit,
            "ref": "main",
            "sha256": sha,
            "size": str(len(body)),
            "built-at": "2026-01-01T00:00:00Z",
            "built-by": "mallory@evil",
            "app": "shop",
            "committed-at": str(int(time.time())),
        },
    )
    return commit, sha


BAD_BUNDLES = {
    "sha": "sha256 mismatch",
    "truncated": "corrupt or truncated",
    "dotdot": "contains a '..' component",
    "absolute": "is an absolute path",
    "symlink": "goes through symlink member",
    "hardlink": "not an earlier regular file",
    "device": "special file",
    "many": "more than max_files=50",
}


@pytest.mark.parametrize("kind", sorted(BAD_BUNDLES))
def test_hostile_bundle_rejected_by_hotfix(fleet: Fleet, kind: str) -> None:
    cfg = fleet.variant("fewfiles", **{**FAST, "node": {**FAST["node"], "max_files": 50}})
    host = "web1"
    before = layout(fleet, host)
    commit, _ = upload_bad_bundle(fleet, kind)
    r = fleet.fab("deploy.hotfix", f"--hosts={host}", f"--ref={commit}", config=cfg, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    text = re.sub(r"[\s│┃]+", " ", r.stdout)  # undo the table's wrapping of long messages
    assert BAD_BUNDLES[kind] in text and f"on {host}" in text, r.stdout
    after = layout(fleet, host)
    assert after["target"] == before["target"] and after["staging"] == []
    assert after["releases"] == before["releases"]
    leaks = [p.name for p in srv(fleet, host).iterdir() if p.name.startswith("evil")]
    assert leaks == [] and not (srv(fleet, host) / "shop" / "releases" / "evil-dotdot").exists()
    assert problems(fleet, host) == []


def put_pointer(fleet: Fleet, body: bytes) -> None:
    s3_client(fleet).put_object(Bucket=fleet.sb.bucket, Key="shop/published.json", Body=body)


def test_bad_pointer_and_bad_published_bundle_at_boot(fleet: Fleet, fast: Path) -> None:
    """Reboots with a pointer that is not JSON, names a missing bundle, or names a hostile
    bundle: the host keeps its release and says why; deploy commands say what is wrong."""
    host = "web2"
    good = fleet.pointer()
    assert good is not None
    bad, bad_sha = upload_bad_bundle(fleet, "dotdot")
    cases = [
        (b"{not json", "not valid JSON"),
        (
            json.dumps(
                {
                    **good,
                    "key": "shop/bundles/0000.tar.gz",
                    "commit": "0" * 40,
                    "bundle_id": "0" * 40,
                }
            ).encode(),
            "does not exist",
        ),
        (
            json.dumps(
                {
                    **good,
                    "key": f"shop/bundles/{bad}.tar.gz",
                    "commit": bad,
                    "bundle_id": bad,
                    "sha256": bad_sha,
                }
            ).encode(),
            "contains a '..' component",
        ),
    ]
    try:
        for body, reason in cases:
            before = layout(fleet, host)
            put_pointer(fleet, body)
            fleet.reboot(host)
            wait_for(lambda: booted(fleet, host, 0), timeout=60, what=f"{host} boot unit")
            last = fleet.node_status(host)["last_boot"]
            assert last["outcome"] == "kept" and reason in last["reason"], last
            assert layout(fleet, host)["target"] == before["target"]
            assert problems(fleet, host) == []
        put_pointer(fleet, b"{not json")
        st = fleet.fab("deploy.status", config=fast, check=False)
        assert "published: unknown" in st.stdout and "not valid JSON" in st.stdout, st.stdout
        # An operator can re-publish over a corrupt pointer.
        r = fleet.fab("deploy.publish", f"--ref={good['commit']}", config=fast, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert fleet.pointer()["commit"] == good["commit"]
    finally:
        put_pointer(fleet, json.dumps(good).encode())
