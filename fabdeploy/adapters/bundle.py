"""Build the release bundle (`git archive` of one commit, gzipped) and put it in S3.

A bundle is addressed by its bundle id: the commit sha when deploy.yml has no `build:`
recipe, else `<sha>-<first 12 hex of the recipe's sha256>` -- so a new recipe makes a new
bundle, and the bundles under the old keys keep working. {prefix}/bundles/<id>.tar.gz.
The bytes are deterministic for a given commit (and recipe, when the build itself is) on a
given git/zlib: the builder's git config that changes them (tar.umask, core.autocrlf,
core.eol, core.attributesFile, the gzip command) is pinned with `git -c`, and a built pack
has sorted entries, owner root (0/0), mtime = the commit time and modes 0644/0755. So the
sha256 in the object's metadata is stable, and a rebuild that disagrees means something
else wrote the object.

With a `build:` recipe the commit is exported (`git archive`, never the working tree) into
a temp dir, the commands run there with `sh -c` (output streamed live), and the result,
filtered by include/exclude, is packed. Either way the members are checked with the node
program's own rules before anything is uploaded: a bundle every node would refuse fails
here, naming the member.

Compression: git's internal gzip (`git archive --format=tar.gz`, git >= 2.38)
at level 1. Its header carries mtime 0 and no file name, so it is byte-for-byte
reproducible like `gzip -n`; it runs in the git process, i.e. on another core
than our hashing and upload; measured on a 225 MB / 20k-file tree it is ~1.7x
faster than level 6 (and ~2.4x faster than Python's gzip at 6, which also
serialises with our own work) for a bundle only ~6% bigger. Level 9 costs
several times more for ~1% less.

Upload: the gzip stream is spooled to an anonymous temp file while hashing
(bounded memory, one sequential disk write that normally stays in the page
cache), then uploaded with the sha256 already in its metadata. The alternative
-- upload first, then copy_object onto itself to add the sha256 -- doubles the
server-side bytes, briefly exposes an object without its checksum and cannot
be made conditional, so a racing builder could be overwritten.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import getpass
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

from fabdeploy.adapters import signing
from fabdeploy.adapters.localhooks import LocalHookFailed, run_local_hooks
from fabdeploy.adapters.store import Pointer, Store, now_iso
from fabdeploy.basics.config import BuildConfig, Config
from fabdeploy.basics.errors import BundleError, ConflictError, SigningError

Log = Callable[[str], None]

GZIP_LEVEL = 1
READ_CHUNK = 1024 * 1024
SHOW_FILES = 10
# The progress bar appears only once an upload has run this long: short uploads
# stay quiet instead of flashing a bar.
PROGRESS_AFTER = 0.7
REQUIRED_META = ("sha256", "size", "commit")
# Bumped when the pack of the same inputs changes bytes. Objects without it were packed by
# an older fabdeploy (unpinned git config): a rebuild that differs from them is expected.
PACK_VERSION = "2"
# Git config that changes `git archive`'s bytes for the same commit: pinned, whatever the
# builder's ~/.gitconfig or the repo's .git/config say.
PINNED_GIT_CONFIG = (
    "tar.umask=0022",
    "core.autocrlf=false",
    "core.eol=lf",
    "core.attributesFile=/dev/null",
    "tar.tar.gz.command=git archive gzip",
)
BUILD_TAIL_LINES = 20
RECIPE_META_MAX = 1500  # S3 user metadata is 2 KB in all; a longer recipe goes by its sha256 only
NODE_PROGRAM = Path(__file__).resolve().parent.parent / "node" / "node.py"


@dataclass(frozen=True)
class Bundle:
    commit: str
    ref: str
    sha256: str
    size: int
    key: str
    uri: str
    uploaded: bool
    committed_at: int
    manifest: dict[str, str] | None = None  # the signed manifest envelope, when signing is on
    bundle_id: str = ""  # the commit when there is no build recipe
    # Bytes the extracted release takes on a node (unpacked_size()); None for bundles made
    # before it was recorded.
    unpacked_size: int | None = None

    def __post_init__(self) -> None:
        if not self.bundle_id:
            object.__setattr__(self, "bundle_id", self.commit)


def recipe_json(build: BuildConfig) -> str | None:
    """The build recipe, canonical: what the bundle id hashes and provenance records."""
    recipe = build.recipe
    return None if recipe is None else json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def recipe_sha256(build: BuildConfig) -> str | None:
    rj = recipe_json(build)
    return None if rj is None else hashlib.sha256(rj.encode()).hexdigest()


def bundle_id(commit: str, build: BuildConfig) -> str:
    """`commit` without a recipe (today's keys); `commit-<recipe sha256[:12]>` with one."""
    digest = recipe_sha256(build)
    return commit if digest is None else f"{commit}-{digest[:12]}"


def git_pinned() -> list[str]:
    out = []
    for item in PINNED_GIT_CONFIG:
        out += ["-c", item]
    return out


def local_user() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = os.environ.get("USER") or "unknown"
    return f"{user}@{socket.gethostname()}"


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"},
    )


def resolve_commit(repo: Path, ref: str) -> tuple[str, int]:
    """(full sha, committer epoch) of `ref` in `repo`."""
    if not repo.exists():
        raise BundleError(f"repo {repo} does not exist: fix `repo` in deploy.yml")
    if not repo.is_dir():
        raise BundleError(f"repo {repo} is not a directory: fix `repo` in deploy.yml")
    if not ref or ref.startswith("-"):
        raise BundleError(f"invalid ref {ref!r} for repo {repo}: give a branch, tag or commit sha")
    r = _git(repo, "show", "-s", "--format=%H %ct", "--end-of-options", f"{ref}^{{commit}}")
    if r.returncode != 0:
        err = r.stderr.strip()
        if "not a git repository" in err:
            raise BundleError(f"{repo} is not a git repository: fix `repo` in deploy.yml")
        raise BundleError(
            f"unknown ref {ref!r} in repo {repo}: no such branch, tag or commit (fetch it, or fix `ref`)"
        )
    sha, _, epoch = r.stdout.strip().partition(" ")
    return sha, int(epoch)


def branch_name(repo: Path, ref: str) -> str:
    """HEAD as the branch it names, so revisions.log says `Branch main`, as Capistrano's does."""
    if ref != "HEAD":
        return ref
    r = _git(repo, "symbolic-ref", "--short", "-q", "HEAD")
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else ref


def dirty_files(repo: Path) -> list[str]:
    """Paths with uncommitted changes (untracked included): they will NOT ship."""
    r = _git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=normal")
    if r.returncode != 0:
        return []
    out: list[str] = []
    entries = iter(r.stdout.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        out.append(entry[3:])
        if entry[0] in "RC":
            next(entries, None)  # -z puts a rename's source in the following field
    return out


def submodule_paths(repo: Path, commit: str) -> list[str]:
    r = _git(repo, "ls-tree", "-r", "-z", "--full-tree", commit)
    paths = []
    for entry in r.stdout.split("\0"):
        meta, _, path = entry.partition("\t")
        if meta.startswith("160000 "):
            paths.append(path)
    return paths


def has_submodules(repo: Path, commit: str) -> bool:
    return bool(submodule_paths(repo, commit))


def _head_commit(repo: Path) -> str | None:
    r = _git(repo, "rev-parse", "--verify", "-q", "HEAD")
    return r.stdout.strip() if r.returncode == 0 else None


def _list(items: list[str]) -> str:
    shown = ", ".join(items[:SHOW_FILES])
    more = len(items) - SHOW_FILES
    return f"{shown} and {more} more" if more > 0 else shown


def _warn(repo: Path, commit: str, log: Log) -> None:
    # The working tree only matters when it is the commit being bundled.
    if _head_commit(repo) == commit:
        dirty = dirty_files(repo)
        if dirty:
            log(f"warning: uncommitted changes are NOT in the bundle: {_list(dirty)}")
    subs = submodule_paths(repo, commit)
    if subs:
        log(f"warning: submodules are not included in the bundle: {_list(subs)}")


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def archive(repo: Path, commit: str, out: IO[bytes]) -> tuple[str, int]:
    """Write the gzipped tar of `commit` to `out`; (sha256, size). Streams in chunks."""
    cmd = [
        "git",
        "-C",
        str(repo),
        # Pin what changes the bytes (umask, line endings, the gzip command) over any config.
        *git_pinned(),
        "archive",
        "--format=tar.gz",
        f"-{GZIP_LEVEL}",
        commit,
    ]
    h = hashlib.sha256()
    size = 0
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf)
        assert proc.stdout is not None
        try:
            while chunk := proc.stdout.read(READ_CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        except BaseException:
            proc.kill()
            raise
        finally:
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            errf.seek(0)
            msg = errf.read().decode(errors="replace").strip().splitlines()
            raise BundleError(
                f"git archive of {commit[:12]} in {repo} failed: {msg[-1] if msg else rc}"
            )
    return h.hexdigest(), size


# --- the node program's member rules, applied before anything is uploaded ---------------


@lru_cache(maxsize=1)
def _node_program() -> Any:
    """fabdeploy/node/node.py as a module: its validate_members is the rule every node applies."""
    name = "_fabdeploy_node_program"
    spec = importlib.util.spec_from_file_location(name, NODE_PROGRAM)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def check_members(members: list[tarfile.TarInfo], what: str) -> None:
    """Refuse here a pack every node would refuse after download, naming the member."""
    node = _node_program()
    try:
        node.validate_members([copy.copy(m) for m in members])
    except node.UnsafeBundle as exc:
        reason = exc.message
        hint = "fix it in the repository or the build and bundle again"
        for m in members:
            if m.issym() and m.linkname.startswith("/") and repr(m.name.rstrip("/")) in reason:
                hint = (
                    f"list {m.name!r} in build.exclude and in linked_dirs (or linked_files), so each "
                    f"release links it to shared/{m.name}, or commit a relative link instead of {m.linkname!r}"
                )
                break
            if m.issym() and repr(m.name.rstrip("/")) in reason:
                hint = f"point {m.name!r} at a path inside the release (a relative link), or list it in linked_dirs"
                break
        raise BundleError(f"{what} would be refused by every node: {reason}; {hint}") from None


def _git_text(repo: Path, *args: str) -> bytes:
    r = subprocess.run(
        ["git", "-C", str(repo), *git_pinned(), *args],
        capture_output=True,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"},
    )
    if r.returncode != 0:
        msg = r.stderr.decode(errors="replace").strip().splitlines()
        raise BundleError(f"git {args[0]} in {repo} failed: {msg[-1] if msg else r.returncode}")
    return r.stdout


def tree_members(repo: Path, commit: str) -> list[tarfile.TarInfo]:
    """What `git archive` of `commit` packs, as tar members (symlink targets and sizes included)."""
    members: list[tarfile.TarInfo] = []
    links: list[tuple[tarfile.TarInfo, str]] = []
    for entry in _git_text(repo, "ls-tree", "-r", "-l", "-z", "--full-tree", commit).split(b"\0"):
        if not entry:
            continue
        meta, _, raw = entry.partition(b"\t")
        mode, _, rest = meta.decode().partition(" ")
        _, oid, size = rest.split()  # type, object id, size ("-" for a submodule)
        m = tarfile.TarInfo(raw.decode("utf-8", "surrogateescape"))
        if mode == "120000":
            m.type = tarfile.SYMTYPE
            links.append((m, oid))
        elif mode == "160000":
            m.type = tarfile.DIRTYPE
        else:
            m.type = tarfile.REGTYPE
            m.size = int(size)
        members.append(m)
    if links:
        out = _git_text_input(repo, "".join(f"{oid}\n" for _, oid in links))
        for m, target in zip((m for m, _ in links), out, strict=True):
            m.linkname = target
    return members


BLOCK = 4096  # the node's unit of space accounting (node.py: _Space)


def unpacked_size(members: Iterable[tarfile.TarInfo]) -> int:
    """The bytes a node's extraction counts for these members: each file rounded up to whole
    blocks (one at least), a block per directory (deploy.check compares it with free space)."""
    total, dirs = 0, set[str]()
    for m in members:
        name = m.name[2:] if m.name.startswith("./") else m.name
        parts = name.strip("/").split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if m.isdir():
            dirs.add("/".join(parts))
        elif m.isreg():
            total += max(BLOCK, -(-m.size // BLOCK) * BLOCK)
    return total + BLOCK * len(dirs)


def _git_text_input(repo: Path, oids: str) -> list[str]:
    """Blob contents via one `git cat-file --batch` (symlink targets are small blobs)."""
    r = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "--batch"],
        input=oids.encode(),
        capture_output=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    data, out = r.stdout, []
    while data:
        header, _, data = data.partition(b"\n")
        size = int(header.split()[2])
        out.append(data[:size].decode("utf-8", "surrogateescape"))
        data = data[size + 1 :]
    return out


# --- the build: clean export, commands, deterministic pack ------------------------------


def export_commit(repo: Path, commit: str, dest: Path) -> None:
    """The commit's tree into `dest`, as `git archive` gives it: never the working tree."""
    git = subprocess.Popen(
        ["git", "-C", str(repo), *git_pinned(), "archive", "--format=tar", commit],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert git.stdout is not None
    untar = subprocess.run(
        ["tar", "-x", "--no-same-owner", "-f", "-", "-C", str(dest)],
        stdin=git.stdout,
        capture_output=True,
    )
    git.stdout.close()
    err = git.stderr.read().decode(errors="replace").strip() if git.stderr else ""
    if git.wait() != 0 or untar.returncode != 0:
        msg = (err or untar.stderr.decode(errors="replace").strip()).splitlines()
        raise BundleError(
            f"cannot export {commit[:12]} of {repo} for the build: {msg[-1] if msg else 'tar failed'}"
        )


def run_build(
    commands: tuple[str, ...], cwd: Path, env: dict[str, str], what: str, log: Log
) -> None:
    """Each command with `sh -c` in `cwd`, output streamed line by line; the first failure raises
    one line plus the last lines of its output."""
    for i, command in enumerate(commands, 1):
        log(f"build [{i}/{len(commands)}] $ {command}")
        tail: collections.deque[str] = collections.deque(maxlen=BUILD_TAIL_LINES)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            ["sh", "-c", command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                tail.append(line)
                log(f"  | {line}")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        rc = proc.wait()
        if rc != 0:
            shown = "\n".join(f"  | {x}" for x in tail) if tail else "  (no output)"
            raise BundleError(
                f"build command `{command}` failed with exit code {rc} in a clean export of {what} "
                f"after {time.monotonic() - t0:.1f}s; nothing was uploaded. Its last lines:\n{shown}"
            )


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    """gitignore-like: a pattern with '/' matches the path or a parent dir of it; one
    without matches any single name along the path."""
    parts = rel.split("/")
    for pat in patterns:
        if "/" in pat:
            if any(fnmatchcase("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
                return True
        elif any(fnmatchcase(p, pat) for p in parts):
            return True
    return False


def collect(root: Path, build: BuildConfig, mtime: int) -> list[tuple[tarfile.TarInfo, str | None]]:
    """The pack's members: sorted, owner root, mtime `mtime`, modes 0644/0755 (never group/other-writable)."""
    out: list[tuple[tarfile.TarInfo, str | None]] = []

    def info(rel: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
        m = tarfile.TarInfo(rel)
        m.type, m.mode, m.size, m.linkname, m.mtime = kind, mode, size, link, mtime
        m.uid = m.gid = 0
        m.uname = m.gname = "root"
        return m

    def walk(dirpath: str, prefix: str) -> bool:
        kept = False
        for name in sorted(os.listdir(dirpath)):
            path = os.path.join(dirpath, name)
            rel = prefix + name
            if _matches(rel, build.exclude):
                continue
            st = os.lstat(path)
            wanted = not build.include or _matches(rel, build.include)
            if stat.S_ISDIR(st.st_mode):
                at = len(out)
                out.append((info(rel, tarfile.DIRTYPE, 0o755), None))
                if not walk(path, rel + "/") and not wanted:
                    del out[at]  # nothing included below it
                    continue
            elif not wanted:
                continue
            elif stat.S_ISLNK(st.st_mode):
                out.append((info(rel, tarfile.SYMTYPE, 0o755, link=os.readlink(path)), None))
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                out.append((info(rel, tarfile.REGTYPE, mode, size=st.st_size), path))
            else:
                raise BundleError(
                    f"the build left {rel!r}, a special file (socket, fifo or device): "
                    "remove it in the build, or exclude it in build.exclude"
                )
            kept = True
        return kept

    walk(str(root), "")
    return out


class _HashingWriter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.h.update(data)
        self.out.write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def pack(members: list[tuple[tarfile.TarInfo, str | None]], out: IO[bytes]) -> tuple[str, int]:
    """A gzipped tar of `members` into `out` (no name, mtime 0 in the gzip header); (sha256, size)."""
    w = _HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=w, mtime=0) as gz:  # type: ignore[arg-type]
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            for m, path in members:
                if path is None:
                    tf.addfile(m)
                    continue
                with open(path, "rb") as fh:
                    tf.addfile(m, fh)
    return w.h.hexdigest(), w.size


def before_bundle(cfg: Config, commit: str, ref: str, committed_at: int, src: Path | None) -> None:
    """hooks.before_bundle, in the clean export `src` of the commit (exported here when there is
    no build to share one with): a check of exactly what ships. A failure stops the bundle."""
    hooks = cfg.hooks.before_bundle
    if not hooks:
        return
    if src is None:
        tmp = Path(tempfile.mkdtemp(prefix="fabdeploy-check-", dir=cfg.build.tmpdir))
        try:
            export_commit(cfg.repo, commit, tmp)
            before_bundle(cfg, commit, ref, committed_at, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    env = {
        "REVISION": commit,
        "REF": ref,
        "BUNDLE_ID": bundle_id(commit, cfg.build),
        "DEPLOY_USER": local_user(),
        "REPO": str(Path(cfg.repo).resolve()),
        "SOURCE_DATE_EPOCH": str(committed_at),
        **({"STAGE": cfg.stage} if cfg.stage else {}),
    }
    try:
        run_local_hooks("before_bundle", hooks, src, env)
    except LocalHookFailed as e:
        raise BundleError(
            f"{e} in a clean export of {commit[:12]}; nothing was built or uploaded. "
            f"Its last lines:\n{e.tail_text()}"
        ) from None


def build_pack(
    cfg: Config, commit: str, committed_at: int, out: IO[bytes], log: Log, ref: str = ""
) -> tuple[str, int, int]:
    """Export `commit`, run the build recipe in it, check and pack the result into `out`:
    (sha256, size, unpacked size)."""
    where = cfg.build.tmpdir
    if where is not None and not where.is_dir():
        raise BundleError(
            f"build.tmpdir {where} is not a directory: create it or fix build.tmpdir in {cfg.path}"
        )
    tmp = Path(tempfile.mkdtemp(prefix="fabdeploy-build-", dir=where))
    try:
        src = tmp / "src"
        src.mkdir()
        export_commit(cfg.repo, commit, src)
        before_bundle(cfg, commit, ref, committed_at, src)
        if cfg.build.commands:
            # SOURCE_DATE_EPOCH: tools that honour it (pip's .pyc, many asset builders) give
            # the same bytes for the same commit.
            env = {**os.environ, "SOURCE_DATE_EPOCH": str(committed_at), "REVISION": commit}
            t0 = time.monotonic()
            run_build(cfg.build.commands, src, env, commit[:12], log)
            log(f"build done in {time.monotonic() - t0:.1f}s")
        members = collect(src, cfg.build, committed_at)
        check_members([m for m, _ in members], f"the build of {commit[:12]}")
        return (*pack(members, out), unpacked_size(m for m, _ in members))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Progress:
    """Upload progress callback: a rich bar on a TTY once the upload is slow enough."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total = total
        self.label = label
        self.enabled = enabled
        self.done = 0
        self.started = time.monotonic()
        self._bar: Any = None  # a rich Progress, made only once an upload turns out slow
        self._task: Any = None
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            if not self.enabled:
                return
            if self._bar is None and time.monotonic() - self.started >= PROGRESS_AFTER:
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    Progress,
                    TransferSpeedColumn,
                )

                self._bar = Progress(
                    "[progress.description]{task.description}",
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    transient=True,
                )
                self._bar.start()
                self._task = self._bar.add_task(self.label, total=self.total)
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _bundle_from_meta(
    store: Store, bid: str, commit: str, ref: str, ct: int, meta: dict[str, str]
) -> Bundle:
    key = store.bundle_key(bid)
    return Bundle(
        commit=commit,
        ref=ref,
        sha256=meta["sha256"],
        size=int(meta.get("size") or meta.get("content-length") or 0),
        key=key,
        uri=store.uri(key),
        uploaded=False,
        committed_at=int(meta.get("committed-at") or ct),
        bundle_id=bid,
        unpacked_size=meta_int(meta.get("unpacked-size")),
    )


def meta_int(value: object) -> int | None:
    """A non-negative integer from S3 metadata or a manifest, else None (absent or damaged)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    return None


def _mismatch(store: Store, bid: str, theirs: str, ours: str) -> BundleError:
    built = " (or the build is not deterministic)" if bid != bid.split("-")[0] else ""
    return BundleError(
        f"{store.uri(store.bundle_key(bid))} exists with sha256 {theirs} but this build is {ours}: "
        f"something else wrote it; investigate before deploying{built}"
    )


def _legacy_sha256(repo: Path, commit: str) -> str:
    """The sha256 of the bundle an older fabdeploy made of `commit`: git's default tar.umask (002)."""
    cmd = [
        "git",
        "-C",
        str(repo),
        "-c",
        "tar.umask=0002",
        "-c",
        "tar.tar.gz.command=git archive gzip",
        "archive",
        "--format=tar.gz",
        f"-{GZIP_LEVEL}",
        commit,
    ]
    h = hashlib.sha256()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _report(b: Bundle, log: Log) -> None:
    log(f"bundle  {b.uri}")
    log(f"commit  {b.commit} ({b.ref})")
    if b.bundle_id != b.commit:
        log(f"id      {b.bundle_id} (commit + build recipe)")
    log(f"sha256  {b.sha256}  ({_human_size(b.size)})")


def _metadata(
    cfg: Config, bid: str, commit: str, ref: str, sha: str, size: int, ct: int, unpacked: int
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "commit": commit,
        "ref": ref,
        "sha256": sha,
        "size": size,
        "unpacked-size": unpacked,
        "built-at": now_iso(),
        "built-by": local_user(),
        "app": cfg.app,
        "committed-at": ct,
        "bundle-id": bid,
        "pack": PACK_VERSION,
    }
    rj = recipe_json(cfg.build)
    if rj is not None:
        meta["recipe-sha256"] = recipe_sha256(cfg.build)
        if len(rj) <= RECIPE_META_MAX:
            meta["recipe"] = rj
    return meta


def _build(
    cfg: Config,
    store: Store,
    commit: str,
    ref: str,
    ct: int,
    existing: dict[str, str] | None,
    progress: bool | None,
    log: Log,
) -> Bundle:
    bid = bundle_id(commit, cfg.build)
    key = store.bundle_key(bid)
    uri = store.uri(key)
    with tempfile.TemporaryFile(prefix="fabdeploy-bundle-") as spool:
        if cfg.build.recipe is None:
            before_bundle(cfg, commit, ref, ct, None)
            members = tree_members(cfg.repo, commit)
            check_members(members, f"the bundle of {commit[:12]}")
            unpacked = unpacked_size(members)
            sha, size = archive(cfg.repo, commit, spool)
        else:
            sha, size, unpacked = build_pack(cfg, commit, ct, spool, log, ref)
        bundle = Bundle(
            commit,
            ref,
            sha,
            size,
            key,
            uri,
            uploaded=False,
            committed_at=ct,
            bundle_id=bid,
            unpacked_size=unpacked,
        )
        if existing is not None and existing.get("sha256"):
            if existing["sha256"] != sha:
                if (
                    cfg.build.recipe is None
                    and not existing.get("pack")
                    and existing["sha256"] == _legacy_sha256(cfg.repo, commit)
                ):
                    # Packed before the git config was pinned: same tree, group-writable modes
                    # (which every node drops). Keep it: nodes verify against its sha256.
                    log(
                        f"bundle {bid[:25]} already in {uri}, packed by an older fabdeploy "
                        f"(sha256 {existing['sha256']}); kept, nothing uploaded"
                    )
                    return _bundle_from_meta(store, bid, commit, ref, ct, existing)
                raise _mismatch(store, bid, existing["sha256"], sha)
            log(f"bundle {bid[:25]} already in {uri} (sha256 {sha}), nothing uploaded")
            # The object's metadata stays as it was: an old bundle's unpacked size is unknown.
            return dataclasses.replace(
                bundle, unpacked_size=meta_int(existing.get("unpacked-size"))
            )
        spool.seek(0)
        meta = _metadata(cfg, bid, commit, ref, sha, size, ct, unpacked)
        show = sys.stdout.isatty() if progress is None else progress
        bar = _Progress(size, f"uploading {bid[:25]}", show)
        try:
            store.upload_bundle(spool, bid, meta, size_hint=size, progress=bar)
        except ConflictError:
            # Another builder created it between our HEAD and our upload: fine if
            # it is the same bytes, alarming otherwise.
            theirs = store.head_bundle(bid) or {}
            if theirs.get("sha256") != sha:
                raise _mismatch(store, bid, theirs.get("sha256", "<none>"), sha) from None
            log(
                f"bundle {bid[:25]} was uploaded meanwhile by {theirs.get('built-by', 'someone')}, same sha256"
            )
            return dataclasses.replace(bundle, unpacked_size=meta_int(theirs.get("unpacked-size")))
        finally:
            bar.close()
    return dataclasses.replace(bundle, uploaded=True)


def build_and_upload(
    cfg: Config,
    store: Store,
    ref: str | None = None,
    progress: bool | None = None,
    log: Log = print,
    verify: bool = True,
) -> Bundle:
    """Always build; upload unless the same bytes are already there.

    `verify` is accepted for symmetry with ensure_bundle: building always
    compares against an existing object, so it cannot be turned off here.
    """
    ref = ref or cfg.ref
    commit, ct = resolve_commit(cfg.repo, ref)
    _warn(cfg.repo, commit, log)
    b = _build(
        cfg, store, commit, ref, ct, store.head_bundle(bundle_id(commit, cfg.build)), progress, log
    )
    _report(b, log)
    return b


def ensure_bundle(
    cfg: Config,
    store: Store,
    ref: str | None = None,
    log: Log = print,
    verify: bool = False,
    progress: bool | None = None,
) -> Bundle:
    """Make sure the bundle of `ref` is in S3, building only if it is missing.

    The commit sha and the build recipe (the bundle id) determine the content, so an
    existing bundle is not rebuilt: with signing on, its signed manifest (verified against
    signing.allowed_signers) gives its sha256 and size, never S3 metadata; without signing,
    full metadata is trusted (a re-bundle costs one HEAD request). `verify=True` rebuilds
    and compares instead.
    """
    ref = ref or cfg.ref
    commit, ct = resolve_commit(cfg.repo, ref)
    ref = branch_name(cfg.repo, ref)
    _warn(cfg.repo, commit, log)
    bid = bundle_id(commit, cfg.build)
    meta = store.head_bundle(bid)
    signed = signing_on(cfg)
    trusted = (
        trusted_manifest(cfg, store, commit, log, bid)
        if signed and meta is not None and not verify
        else None
    )
    if trusted is not None:
        env, m, principal = trusted
        key = store.bundle_key(bid)
        b = Bundle(
            commit,
            ref,
            m["sha256"],
            m["size"],
            key,
            store.uri(key),
            uploaded=False,
            committed_at=int(m.get("committed_at") or ct),
            manifest=env,
            bundle_id=bid,
            unpacked_size=meta_int(m.get("unpacked_size")),
        )
        log(f"bundle {bid[:25]} already in S3, manifest signed by {principal}, nothing uploaded")
    elif meta is not None and not signed and not verify and all(meta.get(k) for k in REQUIRED_META):
        b = _bundle_from_meta(store, bid, commit, ref, ct, meta)
        log(f"bundle {bid[:25]} already in S3 with its sha256, nothing uploaded")
    else:
        b = _build(cfg, store, commit, ref, ct, meta, progress, log)
        if signed:
            b = dataclasses.replace(b, manifest=sign_manifest(cfg, store, b))
            log(f"manifest of {commit[:12]} signed with {cfg.signing.key}")
    _report(b, log)
    return b


# --- signed releases ------------------------------------------------------------------


def signing_on(cfg: Config | None) -> bool:
    return cfg is not None and cfg.signing.key is not None


def trusted_manifest(
    cfg: Config, store: Store, commit: str, log: Log = print, bid: str | None = None
) -> tuple[Any, Any, str] | None:
    """The bundle's manifest if a trusted signer signed it for this app and bundle, else None (said why)."""
    bid = bid or commit
    env = store.get_manifest(bid)
    if env is None:
        return None
    where = f"manifest {store.uri(store.manifest_key(bid))}"
    try:
        m, principal = signing.verify(cfg, env, signing.NS_MANIFEST, where)
    except SigningError as e:
        log(f"warning: {e}; rebuilding the bundle instead")
        return None
    sha, size = m.get("sha256"), m.get("size")
    if (
        m.get("commit") != commit
        or m.get("app") != cfg.app
        or m.get("key") != store.bundle_key(bid)
        or not isinstance(sha, str)
        or not isinstance(size, int)
    ):
        log(f"warning: {where}, signed by {principal}, names another bundle; rebuilding instead")
        return None
    return env, m, principal


def sign_manifest(cfg: Config, store: Store, b: Bundle) -> dict[str, str]:
    payload = {
        "format": 1,
        "app": cfg.app,
        "key": b.key,
        "commit": b.commit,
        "sha256": b.sha256,
        "size": b.size,
        "ref": b.ref,
        "committed_at": b.committed_at,
        "built_at": now_iso(),
        "built_by": local_user(),
        "bundle_id": b.bundle_id,
    }
    if b.unpacked_size is not None:  # unknown for bundles made before it was recorded
        payload["unpacked_size"] = b.unpacked_size
    env = signing.sign(cfg, payload, signing.NS_MANIFEST)
    store.put_manifest(b.bundle_id, env)
    return env


def _next_sequence(cfg: Config, current: Pointer | None) -> int:
    """Above the current pointer's verified sequence; wall-clock millis otherwise, so a pointer
    an attacker wrote with a huge sequence can't be trusted for it, and order still holds."""
    seq = 0
    if current is not None and current.signed:
        try:
            p, _ = signing.verify(cfg, current.signed, signing.NS_POINTER, "the current pointer")
            if isinstance(p.get("sequence"), int):
                seq = p["sequence"] + 1
        except SigningError:
            pass
    return max(seq, int(time.time() * 1000))


def new_pointer(cfg: Config | None, b: Bundle, current: Pointer | None) -> Pointer:
    """The pointer to publish for `b`: signed (with its manifest and a sequence) when signing is on."""
    pointer = Pointer(
        key=b.key,
        commit=b.commit,
        sha256=b.sha256,
        ref=b.ref,
        size=b.size,
        published_by=local_user(),
        published_at=now_iso(),
        committed_at=b.committed_at,
        bundle_id=b.bundle_id,
    )
    if not signing_on(cfg):
        return pointer
    assert cfg is not None
    if b.manifest is None:
        raise SigningError(
            f"{b.commit[:12]} has no signed manifest: run `fab deploy.bundle --ref={b.commit}`"
        )
    seq = _next_sequence(cfg, current)
    payload = {
        "app": cfg.app,
        "key": b.key,
        "commit": b.commit,
        "sha256": b.sha256,
        "size": b.size,
        "ref": b.ref,
        "committed_at": b.committed_at,
        "published_by": pointer.published_by,
        "published_at": pointer.published_at,
        "sequence": seq,
        "manifest": b.manifest,
        "bundle_id": b.bundle_id,
    }
    return dataclasses.replace(
        pointer, sequence=seq, signed=signing.sign(cfg, payload, signing.NS_POINTER)
    )


def bundle_of_pointer(cfg: Config, store: Store, p: Pointer, log: Log = print) -> Bundle:
    """A published bundle again (rollbacks), with its verified manifest when signing is on."""
    env = None
    if signing_on(cfg):
        trusted = trusted_manifest(cfg, store, p.commit, log, p.id)
        if trusted is None:
            raise SigningError(
                f"{p.commit[:12]} has no manifest signed by a trusted key in "
                f"{store.uri(store.manifest_key(p.id))}: bundle it again "
                f"(`fab deploy.bundle --ref={p.commit}`), then publish it"
            )
        env, m, _ = trusted
        if m["sha256"] != p.sha256 or m["size"] != p.size:
            raise SigningError(
                f"the history entry of {p.commit[:12]} disagrees with its signed manifest: "
                "refusing to publish it"
            )
    return Bundle(
        p.commit,
        p.ref,
        p.sha256,
        p.size,
        p.key,
        store.uri(p.key),
        uploaded=False,
        committed_at=p.committed_at or 0,
        manifest=env,
        bundle_id=p.id,
    )


def publish(
    cfg: Config, store: Store, ref: str | None = None, log: Log = print
) -> tuple[Bundle, Pointer]:
    """Ensure the bundle, then point {prefix}/published.json at it (conditional write)."""
    b = ensure_bundle(cfg, store, ref, log)
    return b, publish_bundle(store, b, log, cfg=cfg)


def publish_bundle(
    store: Store,
    b: Bundle,
    log: Log = print,
    cfg: Config | None = None,
    *,
    read: tuple[Pointer | None, str | None] | None = None,
    defer_history: bool = False,
) -> Pointer:
    """Point {prefix}/published.json at an uploaded bundle (conditional write, history kept);
    signed when `cfg` has signing on.

    `read`: the pointer and ETag the caller already read (under the deploy lock) with
    `read_pointer(replacing=True)`; the write is conditional on that ETag all the same.
    `defer_history`: see Store.write_pointer."""
    current, etag = read if read is not None else store.read_pointer(replacing=True)
    if (
        current is not None
        and current.id == b.bundle_id
        and (current.signed or not signing_on(cfg))
    ):
        log(
            f"{b.commit[:12]} is already published (by {current.published_by} at {current.published_at}); "
            "nothing changed"
        )
        return current
    pointer = new_pointer(cfg, b, current)
    store.write_pointer(pointer, etag, defer_history=defer_history)
    was = f" (was {current.commit[:12]})" if current else " (first publish)"
    signed = f", signed, sequence {pointer.sequence}" if pointer.signed else ""
    log(f"published {b.commit[:12]} ({b.ref}) to {store.uri(store.pointer_key)}{was}{signed}")
    return pointer


def promote(
    source: Store, store: Store, from_stage: str, log: Log = print, cfg: Config | None = None
) -> tuple[Bundle, Pointer]:
    """Publish what `source` (another stage) has published, byte for byte: no rebuild.

    The bundle is copied into this stage's prefix (checked against the source pointer's sha256
    before it is uploaded), then this stage's pointer is moved to it (conditional write). With
    signing on, the source pointer's signature is checked first, and the copy gets a manifest
    signed for this stage.
    """
    p, _ = source.read_pointer()
    if p is None:
        raise BundleError(
            f"stage {from_stage} has nothing published ({source.uri(source.pointer_key)}); "
            f"publish it first: fab {from_stage} deploy.publish"
        )
    if signing_on(cfg):
        assert cfg is not None
        signed, who = signing.verify(
            cfg,
            p.signed,
            signing.NS_POINTER,
            f"stage {from_stage}'s pointer {source.uri(source.pointer_key)}",
        )
        if (
            signed.get("commit"),
            signed.get("sha256"),
            signed.get("size"),
            signed.get("bundle_id") or signed.get("commit"),
        ) != (p.commit, p.sha256, p.size, p.id):
            raise SigningError(
                f"stage {from_stage}'s pointer disagrees with what {who} signed: refusing to promote it"
            )
    key = store.bundle_key(p.id)
    b = Bundle(
        p.commit,
        p.ref,
        p.sha256,
        p.size,
        key,
        store.uri(key),
        uploaded=False,
        committed_at=p.committed_at or 0,
        bundle_id=p.id,
    )
    existing = store.head_bundle(p.id)
    if existing is not None:
        b = dataclasses.replace(b, unpacked_size=meta_int(existing.get("unpacked-size")))
    if existing is not None:
        if existing.get("sha256") != p.sha256:
            raise _mismatch(store, p.id, existing.get("sha256", "<none>"), p.sha256)
        log(f"bundle for {p.commit[:12]} already in {b.uri} (sha256 {p.sha256}), nothing copied")
    else:
        meta = {
            k: v
            for k, v in (source.head_bundle(p.id) or {}).items()
            if k not in ("etag", "content-length")
        }
        meta.update({"sha256": p.sha256, "promoted-from": from_stage})
        with tempfile.TemporaryFile(prefix="fabdeploy-promote-") as spool:
            digest, size = hashlib.sha256(), 0
            body = source.open_bundle(p.id)
            for chunk in iter(lambda: body.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            if digest.hexdigest() != p.sha256:
                raise BundleError(
                    f"{source.uri(source.bundle_key(p.id))} has sha256 {digest.hexdigest()}, but "
                    f"stage {from_stage}'s pointer says {p.sha256}: investigate before promoting"
                )
            spool.seek(0)
            try:
                store.upload_bundle(spool, p.id, meta, size_hint=size)
            except ConflictError:
                theirs = store.head_bundle(p.id) or {}
                if theirs.get("sha256") != p.sha256:
                    raise _mismatch(store, p.id, theirs.get("sha256", "<none>"), p.sha256) from None
        b = Bundle(
            p.commit,
            p.ref,
            p.sha256,
            size,
            key,
            b.uri,
            uploaded=True,
            committed_at=b.committed_at,
            bundle_id=p.id,
            unpacked_size=meta_int(meta.get("unpacked-size")),
        )
        log(f"copied {p.commit[:12]} from stage {from_stage} to {b.uri} (sha256 {p.sha256})")
    if signing_on(cfg):
        assert cfg is not None
        b = dataclasses.replace(b, manifest=sign_manifest(cfg, store, b))
    return b, publish_bundle(store, b, log, cfg=cfg)
