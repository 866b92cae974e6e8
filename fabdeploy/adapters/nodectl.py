"""The controller's side of the node program (fabfile/node.py).

The node program is installed on every host with its config next to it and a
oneshot boot unit. Hotfix, rollback and status all call it, and so does the boot
unit, so the release layout can never drift between the two paths. Every call
is guarded by a fingerprint of what is installed: a host with an old or missing
node program is (re)installed on the way, in the same connection.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fabric import Connection

from fabdeploy.adapters import signing
from fabdeploy.adapters.ssh import SUDO_REFUSED, as_root, q, run, sudo_password, sudo_refusal
from fabdeploy.basics.config import Config, Host, for_host, linked_sources
from fabdeploy.basics.errors import ConfigError, HostError
from fabdeploy.basics.output import host_line

NODE_SRC = Path(__file__).resolve().parent.parent / "node" / "node.py"
NEEDS_INSTALL = 97  # exit code of the guard: node program missing or different
# The boot unit's cgroup memory cap: a hostile bundle must not take the host down at boot.
# The node itself needs well under 200 MB (boto3 included); before_swap hooks share the cap.
BOOT_MEMORY_MAX = "1G"
MIN_PYTHON = (3, 8)


def node_json(cfg: Config, host: Host | None = None) -> dict[str, Any]:
    """node.json for `host`: its roles' restart and health (see roles: in deploy.yml)."""
    roles = list(host.roles) if host is not None else []
    if host is not None:
        cfg = for_host(cfg, host)
    return {
        "app": cfg.app,
        "deploy_to": cfg.deploy_to,
        "keep_releases": cfg.keep_releases,
        "linked_files": list(cfg.linked_files),
        "linked_dirs": list(cfg.linked_dirs),
        "s3": {
            "bucket": cfg.s3.bucket,
            "prefix": cfg.s3.prefix,
            "region": cfg.s3.region,
            "endpoint_url": cfg.s3.endpoint_url,
        },
        "env": dict(cfg.node_env),
        "hooks": {
            stage: [h.to_json() for h in getattr(cfg.hooks, stage)]
            for stage in ("before_swap", "after_swap", "after_restart")
            if getattr(cfg.hooks, stage)
        },
        **({"stage": cfg.stage} if cfg.stage else {}),  # STAGE in hooks' environment
        "restart": cfg.restart,
        # With ssh.sudo the node runs restart through sudo (its password, if any, on stdin).
        **({"sudo": True} if cfg.ssh.sudo else {}),
        "boot": {
            "attempts": cfg.node.boot_attempts,
            "first_boot_attempts": cfg.node.first_boot_attempts,
            "backoff": cfg.node.boot_backoff,
            "max_backoff": max(cfg.node.boot_backoff, 10.0),
            "max_seconds": cfg.node.boot_max_seconds,
        },
        "download_timeout": cfg.node.download_timeout,
        "max_files": cfg.node.max_files,
        "lock_timeout": cfg.node.lock_timeout,
        # The node checks health itself after a restart (and `status --after-boot` after a
        # reboot) unless health.on is controller: then it leaves that to the deploying machine.
        "health": {
            "on": cfg.health.on,
            "url": cfg.health.url,
            "command": cfg.health.command,
            "timeout": cfg.health.timeout,
            "interval": cfg.health.interval,
            "expect_status": cfg.health.expect_status,
        },
        # Only when the host has roles: a fleet without roles keeps its node.json and fingerprint.
        **({"roles": roles} if roles else {}),
        "signing": {
            "signers": signers_path(cfg) if cfg.signing.allowed_signers else None,
            "allow_unsigned": cfg.signing.allow_unsigned,
        },
        "link_unchanged": cfg.node.link_unchanged,
        # After each boot the node puts its outcome and health in S3 ({prefix}/nodes/), where a
        # roll reads them instead of logging in (node.py report).
        "report": True,
        # Only with sourced linked files: other fleets keep their node.json and fingerprint.
        **({"shared_config": shared_config_json(cfg)} if linked_sources(cfg) else {}),
    }


def shared_config_json(cfg: Config) -> dict[str, Any]:
    """What a node needs to fetch linked files from their sources itself: the sources, and the
    endpoints spelled out (Debian 12's boto3 1.26 ignores AWS_ENDPOINT_URL)."""
    cs = cfg.config_sources
    return {
        "files": [{"path": path, **src.to_json()} for path, src in linked_sources(cfg).items()],
        "region": cs.region or cfg.s3.region,
        "ssm_endpoint_url": cs.ssm_endpoint_url,
        "secretsmanager_endpoint_url": cs.secretsmanager_endpoint_url,
    }


def signers_path(cfg: Config) -> str:
    """Where nodes keep the trusted signers: root's file in a root-owned folder, outside
    node_dir, which a deploy user owns (and could otherwise rename a new file into)."""
    return f"/etc/fabdeploy/{cfg.app}/allowed_signers"


def unit_text(cfg: Config) -> str:
    d = cfg.node_dir
    before = f"Before={cfg.node.app_unit}\n" if cfg.node.app_unit else ""
    # The node program runs as the deploy user, at boot too, so releases stay theirs. Nothing
    # at boot needs root: being ordered Before= the app unit, the app starts on the new
    # release without a restart.
    user = f"User={cfg.run_as}\n" if cfg.run_as else ""
    return (
        "# Written by fabdeploy (fab deploy.setup). On every boot, activate the published\n"
        f"# {cfg.app} bundle from S3 before the app starts; on failure keep the last good release.\n"
        "[Unit]\n"
        f"Description=fabdeploy: activate the published {cfg.app} bundle\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        f"{before}"
        "\n[Service]\n"
        "Type=oneshot\n"
        f"{user}"
        f"ExecStart={cfg.node.python} -I {d}/node.py --config {d}/node.json boot\n"
        "RemainAfterExit=yes\n"
        # Past the node program's own budget, so systemd never kills a boot that would still finish.
        f"TimeoutStartSec={int(cfg.node.boot_max_seconds) + 60}\n"
        f"MemoryMax={BOOT_MEMORY_MAX}\n"
        "\n[Install]\n"
        "WantedBy=multi-user.target\n"
    )


@lru_cache(maxsize=1)
def _node_src() -> bytes:
    return NODE_SRC.read_bytes()


def files(cfg: Config, host: Host | None = None) -> dict[str, bytes]:
    out = {
        "node.py": _node_src(),
        "node.json": (json.dumps(node_json(cfg, host), indent=2, sort_keys=True) + "\n").encode(),
        "unit": unit_text(cfg).encode(),
    }
    signers = signing.signers_text(cfg)
    if signers is not None:
        out["allowed_signers"] = signers
    return out


def fingerprint(cfg: Config, host: Host | None = None) -> str:
    """What is installed on `host` (per role: its node.json differs), as one sha256."""
    h = hashlib.sha256()
    for name, data in sorted(files(cfg, host).items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def unit_path(cfg: Config) -> str:
    return f"/etc/systemd/system/{cfg.boot_unit}"


def node_command(cfg: Config, *args: str) -> str:
    d = cfg.node_dir
    # Imported rather than run as a script so Python caches its bytecode: every host
    # compiling 1500 lines on every call is measurable when many hosts share CPUs.
    # -I (isolated): no working directory on sys.path (a json.py in the SSH user's home
    # would replace the real module), no user site-packages, no PYTHON* variables.
    boot = f"import sys; sys.path.insert(0, {d!r}); import node; sys.exit(node.main())"
    return q(cfg.node.python, "-I", "-c", boot, "--config", f"{d}/node.json", *args)


def guarded(
    cfg: Config,
    *args: str,
    stdin: bool = False,
    host: Host | None = None,
    remove_after: str | None = None,
) -> str:
    """Run the node program only if the installed one is exactly ours (one round trip).

    With `stdin`, the guard reads stdin to its end before it gives up, as the node program
    does: the sender must never write into a channel that is already closed.
    With ssh.sudo, a call that will restart first asks sudo whether the restart is allowed,
    so a missing right (or a wrong password) fails before anything changes: `sudo -n -l`, or
    with a password (stdin's first line, `--sudo-stdin`) `sudo -S -l` fed by printf, a shell
    builtin, from a shell variable: the node program then gets the same stdin back, and the
    password is in no process's argv.
    With `remove_after`, that file is removed once the node program ends (or sudo refuses),
    whatever the outcome, in the same command (not when the guard bails: the call is retried
    after the install)."""
    sha = f"{cfg.node_dir}/node.sha"
    drain = "cat >/dev/null; " if stdin else ""
    rm = f"rm -f -- {q(remove_after)}; " if remove_after is not None else ""
    check = ""
    restart = (for_host(cfg, host) if host is not None else cfg).restart  # its role's, if any
    feed = ""
    if cfg.ssh.sudo and restart and "--restart" in args and "--sudo-stdin" in args:
        check = (
            f"""IFS= read -r pw; printf '%s\\n' "$pw" | sudo -S -p '' -l -- {restart} >/dev/null """
            f"|| {{ {drain}{rm}exit {SUDO_REFUSED}; }}; "
        )
        feed = """{ printf '%s\\n' "$pw"; cat; } | """
    elif cfg.ssh.sudo and restart and "--restart" in args and sudo_password(cfg) is None:
        check = (
            f"sudo -n -l -- {restart} >/dev/null 2>&1 || {{ {drain}{rm}exit {SUDO_REFUSED}; }}; "
        )
    run_node = (
        f"exec {node_command(cfg, *args)}"
        if remove_after is None and not feed
        else f"{feed}{node_command(cfg, *args)}; rc=$?; {rm}exit $rc"
    )
    return (
        f'test "$(cat {q(sha)} 2>/dev/null)" = {q(fingerprint(cfg, host))} || {{ {drain}exit {NEEDS_INSTALL}; }}; '
        f"{check}{run_node}"
    )


def parse(host: Host, command: str, stdout: str, stderr: str, code: int) -> dict[str, Any]:
    """The node program's answer: its last stdout line is one JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    raise HostError(
        host.name,
        f"node program on {host.name} gave no answer (exit {code}): "
        + ((stderr or stdout).strip().splitlines() or ["no output"])[-1],
        command=command,
        exit_code=code,
        output=stdout + stderr,
    )


def call_timeout(
    cfg: Config, host: Host, args: tuple[str, ...], timeout: float | None
) -> float | None:
    """ssh.command_timeout bounds the node's work; a restart that the node health-checks
    itself (health.on: node) gets health.timeout on top, the check's own bound."""
    health = for_host(cfg, host).health
    if (
        timeout is None
        and "--restart" in args
        and health.on == "node"
        and (health.url or health.command)
    ):
        return cfg.ssh.command_timeout + health.timeout
    return timeout


NOT_INSTALLED = 98  # exit code of an unguarded read: no node program on the host at all

# A hook's output line on the node program's stderr: `fabdeploy-node: <stage> | <line>`
# (stdout stays the machine-readable answer). The restart's own output is not relayed.
_HOOK_LINE = re.compile(r"fabdeploy-node: ([a-z_]+) \| (.*)\Z", re.S)


def hook_relay(host: Host, show: Any = host_line) -> Any:
    """A stderr-line callback that shows `host`'s hook output, prefixed by its name."""

    def on_line(line: str) -> None:
        m = _HOOK_LINE.match(line)
        if m and m.group(1) != "restart":
            show(host.name, m.group(2))

    return on_line


def call(
    cfg: Config,
    host: Host,
    conn: Connection,
    *args: str,
    timeout: float | None = None,
    stdin: str | None = None,
    remove_after: str | None = None,
    reinstall: bool = True,
) -> dict[str, Any]:
    """Call the node program; install/update it first if needed. Raises HostError on failure.
    `stdin` goes to the node program's stdin (e.g. the presigned URL for --url-stdin); a sudo
    password for the restart goes first, as its own line (never in argv). `remove_after`: a file
    on the host removed when the node program ends (see guarded)."""
    password = sudo_password(cfg) if cfg.ssh.sudo and "--restart" in args else None
    if password is not None:
        args, stdin = (*args, "--sudo-stdin"), password + "\n" + (stdin or "")
    cmd = guarded(cfg, *args, stdin=stdin is not None, host=host, remove_after=remove_after)
    timeout = call_timeout(cfg, host, args, timeout)
    relay = hook_relay(host)
    r = run(cfg, host, conn, cmd, timeout=timeout, stdin=stdin, on_stderr_line=relay)
    outdated = r.exit_code == NEEDS_INSTALL
    if outdated and not reinstall:
        # A read (status) never rewrites a host: ask the installed program, and say it is old.
        cmd = f"test -f {q(cfg.node_dir + '/node.py')} || exit {NOT_INSTALLED}; exec {node_command(cfg, *args)}"
        r = run(cfg, host, conn, cmd, timeout=timeout, stdin=stdin, on_stderr_line=relay)
        if r.exit_code == NOT_INSTALLED:
            raise HostError(
                host.name, f"{host.name}: not set up (no node program): run fab deploy.setup"
            )
    elif outdated:
        install(cfg, host, conn)
        r = run(cfg, host, conn, cmd, timeout=timeout, stdin=stdin, on_stderr_line=relay)
    if r.exit_code == SUDO_REFUSED:
        raise (
            sudo_refusal(host, cfg.ssh.user, for_host(cfg, host).restart or "", r)
            or HostError(host.name, f"{host.name}: sudo refused the restart")
        )
    data = parse(host, cmd, r.stdout, r.stderr, r.exit_code)
    if outdated and not reinstall:
        data["outdated"] = True
    if not data.get("ok"):
        raise HostError(
            host.name,
            f"{host.name}: {data.get('error') or 'node program failed'}",
            command=args[0] if args else None,
            exit_code=r.exit_code,
            output=r.stderr,
            data=data,
        )
    return data


def _probe_script(cfg: Config) -> str:
    py = q(cfg.node.python)
    wants = f"/etc/systemd/system/multi-user.target.wants/{cfg.boot_unit}"
    return (
        f"if ! test -x {py}; then echo python=missing; exit 0; fi; echo python=ok; "
        # -I as the node program runs: a boto3 in the user's site-packages does not count.
        f"echo pyver=$({py} -I -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' 2>/dev/null); "
        f"{py} -I -c 'import boto3' >/dev/null 2>&1 && echo boto3=ok || echo boto3=missing; "
        f"echo sha=$(cat {q(cfg.node_dir + '/node.sha')} 2>/dev/null); "
        f"test -e {q(wants)} && echo enabled=yes || echo enabled=no; "
        f"test -d {q(cfg.deploy_to + '/releases')} && echo layout=ok || echo layout=missing"
        + (_owner_probe(cfg) if cfg.run_as else "")
    )


def check_script(cfg: Config, host: Host) -> str:
    """deploy.check's one command per host: reads only. Sudo rights first (`sudo -n -l`, never a
    prompt), linked files in shared/, then setup's own probe (python, boto3, node, unit)."""
    hcfg = for_host(cfg, host)
    parts = []
    if cfg.ssh.sudo:
        # With a sudo password: stdin's first line (check_stdin), kept in a shell variable and
        # handed to each `sudo -S` by printf, a shell builtin: never in any process's argv.
        pw = sudo_password(cfg) is not None
        if pw:
            parts.append("IFS= read -r pw")
        for i, cmd in enumerate(c for c in (hcfg.restart, hcfg.reboot) if c):
            ask = (
                f"""printf '%s\\n' "$pw" | sudo -S -p '' -l -- {cmd}"""
                if pw
                else f"sudo -n -l -- {cmd}"
            )
            parts.append(f"{ask} >/dev/null 2>&1 && echo sudo{i}=ok || echo sudo{i}=refused")
        if pw:
            parts.append("unset pw")
    for i, f in enumerate(_provisioned(cfg)):
        parts.append(
            f"test -e {q(cfg.deploy_to + '/shared/' + f)} && echo linked{i}=ok || echo linked{i}=missing"
        )
    node = q(cfg.node_dir + "/node.py")
    # Last, and only if there is a node program: its `check` answer, one JSON line.
    own = (
        f"; if test -f {node}; then printf 'node_check=%s\\n' "
        f'"$({boot_env_command(cfg, "check")} 2>/dev/null | tail -n 1)"; fi'
    )
    return "".join(p + "; " for p in parts) + _probe_script(cfg) + own


# What systemd gives a service (the boot unit): its user's HOME, USER and LOGNAME, a PATH, and
# nothing from a login session (the sandbox's systemctl stand-in does the same).
BOOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def boot_env_command(cfg: Config, *args: str) -> str:
    """The node program as the boot unit runs it: the same user (the SSH user is the unit's
    User=), a clean environment, so S3 credentials come only from node_env or the instance
    role, never from the SSH session. SSH_CONNECTION stays: health.url's {host} is the address
    sshd was reached on, as for every other call over SSH."""
    env = (
        f"env -i {q('PATH=' + BOOT_PATH)} LANG=C.UTF-8 "
        'HOME="$HOME" USER="$(id -un)" LOGNAME="$(id -un)" SSH_CONNECTION="$SSH_CONNECTION"'
    )
    return f"{env} {node_command(cfg, *args)}"


def _provisioned(cfg: Config) -> list[str]:
    """Linked files someone must put in shared/ (the others are fetched by the node itself)."""
    sourced = linked_sources(cfg)
    return [f for f in cfg.linked_files if f not in sourced]


def check_stdin(cfg: Config) -> str | None:
    """check_script's stdin: the sudo password, if there is one and sudo is used."""
    pw = sudo_password(cfg) if cfg.ssh.sudo else None
    return None if pw is None else pw + "\n"


def check_problems(cfg: Config, host: Host, state: dict[str, str]) -> list[str]:
    """What deploy.check reports for a host, one short phrase each (empty: all good)."""
    hcfg = for_host(cfg, host)
    out = []
    if cfg.ssh.sudo:
        for i, cmd in enumerate(c for c in (hcfg.restart, hcfg.reboot) if c):
            if state.get(f"sudo{i}") != "ok":
                how = (
                    "sudo -n -l" if sudo_password(cfg) is None else "sudo -S -l, with the password"
                )
                out.append(f"{cfg.ssh.user} may not run `sudo {cmd}` ({how})")
    out += [
        f"shared/{f} is missing"
        for i, f in enumerate(_provisioned(cfg))
        if state.get(f"linked{i}") != "ok"
    ]
    need = ".".join(map(str, MIN_PYTHON))
    if state.get("python") != "ok":
        return out + [f"{cfg.node.python} is missing"]
    if _version(state.get("pyver", "")) < MIN_PYTHON:
        out.append(f"Python {state.get('pyver') or '?'} < {need}")
    if state.get("boto3") != "ok":
        out.append("boto3 is missing (the boot unit needs it)")
    if state.get("sha") != fingerprint(cfg, host):
        out.append(
            "node program/config not current (fab deploy.setup)"
            if state.get("sha")
            else "not set up (fab deploy.setup)"
        )
    if state.get("enabled") != "yes":
        out.append("boot unit not enabled")
    if cfg.run_as:
        if state.get("user") != "ok":
            out.append(f"no user {cfg.run_as}")
        elif state.get("unit") != hashlib.sha256(unit_text(cfg).encode()).hexdigest():
            out.append("boot unit not current")
        if state.get("owner") != "ok":
            out.append(f"files not {cfg.run_as}'s (fab deploy.setup)")
    return out


def _owner_probe(cfg: Config) -> str:
    """The deploy user's side of a host: the user exists, the unit is ours, nothing is root's."""
    u = q(cfg.run_as or "")
    trees = q(cfg.deploy_to, cfg.node_dir)
    return (
        f"; id -u {u} >/dev/null 2>&1 && echo user=ok || echo user=missing; "
        f"echo unit=$(sha256sum < {q(unit_path(cfg))} 2>/dev/null | cut -c1-64); "
        f"echo signers=$(sha256sum < {q(signers_path(cfg))} 2>/dev/null | cut -c1-64); "
        f'test -z "$(find {trees} ! -user {u} -print -quit 2>/dev/null)" '
        "&& echo owner=ok || echo owner=wrong"
    )


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.strip().split("."))
    except ValueError:
        return ()


def _dirs(cfg: Config) -> list[str]:
    base = cfg.deploy_to
    dirs = [cfg.node_dir, base, f"{base}/releases", f"{base}/shared", f"{base}/.fabdeploy"]
    if cfg.signing.allowed_signers is not None:
        dirs.append(str(Path(signers_path(cfg)).parent))  # root's: never chowned to the deploy user
    dirs += [f"{base}/shared/{d}" for d in cfg.linked_dirs]
    dirs += sorted({f"{base}/shared/{Path(f).parent}" for f in cfg.linked_files if "/" in f})
    return dirs


@dataclass(frozen=True)
class Admin:
    """Who does deploy.setup's root part: a login (root, or a user with full sudo)."""

    conn: Connection
    user: str | None
    sudo: bool


def install(
    cfg: Config,
    host: Host,
    conn: Connection,
    *,
    require_boto3: bool = False,
    admin: Admin | None = None,
) -> str:
    """Install or update the node program, its config and the boot unit. Idempotent.

    With a deploy user (ssh.user not root), what needs root (the unit, daemon-reload, enable,
    moving root-owned trees over) goes through `admin`; without one (a hotfix installing on
    the way) only the node program's own files are written, as the deploy user.
    """
    r = run(cfg, host, admin.conn if admin else conn, _probe_script(cfg))
    state = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    need = ".".join(map(str, MIN_PYTHON))
    if state.get("python") != "ok":
        raise HostError(
            host.name,
            f"{cfg.node.python} not found on {host.name}: install python3 >= {need} "
            "(apt-get install python3) or set node.python in deploy.yml",
        )
    if _version(state.get("pyver", "")) < MIN_PYTHON:
        raise HostError(
            host.name,
            f"{cfg.node.python} on {host.name} is Python {state.get('pyver') or 'unknown'}; the "
            f"node program needs Python >= {need}: install a newer python3 (with python3-boto3) "
            "or point node.python in deploy.yml at one",
        )
    if state.get("boto3") != "ok" and require_boto3:
        raise HostError(
            host.name,
            f"boto3 is missing for {cfg.node.python} on {host.name}; the boot unit needs it to read "
            "S3: apt-get install python3-boto3, or set node.python in deploy.yml to a Python "
            "(e.g. a venv) that has boto3",
        )
    fp = fingerprint(cfg, host)
    if cfg.run_as:
        return _install_as_user(cfg, host, conn, admin, state, fp)
    if state.get("sha") == fp and state.get("enabled") == "yes" and state.get("layout") == "ok":
        return "unchanged"
    d = cfg.node_dir
    secret = f"{d}/node.json.fabdeploy-new"
    # umask 022: deploy_to must not be group/other-writable (the node refuses that). node.json
    # holds node_env credentials: created 0600 empty here, so the upload below writes into a
    # file nobody else can read (an SFTP put creates 0644, and a chmod after it is too late).
    mk = run(
        cfg,
        host,
        conn,
        "umask 022 && mkdir -p "
        + q(*_dirs(cfg))
        + f" && rm -f {q(secret)} && (umask 077 && : > {q(secret)})",
    )
    if mk.exit_code != 0:
        raise HostError(
            host.name,
            f"cannot create directories on {host.name}: {mk.stderr.strip()}",
            command="mkdir",
            exit_code=mk.exit_code,
            output=mk.stderr,
        )
    payload = files(cfg, host)
    targets = {"node.py": f"{d}/node.py", "node.json": f"{d}/node.json", "unit": unit_path(cfg)}
    if "allowed_signers" in payload:
        targets["allowed_signers"] = signers_path(cfg)
    sftp = conn.sftp()
    try:
        for name, remote in targets.items():
            # Write beside, then rename: a boot racing with setup sees old or new, never half.
            sftp.putfo(io.BytesIO(payload[name]), remote + ".fabdeploy-new")
    except OSError as e:
        raise HostError(host.name, f"upload to {host.name} failed: {e}") from None
    moves = "; ".join(f"mv -f {q(t + '.fabdeploy-new')} {q(t)}" for t in targets.values())
    finish = (
        f"set -e; {moves}; chmod 0600 {q(d + '/node.json')}; "
        + (f"chmod 0644 {q(signers_path(cfg))}; " if "allowed_signers" in targets else "")
        + f"systemctl daemon-reload; systemctl enable {q(cfg.boot_unit)} >/dev/null; "
        f"echo {q(fp)} > {q(d + '/node.sha')}"
    )
    r2 = run(cfg, host, conn, finish)
    if r2.exit_code != 0:
        raise HostError(
            host.name,
            f"installing the boot unit on {host.name} failed (exit {r2.exit_code}): "
            + (r2.stderr.strip().splitlines() or ["no output"])[-1],
            command=finish,
            exit_code=r2.exit_code,
            output=r2.stdout + r2.stderr,
        )
    return "installed" if not state.get("sha") else "updated"


def _install_as_user(
    cfg: Config, host: Host, conn: Connection, admin: Admin | None, state: dict[str, str], fp: str
) -> str:
    user = cfg.run_as
    if state.get("user") != "ok":
        raise HostError(
            host.name,
            f"user {user} does not exist on {host.name}: create it (useradd --system "
            f"--create-home --shell /bin/sh {user}), give it your SSH key, then run fab deploy.setup",
        )
    unit_sha = hashlib.sha256(unit_text(cfg).encode()).hexdigest()
    signers = files(cfg, host).get("allowed_signers")
    signers_sha = (
        hashlib.sha256(signers).hexdigest() if signers is not None else state.get("signers")
    )
    wrong = [
        why
        for why, bad in (
            ("the boot unit is missing or different", state.get("unit") != unit_sha),
            (
                "the trusted signers (root's) are missing or different",
                state.get("signers") != signers_sha,
            ),
            ("the boot unit is not enabled", state.get("enabled") != "yes"),
            (f"{cfg.deploy_to}/releases is missing", state.get("layout") != "ok"),
            (
                f"files under {cfg.deploy_to} or {cfg.node_dir} are not {user}'s",
                state.get("owner") != "ok",
            ),
        )
        if bad
    ]
    if state.get("sha") == fp and not wrong:
        return "unchanged"
    if admin is not None:
        _install_as_root(cfg, host, admin, fp)
    elif wrong:
        raise HostError(
            host.name,
            f"{host.name}: {wrong[0]}, and fixing it needs root: run fab deploy.setup "
            f"(--admin-user=root, or an admin with full sudo, if {user} has none)",
        )
    else:
        _put_node_files(cfg, host, conn, fp)
    return "installed" if not state.get("sha") else "updated"


def _put_node_files(cfg: Config, host: Host, conn: Connection, fp: str) -> None:
    """The node program and its config, written by the deploy user who owns node_dir."""
    d = cfg.node_dir
    payload = files(cfg, host)
    secret = f"{d}/node.json.fabdeploy-new"
    # node.json holds credentials: created 0600 empty first, so the upload never makes it readable.
    run(cfg, host, conn, f"rm -f {q(secret)} && (umask 077 && : > {q(secret)})")
    try:
        sftp = conn.sftp()
        for name in ("node.py", "node.json"):
            sftp.putfo(io.BytesIO(payload[name]), f"{d}/{name}.fabdeploy-new")
    except OSError as e:
        raise HostError(
            host.name, f"upload to {d} on {host.name} failed: {e}; run fab deploy.setup"
        ) from None
    finish = (
        f"set -e; mv -f {q(d + '/node.py.fabdeploy-new')} {q(d + '/node.py')}; "
        f"mv -f {q(d + '/node.json.fabdeploy-new')} {q(d + '/node.json')}; "
        f"chmod 0600 {q(d + '/node.json')}; echo {q(fp)} > {q(d + '/node.sha')}"
    )
    r = run(cfg, host, conn, finish)
    if r.exit_code != 0:
        raise HostError(
            host.name,
            f"installing the node program on {host.name} failed: "
            + (r.stderr.strip().splitlines() or ["no output"])[-1],
            command=finish,
            exit_code=r.exit_code,
            output=r.stderr,
        )


def root_script(cfg: Config, staging: str, fp: str, signers: bool = False) -> str:
    """deploy.setup's root part for a deploy user: dirs, ownership, files, unit, enable.

    The unit and the trusted signers stay root's; the rest of node_dir is the deploy user's
    (the node program only ever runs as that user)."""
    d, unit, u = cfg.node_dir, unit_path(cfg), q(cfg.run_as or "root")
    put = [
        (f"{staging}/node.py", f"{d}/node.py", '-o "$u" -g "$g"', "0644"),
        (f"{staging}/node.json", f"{d}/node.json", '-o "$u" -g "$g"', "0600"),
        (f"{staging}/unit", unit, "-o root -g root", "0644"),
    ]
    if signers:
        put.append((f"{staging}/allowed_signers", signers_path(cfg), "-o root -g root", "0644"))
    return (
        "\n".join(
            [
                "set -e",
                "umask 022",  # deploy_to must not be group/other-writable (the node refuses that)
                f"trap {q('rm -rf ' + q(staging))} EXIT",
                f"u={u}; g=$(id -gn {u})",
                "mkdir -p " + q(*_dirs(cfg)),
                # Trees a root deploy left behind become the deploy user's (links themselves, not targets).
                f'find {q(cfg.deploy_to, d)} ! -user "$u" -exec chown -h "$u:$g" {{}} +',
                *(
                    f"install {owner} -m {mode} {q(src)} {q(dst + '.fabdeploy-new')}"
                    for src, dst, owner, mode in put
                ),
                *(f"mv -f {q(dst + '.fabdeploy-new')} {q(dst)}" for _, dst, _, _ in put),
                f'echo {q(fp)} > {q(d + "/node.sha")}; chown "$u:$g" {q(d + "/node.sha")}',
                "systemctl daemon-reload",
                f"systemctl enable {q(cfg.boot_unit)} >/dev/null",
            ]
        )
        + "\n"
    )


def _install_as_root(cfg: Config, host: Host, admin: Admin, fp: str) -> None:
    conn = admin.conn
    mk = run(cfg, host, conn, "mktemp -d /tmp/fabdeploy-setup.XXXXXX")
    staging = mk.stdout.strip()
    if mk.exit_code != 0 or not staging.startswith("/tmp/fabdeploy-setup."):
        raise HostError(
            host.name, f"cannot create a staging dir in /tmp on {host.name}: {mk.stderr.strip()}"
        )
    payload = files(cfg, host)
    try:
        sftp = conn.sftp()
        for name in payload:
            sftp.putfo(io.BytesIO(payload[name]), f"{staging}/{name}")
    except OSError as e:
        raise HostError(host.name, f"upload to {staging} on {host.name} failed: {e}") from None
    script = root_script(cfg, staging, fp, signers="allowed_signers" in payload)
    cmd, stdin = as_root(cfg, "/bin/sh -c " + q(script), sudo=admin.sudo)
    r = run(cfg, host, conn, cmd, stdin=stdin)
    if r.exit_code == 0:
        return
    if admin.sudo:
        refused = sudo_refusal(
            host,
            admin.user,
            "/bin/sh -c <deploy.setup's root script>",
            r,
            hint="deploy.setup needs root: --admin-user=root (or ssh.admin_user), an admin "
            "with full sudo, or fab --prompt-for-sudo-password",
        )
        if refused:
            raise refused
    raise HostError(
        host.name,
        f"installing the boot unit on {host.name} as root failed (exit {r.exit_code}): "
        + ((r.stderr or r.stdout).strip().splitlines() or ["no output"])[-1],
        command="root script",
        exit_code=r.exit_code,
        output=r.stdout + r.stderr,
    )


def sudoers_for(user: str, app: str, commands: list[str]) -> str:
    """A minimal sudoers drop-in: exactly these commands, as root, nothing else."""
    alias = "FABDEPLOY_" + re.sub(r"[^A-Z0-9_]", "_", app.upper())
    return (
        f"# Written by fabdeploy (fab deploy.export-node --sudoers): what {user} may run as root\n"
        f"# for {app}, and nothing else. Install: install -m 0440 THIS /etc/sudoers.d/fabdeploy-{app}\n"
        f"# and check it with: visudo -cf /etc/sudoers.d/fabdeploy-{app}\n"
        f"Cmnd_Alias {alias} = {', '.join(commands)}\n"
        f"{user} ALL=(root) NOPASSWD: {alias}\n"
    )


def sudoers(cfg: Config) -> str:
    """The drop-in for deploy.yml's deploy user: its restart and reboot commands (every role's)."""
    if not cfg.ssh.sudo or not cfg.run_as:
        raise ConfigError(
            f"{cfg.path}: --sudoers needs ssh.user (the deploy user) and ssh.sudo: true"
        )
    cmds = [
        cfg.restart,
        cfg.reboot,
        *(c for r in cfg.roles.values() for c in (r.restart, r.reboot)),
    ]
    return sudoers_for(cfg.run_as, cfg.app, list(dict.fromkeys(c for c in cmds if c)))


def export(
    cfg: Config, out: Path, host: Host | None = None, *, sudoers: bool = False
) -> list[Path]:
    """Write what a node needs into `out`, for baking into an AMI or shipping in user-data.

    `install.sh` puts the files where `fab deploy.setup` would and enables the boot unit;
    run it as root in the image build (or from user-data, before the app unit starts).
    With `sudoers`, also the deploy user's drop-in (and install.sh installs it, checked by visudo).
    """
    drop_in = sudoers_text = None
    if sudoers:
        sudoers_text = globals()["sudoers"](cfg)
        drop_in = f"fabdeploy-{cfg.app}.sudoers"
    out.mkdir(parents=True, exist_ok=True)
    payload = files(cfg, host)
    d, unit = cfg.node_dir, unit_path(cfg)
    mkdirs = "mkdir -p " + q(*_dirs(cfg))
    owner = ""
    if cfg.run_as:
        u = q(cfg.run_as)
        owner = (
            f"g=$(id -gn {u})\n"
            f"find {q(cfg.deploy_to, d)} ! -user {u} "
            f'-exec chown -h {u}:"$g" {{}} +\n'
        )
    drop = ""
    if drop_in:
        dst = f"/etc/sudoers.d/fabdeploy-{cfg.app}"
        drop = f'visudo -cqf "$here/{drop_in}"\ninstall -m 0440 "$here/{drop_in}" {q(dst)}\n'
    script = (
        "#!/bin/sh\n"
        f"# Install the fabdeploy node program for {cfg.app} (generated by `fab deploy.export-node`).\n"
        "set -eu\n"
        'here=$(cd "$(dirname "$0")" && pwd)\n'
        f"{mkdirs}\n"
        f'install -m 0644 "$here/node.py" {q(d + "/node.py")}\n'
        f'install -m 0600 "$here/node.json" {q(d + "/node.json")}\n'
        f'install -m 0644 "$here/{cfg.boot_unit}" {q(unit)}\n'
        + (
            f'install -m 0644 -o root "$here/allowed_signers" {q(signers_path(cfg))}\n'
            if "allowed_signers" in payload
            else ""
        )
        + f"echo {q(fingerprint(cfg, host))} > {q(d + '/node.sha')}\n"
        + f"{owner}{drop}"
        f"systemctl daemon-reload 2>/dev/null || true\n"
        f"systemctl enable {q(cfg.boot_unit)}\n"
    )
    written = {
        "node.py": payload["node.py"],
        "node.json": payload["node.json"],
        cfg.boot_unit: payload["unit"],
        "install.sh": script.encode(),
    }
    if "allowed_signers" in payload:
        written["allowed_signers"] = payload["allowed_signers"]
    if drop_in and sudoers_text:
        written[drop_in] = sudoers_text.encode()
    paths = []
    for name, data in written.items():
        p = out / name
        mode = (
            0o755
            if name == "install.sh"
            else 0o600
            if name == "node.json"
            else 0o440
            if name == drop_in
            else 0o644
        )
        p.unlink(missing_ok=True)
        # Created with its final mode: node.json (credentials) is never readable by others.
        with os.fdopen(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as fh:
            fh.write(data)
        p.chmod(mode)  # the umask may have removed bits (e.g. install.sh's x)
        paths.append(p)
    return paths
