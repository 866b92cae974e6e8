"""Linked files fetched from their source (SSM, Secrets Manager, S3) by the node itself, at boot
and on hotfix: written 0600 and atomically, not rewritten when unchanged, the last good copy kept
when the source cannot be read.

Same rules as test_node_program.py: Python 3.8+, pytest only, node.py loaded as a file. The AWS
clients are fakes (node.aws_client is replaced): the e2e tests use a real moto server.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from node_program import node
from test_node_program import T0, deploy, good_bundle, make_cfg, pointer_for

DB = "config/database.yml"


class FakeError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code, "Message": f"{code} happened"}}


class FakeAWS:
    """Stands in for node.aws_client: one store of values for ssm, secretsmanager and s3."""

    def __init__(self) -> None:
        self.ssm: dict[str, str] = {}
        self.secrets: dict[str, Any] = {}
        self.objects: dict[tuple[str, str], bytes] = {}
        self.fail: Exception | None = None
        self.made: list[tuple[str, Any, Any]] = []
        self.reads = 0

    def __call__(self, cfg: Any, service: str, region: Any, endpoint: Any) -> Any:
        self.made.append((service, region, endpoint))
        return _FakeClient(self)


class _FakeClient:
    def __init__(self, aws: FakeAWS) -> None:
        self.aws = aws

    def _check(self) -> None:
        self.aws.reads += 1
        if self.aws.fail is not None:
            raise self.aws.fail

    def get_parameter(self, Name: str, WithDecryption: bool) -> dict[str, Any]:  # noqa: N803
        self._check()
        assert WithDecryption, "SecureStrings must be decrypted"
        if Name not in self.aws.ssm:
            raise FakeError("ParameterNotFound")
        return {"Parameter": {"Name": Name, "Value": self.aws.ssm[Name], "Version": 1}}

    def get_secret_value(self, SecretId: str) -> dict[str, Any]:  # noqa: N803
        self._check()
        value = self.aws.secrets[SecretId]
        return {"SecretBinary": value} if isinstance(value, bytes) else {"SecretString": value}

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        self._check()
        return {"Body": io.BytesIO(self.aws.objects[(Bucket, Key)])}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> FakeAWS:
    fake = FakeAWS()
    monkeypatch.setattr(node, "aws_client", fake)
    return fake


def shared_cfg(tmp_path: Path, *files: dict[str, str], **overrides: Any) -> node.Config:
    files = files or ({"path": DB, "ssm": "/shop/database.yml"},)
    return make_cfg(
        tmp_path,
        linked_files=[f["path"] for f in files],
        shared_config={
            "files": list(files),
            "region": "eu-west-1",
            "ssm_endpoint_url": "http://ssm.local:1",
            "secretsmanager_endpoint_url": "http://sm.local:2",
        },
        **overrides,
    )


def test_fetch_writes_0600_atomically_and_leaves_unchanged_content_alone(
    tmp_path: Path, aws: FakeAWS
) -> None:
    cfg = shared_cfg(tmp_path)
    layout = node.Layout(cfg.deploy_to)
    aws.ssm["/shop/database.yml"] = "production:\n  password: s3cret\n"
    first = node.refresh_shared(cfg, layout)
    path = Path(layout.shared, DB)
    assert path.read_text() == "production:\n  password: s3cret\n"
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert (
        first[0]["outcome"] == "written"
        and first[0]["source"] == "SSM parameter /shop/database.yml"
    )
    assert "s3cret" not in repr(first)  # hashes in status.json, never the value
    # The endpoint and region come from node.json, spelled out (old boto3 ignores the env var).
    assert aws.made == [("ssm", "eu-west-1", "http://ssm.local:1")]

    again = node.refresh_shared(cfg, layout)
    assert again[0]["outcome"] == "unchanged"
    assert path.stat().st_ino == st.st_ino and path.stat().st_mtime_ns == st.st_mtime_ns

    aws.ssm["/shop/database.yml"] = "production:\n  password: n3w\n"
    changed = node.refresh_shared(cfg, layout)
    assert changed[0]["outcome"] == "written" and path.read_text().endswith("n3w\n")
    assert path.stat().st_ino != st.st_ino  # a new file renamed over the old one
    assert [p.name for p in path.parent.iterdir()] == ["database.yml"]  # no temp file left
    assert node.read_status(layout)["shared_config"]["files"][0]["outcome"] == "written"


def test_same_content_with_a_loose_mode_is_tightened_not_rewritten(
    tmp_path: Path, aws: FakeAWS
) -> None:
    cfg = shared_cfg(tmp_path)
    layout = node.Layout(cfg.deploy_to)
    path = Path(layout.shared, DB)
    path.parent.mkdir(parents=True)
    path.write_text("same\n")
    path.chmod(0o644)
    ino = path.stat().st_ino
    aws.ssm["/shop/database.yml"] = "same\n"
    assert node.refresh_shared(cfg, layout)[0]["outcome"] == "unchanged"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_ino == ino


def test_unreachable_source_keeps_the_last_good_copy(
    tmp_path: Path, aws: FakeAWS, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = shared_cfg(tmp_path)
    layout = node.Layout(cfg.deploy_to)
    aws.ssm["/shop/database.yml"] = "good\n"
    node.refresh_shared(cfg, layout)
    aws.fail = ConnectionRefusedError("connection refused")
    out = node.refresh_shared(cfg, layout)
    assert out[0]["outcome"] == "kept" and "connection refused" in out[0]["reason"]
    assert Path(layout.shared, DB).read_text() == "good\n"
    err = capsys.readouterr().err
    assert "warning: kept the last good copy of shared/config/database.yml" in err
    assert "SSM parameter /shop/database.yml" in err


def test_no_copy_and_no_source_is_one_line_naming_the_parameter(
    tmp_path: Path, aws: FakeAWS
) -> None:
    cfg = shared_cfg(tmp_path)
    layout = node.Layout(cfg.deploy_to)
    with pytest.raises(node.NodeError) as e:
        node.refresh_shared(cfg, layout)
    msg = e.value.message
    assert "\n" not in msg
    assert "shared/config/database.yml" in msg and "SSM parameter /shop/database.yml" in msg
    assert "does not exist (ParameterNotFound" in msg and "no earlier copy" in msg
    aws.ssm["/shop/database.yml"] = "x"
    aws.fail = FakeError("AccessDeniedException")
    with pytest.raises(node.NodeError, match="ssm:GetParameter and kms:Decrypt"):
        node.refresh_shared(cfg, layout)


def test_secrets_and_s3_objects(tmp_path: Path, aws: FakeAWS) -> None:
    cfg = shared_cfg(
        tmp_path,
        {"path": "config/env", "secret": "shop/env"},
        {"path": "config/master.key", "secret": "shop/key"},
        {"path": "config/settings.json", "s3_bucket": "cfg", "s3_key": "shop/settings.json"},
    )
    layout = node.Layout(cfg.deploy_to)
    aws.secrets["shop/env"] = "A=1\n"
    aws.secrets["shop/key"] = b"\x00\xffbinary"
    aws.objects[("cfg", "shop/settings.json")] = b'{"a": 1}'
    out = node.refresh_shared(cfg, layout)
    assert [e["outcome"] for e in out] == ["written"] * 3
    assert Path(layout.shared, "config/env").read_text() == "A=1\n"
    assert Path(layout.shared, "config/master.key").read_bytes() == b"\x00\xffbinary"
    assert Path(layout.shared, "config/settings.json").read_bytes() == b'{"a": 1}'
    # One client per service, each with its own endpoint; S3 uses the s3 section's.
    assert sorted(aws.made) == [
        ("s3", "us-east-1", None),
        ("secretsmanager", "eu-west-1", "http://sm.local:2"),
    ]


def test_a_symlink_at_the_path_is_replaced_never_followed(tmp_path: Path, aws: FakeAWS) -> None:
    cfg = shared_cfg(tmp_path)
    layout = node.Layout(cfg.deploy_to)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    Path(layout.shared, "config").mkdir(parents=True)
    os.symlink(str(victim), os.path.join(layout.shared, DB))
    aws.ssm["/shop/database.yml"] = "new\n"
    node.refresh_shared(cfg, layout)
    assert victim.read_text() == "keep me\n"
    assert not os.path.islink(os.path.join(layout.shared, DB))
    assert Path(layout.shared, DB).read_text() == "new\n"


def test_a_symlinked_folder_leading_out_of_shared_is_refused(tmp_path: Path, aws: FakeAWS) -> None:
    cfg = shared_cfg(tmp_path)
    layout = node.Layout(cfg.deploy_to)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(layout.shared)
    os.symlink(str(outside), os.path.join(layout.shared, "config"))
    aws.ssm["/shop/database.yml"] = "new\n"
    with pytest.raises(node.NodeError, match="would leave"):
        node.refresh_shared(cfg, layout)
    assert list(outside.iterdir()) == []


def test_hotfix_fetches_config_before_linking(tmp_path: Path, aws: FakeAWS) -> None:
    cfg = shared_cfg(tmp_path)
    aws.ssm["/shop/database.yml"] = "db\n"
    result = deploy(cfg, tmp_path, "c1")
    assert result["changed"] and result["config_changed"] == [DB]
    current = node.read_current(node.Layout(cfg.deploy_to))
    assert current is not None
    assert Path(current.path, DB).read_text() == "db\n"  # through the shared/ link


def test_unchanged_release_with_changed_config_restarts_the_app(
    tmp_path: Path, aws: FakeAWS
) -> None:
    log = tmp_path / "restarts"
    cfg = shared_cfg(tmp_path, restart=f"echo restarted >> {log}")
    aws.ssm["/shop/database.yml"] = "v1\n"
    deploy(cfg, tmp_path, "c1", restart=True)
    assert log.read_text() == "restarted\n"
    same = deploy(cfg, tmp_path, "c1", restart=True)
    assert not same["changed"] and "config_changed" not in same and "restarted" not in same
    assert log.read_text() == "restarted\n"  # nothing changed: no restart

    aws.ssm["/shop/database.yml"] = "v2\n"
    again = deploy(cfg, tmp_path, "c1", restart=True)
    assert not again["changed"] and again["config_changed"] == [DB] and again["restarted"]
    assert log.read_text() == "restarted\nrestarted\n"


def test_boot_fetches_config_even_when_the_release_is_unchanged(
    tmp_path: Path, aws: FakeAWS
) -> None:
    cfg = shared_cfg(tmp_path)
    aws.ssm["/shop/database.yml"] = "v1\n"
    deploy(cfg, tmp_path, "c1")
    aws.ssm["/shop/database.yml"] = "v2\n"
    pointer, _ = pointer_for(tmp_path, "c1")
    result = node.boot(
        cfg, pointer_source=lambda: pointer, source_for=lambda p: pytest.fail("no fetch")
    )
    assert result["outcome"] == "unchanged"
    assert Path(node.Layout(cfg.deploy_to).shared, DB).read_text() == "v2\n"


def test_first_boot_fetches_config_once_then_activates(tmp_path: Path, aws: FakeAWS) -> None:
    cfg = shared_cfg(tmp_path)
    aws.ssm["/shop/database.yml"] = "v1\n"
    pointer, bundle = pointer_for(tmp_path, "c1")
    result = node.boot(
        cfg, pointer_source=lambda: pointer, source_for=lambda p: node.Source("file", str(bundle))
    )
    assert result["outcome"] == "activated"
    assert aws.reads == 1  # not fetched again by the activation
    current = node.read_current(node.Layout(cfg.deploy_to))
    assert current is not None and Path(current.path, DB).read_text() == "v1\n"


def test_first_boot_without_source_or_copy_fails_naming_the_parameter(
    tmp_path: Path, aws: FakeAWS
) -> None:
    cfg = shared_cfg(tmp_path)
    aws.fail = ConnectionRefusedError("connection refused")
    pointer, bundle = pointer_for(tmp_path, "c1")
    sleeps: list[float] = []
    with pytest.raises(node.NodeError) as e:
        node.boot(
            cfg,
            pointer_source=lambda: pointer,
            source_for=lambda p: node.Source("file", str(bundle)),
            sleep=sleeps.append,
        )
    assert "SSM parameter /shop/database.yml" in e.value.message
    assert aws.reads == 4 and len(sleeps) == 3  # retried like a bundle download
    assert not os.path.lexists(node.Layout(cfg.deploy_to).current)


def test_boot_with_source_down_keeps_copy_and_activates(tmp_path: Path, aws: FakeAWS) -> None:
    cfg = shared_cfg(tmp_path)
    aws.ssm["/shop/database.yml"] = "v1\n"
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    aws.fail = ConnectionRefusedError("connection refused")
    pointer, bundle = pointer_for(tmp_path, "c2")
    result = node.boot(
        cfg, pointer_source=lambda: pointer, source_for=lambda p: node.Source("file", str(bundle))
    )
    assert result["outcome"] == "activated" and result["commit"] == "c2"
    layout = node.Layout(cfg.deploy_to)
    assert node.read_status(layout)["shared_config"]["files"][0]["outcome"] == "kept"
    current = node.read_current(layout)
    assert current is not None and Path(current.path, DB).read_text() == "v1\n"


def test_shared_report_gives_hashes_never_content(tmp_path: Path, aws: FakeAWS) -> None:
    cfg = shared_cfg(tmp_path)
    assert node.shared_report(cfg)["files"][0]["copy"] is None
    aws.ssm["/shop/database.yml"] = "a: 1\nb: s3cret"
    report = node.shared_report(cfg, fetch=True)
    copy = report["files"][0]["copy"]
    assert copy["lines"] == 2 and copy["size"] == 14 and copy["mode"] == "0600" and copy["mine"]
    assert len(copy["sha256"]) == 64 and "s3cret" not in repr(report)
    assert report["fetched"][0]["outcome"] == "written"


def test_node_json_without_a_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(node.NodeError, match="names no source"):
        make_cfg(tmp_path, shared_config={"files": [{"path": DB}]})


def test_prepare_reads_but_does_not_write_and_the_switch_restarts_for_new_config(
    tmp_path: Path, aws: FakeAWS
) -> None:
    """`activate --prepare` (hotfix with traffic settings) keeps the host as it is: it only
    says whether the config changed; the switch writes it and restarts the app."""
    log = tmp_path / "restarts"
    cfg = shared_cfg(tmp_path, restart=f"echo restarted >> {log}")
    layout = node.Layout(cfg.deploy_to)
    aws.ssm["/shop/database.yml"] = "v1\n"
    bundle, sha = good_bundle(tmp_path, "c1")
    first = node.prepare(cfg, sha256=sha, commit="c1", source=node.Source("file", str(bundle)))
    assert first["needed"] and not Path(layout.shared, DB).exists()  # fetched at the switch
    node.activate(cfg, sha256=sha, commit="c1", source=node.Source("prepared", ""), restart=True)
    assert Path(layout.shared, DB).read_text() == "v1\n" and log.read_text() == "restarted\n"

    same = node.prepare(cfg, sha256=sha, commit="c1", source=node.Source("file", str(bundle)))
    assert same["changed"] is False and "needed" not in same  # nothing to do at all

    aws.ssm["/shop/database.yml"] = "v2\n"
    pending = node.prepare(cfg, sha256=sha, commit="c1", source=node.Source("file", str(bundle)))
    assert pending["needed"] and pending["config_changed"] == [DB]
    assert Path(layout.shared, DB).read_text() == "v1\n"  # still in traffic: untouched
    done = node.activate(
        cfg, sha256=sha, commit="c1", source=node.Source("prepared", ""), restart=True
    )
    assert done["config_changed"] == [DB] and done["restarted"]
    assert Path(layout.shared, DB).read_text() == "v2\n"
    assert log.read_text() == "restarted\nrestarted\n"


def test_prepare_refuses_a_source_the_switch_could_not_do_without(
    tmp_path: Path, aws: FakeAWS
) -> None:
    cfg = shared_cfg(tmp_path)
    aws.fail = ConnectionRefusedError("connection refused")
    bundle, sha = good_bundle(tmp_path, "c1")
    with pytest.raises(node.NodeError, match="SSM parameter /shop/database.yml.*no earlier copy"):
        node.prepare(cfg, sha256=sha, commit="c1", source=node.Source("file", str(bundle)))


def test_preflight_reads_each_source_with_the_nodes_credentials(
    tmp_path: Path, aws: FakeAWS
) -> None:
    cfg = shared_cfg(
        tmp_path,
        {"path": DB, "ssm": "/shop/database.yml"},
        {"path": "config/env", "secret": "shop/env"},
    )
    aws.ssm["/shop/database.yml"] = "s3cret\n"
    aws.secrets["shop/env"] = "A=1\n"
    out = node.preflight(cfg)
    assert [(s["path"], s["ok"]) for s in out["shared"]] == [(DB, True), ("config/env", True)]
    assert "s3cret" not in repr(out)
    assert not os.path.exists(node.Layout(cfg.deploy_to).shared)  # read, never written
    aws.fail = FakeError("AccessDeniedException")
    bad = node.preflight(cfg)["shared"][0]
    assert not bad["ok"] and "ssm:GetParameter and kms:Decrypt" in bad["error"]
    assert bad["source"] == "SSM parameter /shop/database.yml"


def test_run_once_hooks_see_the_config_the_new_release_will_run_with(
    tmp_path: Path, aws: FakeAWS
) -> None:
    cfg = shared_cfg(tmp_path)
    aws.ssm["/shop/database.yml"] = "old\n"
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    aws.ssm["/shop/database.yml"] = "new\n"  # pushed just before the deploy that migrates
    seen = tmp_path / "seen"
    bundle, sha = good_bundle(tmp_path, "c2")
    node.run_once(
        cfg,
        [node.Hook(f"cat {DB} > {seen}")],
        sha256=sha,
        commit="c2",
        source=node.Source("file", str(bundle)),
        now=lambda: T0 + 5,
    )
    assert seen.read_text() == "new\n"


def test_no_region_says_which_key_to_set(tmp_path: Path, aws: FakeAWS) -> None:
    class NoRegionError(Exception):  # botocore's, by name: the node imports botocore lazily
        pass

    cfg = shared_cfg(tmp_path)
    aws.fail = NoRegionError("You must specify a region.")
    with pytest.raises(node.NodeError, match=r"no AWS region: set config_sources.region"):
        node.refresh_shared(cfg, node.Layout(cfg.deploy_to))
