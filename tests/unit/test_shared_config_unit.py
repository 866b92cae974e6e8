"""Linked files that name their source (SSM, Secrets Manager, S3): the deploy.yml schema and
what node.json tells the nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fabdeploy.adapters import nodectl
from fabdeploy.basics import config
from fabdeploy.basics.config import ConfigError, LinkedSource

BASE = {
    "app": "shop",
    "repo": ".",
    "s3": {"bucket": "acme", "region": "eu-west-1"},
    "deploy_to": "/srv/shop",
    "hosts": ["web1"],
}


def load(tmp_path: Path, **overrides) -> config.Config:
    p = tmp_path / "deploy.yml"
    p.write_text(yaml.safe_dump({**BASE, **overrides}))
    return config.load(p)


def error(tmp_path: Path, **overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, **overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_entries_name_their_source_and_plain_paths_still_work(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        linked_files=[
            "config/master.key",
            {"path": "config/database.yml", "ssm": "/shop/prod/database.yml"},
            {"path": "config/env", "secret": "shop/prod/env"},
            {"path": "config/settings.json", "s3": "config/settings.json"},
            {"path": "config/other.json", "s3": "s3://elsewhere/a/b.json"},
        ],
    )
    # Every existing caller still sees the paths.
    assert list(cfg.linked_files) == [
        "config/master.key",
        "config/database.yml",
        "config/env",
        "config/settings.json",
        "config/other.json",
    ]
    src = config.linked_sources(cfg)
    assert "config/master.key" not in src
    assert src["config/database.yml"] == LinkedSource("ssm", "/shop/prod/database.yml")
    assert src["config/env"].describe() == "secretsmanager:shop/prod/env"
    # A plain S3 key lives under the deploy bucket and prefix (where nodes may already read).
    assert src["config/settings.json"].describe() == "s3://acme/shop/config/settings.json"
    assert src["config/other.json"].describe() == "s3://elsewhere/a/b.json"


def test_stage_prefix_applies_to_plain_s3_keys(tmp_path: Path) -> None:
    p = tmp_path / "deploy.yml"
    p.write_text(
        yaml.safe_dump(
            {
                **BASE,
                "linked_files": [{"path": "config/s.json", "s3": "config/s.json"}],
                "stages": {"staging": {}, "production": {}},
            }
        )
    )
    cfg = config.load(p, stage="staging")
    assert (
        config.linked_sources(cfg)["config/s.json"].describe()
        == "s3://acme/shop/staging/config/s.json"
    )


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"path": "a", "smm": "/x"}, "valid keys: path, ssm, secret, s3 (unknown: smm)"),
        ({"path": "a"}, "exactly one source, ssm, secret or s3 ('a' names none)"),
        ({"path": "a", "ssm": "/x", "s3": "k"}, "'a' names ssm and s3"),
        ({"ssm": "/x"}, "with a `path:`"),
        ({"path": "a", "ssm": "bad name"}, "whose ssm is an SSM parameter name"),
        ({"path": "a", "s3": "s3://bucket-only"}, "s3://bucket/key with both parts"),
        ({"path": "a", "s3": "/abs"}, "a key under s3.prefix"),
        ({"path": "../a", "ssm": "/x"}, "a plain relative path inside the release"),
    ],
)
def test_bad_entries_are_one_line_naming_the_key(tmp_path: Path, entry, expected) -> None:
    msg = error(tmp_path, linked_files=[entry])
    assert "linked_files must be" in msg and expected in msg


def test_a_path_listed_twice_is_refused(tmp_path: Path) -> None:
    msg = error(tmp_path, linked_files=["config/a", {"path": "config/a", "ssm": "/a"}])
    assert "config/a is there twice" in msg


def test_config_sources_keys_are_validated(tmp_path: Path) -> None:
    msg = error(tmp_path, config_sources={"ssm_endpoint": "http://x"})
    assert "unknown key 'config_sources.ssm_endpoint'" in msg
    assert "secretsmanager_endpoint_url" in msg and "ssm_endpoint_url" in msg


def test_node_json_spells_out_sources_and_endpoints(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        linked_files=[
            "config/master.key",
            {"path": "config/database.yml", "ssm": "/shop/db"},
            {"path": "config/s.json", "s3": "s.json"},
        ],
        config_sources={
            "ssm_endpoint_url": "http://127.0.0.1:5000",
            "secretsmanager_endpoint_url": "http://127.0.0.1:5000",
        },
    )
    nj = nodectl.node_json(cfg)
    assert nj["linked_files"] == ["config/master.key", "config/database.yml", "config/s.json"]
    assert nj["shared_config"] == {
        "files": [
            {"path": "config/database.yml", "ssm": "/shop/db"},
            {"path": "config/s.json", "s3_bucket": "acme", "s3_key": "shop/s.json"},
        ],
        "region": "eu-west-1",  # s3.region unless config_sources.region
        "ssm_endpoint_url": "http://127.0.0.1:5000",
        "secretsmanager_endpoint_url": "http://127.0.0.1:5000",
    }


def test_no_sources_leaves_node_json_and_fingerprint_as_before(tmp_path: Path) -> None:
    plain = load(tmp_path, linked_files=["config/database.yml"])
    assert "shared_config" not in nodectl.node_json(plain)
    sourced = load(tmp_path, linked_files=[{"path": "config/database.yml", "ssm": "/shop/db"}])
    assert plain.linked_files != sourced.linked_files  # the source is part of the value
    assert nodectl.fingerprint(plain) != nodectl.fingerprint(sourced)
