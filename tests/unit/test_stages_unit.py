"""Stages: one deploy.yml, shared settings plus per-stage overrides, each stage its own S3 prefix.

Config rules are tested on config.load; the command line (`fab staging deploy.X`, the stage
second, no stage) on the real `fab` with dry runs on a scratch repo, so no host is contacted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fabdeploy.basics import config
from fabdeploy.basics.config import ConfigError

FAB = Path(sys.executable).parent / "fab"

STAGED = """\
app: shop
repo: .
s3: {bucket: acme, region: eu-west-1}
deploy_to: /srv/shop
node_env: {AWS_REGION: eu-west-1, APP_ENV: production}
hosts: [web1, web2]
health: {url: "http://{host}/up", timeout: 30}
stages:
  staging:
    hosts: [stage1]
    node_env: {APP_ENV: staging}
    linked_files: [config/staging.yml]
  production:
    linked_files: [config/a.yml, config/b.yml]
"""


def load(tmp_path: Path, text: str, stage: str | None) -> config.Config:
    p = tmp_path / "deploy.yml"
    p.write_text(text)
    return config.load(p, stage=stage)


def error_of(tmp_path: Path, text: str, stage: str | None) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text, stage)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_stage_overrides_merge_deeply_and_lists_replace(tmp_path: Path) -> None:
    staging = load(tmp_path, STAGED, "staging")
    assert staging.stage == "staging" and staging.stages == ("staging", "production")
    assert [h.name for h in staging.hosts] == ["stage1"]
    assert staging.node_env == {"AWS_REGION": "eu-west-1", "APP_ENV": "staging"}  # mapping merged
    assert staging.linked_files == ("config/staging.yml",)  # list replaced
    assert staging.health.url == "http://{host}/up" and staging.health.timeout == 30
    prod = load(tmp_path, STAGED, "production")
    assert [h.name for h in prod.hosts] == ["web1", "web2"]
    assert prod.node_env["APP_ENV"] == "production"
    assert prod.linked_files == ("config/a.yml", "config/b.yml")


def test_default_prefix_includes_the_stage_and_explicit_ones_are_kept(tmp_path: Path) -> None:
    assert load(tmp_path, STAGED, "staging").s3.prefix == "shop/staging"
    assert load(tmp_path, STAGED, "production").s3.prefix == "shop/production"
    text = STAGED.replace("  production:\n", "  production:\n    s3: {prefix: shop}\n")
    prod = load(tmp_path, text, "production")
    assert prod.s3.prefix == "shop" and prod.s3.bucket == "acme" and prod.s3.region == "eu-west-1"


def test_a_stage_host_mapping_replaces_the_shared_one(tmp_path: Path) -> None:
    text = STAGED.replace("hosts: [web1, web2]", "hosts: {web1: {host: 10.0.0.1}}").replace(
        "hosts: [stage1]", "hosts: {stage1: {host: 10.9.0.1}}"
    )
    assert [h.name for h in load(tmp_path, text, "staging").hosts] == ["stage1"]


def test_two_stages_on_one_prefix_are_refused(tmp_path: Path) -> None:
    text = STAGED.replace(
        "s3: {bucket: acme, region: eu-west-1}", "s3: {bucket: acme, prefix: shop}"
    )
    msg = error_of(tmp_path, text, "staging")
    assert "stages staging and production both use s3://acme/shop" in msg and "s3.prefix" in msg


def test_no_stage_when_stages_are_defined_lists_them(tmp_path: Path) -> None:
    msg = error_of(tmp_path, STAGED, None)
    assert "defines stages" in msg and "stages: staging, production" in msg


def test_unknown_stage_and_stage_without_stages(tmp_path: Path) -> None:
    assert "unknown stage 'prod'; stages: staging, production" in error_of(tmp_path, STAGED, "prod")
    single = STAGED.split("stages:")[0]
    assert "no stages are defined" in error_of(tmp_path, single, "staging")
    assert load(tmp_path, single, None).s3.prefix == "shop"  # single-stage: unchanged


@pytest.mark.parametrize(
    "override,needle",
    [
        ("    hosts: [bad/name]\n", "every entry of stages.staging.hosts must be"),
        ("    bogus: 1\n", "unknown key 'stages.staging.bogus'"),
        ("    roll: {batch: 0}\n", "stages.staging.roll.batch must be"),
        ("    s3: {bucket: ''}\n", "stages.staging.s3.bucket must be"),
    ],
)
def test_errors_in_a_stage_name_its_key(tmp_path: Path, override: str, needle: str) -> None:
    text = STAGED.replace("    hosts: [stage1]\n", override)
    # Every stage is checked whichever one is chosen.
    assert needle in error_of(tmp_path, text, "production")


@pytest.mark.parametrize(
    "stages,needle",
    [
        ("stages: []\n", "stages must be a mapping"),
        ("stages:\n  'a b': {}\n", "stage names in stages must be"),
        ("stages:\n  qa: [web1]\n", "stages.qa must be a mapping"),
    ],
)
def test_bad_stages_section(tmp_path: Path, stages: str, needle: str) -> None:
    assert needle in error_of(tmp_path, STAGED.split("stages:")[0] + stages, "qa")


def test_deep_merge() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "hosts": {"w1": {}}, "x": 1}
    out = config.deep_merge(
        base, {"a": {"c": [3]}, "hosts": {"w2": {}}, "x": None}, replace=("hosts",)
    )
    assert out == {"a": {"b": 1, "c": [3]}, "hosts": {"w2": {}}, "x": None}
    assert base["a"] == {"b": 1, "c": [1, 2]}  # not modified


# --- the command line ----------------------------------------------------------------------

FABFILE = "from fabdeploy import deploy\nfrom invoke import Collection\nns = Collection(deploy)\n"


def fab(app: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(app.parent)}  # no DEPLOY_CONFIG, no ~/.fabric.yaml
    return subprocess.run(
        [str(FAB), *args], cwd=app, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def app(tmp_path: Path) -> Path:
    repo = tmp_path / "app"
    (repo / "fabfile").mkdir(parents=True)
    (repo / "fabfile" / "__init__.py").write_text(FABFILE)
    (repo / "deploy.yml").write_text(STAGED)
    (repo / ".git").mkdir()
    return repo


def test_stage_first_is_a_dry_run_on_that_stage(app: Path) -> None:
    r = fab(app, "staging", "deploy.rollback", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "stage1" in r.stdout and "web1" not in r.stdout


def test_no_stage_is_refused_listing_the_stages(app: Path) -> None:
    r = fab(app, "deploy.rollback", "--dry-run")
    assert r.returncode == 1 and "stages: staging, production" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["deploy.rollback", "--dry-run", "staging"],
            "stage staging comes after deploy.rollback; name the stage first",
        ),
        (
            ["staging", "deploy.rollback", "--dry-run", "production"],
            "stage production comes after deploy.rollback",
        ),
        (["staging", "production", "deploy.rollback", "--dry-run"], "two stages in one run"),
    ],
)
def test_stage_second_or_twice_is_refused_before_anything_runs(
    app: Path, args: list[str], needle: str
) -> None:
    r = fab(app, *args)
    assert r.returncode == 1 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "dry run" not in r.stdout


def test_list_shows_the_stages(app: Path) -> None:
    r = fab(app, "--list")
    assert (
        r.returncode == 0
        and "staging" in r.stdout
        and "production" in r.stdout
        and "deploy.roll" in r.stdout
    )


def test_a_broken_deploy_yml_still_lists_tasks_and_the_task_says_why(app: Path) -> None:
    (app / "deploy.yml").write_text("app: [\n")
    r = fab(app, "--list")
    assert r.returncode == 0 and "deploy.roll" in r.stdout
    r = fab(app, "deploy.rollback", "--dry-run")
    assert r.returncode == 1 and "invalid YAML" in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["production", "deploy.publish", "--from=production"],
            "--from=production is the stage being published",
        ),
        (
            ["production", "deploy.publish", "--from=staging", "--ref=main"],
            "give --ref or --from, not both",
        ),
        (
            ["production", "deploy.publish", "--from=qa"],
            "unknown stage 'qa'; stages: staging, production",
        ),
    ],
)
def test_promotion_refusals(app: Path, args: list[str], needle: str) -> None:
    r = fab(app, *args)
    assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, (
        r.stderr
    )
