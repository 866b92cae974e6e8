"""deploy.yml: one schema, validated at load.

Each key is declared once, as a dataclass field made by `key()`: its type, default,
validator and doc live together, and the loader, the unknown-key message (which lists the
valid keys of that section) and the docs are derived from those declarations. Every
problem is one line naming the file and the key, raised as `ConfigError`.

The file is `$DEPLOY_CONFIG` if set, else the first deploy.yml found from the current
folder upwards, stopping at the repository root. A deploy.yml owned by another user or
writable by group or others is refused: its hooks are code that runs here and on every node.
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fabdeploy.basics.errors import ConfigError

ENV_VAR = "DEPLOY_CONFIG"
DEFAULT_NAME = "deploy.yml"

_REQUIRED: Any = object()


def key(
    kind: Callable[[Any], Any] | type | str,
    default: Any = None,
    *,
    required: bool = False,
    factory: Callable[[], Any] | None = None,
    optional_section: bool = False,
    doc: str = "",
) -> Any:
    """Declare one deploy.yml key: its validator (or section class), default and doc.

    A section (a dataclass kind) that is absent is built from its defaults, unless
    `optional_section`: then it is None (e.g. no `aws:` means no AWS at all).
    """
    meta = {"kind": kind, "required": required, "doc": doc, "optional_section": optional_section}
    if required:
        return field(metadata=meta)
    if dataclasses.is_dataclass(kind):
        if optional_section:
            return field(default=None, metadata=meta)
        return field(default_factory=kind, metadata=meta)  # type: ignore[arg-type]
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --- validators: each returns the clean value or raises TypeError("what it must be") ---

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError("a non-empty string")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _name(v: Any) -> str:
    v = _str(v)
    if not _NAME_RE.fullmatch(v):
        raise TypeError("a name of letters, digits, '.', '_' or '-'")
    return v


def is_name(v: Any) -> bool:
    return isinstance(v, str) and bool(_NAME_RE.fullmatch(v))


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _pos_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise TypeError("a whole number >= 1")
    return v


def _pos_num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise TypeError("a number > 0")
    return float(v)


def _abs_path(v: Any) -> str:
    v = _str(v)
    if not v.startswith("/") or ".." in v.split("/") or v.rstrip("/") == "":
        raise TypeError("an absolute path without '..' (e.g. /srv/app)")
    return posixpath.normpath(v)


_UNIT_SAFE = re.compile(r"/[A-Za-z0-9_./+-]*")


def _unit_path(v: Any) -> str:
    """An absolute path that goes into a systemd unit line as is: no spaces, '%' or newlines."""
    v = _abs_path(v)
    if not _UNIT_SAFE.fullmatch(v):
        raise TypeError(
            "an absolute path of letters, digits and _ . / + - only (it goes into a systemd unit)"
        )
    return v


def _opt_unit_path(v: Any) -> str | None:
    return None if v is None else _unit_path(v)


def _unit_name(v: Any) -> str | None:
    if v is None:
        return None
    v = _str(v)
    if not re.fullmatch(r"[A-Za-z0-9@_.:-]+", v):
        raise TypeError("a systemd unit name like app.service (letters, digits and @ _ . : - only)")
    return v


def _keep_releases(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        # The previous release is what a failed health check or a rollback goes back to.
        raise TypeError("a whole number >= 2 (current and the previous release are always kept)")
    return v


def _local_path(v: Any) -> str | None:
    """A path on the deploying machine; relative ones are resolved against deploy.yml's folder."""
    return None if v is None else _str(v)


def _rel_path(v: Any) -> str:
    v = _str(v)
    parts = v.split("/")
    if v.startswith("/") or ".." in parts or "" in parts or "." in parts:
        raise TypeError(
            "a plain relative path inside the release, without '..' (e.g. config/database.yml)"
        )
    return v


def _rel_paths(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise TypeError("a list of relative paths")
    return tuple(_rel_path(x) for x in v)


# --- linked files that name their source (SSM, Secrets Manager, S3) -------------------

SOURCE_KINDS = ("ssm", "secret", "s3")
_LINKED_KEYS = ("path", *SOURCE_KINDS)
_SOURCE_NAME_RE = re.compile(r"[A-Za-z0-9_.:/@+=-]+")


@dataclass(frozen=True)
class LinkedSource:
    """Where a linked file's content lives: an SSM parameter (SecureString, decrypted), a
    Secrets Manager secret, or an S3 object. Nodes fetch it into shared/<path> at boot and on
    hotfix; `fab deploy.config` shows, pushes and diffs it."""

    kind: str  # one of SOURCE_KINDS
    name: (
        str  # parameter name, secret id, or S3 key (a plain key is under s3.prefix until load ends)
    )
    bucket: str | None = None  # S3 only: None until load resolves it to s3.bucket

    def describe(self) -> str:
        if self.kind == "ssm":
            return f"ssm:{self.name}"
        if self.kind == "secret":
            return f"secretsmanager:{self.name}"
        return f"s3://{self.bucket}/{self.name}"

    def to_json(self) -> dict[str, str]:
        """How node.json names it (one key per kind, as deploy.yml does)."""
        if self.kind == "s3":
            return {"s3_bucket": self.bucket or "", "s3_key": self.name}
        return {self.kind: self.name}


class LinkedFiles(tuple[str, ...]):
    """linked_files: the relative paths (what every caller iterates), plus `sources`: path ->
    LinkedSource for the entries that name one."""

    sources: dict[str, LinkedSource]

    def __new__(
        cls, paths: Sequence[str] = (), sources: dict[str, LinkedSource] | None = None
    ) -> LinkedFiles:
        self = super().__new__(cls, tuple(paths))
        self.sources = dict(sources or {})
        return self

    def __eq__(self, other: object) -> bool:
        return tuple.__eq__(self, other) and self.sources == getattr(other, "sources", {})

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return f"LinkedFiles({tuple(self)!r}, sources={self.sources!r})"

    def resolved(self, bucket: str, prefix: str) -> LinkedFiles:
        """S3 sources given as a plain key live under the deploy bucket and prefix."""
        out = {}
        for path, src in self.sources.items():
            if src.kind == "s3" and src.bucket is None:
                src = LinkedSource("s3", f"{prefix}/{src.name}" if prefix else src.name, bucket)
            out[path] = src
        return LinkedFiles(self, out)


def _source_name(v: Any, kind: str) -> str:
    what = {"ssm": "an SSM parameter name", "secret": "a secret name or ARN"}.get(
        kind, "an S3 key under s3.prefix, or s3://bucket/key"
    )
    if not isinstance(v, str) or not v or not _SOURCE_NAME_RE.fullmatch(v):
        raise TypeError(
            f"entries whose {kind} is {what} (letters, digits and _ . : / @ + = - only)"
        )
    return v


def _linked_file(v: Any) -> tuple[str, LinkedSource | None]:
    if not isinstance(v, dict):
        return _rel_path(v), None
    unknown = sorted(str(k) for k in v if k not in _LINKED_KEYS)
    if unknown:
        raise TypeError(
            f"paths or {{path, ssm | secret | s3}} mappings; valid keys: {', '.join(_LINKED_KEYS)} "
            f"(unknown: {', '.join(unknown)})"
        )
    if "path" not in v:
        raise TypeError("mappings with a `path:` (e.g. {path: config/database.yml, ssm: /app/db})")
    kinds = [k for k in SOURCE_KINDS if k in v]
    if len(kinds) != 1:
        raise TypeError(
            f"mappings naming exactly one source, ssm, secret or s3 ({v.get('path')!r} names "
            f"{' and '.join(kinds) or 'none'})"
        )
    kind = kinds[0]
    name = _source_name(v[kind], kind)
    bucket = None
    if kind == "s3":
        if name.startswith("s3://"):
            bucket, _, name = name[5:].partition("/")
            if not bucket or not name:
                raise TypeError("entries whose s3 is s3://bucket/key with both parts, or a key")
        elif name.startswith("/") or ".." in name.split("/"):
            raise TypeError("entries whose s3 is a key under s3.prefix (no leading '/', no '..')")
    return _rel_path(v["path"]), LinkedSource(kind, name, bucket)


def _linked_files(v: Any) -> LinkedFiles:
    if v is None:
        return LinkedFiles()
    if not isinstance(v, list):
        raise TypeError("a list of relative paths or {path, ssm | secret | s3} mappings")
    paths: list[str] = []
    sources: dict[str, LinkedSource] = {}
    for item in v:
        path, src = _linked_file(item)
        if path in paths:
            raise TypeError(f"a list naming each path once ({path} is there twice)")
        paths.append(path)
        if src is not None:
            sources[path] = src
    return LinkedFiles(paths, sources)


def _commands(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise TypeError("a command or a list of commands")
    return tuple(_str(x) for x in v)


def _pattern(v: Any) -> str:
    v = _str(v).rstrip("/")
    if not v or v.startswith("/") or ".." in v.split("/"):
        raise TypeError("relative glob patterns without '..' (e.g. vendor, *.pyc, assets/*.map)")
    return v


def _patterns(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise TypeError("a list of relative glob patterns")
    return tuple(_pattern(x) for x in v)


def _env(v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise TypeError("a mapping of NAME: value")
    out = {}
    for k, val in v.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise TypeError(f"environment names like AWS_REGION (got {k!r})")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise TypeError(f"string values (got {type(val).__name__} for {k})")
        out[k] = str(val)
    return out


def _names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise TypeError("a list of names")
    return tuple(_str(x) for x in v)


def _role_names(v: Any) -> tuple[str, ...]:
    """A host's roles: one name or a list of names (a comma-separated string also works, as in a tag)."""
    if isinstance(v, str):
        v = [r.strip() for r in v.split(",") if r.strip()]
    if not isinstance(v, list):
        raise TypeError("a role name or a list of role names")
    try:
        return tuple(dict.fromkeys(_name(x) for x in v))
    except TypeError:
        raise TypeError("role names of letters, digits, '.', '_' or '-'") from None


def _tag_filters(v: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(v, dict) or not v:
        raise TypeError("a mapping of tag key -> value or list of values, e.g. {role: [web]}")
    out = {}
    for k, vals in v.items():
        vals = [vals] if isinstance(vals, str) else vals
        if not isinstance(k, str) or not k or not isinstance(vals, list) or not vals:
            raise TypeError(f"a mapping of tag key -> list of values (bad entry {k!r})")
        out[k] = tuple(_str(x) for x in vals)
    return out


def _address(v: Any) -> str:
    if v in ("private_ip", "public_ip", "public_dns", "private_dns") or (
        isinstance(v, str) and v.startswith("tag:") and len(v) > 4
    ):
        return v
    raise TypeError("private_ip, public_ip, public_dns, private_dns or tag:<Key> (e.g. tag:Name)")


def _percentages(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or any(
        isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= 100 for x in v
    ):
        raise TypeError("a list of whole percentages 1..100, ascending, e.g. [20, 50, 100]")
    if list(v) != sorted(set(v)):
        raise TypeError("a list of whole percentages 1..100, ascending, e.g. [20, 50, 100]")
    return tuple(v)


def _percent(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100:
        raise TypeError("a whole percentage 0..100")
    return v


def _seconds(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError("whole seconds >= 0")
    return v


# --- counts: a host count (2) or a percentage of a fleet ('25%') ---------------------


_COUNT_RE = re.compile(r"(\d+)(%?)")


def parse_count(v: Any, *, zero_ok: bool = False) -> str:
    """The one parser of "a count or a percentage": 2, '2', '25%'. Returns its canonical text."""
    s = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    m = _COUNT_RE.fullmatch(s) if isinstance(s, str) else None
    if not m or (int(m.group(1)) == 0 and not zero_ok) or (m.group(2) and int(m.group(1)) > 100):
        low = 0 if zero_ok else 1
        raise TypeError(f"a host count like 2 (>= {low}) or a percentage like '25%' (up to 100%)")
    return f"{int(m.group(1))}{m.group(2)}"


def count_of(spec: str, total: int) -> int:
    """How many hosts `spec` means out of `total`; percentages round up."""
    n = int(spec.rstrip("%"))
    return math.ceil(total * n / 100) if spec.endswith("%") else n


def _batch(v: Any) -> str:
    return parse_count(v)


def _min_healthy(v: Any) -> str:
    return parse_count(v, zero_ok=True)


def _run_on(v: Any) -> str:
    if v not in ("local", "node"):
        raise TypeError("local (the deploying machine) or node (the host itself)")
    return str(v)


def _wait(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise TypeError("a number of seconds >= 0")
    return float(v)


# --- the schema: one declaration per key ---------------------------------------------


@dataclass(frozen=True)
class S3Config:
    bucket: str = key(
        _str, required=True, doc="bucket holding bundles, the pointer, locks and history"
    )
    prefix: str = key(_opt_str, doc="key prefix (default: the app name)")
    region: str | None = key(_opt_str)
    endpoint_url: str | None = key(_opt_str, doc="an S3-compatible endpoint instead of AWS")
    profile: str | None = key(_opt_str, doc="AWS profile of the deploying machine")


@dataclass(frozen=True)
class SSHConfig:
    user: str | None = key(_opt_str, doc="login user (default: ssh_config, then the local user)")
    config: Path | None = key(_local_path, doc="ssh_config file (default: Fabric's usual lookup)")
    known_hosts: Path | None = key(_local_path, "~/.ssh/known_hosts", doc="read, never written")
    strict_host_keys: bool = key(_bool, True, doc="false: no host key checking at all")
    connect_timeout: float = key(_pos_num, 10.0)
    command_timeout: float = key(_pos_num, 600.0)
    keepalive: int = key(_pos_int, 15)
    identity_file: Path | None = key(_local_path)
    sudo: bool = key(
        _bool,
        False,
        doc="restart and reboot run through sudo (NOPASSWD, or fab "
        "--prompt-for-sudo-password); releases belong to user, at boot too",
    )
    admin_user: str | None = key(
        _opt_str,
        doc="login deploy.setup uses for what needs root (root, or a "
        "user with full sudo); default: user",
    )
    # Not a key: more identities, from `fab -i` (which may be given several times).
    identity_files: tuple[Path, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Host:
    name: str
    host: str  # what we hand to ssh (an alias resolved through ssh_config)
    roles: tuple[str, ...] = ()
    instance_id: str | None = None  # set for hosts discovered from AWS (adapters/aws.py)
    az: str | None = None


@dataclass(frozen=True)
class HostSpec:
    host: str | None = key(_opt_str, doc="address or ssh_config alias (default: the name)")
    roles: tuple[str, ...] = key(
        "role_names", factory=tuple, doc="the host's roles (a name or a list), e.g. [web]"
    )


HEALTH_ON = ("node", "controller")


def _health_on(v: Any) -> str:
    if v not in HEALTH_ON:
        raise TypeError(
            "node (the node checks itself, over its own address) or controller (an HTTP "
            "request from the deploying machine)"
        )
    return v


@dataclass(frozen=True)
class HealthConfig:
    url: str | None = key(
        _opt_str,
        doc="checked after each change; {host} is the host's address (on: node, the "
        "address its sshd was reached on, else 127.0.0.1)",
    )
    command: str | None = key(
        _opt_str,
        doc="on: node only: a shell command run in the current release, healthy when it exits 0",
    )
    on: str = key(
        _health_on,
        "node",
        doc="where the check runs: node (in the same SSH command, works behind a "
        "bastion) or controller",
    )
    timeout: float = key(_pos_num, 120.0)
    interval: float = key(_pos_num, 0.2)
    expect_status: int = key(_pos_int, 200)


def _opt(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`check`, or None when the key is left out (a role's overrides inherit the top-level value)."""

    def opt(v: Any) -> Any:
        return None if v is None else check(v)

    return opt


@dataclass(frozen=True)
class RoleHealthConfig:
    """A role's health check. Setting url or command replaces the top-level check (the other is
    then unset); whatever a role leaves out comes from the top-level health:."""

    url: str | None = key(
        _opt_str, doc="an HTTP check for this role's hosts ({host} as in health.url)"
    )
    command: str | None = key(
        _opt_str, doc="a command check for this role's hosts (exit 0: healthy)"
    )
    on: str | None = key(_opt(_health_on))
    timeout: float | None = key(_opt(_pos_num))
    interval: float | None = key(_opt(_pos_num))
    expect_status: int | None = key(_opt(_pos_int))


@dataclass(frozen=True)
class RoleConfig:
    """What a role changes for its hosts; anything left out is the top-level value."""

    restart: str | None = key(_opt_str, doc="this role's restart command (default: restart)")
    reboot: str | None = key(_opt_str, doc="this role's reboot command (default: reboot)")
    health: RoleHealthConfig = key(RoleHealthConfig)


@dataclass(frozen=True)
class SigningConfig:
    allowed_signers: Path | None = key(
        _local_path,
        doc="trusted signers (ssh-keygen ALLOWED SIGNERS format): "
        "installed on every node by deploy.setup",
    )
    allow_unsigned: bool = key(
        _bool,
        False,
        doc="upgrade path: nodes accept an unsigned pointer until they have accepted a signed one",
    )
    # Last: the field named `key` shadows key() in this class body.
    key: Path | None = key(
        _local_path,
        doc="the deployer's SSH key that signs bundles and pointers "
        "(a private key, or its .pub with the key in ssh-agent)",
    )


@dataclass(frozen=True)
class Hook:
    """One node hook: a command, or a mapping {run, boot, roles, timeout}."""

    run: str
    boot: bool = True  # false: not when a node activates at boot (hotfix only)
    roles: tuple[str, ...] = ()  # only on hosts with one of these roles (empty: every host)
    timeout: float | None = None  # seconds; then the hook's process group is killed

    def to_json(self) -> str | dict[str, Any]:
        if self.boot and not self.roles and self.timeout is None:
            return self.run  # node.json as before options existed: no reinstall for it
        return {
            "run": self.run,
            "boot": self.boot,
            "roles": list(self.roles),
            "timeout": self.timeout,
        }


_HOOK_KEYS = ("run", "boot", "roles", "timeout")


def _hook(v: Any) -> Hook:
    if isinstance(v, str):
        return Hook(_str(v))
    if not isinstance(v, dict):
        raise TypeError("a list of commands or of {run, boot, roles, timeout} mappings")
    unknown = sorted(str(k) for k in v if k not in _HOOK_KEYS)
    if unknown:
        raise TypeError(
            f"hooks with keys {', '.join(_HOOK_KEYS)} only (unknown: {', '.join(unknown)})"
        )
    if "run" not in v:
        raise TypeError("hooks with a `run:` command")
    return Hook(
        run=_str(v["run"]),
        boot=_bool(v.get("boot", True)),
        roles=_commands(v.get("roles")),
        timeout=None if v.get("timeout") is None else _pos_num(v["timeout"]),
    )


def _hooks(v: Any) -> tuple[Hook, ...]:
    if v is None:
        return ()
    if isinstance(v, (str, dict)):
        v = [v]
    if not isinstance(v, list):
        raise TypeError("a list of commands or of {run, boot, roles, timeout} mappings")
    return tuple(_hook(x) for x in v)


_ONCE_KEYS = ("run", "roles", "timeout")


def _once_hook(v: Any) -> Hook:
    if isinstance(v, dict) and "boot" in v:
        raise TypeError("run-once hooks never run at boot: remove `boot:`")
    if isinstance(v, dict):
        unknown = sorted(str(k) for k in v if k not in _ONCE_KEYS)
        if unknown:
            raise TypeError(
                f"run-once hooks with keys {', '.join(_ONCE_KEYS)} only (unknown: {', '.join(unknown)})"
            )
    return replace(_hook(v), boot=False)


def _once_hooks(v: Any) -> tuple[Hook, ...]:
    if v is None:
        return ()
    if isinstance(v, (str, dict)):
        v = [v]
    if not isinstance(v, list):
        raise TypeError("a list of commands or of {run, roles, timeout} mappings")
    return tuple(_once_hook(x) for x in v)


def _local_hook(v: Any) -> Hook:
    if isinstance(v, dict) and any(k in v for k in ("boot", "roles")):
        raise TypeError("local hooks with keys run, timeout only (they run here, not on hosts)")
    return _hook(v)


def _local_hooks(v: Any) -> tuple[Hook, ...]:
    if v is None:
        return ()
    if isinstance(v, (str, dict)):
        v = [v]
    if not isinstance(v, list):
        raise TypeError("a list of commands or of {run, timeout} mappings")
    return tuple(_local_hook(x) for x in v)


@dataclass(frozen=True)
class HooksConfig:
    """Node hooks (before_swap, after_swap, after_restart) run on the nodes, in the release, with
    RELEASE_PATH, PREVIOUS_RELEASE, REVISION, ROLE and DEPLOY_TO set and no deploy credentials;
    each one is a command or a mapping {run, boot: false (not at boot), roles: [...], timeout}.
    Local hooks (before_bundle, after_deploy, after_failure) run on the deploying machine; each
    one is a command or {run, timeout}."""

    before_swap: tuple[Hook, ...] = key(
        _hooks,
        factory=tuple,
        doc=("in the new release before `current` moves; a failure removes the release"),
    )
    after_swap: tuple[Hook, ...] = key(
        _hooks,
        factory=tuple,
        doc=("after `current` moved, before the restart; a failure puts the previous release back"),
    )
    after_restart: tuple[Hook, ...] = key(
        _hooks,
        factory=tuple,
        doc=(
            "after the node restarted the app (hotfix, rollback; at boot the app starts after us); "
            "a failure puts the previous release back"
        ),
    )
    once: tuple[Hook, ...] = key(
        _once_hooks,
        factory=tuple,
        doc=(
            "run-once (migrations): on ONE host (the first selected host with the hook's roles), "
            "in the new release before any host swaps, under the fleet lock; never at boot nor "
            "on rollback; once per bundle. A failure stops the deploy before any host changes"
        ),
    )
    # Local hooks: on the deploying machine, never on the hosts (not in node.json).
    before_bundle: tuple[Hook, ...] = key(
        _local_hooks,
        factory=tuple,
        doc=(
            "here, in the clean export of the commit, before the build, whenever a bundle is built; "
            "a failure stops the bundle (nothing is uploaded)"
        ),
    )
    after_deploy: tuple[Hook, ...] = key(
        _local_hooks,
        factory=tuple,
        doc="here, in the repo, after a successful roll, hotfix or rollback; a failure only warns",
    )
    after_failure: tuple[Hook, ...] = key(
        _local_hooks,
        factory=tuple,
        doc="here, in the repo, after a failed roll, hotfix or rollback; a failure only warns",
    )


@dataclass(frozen=True)
class BuildConfig:
    """The build recipe: part of the bundle's identity (adapters/bundle.py: bundle_id)."""

    commands: tuple[str, ...] = key(
        _commands,
        factory=tuple,
        doc=(
            "run in turn with `sh -c` on the deploying machine, in a clean export of the commit "
            "(never the working tree); their result is what ships"
        ),
    )
    include: tuple[str, ...] = key(
        _patterns,
        factory=tuple,
        doc=(
            "only paths matching one of these globs are packed (default: everything); a matching "
            "directory brings all it holds"
        ),
    )
    exclude: tuple[str, ...] = key(
        _patterns,
        factory=tuple,
        doc=(
            "paths matching one of these globs are not packed (a pattern without '/' matches a "
            "name at any depth)"
        ),
    )
    tmpdir: Path | None = key(
        _local_path,
        doc=(
            "where the clean export and the build run (default: $TMPDIR, else /tmp); a tmpfs such as "
            "/dev/shm makes the export much faster on slow disks. Not part of the recipe"
        ),
    )

    @property
    def recipe(self) -> dict[str, list[str]] | None:
        """None when there is no build recipe at all: the bundle is then `git archive` as is."""
        if not (self.commands or self.include or self.exclude):
            return None
        return {
            "commands": list(self.commands),
            "include": list(self.include),
            "exclude": list(self.exclude),
        }


@dataclass(frozen=True)
class NodeConfig:
    python: str = key(_unit_path, "/usr/bin/python3")
    app_unit: str | None = key(_unit_name, doc="systemd unit the boot unit starts before")
    install_dir: str | None = key(_opt_unit_path, doc="default: /usr/local/lib/fabdeploy/<app>")
    boot_attempts: int = key(_pos_int, 5)
    first_boot_attempts: int = key(_pos_int, 30)
    boot_backoff: float = key(_pos_num, 1.0)
    boot_max_seconds: float = key(_pos_num, 900.0)
    download_timeout: float = key(_pos_num, 60.0)
    max_files: int = key(_pos_int, 200_000)
    lock_timeout: float = key(
        _pos_num, 120.0, doc="seconds a node run waits for the host's deploy lock"
    )
    link_unchanged: bool = key(
        _bool,
        True,
        doc="hardlink files unchanged since the previous release "
        "(shared inodes: hooks and the app must not modify release files in place)",
    )


@dataclass(frozen=True)
class ConfigSourcesConfig:
    """Where linked files' ssm/secret sources live, for nodes (in node.json: old boto3 on a node
    ignores AWS_ENDPOINT_URL) and for `fab deploy.config`. S3 sources use the s3: settings."""

    region: str | None = key(
        _opt_str, doc="region of the parameters and secrets (default: s3.region)"
    )
    ssm_endpoint_url: str | None = key(_opt_str, doc="an SSM endpoint instead of AWS's")
    secretsmanager_endpoint_url: str | None = key(
        _opt_str, doc="a Secrets Manager endpoint instead of AWS's"
    )
    profile: str | None = key(
        _opt_str, doc="AWS profile of the deploying machine for deploy.config (default: s3.profile)"
    )


@dataclass(frozen=True)
class RollConfig:
    batch: str = key(_batch, "1", doc="hosts rebooted at once: a count or a percentage")
    reboot_timeout: float = key(_pos_num, 300.0)
    role_order: tuple[str, ...] = key(
        _names,
        factory=tuple,
        doc="roles rolled one after another, in this "
        "order (e.g. [worker, web]); hosts of other roles come last",
    )
    boot_timeout: float = key(_pos_num, 300.0)
    lock_expiry: float = key(_pos_num, 3600.0)


@dataclass(frozen=True)
class TrafficConfig:
    drain: str | None = key(
        _opt_str, doc="takes {host} ({address}) out of the load balancer; returns once drained"
    )
    restore: str | None = key(_opt_str, doc="puts {host} ({address}) back into the load balancer")
    run_on: str = key(_run_on, "local", doc="where drain/restore run: local or node")
    wait: float = key(_wait, 0.0, doc="seconds to wait after drain, for balancers that cannot say")

    @property
    def enabled(self) -> bool:
        return bool(self.drain or self.restore)


@dataclass(frozen=True)
class InstanceRefreshConfig:
    min_healthy_percentage: int = key(_percent, 90)
    instance_warmup: int | None = key(_seconds)
    checkpoint_percentages: tuple[int, ...] = key(_percentages, factory=tuple)
    checkpoint_delay: int | None = key(_seconds)


@dataclass(frozen=True)
class AWSConfig:
    region: str | None = key(_opt_str)
    endpoint_url: str | None = key(_opt_str)
    profile: str | None = key(_opt_str)
    autoscaling_groups: tuple[str, ...] = key(_names, factory=tuple)
    tag_filters: dict[str, tuple[str, ...]] = key(_tag_filters, factory=dict)
    address: str = key(_address, "private_ip")
    role_tag: str | None = key(
        _opt_str,
        doc="instance tag naming a discovered host's roles (comma-separated, e.g. Role: worker)",
    )
    target_groups: tuple[str, ...] = key(_names, factory=tuple)
    classic_elbs: tuple[str, ...] = key(_names, factory=tuple)
    standby: bool = key(_bool, False)
    min_healthy: str | None = key(_min_healthy)
    healthy_timeout: float = key(_pos_num, 300.0)
    instance_refresh: InstanceRefreshConfig = key(InstanceRefreshConfig)

    @property
    def discovers(self) -> bool:
        return bool(self.autoscaling_groups or self.tag_filters)


NOTIFY_EVENTS = ("start", "success", "failure")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Webhook:
    """A URL that gets a JSON post for `events`. `${NAME}` in it is read from the deploying
    machine's environment when a post is sent (a Slack URL is a secret: keep it out of git)."""

    url: str
    events: tuple[str, ...] = NOTIFY_EVENTS


def _webhook_url(v: Any) -> str:
    v = _str(v)
    if not (v.startswith(("http://", "https://", "${")) and " " not in v):
        raise TypeError("http(s):// URLs (or ${ENV_VAR} naming one)")
    return v


def _webhook(v: Any) -> Webhook:
    if isinstance(v, str):
        return Webhook(_webhook_url(v))
    if not isinstance(v, dict) or "url" not in v:
        raise TypeError("a list of URLs or of {url, events} mappings")
    unknown = sorted(str(k) for k in v if k not in ("url", "events"))
    if unknown:
        raise TypeError(f"webhooks with keys url, events only (unknown: {', '.join(unknown)})")
    events = _commands(v.get("events")) or NOTIFY_EVENTS
    bad = [e for e in events if e not in NOTIFY_EVENTS]
    if bad:
        raise TypeError(f"events among {', '.join(NOTIFY_EVENTS)} (not {', '.join(bad)})")
    return Webhook(_webhook_url(v["url"]), tuple(events))


def _webhooks(v: Any) -> tuple[Webhook, ...]:
    if v is None:
        return ()
    if isinstance(v, (str, dict)):
        v = [v]
    if not isinstance(v, list):
        raise TypeError("a list of URLs or of {url, events} mappings")
    return tuple(_webhook(x) for x in v)


@dataclass(frozen=True)
class NotifyConfig:
    """Slack-compatible JSON posts on the start, success and failure of roll, hotfix and
    rollback; sent in the background, never failing or slowing the deploy."""

    webhooks: tuple[Webhook, ...] = key(
        _webhooks,
        factory=tuple,
        doc="URLs (or {url, events: [start, success, failure]}); ${NAME} reads the environment",
    )
    timeout: float = key(
        _pos_num,
        5.0,
        doc="seconds per attempt (one retry); at the end the deploy waits at most this long for "
        "posts still in flight",
    )


@dataclass(frozen=True)
class Config:
    path: Path  # where it was loaded from: not a key
    app: str = key(
        _name, required=True, doc="the app's name: default S3 prefix, unit and install dir"
    )
    repo: Path = key(_local_path, required=True, doc="the app's git repository")
    s3: S3Config = key(S3Config, required=True)
    deploy_to: str = key(_abs_path, required=True, doc="Capistrano's deploy_to on the hosts")
    # Required unless aws.autoscaling_groups / aws.tag_filters name the fleet.
    hosts: tuple[Host, ...] = key("hosts", factory=tuple)
    ref: str = key(_str, "HEAD")
    keep_releases: int = key(_keep_releases, 5)
    linked_files: LinkedFiles = key(
        _linked_files,
        factory=LinkedFiles,
        doc="files in shared/ linked into each release: a path, or {path, ssm | secret | s3} "
        "to have nodes fetch it (at boot and on hotfix)",
    )
    linked_dirs: tuple[str, ...] = key(_rel_paths, factory=tuple)
    config_sources: ConfigSourcesConfig = key(
        ConfigSourcesConfig, doc="region/endpoints of linked files' ssm and secret sources"
    )
    build: BuildConfig = key(
        BuildConfig, doc="build once on the deploying machine, ship the result"
    )
    ssh: SSHConfig = key(SSHConfig)
    parallel: int = key(_pos_int, 10, doc="SSH sessions at once")
    restart: str | None = key(_opt_str, doc="command that restarts the app")
    reboot: str = key(
        _str,
        "sudo systemctl reboot",
        doc="with ssh.sudo: run through sudo (a leading sudo is dropped)",
    )
    health: HealthConfig = key(HealthConfig)
    roles: dict[str, RoleConfig] = key(
        "roles",
        factory=dict,
        doc="role name -> its restart, reboot and health "
        "(hosts.X.roles and aws.role_tag name a host's roles)",
    )
    hooks: HooksConfig = key(HooksConfig)
    notify: NotifyConfig = key(NotifyConfig, doc="webhooks told about each roll, hotfix, rollback")
    signing: SigningConfig = key(SigningConfig, doc="signed releases (see README: Trust)")
    node: NodeConfig = key(NodeConfig)
    node_env: dict[str, str] = key(
        _env, factory=dict, doc="environment of the node program (not of hooks)"
    )
    roll: RollConfig = key(RollConfig)
    traffic: TrafficConfig = key(
        TrafficConfig, doc="drain/restore commands around each hotfix/rollback restart"
    )
    min_healthy: str | None = key(
        _min_healthy,
        doc="hosts (count or %) that must stay up while hotfix, rollback "
        "and roll change the fleet in batches (aws.min_healthy wins on AWS fleets)",
    )
    aws: AWSConfig | None = key(
        AWSConfig, optional_section=True, doc="discovery, load balancers, standby"
    )
    # Not keys: the dotted keys deploy.yml set explicitly (so Fabric's config files can fill the
    # others), and the task's Fabric config (-i, -S, prompts, ~/.fabric.yaml, FABRIC_* env).
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    fabric: Any = field(default=None, compare=False, repr=False)
    # Not a key: the stage chosen from `stages:` (None when deploy.yml defines none).
    stage: str | None = None
    stages: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def node_dir(self) -> str:
        return self.node.install_dir or f"/usr/local/lib/fabdeploy/{self.app}"

    @property
    def run_as(self) -> str | None:
        """The non-root user owning releases and running the node program (None: root)."""
        return self.ssh.user if self.ssh.user and self.ssh.user != "root" else None

    @property
    def boot_unit(self) -> str:
        return f"fabdeploy-{self.app}.service"

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ConfigError(
            f"unknown host {name!r} (not in hosts of {self.path}); known hosts: "
            + ", ".join(h.name for h in self.hosts)
        )


def linked_sources(cfg: Config) -> dict[str, LinkedSource]:
    """The linked files that name a source, by path (a plain tuple of paths names none)."""
    return dict(getattr(cfg.linked_files, "sources", {}))


def keys(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The deploy.yml keys a section class declares, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if "kind" in f.metadata}


def leaf_keys(cls: type = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Every scalar/list key of deploy.yml as a dotted path (ssh.user, roll.batch, ...)."""
    out: list[str] = []
    for name, f in keys(cls or Config).items():
        kind = f.metadata["kind"]
        if dataclasses.is_dataclass(kind):
            out += leaf_keys(kind, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            out.append(prefix + name)
    return out


def _as_is(k: str) -> str:
    return k


def _section(
    cls: type,
    data: Any,
    where: str,
    p: Path,
    base: Path,
    given: set[str] | None = None,
    shown: Callable[[str], str] = _as_is,
) -> Any:
    """Validate one section; `shown` names a dotted key in messages (a stage's overrides: stages.X.key)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: {shown(where.rstrip('.')) if where else 'the file'} must be a mapping of keys"
        )
    fields = keys(cls)
    if True in data and "on" in fields and "on" not in data:
        # YAML 1.1 (PyYAML) reads an unquoted `on:` key as the boolean true.
        data = {("on" if k is True else k): v for k, v in data.items()}
    for k in data:
        if k not in fields:
            raise ConfigError(
                f"{p}: unknown key {shown(where + str(k))!r}; valid keys here: {', '.join(sorted(fields))}"
            )
    out: dict[str, Any] = {}
    for name, f in fields.items():
        full = where + name
        kind = f.metadata["kind"]
        if name not in data or (data[name] is None and f.metadata["required"]):
            if f.metadata["required"]:
                raise ConfigError(f"{p}: missing required key {full!r}")
            if dataclasses.is_dataclass(kind) and not f.metadata["optional_section"]:
                out[name] = _section(kind, {}, full + ".", p, base, shown=shown)  # type: ignore[arg-type]
            elif kind is _local_path and f.default not in (None, dataclasses.MISSING):
                out[name] = _resolve_local(f.default, base)
            continue
        value = data[name]
        if given is not None:
            given.add(full)
        if dataclasses.is_dataclass(kind):
            out[name] = _section(kind, value, full + ".", p, base, given, shown)  # type: ignore[arg-type]
        elif kind == "hosts":
            out[name] = _hosts(value, full, p, base, shown)
        elif kind == "role_names":
            try:
                out[name] = _role_names(value)
            except TypeError as e:
                raise ConfigError(f"{p}: {shown(full)} must be {e} (got {value!r})") from None
        elif kind == "roles":
            out[name] = _roles(value, full, p, base, shown)
        else:
            try:
                out[name] = kind(value)
            except TypeError as e:
                raise ConfigError(f"{p}: {shown(full)} must be {e} (got {value!r})") from None
            if kind is _local_path:
                out[name] = _resolve_local(out[name], base)
    return cls(**out) if cls is not Config else out


def _resolve_local(s: str | None, base: Path) -> Path | None:
    if s is None:
        return None
    q = Path(os.path.expanduser(s))
    return q if q.is_absolute() else base / q


def _hosts(
    value: Any, where: str, p: Path, base: Path, shown: Callable[[str], str] = _as_is
) -> tuple[Host, ...]:
    hosts: list[Host] = []
    where = shown(where)
    if isinstance(value, list):
        for item in value:
            try:
                name = _name(item)
            except TypeError as e:
                raise ConfigError(
                    f"{p}: every entry of {where} must be {e} (got {item!r})"
                ) from None
            hosts.append(Host(name=name, host=name))
    elif isinstance(value, dict):
        for name, spec in value.items():
            try:
                _name(name)
            except TypeError as e:
                raise ConfigError(
                    f"{p}: host names in {where} must be {e} (got {name!r})"
                ) from None
            body = _section(HostSpec, spec, f"{where}.{name}.", p, base)  # `where` is already shown
            hosts.append(Host(name=name, host=body.host or name, roles=body.roles))
    else:
        raise ConfigError(
            f"{p}: {where} must be a list of ssh names or a mapping name -> {{host, roles}}"
        )
    if not hosts:
        raise ConfigError(f"{p}: {where} is empty; name at least one host")
    names = [h.name for h in hosts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{p}: {where} names {', '.join(dupes)} more than once")
    return tuple(hosts)


def _roles(
    value: Any, where: str, p: Path, base: Path, shown: Callable[[str], str] = _as_is
) -> dict[str, RoleConfig]:
    if not isinstance(value, dict):
        raise ConfigError(
            f"{p}: {shown(where)} must be a mapping of role name -> {{restart, reboot, health}}"
        )
    out: dict[str, RoleConfig] = {}
    for name, spec in value.items():
        try:
            _name(name)
        except TypeError as e:
            raise ConfigError(
                f"{p}: role names in {shown(where)} must be {e} (got {name!r})"
            ) from None
        out[name] = _section(RoleConfig, spec, f"{where}.{name}.", p, base, shown=shown)
    return out


def for_host(cfg: Config, host: Host) -> Config:
    """`cfg` as `host` sees it: its roles' restart, reboot and health over the top-level ones.

    A host with several roles takes each key from the first of its roles that sets it.
    """
    over = [cfg.roles[r] for r in host.roles if r in cfg.roles]
    if not over:
        return cfg

    def first(get: Callable[[RoleConfig], Any], default: Any) -> Any:
        return next((get(o) for o in over if get(o) is not None), default)

    check = next((o.health for o in over if o.health.url or o.health.command), None)
    top = cfg.health
    health = HealthConfig(
        url=check.url if check else top.url,
        command=check.command if check else top.command,
        on=first(lambda o: o.health.on, top.on),
        timeout=first(lambda o: o.health.timeout, top.timeout),
        interval=first(lambda o: o.health.interval, top.interval),
        expect_status=first(lambda o: o.health.expect_status, top.expect_status),
    )
    return dataclasses.replace(
        cfg,
        restart=first(lambda o: o.restart, cfg.restart),
        reboot=first(lambda o: o.reboot, cfg.reboot),
        health=health,
    )


def known_roles_of(v: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = dict.fromkeys(v.get("roles", {}))
    for h in v.get("hosts", ()):
        seen.update(dict.fromkeys(h.roles))
    return list(seen)


def known_roles(cfg: Config, hosts: Sequence[Host] = ()) -> list[str]:
    """Every role deploy.yml (roles:, hosts.X.roles) or the given hosts name, in first-seen order."""
    seen: dict[str, None] = dict.fromkeys(cfg.roles)
    for h in (*cfg.hosts, *hosts):
        seen.update(dict.fromkeys(h.roles))
    return list(seen)


# --- finding and loading the file ------------------------------------------------------


def find_config_path(
    explicit: str | os.PathLike[str] | None = None, start: Path | None = None
) -> Path:
    """$DEPLOY_CONFIG, else deploy.yml in `start` (the current folder) or a parent, up to the repo root."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        candidate = d / DEFAULT_NAME
        if candidate.is_file():
            return candidate
        if (d / ".git").exists():
            break  # the repository root: a deploy.yml above it belongs to something else
    return here / DEFAULT_NAME


def check_trusted(p: Path) -> None:
    """Refuse a deploy.yml another user could have written: its hooks run as us (CVE-2022-24765)."""
    try:
        st = p.stat()
    except OSError:
        return
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{p}: owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); its hooks would run as you. "
            f"If you trust it, take it over (chown) or point {ENV_VAR} at your own copy"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{p}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); its hooks are code. "
            f"Fix with: chmod go-w {p}"
        )


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    start: Path | None = None,
    stage: str | None = None,
) -> Config:
    """Read, validate and resolve deploy.yml (or $DEPLOY_CONFIG), for `stage` if it defines stages."""
    import yaml  # lazy: `fab --list` should not pay for it

    p = find_config_path(path, start)
    try:
        text = p.read_text()
    except FileNotFoundError:
        hint = (
            f" (set {ENV_VAR}, or run from the repository holding deploy.yml or a folder below it)"
            if not path
            else ""
        )
        raise ConfigError(f"{p}: config file not found{hint}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    check_trusted(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty; see README.md for an example deploy.yml")
    return build(data, p, stage)


def build(data: Any, p: Path, stage: str | None = None) -> Config:
    """Validate parsed deploy.yml data; with `stages:`, every stage is checked and `stage` returned."""
    if not isinstance(data, dict) or "stages" not in data:
        if stage is not None:
            raise ConfigError(
                f"{p}: no stages are defined, so there is no stage {stage!r}; "
                "drop it, or add a `stages:` section"
            )
        return _build(data, p)
    base = {k: v for k, v in data.items() if k != "stages"}
    stages = _stages(data["stages"], p)
    built = {
        name: _build(
            deep_merge(base, over, replace=("hosts",)),
            p,
            name,
            tuple(stages),
            _overridden(over, name),
        )
        for name, over in stages.items()
    }
    seen: dict[tuple[str, str], str] = {}
    for name, cfg in built.items():
        where = (cfg.s3.bucket, cfg.s3.prefix)
        if where in seen:
            raise ConfigError(
                f"{p}: stages {seen[where]} and {name} both use s3://{where[0]}/{where[1]} (one pointer, "
                "lock and history for both); give each stage its own s3.prefix or s3.bucket"
            )
        seen[where] = name
    if stage is None:
        raise ConfigError(
            f"{p}: deploy.yml defines stages; name one before the task, e.g. "
            f"`fab {next(iter(stages))} deploy.status` (stages: {', '.join(stages)})"
        )
    if stage not in built:
        raise ConfigError(f"{p}: unknown stage {stage!r}; stages: {', '.join(stages)}")
    return built[stage]


def _stages(raw: Any, p: Path) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{p}: stages must be a mapping of stage name -> overrides of top-level keys, "
            "e.g. {staging: {hosts: [web9]}, production: {}}"
        )
    out = {}
    for name, over in raw.items():
        try:
            _name(name)
        except TypeError as e:
            raise ConfigError(f"{p}: stage names in stages must be {e} (got {name!r})") from None
        if over is not None and not isinstance(over, dict):
            raise ConfigError(
                f"{p}: stages.{name} must be a mapping of top-level keys to override (or empty)"
            )
        out[name] = over or {}
    return out


def deep_merge(
    base: dict[str, Any], over: dict[str, Any], replace: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, anything else (lists too) replaces.

    Top-level keys named in `replace` always replace: a stage's `hosts` mapping is its fleet,
    never added to the shared one.
    """
    out = dict(base)
    for k, v in over.items():
        if k not in replace and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _overridden(over: dict[str, Any], stage: str) -> Callable[[str], str]:
    """How messages name a key: stages.<stage>.<key> when that stage's overrides set it."""
    paths: set[str] = set()

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            paths.add(prefix + str(k))
            if isinstance(v, dict) and prefix + str(k) != "hosts":
                walk(v, prefix + str(k) + ".")

    walk(over, "")

    def shown(full: str) -> str:
        head = full
        while head:
            if head in paths:
                return f"stages.{stage}.{full}"
            head = head.rpartition(".")[0]
        return full

    return shown


def _build(
    data: Any,
    p: Path,
    stage: str | None = None,
    stages: tuple[str, ...] = (),
    shown: Callable[[str], str] = _as_is,
) -> Config:
    given: set[str] = set()
    v = _section(Config, data, "", p, p.resolve().parent, given, shown)
    aws: AWSConfig | None = v.get("aws")
    for_stage = f" (for stage {stage})" if stage else ""
    if "hosts" not in v and not (aws and aws.discovers):
        raise ConfigError(
            f"{p}: missing required key 'hosts'{for_stage} (or name the fleet with "
            "aws.autoscaling_groups / aws.tag_filters)"
        )
    if v["health"].command and v["health"].on != "node":
        raise ConfigError(
            f"{p}: {shown('health.command')} runs on the node, so it needs health.on: node{for_stage} "
            "(or drop it and check health.url from here)"
        )
    for role, rc in v.get("roles", {}).items():
        on = rc.health.on or v["health"].on
        command = rc.health.command if (rc.health.url or rc.health.command) else v["health"].command
        if command and on != "node":
            raise ConfigError(
                f"{p}: the health command of role {role} runs on the node, so it needs health.on: "
                f"node{for_stage} (set roles.{role}.health.on: node, or check a url instead)"
            )
    order = v["roll"].role_order
    unknown = [
        r
        for r in order
        if r not in v.get("roles", {}) and not any(r in h.roles for h in v.get("hosts", ()))
    ]
    if unknown and not (aws and aws.role_tag):
        raise ConfigError(
            f"{p}: {shown('roll.role_order')} names unknown role(s) {', '.join(unknown)}; known roles: "
            + (", ".join(known_roles_of(v)) or "none (give hosts roles: or add a roles: section)")
        )
    s3: S3Config = v["s3"]
    # With stages, each has its own pointer, lock and history: the default prefix is app/stage.
    default_prefix = f"{v['app']}/{stage}" if stage else v["app"]
    v["s3"] = dataclasses.replace(s3, prefix=(s3.prefix or default_prefix).strip("/"))
    if "linked_files" in v:  # S3 sources given as a plain key: under the (stage's) prefix
        v["linked_files"] = v["linked_files"].resolved(s3.bucket, v["s3"].prefix)
    sign = v.get("signing")
    if sign is not None and sign.key is not None and sign.allowed_signers is None:
        raise ConfigError(
            f"{p}: signing.key is set but signing.allowed_signers is not: list the trusted "
            "signers (your key among them) so deploys can verify what they publish"
        )
    _check_sudo(v, given, p, shown)
    return Config(path=p, given=frozenset(given), stage=stage, stages=stages, **v)


def privileged_command(command: str) -> str:
    """A restart/reboot command as sudo runs it: without a leading `sudo` of its own."""
    words = command.split()
    while words and words[0] in ("sudo", "/usr/bin/sudo"):
        words.pop(0)
    return " ".join(words)


_SUDOERS_SAFE = re.compile(r"/[A-Za-z0-9_./+-]+( [A-Za-z0-9_./+@-]+)*")


def _check_sudo(v: dict[str, Any], given: set[str], p: Path, shown: Callable[[str], str]) -> None:
    """With ssh.sudo, restart and reboot are exact sudoers commands: full paths, plain words."""
    ssh: SSHConfig = v["ssh"]
    if not ssh.sudo:
        return
    if not ssh.user or ssh.user == "root":
        raise ConfigError(
            f"{p}: {shown('ssh.sudo')} needs ssh.user set to the deploy user (e.g. deploy), not "
            f"{ssh.user or 'unset'}: releases and the boot unit run as that user"
        )
    if "reboot" not in given:
        v["reboot"] = "/usr/bin/systemctl reboot"

    def exact(name: str, value: str) -> str:
        cmd = privileged_command(value)
        if not _SUDOERS_SAFE.fullmatch(cmd):
            raise ConfigError(
                f"{p}: with ssh.sudo, {shown(name)} must be one command with its full path and plain words "
                f"(e.g. /usr/bin/systemctl {'reboot' if name.endswith('reboot') else 'restart app'}), got {value!r}: "
                "the sudoers drop-in names it exactly"
            )
        return cmd

    for name in ("restart", "reboot"):
        if v.get(name) is not None:
            v[name] = exact(name, v[name])
    roles = v.get("roles") or {}
    for role, rc in list(roles.items()):
        roles[role] = dataclasses.replace(
            rc,
            **{
                k: exact(f"roles.{role}.{k}", getattr(rc, k))
                for k in ("restart", "reboot")
                if getattr(rc, k) is not None
            },
        )
