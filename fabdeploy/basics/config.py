"""deploy.yml: one schema, validated at load.

Every problem is reported as one line naming the file and the key (and, for an
unknown key, the valid ones), raised as `ConfigError` so tasks can turn it into
`invoke.Exit` without a traceback.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabdeploy.basics.errors import ConfigError

ENV_VAR = "DEPLOY_CONFIG"
DEFAULT_NAME = "deploy.yml"



@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class SSHConfig:
    user: str | None = None
    config: Path | None = None
    known_hosts: Path | None = None
    strict_host_keys: bool = True
    connect_timeout: float = 10.0
    command_timeout: float = 600.0
    keepalive: int = 15
    identity_file: Path | None = None


@dataclass(frozen=True)
class Host:
    name: str
    host: str  # what we hand to ssh (an alias resolved through ssh_config)
    roles: tuple[str, ...] = ()
    instance_id: str | None = None  # set for hosts discovered from AWS (fabfile/aws.py)
    az: str | None = None


@dataclass(frozen=True)
class HealthConfig:
    url: str | None = None
    timeout: float = 120.0
    interval: float = 0.2
    expect_status: int = 200


@dataclass(frozen=True)
class HooksConfig:
    before_swap: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeConfig:
    python: str = "/usr/bin/python3"
    app_unit: str | None = None
    install_dir: str | None = None  # default: /usr/local/lib/fabdeploy/<app>
    boot_attempts: int = 5
    first_boot_attempts: int = 30
    boot_backoff: float = 1.0
    boot_max_seconds: float = 900.0
    download_timeout: float = 60.0
    max_files: int = 200_000


@dataclass(frozen=True)
class RollConfig:
    batch: str = "1"
    reboot_timeout: float = 300.0
    boot_timeout: float = 300.0
    lock_expiry: float = 3600.0


@dataclass(frozen=True)
class InstanceRefreshConfig:
    min_healthy_percentage: int = 90
    instance_warmup: int | None = None
    checkpoint_percentages: tuple[int, ...] = ()
    checkpoint_delay: int | None = None


@dataclass(frozen=True)
class AWSConfig:
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    autoscaling_groups: tuple[str, ...] = ()
    tag_filters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    address: str = "private_ip"
    target_groups: tuple[str, ...] = ()
    classic_elbs: tuple[str, ...] = ()
    standby: bool = False
    min_healthy: str | None = None
    healthy_timeout: float = 300.0
    instance_refresh: InstanceRefreshConfig = field(default_factory=InstanceRefreshConfig)

    @property
    def discovers(self) -> bool:
        return bool(self.autoscaling_groups or self.tag_filters)


@dataclass(frozen=True)
class Config:
    path: Path
    app: str
    repo: Path
    s3: S3Config
    deploy_to: str
    hosts: tuple[Host, ...]
    ref: str = "HEAD"
    keep_releases: int = 5
    linked_files: tuple[str, ...] = ()
    linked_dirs: tuple[str, ...] = ()
    ssh: SSHConfig = field(default_factory=SSHConfig)
    parallel: int = 10
    restart: str | None = None
    reboot: str = "sudo systemctl reboot"
    health: HealthConfig = field(default_factory=HealthConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    node_env: dict[str, str] = field(default_factory=dict)
    roll: RollConfig = field(default_factory=RollConfig)
    aws: AWSConfig | None = None

    @property
    def node_dir(self) -> str:
        return self.node.install_dir or f"/usr/local/lib/fabdeploy/{self.app}"

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


# --- the schema -----------------------------------------------------------------
# Each entry: key -> (kind, required). Kinds are small validators below; nested
# mappings are dicts. Keeping it as data lets the unknown-key message list the
# valid keys for whichever section the typo is in.

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError("a non-empty string")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _name(v: Any) -> str:
    v = _str(v)
    if not _NAME_RE.match(v):
        raise TypeError("a name of letters, digits, '.', '_' or '-'")
    return v


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


def _rel_path(v: Any) -> str:
    v = _str(v)
    parts = v.split("/")
    if v.startswith("/") or ".." in parts or "" in parts or "." in parts:
        raise TypeError("a plain relative path inside the release, without '..' (e.g. config/database.yml)")
    return v


def _rel_paths(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise TypeError("a list of relative paths")
    return tuple(_rel_path(x) for x in v)


def _commands(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise TypeError("a command or a list of commands")
    return tuple(_str(x) for x in v)


def _env(v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise TypeError("a mapping of NAME: value")
    out = {}
    for k, val in v.items():
        if not isinstance(k, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise TypeError(f"environment names like AWS_REGION (got {k!r})")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise TypeError(f"string values (got {type(val).__name__} for {k})")
        out[k] = str(val)
    return out


def _batch(v: Any) -> str:
    s = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(s, str) or not re.match(r"^(\d+%?)$", s) or s.rstrip("%") in ("0", ""):
        raise TypeError("a host count like 2 or a percentage like '25%'")
    return s


def _names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise TypeError("a list of names")
    return tuple(_str(x) for x in v)


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


def _min_healthy(v: Any) -> str:
    s = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(s, str) or not re.match(r"^\d+%?$", s) or (s.endswith("%") and int(s[:-1]) > 100):
        raise TypeError("a host count like 2 or a percentage like '66%'")
    return s


def _percentages(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= 100 for x in v):
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


SCHEMA: dict[str, Any] = {
    "app": (_name, True),
    "repo": (_str, True),
    "ref": (_str, False),
    "s3": (
        {
            "bucket": (_str, True),
            "prefix": (_str, False),
            "region": (_opt_str, False),
            "endpoint_url": (_opt_str, False),
            "profile": (_opt_str, False),
        },
        True,
    ),
    "deploy_to": (_abs_path, True),
    "keep_releases": (_pos_int, False),
    "linked_files": (_rel_paths, False),
    "linked_dirs": (_rel_paths, False),
    "ssh": (
        {
            "user": (_opt_str, False),
            "config": (_opt_str, False),
            "known_hosts": (_opt_str, False),
            "strict_host_keys": (_bool, False),
            "connect_timeout": (_pos_num, False),
            "command_timeout": (_pos_num, False),
            "keepalive": (_pos_int, False),
            "identity_file": (_opt_str, False),
        },
        False,
    ),
    # Required unless aws.autoscaling_groups / aws.tag_filters name the fleet (see _build).
    "hosts": ("hosts", False),
    "parallel": (_pos_int, False),
    "restart": (_opt_str, False),
    "reboot": (_str, False),
    "health": (
        {
            "url": (_opt_str, False),
            "timeout": (_pos_num, False),
            "interval": (_pos_num, False),
            "expect_status": (_pos_int, False),
        },
        False,
    ),
    "hooks": (
        {"before_swap": (_commands, False)},
        False,
    ),
    "node": (
        {
            "python": (_abs_path, False),
            "app_unit": (_opt_str, False),
            "install_dir": (_abs_path, False),
            "boot_attempts": (_pos_int, False),
            "first_boot_attempts": (_pos_int, False),
            "boot_backoff": (_pos_num, False),
            "boot_max_seconds": (_pos_num, False),
            "download_timeout": (_pos_num, False),
            "max_files": (_pos_int, False),
        },
        False,
    ),
    "node_env": (_env, False),
    "roll": (
        {
            "batch": (_batch, False),
            "reboot_timeout": (_pos_num, False),
            "boot_timeout": (_pos_num, False),
            "lock_expiry": (_pos_num, False),
        },
        False,
    ),
    "aws": (
        {
            "region": (_opt_str, False),
            "endpoint_url": (_opt_str, False),
            "profile": (_opt_str, False),
            "autoscaling_groups": (_names, False),
            "tag_filters": (_tag_filters, False),
            "address": (_address, False),
            "target_groups": (_names, False),
            "classic_elbs": (_names, False),
            "standby": (_bool, False),
            "min_healthy": (_min_healthy, False),
            "healthy_timeout": (_pos_num, False),
            "instance_refresh": (
                {
                    "min_healthy_percentage": (_percent, False),
                    "instance_warmup": (_seconds, False),
                    "checkpoint_percentages": (_percentages, False),
                    "checkpoint_delay": (_seconds, False),
                },
                False,
            ),
        },
        False,
    ),
}


def _check(section: dict[str, Any], schema: dict[str, Any], where: str, path: Path) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: {where or 'the file'} must be a mapping of keys")
    for key in section:
        if key not in schema:
            valid = ", ".join(sorted(schema))
            raise ConfigError(f"{path}: unknown key {where + key!r}; valid keys here: {valid}")
    out: dict[str, Any] = {}
    for key, (kind, required) in schema.items():
        full = where + key
        if key not in section or (section[key] is None and required):
            if required:
                raise ConfigError(f"{path}: missing required key {full!r}")
            continue
        value = section[key]
        if isinstance(kind, dict):
            out[key] = _check(value or {}, kind, full + ".", path)
        elif kind == "hosts":
            out[key] = _hosts(value, full, path)
        else:
            try:
                out[key] = kind(value)
            except TypeError as e:
                raise ConfigError(f"{path}: {full} must be {e} (got {value!r})") from None
    return out


def _hosts(value: Any, where: str, path: Path) -> tuple[Host, ...]:
    hosts: list[Host] = []
    if isinstance(value, list):
        for item in value:
            try:
                name = _name(item)
            except TypeError as e:
                raise ConfigError(f"{path}: every entry of {where} must be {e} (got {item!r})") from None
            hosts.append(Host(name=name, host=name))
    elif isinstance(value, dict):
        for name, spec in value.items():
            try:
                _name(name)
            except TypeError as e:
                raise ConfigError(f"{path}: host names in {where} must be {e} (got {name!r})") from None
            spec = spec or {}
            body = _check(spec, {"host": (_str, False), "roles": (_commands, False)}, f"{where}.{name}.", path)
            hosts.append(Host(name=name, host=body.get("host", name), roles=body.get("roles", ())))
    else:
        raise ConfigError(f"{path}: {where} must be a list of ssh names or a mapping name -> {{host, roles}}")
    if not hosts:
        raise ConfigError(f"{path}: {where} is empty; name at least one host")
    names = [h.name for h in hosts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: {where} names {', '.join(dupes)} more than once")
    return tuple(hosts)


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path.cwd() / DEFAULT_NAME


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, validate and resolve deploy.yml (or $DEPLOY_CONFIG)."""
    import yaml  # lazy: `fab --list` should not pay for it

    p = find_config_path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        hint = f" (set {ENV_VAR} or run from the folder holding deploy.yml)" if not path else ""
        raise ConfigError(f"{p}: config file not found{hint}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty; see README.md for an example deploy.yml")
    v = _check(data, SCHEMA, "", p)
    return _build(v, p)


def _build(v: dict[str, Any], p: Path) -> Config:
    base = p.resolve().parent

    def local_path(s: str | None) -> Path | None:
        if s is None:
            return None
        q = Path(os.path.expanduser(s))
        return q if q.is_absolute() else base / q

    s3 = v["s3"]
    aws = None
    if "aws" in v:
        a = dict(v["aws"])
        aws = AWSConfig(**{k: val for k, val in a.items() if k != "instance_refresh"},
                        instance_refresh=InstanceRefreshConfig(**a.get("instance_refresh", {})))
    if "hosts" not in v and not (aws and aws.discovers):
        raise ConfigError(f"{p}: missing required key 'hosts' (or name the fleet with "
                          "aws.autoscaling_groups / aws.tag_filters)")
    ssh = v.get("ssh", {})
    node = v.get("node", {})
    app = v["app"]
    return Config(
        path=p,
        app=app,
        repo=local_path(v["repo"]),  # type: ignore[arg-type]
        ref=v.get("ref", "HEAD"),
        s3=S3Config(
            bucket=s3["bucket"],
            prefix=s3.get("prefix", app).strip("/"),
            region=s3.get("region"),
            endpoint_url=s3.get("endpoint_url"),
            profile=s3.get("profile"),
        ),
        deploy_to=v["deploy_to"],
        keep_releases=v.get("keep_releases", 5),
        linked_files=v.get("linked_files", ()),
        linked_dirs=v.get("linked_dirs", ()),
        ssh=SSHConfig(
            user=ssh.get("user"),
            config=local_path(ssh.get("config")),
            known_hosts=local_path(ssh.get("known_hosts", "~/.ssh/known_hosts")),
            strict_host_keys=ssh.get("strict_host_keys", True),
            connect_timeout=ssh.get("connect_timeout", 10.0),
            command_timeout=ssh.get("command_timeout", 600.0),
            keepalive=ssh.get("keepalive", 15),
            identity_file=local_path(ssh.get("identity_file")),
        ),
        hosts=v.get("hosts", ()),
        parallel=v.get("parallel", 10),
        restart=v.get("restart"),
        reboot=v.get("reboot", "sudo systemctl reboot"),
        health=HealthConfig(**v.get("health", {})),
        hooks=HooksConfig(**v.get("hooks", {})),
        node=NodeConfig(**node),
        node_env=v.get("node_env", {}),
        roll=RollConfig(**v.get("roll", {})),
        aws=aws,
    )
