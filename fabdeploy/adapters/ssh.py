"""The fleet: which hosts, how we reach them, and running work on many at once.

Fabric 3 auto-adds unknown host keys; every Connection made here checks
known_hosts strictly (gateways too) unless deploy.yml opts out. Work on many hosts
runs in a bounded pool, one Connection per host, and every host's outcome is
collected — nothing is lost when one host fails.
"""

from __future__ import annotations

import functools
import io
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fabric import Config as FabricConfig
from fabric import Connection

from fabdeploy.basics.config import Config, Host
from fabdeploy.basics.errors import ConfigError, HostError

# --- connections ---------------------------------------------------------------


class _FabricConfigCache:
    """The base Fabric config of a run, with its ssh_config parsed once, not once per host."""

    _lock = threading.Lock()
    _cache: dict[tuple[int, str], tuple[Any, FabricConfig]] = {}

    @classmethod
    def get(cls, cfg: Config) -> FabricConfig:
        key = (id(cfg.fabric), str(cfg.ssh.config or ""))
        with cls._lock:
            hit = cls._cache.get(key)
            if hit is None or hit[0] is not cfg.fabric:
                if cfg.ssh.config and not cfg.ssh.config.exists():
                    raise ConfigError(f"{cfg.path}: ssh.config {cfg.ssh.config} does not exist")
                if cfg.fabric is not None:
                    # The task's own config: ~/.fabric.yaml, FABRIC_* env, -f, -i, prompts.
                    fc = cfg.fabric.clone()
                    if cfg.ssh.config and str(cfg.ssh.config) != getattr(
                        fc, "_runtime_ssh_path", None
                    ):
                        import paramiko

                        fc.base_ssh_config = paramiko.SSHConfig.from_path(str(cfg.ssh.config))
                else:
                    fc = FabricConfig(
                        runtime_ssh_path=str(cfg.ssh.config) if cfg.ssh.config else None, lazy=False
                    )
                    # Never read the operator's ~/.ssh/config behind deploy.yml's back when
                    # deploy.yml names one; without one, Fabric's normal lookup applies.
                    if cfg.ssh.config:
                        fc.load_ssh_config()
                hit = (cfg.fabric, fc)
                cls._cache[key] = hit
            return hit[1]


class _Connection(Connection):
    """Fabric's Connection, with commands started in one exchange instead of two.

    paramiko's exec_command sends the exec request and waits for the server's reply before
    returning, and only then does Fabric send the command's stdin: one whole round trip
    before the command's input even leaves. Here the exec request goes without that wait, the
    stdin (and its EOF) right behind it, in order on the same stream, as OpenSSH's own client
    does; the command's output and exit status come back as before. A refused exec (sshd
    answers CHANNEL_FAILURE) closes the channel: the command then has no exit status (-1),
    which every caller already treats as a failure.

    The stdin goes whole, not through invoke's stdin pump: that one reads a file-like stream
    one byte per loop and sleeps 10 ms between reads, so a 400-byte presigned URL took 4 s
    to reach the node (and one SSH packet per byte)."""

    _spare: Any = None  # a session channel opened ahead of its command (open_spare_session)
    _stdin: bytes | None = None  # the next command's whole stdin (run() sets it)

    def create_session(self) -> Any:
        channel, self._spare = self._spare, None
        if channel is None or channel.closed:
            channel = super().create_session()
        stdin, self._stdin = self._stdin, None
        channel.exec_command = functools.partial(_exec_without_waiting, channel, stdin=stdin)
        return channel


def open_spare_session(conn: Connection, timeout: float = 10.0) -> None:
    """Open the next command's session channel now, while nothing waits for it (a roll's next
    host during the reboot before it; a hotfix's hosts while the lock is taken): the command
    then costs no channel-open round trip. Best effort: without one, the command opens its own."""
    if not isinstance(conn, _Connection) or conn._spare is not None:
        return
    transport = conn.client.get_transport()
    if transport is None or not transport.is_active():
        return
    try:
        conn._spare = transport.open_session(timeout=timeout)
    except Exception:  # noqa: BLE001 - paramiko's SSHException, EOFError, socket errors
        conn._spare = None


def _exec_without_waiting(channel: Any, command: str, stdin: bytes | None = None) -> None:
    from paramiko.common import cMSG_CHANNEL_REQUEST
    from paramiko.message import Message

    if channel.closed or channel.eof_received or channel.eof_sent or not channel.active:
        import paramiko

        raise paramiko.SSHException("Channel is not open")
    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(channel.remote_chanid)
    m.add_string("exec")
    m.add_boolean(True)  # still asked: a refusal closes the channel (paramiko's _request_failed)
    m.add_string(command)
    channel.transport._send_user_message(m)
    if stdin is not None:
        # Right behind the request, in order on the same channel, then EOF: the command can
        # read its input to the end at once.
        if stdin:
            channel.sendall(stdin)
        channel.shutdown_write()


def _harden(conn: Connection, cfg: Config) -> None:
    import paramiko

    client = conn.client
    if cfg.ssh.strict_host_keys:
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    kh = cfg.ssh.known_hosts
    if kh is not None and kh.exists():
        # get_host_keys().load keeps the file read-only for us: AutoAdd (opt-out
        # mode) must not silently rewrite the operator's known_hosts.
        client.get_host_keys().load(str(kh))
    gw = conn.gateway
    if isinstance(gw, Connection):
        _harden(gw, cfg)


def _connection(
    cfg: Config,
    fc: FabricConfig,
    address: str,
    gateway: Connection | None = None,
    user: str | None = None,
) -> Connection:
    """One hop (a host or a gateway): our timeouts, identities and host-key policy on each."""
    kwargs: dict[str, Any] = {"config": fc.clone()}
    if user:
        kwargs["user"] = user
    if "timeout" not in (fc.connect_kwargs or {}):  # else `fab -t` (or fabric.yaml) already set it
        kwargs["connect_timeout"] = int(max(1, cfg.ssh.connect_timeout))
    if gateway is not None:
        kwargs["gateway"] = gateway
    connect_kwargs: dict[str, Any] = {
        "banner_timeout": cfg.ssh.connect_timeout,
        "auth_timeout": cfg.ssh.connect_timeout,
    }
    if cfg.ssh.identity_file and not cfg.ssh.identity_files:
        connect_kwargs["key_filename"] = [str(cfg.ssh.identity_file)]
    own = {k: v for k, v in dict(fc.connect_kwargs or {}).items() if k != "key_filename"}
    kwargs["connect_kwargs"] = {**own, **connect_kwargs}
    return _Connection(address, **kwargs)


def connect(cfg: Config, host: Host, *, user: str | None = None) -> Connection:
    """A Connection for one deploy.yml host, not yet opened, strict about host keys.

    The run's own connect_kwargs (prompts, ~/.fabric.yaml) come first and ours are added
    (Fabric would drop them when given any); Fabric itself merges key files (-i, config,
    IdentityFile), and deploy.yml's identity_file is added only when `fab -i` named none.
    A ProxyJump chain is built here, in its order (Fabric's own builds multi-hop chains
    backwards), and every hop gets the same timeouts, identities and host-key checks.
    """
    # Each Connection gets its own copy: Fabric configs are not safe to share between threads.
    fc = _FabricConfigCache.get(cfg)
    jump = fc.base_ssh_config.lookup(host.host).get("proxyjump")
    gateway = None
    if jump and jump.lower() != "none":
        for hop in (h.strip() for h in jump.split(",")):
            gateway = _connection(cfg, fc, hop, gateway)
    conn = _connection(cfg, fc, host.host, gateway, user=user or cfg.ssh.user)
    _harden(conn, cfg)
    return conn


def open_connection(cfg: Config, host: Host, conn: Connection) -> None:
    """Open (or reopen) the SSH session, turning paramiko's errors into one line."""
    import paramiko

    addr = f"{conn.host}:{conn.port}"
    try:
        conn.open()
    except paramiko.BadHostKeyException:
        raise HostError(
            host.name,
            f"host key of {host.name} ({addr}) does not match {cfg.ssh.known_hosts}: "
            "it CHANGED since it was recorded; refusing to connect. If the host was rebuilt, "
            "verify the new key and replace its line in known_hosts",
        ) from None
    except paramiko.SSHException as e:
        text = str(e)
        if "not found in known_hosts" in text:
            raise HostError(
                host.name,
                f"host key of {host.name} ({addr}) is not in {cfg.ssh.known_hosts}: verify it and "
                f"add it (ssh-keyscan -H {conn.host} >> {cfg.ssh.known_hosts}), "
                "or set ssh.strict_host_keys: false to skip host key checking (unsafe: nothing is remembered)",
            ) from None
        if isinstance(e, paramiko.AuthenticationException):
            raise HostError(
                host.name,
                f"authentication failed for {conn.user}@{host.name} ({addr}): check ssh.user, "
                "the key (IdentityFile in ssh_config or ssh.identity_file) and authorized_keys",
            ) from None
        raise HostError(host.name, f"SSH to {host.name} ({addr}) failed: {text}") from None
    except EOFError:
        # sshd accepted and hung up mid-handshake: typical of a host going down or booting.
        raise HostError(
            host.name,
            f"cannot connect to {host.name} ({addr}): sshd closed the connection during the handshake",
        ) from None
    except TimeoutError:
        raise HostError(
            host.name,
            f"cannot connect to {host.name} ({addr}): timed out after {cfg.ssh.connect_timeout:g}s; "
            "is the host up and reachable?",
        ) from None
    except OSError as e:
        reason = getattr(e, "strerror", None) or str(e)
        if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
            reason = "connection refused"
        raise HostError(
            host.name,
            f"cannot connect to {host.name} ({addr}): {reason}; is the host up and sshd running?",
        ) from None
    transport = conn.client.get_transport()
    hop: Any = conn
    while isinstance(hop, Connection):  # the host, then each gateway it was reached through
        transport = hop.client.get_transport()
        if transport is not None:
            # paramiko's keepalive only sends (it never waits for a reply), so it keeps a NAT
            # mapping alive but cannot notice a dead peer; TCP keepalive on the socket can.
            transport.set_keepalive(cfg.ssh.keepalive)
            _tcp_keepalive(transport.sock, cfg.ssh.keepalive)
        hop = hop.gateway


def _tcp_keepalive(sock: Any, idle: int) -> None:
    if not isinstance(
        sock, socket.socket
    ):  # through a gateway: a channel, the gateway's socket has it
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", max(1, idle // 3)),
        ("TCP_KEEPCNT", 3),
    ):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


@dataclass
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int


def run(
    cfg: Config,
    host: Host,
    conn: Connection,
    command: str,
    *,
    timeout: float | None = None,
    stdin: str | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
) -> CommandResult:
    """Run one remote command; never raises on a non-zero exit (callers decide).

    `stdin` is sent to the command's stdin, then EOF: the way to hand it a secret (a
    presigned URL, a sudo password) that must not appear in its argv, where every local user
    can read it. `on_stderr_line` gets each complete line of stderr as it arrives (stderr
    is still collected in the result)."""
    from invoke.exceptions import CommandTimedOut

    open_connection(cfg, host, conn)
    if cfg.fabric is not None and cfg.fabric.run.echo:  # fab -e
        print(f"{host.name}$ {command}", flush=True)
    in_stream: Any = False
    data = stdin.encode() if stdin is not None else None
    if data is not None and isinstance(conn, _Connection) and len(data) <= INLINE_STDIN:
        conn._stdin = data  # sent with the exec request (_exec_without_waiting)
    elif stdin is not None:
        # Bigger than the channel's window could take at once: written by invoke's stdin
        # thread while the output is read, so a command that answers before it reads cannot
        # block both ends.
        in_stream = _WholeStream(stdin)
    kwargs: dict[str, Any] = {"hide": True, "warn": True, "pty": False, "in_stream": in_stream}
    sink = None
    if on_stderr_line is not None:
        sink = LineSink(on_stderr_line)
        kwargs.update(hide="stdout", err_stream=sink)  # stderr goes to the sink as it arrives
    limit = timeout or cfg.ssh.command_timeout
    started = time.monotonic()
    try:
        try:
            r = conn.run(command, timeout=limit, **kwargs)
        finally:
            if isinstance(conn, _Connection):
                conn._stdin = None  # never handed to a later command if this one never started
            if sink is not None:
                sink.close()
    except CommandTimedOut as e:
        raise HostError(
            host.name,
            f"command on {host.name} timed out after {e.timeout:g}s: {command[:120]}",
            command=command,
            session_ended=True,
            output=(e.result.stdout or "") + (e.result.stderr or ""),
        ) from None
    except (EOFError, OSError) as e:
        raise HostError(
            host.name,
            f"connection to {host.name} lost while running a command ({e or type(e).__name__})",
            command=command,
            session_ended=True,
        ) from None
    except Exception as e:  # paramiko raises a zoo of types when a session dies
        import paramiko

        if isinstance(e, paramiko.SSHException):
            raise HostError(
                host.name,
                f"connection to {host.name} lost: {e}",
                command=command,
                session_ended=True,
            ) from None
        raise
    if r.exited in (None, -1) and time.monotonic() - started >= limit:
        # invoke's timer closed the channel but, racing with the close, returned a result
        # without an exit status (None, or paramiko's -1) instead of raising CommandTimedOut:
        # still a timeout.
        raise HostError(
            host.name,
            f"command on {host.name} timed out after {limit:g}s: {command[:120]}",
            command=command,
            session_ended=True,
            output=(r.stdout or "") + (r.stderr or ""),
        )
    return CommandResult(r.stdout, r.stderr, r.exited if r.exited is not None else -1)


# A command's stdin up to this size leaves with its exec request: well inside the window sshd
# opens a session channel with (OpenSSH: 2 MiB), so sending it never waits for the command.
INLINE_STDIN = 64 * 1024


class _WholeStream(io.StringIO):
    """For invoke's stdin pump (a plain Connection): it asks for one byte per 10 ms loop;
    this answers with everything left, so the input goes in one write and EOF follows."""

    def read(self, size: int | None = -1) -> str:
        return super().read()


class LineSink:
    """A write-only stream that hands on whole lines: chunks split mid-line wait for their
    end, so lines from many hosts never interleave. `close` flushes a last partial line."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line
        self._buf = ""

    def write(self, data: str) -> int:
        self._buf += data
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self._deliver(line)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._buf:
            line, self._buf = self._buf, ""
            self._deliver(line)

    def _deliver(self, line: str) -> None:
        try:
            self._on_line(line.rstrip("\r"))
        except Exception:  # noqa: BLE001 - showing output must never break the command
            pass


def q(*args: str) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


# --- sudo: only for what needs root -----------------------------------------------------

SUDO_REFUSED = 96  # exit code of a `sudo -n -l` pre-check that found no right


def sudo_password(cfg: Config) -> str | None:
    """Fabric's sudo password (`fab --prompt-for-sudo-password`, or sudo.password in its config)."""
    fc = cfg.fabric
    if fc is None:
        return None
    pw = (fc.get("sudo") or {}).get("password")
    return None if pw is None else str(pw)


def as_root(cfg: Config, command: str, *, sudo: bool) -> tuple[str, str | None]:
    """`command` as root: as is (already root), else through sudo; a password goes on stdin.

    Without a password, `sudo -n` fails at once instead of waiting for one.
    """
    if not sudo:
        return command, None
    pw = sudo_password(cfg)
    if pw is None:
        return f"sudo -n -- {command}", None
    return f"sudo -S -p '' -- {command}", pw + "\n"


def sudo_right_check(cfg: Config, command: str) -> tuple[str, str | None]:
    """A command (and its stdin) that exits SUDO_REFUSED unless the SSH user may run `command`
    through sudo: `sudo -n -l` (never a prompt), or with a password `sudo -S -l`, the password
    on stdin (never argv), so a wrong one is found too. Nothing is run but the lookup."""
    pw = sudo_password(cfg)
    if pw is None:
        return f"sudo -n -l -- {command} >/dev/null 2>&1 || exit {SUDO_REFUSED}", None
    # stderr kept: sudo's own words ("incorrect password attempt") go into the one line.
    return f"sudo -S -p '' -l -- {command} >/dev/null || exit {SUDO_REFUSED}", pw + "\n"


_SUDO_SAYS = (
    "a password is required",
    "is not allowed to execute",
    "is not in the sudoers file",
    "incorrect password",
    "no password was provided",
    "a terminal is required",
    "may not run sudo",
)


def sudo_refusal(
    host: Host, user: str | None, what: str, r: CommandResult, *, hint: str = ""
) -> HostError | None:
    """The one line for a sudo that said no (or is missing); None if sudo was not the problem."""
    if r.exit_code == 0:
        return None
    text = (r.stderr or "") + (r.stdout or "")
    if r.exit_code == SUDO_REFUSED or any(s in text for s in _SUDO_SAYS):
        lines = [ln.strip() for ln in text.splitlines()]
        said = next(
            (ln for ln in lines if any(s in ln for s in _SUDO_SAYS)),
            next((ln for ln in lines if "sudo" in ln.lower()), ""),
        )
        return HostError(
            host.name,
            f"{host.name}: {user or 'the SSH user'} may not run `sudo {what}`"
            + (f" ({said})" if said else "")
            + ": "
            + (
                hint
                or (
                    "the sudo password is wrong: give the right one to fab "
                    "--prompt-for-sudo-password"
                    if "incorrect password" in text
                    else "add it to the sudoers drop-in (fab deploy.export-node --sudoers), or "
                    "give fab --prompt-for-sudo-password"
                )
            ),
            command=what,
            exit_code=r.exit_code,
            output=text,
        )
    if r.exit_code == 127 and "sudo" in text and "not found" in text:
        return HostError(
            host.name,
            f"{host.name}: sudo is not installed (needed for `{what}`): "
            "apt-get install sudo (or dnf install sudo)",
            command=what,
            exit_code=127,
        )
    return None


# --- many hosts at once ---------------------------------------------------------


@dataclass
class HostResult:
    host: str
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


class Preconnect:
    """SSH connections opened ahead of the work, while the deploying machine does its S3 work
    (bundle check, lock): at a real network's latency the SSH handshake (TCP, banners, key
    exchange, auth: several round trips) then costs nothing on the critical path.

    Opening a connection changes nothing on a host, so it may start before the deploy lock is
    held; the work itself only starts once it is. `take` hands a connection (or the one-line
    HostError its opening raised) to the worker of that host, once; `close` closes the ones
    nobody took (a lock held by someone else, a failed bundle)."""

    def __init__(self, cfg: Config, hosts: Iterable[Host]) -> None:
        hosts = list(hosts)
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, len(hosts)), thread_name_prefix="preconnect"
        )
        self._lock = threading.Lock()
        self._futures: dict[str, Any] = {
            h.name: self._pool.submit(self._open, cfg, h) for h in hosts
        }

    @staticmethod
    def _open(cfg: Config, host: Host) -> Connection:
        conn = connect(cfg, host)
        try:
            open_connection(cfg, host, conn)
        except BaseException:
            _close_quietly(conn)
            raise
        open_spare_session(conn)
        return conn

    def take(self, host: Host) -> Connection | None:
        """The host's opened connection, once; None if none was started for it, or if opening
        it failed or it died since: it was opened early (a slow bundle build, a lock held by
        someone else's roll rebooting that host then), so the worker connects afresh and
        reports what happens now."""
        with self._lock:
            f = self._futures.pop(host.name, None)
        if f is None or f.exception() is not None:
            return None
        conn = f.result()
        transport = conn.client.get_transport()
        if transport is None or not transport.is_active():
            _close_quietly(conn)
            return None
        return conn

    def close(self) -> None:
        with self._lock:
            left, self._futures = list(self._futures.values()), {}

        def close_opened(f: Any) -> None:
            if f.exception() is None:
                _close_quietly(f.result())

        for f in left:
            f.add_done_callback(close_opened)
        self._pool.shutdown(wait=False)

    def __enter__(self) -> Preconnect:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a dead session: nothing to report
        pass


def run_parallel(
    cfg: Config,
    targets: Iterable[Host],
    work: Callable[[Host, Connection], dict[str, Any]],
    *,
    parallel: int | None = None,
    on_done: Callable[[HostResult], None] | None = None,
    pre: Preconnect | None = None,
) -> list[HostResult]:
    """Run `work` on every host, at most `parallel` at a time; collect every outcome.

    `pre`: connections already being opened (see Preconnect); hosts without one connect here."""
    targets = list(targets)
    size = max(1, min(parallel or cfg.parallel, len(targets) or 1))

    def one(host: Host) -> HostResult:
        start = time.monotonic()
        conn = None
        try:
            conn = (pre.take(host) if pre is not None else None) or connect(cfg, host)
            data = work(host, conn)
            res = HostResult(host.name, True, data or {})
        except HostError as e:
            res = HostResult(host.name, False, e.data, e.message)
        except ConfigError as e:
            res = HostResult(host.name, False, {}, str(e))
        except Exception as e:  # one host's bug must not hide the other hosts' outcomes
            res = HostResult(
                host.name, False, {}, f"unexpected error on {host.name}: {type(e).__name__}: {e}"
            )
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
        res.seconds = time.monotonic() - start
        if on_done:
            on_done(res)
        return res

    with ThreadPoolExecutor(max_workers=size, thread_name_prefix="fleet") as pool:
        results = list(pool.map(one, targets))
    return results
