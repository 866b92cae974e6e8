"""deploy.yml validation: every problem is one line naming the file and the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fabdeploy.basics import config
from fabdeploy.basics.config import ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
app: shop
repo: ../shop
s3:
  bucket: acme-deploy
deploy_to: /srv/shop
hosts: [web1, web2]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "deploy.yml"
    p.write_text(text)
    return p


def _load(tmp_path: Path, **overrides) -> config.Config:
    data = yaml.safe_load(MINIMAL)
    data.update(overrides)
    return config.load(write(tmp_path, yaml.safe_dump(data)))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL))
    assert cfg.app == "shop"
    assert cfg.repo == tmp_path.resolve() / "../shop"
    assert cfg.s3.prefix == "shop"  # app name is the default prefix
    assert cfg.keep_releases == 5
    assert [h.name for h in cfg.hosts] == ["web1", "web2"]
    assert cfg.ssh.strict_host_keys is True
    assert cfg.node_dir == "/usr/local/lib/fabdeploy/shop"


def test_example_deploy_yml_in_repo_is_valid() -> None:
    cfg = config.load(REPO / "deploy.yml")
    assert cfg.s3.endpoint_url and cfg.hosts


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, MINIMAL.replace("shop", "cart", 1))
    monkeypatch.setenv("DEPLOY_CONFIG", str(p))
    assert config.load().app == "cart"


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "keep_relases: 3\n")
    assert "unknown key 'keep_relases'" in msg
    assert "keep_releases" in msg and str(tmp_path / "deploy.yml") in msg


def test_unknown_nested_key_names_section(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path, MINIMAL.replace("bucket: acme-deploy", "bucket: acme-deploy\n  bukket: x")
    )
    assert "unknown key 's3.bukket'" in msg and "endpoint_url" in msg


def test_wrong_type(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "keep_releases: five\n")
    assert "keep_releases must be a whole number" in msg and "'five'" in msg


def test_wrong_type_bool(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "ssh:\n  strict_host_keys: 'no'\n")
    assert "ssh.strict_host_keys must be true or false" in msg


def test_missing_bucket(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL.replace("  bucket: acme-deploy\n", "  region: eu-west-1\n"))
    assert "missing required key 's3.bucket'" in msg


def test_missing_top_level_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL.replace("deploy_to: /srv/shop\n", ""))
    assert "missing required key 'deploy_to'" in msg


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yml")
    d = tmp_path / "adir.yml"
    d.mkdir()
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(d)


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL + "hosts: [web1\n")
    assert "invalid YAML at line" in msg


def test_empty_file(tmp_path: Path) -> None:
    assert "empty" in error_of(tmp_path, "")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "config/../x", "a//b"])
def test_linked_paths_must_stay_inside_release(tmp_path: Path, bad: str) -> None:
    msg = error_of(tmp_path, MINIMAL + f"linked_files: [{bad!r}]\n")
    assert "linked_files must be a plain relative path" in msg


def test_deploy_to_must_be_absolute(tmp_path: Path) -> None:
    assert "deploy_to must be an absolute path" in error_of(
        tmp_path, MINIMAL.replace("/srv/shop", "srv/shop")
    )


def test_shell_metacharacters_in_names_rejected(tmp_path: Path) -> None:
    assert "app must be a name" in error_of(
        tmp_path, MINIMAL.replace("app: shop", "app: 'shop; rm -rf /'")
    )
    assert "hosts" in error_of(tmp_path, MINIMAL.replace("[web1, web2]", "['web1;reboot']"))


def test_hosts_mapping_and_duplicates(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            MINIMAL.replace(
                "hosts: [web1, web2]", "hosts:\n  web1: {host: 10.0.0.5, roles: [web]}\n  web2:\n"
            ),
        )
    )
    assert cfg.hosts[0].host == "10.0.0.5" and cfg.hosts[0].roles == ("web",)
    assert cfg.hosts[1].host == "web2"
    assert "more than once" in error_of(tmp_path, MINIMAL.replace("[web1, web2]", "[web1, web1]"))
    assert "unknown key 'hosts.web1.hots'" in error_of(
        tmp_path, MINIMAL.replace("hosts: [web1, web2]", "hosts:\n  web1: {hots: x}\n")
    )


def test_node_env_values_must_be_strings(tmp_path: Path) -> None:
    assert "node_env" in error_of(tmp_path, MINIMAL + "node_env: {A: [1]}\n")


def test_roll_batch_forms(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, MINIMAL + "roll: {batch: 25%}\n")).roll.batch == "25%"
    assert config.load(write(tmp_path, MINIMAL + "roll: {batch: 2}\n")).roll.batch == "2"
    assert "roll.batch" in error_of(tmp_path, MINIMAL + "roll: {batch: 0}\n")


def test_unknown_host_lists_known(tmp_path: Path) -> None:
    from fabdeploy.ops.targets import select_hosts

    cfg = config.load(write(tmp_path, MINIMAL))
    with pytest.raises(ConfigError, match="unknown host web9 .* known hosts: web1, web2"):
        select_hosts(cfg, "web9")
    assert [h.name for h in select_hosts(cfg, "web2, web1,web2")] == ["web2", "web1"]


def test_fab_prints_one_line_and_exits_nonzero(tmp_path: Path) -> None:
    """The real CLI: a config typo is one line on stderr, exit 1, no traceback."""
    p = write(tmp_path, MINIMAL + "restrat: x\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["DEPLOY_CONFIG"] = str(p)
    r = subprocess.run(
        [str(Path(sys.executable).parent / "fab"), "deploy.status"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown key 'restrat'" in lines[0], r.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (["deploy.hotfix", "--parallel=abc"], "--parallel must be a whole number"),
        (["deploy.roll", "--batch=0"], "--batch must be"),
    ],
)
def test_bad_flags_are_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["DEPLOY_CONFIG"] = str(write(tmp_path, MINIMAL))
    r = subprocess.run(
        [str(Path(sys.executable).parent / "fab"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- one declaration per key; node.json round trip; lookup and trust ------------------


def test_node_json_reads_back_with_every_value(tmp_path: Path) -> None:
    from fabdeploy.adapters import nodectl
    from fabdeploy.node import node

    p = tmp_path / "deploy.yml"
    p.write_text(
        yaml.safe_dump(
            {
                "app": "shop",
                "repo": ".",
                "s3": {
                    "bucket": "b",
                    "prefix": "p/x",
                    "region": "eu-west-1",
                    "endpoint_url": "http://s3.local:9000",
                },
                "deploy_to": "/srv/shop",
                "hosts": ["web1"],
                "keep_releases": 3,
                "linked_files": ["config/database.yml"],
                "linked_dirs": ["log"],
                "restart": "systemctl restart shop",
                "hooks": {"before_swap": ["true"]},
                "node_env": {"AWS_REGION": "eu-west-1"},
                "node": {
                    "boot_attempts": 2,
                    "first_boot_attempts": 3,
                    "boot_backoff": 0.5,
                    "boot_max_seconds": 77,
                    "download_timeout": 12,
                    "max_files": 99,
                    "lock_timeout": 33,
                    "link_unchanged": False,
                },
                "health": {
                    "url": "http://{host}:81/up",
                    "command": "test -f tmp/ready",
                    "timeout": 7,
                    "interval": 0.5,
                    "expect_status": 204,
                },
                "signing": {
                    "key": "id_ed25519",
                    "allowed_signers": "signers",
                    "allow_unsigned": True,
                },
            }
        )
    )
    (tmp_path / "signers").write_text("alice ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummy\n")
    cfg = config.load(p)
    raw = nodectl.node_json(cfg)
    n = node.Config(json.loads(json.dumps(raw)), source="node.json")
    assert (n.app, n.deploy_to, n.keep_releases) == ("shop", "/srv/shop", 3)
    assert (n.linked_files, n.linked_dirs) == (["config/database.yml"], ["log"])
    assert (n.s3.bucket, n.s3.prefix, n.s3.region, n.s3.endpoint_url) == (
        "b",
        "p/x",
        "eu-west-1",
        "http://s3.local:9000",
    )
    assert n.env == {"AWS_REGION": "eu-west-1"} and n.before_swap == ["true"]
    assert n.restart == "systemctl restart shop"
    assert (n.boot.attempts, n.boot.first_boot_attempts, n.boot.backoff, n.boot.max_seconds) == (
        2,
        3,
        0.5,
        77,
    )
    assert (n.download_timeout, n.max_files, n.lock_timeout) == (12, 99, 33)
    assert n.link_unchanged is False and node.Config({**raw, "link_unchanged": None}).link_unchanged
    h = n.health
    assert (h.on, h.url, h.command, h.timeout, h.interval, h.expect_status) == (
        "node",
        "http://{host}:81/up",
        "test -f tmp/ready",
        7,
        0.5,
        204,
    )
    assert h.here
    assert (n.signers, n.allow_unsigned) == (nodectl.signers_path(cfg), True)
    assert n.report is True  # the node reports its boots to S3 for the roll
    # Every key the controller writes is one the node reads (no silently dropped settings).
    assert set(raw) == {
        "app",
        "deploy_to",
        "keep_releases",
        "linked_files",
        "linked_dirs",
        "s3",
        "env",
        "hooks",
        "restart",
        "boot",
        "download_timeout",
        "max_files",
        "lock_timeout",
        "health",
        "signing",
        "link_unchanged",
        "report",
    }


def test_boot_unit_timeout_follows_boot_max_seconds(tmp_path: Path) -> None:
    from fabdeploy.adapters import nodectl

    cfg = _load(tmp_path, node={"boot_max_seconds": 1800})
    assert "TimeoutStartSec=1860\n" in nodectl.unit_text(cfg)


@pytest.mark.parametrize(
    "section,key,value,needle",
    [
        (None, "app", "shop\n", "app"),
        ("node", "app_unit", "shop.service\nExecStartPre=/bin/evil", "node.app_unit"),
        ("node", "install_dir", "/opt/my app", "node.install_dir"),
        ("node", "install_dir", "/opt/100%", "node.install_dir"),
        ("node", "python", "/usr/bin/python3 -X evil", "node.python"),
        (None, "keep_releases", 1, "keep_releases"),
    ],
)
def test_values_that_would_break_the_unit_or_the_revert_are_refused(
    tmp_path: Path, section, key, value, needle
) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _load(tmp_path, **({section: {key: value}} if section else {key: value}))


def test_lookup_goes_up_to_the_repo_root_and_no_further(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    outer = tmp_path / "deploy.yml"
    outer.write_text("app: outer\n")
    repo = tmp_path / "app"
    (repo / ".git").mkdir(parents=True)
    sub = repo / "lib" / "deep"
    sub.mkdir(parents=True)
    # Without a deploy.yml in the repo, the one above the repo root is not picked up.
    assert config.find_config_path(start=sub) == sub.resolve() / "deploy.yml"
    (repo / "deploy.yml").write_text("app: inner\n")
    assert config.find_config_path(start=sub) == (repo / "deploy.yml").resolve()
    monkeypatch.setenv(config.ENV_VAR, str(outer))
    assert config.find_config_path(start=sub) == outer


def test_group_writable_or_foreign_config_is_refused(tmp_path: Path) -> None:
    import os

    p = tmp_path / "deploy.yml"
    p.write_text(
        yaml.safe_dump(
            {
                "app": "shop",
                "repo": ".",
                "s3": {"bucket": "b"},
                "deploy_to": "/srv/shop",
                "hosts": ["web1"],
            }
        )
    )
    p.chmod(0o664)
    with pytest.raises(ConfigError, match="writable by group or others.*chmod go-w"):
        config.load(p)
    p.chmod(0o644)
    assert config.load(p).app == "shop"
    if os.geteuid() == 0:
        os.chown(p, 4242, -1)
        with pytest.raises(ConfigError, match="owned by uid 4242"):
            config.load(p)


def test_count_or_percent_is_one_parser() -> None:
    assert (
        config.parse_count(2) == "2"
        and config.parse_count("25%") == "25%"
        and config.parse_count("007") == "7"
    )
    assert config.parse_count("0", zero_ok=True) == "0"
    for bad in ("0", "101%", "-1", "x", True, 1.5):
        with pytest.raises(TypeError):
            config.parse_count(bad)
    assert [config.count_of(s, 10) for s in ("3", "25%", "100%", "1%")] == [3, 3, 10, 1]


def test_health_runs_on_the_node_unless_told_otherwise(tmp_path: Path) -> None:
    cfg = _load(tmp_path, health={"url": "http://{host}/up"})
    assert cfg.health.on == "node" and cfg.health.command is None
    assert _load(tmp_path, health={"on": "controller"}).health.on == "controller"
    with pytest.raises(ConfigError, match=r"health\.on must be node .* or controller"):
        _load(tmp_path, health={"on": "bastion"})
    # A command can only run on the node: refused in one line with the controller.
    with pytest.raises(
        ConfigError, match=r"health\.command runs on the node, so it needs health\.on: node"
    ):
        _load(tmp_path, health={"on": "controller", "command": "curl -fs localhost/up"})
