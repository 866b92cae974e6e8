"""The node program's `check` (deploy.check's node part): reads the pointer with the node's
own credentials, reports free space, asks the health check once. Changes nothing.

Runs on Python 3.8+ with only pytest (no fabdeploy package, no boto3: S3 is a fake client)."""

from __future__ import annotations

import io
import json
import os
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from node_program import node
from test_node_health import app_on, deploy, make_cfg

POINTER = {"key": "shop/bundles/c1.tar.gz", "commit": "c1", "sha256": "a" * 64, "size": 10}


class Denied(Exception):
    response = {"Error": {"Code": "AccessDenied"}}


class Client:
    def __init__(self, body: Any = None, error: Exception | None = None) -> None:
        self.body, self.error, self.asked = body, error, []

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        self.asked.append((Bucket, Key))
        if self.error is not None:
            raise self.error
        return {"Body": io.BytesIO(json.dumps(self.body).encode())}


@pytest.fixture(autouse=True)
def _no_ssh_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_CONNECTION", raising=False)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_check_reads_the_pointer_reports_space_and_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(POINTER)
    monkeypatch.setattr(node, "s3_client", lambda cfg: client)
    with app_on() as app:
        cfg = make_cfg(tmp_path, {"url": f"http://{{host}}:{app.port}/health"})
        deploy(cfg, tmp_path, "c1")
        before = tree(tmp_path / "srv")
        out = node.preflight(cfg)
    assert client.asked == [("b", "shop/published.json")]
    assert out["pointer"] == {
        "uri": "s3://b/shop/published.json",
        "ok": True,
        "commit": "c1",
        "bundle_id": "c1",
    }
    assert out["path"] == str(tmp_path / "srv" / "releases")
    assert abs(out["free"] - node.disk_free(str(tmp_path))) < 1 << 30  # others write too
    assert out["health"]["ok"] is True and "answered 200" in out["health"]["detail"]
    assert tree(tmp_path / "srv") == before  # changes nothing


def test_check_says_why_the_node_cannot_read_the_pointer_and_asks_health_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node, "s3_client", lambda cfg: Client(error=Denied("no")))
    # Nothing listens there; health.timeout is long, but the check probes once and answers.
    cfg = make_cfg(tmp_path, {"url": "http://127.0.0.1:9/health", "timeout": 60})
    deploy(cfg, tmp_path, "c1")
    t0 = time.monotonic()
    out = node.preflight(cfg)
    assert time.monotonic() - t0 < 10
    assert out["pointer"]["ok"] is False and out["pointer"]["code"] == "AccessDenied"
    assert "access denied reading pointer s3://b/shop/published.json" in out["pointer"]["error"]
    assert out["health"]["ok"] is False
    assert out["health"]["detail"].startswith("health check failed")


def test_check_before_the_first_deploy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Missing(Exception):
        response = {"Error": {"Code": "NoSuchKey"}}

    monkeypatch.setattr(node, "s3_client", lambda cfg: Client(error=Missing()))
    cfg = make_cfg(tmp_path, {"command": "true"}, deploy_to=str(tmp_path / "not" / "yet"))
    out = node.preflight(cfg)
    assert out["pointer"]["code"] == "NoSuchKey"
    assert out["path"] == str(tmp_path) and out["free"] > 0  # the filesystem it will be on
    assert out["health"] == {"ok": None, "detail": "no current release yet"}
    assert not os.path.exists(tmp_path / "not")


def test_check_is_a_command_of_the_node_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node, "s3_client", lambda cfg: Client(POINTER))
    make_cfg(tmp_path, {})
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = node.main(["--config", str(tmp_path / "node.json"), "check"])
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert code == 0 and out["ok"] and out["pointer"]["ok"] and out["health"] is None
