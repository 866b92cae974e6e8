"""Hostile and wrong input that never reaches a host: deploy.yml types, shell metacharacters."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.bundle import BundleError, resolve_commit
from fabdeploy.basics import config
from fabdeploy.basics.config import ConfigError, leaf_keys

BASE: dict[str, Any] = {
    "app": "shop",
    "repo": ".",
    "s3": {"bucket": "b"},
    "deploy_to": "/srv/shop",
    "hosts": ["web1"],
}


# A value of the wrong type for every field: a mapping is never a valid scalar or list here.
@pytest.mark.parametrize("field", leaf_keys())
def test_every_field_rejects_a_wrong_type(tmp_path: Path, field: str) -> None:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, last = field.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = {"surprise": [1, 2]}
    p = tmp_path / "deploy.yml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    assert last in msg, msg


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "config/../../x", "a//b"])
def test_linked_files_traversal(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "deploy.yml"
    p.write_text(yaml.safe_dump({**BASE, "linked_files": [bad]}))
    with pytest.raises(ConfigError, match="linked_files"):
        config.load(p)


@pytest.mark.parametrize("name", ["web1;reboot", "$(id)", "web 1", "`x`", "-oProxyCommand=x"])
def test_host_and_app_names_with_metacharacters_rejected(tmp_path: Path, name: str) -> None:
    for data in ({**BASE, "hosts": [name]}, {**BASE, "app": name}):
        p = tmp_path / "deploy.yml"
        p.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError):
            config.load(p)


def test_ref_with_shell_metacharacters_reaches_git_as_one_argument(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    marker = tmp_path / "pwned"
    for ref in (
        f"main; touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        "--output=/tmp/x",
    ):
        with pytest.raises(BundleError):
            resolve_commit(repo, ref)
    assert not marker.exists()


def test_node_arguments_are_quoted_for_the_remote_shell(tmp_path: Path) -> None:
    p = tmp_path / "deploy.yml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = config.load(p)
    evil = "main'; touch /tmp/pwned; echo '$(id)`id`"
    cmd = nodectl.guarded(cfg, "activate", "--ref", evil)
    # The remote shell sees the ref as exactly one word, unexpanded.
    words = shlex.split(cmd.split("exec ", 1)[1])
    assert words[-2:] == ["--ref", evil]
