"""Minimal systemctl stand-in for sandbox hosts (see fabfile/sandbox.py): its logic.

Supports the unit-file subset the deploy tool uses: [Unit] Description/Before/After/Wants,
[Service] Type=simple|oneshot, ExecStart, WorkingDirectory, Environment, EnvironmentFile,
User (the service runs as that user, with its groups, HOME and USER), [Install] WantedBy.

Unit files are read from /etc/systemd/system on every call, so daemon-reload is a no-op.
The `systemctl` command next to this file only imports it and calls main(); host_init.py
imports it to boot the host, so the logic lives in one place.

Start-up cost matters here: every hotfix restarts the app through this on every host, and the
sandbox's hosts share the machine's cores with the deploy being measured. Hence a module (its
bytecode is cached; a script is compiled on every run) and imports kept to what Python has
loaded at start-up anyway (os, sys, time) plus C modules: no dataclasses, pathlib, json,
typing, signal or subprocess (which build enums, or import re, locale or inspect; see spawn),
and shlex and pwd only where needed. Together they cost ~40 ms of CPU a call, where Python's
own start costs ~10-15 ms.
"""

from __future__ import annotations

import io
import os
import sys
import time

# signal's C half: `signal` itself builds enums (imports enum) on import.
from _signal import SIG_DFL, SIGINT, SIGKILL, SIGPIPE, SIGTERM, SIGXFSZ, signal

UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = f"{UNIT_DIR}/multi-user.target.wants"
RUN_DIR = "/run/sandbox-units"
# host_init.py's record of the host (write_host_info): KEY=value lines, not json (an import).
HOST_INFO = "/run/sandbox-host.env"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STOP_TIMEOUT = 3.0

# Exit codes as systemctl uses them (LSB).
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INACTIVE = 3
EXIT_STATUS_UNKNOWN = 4
EXIT_NOT_FOUND = 5


class UnitError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class Unit:
    """A parsed unit file (a plain class: dataclasses takes ~10 ms to import)."""

    def __init__(self, name: str, path: str | None = None) -> None:
        self.name = name
        self.path = path
        self.description = ""
        self.type = "simple"
        self.exec_start: list[str] = []
        self.ignore_failure = False
        self.working_directory: str | None = None
        self.environment: dict[str, str] = {}
        self.environment_files: list[tuple[str, bool]] = []
        self.user: str | None = None
        self.before: list[str] = []
        self.after: list[str] = []
        self.wants: list[str] = []
        self.wanted_by: list[str] = []

    def __repr__(self) -> str:
        return f"Unit({self.__dict__!r})"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def split_words(value: str) -> list[str]:
    """shlex.split(value); the usual line has no quotes or backslashes, and then splitting on
    shlex's whitespace is the same, without importing shlex (and re, enum: ~6 ms)."""
    if "'" in value or '"' in value or "\\" in value:
        import shlex

        return shlex.split(value)
    for blank in "\t\r\n":
        value = value.replace(blank, " ")
    return [word for word in value.split(" ") if word]


def unit_name(name: str) -> str:
    return name if "." in name else f"{name}.service"


def _split_env_assignments(value: str) -> dict[str, str]:
    # Environment="A=1" B=2 — systemd allows several quoted assignments on one line.
    env: dict[str, str] = {}
    for item in split_words(value):
        key, sep, val = item.partition("=")
        if sep:
            env[key] = val
    return env


def parse_unit(text: str, name: str, path: str | None = None) -> Unit:
    """Parse the supported unit-file subset; unknown sections and keys are ignored."""
    unit = Unit(name=unit_name(name), path=path)
    section = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if section == "Unit":
            if key == "Description":
                unit.description = value
            elif key in ("Before", "After", "Wants"):
                names = [unit_name(n) for n in value.split()]
                getattr(unit, key.lower()).extend(names)
        elif section == "Service":
            if key == "Type":
                if value not in ("simple", "oneshot"):
                    raise UnitError(f"{unit.name}: unsupported Type={value} (simple|oneshot)")
                unit.type = value
            elif key == "ExecStart":
                unit.ignore_failure = value.startswith("-")
                unit.exec_start = split_words(value.lstrip("-@+!"))
            elif key == "User":
                unit.user = value or None
            elif key == "WorkingDirectory":
                unit.working_directory = value.lstrip("-") or None
            elif key == "Environment":
                unit.environment.update(_split_env_assignments(value))
            elif key == "EnvironmentFile":
                unit.environment_files.append((value.lstrip("-"), value.startswith("-")))
        elif section == "Install":
            if key == "WantedBy":
                unit.wanted_by.extend(value.split())
    if not unit.exec_start:
        raise UnitError(f"{unit.name}: no ExecStart=")
    return unit


def load_unit(name: str) -> Unit:
    name = unit_name(name)
    path = f"{UNIT_DIR}/{name}"
    if not os.path.isfile(path):
        raise UnitError(f"Unit {name} not found.", EXIT_NOT_FOUND)
    return parse_unit(_read(path), name, path)


def parse_env_file(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if sep:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            env[key.strip()] = value
    return env


def unit_env(unit: Unit) -> dict[str, str]:
    # Services get a clean environment, not the caller's (as under systemd).
    env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": "/root", "USER": "root"}
    for path, optional in unit.environment_files:
        try:
            env.update(parse_env_file(_read(path)))
        except FileNotFoundError:
            if not optional:
                raise UnitError(f"{unit.name}: EnvironmentFile {path} not found") from None
    env.update(unit.environment)
    return env


def boot_order(units: list[Unit]) -> list[Unit]:
    """Name order, adjusted for Before=/After= among the given units (stable topological sort)."""
    by_name = {u.name: u for u in units}
    deps: dict[str, set[str]] = {u.name: set() for u in units}
    for u in units:
        deps[u.name].update(n for n in u.after if n in by_name)
        for n in u.before:
            if n in by_name:
                deps[n].add(u.name)
    ordered: list[Unit] = []
    done: set[str] = set()
    pending = sorted(by_name)
    while pending:
        ready = [n for n in pending if deps[n] <= done]
        if not ready:
            ready = pending[:1]  # ordering cycle: break it in name order, as systemd would
        name = ready[0]
        pending.remove(name)
        done.add(name)
        ordered.append(by_name[name])
    return ordered


def enabled_units() -> list[str]:
    if not os.path.isdir(WANTS_DIR):
        return []
    return sorted(n for n in os.listdir(WANTS_DIR) if n.endswith(".service"))


def write_host_info(info: dict[str, str]) -> None:
    """For host_init.py: what this stand-in needs to know about its host (log_dir)."""
    with open(HOST_INFO, "w") as f:
        f.writelines(f"{key}={value}\n" for key, value in info.items())


def host_info() -> dict[str, str]:
    try:
        return parse_env_file(_read(HOST_INFO))
    except (OSError, ValueError):
        return {}


def log_path(name: str) -> str:
    log_dir = host_info().get("log_dir") or "/var/log/sandbox-units"
    os.makedirs(log_dir, exist_ok=True)
    return f"{log_dir}/{name}.log"


def _pid_file(name: str) -> str:
    return f"{RUN_DIR}/{name}.pid"


def _alive(pid: int) -> bool:
    try:
        stat = _read(f"/proc/{pid}/stat")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def main_pid(name: str) -> int | None:
    try:
        pid = int(_read(_pid_file(name)))
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            try:
                if os.getpgid(int(entry)) == pgid:
                    return True
            except ProcessLookupError:
                continue
    return False


def _open_log(name: str) -> io.BufferedWriter:
    log = open(log_path(name), "ab")
    log.write(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
    log.flush()
    return log


def credentials(unit: Unit, env: dict[str, str]) -> dict[str, object]:
    """Popen arguments that run the unit as its User= (as systemd: its groups, HOME, USER)."""
    if not unit.user or unit.user == "root":
        return {}
    import pwd

    try:
        pw = pwd.getpwnam(unit.user)
    except KeyError:
        _log_line(unit.name, f"Failed to determine user credentials: no user {unit.user}")
        raise UnitError(
            f"Job for {unit.name} failed: no user {unit.user} (status=217/USER). "
            f"See {log_path(unit.name)}."
        ) from None
    env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    return {
        "user": pw.pw_uid,
        "group": pw.pw_gid,
        "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid),
    }


def _above_stdio(fd: int) -> int:
    # A caller with 0, 1 or 2 closed gets them back from open(): dup2 onto them would clobber.
    while fd < 3:
        fd = os.dup(fd)
    return fd


def spawn(argv: list[str], cwd: str | None, env: dict[str, str], log: int, creds: dict) -> int:
    """subprocess.Popen(argv, cwd=cwd, env=env, stdin=DEVNULL, stdout=log, stderr=STDOUT,
    start_new_session=True, **creds).pid, in Popen's steps, without importing subprocess (it
    imports locale, re, enum, threading and selectors: ~10 ms of CPU, a third of a restart).

    Raises OSError as Popen does: errno and argv[0], or cwd if a step before exec failed."""
    errors_r, errors_w = os.pipe()  # close-on-exec: EOF and no message means exec worked
    pid = os.fork()
    if pid == 0:  # the child: execs or exits, never returns
        step = "noexec"
        try:
            devnull = _above_stdio(os.open(os.devnull, os.O_RDONLY))
            log = _above_stdio(log)
            os.dup2(devnull, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            if cwd:
                os.chdir(cwd)
            # Python ignores these two; Popen restores their defaults for the program.
            signal(SIGPIPE, SIG_DFL)
            signal(SIGXFSZ, SIG_DFL)
            os.setsid()
            if creds:
                os.setgroups(creds["extra_groups"])
                os.setregid(creds["group"], creds["group"])
                os.setreuid(creds["user"], creds["user"])
            # Nothing else the caller has open (an ssh session's pipes) reaches the program.
            os.closerange(3, errors_w)
            os.closerange(errors_w + 1, os.sysconf("SC_OPEN_MAX"))
            step = "exec"
            os.execvpe(argv[0], argv, env)  # searches env's PATH, as Popen does
        except OSError as e:
            os.write(errors_w, f"{step}:{e.errno}".encode())
        finally:
            os._exit(255)
    os.close(errors_w)
    with open(errors_r, "rb") as f:
        error = f.read()
    if error:
        os.waitpid(pid, 0)
        step, _, errno = error.decode().partition(":")
        code = int(errno)
        raise OSError(code, os.strerror(code), argv[0] if step == "exec" else cwd)
    return pid


def start(unit: Unit) -> int:
    """Start a unit: oneshot runs to completion (returns its status), simple is detached."""
    if unit.type == "simple" and main_pid(unit.name):
        return 0
    env = unit_env(unit)
    creds = credentials(unit, env)
    cwd = unit.working_directory
    if cwd and not os.path.isdir(cwd):
        _log_line(unit.name, f"WorkingDirectory {cwd} does not exist")
        raise UnitError(
            f"Job for {unit.name} failed: WorkingDirectory {cwd} does not exist. "
            f"See {log_path(unit.name)}."
        )
    with _open_log(unit.name) as log:
        try:
            pid = spawn(unit.exec_start, cwd, env, log.fileno(), creds)
        except OSError as e:
            log.write(f"exec failed: {e}\n".encode())
            if unit.ignore_failure:
                return 0
            raise UnitError(f"Job for {unit.name} failed: {e}. See {log_path(unit.name)}.") from e
        if unit.type == "simple":
            os.makedirs(RUN_DIR, exist_ok=True)
            with open(_pid_file(unit.name), "w") as f:
                f.write(f"{pid}\n")
            return 0
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        log.write(f"-- {unit.name} exited with status {code}\n".encode())
    if code != 0 and not unit.ignore_failure:
        print(
            f"Job for {unit.name} failed because the control process exited with "
            f"status {code}. See {log_path(unit.name)}.",
            file=sys.stderr,
        )
        return code
    return 0


def _log_line(name: str, message: str) -> None:
    with open(log_path(name), "a") as log:
        log.write(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def stop(unit: Unit) -> None:
    pid = main_pid(unit.name)
    try:
        os.unlink(_pid_file(unit.name))
    except FileNotFoundError:
        pass
    if pid is None:
        return
    try:
        os.killpg(pid, SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    # A service that exits on SIGTERM is usually gone within a millisecond or two: poll soon,
    # then every 20 ms (each restart, on every host of a hotfix, waits here).
    poll = 0.001
    while _group_alive(pid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + STOP_TIMEOUT
        time.sleep(poll)
        poll = min(poll * 2, 0.02)
    _log_line(unit.name, f"stopped {unit.name}")


def is_active(unit: Unit) -> bool:
    return unit.type == "simple" and main_pid(unit.name) is not None


def enable(unit: Unit) -> None:
    if "multi-user.target" not in unit.wanted_by:
        print(
            f"The unit files have no installation config (WantedBy=multi-user.target) "
            f"for {unit.name}; not enabled.",
            file=sys.stderr,
        )
        return
    link = f"{WANTS_DIR}/{unit.name}"
    if os.path.lexists(link):
        return
    os.makedirs(WANTS_DIR, exist_ok=True)
    os.symlink(f"{UNIT_DIR}/{unit.name}", link)
    print(f"Created symlink {link} → {UNIT_DIR}/{unit.name}.", file=sys.stderr)


def disable(unit: Unit) -> None:
    link = f"{WANTS_DIR}/{unit.name}"
    if os.path.lexists(link):
        os.unlink(link)
        print(f"Removed {link}.", file=sys.stderr)


def is_enabled(name: str) -> bool:
    return os.path.exists(f"{WANTS_DIR}/{unit_name(name)}")


def status(unit: Unit) -> int:
    pid = main_pid(unit.name)
    state = "active (running)" if pid else "inactive (dead)"
    enabled = "enabled" if is_enabled(unit.name) else "disabled"
    print(f"● {unit.name} - {unit.description or unit.name}")
    print(f"     Loaded: loaded ({unit.path}; {enabled})")
    print(f"     Active: {state}")
    if pid:
        print(f"   Main PID: {pid} ({os.path.basename(unit.exec_start[0])})")
    try:
        with open(log_path(unit.name), errors="replace") as f:
            tail = f.read().splitlines()[-10:]
    except OSError:
        tail = []
    if tail:
        print()
        print("\n".join(tail))
    return 0 if pid else EXIT_INACTIVE


def reboot() -> None:
    # PID 1 of the host is host_init.py, which reboots the host on SIGINT (like ctrl-alt-del).
    try:
        with open("/proc/1/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        cmdline = b""
    if b"host_init" not in cmdline:
        raise UnitError("not on a sandbox host (PID 1 is not host_init.py); refusing to reboot")
    os.kill(1, SIGINT)


COMMANDS = (
    "start",
    "stop",
    "restart",
    "enable",
    "disable",
    "is-active",
    "is-enabled",
    "status",
    "daemon-reload",
    "reboot",
)


def run(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("-")}
    args = [a for a in argv if not a.startswith("-")]
    quiet = bool(flags & {"-q", "--quiet"})
    if not args or args[0] not in COMMANDS:
        print(f"usage: systemctl {{{'|'.join(COMMANDS)}}} [UNIT...]", file=sys.stderr)
        return EXIT_USAGE
    command, names = args[0], args[1:]
    if command == "daemon-reload":
        return 0
    if command == "reboot":
        reboot()
        return 0
    if not names:
        print(f"systemctl {command}: unit name required", file=sys.stderr)
        return EXIT_USAGE
    if command == "is-enabled":
        results = [is_enabled(n) for n in names]
        if not quiet:
            print("\n".join("enabled" if r else "disabled" for r in results))
        return 0 if all(results) else EXIT_FAILED
    code = 0
    for name in names:
        try:
            unit = load_unit(name)
        except UnitError as e:
            if command == "is-active":
                if not quiet:
                    print("inactive")
                code = EXIT_INACTIVE
                continue
            if command == "status":
                print(f"Unit {unit_name(name)} could not be found.", file=sys.stderr)
                code = EXIT_STATUS_UNKNOWN
                continue
            raise UnitError(f"Failed to {command} {unit_name(name)}: {e}", e.code) from e
        if command == "start":
            code = start(unit) or code
        elif command == "stop":
            stop(unit)
        elif command == "restart":
            stop(unit)
            code = start(unit) or code
        elif command == "enable":
            enable(unit)
            if "--now" in flags:
                code = start(unit) or code
        elif command == "disable":
            disable(unit)
            if "--now" in flags:
                stop(unit)
        elif command == "is-active":
            active = is_active(unit)
            if not quiet:
                print("active" if active else "inactive")
            code = code if active else EXIT_INACTIVE
        elif command == "status":
            code = status(unit) or code
    return code


def main() -> int:
    argv = sys.argv[1:]
    if os.path.basename(sys.argv[0]) == "reboot":
        argv = ["reboot"]
    try:
        return run(argv)
    except UnitError as e:
        print(str(e), file=sys.stderr)
        return e.code
