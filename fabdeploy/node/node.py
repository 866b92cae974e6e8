#!/usr/bin/python3
"""fabdeploy node program: activates bundles on one host in Capistrano 3's release layout.

Copied to each host as /usr/local/lib/fabdeploy/<app>/node.py next to its node.json and run
by the controller over SSH (activate, rollback, status, cleanup) and by a systemd oneshot at
boot (boot). It must run on Debian 12's /usr/bin/python3 (3.11.2) with the standard library
only; boto3 is imported lazily, and only when S3 is actually touched.

Every command prints exactly one JSON object as the last line of stdout; human-readable log
lines go to stderr so the controller can parse stdout blindly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import sys
import time
from collections import deque

# Not `from typing import TYPE_CHECKING`: importing typing alone costs ~3 ms per run.
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import tarfile
    from collections.abc import Callable
    from typing import Any

VERSION = "1.0.0"
LOG_PREFIX = "fabdeploy-node: "
RELEASE_RE = re.compile(r"^\d{14}$")
STAGING_PREFIX = ".staging-"
# A release downloaded, verified and extracted ahead of its switch (`activate --prepare`), so a
# host leaves its load balancer only for the swap, restart and health check. Hidden like staging
# dirs (Capistrano's `ls -x releases` skips it); its marker names the bundle id and sha256.
PREPARED_PREFIX = ".prepared-"
PREPARED_MARKER = ".fabdeploy-prepared"
# Kept for its switch this long at most; older ones, a second one of the same bundle, and any
# beyond the newest PREPARED_KEEP are leftovers (a run that was killed or failed elsewhere).
PREPARED_MAX_AGE = 6 * 3600
PREPARED_KEEP = 2
CURRENT_TMP_PREFIX = ".current-tmp-"
DOWNLOAD_PREFIX = "dl-"
# Marks a release whose before_swap hooks have not finished: if we are killed then, the dir
# has a REVISION but was never live, so rollback must not pick it and the next run deletes it.
PENDING_MARKER = ".fabdeploy-pending"
# In .fabdeploy/: `current` was swapped for a run that was to restart the app, and that restart
# has not finished. If we are killed in between, the app still serves the old release; the
# next activate of the same commit (a rerun) sees this and restarts instead of "nothing to do".
RESTART_MARKER = "restart-pending"
STATE_DIR = ".fabdeploy"
# In a release built with a build recipe: its bundle id ("<commit>-<recipe hash>"). What
# "unchanged" compares; a release without it has the id of its commit (REVISION).
BUNDLE_ID_FILE = ".fabdeploy-bundle-id"
OUTPUT_TAIL_LINES = 20
# Per-file overhead when estimating disk needs: most filesystems allocate whole 4 KiB blocks.
BLOCK = 4096
SPACE_SLACK = 16 * 1024 * 1024
CHUNK = 1024 * 1024
# A release that wrote at most this many files (and bytes) is made durable by fsync of what
# it wrote and of its directories; beyond that, one syncfs of the filesystem is cheaper.
# syncfs also waits for everything else dirty on that filesystem (a database, logs, other
# deploys): a one-file hotfix must not pay for them.
FSYNC_MAX_FILES = 256
FSYNC_MAX_BYTES = 64 * 1024 * 1024
# Symlink validation may take this many path steps per member in total (memoized, a sane
# bundle needs a few per link); beyond that the bundle is refused, not validated for hours.
MAX_RESOLVE_STEPS_PER_MEMBER = 64
# tarfile reads pax / GNU long-name headers whole into memory: refuse bigger ones unread.
# git archive writes one small global header (the commit id) and short per-file ones.
MAX_EXT_HEADER = 64 * 1024
MAX_EXT_CHAIN = 8
MAX_GLOBAL_HEADERS = 4096
# Use tarfile's data filter where it exists; every check is ours anyway (Debian 12's 3.11.2
# has no filter), and tests turn this off to exercise that path on newer Pythons.
USE_DATA_FILTER = True


class NodeError(Exception):
    """An expected failure: reported as one JSON line, never as a traceback."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class VerificationError(NodeError):
    """The bundle's sha256 did not match: retrying rarely helps, so boot retries it once."""


class TrustError(VerificationError):
    """A release that is not signed by a trusted signer, or a replayed one: never retried."""


class UnsafeBundle(NodeError):
    """A member failed a safety check; extract_bundle adds host/bundle context."""


class CommandFailed(Exception):
    def __init__(
        self,
        command: str,
        returncode: int,
        tail: list[str],
        timed_out: float | None = None,
        label: str = "",
    ) -> None:
        super().__init__(f"`{command}` exited with {returncode}")
        self.command = command
        self.returncode = returncode
        self.tail = tail
        self.timed_out = timed_out
        self.label = label

    def how(self) -> str:
        if self.timed_out is not None:
            return f"timed out after {self.timed_out:g}s (killed)"
        return f"failed with exit code {self.returncode}"


# --------------------------------------------------------------------------------------------
# small helpers


def sync_filesystem(path: str) -> None:
    """syncfs(2) on the filesystem holding `path`: unlike sync(), it does not wait for every
    disk of a busy host (database, logs) just to make one release durable. Python 3.11 has
    no os.syncfs, hence libc; anything unusual falls back to os.sync()."""
    try:
        import ctypes

        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


# Filesystems whose metadata journal commits in order: an fsync waits for every metadata
# change made before the inode's last one (ext4's jbd2 commits transactions in sequence, XFS
# forces its log up to that item), so the fsync of releases/ after the release's rename makes
# every dir and entry of the release durable. An fsync per dir would cost a disk cache flush
# each (the transaction is committed already), thousands for a big app.
ORDERED_JOURNAL_FS = ("ext4", "xfs")


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding `path` (from /proc/self/mountinfo), or None."""
    try:
        dev = os.stat(path).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    want = f"{os.major(dev)}:{os.minor(dev)}"
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 3 and fields[2] == want and " - " in line:
            return line.split(" - ", 1)[1].split(" ", 1)[0]
    return None


def sync_release(release: str, files: list[str], dirs: list[str]) -> None:
    """Make a release durable by fsync alone: each written file in `files`, then each dir in
    `dirs` (paths relative to `release`, "" is the release itself: their entries, so linked
    and newly created files too), then the dir holding the release (its rename).

    On an ORDERED_JOURNAL_FS only the release's own dir of `dirs`: the last fsync (releases/,
    changed last, by the rename) commits every change made before it."""
    cloexec = getattr(os, "O_CLOEXEC", 0)
    if filesystem_type(release) in ORDERED_JOURNAL_FS:
        dirs = [d for d in dirs if not d]
    paths = [(f"{release}/{rel}", os.O_RDONLY | os.O_NOFOLLOW) for rel in files]
    paths += [
        (f"{release}/{rel}" if rel else release, os.O_RDONLY | os.O_DIRECTORY) for rel in dirs
    ]
    paths.append((os.path.dirname(os.path.abspath(release)), os.O_RDONLY | os.O_DIRECTORY))
    for path, flags in paths:
        fd = os.open(path, flags | cloexec)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def log(message: str) -> None:
    _emit(LOG_PREFIX + message)


def _emit(line: str) -> None:
    # If the controller dies (kill -9, lost network), sshd closes our stderr: a log line must
    # not then abort an activation half-way (e.g. after the swap, before the restart).
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def hostname() -> str:
    import socket

    return socket.gethostname()


def default_user() -> str:
    # SUDO_USER first: deploys run via sudo, and revisions.log should name the human.
    user = os.environ.get("SUDO_USER") or os.environ.get("USER") or os.environ.get("LOGNAME")
    if user:
        return user
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def utc_stamp(epoch: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch))


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def remove_path(path: str) -> None:
    """rm -rf without ever following a symlink (a link is unlinked, never descended)."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        import shutil

        shutil.rmtree(path)


def disk_free(path: str) -> int:
    import shutil

    return shutil.disk_usage(path).free


def mb(nbytes: int) -> str:
    return f"{nbytes / (1024 * 1024):.1f}"


def redact_url(url: str) -> str:
    # Presigned URLs carry a signature in the query string: never echo it into logs.
    return url.split("?", 1)[0]


def open_nofollow(path: str, flags: int, mode: int = 0o644) -> int:
    """os.open that refuses a symlink at `path`: files at fixed names under deploy_to must
    not lead root elsewhere (e.g. .fabdeploy/lock -> /etc/shadow)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NodeError(
                f"{path} on {hostname()} is a symlink: refusing to follow it; remove it "
                "(nobody but the deploy user should be able to write there)"
            ) from None
        raise


def atomic_write(path: str, data: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)  # a leftover of a dead run with our pid; never followed
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_not_writable_by_others(path: str, follow: bool) -> None:
    """Refuse a deploy_to (or its .fabdeploy) that users other than its owner can write:
    they could plant symlinks at the names we open as root."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise NodeError(
            f"{path} on {hostname()} is not a directory"
            + (" (it is a symlink)" if stat.S_ISLNK(st.st_mode) else "")
            + ": move it aside and run the command again"
        )
    if st.st_mode & 0o022:
        raise NodeError(
            f"{path} on {hostname()} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): run `chmod go-w {path}` and retry"
        )


# --------------------------------------------------------------------------------------------
# configuration


class S3Config:
    def __init__(self, bucket: str, prefix: str, region: str | None, endpoint_url: str | None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = region
        self.endpoint_url = endpoint_url

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


class BootConfig:
    def __init__(
        self,
        attempts: int = 5,
        first_boot_attempts: int = 30,
        backoff: float = 1.0,
        max_backoff: float = 10.0,
        max_seconds: float = 900.0,
    ) -> None:
        self.attempts = max(1, int(attempts))
        self.first_boot_attempts = max(1, int(first_boot_attempts))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(0.0, float(max_backoff))
        self.max_seconds = max(0.0, float(max_seconds))


HOOK_STAGES = ("before_swap", "after_swap", "after_restart")
# Never in a hook's environment: the node program's own S3 credentials (node_env) and any it
# inherited. Hooks are the app's code; what they need they get from the app's own config.
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)
# node_env keys this program put into os.environ for boto3 (s3_client): never passed on.
_INJECTED: set[str] = set()


class Hook:
    """One hook command: `run`, and where it applies (boot, roles) and how long it may take."""

    def __init__(
        self,
        run: str,
        boot: bool = True,
        roles: list[str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.run = run
        self.boot = boot
        self.roles = list(roles or [])
        self.timeout = timeout

    @classmethod
    def from_json(cls, raw: Any) -> Hook:
        if isinstance(raw, str):  # node.json written before hooks had options
            return cls(raw)
        if not isinstance(raw, dict) or not isinstance(raw.get("run"), str):
            raise NodeError(f"a hook in node.json on {hostname()} is not a command: re-run setup")
        timeout = raw.get("timeout")
        return cls(
            raw["run"],
            bool(raw.get("boot", True)),
            [str(r) for r in raw.get("roles") or []],
            float(timeout) if timeout else None,
        )

    def applies(self, action: str, roles: list[str]) -> bool:
        if action == "boot" and not self.boot:
            return False
        return not self.roles or bool(set(self.roles) & set(roles))


class Config:
    def __init__(self, raw: dict[str, Any], source: str = "<dict>") -> None:
        def need(value: Any, name: str) -> Any:
            if value in (None, ""):
                raise NodeError(
                    f"{source}: required key {name!r} is missing on {hostname()}: "
                    "re-run the controller's setup to rewrite node.json"
                )
            return value

        if not isinstance(raw, dict):
            raise NodeError(f"{source}: expected a JSON object")
        self.app: str = str(need(raw.get("app"), "app"))
        deploy_to = str(need(raw.get("deploy_to"), "deploy_to"))
        if not os.path.isabs(deploy_to):
            raise NodeError(f"{source}: deploy_to must be an absolute path, got {deploy_to!r}")
        # abspath, not realpath: Capistrano stores the configured path in `current` verbatim.
        self.deploy_to: str = os.path.abspath(deploy_to)
        self.keep_releases: int = max(1, int(raw.get("keep_releases") or 5))
        self.linked_files: list[str] = [str(p) for p in raw.get("linked_files") or []]
        self.linked_dirs: list[str] = [str(p) for p in raw.get("linked_dirs") or []]
        s3 = raw.get("s3") or {}
        self.s3 = S3Config(
            bucket=str(need(s3.get("bucket"), "s3.bucket")),
            prefix=str(s3.get("prefix") or ""),
            region=s3.get("region") or None,
            endpoint_url=s3.get("endpoint_url") or None,
        )
        self.env: dict[str, str] = {str(k): str(v) for k, v in (raw.get("env") or {}).items()}
        hooks = raw.get("hooks") or {}
        self.hooks: dict[str, list[Hook]] = {
            stage: [Hook.from_json(h) for h in hooks.get(stage) or []] for stage in HOOK_STAGES
        }
        self.restart: str | None = raw.get("restart") or None
        self.sudo: bool = bool(raw.get("sudo"))  # restart runs through sudo (deploy user)
        self.stage: str | None = str(raw["stage"]) if raw.get("stage") else None
        # This host's roles (node.json is per host when roles exist): hooks with `roles:`.
        self.roles: list[str] = [str(r) for r in raw.get("roles") or []]
        boot = raw.get("boot") or {}
        known = ("attempts", "first_boot_attempts", "backoff", "max_backoff", "max_seconds")
        self.boot = BootConfig(**{k: boot[k] for k in known if boot.get(k) is not None})
        self.max_files: int = int(raw.get("max_files") or 200000)
        self.lock_timeout: float = float(raw.get("lock_timeout") or 120.0)
        self.download_timeout: float = float(raw.get("download_timeout") or 60.0)
        self.health = HealthConfig(raw.get("health"))
        signing = raw.get("signing") or {}
        # Trusted signers installed by setup (root-owned): with them, only signed releases run.
        self.signers: str | None = signing.get("signers") or None
        self.allow_unsigned: bool = bool(signing.get("allow_unsigned"))
        # Hardlink files unchanged since the previous release instead of writing them again.
        link = raw.get("link_unchanged")
        self.link_unchanged: bool = True if link is None else bool(link)
        # Linked files whose content this node fetches itself (SSM, Secrets Manager, S3).
        self.shared = SharedConfig(raw.get("shared_config"))
        # After each boot, put the boot's outcome and the app's health in S3 (see `report`).
        self.report: bool = bool(raw.get("report"))

    @property
    def before_swap(self) -> list[str]:
        return [h.run for h in self.hooks["before_swap"]]


class SharedFile:
    """A linked file whose content lives in an SSM parameter (SecureString, decrypted), a
    Secrets Manager secret or an S3 object: node.json's shared_config.files entries."""

    def __init__(self, raw: Any) -> None:
        if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
            raise NodeError(
                f"a shared_config file in node.json on {hostname()} has no path: re-run setup"
            )
        self.path: str = raw["path"]
        self.bucket: str | None = None
        if raw.get("ssm"):
            self.kind, self.name = "ssm", str(raw["ssm"])
        elif raw.get("secret"):
            self.kind, self.name = "secret", str(raw["secret"])
        elif raw.get("s3_key") and raw.get("s3_bucket"):
            self.kind, self.name = "s3", str(raw["s3_key"])
            self.bucket = str(raw["s3_bucket"])
        else:
            raise NodeError(
                f"shared_config file {self.path!r} in node.json on {hostname()} names no "
                "source (ssm, secret or s3): re-run setup"
            )

    def describe(self) -> str:
        if self.kind == "ssm":
            return f"SSM parameter {self.name}"
        if self.kind == "secret":
            return f"secret {self.name}"
        return f"s3://{self.bucket}/{self.name}"


class SharedConfig:
    def __init__(self, raw: Any) -> None:
        raw = raw if isinstance(raw, dict) else {}
        self.files: list[SharedFile] = [SharedFile(f) for f in raw.get("files") or []]
        self.region: str | None = raw.get("region") or None
        self.endpoints: dict[str, str | None] = {
            "ssm": raw.get("ssm_endpoint_url") or None,
            "secretsmanager": raw.get("secretsmanager_endpoint_url") or None,
        }


class HealthConfig:
    """deploy.yml's health: section as the node reads it from node.json."""

    def __init__(self, raw: Any) -> None:
        raw = raw if isinstance(raw, dict) else {}
        self.on: str = str(raw.get("on") or "node")
        self.url: str | None = raw.get("url") or None
        self.command: str | None = raw.get("command") or None
        self.timeout: float = float(raw.get("timeout") or 120.0)
        self.interval: float = float(raw.get("interval") or 0.2)
        self.expect_status: int = int(raw.get("expect_status") or 200)

    @property
    def here(self) -> bool:
        """This node checks health itself (health.on: node, and there is something to check)."""
        return self.on == "node" and bool(self.url or self.command)


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise NodeError(
            f"config {path} not found on {hostname()}: run the controller's setup for this host"
        ) from None
    except (OSError, ValueError) as exc:
        raise NodeError(f"cannot read config {path} on {hostname()}: {exc}") from None
    return Config(raw, source=path)


# --------------------------------------------------------------------------------------------
# layout and release inspection


class Layout:
    def __init__(self, deploy_to: str) -> None:
        self.deploy_to = deploy_to
        self.releases = os.path.join(deploy_to, "releases")
        self.shared = os.path.join(deploy_to, "shared")
        self.current = os.path.join(deploy_to, "current")
        self.state = os.path.join(deploy_to, STATE_DIR)
        self.lock = os.path.join(self.state, "lock")
        self.status = os.path.join(self.state, "status.json")
        self.revisions_log = os.path.join(deploy_to, "revisions.log")

    def ensure(self) -> None:
        for path in (self.deploy_to, self.releases, self.shared, self.state):
            os.makedirs(path, 0o755, exist_ok=True)  # never group/other-writable, whatever umask

    def release_path(self, name: str) -> str:
        return os.path.join(self.releases, name)


def ensure_layout(cfg: Config, layout: Layout) -> None:
    """releases/ and shared/ exist, or the one line that says why they can't."""
    try:
        layout.ensure()
    except OSError as exc:
        raise NodeError(f"cannot create {cfg.deploy_to} layout on {hostname()}: {exc}") from None


def read_revision(release_dir: str, name: str = "REVISION") -> str | None:
    try:
        with open(os.path.join(release_dir, name), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def read_bundle_id(release_dir: str, commit: str | None) -> str | None:
    """The bundle id (commit + build recipe) a release came from; its commit when built without one."""
    return read_revision(release_dir, BUNDLE_ID_FILE) or commit


def list_releases(layout: Layout) -> list[str]:
    try:
        names = os.listdir(layout.releases)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if RELEASE_RE.match(n))


def is_pending(release_dir: str) -> bool:
    return os.path.lexists(os.path.join(release_dir, PENDING_MARKER))


def complete_releases(layout: Layout) -> list[str]:
    """Releases that were fully built and activated once: rollback targets."""
    return [
        n
        for n in list_releases(layout)
        if read_revision(layout.release_path(n)) and not is_pending(layout.release_path(n))
    ]


class Current:
    """What `current` points at; `ok` means the target exists and has a REVISION."""

    def __init__(self, target: str, path: str, release: str, commit: str | None, ok: bool):
        self.target = target
        self.path = path
        self.release = release
        self.commit = commit
        self.ok = ok
        self.bundle_id = read_bundle_id(path, commit) if commit else None

    def as_dict(self) -> dict[str, Any]:
        d = {"release": self.release, "commit": self.commit, "path": self.path, "ok": self.ok}
        if self.bundle_id != self.commit:  # built with a recipe; else the id is the commit
            d["bundle_id"] = self.bundle_id
        return d

    def brief(self) -> dict[str, Any]:
        return {"release": self.release, "commit": self.commit}


def read_current(layout: Layout) -> Current | None:
    if not os.path.islink(layout.current):
        if os.path.isdir(layout.current):
            raise NodeError(
                f"{layout.current} on {hostname()} is a real directory, not a symlink: "
                "move it aside (it is not a release) and deploy again"
            )
        return None
    target = os.readlink(layout.current)
    path = target if os.path.isabs(target) else os.path.join(layout.deploy_to, target)
    path = os.path.normpath(path)
    commit = read_revision(path) if os.path.isdir(path) else None
    return Current(target, path, os.path.basename(path), commit, commit is not None)


def next_release_name(layout: Layout, now: float) -> str:
    """UTC timestamp name that does not exist yet and sorts after every existing release."""
    name = utc_stamp(now)
    existing = list_releases(layout)
    if existing and name <= existing[-1]:
        name = _add_second(existing[-1])
    while os.path.lexists(
        layout.release_path(name)
    ):  # defensive: Capistrano may be creating dirs too
        name = _add_second(name)
    return name


def _add_second(stamp: str) -> str:
    import calendar

    try:
        epoch = calendar.timegm(time.strptime(stamp, "%Y%m%d%H%M%S"))
        return utc_stamp(epoch + 1)
    except ValueError:
        # Not a real date (e.g. hand-made dir): still produce a name that sorts after it.
        return str(int(stamp) + 1).zfill(14)


# --------------------------------------------------------------------------------------------
# host lock and status


class HostLock:
    """flock on .fabdeploy/lock: released by the kernel if we die, so it can never go stale."""

    def __init__(self, layout: Layout, action: str, timeout: float) -> None:
        self.layout = layout
        self.action = action
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> HostLock:
        check_not_writable_by_others(self.layout.deploy_to, follow=True)
        os.makedirs(self.layout.state, 0o755, exist_ok=True)
        check_not_writable_by_others(self.layout.state, follow=False)
        fd = open_nofollow(self.layout.lock, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + self.timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise NodeError(
                        f"another fabdeploy run holds {self.layout.lock} on {hostname()} "
                        f"({holder}); waited {self.timeout:.0f}s: wait for it to finish, "
                        "then retry"
                    ) from None
                if not announced:
                    log(f"waiting for lock {self.layout.lock} ({self._holder(fd)})")
                    announced = True
                time.sleep(0.1)
        info = {
            "pid": os.getpid(),
            "action": self.action,
            "user": default_user(),
            "since": iso_now(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return (
                f"held by pid {info.get('pid')} running {info.get('action')} "
                f"for {info.get('user')} since {info.get('since')}"
            )
        except (OSError, ValueError):
            return "holder unknown"

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                os.close(self.fd)  # closing drops the flock
            self.fd = None


def read_status(layout: Layout) -> dict[str, Any]:
    try:
        with open(layout.status, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record_status(layout: Layout, key: str, entry: dict[str, Any]) -> None:
    """Best effort: a status write must never turn a good deploy into a failed one."""
    try:
        os.makedirs(layout.state, 0o755, exist_ok=True)
        check_not_writable_by_others(layout.state, follow=False)
        data = read_status(layout)
        data[key] = {**entry, "at": iso_now(), "boot_id": boot_id()}
        atomic_write(layout.status, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        log(f"warning: cannot write {layout.status}: {exc}")
    except NodeError as exc:
        log(f"warning: cannot write {layout.status}: {exc.message}")


# --------------------------------------------------------------------------------------------
# fetching bundles


class Source:
    """Where a bundle comes from: kind is 'url', 's3' or 'file'. `size`, when known (the
    pointer and the controller give it), bounds a download: a wrong object must not fill
    the disk before its sha256 is checked."""

    def __init__(self, kind: str, value: str, size: int | None = None) -> None:
        # 'prepared': no download at all, only the release `activate --prepare` made earlier.
        if kind not in ("url", "s3", "file", "prepared"):
            raise ValueError(kind)
        self.kind = kind
        self.value = value
        self.size = size

    def describe(self, cfg: Config) -> str:
        if self.kind == "url":
            return redact_url(self.value)
        if self.kind == "s3":
            return f"s3://{cfg.s3.bucket}/{self.value}"
        return self.value


def s3_client(cfg: Config) -> Any:
    return aws_client(cfg, "s3", cfg.s3.region, cfg.s3.endpoint_url)


def aws_client(cfg: Config, service: str, region: str | None, endpoint_url: str | None) -> Any:
    """A boto3 client with node_env's credentials (else the instance role) and an explicit
    endpoint: old boto3 (Debian 12's 1.26) ignores AWS_ENDPOINT_URL."""
    _INJECTED.update(k for k, v in cfg.env.items() if os.environ.get(k) != v)
    os.environ.update(cfg.env)
    # New boto3 sends CRC32 checksums that some S3-compatible servers reject; old boto3
    # ignores these variables, so setting them is harmless either way.
    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        if name not in os.environ:
            _INJECTED.add(name)
            os.environ[name] = "when_required"
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError:
        raise NodeError(
            f"boto3 is not installed on {hostname()}: apt-get install python3-boto3"
        ) from None
    # Short timeouts, no botocore retries: boot must stay bounded and does its own
    # retrying with backoff; a hung endpoint costs download_timeout per attempt.
    boto_cfg = BotoConfig(
        connect_timeout=5,
        read_timeout=cfg.download_timeout,
        retries={"max_attempts": 1, "mode": "standard"},
    )
    return boto3.client(service, region_name=region, endpoint_url=endpoint_url, config=boto_cfg)


def _s3_error(exc: Exception, what: str, cfg: Config) -> NodeError:
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    where = cfg.s3.endpoint_url or f"region {cfg.s3.region or 'default'}"
    if code in ("NoSuchKey", "404", "NotFound"):
        return NodeError(
            f"{what} does not exist ({where}) as seen from {hostname()}: publish it first",
            s3_code=code,
        )
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return NodeError(
            f"access denied reading {what} from {hostname()} ({code}): check the host's S3 credentials",
            s3_code=code,
        )
    text = str(exc).replace("\n", " ")
    return NodeError(
        f"cannot read {what} from {hostname()} via {where}: {type(exc).__name__}: {text}: "
        "check the host's network, S3 endpoint and credentials",
        s3_code=code or type(exc).__name__,
    )


class _Fetch:
    """The bundle's raw bytes as they arrive: counted against `size` (a wrong object must not
    fill the disk), hashed, and read failures turned into one clear line by `on_error`."""

    def __init__(self, stream: Any, size: int | None, desc: str, on_error: Any) -> None:
        import hashlib

        self.stream = stream
        self.size = size
        self.desc = desc
        self.on_error = on_error
        self.digest = hashlib.sha256()
        self.count = 0
        self.eof = False

    def announced(self, length: Any) -> None:
        """Refuse up front when the server says it will send more than `size`."""
        try:
            length = int(length) if length is not None else None
        except ValueError:
            return
        if length is not None and self.size is not None and length > self.size:
            raise self._too_big(length)

    def read(self, n: int = CHUNK) -> bytes:
        if self.eof:
            return b""
        # Read at most one byte past the limit: enough to know it was exceeded.
        want = n if self.size is None else max(1, min(n, self.size - self.count + 1))
        try:
            chunk = self.stream.read(want)
        except NodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's exceptions are only known after import
            raise self.on_error(exc) from None
        if not chunk:
            self.eof = True
            return b""
        self.count += len(chunk)
        if self.size is not None and self.count > self.size:
            raise self._too_big(None)
        self.digest.update(chunk)
        return chunk

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def _too_big(self, length: int | None) -> NodeError:
        got = f"{length} bytes announced" if length is not None else "more bytes than that"
        return VerificationError(
            f"bundle {self.desc} on {hostname()} should be {self.size} bytes, but the store "
            f"sent {got}; download stopped, nothing was activated: re-publish the bundle "
            "or check the store"
        )


class _open_source:
    """`with _open_source(cfg, source) as raw:` the bundle as a _Fetch (url, s3 or file)."""

    def __init__(self, cfg: Config, source: Source) -> None:
        self.cfg = cfg
        self.source = source
        self.handle: Any = None

    def __enter__(self) -> _Fetch:
        cfg, source = self.cfg, self.source
        desc = source.describe(cfg)
        if source.kind == "file":
            path = os.path.abspath(source.value)
            try:
                self.handle = open(path, "rb")  # noqa: SIM115 - closed in __exit__
            except OSError as exc:
                raise NodeError(
                    f"cannot read bundle {path} on {hostname()}: {exc.strerror}"
                ) from None

            def file_error(exc: Exception) -> NodeError:
                return NodeError(f"cannot read bundle {path} on {hostname()}: {exc}")

            return _Fetch(self.handle, source.size, desc, file_error)
        if source.kind == "url":
            return self._open_url(source.value, source.size, desc, cfg.download_timeout)
        what = f"bundle s3://{cfg.s3.bucket}/{source.value}"

        def s3_error(exc: Exception) -> NodeError:
            return _s3_error(exc, what, cfg)

        client = s3_client(cfg)
        try:
            obj = client.get_object(Bucket=cfg.s3.bucket, Key=source.value)
        except Exception as exc:  # noqa: BLE001 - botocore's exceptions are only known after import
            raise s3_error(exc) from None
        self.handle = obj["Body"]
        fetch = _Fetch(self.handle, source.size, desc, s3_error)
        fetch.announced(obj.get("ContentLength"))
        return fetch

    def _open_url(self, url: str, size: int | None, desc: str, timeout: float) -> _Fetch:
        import urllib.error
        import urllib.request

        shown = redact_url(url)

        def url_error(exc: Exception) -> NodeError:
            reason = getattr(exc, "reason", exc)
            return NodeError(
                f"cannot download {shown} on {hostname()}: {reason}: check the host's network "
                "and the store, then deploy again"
            )

        try:
            self.handle = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as exc:
            hint = {
                400: ": the presigned URL may have expired, deploy again",
                403: ": the presigned URL may have expired, deploy again",
                404: ": the bundle is not in the store, publish it again",
            }.get(exc.code, ": check the store, then deploy again")
            raise NodeError(f"HTTP {exc.code} fetching {shown} on {hostname()}{hint}") from None
        except OSError as exc:
            raise url_error(exc) from None
        fetch = _Fetch(self.handle, size, desc, url_error)
        fetch.announced(self.handle.headers.get("Content-Length"))
        return fetch

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            try:
                self.handle.close()
            except Exception:  # noqa: BLE001, S110 - closing a failed download must not mask its error
                pass


def fetch_and_extract(
    cfg: Config,
    layout: Layout,
    source: Source,
    expected: str,
    dest: str,
    previous: str | None = None,
) -> dict[str, Any]:
    """Stream the bundle into `dest` (a new staging dir) in one pass: download, sha256,
    decompress, validate and write as the bytes arrive. Returns extract_stream's counts.

    Nothing outside `dest` is written: symlinks are created only once every member has been
    read and validated, so no write can go through one. `dest` is removed on any failure,
    including a sha256 mismatch, which is checked over the whole download before returning
    (so before anything is swapped in). A bundle that fails to parse is still read to its
    end first: a corrupted download is reported as a sha256 mismatch (boot retries those),
    not as a corrupt bundle. `previous` is the release whose unchanged files are hardlinked
    (cfg.link_unchanged)."""
    expected = expected.strip().lower()
    desc = source.describe(cfg)
    in_state = False
    if source.kind == "file":
        path = os.path.abspath(source.value)
        in_state = os.path.commonpath([path, layout.state]) == layout.state
    try:
        with _open_source(cfg, source) as raw:
            try:
                counts = extract_stream(
                    raw, dest, cfg.max_files, desc, previous if cfg.link_unchanged else None
                )
                raw.drain()
            except NodeError as exc:
                if not isinstance(exc, VerificationError) and not raw.eof:
                    try:
                        raw.drain()
                    except NodeError:
                        raise exc from None
                if raw.eof and raw.digest.hexdigest() != expected:
                    _verify(raw.digest.hexdigest(), expected, desc)
                raise
            try:
                _verify(raw.digest.hexdigest(), expected, desc)
            except BaseException:
                remove_path(dest)
                raise
    finally:
        if in_state and os.path.lexists(source.value):
            os.unlink(source.value)
    return counts


def _verify(actual: str, expected: str, desc: str) -> None:
    if actual != expected:
        raise VerificationError(
            f"sha256 mismatch for bundle {desc} on {hostname()}: expected {expected}, "
            f"got {actual}; nothing was activated: re-publish the bundle or check the source"
        )


def read_pointer_s3(cfg: Config) -> dict[str, Any]:
    key = cfg.s3.key("published.json")
    what = f"pointer s3://{cfg.s3.bucket}/{key}"
    client = s3_client(cfg)
    try:
        raw = client.get_object(Bucket=cfg.s3.bucket, Key=key)["Body"].read()
    except Exception as exc:  # botocore's exception classes are only known after import
        raise _s3_error(exc, what, cfg) from None
    return parse_pointer(raw, what)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def parse_pointer(raw: bytes, what: str) -> Any:
    """JSON that anyone with bucket write may have written: NaN, Infinity, 1e999 and nesting
    deep enough to exhaust the recursion limit are one clear NodeError, never a crash."""

    def finite(text: str) -> float:
        value = float(text)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{text} is not a finite number")
        return value

    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=finite)
    except RecursionError:
        raise NodeError(f"{what} is nested too deeply to be a pointer: re-publish") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise NodeError(f"{what} is not valid JSON ({exc}): re-publish") from None


def validate_pointer(pointer: Any, cfg: Config) -> dict[str, Any]:
    where = f"pointer s3://{cfg.s3.bucket}/{cfg.s3.key('published.json')}"
    if not isinstance(pointer, dict):
        raise NodeError(f"{where} is not a JSON object: re-publish")
    for field in ("key", "commit", "sha256"):
        if not isinstance(pointer.get(field), str) or not pointer[field]:
            raise NodeError(f"{where} lacks field {field!r}: re-publish")
    if pointer.get("bundle_id") is not None and (
        not isinstance(pointer["bundle_id"], str) or not pointer["bundle_id"]
    ):
        raise NodeError(f"{where} has an invalid 'bundle_id': re-publish")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", pointer["sha256"]):
        raise NodeError(f"{where} has a malformed sha256: re-publish")
    size = pointer.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise NodeError(f"{where} lacks a valid 'size' (bytes of the bundle): re-publish")
    committed = pointer.get("committed_at")
    if committed is not None and (
        not isinstance(committed, int) or isinstance(committed, bool) or not 0 <= committed < 2**63
    ):
        raise NodeError(
            f"{where} has an invalid 'committed_at' ({str(committed)[:40]}): re-publish"
        )
    return pointer


# --------------------------------------------------------------------------------------------
# signed releases: `ssh-keygen -Y` against the trusted signers (no crypto of our own)

NS_MANIFEST = "fabdeploy-manifest"
NS_POINTER = "fabdeploy-pointer"
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _signers_file(cfg: Config) -> str | None:
    """The trusted signers, if installed; refused if the account we run as could rewrite them."""
    path = cfg.signers
    if not path:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TrustError(
            f"trusted signers {path} are missing on {hostname()}: re-run the controller's setup"
        ) from None
    folder = os.stat(os.path.dirname(path))
    # The folder too: whoever can write it can rename another file over this one.
    if (
        st.st_uid != 0
        or st.st_mode & 0o022
        or folder.st_uid != 0
        or folder.st_mode & 0o022
        or (os.geteuid() != 0 and os.access(path, os.W_OK))
    ):
        raise TrustError(
            f"trusted signers {path} on {hostname()} can be written by someone other than root: "
            "refusing to trust them; re-run the controller's setup"
        )
    return path


def verify_envelope(
    signers: str, envelope: Any, namespace: str, what: str
) -> tuple[dict[str, Any], str]:
    """The payload of a signed envelope and who signed it, or TrustError naming the problem."""
    import subprocess
    import tempfile

    if not (
        isinstance(envelope, dict)
        and isinstance(envelope.get("payload"), str)
        and isinstance(envelope.get("signature"), str)
    ):
        raise TrustError(f"{what} is not signed: refusing it on {hostname()}")
    with tempfile.TemporaryDirectory(prefix="fabdeploy-verify-") as tmp:
        sig = os.path.join(tmp, "sig")
        with open(sig, "w", encoding="utf-8") as fh:
            fh.write(envelope["signature"])
        try:
            found = subprocess.run(
                ["ssh-keygen", "-Y", "find-principals", "-s", sig, "-f", signers],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
            )
        except FileNotFoundError:
            raise TrustError(
                f"ssh-keygen not found on {hostname()}: install openssh-client (8.2+)"
            ) from None
        principals = found.stdout.decode("utf-8", "replace").split()
        if found.returncode != 0 or not principals:
            raise TrustError(
                f"{what} is signed by a key that is not trusted on {hostname()}: refusing it"
            )
        ok = subprocess.run(
            [
                "ssh-keygen",
                "-Y",
                "verify",
                "-f",
                signers,
                "-I",
                principals[0],
                "-n",
                namespace,
                "-s",
                sig,
            ],
            input=envelope["payload"].encode(),
            capture_output=True,
            timeout=60,
        )
        if ok.returncode != 0:
            raise TrustError(
                f"{what}: the signature of {principals[0]} does not match its content "
                f"(changed after signing): refusing it on {hostname()}"
            )
    try:
        payload = json.loads(envelope["payload"])
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise TrustError(f"{what}: its signed payload is not a JSON object")
    return payload, principals[0]


def check_manifest(
    cfg: Config, signers: str, envelope: Any, *, sha256: str, commit: str, size: int | None
) -> str:
    """A signed manifest that names exactly this bundle; returns the principal that signed it."""
    what = f"the manifest of {commit[:12]}"
    m, principal = verify_envelope(signers, envelope, NS_MANIFEST, what)
    if m.get("app") != cfg.app:
        raise TrustError(f"{what} is for app {m.get('app')!r}, not {cfg.app!r}: refusing it")
    if (
        m.get("commit") != commit
        or m.get("sha256") != sha256
        or (size is not None and m.get("size") != size)
    ):
        raise TrustError(
            f"{what}, signed by {principal}, names another bundle "
            f"({str(m.get('commit'))[:12]}, sha256 {str(m.get('sha256'))[:12]}): refusing it"
        )
    return principal


def _trust_path(layout: Layout) -> str:
    return os.path.join(layout.state, "trust.json")


def read_trust(layout: Layout) -> dict[str, Any]:
    try:
        fd = open_nofollow(_trust_path(layout), os.O_RDONLY)
        with os.fdopen(fd, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, NodeError):
        return {}


def record_trust(layout: Layout, sequence: int, principal: str) -> None:
    os.makedirs(layout.state, 0o755, exist_ok=True)
    atomic_write(
        _trust_path(layout),
        json.dumps({"sequence": sequence, "principal": principal, "at": iso_now()}, sort_keys=True)
        + "\n",
    )


def trusted_pointer(
    cfg: Config, layout: Layout, pointer: dict[str, Any]
) -> tuple[dict[str, Any], Any]:
    """The pointer fields to act on, from its verified signature when signers are installed.

    Returns (pointer, trust) where trust is (sequence, principal) to record once the release
    runs, or None for an unsigned pointer accepted on the upgrade path."""
    signers = _signers_file(cfg)
    if signers is None:
        return pointer, None
    where = f"pointer s3://{cfg.s3.bucket}/{cfg.s3.key('published.json')}"
    seen = read_trust(layout)
    if not pointer.get("signed"):
        if cfg.allow_unsigned and not seen:
            return pointer, None
        raise TrustError(
            f"{where} is not signed: refusing it on {hostname()} "
            + (
                "(this node already runs signed releases)"
                if seen
                else "(publish with signing.key set)"
            )
        )
    p, principal = verify_envelope(signers, pointer["signed"], NS_POINTER, where)
    seq = p.get("sequence")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise TrustError(f"{where}, signed by {principal}, has no valid sequence: refusing it")
    last = seen.get("sequence")
    if isinstance(last, int) and seq < last:
        raise TrustError(
            f"{where} has sequence {seq}, older than {last} that this node accepted: "
            "a replayed pointer; refusing it (publish again to move forward)"
        )
    for name in ("key", "commit", "sha256"):
        if not isinstance(p.get(name), str) or not p[name]:
            raise TrustError(f"{where}, signed by {principal}, lacks {name!r}: refusing it")
    size = p.get("size")
    if (
        not isinstance(size, int)
        or isinstance(size, bool)
        or size < 0
        or not _SHA_RE.fullmatch(p["sha256"])
    ):
        raise TrustError(
            f"{where}, signed by {principal}, has a malformed size or sha256: refusing it"
        )
    check_manifest(
        cfg, signers, p.get("manifest"), sha256=p["sha256"], commit=p["commit"], size=size
    )
    return p, (seq, principal)


# --------------------------------------------------------------------------------------------
# safe extraction (Python 3.11.2 has no tarfile data filter, so every check is ours)


def _member_path(raw: str, what: str) -> str:
    if raw.startswith("/"):
        raise UnsafeBundle(f"{what} {raw!r} is an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeBundle(f"{what} {raw!r} contains a '..' component")
    return "/".join(parts)


class _Resolver:
    """Resolves paths like the kernel would, using the archive's own symlinks only.

    Each symlink is resolved once (memo): without it, links like L2 -> L1/../L1 double the
    work at every level, and ~40 of them would hold the host lock for days. The total
    number of steps is capped as well, so no bundle can make validation slow."""

    def __init__(self, symlinks: dict[str, str], max_steps: int) -> None:
        self.symlinks = symlinks
        self.memo: dict[str, list[str] | None] = {}
        self.steps = 0
        self.max_steps = max_steps
        self.member = ""

    def link(self, name: str) -> list[str] | None:
        """Where the symlink member `name` leads; None if it escapes or loops."""
        return self._link(name, 0)

    def _link(self, name: str, depth: int) -> list[str] | None:
        if name in self.memo:
            return self.memo[name]
        if depth > 40:
            return None  # like ELOOP; also what a cycle ends in
        parts = name.split("/")
        resolved = self._walk(parts[:-1], self.symlinks[name], depth)
        self.memo[name] = resolved
        return resolved

    def _walk(self, base: list[str], target: str, depth: int) -> list[str] | None:
        if target.startswith("/"):
            return None
        cur = list(base)
        for comp in target.split("/"):
            self.steps += 1
            if self.steps > self.max_steps:
                raise UnsafeBundle(
                    f"its symlinks take more than {self.max_steps} steps to resolve "
                    f"(at symlink {self.member!r}): flatten the symlink chains"
                )
            if comp in ("", "."):
                continue
            if comp == "..":
                if not cur:
                    return None
                cur.pop()
                continue
            cur.append(comp)
            key = "/".join(cur)
            if key in self.symlinks:
                resolved = self._link(key, depth + 1)
                if resolved is None:
                    return None
                self.steps += len(resolved)  # the copy costs too
                cur = list(resolved)
        return cur


def _space_error(path: str, needed: int | None) -> NodeError:
    try:
        free = disk_free(path)
    except OSError:
        free = 0
    need = f"{mb(needed)} MB needed, " if needed is not None else ""
    return NodeError(
        f"not enough disk space on {hostname()} at {path}: {need}{mb(free)} MB free: "
        "free some space (e.g. `cleanup`, lower keep_releases) and deploy again",
        needed_mb=round(needed / 1048576, 1) if needed is not None else None,
        free_mb=round(free / 1048576, 1),
    )


def _safe_tarfile_class() -> type[tarfile.TarFile]:
    import tarfile

    class SafeTarInfo(tarfile.TarInfo):
        """Refuses oversized metadata before tarfile reads it: tarfile reads a pax or GNU
        long-name header's whole payload into memory, whatever size the header claims.
        _proc_member is tarfile's documented extension point for subclasses (3.8 to 3.13)."""

        def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
            ext = (
                tarfile.XHDTYPE,
                tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE,
                tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK,
            )
            if self.type in ext:
                what = {
                    tarfile.GNUTYPE_LONGNAME: "GNU long-name",
                    tarfile.GNUTYPE_LONGLINK: "GNU long-link",
                }.get(self.type, "pax")
                if self.size > MAX_EXT_HEADER:
                    raise UnsafeBundle(
                        f"a {what} header at offset {self.offset} claims {self.size} bytes "
                        f"(limit {MAX_EXT_HEADER})"
                    )
                # Each header stacks on the next (and tarfile recurses): bound the chain.
                chain = getattr(tf, "_fabdeploy_chain", 0) + 1
                if chain > MAX_EXT_CHAIN:
                    raise UnsafeBundle(
                        f"more than {MAX_EXT_CHAIN} extended headers in a row at offset "
                        f"{self.offset}"
                    )
                tf._fabdeploy_chain = chain  # type: ignore[attr-defined]
                if self.type == tarfile.XGLTYPE:
                    # Global headers accumulate and are copied into every later member.
                    total = getattr(tf, "_fabdeploy_global", 0) + self.size
                    if total > MAX_GLOBAL_HEADERS:
                        raise UnsafeBundle(
                            f"its pax global headers exceed {MAX_GLOBAL_HEADERS} bytes"
                        )
                    tf._fabdeploy_global = total  # type: ignore[attr-defined]
            elif self.type == tarfile.GNUTYPE_SPARSE:
                raise UnsafeBundle(f"member {self.name!r} is a GNU sparse file")
            else:
                tf._fabdeploy_chain = 0  # type: ignore[attr-defined]
            return super()._proc_member(tf)  # type: ignore[misc]

        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> SafeTarInfo:
            """tarfile's own fromtarfile, with a fast frombuf for the plain headers that make
            up almost every bundle; anything else goes through tarfile's frombuf."""
            fileobj = tf.fileobj
            buf = fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
            obj = _plain_header(cls, buf, tf.encoding, tf.errors)
            if obj is None:
                obj = cls.frombuf(buf, tf.encoding, tf.errors)
            obj.offset = fileobj.tell() - tarfile.BLOCKSIZE  # type: ignore[union-attr]
            return obj._proc_member(tf)  # type: ignore[attr-defined,no-any-return]

        def _proc_gnusparse_00(self, *args: Any) -> None:
            raise UnsafeBundle("it has a pax sparse file")

        _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00

    class SafeTarFile(tarfile.TarFile):
        tarinfo = SafeTarInfo

        def chown(self, tarinfo: tarfile.TarInfo, targetpath: Any, numeric_owner: bool) -> None:
            # Files belong to whoever runs the deploy; bundle owners mean nothing here.
            return None

    return SafeTarFile


# ustar (POSIX) and GNU magic; the plain member types: file, V7 file, dir, symlink, hard link.
_PLAIN_MAGIC = (b"ustar\x00", b"ustar ")
_PLAIN_TYPES = (b"0", b"\x00", b"5", b"2", b"1")
_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337))


def _plain_header(cls: Any, buf: bytes, encoding: str, errors: str) -> Any:
    """TarInfo.frombuf(buf) for a plain header (ustar or GNU magic, a plain member type, octal
    numbers, no ustar prefix, the unsigned checksum), or None for tarfile's own frombuf: the
    same object, at a fraction of the cost (frombuf was most of the time of a hotfix that
    links everything). Anything unusual, malformed or at the end goes the slow way."""
    if (
        len(buf) != 512
        or buf[156:157] not in _PLAIN_TYPES
        or buf[257:263] not in _PLAIN_MAGIC
        or buf[345]  # a ustar name prefix
    ):
        return None
    try:
        mode, uid, gid, size, mtime, chksum, devmajor = [
            int(buf[a:b].split(b"\0", 1)[0].strip() or b"0", 8) for a, b in _NUMBERS
        ]
        devminor = int(buf[337:345].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:  # base-256, junk: frombuf decides
        return None
    if chksum != 256 + sum(buf) - sum(buf[148:156]):
        return None  # maybe a signed checksum: frombuf decides

    name, linkname, uname, gname = [
        buf[a:b].split(b"\0", 1)[0].decode(encoding, errors)
        for a, b in ((0, 100), (157, 257), (265, 297), (297, 329))
    ]
    obj = cls()
    obj.name, obj.linkname, obj.uname, obj.gname = name, linkname, uname, gname
    obj.mode, obj.uid, obj.gid, obj.size = mode, uid, gid, size
    obj.mtime, obj.chksum = mtime, chksum
    obj.type = buf[156:157]
    obj.devmajor, obj.devminor = devmajor, devminor
    if obj.type == b"\x00" and obj.name.endswith("/"):
        obj.type = b"5"  # V7: a dir is a file with a trailing slash
    if obj.type == b"5":
        obj.name = obj.name.rstrip("/")
    return obj


class _Members:
    """Validates members one by one as they stream past (validate_members is the batch form).

    Each member is checked against the ones before it (paths, types, duplicates, what it goes
    through); symlinks are collected and resolved by `finish`, once all of them are known."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.symlinks: dict[str, str] = {}
        self.count = 0

    def accept(self, m: tarfile.TarInfo) -> bool:
        """Sanitise `m` in place; False for the "./" entry (nothing to do); raises UnsafeBundle."""
        kinds = self.kinds
        name = _member_path(m.name, "member")
        if not name:
            if m.isdir():
                return False  # the "./" entry of `tar -C dir .`
            raise UnsafeBundle(f"member {m.name!r} has an empty path")
        parts = name.split("/")
        # Every name in `kinds` has all its prefixes there as dirs: when the parent is a known
        # dir, so are all the others (the common case: one dict lookup, not one per level).
        parent = name.rpartition("/")[0]
        walk = bool(parent) and kinds.get(parent) != "dir"
        for i in range(1, len(parts) if walk else 0):
            prefix = "/".join(parts[:i])
            kind = kinds.get(prefix)
            if kind is not None and kind != "dir":
                raise UnsafeBundle(f"member {m.name!r} goes through {kind} member {prefix!r}")
        previous = kinds.get(name)
        if previous is not None and not (previous == "dir" and m.isdir()):
            # A second write could go through an existing symlink, so no overwriting at all.
            raise UnsafeBundle(f"member {m.name!r} appears twice in the bundle")
        # git archive's default tar.umask (002) makes members group-writable: a release
        # must not be writable by anyone but its owner.
        if m.isdir():
            kind = "dir"
            m.mode = (m.mode & 0o755) | 0o700  # we must be able to link shared dirs inside
        elif m.isreg():
            kind = "file"
            m.mode &= 0o755  # drop setuid/setgid/sticky and group/other write
        elif m.issym():
            kind = "symlink"
            if m.linkname.startswith("/"):
                raise UnsafeBundle(f"symlink {m.name!r} points to absolute path {m.linkname!r}")
            self.symlinks[name] = m.linkname
        elif m.islnk():
            kind = "hardlink"
            target = _member_path(m.linkname, f"hard link {m.name!r} target")
            if kinds.get(target) not in ("file", "hardlink"):
                raise UnsafeBundle(
                    f"hard link {m.name!r} points to {m.linkname!r}, which is not an earlier "
                    "regular file of the bundle"
                )
            m.linkname = target
            m.mode &= 0o755
        else:
            raise UnsafeBundle(
                f"member {m.name!r} is a special file (device, fifo or unknown type "
                f"{m.type!r}): not allowed in a bundle"
            )
        m.name = name
        m.uid = m.gid = 0
        m.uname = m.gname = ""
        kinds[name] = kind
        for i in range(1, len(parts) if walk else 0):  # implicit parents stay dirs
            kinds.setdefault("/".join(parts[:i]), "dir")
        self.count += 1
        return True

    def finish(self) -> None:
        resolver = _Resolver(
            self.symlinks, max_steps=MAX_RESOLVE_STEPS_PER_MEMBER * max(1, self.count)
        )
        for name, target in self.symlinks.items():
            resolver.member = name
            if resolver.link(name) is None:
                raise UnsafeBundle(f"symlink {name!r} -> {target!r} resolves outside the release")


def validate_members(members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """Reject the whole bundle on the first unsafe member; returns sanitised members."""
    check = _Members()
    accepted = [m for m in members if check.accept(m)]
    check.finish()
    return accepted


class _Unpacked:
    """The tar stream inside the raw bytes (gzip, bzip2, xz or none), decompressed as it is
    read, for tarfile: a forward-only file object (tarfile only seeks forward when it reads
    members in order). Decompression is bounded per step, so a bomb costs time, not RAM."""

    def __init__(self, raw: _Fetch) -> None:
        self.raw = raw
        self.pos = 0
        self.buf = b""
        self.off = 0
        head = raw.read(CHUNK)
        self.pending = head
        self.dec: Any = None
        self.zlib = False
        if head[:2] == b"\x1f\x8b":
            import zlib

            self.dec, self.zlib = zlib.decompressobj(31), True
        elif head[:3] == b"BZh":
            import bz2

            self.dec = bz2.BZ2Decompressor()
        elif head[:6] == b"\xfd7zXZ\x00":
            import lzma

            self.dec = lzma.LZMADecompressor()

    def _raw(self) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        return self.raw.read(CHUNK)

    def _inflate(self) -> bytes:
        """The next piece of the tar stream (at most CHUNK bytes); b"" at its end."""
        d = self.dec
        if d is None:
            return self._raw()
        while True:
            if d.eof:
                rest = d.unused_data or self._raw()
                if not rest:
                    return b""
                if not (self.zlib and rest[:2] == b"\x1f\x8b"):
                    raise EOFError("unexpected data after the end of the compressed stream")
                import zlib

                d = self.dec = zlib.decompressobj(31)  # a concatenated gzip member
                data = rest
            elif self.zlib:
                data = d.unconsumed_tail or self._raw()
            else:
                data = self._raw() if d.needs_input else b""
            if not data and (self.zlib or d.needs_input):
                raise EOFError("the compressed stream ends early (truncated?)")
            out = d.decompress(data, CHUNK)
            if out:
                return out

    def read(self, n: int = -1) -> bytes:
        buf, off = self.buf, self.off
        if 0 <= n <= len(buf) - off:
            self.off = off + n
            self.pos += n
            return buf[off : off + n]
        parts = [buf[off:]]
        have = len(parts[0])
        self.buf, self.off = b"", 0
        while n < 0 or have < n:
            more = self._inflate()
            if not more:
                break
            if n >= 0 and have + len(more) > n:
                take = n - have
                parts.append(more[:take])
                self.buf, self.off = more, take
                have = n
                break
            parts.append(more)
            have += len(more)
        self.pos += have
        return b"".join(parts)

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self.pos
        if whence == 2 or pos < self.pos:
            raise OSError(errno.ESPIPE, "the bundle stream only reads forward")
        while self.pos < pos:
            if not self.read(min(CHUNK, pos - self.pos)):
                break  # like a file: seeking past the end is allowed, reading there is not
        return self.pos


class _Space:
    """Disk space, checked as the release is written (the size is only known as it streams):
    a release never takes the filesystem below SPACE_SLACK free, like the upfront check did."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0
        self.budget = disk_free(path) - SPACE_SLACK
        if self.budget < 0:  # dirs and inodes need room too, even if every file is linked
            raise _space_error(path, SPACE_SLACK)

    def take(self, size: int) -> None:
        need = max(BLOCK, -(-size // BLOCK) * BLOCK)
        if need > self.budget:
            self.budget = disk_free(self.path) - SPACE_SLACK  # others write too
            if need > self.budget:
                raise _space_error(self.path, self.written + need + SPACE_SLACK)
        self.budget -= need
        self.written += need


def _same_content(src: Any, prev_fd: int, size: int, first: bytes) -> tuple[bool, int, bytes]:
    """Compare the member's data (`first`, then the rest from `src`) with the previous
    release's file. (True, size, b"") when equal; else (False, offset, chunk): the member's
    bytes before `offset` equal the previous file's, `chunk` (read, not yet written) differs."""
    offset = 0
    chunk = first
    while True:
        if chunk:
            if os.pread(prev_fd, len(chunk), offset) != chunk:
                return False, offset, chunk
            offset += len(chunk)
        if offset >= size:
            return True, size, b""
        chunk = src.read(min(CHUNK, size - offset))
        if not chunk:
            raise tarfile_error("unexpected end of data")


def tarfile_error(message: str) -> Exception:
    import tarfile

    return tarfile.ReadError(message)


_READ_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_CREATE_NOFOLLOW = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
)


class _Writer:
    """Writes members into the staging dir `dest`; with `previous`, a regular file whose size,
    mode, owner and bytes equal the previous release's file at the same path becomes a
    hardlink to it instead of a copy (compared while streaming, the previous file read only
    when size and mode match)."""

    def __init__(self, dest: str, previous: str | None, space: _Space) -> None:
        self.dest = dest
        self.previous = previous
        self.space = space
        self.made: set[str] = {""}
        self.prev_dirs: dict[str, bool] = {"": True}
        self.dirs: list[tarfile.TarInfo] = []
        self.uid = os.geteuid()
        self.linked = 0
        self.written = 0
        self.files: list[str] = []  # written (not linked), relative to dest: what to fsync

    def parents(self, name: str) -> None:
        parent = name.rpartition("/")[0]
        if parent not in self.made:
            os.makedirs(os.path.join(self.dest, parent), 0o755, exist_ok=True)
            while parent and parent not in self.made:
                self.made.add(parent)
                parent = parent.rpartition("/")[0]

    def directory(self, m: tarfile.TarInfo) -> None:
        self.parents(m.name)
        if m.name not in self.made:
            try:
                os.mkdir(os.path.join(self.dest, m.name), 0o700)
            except FileExistsError:
                pass  # a second entry for the same dir
            self.made.add(m.name)
        self.dirs.append(m)  # mode and mtime at the end, like tarfile

    def _prev_dir_is_real(self, rel: str) -> bool:
        """The previous release's dir `rel` is a real dir inside it, reached through no
        symlink: its linked_dirs (symlinks into shared/) must never be linked from."""
        known = self.prev_dirs.get(rel)
        if known is None:
            parent, _, _ = rel.rpartition("/")
            known = self._prev_dir_is_real(parent)
            if known:
                try:
                    known = stat.S_ISDIR(os.lstat(os.path.join(self.previous or "", rel)).st_mode)
                except OSError:
                    known = False
            self.prev_dirs[rel] = known
        return known

    def _previous_fd(self, m: tarfile.TarInfo) -> int | None:
        if self.previous is None or not self._prev_dir_is_real(m.name.rpartition("/")[0]):
            return None
        try:
            fd = os.open(f"{self.previous}/{m.name}", _READ_NOFOLLOW)
        except OSError:
            return None
        st = os.fstat(fd)
        if (
            stat.S_ISREG(st.st_mode)
            and st.st_size == m.size
            and st.st_uid == self.uid
            and stat.S_IMODE(st.st_mode) == m.mode
        ):
            return fd
        os.close(fd)
        return None

    def file(self, m: tarfile.TarInfo, src: Any) -> None:
        self.parents(m.name)
        path = f"{self.dest}/{m.name}"
        size = m.size
        first = src.read(min(CHUNK, size)) if size else b""
        prev_fd = self._previous_fd(m)
        try:
            offset = 0
            if prev_fd is not None:
                same, offset, first = _same_content(src, prev_fd, size, first)
                if same:
                    try:
                        os.link(f"{self.previous}/{m.name}", path, follow_symlinks=False)
                        self.linked += 1
                        return
                    except OSError:
                        pass  # EMLINK and the like: copy it instead (the same bytes)
            self.space.take(size)
            fd = os.open(path, _CREATE_NOFOLLOW, 0o600)
            self.files.append(m.name)
            try:
                done = 0
                while done < offset:  # the previous file's bytes, equal to the member's
                    data = os.pread(prev_fd, min(CHUNK, offset - done), done)  # type: ignore[arg-type]
                    if not data:
                        raise OSError(errno.EIO, f"{self.previous}/{m.name} shrank while read")
                    _write_all(fd, data)
                    done += len(data)
                if first:
                    _write_all(fd, first)
                    done += len(first)
                while done < size:
                    chunk = src.read(min(CHUNK, size - done))
                    if not chunk:
                        raise tarfile_error("unexpected end of data")
                    _write_all(fd, chunk)
                    done += len(chunk)
                os.fchmod(fd, m.mode)
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)
            self.written += size
        finally:
            if prev_fd is not None:
                os.close(prev_fd)

    def hardlink(self, m: tarfile.TarInfo) -> None:
        self.parents(m.name)
        os.link(
            os.path.join(self.dest, m.linkname),
            os.path.join(self.dest, m.name),
            follow_symlinks=False,
        )

    def finish(self, symlinks: list[tarfile.TarInfo]) -> None:
        for m in symlinks:
            self.parents(m.name)
            os.symlink(m.linkname, os.path.join(self.dest, m.name))
        for m in reversed(self.dirs):  # children first: setting a parent's mtime is last
            path = os.path.join(self.dest, m.name)
            os.chmod(path, m.mode)
            os.utime(path, (m.mtime, m.mtime))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def extract_stream(
    raw: _Fetch, dest: str, max_files: int, desc: str, previous: str | None = None
) -> dict[str, Any]:
    """Extract the bundle arriving on `raw` into `dest` (must not exist) in one pass; on
    any failure `dest` is removed. Returns counts: members, linked (hardlinked from
    `previous`), written (bytes of file data written); and the files written and the dirs
    made (relative to `dest`, "" for itself), for sync_release."""
    import gzip
    import tarfile
    import zlib

    corrupt: tuple[type[BaseException], ...] = (
        tarfile.TarError,
        zlib.error,
        EOFError,
        gzip.BadGzipFile,
    )
    try:
        import lzma

        corrupt += (lzma.LZMAError,)
    except ImportError:  # pragma: no cover - a Python built without lzma
        pass
    created = False
    old_umask = os.umask(0o022)  # parents we create on our own
    try:
        parent = os.path.dirname(dest)
        space = _Space(parent)
        os.mkdir(dest, 0o755)
        created = True
        writer = _Writer(dest, previous, space)
        check = _Members()
        symlinks: list[tarfile.TarInfo] = []
        stream = _Unpacked(raw)
        count = 0
        with _safe_tarfile_class().open(fileobj=stream, mode="r:") as tf:  # type: ignore[call-overload]
            while (m := tf.next()) is not None:
                m.pax_headers = {}  # applied already; kept per member they add up
                count += 1
                if count > max_files:
                    raise UnsafeBundle(
                        f"it has more than max_files={max_files} members "
                        "(raise max_files in node.json if that is intended)"
                    )
                if not check.accept(m):
                    continue
                if m.isreg():
                    stream.seek(m.offset_data)
                    writer.file(m, stream)
                elif m.isdir():
                    space.take(0)
                    writer.directory(m)
                elif m.issym():
                    space.take(0)
                    symlinks.append(m)  # created last, once all are validated
                else:
                    writer.hardlink(m)
            # tarfile stops at the end-of-archive blocks; read the rest so a truncated
            # compressed stream (missing CRC trailer) is detected.
            while stream.read(CHUNK):
                pass
        check.finish()
        writer.finish(symlinks)
        return {
            "members": check.count,
            "linked": writer.linked,
            "written": writer.written,
            "files": writer.files,
            "dirs": sorted(writer.made),
        }
    except UnsafeBundle as exc:
        _discard(dest, created)
        raise NodeError(
            f"unsafe bundle {desc} rejected on {hostname()}: {exc.message}; nothing was "
            "activated: fix the bundle (or its build) and publish again"
        ) from None
    except corrupt as exc:
        _discard(dest, created)
        raise NodeError(
            f"bundle {desc} is corrupt or truncated on {hostname()} ({type(exc).__name__}: {exc}): "
            "re-publish it and deploy again"
        ) from None
    except OSError as exc:
        _discard(dest, created)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _space_error(os.path.dirname(dest), None) from None
        raise NodeError(
            f"cannot extract bundle {desc} into {dest} on {hostname()}: {exc}"
        ) from None
    except BaseException:
        _discard(dest, created)
        raise
    finally:
        os.umask(old_umask)


def extract_bundle(bundle: str, dest: str, max_files: int, previous: str | None = None) -> int:
    """extract_stream of a local file (no sha256 check); returns the number of members."""
    try:
        fh = open(bundle, "rb")  # noqa: SIM115
    except OSError as exc:
        raise NodeError(f"cannot read bundle {bundle} on {hostname()}: {exc.strerror}") from None
    with fh:

        def file_error(exc: Exception) -> NodeError:
            return NodeError(f"cannot read bundle {bundle} on {hostname()}: {exc}")

        return extract_stream(
            _Fetch(fh, None, bundle, file_error), dest, max_files, bundle, previous
        )["members"]


def _discard(path: str, created: bool) -> None:
    if created and os.path.lexists(path):
        remove_path(path)


# --------------------------------------------------------------------------------------------
# release assembly


def check_linked_path(rel: str, kind: str) -> str:
    norm = [p for p in rel.split("/") if p not in ("", ".")]
    if rel.startswith("/") or not norm or ".." in norm:
        raise NodeError(
            f"linked {kind} {rel!r} in node.json must be a relative path inside the release "
            "without '..': fix linked_{kind}s in the deploy config"
        )
    return "/".join(norm)


def check_linked_files(cfg: Config, layout: Layout, skip_sourced: bool = False) -> None:
    """Every linked file exists in shared/ (with `skip_sourced`, not those the node fetches
    from their source: checked when they are fetched)."""
    sourced = {f.path for f in cfg.shared.files} if skip_sourced else set()
    for rel in cfg.linked_files:
        if rel in sourced:
            continue
        rel = check_linked_path(rel, "file")
        full = os.path.join(layout.shared, rel)
        if not os.path.exists(full):
            raise NodeError(
                f"linked file shared/{rel} is missing on {hostname()} ({full}): "
                "create it, then deploy again"
            )
    for rel in cfg.linked_dirs:
        check_linked_path(rel, "dir")


def write_revision(
    release: str, commit: str, committed_at: int | None, bundle_id: str | None = None
) -> None:
    # Same format as Capistrano's `echo "#{rev}" > REVISION`: value plus newline.
    stamp = int(committed_at) if committed_at is not None else int(time.time())
    files = [("REVISION", commit), ("REVISION_TIME", str(stamp))]
    if bundle_id and bundle_id != commit:
        files.append((BUNDLE_ID_FILE, bundle_id))
    for name, value in files:
        path = os.path.join(release, name)
        if os.path.lexists(path):
            remove_path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # 0644 whatever umask
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(value + "\n")


def _inside(release: str, path: str) -> bool:
    real_release = os.path.realpath(release)
    return os.path.commonpath([real_release, os.path.realpath(path)]) == real_release


def _makedirs_inside(release: str, rel_dir: str, what: str) -> None:
    """mkdir -p release/rel_dir one level at a time, checking each level BEFORE creating
    anything: a symlink in the release leading outside must not get directories made
    through it."""
    cur = release
    for comp in [p for p in rel_dir.split("/") if p]:
        cur = os.path.join(cur, comp)
        if not _inside(release, cur):
            raise NodeError(
                f"linked path {what!r} would leave release {release} via symlink {cur} on "
                f"{hostname()}: fix that symlink in the bundle or linked_files/linked_dirs"
            )
        if not os.path.lexists(cur):
            os.mkdir(cur, 0o755)


def link_shared(cfg: Config, layout: Layout, release: str) -> None:
    """Capistrano's deploy:symlink:linked_dirs / linked_files, with absolute targets."""
    check_linked_files(cfg, layout)
    pairs = [(check_linked_path(d, "dir"), True) for d in cfg.linked_dirs]
    pairs += [(check_linked_path(f, "file"), False) for f in cfg.linked_files]
    for rel, is_dir in pairs:
        shared = os.path.join(layout.shared, rel)
        if is_dir:
            os.makedirs(shared, 0o755, exist_ok=True)
        target = os.path.join(release, rel)
        _makedirs_inside(release, os.path.dirname(rel), rel)
        if os.path.lexists(target):
            remove_path(target)
        os.symlink(shared, target)


# --------------------------------------------------------------------------------------------
# shared config fetched from its source (SSM, Secrets Manager, S3)

# A linked file is config, not data: a source bigger than this is a mistake (or an attack).
MAX_SHARED_BYTES = 4 * 1024 * 1024
_SOURCE_MISSING = {
    "ParameterNotFound",
    "ParameterVersionNotFound",
    "ResourceNotFoundException",
    "NoSuchKey",
    "NoSuchBucket",
    "404",
    "NotFound",
}
_SOURCE_DENIED_HINT = {
    "ssm": "ssm:GetParameter and kms:Decrypt",
    "secret": "secretsmanager:GetSecretValue (and kms:Decrypt)",
    "s3": "s3:GetObject",
}


def _source_failure(exc: Exception, f: SharedFile, where: str) -> str:
    """Why a source could not be read, in a few words (the caller names the file and source)."""
    response = getattr(exc, "response", None)
    code = str(response.get("Error", {}).get("Code") or "") if isinstance(response, dict) else ""
    if code in _SOURCE_MISSING:
        return f"it does not exist ({code} at {where})"
    if "AccessDenied" in code or code in ("403", "Forbidden") or code.startswith("KMS"):
        return f"access denied ({code}): the instance role needs {_SOURCE_DENIED_HINT[f.kind]}"
    if code:
        message = str(response.get("Error", {}).get("Message") or "").replace("\n", " ")  # type: ignore[union-attr]
        return f"{code} at {where}: {message}".rstrip(": ")
    if type(exc).__name__ == "NoRegionError":
        return "no AWS region: set config_sources.region (or s3.region) in deploy.yml, then setup"
    text = str(exc).replace("\n", " ")
    return f"unreachable at {where}: {type(exc).__name__}: {text}"


def fetch_shared_value(cfg: Config, f: SharedFile, clients: dict[str, Any]) -> bytes:
    """The content of `f`'s source, as bytes. Raises NodeError with a short reason."""
    sc = cfg.shared
    if f.kind == "s3":
        service, region, endpoint = "s3", cfg.s3.region, cfg.s3.endpoint_url
    else:
        service = "ssm" if f.kind == "ssm" else "secretsmanager"
        region, endpoint = sc.region, sc.endpoints[service]
    where = endpoint or f"region {region or 'default'}"
    try:
        if service not in clients:
            clients[service] = aws_client(cfg, service, region, endpoint)
        client = clients[service]
        if f.kind == "ssm":
            value = client.get_parameter(Name=f.name, WithDecryption=True)["Parameter"]["Value"]
            data = str(value).encode("utf-8")
        elif f.kind == "secret":
            r = client.get_secret_value(SecretId=f.name)
            data = r["SecretBinary"] if r.get("SecretBinary") is not None else r["SecretString"]
            data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        else:
            body = client.get_object(Bucket=f.bucket, Key=f.name)["Body"]
            try:
                data = body.read(MAX_SHARED_BYTES + 1)
            finally:
                body.close()
    except NodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore's exceptions are only known after import
        raise NodeError(_source_failure(exc, f, where)) from None
    if len(data) > MAX_SHARED_BYTES:
        raise NodeError(f"it is larger than {MAX_SHARED_BYTES // (1024 * 1024)} MiB")
    return data


def _read_nofollow(path: str) -> tuple[bytes, os.stat_result] | None:
    """The bytes and stat of a regular file at `path`, without following a symlink there."""
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except (OSError, NodeError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SHARED_BYTES:
            return None
        chunks = []
        while True:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def write_shared_file(layout: Layout, rel: str, data: bytes) -> bool:
    """shared/<rel> := data, atomically, mode 0600, owned by whoever runs the node program (the
    deploy user). Unchanged content is not rewritten. Returns whether the file changed."""
    rel = check_linked_path(rel, "file")
    full = os.path.join(layout.shared, rel)
    os.makedirs(layout.shared, 0o755, exist_ok=True)
    _makedirs_inside(layout.shared, os.path.dirname(rel), rel)
    have = _read_nofollow(full)
    if have is not None and have[0] == data and have[1].st_uid == os.geteuid():
        if stat.S_IMODE(have[1].st_mode) != 0o600:
            fd = open_nofollow(full, os.O_RDONLY)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
        return False
    folder, base = os.path.split(full)
    tmp = os.path.join(folder, f".{base}.fabdeploy-{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)  # a leftover of a dead run with our pid; never followed
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, full)
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return True


def shared_file_info(layout: Layout, rel: str) -> dict[str, Any] | None:
    """What this host has at shared/<rel>: hashes and counts, never the content."""
    import hashlib

    full = os.path.join(layout.shared, check_linked_path(rel, "file"))
    have = _read_nofollow(full)
    if have is None:
        return None
    data, st = have
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "lines": data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "mine": st.st_uid == os.geteuid(),
        "mtime": utc_stamp(st.st_mtime),
    }


def refresh_shared(cfg: Config, layout: Layout) -> list[dict[str, Any]]:
    """Fetch every sourced linked file into shared/. A source that cannot be read keeps the
    last good copy (a warning); without a copy, that is an error naming the file and source
    (raised once every file was tried)."""
    import hashlib

    results: list[dict[str, Any]] = []
    clients: dict[str, Any] = {}
    missing: list[str] = []
    for f in cfg.shared.files:
        entry: dict[str, Any] = {"path": f.path, "source": f.describe()}
        try:
            data = fetch_shared_value(cfg, f, clients)
        except NodeError as exc:
            full = os.path.join(layout.shared, check_linked_path(f.path, "file"))
            if os.path.exists(full):
                log(
                    f"warning: kept the last good copy of shared/{f.path}: cannot read "
                    f"{f.describe()}: {exc.message}"
                )
                results.append({**entry, "outcome": "kept", "reason": exc.message})
                continue
            missing.append(
                f"cannot fetch linked file shared/{f.path} from {f.describe()} on "
                f"{hostname()}: {exc.message}; there is no earlier copy, so the app cannot start"
            )
            results.append({**entry, "outcome": "failed", "reason": exc.message})
            continue
        changed = write_shared_file(layout, f.path, data)
        if changed:
            log(f"shared/{f.path} updated from {f.describe()}")
        results.append(
            {
                **entry,
                "outcome": "written" if changed else "unchanged",
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    record_status(layout, "shared_config", {"files": results})
    if missing:
        raise NodeError(
            missing[0]
            + (f" (and {len(missing) - 1} more linked file(s))" if len(missing) > 1 else "")
            + ": check the source and the host's credentials, then retry",
            shared_config=results,
        )
    return results


def shared_pending(cfg: Config, layout: Layout) -> list[str]:
    """The sourced linked files whose source differs from this host's copy, fetched but not
    written (`activate --prepare`: the host is still in traffic; the switch writes them). A
    source that cannot be read with no copy to keep fails now, before the host leaves traffic."""
    clients: dict[str, Any] = {}
    pending = []
    for f in cfg.shared.files:
        full = os.path.join(layout.shared, check_linked_path(f.path, "file"))
        try:
            data = fetch_shared_value(cfg, f, clients)
        except NodeError as exc:
            if os.path.exists(full):
                log(f"warning: cannot read {f.describe()}: {exc.message}")
                continue
            raise NodeError(
                f"cannot fetch linked file shared/{f.path} from {f.describe()} on {hostname()}: "
                f"{exc.message}; there is no earlier copy, so the app cannot start: check the "
                "source and the host's credentials, then retry"
            ) from None
        have = _read_nofollow(full)
        if have is None or have[0] != data or have[1].st_uid != os.geteuid():
            pending.append(f.path)
    return pending


def shared_report(cfg: Config, fetch: bool = False) -> dict[str, Any]:
    """`node.py shared`: each sourced linked file's copy on this host (hashes, never content);
    with `fetch`, fetch them from their sources first."""
    layout = Layout(cfg.deploy_to)
    fetched = None
    if fetch:
        with HostLock(layout, "shared", cfg.lock_timeout):
            fetched = refresh_shared(cfg, layout)
    files = [
        {"path": f.path, "source": f.describe(), "copy": shared_file_info(layout, f.path)}
        for f in cfg.shared.files
    ]
    last = read_status(layout).get("shared_config")
    return {"ok": True, "files": files, "fetched": fetched, "last": last}


# The sudo password (`--sudo-stdin`): read from stdin, handed to `sudo -S` on its stdin.
SUDO_PASSWORD: str | None = None


def command_env(extra: dict[str, str]) -> dict[str, str]:
    """A hook's (or restart's) environment: what we started with, minus any credentials."""
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS and k not in _INJECTED}
    return {**base, **extra}


def restart_release(cfg: Config, layout: Layout, release: Current) -> None:
    """Run the app's restart for a release already in place (after a revert or a died run)."""
    if cfg.restart:
        env = _hook_env(layout, release.path, release.commit or "")
        run_shell(cfg.restart, release.path, env, "restart", cfg.sudo)


def run_shell(
    command: str,
    cwd: str,
    env: dict[str, str],
    label: str,
    sudo: bool = False,
    timeout: float | None = None,
) -> None:
    """Run through /bin/sh, relaying output to stderr (stdout is reserved for our JSON).

    `sudo`: through sudo, `-n` (fail, never prompt) unless the controller sent a password.
    With a timeout, the command runs in its own session and the whole group is killed then."""
    import signal
    import subprocess
    import threading
    from collections import deque

    secret = None
    if sudo:
        if SUDO_PASSWORD is None:
            command = f"sudo -n -- {command}"
        else:
            command, secret = f"sudo -S -p '' -- {command}", (SUDO_PASSWORD + "\n").encode()
    log(f"{label}: {command}")
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=cwd,
            env=command_env(env),
            stdin=subprocess.PIPE if secret else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=timeout is not None,
        )
    except OSError as exc:
        raise CommandFailed(command, 127, [str(exc)], label=label) from None
    if secret and proc.stdin is not None:
        try:
            proc.stdin.write(secret)
            proc.stdin.close()
        except OSError:
            pass
    assert proc.stdout is not None
    fired: list[bool] = []

    def kill() -> None:
        fired.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(timeout, kill) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            tail.append(line)
            # Framed with its label: the controller relays hook lines to the deploying terminal.
            _emit(f"{LOG_PREFIX}{label} | {line}")
            if label != "restart":
                HOOK_OUTPUT.append([label, line])
        rc = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
    if rc != 0:
        raise CommandFailed(
            command, rc, list(tail), timed_out=timeout if fired else None, label=label
        )


# The hook output of this run (bounded): a boot records it, so a roll can show it afterwards.
HOOK_OUTPUT: deque[list[str]] = deque(maxlen=200)


def run_hooks(
    cfg: Config, stage: str, cwd: str, env: dict[str, str], action: str, roles: list[str]
) -> None:
    """The `stage` hooks that apply to this run (not at boot if boot: false; only on their roles)."""
    for hook in cfg.hooks.get(stage, []):
        if hook.applies(action, roles):
            run_shell(hook.run, cwd, env, stage, timeout=hook.timeout)
        else:
            log(
                f"{stage}: skipped `{hook.run}` ({'not at boot' if action == 'boot' and not hook.boot else 'other roles'})"
            )


def swap_current(layout: Layout, release: str) -> None:
    """Atomic: a new symlink under a temp name renamed over `current` (rename(2) replaces
    the link itself, so readers see either the old or the new release, never nothing)."""
    if os.path.isdir(layout.current) and not os.path.islink(layout.current):
        raise NodeError(
            f"{layout.current} on {hostname()} is a real directory, not a symlink: "
            "move it aside and deploy again"
        )
    tmp = os.path.join(layout.deploy_to, f"{CURRENT_TMP_PREFIX}{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.abspath(release), tmp)
    os.replace(tmp, layout.current)


def append_revision_log(layout: Layout, line: str) -> None:
    # Called after the swap: a refused log file must not fail a deploy that happened.
    try:
        fd = open_nofollow(layout.revisions_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except NodeError as exc:
        log(f"warning: not logging to revisions.log: {exc.message}")
        return
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def _names(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def _prepared_info(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, PREPARED_MARKER), encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("at"), (int, float)):
        return None
    if not isinstance(info.get("bundle_id"), str) or not isinstance(info.get("sha256"), str):
        return None
    return info


def _prepared_to_keep(layout: Layout) -> list[str]:
    """The prepared releases still wanted, newest first: complete, younger than
    PREPARED_MAX_AGE (and not from the future), the newest of their bundle, PREPARED_KEEP at most."""
    now = time.time()
    found = []
    for name in _names(layout.releases):
        if name.startswith(PREPARED_PREFIX):
            info = _prepared_info(layout.release_path(name))
            if info is not None and -300 <= now - info["at"] <= PREPARED_MAX_AGE:
                found.append((info["at"], name, info["bundle_id"]))
    keep: list[str] = []
    bundles: set[str] = set()
    for _at, name, bid in sorted(found, reverse=True):
        if bid not in bundles and len(keep) < PREPARED_KEEP:
            bundles.add(bid)
            keep.append(name)
    return keep


def find_prepared(layout: Layout, bundle_id: str, sha256: str) -> str | None:
    """The prepared release of exactly this bundle (id and sha256), if one is still kept."""
    for name in _prepared_to_keep(layout):
        info = _prepared_info(layout.release_path(name)) or {}
        if info.get("bundle_id") == bundle_id and info.get("sha256") == sha256.strip().lower():
            return layout.release_path(name)
    return None


def remove_leftovers(layout: Layout) -> list[str]:
    """Staging dirs, temp downloads and temp links of runs that died, and prepared releases no
    longer wanted (see _prepared_to_keep); call with the lock held."""
    removed: list[str] = []
    keep = set(_prepared_to_keep(layout))
    for name in _names(layout.releases):
        if name.startswith(PREPARED_PREFIX) and name not in keep:
            remove_path(layout.release_path(name))
            removed.append(layout.release_path(name))
    for directory, prefixes in (
        (layout.releases, (STAGING_PREFIX,)),
        (layout.state, (DOWNLOAD_PREFIX, "status.json.tmp-")),
        (layout.deploy_to, (CURRENT_TMP_PREFIX,)),
    ):
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in sorted(names):
            if name.startswith(prefixes):
                path = os.path.join(directory, name)
                remove_path(path)
                removed.append(path)
    current = read_current(layout)
    for name in list_releases(layout):
        path = layout.release_path(name)
        if not is_pending(path):
            continue
        if current is not None and current.path == os.path.normpath(path):
            # Killed after the swap: the hooks had passed, so the release is good.
            os.unlink(os.path.join(path, PENDING_MARKER))
        else:
            remove_path(path)
            removed.append(path)
    return removed


def prune(layout: Layout, keep: int, previous: str | None = None) -> list[str]:
    """Capistrano's deploy:cleanup: keep the newest `keep` names, and never remove current
    nor `previous` (what current was before the last swap: the health check's revert needs
    it, even with keep_releases: 1 or after a rollback to an old release)."""
    releases = list_releases(layout)
    cur = read_current(layout)
    spared = {os.path.normpath(layout.release_path(n)) for n in (previous,) if n}
    if cur is not None:
        spared.add(cur.path)
    doomed = releases[:-keep] if len(releases) > keep else []
    pruned: list[str] = []
    for name in doomed:
        if os.path.normpath(layout.release_path(name)) in spared:
            continue
        remove_path(layout.release_path(name))
        pruned.append(name)
    if pruned:
        log(f"pruned releases: {', '.join(pruned)}")
    return pruned


def _hook_env(
    layout: Layout,
    release: str,
    commit: str,
    previous: Current | None = None,
    roles: list[str] | None = None,
    stage: str | None = None,
) -> dict[str, str]:
    env = {
        "RELEASE_PATH": release,
        "DEPLOY_TO": layout.deploy_to,
        "REVISION": commit,
        "PREVIOUS_RELEASE": previous.path if previous is not None and previous.ok else "",
        "ROLE": ",".join(roles or []),
    }
    if stage:
        env["STAGE"] = stage
    return env


def _tail_text(tail: list[str]) -> str:
    return (
        " | ".join(line.strip() for line in tail[-OUTPUT_TAIL_LINES:] if line.strip())
        or "(no output)"
    )


def _restart_pending(layout: Layout, current: Current) -> bool:
    """A run swapped `current` to this release in this boot and died before restarting."""
    try:
        with open(os.path.join(layout.state, RESTART_MARKER), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    # After a reboot the app was started from `current` anyway: a stale marker means nothing.
    return (
        isinstance(data, dict)
        and data.get("release") == current.release
        and data.get("boot_id") == boot_id()
    )


def _finish_interrupted_restart(cfg: Config, layout: Layout, current: Current) -> bool:
    """If a run (activate or rollback) swapped `current` and died before restarting the app,
    restart it now, so a rerun of the same command ends with the app on `current`."""
    if not cfg.restart or not _restart_pending(layout, current):
        return False
    log(f"the run that made {current.release} current died before restarting: restarting now")
    try:
        restart_release(cfg, layout, current)
    except CommandFailed as exc:
        raise NodeError(
            f"restart `{exc.command}` failed with exit code {exc.returncode} on "
            f"{hostname()} for release {current.release}: check the app's logs. "
            f"Output tail: {_tail_text(exc.tail)}",
            output_tail=exc.tail,
        ) from None
    _clear_restart_pending(layout)
    return True


def _clear_restart_pending(layout: Layout) -> None:
    try:
        os.unlink(os.path.join(layout.state, RESTART_MARKER))
    except FileNotFoundError:
        pass


def _after_swap_failed(
    layout: Layout, exc: CommandFailed, release: str, previous: Current | None, user: str
) -> NodeError:
    """The app was not restarted yet: put `current` back and drop the release."""
    where = f"on {hostname()} for release {os.path.basename(release)}"
    if previous is None or not previous.ok:
        return NodeError(
            f"after_swap hook `{exc.command}` {exc.how()} {where}, and there is no previous "
            f"release to go back to: fix it and deploy again. Output tail: {_tail_text(exc.tail)}",
            output_tail=exc.tail,
        )
    swap_current(layout, previous.path)
    append_revision_log(layout, f"{user} rolled back to release {previous.release}")
    remove_path(release)
    return NodeError(
        f"after_swap hook `{exc.command}` {exc.how()} {where}; current is back on "
        f"{previous.release} and the release was removed: fix it and deploy again. "
        f"Output tail: {_tail_text(exc.tail)}",
        output_tail=exc.tail,
        current=previous.release,
    )


def _restart_with_fallback(
    cfg: Config,
    layout: Layout,
    new: str,
    previous: Current | None,
    user: str,
    env: dict[str, str] | None = None,
    roles: list[str] | None = None,
) -> None:
    """Restart, then the after_restart hooks; if either fails, put `current` back on the
    previous release and restart that."""
    assert cfg.restart
    roles = roles if roles is not None else cfg.roles
    env = env or _hook_env(layout, new, read_revision(new) or "", previous, roles, cfg.stage)
    try:
        run_shell(cfg.restart, new, env, "restart", cfg.sudo)
        run_hooks(cfg, "after_restart", new, env, "activate", roles)
        return
    except CommandFailed as exc:
        failure = exc
    host = hostname()
    what = "restart" if failure.label == "restart" else f"{failure.label} hook"
    if previous is None or not previous.ok:
        raise NodeError(
            f"{what} `{failure.command}` {failure.how()} on {host} "
            f"for release {os.path.basename(new)} and there is no previous release to go back "
            f"to: fix the app and deploy again. Output tail: {_tail_text(failure.tail)}",
            output_tail=failure.tail,
        )
    swap_current(layout, previous.path)
    append_revision_log(layout, f"{user} rolled back to release {previous.release}")
    log(f"restart failed; current is back on {previous.release}, restarting it")
    try:
        restart_release(cfg, layout, previous)
        again = "restarted OK"
    except CommandFailed as exc2:
        again = f"its restart failed too (exit code {exc2.returncode})"
    raise NodeError(
        f"{what} `{failure.command}` {failure.how()} on {host} "
        f"for release {os.path.basename(new)}; current is back on {previous.release} and "
        f"{again}: check the app's logs. Output tail: {_tail_text(failure.tail)}",
        output_tail=failure.tail,
        current=previous.release,
    )


# --------------------------------------------------------------------------------------------
# health


def own_address(layout: Layout | None = None) -> str:
    """What `{host}` in health.url becomes on the node: the address this host's sshd was reached
    on (behind a bastion, its private one); without SSH (the boot report), the one it was last
    reached on (remember_address), else loopback."""
    parts = os.environ.get("SSH_CONNECTION", "").split()
    addr = parts[2] if len(parts) == 4 else None
    if addr is None and layout is not None:
        addr = _remembered_address(layout)
    addr = addr or "127.0.0.1"
    return f"[{addr.replace('%', '%25')}]" if ":" in addr else addr


def _address_file(layout: Layout) -> str:
    return os.path.join(layout.state, "address")


def _remembered_address(layout: Layout) -> str | None:
    import ipaddress

    try:
        fd = open_nofollow(_address_file(layout), os.O_RDONLY)
        with os.fdopen(fd, encoding="ascii") as fh:
            text = fh.read(100).strip()
        ipaddress.ip_address(text.split("%", 1)[0])
        return text
    except (OSError, ValueError):
        return None


def remember_address(layout: Layout) -> None:
    """Keep the address sshd was reached on, for the health check of the boot report (which
    runs with no SSH). Best effort, and only written when it changed."""
    parts = os.environ.get("SSH_CONNECTION", "").split()
    if len(parts) != 4 or not os.path.isdir(layout.state):
        return
    if _remembered_address(layout) == parts[2]:
        return
    try:
        check_not_writable_by_others(layout.state, follow=False)
        atomic_write(_address_file(layout), parts[2] + "\n")
    except (OSError, NodeError):
        pass


_PROBE_OPENER: Any = None


def _probe_url(url: str, expect: int, timeout: float) -> str | None:
    """None when `url` answers `expect`; else what it did instead."""
    import urllib.error
    import urllib.request

    global _PROBE_OPENER
    if _PROBE_OPENER is None:  # one per run: building it costs more than a loopback probe
        # No proxies: an http_proxy in the node's environment must not see a loopback check.
        _PROBE_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with _PROBE_OPENER.open(url, timeout=timeout) as resp:
            if resp.status == expect:
                return None
            return f"{url} answered {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} unreachable: {getattr(exc, 'reason', exc)}"


def _probe_command(command: str, cwd: str, env: dict[str, str], timeout: float) -> str | None:
    """None when `command` exits 0; else its exit code and the last line it printed."""
    import subprocess

    try:
        proc = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=cwd if os.path.isdir(cwd) else "/",
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=max(timeout, 0.1),
        )
    except subprocess.TimeoutExpired:
        return f"`{command}` did not finish within {timeout:.0f}s"
    except OSError as exc:
        return f"`{command}` could not run: {exc}"
    if proc.returncode == 0:
        return None
    lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    return f"`{command}` exited {proc.returncode}" + (f": {lines[-1].strip()}" if lines else "")


HEALTH_FAST_PAUSE = 0.05
HEALTH_FAST_FOR = 2.0


def check_health(
    cfg: Config,
    layout: Layout,
    release: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
    once: bool = False,
) -> dict[str, Any]:
    """Poll health.url (over this host's own address) and health.command until both pass or
    health.timeout runs out: the same readiness loop the deploying machine used to run.
    `once`: one probe of each, no waiting (deploy.check asks whether it answers now).

    Returns {"ok", "detail", "seconds"}; a failure's detail starts "health check failed"."""
    h = cfg.health
    start = time.monotonic()
    if not h.here:
        return {"ok": True, "detail": "no health check on the node", "seconds": 0.0}
    url = h.url.replace("{host}", own_address(layout)) if h.url else None
    env = _hook_env(layout, release, read_revision(release) or "")
    deadline = start + h.timeout
    # A restarted app usually answers within milliseconds, or within a second or two: probe
    # fast first, at most HEALTH_FAST_PAUSE apart for the first HEALTH_FAST_FOR seconds (a
    # refused probe costs well under a millisecond), then back off to health.interval. A roll
    # waits for this on every host in turn: each probe's lateness is paid once per host.
    pause = min(0.01, h.interval)
    while True:
        left = max(deadline - time.monotonic(), 0.1)
        last = _probe_url(url, h.expect_status, min(5.0, left)) if url else None
        if last is None and h.command:
            last = _probe_command(h.command, release, env, min(30.0, left))
        waited = time.monotonic() - start
        if last is None:
            what = " and ".join(
                x
                for x in (
                    url and f"{url} answered {h.expect_status}",
                    h.command and f"`{h.command}` exited 0",
                )
                if x
            )
            return {"ok": True, "detail": what, "seconds": round(waited, 3)}
        if once or time.monotonic() >= deadline:
            return {
                "ok": False,
                "detail": f"health check failed after {waited:.0f}s on {hostname()}: {last}",
                "seconds": round(waited, 3),
            }
        sleep(pause)
        cap = HEALTH_FAST_PAUSE if waited < HEALTH_FAST_FOR else h.interval
        pause = min(pause * 2, max(cap, pause), h.interval)


def _revert_unhealthy(
    cfg: Config,
    layout: Layout,
    release: str,
    previous: Current | None,
    user: str,
    health: dict[str, Any],
) -> NodeError:
    """The new release failed its health check: put `current` back on the previous release and
    restart that (what the deploying machine's revert used to do, without another round trip)."""
    if previous is None or not previous.ok:
        return NodeError(
            f"{health['detail']}; there is no previous release to go back to, so "
            f"{os.path.basename(release)} stays current: fix the app and deploy again",
            health=health,
        )
    if cfg.restart:
        atomic_write(
            os.path.join(layout.state, RESTART_MARKER),
            json.dumps({"release": previous.release, "boot_id": boot_id()}) + "\n",
        )
    swap_current(layout, previous.path)
    append_revision_log(layout, f"{user} rolled back to release {previous.release}")
    log(f"health check failed; current is back on {previous.release}, restarting it")
    again = ""
    if cfg.restart:
        try:
            restart_release(cfg, layout, previous)
        except CommandFailed as exc:
            again = (
                f" but its restart failed too (exit code {exc.returncode}): check the app's logs"
            )
        finally:
            _clear_restart_pending(layout)
    return NodeError(
        f"{health['detail']}; put back on {previous.release}{again}",
        health=health,
        current=previous.release,
        previous=previous.brief(),
    )


# --------------------------------------------------------------------------------------------
# commands


def _restart_for_config(cfg: Config, layout: Layout, current: Current, changed: list[str]) -> None:
    """The release is unchanged but its shared config changed: restart the app on it, then
    check its health (the old config is gone: a failure is reported, not reverted)."""
    log(f"shared config changed ({', '.join(changed)}): restarting release {current.release}")
    try:
        restart_release(cfg, layout, current)
    except CommandFailed as exc:
        raise NodeError(
            f"restart `{exc.command}` after a shared config change ({', '.join(changed)}) "
            f"{exc.how()} on {hostname()}: check the app's logs and the new config. "
            f"Output tail: {_tail_text(exc.tail)}",
            output_tail=exc.tail,
        ) from None
    if cfg.health.here:
        health = check_health(cfg, layout, current.path)
        record_status(
            layout, "last_health", {**health, "release": current.release, "commit": current.commit}
        )
        if not health["ok"]:
            raise NodeError(
                f"{health['detail']} after a shared config change ({', '.join(changed)}): "
                "fix the config (fab deploy.config --push) and hotfix again",
                health=health,
            )


def activate(
    cfg: Config,
    *,
    sha256: str,
    commit: str,
    source: Source,
    ref: str | None = None,
    user: str | None = None,
    committed_at: int | None = None,
    restart: bool = False,
    force: bool = False,
    action: str = "activate",
    now: Callable[[], float] = time.time,
    bundle_id: str | None = None,
    roles: list[str] | None = None,
    fetch_shared: bool = True,
) -> dict[str, Any]:
    layout = Layout(cfg.deploy_to)
    roles = cfg.roles if roles is None else roles
    try:
        result = _activate(
            cfg,
            layout,
            sha256,
            commit,
            source,
            ref,
            user,
            committed_at,
            restart,
            force,
            action,
            now,
            bundle_id or commit,
            roles,
            fetch_shared=fetch_shared,
        )
    except NodeError as exc:
        record_status(
            layout,
            "last",
            {"action": action, "outcome": "failed", "reason": exc.message, "commit": commit},
        )
        raise
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Full disk outside the checked spots (lock file, the temp download's final flush,
        # REVISION, links): still one clear line, not "unexpected error: OSError".
        err = _space_error(cfg.deploy_to, None)
        record_status(
            layout,
            "last",
            {"action": action, "outcome": "failed", "reason": err.message, "commit": commit},
        )
        raise err from None
    record_status(
        layout,
        "last",
        {
            "action": action,
            "outcome": "ok" if result["changed"] else "unchanged",
            "reason": None,
            "commit": commit,
            "release": result["release"],
            "previous": (result.get("previous") or {}).get("release"),
        },
    )
    return result


def _activate(
    cfg: Config,
    layout: Layout,
    sha256: str,
    commit: str,
    source: Source,
    ref: str | None,
    user: str | None,
    committed_at: int | None,
    restart: bool,
    force: bool,
    action: str,
    now: Callable[[], float],
    bundle_id: str,
    roles: list[str],
    *,
    fetch_shared: bool = True,
) -> dict[str, Any]:
    started = time.monotonic()
    user = user or default_user()
    ensure_layout(cfg, layout)
    with HostLock(layout, action, cfg.lock_timeout):
        remove_leftovers(layout)
        # Shared config first: a new release links it, and a changed one alone restarts the app.
        shared = refresh_shared(cfg, layout) if fetch_shared and cfg.shared.files else []
        config_changed = [e["path"] for e in shared if e["outcome"] == "written"]
        previous = read_current(layout)
        if not force and previous is not None and previous.ok and previous.bundle_id == bundle_id:
            restarted = restart and _finish_interrupted_restart(cfg, layout, previous)
            if not restarted and restart and config_changed and cfg.restart:
                _restart_for_config(cfg, layout, previous, config_changed)
                restarted = True
            elif not restarted:
                log(f"current already is release {previous.release} of {bundle_id}: nothing to do")
            result = {"ok": True, "changed": False, "release": previous.release, "commit": commit}
            if config_changed:
                result["config_changed"] = config_changed
            return {**result, "restarted": True} if restarted else result
        check_linked_files(cfg, layout)

        t0 = time.monotonic()
        staging = find_prepared(layout, bundle_id, sha256)
        # What this run wrote, for _make_durable: a prepared release's files were made durable
        # when it was prepared (unless an older node program prepared it: then syncfs).
        counts: dict[str, Any] = {"files": [], "dirs": [""], "written": 0}
        if staging is not None:
            # Downloaded, verified and extracted by `activate --prepare` before this host left
            # traffic: only the switch is left.
            if not (_prepared_info(staging) or {}).get("durable"):
                counts["files"] = None
            os.unlink(os.path.join(staging, PREPARED_MARKER))
            log(f"using {os.path.basename(staging)}, prepared earlier")
        elif source.kind == "prepared":
            raise NodeError(
                f"no prepared release of {bundle_id} on {hostname()} (removed, or never made): "
                "run the deploy again"
            )
        else:
            staging, counts = _extract(cfg, layout, source, sha256, previous, now)
        t_extract = time.monotonic() - t0

        try:
            write_revision(staging, commit, committed_at, bundle_id)
            with open(os.path.join(staging, PENDING_MARKER), "w", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()}\n")
            link_shared(cfg, layout, staging)
            name = next_release_name(layout, now())
            release = layout.release_path(name)
            os.rename(staging, release)
        except BaseException:
            remove_path(staging)
            raise

        env = _hook_env(layout, release, commit, previous, roles, cfg.stage)
        try:
            run_hooks(cfg, "before_swap", release, env, action, roles)
        except CommandFailed as exc:
            remove_path(release)
            raise NodeError(
                f"before_swap hook `{exc.command}` {exc.how()} "
                f"on {hostname()} in {release}; release removed, current unchanged: fix it "
                f"and deploy again. Output tail: {_tail_text(exc.tail)}",
                output_tail=exc.tail,
            ) from None

        # Flush file data before publishing: after a power cut `current` must not point at
        # a release whose files were never written.
        _make_durable(cfg, release, counts, action, roles)
        if restart and cfg.restart:
            atomic_write(
                os.path.join(layout.state, RESTART_MARKER),
                json.dumps({"release": name, "boot_id": boot_id()}) + "\n",
            )
        swap_current(layout, release)
        append_revision_log(
            layout, f"Branch {ref or 'HEAD'} (at {commit}) deployed as release {name} by {user}"
        )
        os.unlink(os.path.join(release, PENDING_MARKER))
        log(f"current -> {release}")
        try:
            run_hooks(cfg, "after_swap", release, env, action, roles)
        except CommandFailed as exc:
            _clear_restart_pending(layout)
            raise _after_swap_failed(layout, exc, release, previous, user) from None
        if restart and cfg.restart:
            try:
                _restart_with_fallback(cfg, layout, release, previous, user, env, roles)
            except NodeError:
                if previous is not None and previous.ok:
                    remove_path(release)  # known bad, and must not linger as the newest release
                raise
            finally:
                _clear_restart_pending(layout)
        health = None
        if restart and cfg.health.here:
            health = check_health(cfg, layout, release)
            record_status(layout, "last_health", {**health, "release": name, "commit": commit})
            if not health["ok"]:
                err = _revert_unhealthy(cfg, layout, release, previous, user, health)
                err.extra.update(release=name, commit=commit)
                raise err
        pruned = prune(layout, cfg.keep_releases, previous.release if previous else None)
        remove_leftovers(layout)
    return {
        "ok": True,
        "changed": True,
        "release": name,
        "commit": commit,
        **({"config_changed": config_changed} if config_changed else {}),
        **({"bundle_id": bundle_id} if bundle_id != commit else {}),
        "previous": previous.brief() if previous is not None else None,
        "pruned": pruned,
        **({"health": health} if health is not None else {}),
        "seconds": {
            # One pass now: download, check and extract overlap (download kept for readers).
            "download": 0.0,
            "extract": round(t_extract, 3),
            "total": round(time.monotonic() - started, 3),
        },
    }


def _extract(
    cfg: Config,
    layout: Layout,
    source: Source,
    sha256: str,
    previous: Current | None,
    now: Callable[[], float],
) -> tuple[str, dict[str, Any]]:
    """Download, verify and extract into a new staging dir; returns its path and the counts
    (with what was written: see _make_durable)."""
    staging = layout.release_path(f"{STAGING_PREFIX}{utc_stamp(now())}-{os.getpid()}")
    base = previous.path if previous is not None and previous.ok else None
    counts = fetch_and_extract(cfg, layout, source, sha256, staging, base)
    linked = f", {counts['linked']} unchanged ones linked from {base}" if counts["linked"] else ""
    log(f"extracted {counts['members']} members from {source.describe(cfg)}{linked}")
    return staging, counts


def prepare(
    cfg: Config,
    *,
    sha256: str,
    commit: str,
    source: Source,
    force: bool = False,
    now: Callable[[], float] = time.time,
    bundle_id: str | None = None,
) -> dict[str, Any]:
    """Download, verify and extract a bundle now and keep it for a later `activate` of the same
    bundle, which then only swaps, restarts and checks health (the host can stay in traffic
    meanwhile). "needed": whether that activate has anything to do; when `current` already
    runs the bundle, the answer is activate's own "unchanged"."""
    layout = Layout(cfg.deploy_to)
    bundle_id = bundle_id or commit
    started = time.monotonic()
    ensure_layout(cfg, layout)
    with HostLock(layout, "prepare", cfg.lock_timeout):
        remove_leftovers(layout)
        # Sourced linked files are fetched (and the app restarted) by the switch; here only
        # whether they changed, and a source the switch could not do without, refused now.
        pending = shared_pending(cfg, layout) if cfg.shared.files else []
        previous = read_current(layout)
        if not force and previous is not None and previous.ok and previous.bundle_id == bundle_id:
            if cfg.restart and _restart_pending(layout, previous):
                # A run died between its swap and its restart: the switch (activate) restarts.
                return {"ok": True, "needed": True, "commit": commit, "restart_pending": True}
            if cfg.restart and pending:
                # Same release, new config: the switch fetches it and restarts the app.
                return {"ok": True, "needed": True, "commit": commit, "config_changed": pending}
            log(f"current already is release {previous.release} of {bundle_id}: nothing to do")
            return {"ok": True, "changed": False, "release": previous.release, "commit": commit}
        found = find_prepared(layout, bundle_id, sha256)
        if found is not None:
            name = os.path.basename(found)
            return {"ok": True, "needed": True, "prepared": name, "commit": commit}
        check_linked_files(cfg, layout, skip_sourced=True)  # what the switch would refuse, now
        if source.kind == "prepared":
            raise NodeError("--prepare needs a bundle source (--url-stdin, --file, --s3-key)")
        staging, counts = _extract(cfg, layout, source, sha256, previous, now)
        name = f"{PREPARED_PREFIX}{utc_stamp(now())}-{os.getpid()}"
        prepared = layout.release_path(name)
        try:
            info = {
                "bundle_id": bundle_id,
                "sha256": sha256.strip().lower(),
                "at": time.time(),
                "durable": True,
            }
            atomic_write(os.path.join(staging, PREPARED_MARKER), json.dumps(info) + "\n")
            os.rename(staging, prepared)
            # Made durable now, while the host still serves (after the rename: see
            # sync_release): the switch then syncs only what it adds (REVISION, the links).
            _make_durable(cfg, prepared, counts, "prepare", [], linked_yet=False)
        except BaseException:
            for path in (staging, prepared):
                if os.path.lexists(path):
                    remove_path(path)
            raise
    log(f"prepared {name} for {bundle_id}")
    return {
        "ok": True,
        "needed": True,
        "prepared": name,
        "commit": commit,
        "seconds": {"total": round(time.monotonic() - started, 3)},
    }


def run_once(
    cfg: Config,
    hooks: list[Hook],
    *,
    sha256: str,
    commit: str,
    source: Source,
    committed_at: int | None = None,
    bundle_id: str | None = None,
    now: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Run-once hooks (migrations): the bundle is extracted exactly as activate does, into a
    hidden staging dir that never becomes `current`; the before_swap hooks that apply here run
    in it, then the `hooks` in order, then the dir is removed. Nothing else changes on the host.
    The controller picks one host and runs this under the fleet lock, before any host swaps."""
    layout = Layout(cfg.deploy_to)
    bundle_id = bundle_id or commit
    started = time.monotonic()
    ensure_layout(cfg, layout)
    with HostLock(layout, "once", cfg.lock_timeout):
        remove_leftovers(layout)
        previous = read_current(layout)
        if cfg.shared.files:
            # A migration runs against the config the new release will run with: fetched now
            # (this host's activation would fetch the same moments later).
            refresh_shared(cfg, layout)
        check_linked_files(cfg, layout)
        staging = layout.release_path(f"{STAGING_PREFIX}once-{utc_stamp(now())}-{os.getpid()}")
        base = previous.path if previous is not None and previous.ok else None
        try:
            fetch_and_extract(cfg, layout, source, sha256, staging, base)
            write_revision(staging, commit, committed_at, bundle_id)
            link_shared(cfg, layout, staging)
            env = _hook_env(layout, staging, commit, previous, cfg.roles, cfg.stage)
            label = "before_swap"
            try:
                run_hooks(cfg, "before_swap", staging, env, "activate", cfg.roles)
                label = "once"
                for hook in hooks:
                    run_shell(hook.run, staging, env, "once", timeout=hook.timeout)
            except CommandFailed as exc:
                record_status(
                    layout,
                    "last_once",
                    {"outcome": "failed", "bundle_id": bundle_id, "command": exc.command},
                )
                raise NodeError(
                    f"{label} hook `{exc.command}` {exc.how()} on {hostname()} (run-once, in a "
                    f"release of {bundle_id[:12]} that never became current); no host was "
                    "changed: fix it and deploy again",
                    output_tail=exc.tail,
                ) from None
        finally:
            remove_path(staging)
    record_status(
        layout,
        "last_once",
        {"outcome": "ok", "bundle_id": bundle_id, "commands": [h.run for h in hooks]},
    )
    return {
        "ok": True,
        "commit": commit,
        **({"bundle_id": bundle_id} if bundle_id != commit else {}),
        "ran": [h.run for h in hooks],
        "seconds": round(time.monotonic() - started, 3),
    }


def _make_durable(
    cfg: Config,
    release: str,
    counts: dict[str, Any],
    action: str,
    roles: list[str],
    linked_yet: bool = True,
) -> None:
    """Only what this activation wrote, when that is little (a hotfix of a few files next to
    thousands linked): the written files, the release's dirs (hence every entry, linked ones
    too), REVISION and the linked paths' dirs. Else (files None: unknown), or when before_swap
    hooks may have written anything anywhere, the whole filesystem (syncfs). `linked_yet`:
    link_shared has run on `release` (not yet when a release is prepared)."""
    files = counts["files"]
    hooks = any(h.applies(action, roles) for h in cfg.hooks.get("before_swap", []))
    if (
        hooks
        or files is None
        or len(files) > FSYNC_MAX_FILES
        or counts["written"] > FSYNC_MAX_BYTES
    ):
        sync_filesystem(os.path.dirname(release))
        return
    linked = [check_linked_path(rel, "path") for rel in [*cfg.linked_dirs, *cfg.linked_files]]
    if not linked_yet:  # prepared: link_shared runs at the switch, which syncs what it adds
        linked = []
    under = tuple(f"{rel}/" for rel in linked)
    # link_shared replaced what the bundle had at a linked path (and below it) by a symlink.
    dirs = {d for d in counts["dirs"] if d not in linked and not d.startswith(under)}
    files = [f for f in files if f not in linked and not f.startswith(under)]
    for rel in linked:
        parent = rel.rpartition("/")[0]
        while parent:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    ours = ("REVISION", "REVISION_TIME", BUNDLE_ID_FILE, PENDING_MARKER)
    written = [n for n in ours if os.path.isfile(os.path.join(release, n))]
    sync_release(release, [*files, *written], sorted(dirs))


def rollback(
    cfg: Config,
    *,
    release: str | None = None,
    user: str | None = None,
    restart: bool = False,
    reason: str | None = None,
) -> dict[str, Any]:
    layout = Layout(cfg.deploy_to)
    try:
        result = _rollback(cfg, layout, release, user or default_user(), restart)
        if restart and cfg.health.here:
            health = check_health(cfg, layout, layout.release_path(result["release"]))
            record_status(
                layout,
                "last_health",
                {**health, "release": result["release"], "commit": result["commit"]},
            )
            result["health"] = health
            if not health["ok"]:
                # No revert here: this already is the way back.
                raise NodeError(
                    f"rolled back to {result['release']} but {health['detail']}",
                    **{k: v for k, v in result.items() if k != "ok"},
                )
    except NodeError as exc:
        record_status(
            layout, "last", {"action": "rollback", "outcome": "failed", "reason": exc.message}
        )
        raise
    record_status(
        layout,
        "last",
        {
            "action": "rollback",
            "outcome": "ok" if result.get("changed", True) else "unchanged",
            "reason": reason,
            "commit": result["commit"],
            "release": result["release"],
        },
    )
    return result


def _rollback_target(layout: Layout, wanted: str | None, current: Current | None) -> str:
    """The release a rollback goes to: `wanted` (checked), else the newest complete one older
    than current."""
    complete = complete_releases(layout)
    if wanted is not None:
        if not RELEASE_RE.match(wanted) or wanted not in complete:
            raise NodeError(
                f"release {wanted} does not exist or is incomplete (no REVISION) on "
                f"{hostname()} in {layout.releases} (complete releases: "
                f"{', '.join(complete) or 'none'}): pick one of those"
            )
        return wanted
    older = [
        n
        for n in complete
        if current is None or not RELEASE_RE.match(current.release) or n < current.release
    ]
    if current is not None:
        older = [n for n in older if layout.release_path(n) != current.path]
    if not older:
        raise NodeError(
            f"no previous release to roll back to on {hostname()} (releases: "
            f"{', '.join(list_releases(layout)) or 'none'}; current: "
            f"{current.release if current else 'none'})"
        )
    return older[-1]


def rollback_check(cfg: Config, *, release: str | None = None) -> dict[str, Any]:
    """What `rollback` would do, changing nothing (no lock: a read): "needed" and the target
    release, or rollback's own "unchanged" answer when current already is that release. A host
    about to leave its load balancer for a rollback is checked first, so one with nothing to
    do stays in, and one with nowhere to go fails before anything moves."""
    layout = Layout(cfg.deploy_to)
    if not os.path.isdir(layout.releases):
        raise NodeError(
            f"no releases directory {layout.releases} on {hostname()}: nothing to roll back to"
        )
    current = read_current(layout)
    target = _rollback_target(layout, release, current)
    path = layout.release_path(target)
    answer = {"ok": True, "release": target, **_release_ids(path)}
    if current is not None and current.path == path:
        if not (cfg.restart and _restart_pending(layout, current)):
            return {**answer, "changed": False, "previous": current.brief()}
    return {**answer, "needed": True}


def _rollback(
    cfg: Config, layout: Layout, wanted: str | None, user: str, restart: bool
) -> dict[str, Any]:
    if not os.path.isdir(layout.releases):
        raise NodeError(
            f"no releases directory {layout.releases} on {hostname()}: nothing to roll back to"
        )
    with HostLock(layout, "rollback", cfg.lock_timeout):
        remove_leftovers(layout)  # drops never-live releases so they cannot be chosen
        current = read_current(layout)
        target = _rollback_target(layout, wanted, current)
        path = layout.release_path(target)
        ids = _release_ids(path)
        if current is not None and current.path == path:
            if restart:
                _finish_interrupted_restart(cfg, layout, current)
            return {
                "ok": True,
                "changed": False,
                "release": target,
                **ids,
                "previous": current.brief(),
            }
        if restart and cfg.restart:
            atomic_write(
                os.path.join(layout.state, RESTART_MARKER),
                json.dumps({"release": target, "boot_id": boot_id()}) + "\n",
            )
        swap_current(layout, path)
        append_revision_log(layout, f"{user} rolled back to release {target}")
        log(f"current -> {path}")
        if restart and cfg.restart:
            try:
                _restart_with_fallback(cfg, layout, path, current, user)
            finally:
                _clear_restart_pending(layout)
    return {
        "ok": True,
        "changed": True,
        "release": target,
        **ids,
        "previous": current.brief() if current is not None else None,
    }


def _release_ids(path: str) -> dict[str, Any]:
    """A release's commit, and its bundle id when built with a recipe (else the id is the
    commit): what the deploying machine matches against the pointer history."""
    commit = read_revision(path)
    bid = read_bundle_id(path, commit) if commit else None
    return {"commit": commit, **({"bundle_id": bid} if bid and bid != commit else {})}


def _wait_boot_record(
    layout: Layout, me: str | None, wait: float, sleep: Callable[[float], None]
) -> None:
    """Wait (bounded) until the boot unit has recorded its outcome for this boot."""
    deadline = time.monotonic() + wait
    while (read_status(layout).get("last_boot") or {}).get("boot_id") != me:
        if time.monotonic() >= deadline:
            return
        sleep(0.05)


def status(
    cfg: Config,
    *,
    after_boot: str | None = None,
    wait: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """The host's state. With `after_boot` (the boot id before a reboot) and a new boot: wait up
    to `wait` seconds for the boot unit's outcome, then, if it put the release in place, check
    the app's health here (the boot unit ran before the app started) and report it."""
    layout = Layout(cfg.deploy_to)
    me = boot_id()
    health = None
    if cfg.report:
        remember_address(layout)  # for the boot report's health check after the next boot
    if after_boot is not None and me != after_boot:
        _wait_boot_record(layout, me, wait, sleep)
        last_boot = read_status(layout).get("last_boot") or {}
        if last_boot.get("boot_id") == me:
            # This boot's hook output, framed as a live hook's would be: the roll relays it.
            for stage, line in last_boot.get("hook_output") or []:
                _emit(f"{LOG_PREFIX}{stage} | {line}")
        if (
            cfg.health.here
            and last_boot.get("boot_id") == me
            and last_boot.get("outcome") in ("activated", "unchanged")
        ):
            try:
                cur = read_current(layout)
            except NodeError:
                cur = None
            if cur is not None and cur.ok:
                health = check_health(cfg, layout, cur.path, sleep=sleep)
                record_status(
                    layout, "last_health", {**health, "release": cur.release, "commit": cur.commit}
                )
    try:
        current = read_current(layout)
        current_info: dict[str, Any] | None = current.as_dict() if current else None
    except NodeError as exc:
        current_info = {
            "release": None,
            "commit": None,
            "path": layout.current,
            "ok": False,
            "error": exc.message,
        }
    try:
        names = sorted(os.listdir(layout.releases))
    except FileNotFoundError:
        names = []
    tail: list[str] = []
    try:
        with open(layout.revisions_log, encoding="utf-8", errors="replace") as fh:
            tail = [line.rstrip("\n") for line in fh.readlines()[-3:]]
    except OSError:
        pass
    saved = read_status(layout)
    return {
        "ok": True,
        "host": hostname(),
        "deploy_to": cfg.deploy_to,
        "current": current_info,
        "releases": [
            {"release": n, "commit": read_revision(layout.release_path(n))}
            for n in names
            if RELEASE_RE.match(n)
        ],
        "stray": [
            n
            for n in names
            if not RELEASE_RE.match(n) and not n.startswith((STAGING_PREFIX, PREPARED_PREFIX))
        ],
        "staging": [n for n in names if n.startswith(STAGING_PREFIX)],
        "prepared": [n for n in names if n.startswith(PREPARED_PREFIX)],
        "pending": [n for n in names if RELEASE_RE.match(n) and is_pending(layout.release_path(n))],
        "last": saved.get("last"),
        "last_boot": saved.get("last_boot"),
        "last_health": saved.get("last_health"),
        "shared_config": saved.get("shared_config"),  # the last fetch of sourced linked files
        "health": health,
        "boot_id": me,
        "revision_log_tail": tail,
        "node_version": VERSION,
        "report_key": report_key(cfg) if cfg.report else None,
    }


def preflight(cfg: Config) -> dict[str, Any]:
    """`check` (deploy.check's node part), changing nothing: can this node read the published
    pointer with its own credentials (node_env, else its instance role), as the boot unit does;
    how much space is free on deploy_to's filesystem; does the health check answer now."""
    layout = Layout(cfg.deploy_to)
    uri = f"s3://{cfg.s3.bucket}/{cfg.s3.key('published.json')}"
    pointer: dict[str, Any] = {"uri": uri}
    try:
        p = validate_pointer(read_pointer_s3(cfg), cfg)
        pointer.update(ok=True, commit=p["commit"], bundle_id=p.get("bundle_id") or p["commit"])
    except NodeError as exc:
        pointer.update(ok=False, error=exc.message, code=exc.extra.get("s3_code"))
    path = layout.deploy_to
    for candidate in (layout.releases, layout.deploy_to):
        if os.path.isdir(candidate):
            path = candidate
            break
    else:  # not set up yet: the filesystem it will be created on
        while path not in ("", "/") and not os.path.isdir(path):
            path = os.path.dirname(path)
    try:
        free: int | None = disk_free(path or "/")
    except OSError:
        free = None
    health: dict[str, Any] | None = None
    if cfg.health.here:
        try:
            cur = read_current(layout)
        except NodeError as exc:
            cur, health = None, {"ok": False, "detail": exc.message}
        if cur is not None and cur.ok:
            health = check_health(cfg, layout, cur.path, once=True)
        elif cur is not None:
            health = {"ok": False, "detail": f"{layout.current} points at a missing release"}
        elif health is None:
            health = {"ok": None, "detail": "no current release yet"}
    # Each sourced linked file's source, read (never written, never returned) as the boot does.
    shared = []
    clients: dict[str, Any] = {}
    for f in cfg.shared.files:
        entry: dict[str, Any] = {"path": f.path, "source": f.describe(), "ok": True}
        try:
            fetch_shared_value(cfg, f, clients)
        except NodeError as exc:
            entry.update(ok=False, error=exc.message)
        shared.append(entry)
    return {
        "ok": True,
        "pointer": pointer,
        "free": free,
        "path": path,
        "health": health,
        **({"shared": shared} if shared else {}),
    }


def report_key(cfg: Config) -> str:
    """Where this node reports its boots in S3: {prefix}/nodes/{hostname}.json."""
    prefix = cfg.s3.prefix.strip("/")
    return f"{prefix + '/' if prefix else ''}nodes/{hostname()}.json"


REPORT_FIELDS = ("host", "boot_id", "current", "last_boot", "health", "node_version")


def report(cfg: Config, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """After a boot: wait for the boot unit's outcome, check the app's health here (health.on:
    node), and put both in S3 at report_key, as `status --after-boot` would answer them. A roll
    reads that object to learn that the node is back, on which release and how healthy, in one
    S3 read instead of an SSH login and a command (it still logs in when no report comes).

    `boot` starts this detached: the app's unit is ordered after the boot unit, so the boot
    unit must have exited before the app can start and be checked."""
    st = status(cfg, after_boot="", wait=cfg.boot.max_seconds, sleep=sleep)
    body = {k: st.get(k) for k in REPORT_FIELDS}
    body["reported_at"] = iso_now()
    key = report_key(cfg)
    try:
        s3_client(cfg).put_object(
            Bucket=cfg.s3.bucket,
            Key=key,
            Body=(json.dumps(body, sort_keys=True) + "\n").encode(),
            ContentType="application/json",
        )
    except NodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any botocore failure: one line, the roll uses SSH
        text = " ".join(str(exc).split())[:200]
        raise NodeError(
            f"could not report the boot to s3://{cfg.s3.bucket}/{key} from {hostname()} ({text}): "
            "a roll learns it over SSH instead; give the node s3:PutObject on its prefix's nodes/"
        ) from None
    return {"ok": True, "key": key, "boot_id": body["boot_id"], "health": body["health"]}


def spawn_report(config: str) -> None:
    """Start `report` in the background, in its own session (the boot unit exits meanwhile);
    its output goes where the boot unit's does."""
    import subprocess

    try:
        subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--config", config, "report"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        log(f"could not start the boot report: {exc}")


def cleanup(cfg: Config) -> dict[str, Any]:
    layout = Layout(cfg.deploy_to)
    if not os.path.isdir(layout.deploy_to):
        return {"ok": True, "pruned": [], "removed": []}
    with HostLock(layout, "cleanup", cfg.lock_timeout):
        removed = remove_leftovers(layout)
        # The release the last activation replaced: a health-check revert may still need it.
        last = read_status(layout).get("last")
        previous = last.get("previous") if isinstance(last, dict) else None
        pruned = prune(layout, cfg.keep_releases, previous if isinstance(previous, str) else None)
    return {"ok": True, "pruned": pruned, "removed": removed}


def boot(
    cfg: Config,
    *,
    pointer_source: Callable[[], Any] | None = None,
    source_for: Callable[[dict[str, Any]], Source] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Bring `current` to the published commit; keep the last good release if that fails.

    pointer_source/source_for are injectable so tests need no S3."""
    layout = Layout(cfg.deploy_to)
    HOOK_OUTPUT.clear()
    read_pointer = pointer_source or (lambda: read_pointer_s3(cfg))
    bundle_source = source_for or (lambda p: Source("s3", p["key"], p["size"]))
    try:
        current = read_current(layout)
    except NodeError as exc:
        record_status(layout, "last_boot", {"outcome": "failed", "reason": exc.message})
        raise
    have_current = current is not None and current.ok
    attempts = cfg.boot.attempts if have_current else cfg.boot.first_boot_attempts
    started = time.monotonic()
    slept = 0.0
    verification_failures = 0
    reason = "no attempt made"
    shared_done = not cfg.shared.files
    for attempt in range(1, attempts + 1):
        try:
            if not shared_done:
                # Before the app starts, with or without a new release: config comes from its
                # source on every boot (a kept copy is a warning; no copy at all is retried).
                with HostLock(layout, "boot", cfg.lock_timeout):
                    refresh_shared(cfg, layout)
                shared_done = True
            pointer, trust = trusted_pointer(cfg, layout, validate_pointer(read_pointer(), cfg))
            current = read_current(layout)
            wanted = pointer.get("bundle_id") or pointer["commit"]
            if current is not None and current.ok and current.bundle_id == wanted:
                log(f"current release {current.release} already runs {wanted}")
                if trust:
                    record_trust(layout, *trust)
                record_status(
                    layout,
                    "last_boot",
                    _with_hook_output(
                        {
                            "outcome": "unchanged",
                            "reason": None,
                            "commit": current.commit,
                            "release": current.release,
                        }
                    ),
                )
                return {
                    "ok": True,
                    "outcome": "unchanged",
                    "release": current.release,
                    "commit": current.commit,
                }
            committed = pointer.get("committed_at")
            result = activate(
                cfg,
                sha256=pointer["sha256"],
                commit=pointer["commit"],
                source=bundle_source(pointer),
                ref=pointer.get("ref") or None,
                user=str(pointer.get("published_by") or "boot"),
                committed_at=int(committed) if isinstance(committed, (int, float)) else None,
                restart=False,
                action="boot",
                bundle_id=wanted,
                fetch_shared=False,  # done above, this boot
            )
            if trust:
                record_trust(layout, *trust)
            record_status(
                layout,
                "last_boot",
                _with_hook_output(
                    {
                        "outcome": "activated",
                        "reason": None,
                        "commit": result["commit"],
                        "release": result["release"],
                    }
                ),
            )
            return {**result, "outcome": "activated"}
        except TrustError as exc:
            reason = exc.message
            verification_failures += 2  # an untrusted release stays untrusted: no retries
        except VerificationError as exc:
            reason = exc.message
            verification_failures += 1
        except NodeError as exc:
            reason = exc.message
        except (
            Exception
        ) as exc:  # a bug or a surprise must still end as a recorded outcome, never a crash
            reason = f"unexpected error: {type(exc).__name__}: {exc}"[:500]
        log(f"boot attempt {attempt}/{attempts} failed: {reason}")
        if verification_failures >= 2 or attempt == attempts:
            break
        delay = min(cfg.boot.backoff * (2 ** (attempt - 1)), cfg.boot.max_backoff)
        # max(): an injected sleep (tests) does not advance the monotonic clock.
        if max(time.monotonic() - started, slept) + delay > cfg.boot.max_seconds:
            log(f"giving up: boot retries are bounded to {cfg.boot.max_seconds:.0f}s")
            break
        sleep(delay)
        slept += delay

    current = read_current(layout)
    if current is not None and current.ok:
        log(f"keeping release {current.release} ({current.commit}) because: {reason}")
        record_status(
            layout,
            "last_boot",
            _with_hook_output(
                {
                    "outcome": "kept",
                    "reason": reason,
                    "commit": current.commit,
                    "release": current.release,
                }
            ),
        )
        return {
            "ok": True,
            "outcome": "kept",
            "reason": reason,
            "release": current.release,
            "commit": current.commit,
        }
    log(
        f"FIRST BOOT FAILED: no release is active in {cfg.deploy_to} and activation failed: {reason}"
    )
    record_status(layout, "last_boot", _with_hook_output({"outcome": "failed", "reason": reason}))
    raise NodeError(
        f"boot activation failed on {hostname()} and there is no current release in "
        f"{cfg.deploy_to}: {reason}",
        outcome="failed",
    )


def _with_hook_output(entry: dict[str, Any]) -> dict[str, Any]:
    """A boot outcome, with the hooks' output when they printed any (a roll shows it)."""
    return {**entry, "hook_output": list(HOOK_OUTPUT)} if HOOK_OUTPUT else entry


# --------------------------------------------------------------------------------------------
# CLI


COMMANDS = (
    "activate",
    "once",
    "rollback",
    "status",
    "shared",
    "boot",
    "check",
    "cleanup",
    "version",
    "report",
)


def _command_of(argv: list[str]) -> str | None:
    """The subcommand argv names (after an optional --config VALUE), if it is one of ours."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--config" else 1
    return argv[i] if i < len(argv) and argv[i] in COMMANDS else None


def _parser(only: str | None = None) -> Any:
    """The CLI; with `only`, just that subcommand's parser: building all eleven costs every
    hotfix ~10 ms of CPU per host, and a fleet's hosts may share a machine's cores."""
    import argparse

    def want(name: str) -> bool:
        return only is None or only == name

    class Parser(argparse.ArgumentParser):
        # Subparsers inherit this class, so usage errors anywhere become JSON, not exit(2).
        def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
            if message:
                sys.stderr.write(message)
            raise _UsageError((message or "").strip())

    p = Parser(prog="node.py", description="fabdeploy node program")
    p.add_argument("--config", default=None, help="node.json (default: next to this script)")
    sub = p.add_subparsers(dest="command", required=True)

    def bundle_args(a: Any) -> Any:
        a.add_argument("--sha256", required=True)
        a.add_argument("--commit", required=True)
        a.add_argument("--bundle-id", help="commit + build recipe (default: the commit)")
        a.add_argument("--committed-at", type=int)
        src = a.add_mutually_exclusive_group(required=True)
        src.add_argument("--url")
        # The presigned URL is a credential: from stdin it stays out of every `ps` listing.
        src.add_argument("--url-stdin", action="store_true", help="read the URL from stdin")
        src.add_argument("--s3-key")
        src.add_argument("--file")
        a.add_argument("--size", type=int, help="bundle size in bytes: a download stops there")
        a.add_argument(
            "--manifest-stdin",
            action="store_true",
            help="read the bundle's signed manifest (one JSON line) from stdin",
        )
        return src

    if want("activate"):
        a = sub.add_parser("activate")
        src = bundle_args(a)
        a.add_argument("--ref")
        a.add_argument("--user")
        src.add_argument(
            "--prepared", action="store_true", help="no source: the release --prepare made earlier"
        )
        a.add_argument(
            "--prepare",
            action="store_true",
            help="only download, verify and extract, for a later activate of the same bundle",
        )
        a.add_argument("--restart", action="store_true")
        a.add_argument("--force", action="store_true")
        a.add_argument(
            "--sudo-stdin", action="store_true", help="the sudo password is stdin's first line"
        )

    if want("once"):
        o = sub.add_parser("once", help="extract a bundle without swapping and run run-once hooks")
        bundle_args(o)
        o.add_argument(
            "--hooks",
            required=True,
            help='JSON list of hooks: "command" or {"run": "command", "timeout": seconds}',
        )

    if want("rollback"):
        r = sub.add_parser("rollback")
        r.add_argument("--release")
        r.add_argument("--user")
        r.add_argument("--restart", action="store_true")
        r.add_argument("--reason")
        r.add_argument("--check", action="store_true", help="change nothing: say what it would do")
        r.add_argument(
            "--sudo-stdin", action="store_true", help="the sudo password is stdin's first line"
        )

    if want("status"):
        st = sub.add_parser("status")
        st.add_argument(
            "--after-boot",
            help="the boot id before a reboot: on a new boot, wait for "
            "the boot unit's outcome, then check health here",
        )
        st.add_argument("--wait", type=float, default=0.0, help="seconds to wait for that outcome")

    if want("shared"):
        sh = sub.add_parser("shared")
        sh.add_argument(
            "--fetch", action="store_true", help="fetch the sourced linked files into shared/ first"
        )

    for name in ("boot", "check", "cleanup", "version", "report"):
        if want(name):
            sub.add_parser(name)
    return p


class _UsageError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["version"]:  # hot path: no argparse, no config
        print(json.dumps({"ok": True, "version": VERSION}))
        return 0
    try:
        args = _parser(_command_of(argv)).parse_args(argv)
    except _UsageError as exc:
        print(json.dumps({"ok": False, "error": f"usage error: {exc}"}))
        return 1 if str(exc) else 0
    try:
        result = _dispatch(args)
    except NodeError as exc:
        log(f"error: {exc.message}")
        print(
            json.dumps({"ok": False, "error": exc.message, "host": _safe_hostname(), **exc.extra})
        )
        return 1
    except KeyboardInterrupt:
        print(json.dumps({"ok": False, "error": f"interrupted on {_safe_hostname()}"}))
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: the controller still needs JSON
        import traceback

        traceback.print_exc(file=sys.stderr)
        text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        print(json.dumps({"ok": False, "error": f"unexpected error on {_safe_hostname()}: {text}"}))
        return 1
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


def _safe_hostname() -> str:
    try:
        return hostname()
    except OSError:
        return "unknown-host"


def _stdin_manifest(line: str) -> Any:
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


def _bundle_source(cfg: Config, args: Any, rest: str | None) -> Source:
    """Where activate/once read the bundle, after checking its signed manifest (with signers).

    stdin: the presigned URL (--url-stdin), then the signed manifest (--manifest-stdin),
    one line each; neither belongs in argv, where every local user can read it. Read to
    EOF, not just a line: the controller's sender thread must be done writing before we
    can exit (or it writes into a closed channel)."""
    lines: list[str] = []
    if args.url_stdin or args.manifest_stdin:
        lines = (sys.stdin.read() if rest is None else rest).splitlines()
    url = args.url
    if args.url_stdin:
        url = lines.pop(0).strip() if lines else ""
        if not url:
            raise NodeError(f"--url-stdin: no URL on stdin on {hostname()}")
    manifest = _stdin_manifest(lines[0] if lines else "") if args.manifest_stdin else None
    signers = _signers_file(cfg)
    if signers is not None:
        principal = check_manifest(
            cfg, signers, manifest, sha256=args.sha256, commit=args.commit, size=args.size
        )
        log(f"manifest of {args.commit[:12]} signed by {principal}")
    if args.s3_key:
        return Source("s3", args.s3_key, args.size)
    if url:
        return Source("url", url, args.size)
    if getattr(args, "prepared", False):  # activate only
        return Source("prepared", "", args.size)
    return Source("file", args.file, args.size)


def _once_hooks(text: str) -> list[Hook]:
    try:
        raw = json.loads(text)
    except ValueError:
        raw = None
    if not isinstance(raw, list) or not raw:
        raise NodeError(f"once --hooks on {hostname()}: expected a non-empty JSON list of hooks")
    return [Hook.from_json(h) for h in raw]


def _dispatch(args: Any) -> dict[str, Any]:
    if args.command == "version":
        return {"ok": True, "version": VERSION}
    config = args.config or os.path.join(os.path.dirname(os.path.abspath(__file__)), "node.json")
    cfg = load_config(config)
    rest = None
    if getattr(
        args, "sudo_stdin", False
    ):  # stdin's first line, before any URL (read to EOF: below)
        global SUDO_PASSWORD
        SUDO_PASSWORD, _, rest = sys.stdin.read().partition("\n")
    if args.command == "once":
        hooks = _once_hooks(args.hooks)
        return run_once(
            cfg,
            hooks,
            sha256=args.sha256,
            commit=args.commit,
            source=_bundle_source(cfg, args, rest),
            committed_at=args.committed_at,
            bundle_id=args.bundle_id,
        )
    if args.command == "activate":
        source = _bundle_source(cfg, args, rest)
        if args.prepare:
            return prepare(
                cfg,
                sha256=args.sha256,
                commit=args.commit,
                source=source,
                force=args.force,
                bundle_id=args.bundle_id,
            )
        return activate(
            cfg,
            sha256=args.sha256,
            commit=args.commit,
            source=source,
            ref=args.ref,
            user=args.user,
            committed_at=args.committed_at,
            restart=args.restart,
            force=args.force,
            bundle_id=args.bundle_id,
        )
    if args.command == "rollback" and args.check:
        return rollback_check(cfg, release=args.release)
    if args.command == "rollback":
        return rollback(
            cfg, release=args.release, user=args.user, restart=args.restart, reason=args.reason
        )
    if args.command == "status":
        return status(cfg, after_boot=args.after_boot, wait=args.wait)
    if args.command == "cleanup":
        return cleanup(cfg)
    if args.command == "check":
        return preflight(cfg)
    if args.command == "shared":
        return shared_report(cfg, fetch=args.fetch)
    if args.command == "boot":
        try:
            return boot(cfg)
        finally:
            if cfg.report:
                spawn_report(config)
    if args.command == "report":
        return report(cfg)
    raise NodeError(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
