"""deploy.config: the linked files whose content lives in SSM, Secrets Manager or S3.

show   what each source holds: version, last modified, sha256, size, lines (values only with
       --show-secrets)
push   a local file to its source (nothing when it already holds those bytes; --dry-run says
       what would change)
diff   a local file against its source, or the source against each node's copy in shared/
       (hashes and line counts; the lines themselves only with --show-secrets)
sync   nodes fetch their sourced linked files now (no restart; a hotfix restarts)

Values are secrets: nothing here prints one unless the user asked with --show-secrets.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric import Connection

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.sources import SourceError, Sources, Stored
from fabdeploy.adapters.ssh import HostResult, run_parallel
from fabdeploy.basics.config import Config, Host, LinkedSource, linked_sources
from fabdeploy.basics.errors import ConfigError, DeployError
from fabdeploy.basics.output import dump_json, say, table

HIDDEN = "values hidden; --show-secrets prints them"


# --- pure helpers (unit-tested) -----------------------------------------------------------


def count_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@dataclass(frozen=True)
class Digest:
    """What can be said about a value without showing it."""

    sha256: str
    size: int
    lines: int

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest(), len(data), count_lines(data))

    def brief(self) -> str:
        return f"{self.lines} lines, {self.size} bytes, sha256 {self.sha256[:12]}"


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", errors="replace").splitlines(keepends=True)


def line_delta(old: bytes, new: bytes) -> tuple[int, int]:
    """Lines added and removed going from `old` to `new` (counts only: no content)."""
    added = removed = 0
    for line in difflib.ndiff(_lines(old), _lines(new)):
        if line.startswith("+ "):
            added += 1
        elif line.startswith("- "):
            removed += 1
    return added, removed


def change_summary(old: bytes | None, new: bytes) -> str:
    """One line about a change, safe to print: counts and hashes."""
    d = Digest.of(new)
    if old is None:
        return f"new ({d.brief()})"
    added, removed = line_delta(old, new)
    return (
        f"+{added} -{removed} lines, sha256 {Digest.of(old).sha256[:12]} -> {d.sha256[:12]} "
        f"({d.lines} lines, {d.size} bytes)"
    )


def unified(old: bytes, new: bytes, old_name: str, new_name: str) -> str:
    """The full diff: it shows secret lines, so only with --show-secrets."""
    return "".join(
        line if line.endswith("\n") else line + "\n"
        for line in difflib.unified_diff(_lines(old), _lines(new), old_name, new_name)
    )


def select(cfg: Config, path: str | None) -> dict[str, LinkedSource]:
    """The sourced linked files to work on: all, or the one --path names."""
    sources = linked_sources(cfg)
    if not sources:
        raise ConfigError(
            f"{cfg.path}: no linked_files entry names a source; add one such as "
            "{path: config/database.yml, ssm: /shop/production/database.yml}"
        )
    if path is None:
        return sources
    path = path.strip("/")
    if path not in sources:
        raise ConfigError(
            f"--path={path} is not a linked file with a source in {cfg.path}; those are: "
            + ", ".join(sources)
        )
    return {path: sources[path]}


def only_one(cfg: Config, path: str | None) -> tuple[str, LinkedSource]:
    chosen = select(cfg, path)
    if len(chosen) > 1:
        raise ConfigError(
            f"name the linked file with --path: {cfg.path} has several with a source ("
            + ", ".join(chosen)
            + ")"
        )
    return next(iter(chosen.items()))


def node_state(stored: Digest | None, copy: dict[str, Any] | None) -> str:
    """How a node's copy compares with the source (hashes only)."""
    if copy is None:
        return "MISSING on the node (fetched at its next boot or hotfix; or --sync)"
    if stored is None:
        return "source missing (the node keeps its copy)"
    if copy.get("sha256") == stored.sha256:
        return "same" if copy.get("mode") == "0600" else f"same content, mode {copy.get('mode')}"
    return (
        f"DIFFERS: node {copy.get('lines')} lines, sha256 {str(copy.get('sha256'))[:12]}; "
        f"source {stored.lines} lines, sha256 {stored.sha256[:12]}"
    )


def _read_local(local: str) -> bytes:
    try:
        return Path(local).expanduser().read_bytes()
    except OSError as e:
        raise DeployError(f"cannot read {local}: {e.strerror or e}") from None


def _title(cfg: Config, what: str) -> str:
    return f"{what} of {cfg.app}{f' ({cfg.stage})' if cfg.stage else ''}"


# --- the operations -------------------------------------------------------------------------


def show(
    cfg: Config, sources: Sources, path: str | None, *, show_secrets: bool, as_json: bool
) -> bool:
    """Each source's version, last change and digest (its value with show_secrets)."""
    chosen = select(cfg, path)
    read: list[tuple[str, LinkedSource, Stored | None, str | None]] = []
    for p, src in chosen.items():
        try:
            read.append((p, src, sources.read(src), None))
        except SourceError as e:
            read.append((p, src, None, str(e)))
    if as_json:
        files = []
        for p, src, stored, err in read:
            entry: dict[str, Any] = {"path": p, "source": src.describe(), "error": err}
            entry["exists"] = stored is not None
            if stored is not None:
                d = Digest.of(stored.data)
                entry.update(
                    version=stored.version,
                    modified=stored.modified,
                    sha256=d.sha256,
                    size=d.size,
                    lines=d.lines,
                )
                if show_secrets:
                    entry["value"] = stored.data.decode("utf-8", errors="replace")
            files.append(entry)
        dump_json({"app": cfg.app, "stage": cfg.stage, "files": files})
        return all(err is None and stored is not None for _, _, stored, err in read)
    rows = []
    for p, src, stored, err in read:
        if err is not None:
            rows.append([p, src.describe(), "-", "-", "-", f"ERROR: {err}"])
        elif stored is None:
            rows.append(
                [
                    p,
                    src.describe(),
                    "-",
                    "-",
                    "-",
                    f"MISSING: fab deploy.config --push=FILE --path={p}",
                ]
            )
        else:
            d = Digest.of(stored.data)
            rows.append(
                [p, src.describe(), stored.version or "-", stored.modified or "-", d.sha256[:12],
                 f"{d.lines} lines, {d.size} bytes"]
            )  # fmt: skip
    table(
        _title(cfg, "shared config"),
        ["linked file", "source", "version", "modified", "sha256", "content"],
        rows,
    )
    if show_secrets:
        for p, src, stored, _ in read:
            if stored is not None:
                say(f"--- {p} ({src.describe()}, version {stored.version})")
                text = stored.data.decode("utf-8", errors="replace")
                say(text if text.endswith("\n") or not text else text + "\n")
    else:
        say(HIDDEN)
    return all(err is None and stored is not None for _, _, stored, err in read)


def push(
    cfg: Config,
    sources: Sources,
    path: str | None,
    local: str,
    *,
    dry_run: bool = False,
    show_secrets: bool = False,
) -> None:
    """Store a local file as a linked file's source; nothing when it already holds those bytes."""
    p, src = only_one(cfg, path)
    data = _read_local(local)
    stored = sources.read(src)
    if stored is not None and stored.data == data:
        say(
            f"{p}: {src.describe()} already holds {local} (version {stored.version}, "
            f"{Digest.of(data).brief()}): nothing pushed"
        )
        return
    summary = change_summary(stored.data if stored else None, data)
    if show_secrets and stored is not None:
        print(unified(stored.data, data, src.describe(), local), end="")
    if dry_run:
        say(f"would push {local} to {src.describe()} for {p}: {summary}")
        return
    version = sources.write(src, data)
    was = f"version {stored.version} -> {version}" if stored else f"version {version}"
    say(f"pushed {local} to {src.describe()} for {p}: {was}; {summary}")
    say(
        "nodes fetch it at their next boot or hotfix: `fab deploy.hotfix` restarts the app on it, "
        "`fab deploy.config --sync` only fetches it"
    )


def diff_local(
    cfg: Config, sources: Sources, path: str | None, local: str, *, show_secrets: bool = False
) -> bool:
    """A local file against its source. True when they are the same."""
    p, src = only_one(cfg, path)
    data = _read_local(local)
    stored = sources.read(src)
    if stored is None:
        say(f"{p}: {src.describe()} does not exist yet; {local}: {Digest.of(data).brief()}")
        return False
    if stored.data == data:
        say(f"{p}: {local} and {src.describe()} (version {stored.version}) are the same")
        return True
    say(
        f"{p}: {local} differs from {src.describe()} (version {stored.version}): "
        + change_summary(stored.data, data)
    )
    if show_secrets:
        print(unified(stored.data, data, src.describe(), local), end="")
    else:
        say("lines hidden; --show-secrets prints the diff")
    return False


def diff_nodes(cfg: Config, sources: Sources, hosts: list[Host], path: str | None) -> bool:
    """Each source against each node's copy in shared/ (hashes only). True when all match."""
    chosen = select(cfg, path)
    stored: dict[str, Digest | None] = {}
    for p, src in chosen.items():
        value = sources.read(src)
        stored[p] = Digest.of(value.data) if value is not None else None

    def work(host: Host, conn: Connection) -> dict[str, Any]:
        return nodectl.call(cfg, host, conn, "shared", timeout=60, reinstall=False)

    results = run_parallel(cfg, hosts, work)
    rows, ok = node_rows(chosen, stored, results)
    table(
        _title(cfg, "shared config on the nodes"),
        ["host", "linked file", "node copy", "vs source"],
        rows,
    )
    return ok


def node_rows(
    chosen: dict[str, LinkedSource], stored: dict[str, Digest | None], results: list[HostResult]
) -> tuple[list[list[str]], bool]:
    rows: list[list[str]] = []
    ok = True
    for r in results:
        if not r.ok:
            rows.append([r.host, "-", "-", f"UNREACHABLE/ERROR: {r.error}"])
            ok = False
            continue
        copies = {f.get("path"): f.get("copy") for f in r.data.get("files") or []}
        outdated = (
            "; outdated node program/config (fab deploy.setup)" if r.data.get("outdated") else ""
        )
        for p in chosen:
            if p not in copies:
                rows.append([r.host, p, "-", "not in the node's config: fab deploy.setup"])
                ok = False
                continue
            copy = copies[p]
            state = node_state(stored[p], copy)
            ok = ok and state == "same"
            brief = f"{copy['lines']} lines, sha256 {str(copy['sha256'])[:12]}" if copy else "-"
            rows.append([r.host, p, brief, state + outdated])
    return rows, ok


def sync(
    cfg: Config, hosts: list[Host], on_done: Callable[[HostResult], None] | None = None
) -> bool:
    """Nodes fetch their sourced linked files now (no restart). True when every host did."""
    select(cfg, None)

    def work(host: Host, conn: Connection) -> dict[str, Any]:
        return nodectl.call(cfg, host, conn, "shared", "--fetch", timeout=120)

    results = run_parallel(cfg, hosts, work, on_done=on_done)
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.host, "-", f"FAILED: {r.error}"])
            continue
        for f in r.data.get("fetched") or []:
            what = f["outcome"] + (f": {f['reason']}" if f.get("reason") else "")
            rows.append([r.host, f["path"], what])
    table(_title(cfg, "shared config fetched"), ["host", "linked file", "outcome"], rows)
    return all(r.ok for r in results)
