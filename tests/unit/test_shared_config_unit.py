"""Linked files that name their source (SSM, Secrets Manager, S3): the deploy.yml schema and
what node.json tells the nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fabdeploy.adapters import nodectl
from fabdeploy.adapters.sources import Sources
from fabdeploy.basics import config
from fabdeploy.basics.config import ConfigError, LinkedSource
from fabdeploy.ops import sharedconfig as sc

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


# --- deploy.config on the deploying machine (moto's in-process mock of SSM/Secrets/S3) -------


SECRET = "production:\n  password: hunter2\n"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch):
    from moto import mock_aws

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        import boto3

        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket="acme", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        yield


def sourced(tmp_path: Path) -> config.Config:
    return load(
        tmp_path,
        linked_files=[
            {"path": "config/database.yml", "ssm": "/shop/db"},
            {"path": "config/env", "secret": "shop/env"},
            {"path": "config/s.json", "s3": "s.json"},
        ],
    )


@pytest.mark.parametrize("path", ["config/database.yml", "config/env", "config/s.json"])
def test_push_then_show_then_diff_without_printing_the_value(
    tmp_path: Path, aws_env, capsys: pytest.CaptureFixture[str], path: str
) -> None:
    cfg = sourced(tmp_path)
    local = tmp_path / "local.yml"
    local.write_text(SECRET)
    sc.push(cfg, Sources(cfg), path, str(local))
    out = capsys.readouterr().out
    assert "pushed" in out and "new (2 lines" in out and "hunter2" not in out
    assert Sources(cfg).read(config.linked_sources(cfg)[path]).data == SECRET.encode()

    sc.push(cfg, Sources(cfg), path, str(local))  # same bytes: no new version
    assert "nothing pushed" in capsys.readouterr().out

    assert sc.show(cfg, Sources(cfg), path, show_secrets=False, as_json=False)
    out = capsys.readouterr().out
    assert path in out and "hunter2" not in out and sc.HIDDEN in out
    assert sc.Digest.of(SECRET.encode()).sha256[:12] in out
    assert sc.show(cfg, Sources(cfg), path, show_secrets=True, as_json=False)
    assert "hunter2" in capsys.readouterr().out

    local.write_text(SECRET.replace("hunter2", "correct-horse") + "pool: 5\n")
    assert not sc.diff_local(cfg, Sources(cfg), path, str(local))
    out = capsys.readouterr().out
    assert "+2 -1 lines" in out and "correct-horse" not in out and "hunter2" not in out
    assert not sc.diff_local(cfg, Sources(cfg), path, str(local), show_secrets=True)
    out = capsys.readouterr().out
    assert "-  password: hunter2" in out and "+  password: correct-horse" in out


def test_push_dry_run_stores_nothing(
    tmp_path: Path, aws_env, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = sourced(tmp_path)
    local = tmp_path / "db.yml"
    local.write_text(SECRET)
    sc.push(cfg, Sources(cfg), "config/database.yml", str(local), dry_run=True)
    assert "would push" in capsys.readouterr().out
    assert Sources(cfg).read(config.linked_sources(cfg)["config/database.yml"]) is None


def test_show_json_and_missing_sources(
    tmp_path: Path, aws_env, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = sourced(tmp_path)
    local = tmp_path / "db.yml"
    local.write_text(SECRET)
    sc.push(cfg, Sources(cfg), "config/database.yml", str(local))
    capsys.readouterr()
    assert not sc.show(cfg, Sources(cfg), None, show_secrets=False, as_json=True)  # two missing
    data = json.loads(capsys.readouterr().out)
    by_path = {f["path"]: f for f in data["files"]}
    assert by_path["config/database.yml"]["version"] == "1"
    assert (
        by_path["config/database.yml"]["lines"] == 2
        and "value" not in by_path["config/database.yml"]
    )
    assert by_path["config/env"]["exists"] is False


def test_push_needs_a_path_when_several_files_have_sources(tmp_path: Path) -> None:
    cfg = sourced(tmp_path)
    with pytest.raises(ConfigError, match="name the linked file with --path"):
        sc.only_one(cfg, None)
    with pytest.raises(ConfigError, match="those are: config/database.yml, config/env"):
        sc.only_one(cfg, "config/nope.yml")


def test_ssm_refuses_binary_in_one_line(tmp_path: Path, aws_env) -> None:
    cfg = sourced(tmp_path)
    local = tmp_path / "key.bin"
    local.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(sc.DeployError, match="not UTF-8; use a secret: or s3: source"):
        sc.push(cfg, Sources(cfg), "config/database.yml", str(local))


def test_line_delta_and_node_state_say_nothing_of_the_content() -> None:
    assert sc.line_delta(b"a\nb\nc\n", b"a\nB\nc\nd\n") == (2, 1)
    assert sc.count_lines(b"a\nb") == 2 and sc.count_lines(b"") == 0
    stored = sc.Digest.of(b"x\n")
    assert sc.node_state(stored, None).startswith("MISSING")
    assert sc.node_state(stored, {"sha256": stored.sha256, "mode": "0600"}) == "same"
    assert "mode 0644" in sc.node_state(stored, {"sha256": stored.sha256, "mode": "0644"})
    differs = sc.node_state(stored, {"sha256": "f" * 64, "lines": 3, "mode": "0600"})
    assert differs.startswith("DIFFERS: node 3 lines, sha256 ffffffffffff")


def test_status_names_a_host_that_kept_an_old_copy() -> None:
    from fabdeploy.ops.status import shared_note

    assert shared_note(None) == "" and shared_note({"files": [{"outcome": "unchanged"}]}) == ""
    last = {
        "files": [
            {"path": "config/database.yml", "outcome": "kept", "reason": "unreachable"},
            {"path": "config/env", "outcome": "failed", "reason": "denied"},
        ]
    }
    assert shared_note(last) == (
        "; shared config config/database.yml kept (source unreadable), config/env MISSING"
    )
