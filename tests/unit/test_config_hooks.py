"""hooks: in deploy.yml: commands or {run, boot, roles, timeout}, and what node.json gets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fabdeploy.adapters import nodectl
from fabdeploy.basics.config import Hook, _build
from fabdeploy.basics.errors import ConfigError


def cfg_with(tmp_path: Path, hooks: Any) -> Any:
    return _build(
        {
            "app": "shop",
            "repo": ".",
            "s3": {"bucket": "b"},
            "deploy_to": "/srv/shop",
            "hosts": ["web1"],
            "hooks": hooks,
        },
        tmp_path / "deploy.yml",
    )


def test_hooks_take_commands_or_mappings(tmp_path: Path) -> None:
    cfg = cfg_with(
        tmp_path,
        {
            "before_swap": "make check",
            "after_swap": [
                "a",
                {"run": "rake db:migrate", "boot": False, "roles": ["db"], "timeout": 300},
            ],
            "after_restart": [{"run": "curl -fsS localhost/warm", "timeout": 5.5}],
        },
    )
    assert cfg.hooks.before_swap == (Hook("make check"),)
    assert cfg.hooks.after_swap == (Hook("a"), Hook("rake db:migrate", False, ("db",), 300.0))
    raw = json.loads(json.dumps(nodectl.node_json(cfg)))["hooks"]
    assert raw == {
        "before_swap": ["make check"],  # no options: as node.json always had it
        "after_swap": [
            "a",
            {"run": "rake db:migrate", "boot": False, "roles": ["db"], "timeout": 300.0},
        ],
        "after_restart": [
            {"run": "curl -fsS localhost/warm", "boot": True, "roles": [], "timeout": 5.5}
        ],
    }


@pytest.mark.parametrize(
    ("hooks", "msg"),
    [
        ({"before_swap": [{"run": "x", "when": "always"}]}, "unknown: when"),
        ({"after_swap": [{"boot": False}]}, "a `run:` command"),
        ({"after_restart": [{"run": "x", "timeout": 0}]}, "a number > 0"),
        ({"after_restart": [{"run": "x", "boot": "no"}]}, "true or false"),
        ({"before_deploy": ["x"]}, "unknown key 'hooks.before_deploy'"),
    ],
)
def test_bad_hooks_are_one_line(tmp_path: Path, hooks: Any, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        cfg_with(tmp_path, hooks)
    assert "\n" not in str(e.value) and "hooks" in str(e.value)


def test_node_json_names_the_stage_for_hooks(tmp_path: Path) -> None:
    from fabdeploy.basics.config import build

    data = {
        "app": "shop",
        "repo": ".",
        "s3": {"bucket": "b"},
        "deploy_to": "/srv/shop",
        "hosts": ["web1"],
        "stages": {"staging": {}, "production": {}},
    }
    assert nodectl.node_json(build(data, tmp_path / "deploy.yml", "staging"))["stage"] == "staging"
    assert "stage" not in nodectl.node_json(cfg_with(tmp_path, {}))
