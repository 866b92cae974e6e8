"""Sandbox fleet: web1..webN as real sshd hosts in their own namespaces, plus a local S3.

Each host is `unshare --mount --pid --uts --fork --mount-proc --kill-child host_init.py`, so
killing the unshare process takes the whole host (its PID namespace) down with it. Hosts share
the network namespace and listen on {subnet}.K:22; /srv, /etc and /usr/local are private per host
(see sandbox_files/host_init.py). S3 is a moto server process.

Each boot of a host appends a JSON line to DIR/hosts/webK/boots.jsonl: boot_id, down_at (when
the previous run had been fully stopped; null on the first boot), boot_start, units_done and
sshd_ready (time.time() floats), for tests and benchmarks. Logs: DIR/hosts/webK/log/*.log.

`up` on a dir whose sandbox is still running raises SandboxError (run `down` first); stale state
from a dead sandbox is cleaned up silently. All processes are tracked by pid in the state dir.

Latency (`up(rtt=0.1)`, `fab sandbox.up --rtt 100ms`): there is no netem here, so one userspace
proxy process (sandbox_files/latency_proxy.py) stands between the deploying machine and the
fleet, adding rtt/2 each way to every chunk (and one rtt per new connection, for the TCP
handshake). Each host K gets a controller-facing address, latency_ip(): 127.(A^128).B.K for
a host on 127.A.B.K, forwarding ports 22 and 8080; ssh_config's HostName and known_hosts name
it, so fab, ssh and Capistrano all go through it, and so does the health check ({host} is the
HostName). S3 gets a name, s3_name() (s3-A-B.sandbox.internal), in the endpoint URL: on the
deploying machine it resolves (a marked line in /etc/hosts, added by up, removed by down) to
the proxy on the same port as moto, at 127.(A^128).B.255; on the hosts (private /etc) to moto
at 127.0.0.1 directly. Presigned URLs sign the host:port string, and both sides use the same
one, so nodes download at local speed, as in one region. rtt=0 (the default) means no proxy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabdeploy.adapters.nodectl import sudoers_for
from fabdeploy.basics.errors import DeployError

FILES = Path(__file__).resolve().parent / "sandbox_files"
BUCKET = "fabdeploy-sandbox"
REGION = "us-east-1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}
STATE_FILE = "sandbox.json"
S3_STATE_FILE = "s3.json"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL = 0.01
DEPLOY_USER = "deploy"  # every host has it (host_init.py), with sudo for restart and reboot
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_PYTHON = "/usr/bin/python3"  # runs host_init.py and the systemctl stand-in on the hosts
# Mounted over inside each host, so the state dir must not live below them.
PRIVATE_DIRS = ("/srv", "/etc", "/usr/local", "/run", "/proc")
# Files and dirs `up` generates in the state dir (removed on re-up; nothing else is touched).
GENERATED = (
    "hosts",
    "app",
    "log",
    "id_ed25519",
    "id_ed25519.pub",
    "authorized_keys",
    "known_hosts",
    "ssh_config",
    "deploy.yml",
    "env",
    STATE_FILE,
    S3_STATE_FILE,
    "proxy.json",
    "proxy.ready",
)
PROXY_CONFIG = "proxy.json"
# The ports a host's latency address forwards: sshd and the sample app.
PROXIED_PORTS = (22, 8080)
ETC_HOSTS = Path("/etc/hosts")
ETC_HOSTS_LOCK = Path("/tmp/fabdeploy-sandbox-etc-hosts.lock")
ETC_HOSTS_MARK = "# fabdeploy sandbox"

# Children started by this process: kept so they can be reaped (not left as zombies) by down().
_children: dict[int, subprocess.Popen[bytes]] = {}


class SandboxError(DeployError):
    """A sandbox operation failed; the message says what to do about it."""


@dataclass
class Sandbox:
    dir: Path
    hosts: dict[str, str]
    s3_endpoint: str
    bucket: str
    app_repo: Path
    deploy_yml: Path
    ssh_config: Path
    known_hosts: Path
    key: Path
    env: dict[str, str]
    rtt: float = 0.0
    # S3 as the hosts reach it (no latency); s3_endpoint is what the deploying machine uses.
    s3_direct: str = ""
    # private_net: the bastion's name ("gw"; not in `hosts`, not in deploy.yml) and address.
    gateway: str | None = None
    gateway_ip: str | None = None


def host_dir(dir: Path, name: str) -> Path:
    return Path(dir).resolve() / "hosts" / name


# --- processes ------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _ours(pid: int, marker: str) -> bool:
    # Guards against pid reuse: only signal a pid whose command line still names our state.
    return _alive(pid) and marker in _cmdline(pid)


def _child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the controller (fab sandbox.up exits) and its ^C
            cwd="/",
            env=env,
        )
    _children[proc.pid] = proc
    return proc.pid


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _alive(p)]
        if not left or time.monotonic() > deadline:
            for p in pids:
                if p not in left:
                    _children.pop(p, None)
            return left
        time.sleep(POLL)


# --- network --------------------------------------------------------------------------------


def _listening(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ssh_banner(ip: str) -> bool:
    try:
        with socket.create_connection((ip, 22), timeout=0.5) as s:
            s.settimeout(1.0)
            if not s.recv(64).startswith(b"SSH-"):
                return False
            s.sendall(b"SSH-2.0-sandbox-probe\r\n")  # else sshd logs an error for every probe
            return True
    except OSError:
        return False


# --- private network (up(private_net=True)) -------------------------------------------------
#
# The fleet sits in its own network namespace, `fdsb-A-B` for subnet 127.A.B, as nodes in a
# VPC's private subnet: host K is 10.A.B.K there, the bastion "gw" is 10.A.B.253. One veth pair
# joins it to this machine's namespace: this side holds 10.A.B.254, and this side routes only
# the bastion's /32 into it (the rest of 10.A.B.0/24 is `unreachable`), so the deploying machine
# reaches a node only through the bastion (ProxyJump gw in ssh_config). The nodes' one way out
# is 10.A.B.254, where S3 is (a delay-free relay to moto, which listens on 127.0.0.1 here): the
# deploying machine uses that same endpoint, so presigned URLs work on both sides.

GATEWAY = "gw"
GATEWAY_HOST = 253
OUTSIDE_HOST = 254


def private_ip(subnet: str, k: int) -> str:
    _, a, b = subnet.split(".")
    return f"10.{a}.{b}.{k}"


def netns_name(subnet: str) -> str:
    _, a, b = subnet.split(".")
    return f"fdsb-{a}-{b}"


def _veth(subnet: str) -> tuple[str, str]:
    _, a, b = subnet.split(".")
    return f"fd{a}-{b}o", f"fd{a}-{b}i"  # this side, the fleet's side (<= 15 chars)


def _ip(*args: str, netns: str | None = None) -> None:
    _run(["ip", *(["-n", netns] if netns else []), *args])


def _private_net_up(subnet: str, hosts: list[str]) -> None:
    """The namespace, the veth pair, addresses and routes (see above); replaces stale ones."""
    _private_net_down(subnet)
    ns = netns_name(subnet)
    outside, inside = _veth(subnet)
    gw, out = private_ip(subnet, GATEWAY_HOST), private_ip(subnet, OUTSIDE_HOST)
    _ip("netns", "add", ns)
    _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
    _ip("link", "set", inside, "netns", ns)
    _ip("addr", "add", f"{out}/32", "dev", outside)
    _ip("link", "set", outside, "up")
    _ip("route", "add", f"{gw}/32", "dev", outside)
    _ip("route", "add", "unreachable", f"{private_ip(subnet, 0)}/24")
    _ip("link", "set", "lo", "up", netns=ns)
    for ip in [*hosts, gw]:
        _ip("addr", "add", f"{ip}/32", "dev", "lo", netns=ns)
    _ip("link", "set", inside, "up", netns=ns)
    # Out of the namespace: only to this side's address, and always from the bastion's.
    _ip("route", "add", f"{out}/32", "dev", inside, "src", gw, netns=ns)


def _private_net_down(subnet: str) -> None:
    """Remove the namespace (its veth end, and so the pair, goes with it) and the route."""
    ns = netns_name(subnet)
    if Path("/run/netns", ns).exists():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    outside, _ = _veth(subnet)
    for cmd in (
        ["ip", "link", "del", outside],
        ["ip", "route", "del", "unreachable", f"{private_ip(subnet, 0)}/24"],
    ):
        subprocess.run(cmd, capture_output=True)  # already gone: fine


def isolated_subnet(sb: Sandbox) -> str:
    """The subnet a running sandbox was brought up with (127.A.B)."""
    return str((_read_json(sb.dir / STATE_FILE) or {})["subnet"])


def _booted(dir: Path, name: str) -> bool:
    """The host recorded a boot whose sshd answered (host_init probes it from inside)."""
    try:
        lines = (host_dir(dir, name) / "boots.jsonl").read_text().splitlines()
    except OSError:
        return False
    return bool(lines) and bool(json.loads(lines[-1]).get("sshd_ready"))


def _http_ready(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is serving
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- S3 -------------------------------------------------------------------------------------


def _proxy_marker(dir: Path) -> str:
    return str(dir / PROXY_CONFIG)


def _moto_marker(port: int) -> str:
    return f"moto.server -H 127.0.0.1 -p {port}"


def _spawn_s3(dir: Path, port: int) -> tuple[int, int]:
    if port == 0:
        port = _free_port()
    elif _listening("127.0.0.1", port):
        raise SandboxError(
            f"port 127.0.0.1:{port} is already in use; pick another s3_port (0 = any free port)"
        )
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    # The endpoint may be a name (s3_name(), with --rtt): moto would take its first label for a
    # bucket (virtual-hosted style). Every client here uses path-style URLs.
    env = {**os.environ, "S3_IGNORE_SUBDOMAIN_BUCKETNAME": "true"}
    pid = _spawn(cmd, dir / "log" / "s3.log", env=env)
    state = {"pid": pid, "port": port, "endpoint": f"http://127.0.0.1:{port}"}
    (dir / S3_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return pid, port


def _wait_s3(dir: Path, pid: int, port: int, bucket: str, deadline: float) -> str:
    endpoint = f"http://127.0.0.1:{port}"
    while not _http_ready(endpoint + "/"):
        if not _alive(pid):
            raise SandboxError(f"S3 (moto server) exited on start; see {dir / 'log' / 's3.log'}")
        if time.monotonic() > deadline:
            raise SandboxError(
                f"S3 did not answer on {endpoint} in time; see {dir / 'log' / 's3.log'}"
            )
        time.sleep(POLL)
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    s3.create_bucket(Bucket=bucket)
    return endpoint


def start_s3(dir: Path, port: int, bucket: str = BUCKET) -> str:
    """Start only the local S3 (moto server) with `bucket` created; returns the endpoint URL."""
    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    _refuse_if_running(dir)
    pid, port = _spawn_s3(dir, port)
    try:
        return _wait_s3(dir, pid, port, bucket, time.monotonic() + READY_TIMEOUT)
    except BaseException:
        down(dir)
        raise


# --- latency --------------------------------------------------------------------------------


def parse_rtt(text: str | float | int | None) -> float:
    """'100ms', '0.1s' or '100' (milliseconds) -> seconds."""
    if text is None or text == "":
        return 0.0
    if isinstance(text, (int, float)):
        value, scale = float(text), 0.001
    else:
        t = str(text).strip().lower()
        scale = 0.001
        if t.endswith("ms"):
            t = t[:-2]
        elif t.endswith("s"):
            t, scale = t[:-1], 1.0
        try:
            value = float(t)
        except ValueError:
            raise SandboxError(
                f"rtt {text!r} is not a duration; use e.g. 100ms, 0.1s or 100 (ms)"
            ) from None
    seconds = value * scale
    if not 0 <= seconds <= 10:
        raise SandboxError(f"rtt {text!r} must be between 0 and 10s")
    return seconds


def latency_ip(ip: str) -> str:
    """The deploying machine's address for a host on ip: 127.A.B.K -> 127.(A^128).B.K."""
    parts = ip.split(".")
    return ".".join([parts[0], str(int(parts[1]) ^ 128), *parts[2:]])


def s3_name(subnet: str) -> str:
    """The S3 endpoint's host name for a sandbox on 127.A.B (one per subnet, so sandboxes can coexist)."""
    _, a, b = subnet.split(".")
    return f"s3-{a}-{b}.sandbox.internal"


def _s3_proxy_ip(subnet: str) -> str:
    return latency_ip(f"{subnet}.255")  # never a host: hosts are .1-.254


def _etc_hosts_lines(text: str, drop: str, dir: Path | None = None) -> list[str]:
    """text's lines without our marked line for name `drop` (only dir's, when given)."""
    keep = []
    for line in text.splitlines(True):
        ours = ETC_HOSTS_MARK in line and drop in line.split("#", 1)[0].split()
        if ours and (dir is None or line.rstrip("\n").endswith(f"{ETC_HOSTS_MARK} {dir}")):
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    return keep


def _set_etc_hosts(name: str, ip: str | None, dir: Path, path: Path = ETC_HOSTS) -> None:
    """Add (ip) or remove (None) this sandbox's line for `name` in the machine's /etc/hosts.

    Under a lock shared by every sandbox on the machine; replaced atomically where the file
    can be renamed over, else rewritten in place (a container's bind-mounted /etc/hosts).
    """
    import fcntl

    with open(ETC_HOSTS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text()
        # Up replaces any stale line for the name; down removes only its own dir's line.
        lines = _etc_hosts_lines(text, name, None if ip else dir)
        if ip:
            lines.append(f"{ip} {name}  {ETC_HOSTS_MARK} {dir}\n")
        new = "".join(lines)
        if new == text:
            return
        tmp = path.with_name(f".{path.name}.fabdeploy-{os.getpid()}")
        try:
            tmp.write_text(new)
            os.chmod(tmp, path.stat().st_mode & 0o7777)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            with open(path, "r+") as f:
                f.write(new)
                f.truncate()


def _host_etc_hosts(name: str) -> str:
    """A host's own /etc/hosts: the machine's, with the S3 name pointing at moto directly."""
    text = "".join(_etc_hosts_lines(ETC_HOSTS.read_text(), name))
    return text + f"127.0.0.1 {name}  # S3 in the same region: no latency\n"


def _proxy_routes(hosts: dict[str, str], subnet: str, s3_port: int) -> list[list[Any]]:
    routes: list[list[Any]] = [
        [latency_ip(ip), port, ip, port] for ip in hosts.values() for port in PROXIED_PORTS
    ]
    # No handshake charge on S3's route: moto's server closes the connection after every
    # response, where S3 keeps it alive, so charging each one would count a handshake per call.
    routes.append([_s3_proxy_ip(subnet), s3_port, "127.0.0.1", s3_port, False])
    return routes


def _spawn_proxy(dir: Path, rtt: float, routes: list[list[Any]], handshake: bool = True) -> int:
    ready = dir / "proxy.ready"
    ready.unlink(missing_ok=True)
    config = {"rtt": rtt, "handshake": handshake, "routes": routes, "ready_file": str(ready)}
    (dir / PROXY_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    cmd = [sys.executable, str(FILES / "latency_proxy.py"), _proxy_marker(dir)]
    return _spawn(cmd, dir / "log" / "proxy.log")


def _wait_proxy(dir: Path, pid: int, deadline: float) -> None:
    ready = dir / "proxy.ready"
    while not ready.exists():
        if not _alive(pid):
            raise SandboxError(
                f"the latency proxy exited on start; see {dir / 'log' / 'proxy.log'}"
            )
        if time.monotonic() > deadline:
            raise SandboxError(
                f"the latency proxy did not start in time; see {dir / 'log' / 'proxy.log'}"
            )
        time.sleep(POLL)


def _stop_proxy(dir: Path, proxy: dict[str, Any]) -> list[int]:
    if proxy.get("pid") and _ours(proxy["pid"], _proxy_marker(dir)):
        os.kill(proxy["pid"], signal.SIGTERM)
        return [proxy["pid"]]
    return []


def set_rtt(dir: Path, rtt: float, handshake: bool = True) -> Sandbox:
    """Restart a running sandbox's latency proxy with another rtt (0 keeps the proxy, delay-free).

    Only for a sandbox brought up with rtt > 0: the addresses stay the same, so deploy.yml,
    ssh_config and known_hosts stay valid. Connections open through the old proxy are cut.
    """
    dir = Path(dir).resolve()
    sb = load(dir)
    state = _read_json(dir / STATE_FILE) or {}
    proxy = state.get("proxy")
    if not proxy:
        raise SandboxError(
            f"sandbox in {dir} has no latency proxy; bring it up with --rtt to change the rtt"
        )
    left = _wait_gone(_stop_proxy(dir, proxy), STOP_TIMEOUT)
    if left:
        raise SandboxError(
            f"the latency proxy (pid {left[0]}) did not stop; check `ps -p {left[0]}`"
        )
    proxy["pid"] = _spawn_proxy(dir, rtt, proxy["routes"], handshake)
    proxy["rtt"] = rtt
    proxy["handshake"] = handshake
    (dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    _wait_proxy(dir, proxy["pid"], time.monotonic() + READY_TIMEOUT)
    sb.rtt = rtt
    return sb


# --- state ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise SandboxError(f"{path} is corrupt ({e}); remove it and run `fab sandbox.up`") from e


def _running(dir: Path) -> list[str]:
    """Names of the recorded processes of this state dir that are still alive."""
    names = []
    state = _read_json(dir / STATE_FILE) or {}
    for name, pid in state.get("pids", {}).items():
        if _ours(pid, str(host_dir(dir, name))):
            names.append(name)
    s3 = _read_json(dir / S3_STATE_FILE)
    if s3 and _ours(s3["pid"], _moto_marker(s3["port"])):
        names.append("s3")
    proxy = state.get("proxy") or {}
    if proxy.get("pid") and _ours(proxy["pid"], _proxy_marker(dir)):
        names.append("latency proxy")
    return names


def _refuse_if_running(dir: Path) -> None:
    running = _running(dir)
    if running:
        raise SandboxError(
            f"sandbox in {dir} is already up ({', '.join(running)}); run `fab sandbox.down` first"
        )


def load(dir: Path) -> Sandbox:
    dir = Path(dir).resolve()
    state = _read_json(dir / STATE_FILE)
    if state is None:
        raise SandboxError(f"no sandbox in {dir}; run `fab sandbox.up` first")
    dead = [n for n, pid in state["pids"].items() if not _ours(pid, str(host_dir(dir, n)))]
    if dead:
        raise SandboxError(
            f"sandbox in {dir} is not running ({', '.join(dead)} gone); "
            "run `fab sandbox.down` then `fab sandbox.up`"
        )
    proxy = state.get("proxy")
    if proxy and not _ours(proxy["pid"], _proxy_marker(dir)):
        raise SandboxError(
            f"sandbox in {dir} is not running (its latency proxy is gone; see {dir / 'log' / 'proxy.log'}); "
            "run `fab sandbox.down` then `fab sandbox.up`"
        )
    return _sandbox(
        dir,
        state["hosts"],
        state["s3"]["endpoint"],
        state["bucket"],
        rtt=proxy["rtt"] if proxy else 0.0,
        s3_direct=state["s3"].get("direct", ""),
        gateway=state.get("gateway"),
    )


def _sandbox(
    dir: Path,
    hosts: dict[str, str],
    endpoint: str,
    bucket: str,
    rtt: float = 0.0,
    s3_direct: str = "",
    gateway: str | None = None,
) -> Sandbox:
    return Sandbox(
        dir=dir,
        hosts={n: ip for n, ip in hosts.items() if n != gateway},
        gateway=gateway,
        gateway_ip=hosts.get(gateway) if gateway else None,
        s3_endpoint=endpoint,
        bucket=bucket,
        app_repo=dir / "app",
        deploy_yml=dir / "deploy.yml",
        ssh_config=dir / "ssh_config",
        known_hosts=dir / "known_hosts",
        key=dir / "id_ed25519",
        env=dict(AWS_ENV),
        rtt=rtt,
        s3_direct=s3_direct or endpoint,
    )


# --- generated files ------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip().splitlines()
        raise SandboxError(f"`{' '.join(cmd)}` failed: {out[-1] if out else proc.returncode}")


def _keygen(path: Path, comment: str) -> str:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    kind, blob = path.with_suffix(".pub").read_text().split()[:2]
    return f"{kind} {blob}"


SSHD_CONFIG = """\
# Written by fabfile/sandbox.py for {name}.
ListenAddress {ip}:22
HostKey {hdir}/ssh_host_ed25519_key
PidFile /run/sshd.pid
# The second is for `deploy`, who cannot read the state dir (often under a 0700 dir).
AuthorizedKeysFile {dir}/authorized_keys /etc/sandbox_authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
MaxStartups 100:30:200
MaxSessions 50
LogLevel ERROR
ClientAliveInterval 10
UseDNS no
# sntrup761 costs ~0.15 s of CPU per connection on small VMs; tests open hundreds.
# ecdh-sha2-nistp256 is for Capistrano: Debian's net-ssh lacks x25519.
KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256
PrintMotd no
PrintLastLog no
Subsystem sftp internal-sftp
"""

APP_UNIT = """\
[Unit]
Description={app} sample app (sandbox)
After=fabdeploy-{app}.service

[Service]
Type=simple
WorkingDirectory=/srv/{app}/current
ExecStart=/usr/bin/python3 /srv/{app}/current/app.py --bind {ip} --port 8080{extra}

[Install]
WantedBy=multi-user.target
"""

# The worker role's process: installed on every host, enabled on none (a worker host enables
# it, as its image would: `systemctl enable shop-worker`), restarted by the worker role.
WORKER_UNIT = """\
[Unit]
Description={app} sample worker (sandbox)
After=fabdeploy-{app}.service

[Service]
Type=simple
WorkingDirectory=/srv/{app}/current
ExecStart=/usr/bin/python3 /srv/{app}/current/worker.py

[Install]
WantedBy=multi-user.target
"""

DATABASE_YML = """\
# Shared config for {name}, linked into every release as config/database.yml.
production:
  adapter: sqlite3
  database: /srv/{app}/shared/db/{name}.sqlite3
  host: {name}
"""

DEPLOY_YML = """\
# Sandbox fleet written by `fab sandbox.up`. Paths are relative to this file.
app: {app}
repo: app
ref: HEAD
s3:
  bucket: {bucket}
  prefix: {app}
  region: {region}
  endpoint_url: {endpoint}
deploy_to: /srv/{app}
keep_releases: 5
linked_files: [config/database.yml]
linked_dirs: [log, tmp/pids]
ssh:
  user: root
  config: ssh_config
  known_hosts: known_hosts
  strict_host_keys: true
  connect_timeout: 5
hosts: [{hosts}]
parallel: 10
restart: systemctl restart {app}
reboot: systemctl reboot
health:
  url: http://{{host}}:8080/health
  timeout: 30
node:
  python: /usr/bin/python3
  app_unit: {app}.service
node_env:
{node_env}
"""


def _prepare_host(
    dir: Path,
    name: str,
    ip: str,
    app: str,
    etc_hosts: str | None = None,
    private_port: int | None = None,
) -> str:
    """Lay out webK's state dir before its first boot; returns its known_hosts key."""
    hdir = host_dir(dir, name)
    for sub in ("etc/upper", "etc/work", "usr_local/upper", "usr_local/work", "log"):
        (hdir / sub).mkdir(parents=True)
    host_key = _keygen(hdir / "ssh_host_ed25519_key", f"root@{name}")
    (hdir / "sshd_config").write_text(SSHD_CONFIG.format(name=name, ip=ip, hdir=hdir, dir=dir))

    # Written into the overlay upper dirs before the overlay is mounted (that is allowed).
    units = hdir / "etc/upper/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    # Opaque: the host starts with no units, not with the real machine's (ssh, postgresql, ...).
    os.setxattr(units, "trusted.overlay.opaque", b"y")
    extra = f" --private-port {private_port}" if private_port else ""
    (units / f"{app}.service").write_text(APP_UNIT.format(app=app, ip=ip, extra=extra))
    (units / f"{app}-worker.service").write_text(WORKER_UNIT.format(app=app))
    if etc_hosts is not None:
        (hdir / "etc/upper/hosts").write_text(etc_hosts)
    (units / "multi-user.target.wants" / f"{app}.service").symlink_to(
        f"/etc/systemd/system/{app}.service"
    )
    # Its `deploy` user may restart the app and reboot, exactly that (as a real fleet's would).
    drop_in = hdir / "etc/upper/sudoers.d" / f"fabdeploy-{app}"
    drop_in.parent.mkdir(mode=0o750)
    drop_in.write_text(
        sudoers_for(
            DEPLOY_USER,
            app,
            [f"/usr/local/bin/systemctl restart {app}", "/usr/local/bin/systemctl reboot"],
        )
    )
    drop_in.chmod(0o440)
    shutil.copy(dir / "authorized_keys", hdir / "etc/upper/sandbox_authorized_keys")
    # systemctl imports its logic from systemctl_impl.py next to it (which up() precompiles).
    for sub, tool, mode in (
        ("bin", "systemctl", 0o755),
        ("bin", "systemctl_impl.py", 0o644),
        ("sbin", "reboot", 0o755),
    ):
        target = hdir / "usr_local/upper" / sub / tool
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(FILES / tool, target)
        target.chmod(mode)

    shared = hdir / "srv" / app / "shared"
    for sub in ("config", "log", "tmp/pids"):
        (shared / sub).mkdir(parents=True)
    (shared / "config/database.yml").write_text(DATABASE_YML.format(name=name, app=app))
    return f"{name},{ip}{',' + latency_ip(ip) if etc_hosts is not None else ''} {host_key}"


def _make_app_repo(dir: Path) -> None:
    repo = dir / "app"
    shutil.copytree(FILES / "app", repo, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # The user's git config (templates, hooks, signing) must not shape the sample repo.
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.name", "fabdeploy sandbox"],
        ["config", "user.email", "sandbox@fabdeploy.invalid"],
        ["add", "-A"],
        ["commit", "-q", "-m", "initial"],
    ):
        _run(["git", *args], cwd=repo, env=env)


def _write_client_files(
    dir: Path,
    hosts: dict[str, str],
    known: list[str],
    via_proxy: bool = False,
    gateway: str | None = None,
) -> None:
    (dir / "known_hosts").write_text("".join(line + "\n" for line in known))
    blocks = [
        f"Host {name}\n"
        f"    HostName {latency_ip(ip) if via_proxy else ip}\n"
        + (f"    ProxyJump {gateway}\n" if gateway and name != gateway else "")
        + "    User root\n"
        f"    IdentityFile {dir / 'id_ed25519'}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {dir / 'known_hosts'}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n"
        "    BatchMode yes\n"
        for name, ip in hosts.items()
    ]
    (dir / "ssh_config").write_text("\n".join(blocks))


def _write_deploy_files(dir: Path, hosts: dict[str, str], endpoint: str, app: str) -> None:
    node_env = "\n".join(f"  {k}: {v}" for k, v in AWS_ENV.items())
    (dir / "deploy.yml").write_text(
        DEPLOY_YML.format(
            app=app,
            bucket=BUCKET,
            region=REGION,
            endpoint=endpoint,
            hosts=", ".join(hosts),
            node_env=node_env,
        )
    )
    exports = {**AWS_ENV, "DEPLOY_CONFIG": str(dir / "deploy.yml")}
    (dir / "env").write_text("".join(f"export {k}={v}\n" for k, v in exports.items()))


# --- up / down ------------------------------------------------------------------------------


def _check_prerequisites(dir: Path, hosts: int, subnet: str, app: str) -> None:
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (namespaces and mounts); run as root")
    for tool in ("/usr/sbin/sshd", HOST_PYTHON):
        if not os.access(tool, os.X_OK):
            raise SandboxError(
                f"{tool} not found; install it (apt-get install openssh-server python3)"
            )
    for tool in ("unshare", "ssh-keygen", "git", "mount"):
        if shutil.which(tool) is None:
            raise SandboxError(f"`{tool}` not found on PATH; install it")
    if not 1 <= hosts <= 254:
        raise SandboxError(f"hosts must be between 1 and 254, not {hosts}")
    parts = subnet.split(".")
    if len(parts) != 3 or parts[0] != "127" or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise SandboxError(f"subnet must look like 127.X.Y (loopback), not {subnet!r}")
    if not app.isidentifier():
        raise SandboxError(f"app must be a simple name like 'shop', not {app!r}")
    if any(c.isspace() for c in str(dir)):
        raise SandboxError(f"state dir {dir} contains whitespace; ssh_config cannot use it")
    for private in PRIVATE_DIRS:
        if dir == Path(private) or Path(private) in dir.parents:
            raise SandboxError(
                f"state dir {dir} is under {private}, which hosts mount over; use another dir"
            )


def up(
    dir: Path,
    hosts: int = 3,
    subnet: str = "127.0.10",
    s3_port: int = 9555,
    reboot_delay: float = 1.0,
    app: str = "shop",
    rtt: float = 0.0,
    handshake: bool = True,
    private_port: int | None = None,
    private_net: bool = False,
) -> Sandbox:
    """Start the fleet and S3; returns once every sshd shows its banner and S3 has the bucket.

    private_net: the fleet in its own network namespace behind a bastion, "gw" (see "private
    network" above); ssh_config reaches every host through it (ProxyJump gw).

    rtt > 0 puts the latency proxy between the deploying machine and the fleet and its S3
    (see the module doc); handshake=False leaves out the round trip it charges per connection.
    private_port: the sample app also serves on that port, which the proxy does not forward:
    with rtt > 0 only the host itself reaches it, as with a node behind a bastion.
    """
    started = time.monotonic()
    dir = Path(dir).resolve()
    _check_prerequisites(dir, hosts, subnet, app)
    dir.mkdir(parents=True, exist_ok=True)
    _refuse_if_running(dir)
    addrs = {f"web{k}": f"{subnet}.{k}" for k in range(1, hosts + 1)}
    if not 0 <= rtt <= 10:
        raise SandboxError(f"rtt must be between 0 and 10 seconds, not {rtt}")
    via_proxy = rtt > 0
    gateway = GATEWAY if private_net else None
    if private_net:
        if via_proxy or hosts > 252:
            raise SandboxError("private_net takes no rtt and at most 252 hosts")
        if shutil.which("ip") is None or shutil.which("nsenter") is None:
            raise SandboxError("private_net needs `ip` and `nsenter` (apt-get install iproute2)")
        addrs = {f"web{k}": private_ip(subnet, k) for k in range(1, hosts + 1)}
    # Every host the sandbox runs: the fleet, and the bastion with private_net.
    machines = {**addrs, GATEWAY: private_ip(subnet, GATEWAY_HOST)} if private_net else addrs
    if private_port is not None and (
        private_port in (*PROXIED_PORTS, s3_port) or not 0 < private_port < 65536
    ):
        raise SandboxError(
            f"private_port {private_port} must be a free port other than {PROXIED_PORTS} and S3's"
        )
    if via_proxy and s3_port in PROXIED_PORTS:
        raise SandboxError(
            f"s3_port {s3_port} is a proxied host port; pick another (0 = any free port)"
        )
    listen = list(addrs.values()) + ([latency_ip(ip) for ip in addrs.values()] if via_proxy else [])
    # A private net's addresses are in its own namespace, which up replaces.
    busy = [f"{ip}:22" for ip in listen if not private_net and _listening(ip, 22)]
    if busy:
        raise SandboxError(
            f"{', '.join(busy)} already in use (another sandbox?); `fab sandbox.down` it or pick another subnet"
        )
    for name in GENERATED:
        path = dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    client_key = _keygen(dir / "id_ed25519", "fabdeploy-sandbox")
    (dir / "authorized_keys").write_text(client_key + "\n")
    s3host = s3_name(subnet)
    host_hosts = _host_etc_hosts(s3host) if via_proxy else None
    known = [_prepare_host(dir, n, ip, app, host_hosts, private_port) for n, ip in machines.items()]
    # Every hotfix runs systemctl on every host: its logic's bytecode is there before the first
    # call, compiled by the Python that runs it (one process for the whole fleet).
    impls = [host_dir(dir, n) / "usr_local/upper/bin/systemctl_impl.py" for n in machines]
    _run([HOST_PYTHON, "-m", "py_compile", *map(str, impls)])

    s3_pid, port = _spawn_s3(dir, s3_port)
    direct = f"http://127.0.0.1:{port}"
    endpoint = f"http://{s3host}:{port}" if via_proxy else direct
    if private_net:
        direct = endpoint = f"http://{private_ip(subnet, OUTSIDE_HOST)}:{port}"
    host_env = {"PATH": HOST_PATH, "LANG": "C.UTF-8"}
    pids: dict[str, int] = {}
    state = {
        "dir": str(dir),
        "hosts": addrs,
        "pids": pids,
        "s3": {"pid": s3_pid, "port": port, "endpoint": endpoint, "direct": direct},
        "bucket": BUCKET,
        "app": app,
        "subnet": subnet,
        "reboot_delay": reboot_delay,
    }
    if private_net:
        state.update(hosts=machines, private_net=True, gateway=GATEWAY)
    try:
        if private_net:
            (dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # down() undoes it
            _private_net_up(subnet, list(addrs.values()))
            # The fleet's way to S3: a delay-free relay on this side of the veth.
            routes = [[private_ip(subnet, OUTSIDE_HOST), port, "127.0.0.1", port, False]]
            state["proxy"] = {"pid": None, "rtt": 0.0, "handshake": False, "routes": routes}
            state["proxy"]["pid"] = _spawn_proxy(dir, 0.0, routes, False)
        if via_proxy:
            routes = _proxy_routes(addrs, subnet, port)
            state["proxy"] = {
                "pid": None,
                "rtt": rtt,
                "handshake": handshake,
                "routes": routes,
                "s3_name": s3host,
                "s3_ip": _s3_proxy_ip(subnet),
            }
            state["proxy"]["pid"] = _spawn_proxy(dir, rtt, routes, handshake)
            (dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            _set_etc_hosts(s3host, _s3_proxy_ip(subnet), dir)
        for name, ip in machines.items():
            hdir = host_dir(dir, name)
            enter = ["nsenter", f"--net=/run/netns/{netns_name(subnet)}"] if private_net else []
            cmd = [
                *enter,
                "unshare",
                "--mount",
                "--pid",
                "--uts",
                "--fork",
                "--mount-proc",
                "--kill-child",
                HOST_PYTHON,
                str(FILES / "host_init.py"),
                "--name",
                name,
                "--ip",
                ip,
                "--host-dir",
                str(hdir),
                "--reboot-delay",
                str(reboot_delay),
            ]
            pids[name] = _spawn(cmd, hdir / "log" / "init.log", env=host_env)
        (dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

        # Overlaps with the hosts' and moto's start-up.
        _make_app_repo(dir)
        _write_client_files(dir, machines, known, via_proxy, gateway)
        _write_deploy_files(dir, addrs, endpoint, app)

        deadline = time.monotonic() + READY_TIMEOUT
        pending = dict(machines)
        while pending:
            for name, ip in list(pending.items()):
                log = host_dir(dir, name) / "log" / "init.log"
                if _booted(dir, name) if private_net else _ssh_banner(ip):
                    del pending[name]
                elif not _alive(pids[name]):
                    raise SandboxError(f"{name} died while booting; see {log}")
                elif time.monotonic() > deadline:
                    raise SandboxError(
                        f"{name} did not answer on {ip}:22 within {READY_TIMEOUT:.0f}s; see {log}"
                    )
            if pending:
                time.sleep(POLL)
        _wait_s3(dir, s3_pid, port, BUCKET, deadline)
        if via_proxy or private_net:
            _wait_proxy(dir, state["proxy"]["pid"], deadline)
    except BaseException:
        # Whatever was started is recorded, so down() can stop it.
        (dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        down(dir)
        raise
    state["up_seconds"] = round(time.monotonic() - started, 3)
    (dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return _sandbox(dir, machines, endpoint, BUCKET, rtt=rtt, s3_direct=direct, gateway=gateway)


def down(dir: Path) -> list[str]:
    """Stop every process recorded in `dir`; returns e.g. ["web1 (pid 123)", "s3 (pid 456)"]."""
    dir = Path(dir).resolve()
    stopped: list[str] = []
    kills: list[int] = []
    ports: list[tuple[str, int]] = []
    state = _read_json(dir / STATE_FILE) or {}
    for name, pid in state.get("pids", {}).items():
        ports.append((state["hosts"][name], 22))
        if _ours(pid, str(host_dir(dir, name))):
            # The host's PID 1 exits only once every process in its namespace is gone.
            kills += _child_pids(pid)
            # --kill-child: the host's PID 1 gets SIGKILL, and with it the whole PID namespace.
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)
            stopped.append(f"{name} (pid {pid})")
    s3 = _read_json(dir / S3_STATE_FILE)
    if s3:
        ports.append(("127.0.0.1", s3["port"]))
        if _ours(s3["pid"], _moto_marker(s3["port"])):
            os.kill(s3["pid"], signal.SIGTERM)
            kills.append(s3["pid"])
            stopped.append(f"s3 (pid {s3['pid']})")
    proxy = state.get("proxy")
    if proxy:
        ports += [(r[0], r[1]) for r in proxy["routes"]]
        pids = _stop_proxy(dir, proxy)
        kills += pids
        stopped += [f"latency proxy (pid {p})" for p in pids]
        if proxy.get("s3_name"):
            _set_etc_hosts(proxy["s3_name"], None, dir)
    left = _wait_gone(kills, STOP_TIMEOUT)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    left = _wait_gone(left, STOP_TIMEOUT)
    if left:
        raise SandboxError(f"processes {left} did not exit after SIGKILL; check `ps -p {left[0]}`")
    deadline = time.monotonic() + STOP_TIMEOUT
    while busy := [f"{ip}:{port}" for ip, port in ports if _listening(ip, port)]:
        if time.monotonic() > deadline:
            raise SandboxError(
                f"{', '.join(busy)} still listening after down; find the owner with `ss -ltnp`"
            )
        time.sleep(POLL)
    if state.get("private_net"):
        _private_net_down(state["subnet"])
    (dir / STATE_FILE).unlink(missing_ok=True)
    (dir / S3_STATE_FILE).unlink(missing_ok=True)
    (dir / "proxy.ready").unlink(missing_ok=True)
    return stopped
