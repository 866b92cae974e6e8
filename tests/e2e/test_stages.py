"""Stages on a real fleet: staging's publish and hotfix never move production's pointer or
touch its hosts. web1 is production, web2 staging; one bucket, one prefix per stage."""

from __future__ import annotations

import json

import boto3
import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("stages"), subnet="127.0.38", hosts=2)
    yield f
    sandbox.down(f.sb.dir)


def pointer(fleet: Fleet, prefix: str) -> str | None:
    s3 = boto3.client(
        "s3",
        endpoint_url=fleet.sb.s3_direct,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    try:
        body = s3.get_object(Bucket=fleet.sb.bucket, Key=f"{prefix}/published.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)["commit"]


def test_staging_never_moves_production(fleet: Fleet) -> None:
    # The sandbox's explicit prefix (shop) stays production's; staging gets its own.
    cfg = fleet.variant(
        "stages",
        stages={
            "production": {"hosts": ["web1"]},
            "staging": {"hosts": ["web2"], "s3": {"prefix": "shop/staging"}},
        },
    )
    old = fleet.git("rev-parse", "HEAD")
    fleet.fab("production", "deploy.publish", config=cfg)
    assert pointer(fleet, "shop") == old

    new = fleet.commit("staging only")
    fleet.fab("staging", "deploy.publish", config=cfg)
    assert pointer(fleet, "shop/staging") == new and pointer(fleet, "shop") == old

    fleet.fab("staging", "deploy.setup", config=cfg)
    r = fleet.fab("staging", "deploy.hotfix", config=cfg)
    assert "web1" not in r.stdout and fleet.revision("web2") == new
    assert fleet.ssh("web1", "test -e /srv/shop/current && echo yes || echo no").strip() == "no"
    assert pointer(fleet, "shop") == old

    r = fleet.fab("staging", "deploy.status", "--json", config=cfg)
    out = json.loads(r.stdout)
    assert out["stage"] == "staging" and [h["host"] for h in out["hosts"]] == ["web2"]

    r = fleet.fab("deploy.status", config=cfg, check=False)
    assert r.returncode == 1 and "stages: production, staging" in r.stderr


def test_promotion_publishes_stagings_exact_bytes(fleet: Fleet) -> None:
    cfg = fleet.sb.deploy_yml.with_name("deploy-stages.yml")  # written by the test above
    staged = pointer(fleet, "shop/staging")
    assert staged is not None and pointer(fleet, "shop") != staged
    fleet.commit("not promoted: promotion takes staging's pointer, never HEAD")
    r = fleet.fab("production", "deploy.publish", "--from=staging", config=cfg)
    assert f"copied {staged[:12]} from stage staging" in r.stdout
    assert pointer(fleet, "shop") == staged and pointer(fleet, "shop/staging") == staged

    s3 = boto3.client(
        "s3",
        endpoint_url=fleet.sb.s3_direct,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    body = {
        p: s3.get_object(Bucket=fleet.sb.bucket, Key=f"{p}/bundles/{staged}.tar.gz")["Body"].read()
        for p in ("shop", "shop/staging")
    }
    assert body["shop"] == body["shop/staging"]

    r = fleet.fab(
        "production", "deploy.publish", "--from=staging", config=cfg
    )  # again: nothing to do
    assert "nothing copied" in r.stdout and "already published" in r.stdout
