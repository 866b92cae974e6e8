"""Bundle and store against a real moto S3 server process (real HTTP, real botocore).

Uses the shared session fixture `s3_server` (tests/conftest.py); every test
works under its own S3 prefix so they never see each other's objects.
AccessDenied cannot be produced by moto's server (it accepts any credentials),
so that mapping is tested with botocore's Stubber in tests/unit/test_bundle_unit.py.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from fabdeploy.adapters.bundle import Bundle, BundleError, build_and_upload, ensure_bundle, publish
from fabdeploy.adapters.store import ConflictError, Pointer, Store, StoreError
from fabdeploy.basics.config import Config, Host, S3Config

pytestmark = pytest.mark.e2e

from gitrepo import GIT_ENV, git  # noqa: E402,F401


def commit_all(repo: Path, msg: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials and a private HOME: nothing may read the user's ~/.aws."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "app"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "app.py").write_text("print('hello')\n" * 200)
    (r / "static").mkdir()
    (r / "static" / "logo.bin").write_bytes(hashlib.sha256(b"seed").digest() * 500)
    commit_all(r, "one")
    return r


def make_cfg(repo: Path, endpoint: str, bucket: str, prefix: str | None = None) -> Config:
    return Config(
        path=repo.parent / "deploy.yml",
        app="shop",
        repo=repo,
        s3=S3Config(bucket, prefix or f"t-{uuid.uuid4().hex[:10]}", "us-east-1", endpoint),
        deploy_to="/srv/shop",
        hosts=(Host("web1", "web1"),),
    )


@pytest.fixture
def cfg(repo: Path, s3_server) -> Config:  # type: ignore[no-untyped-def]
    return make_cfg(repo, s3_server.endpoint, s3_server.bucket)


@pytest.fixture
def store(cfg: Config) -> Store:
    return Store(cfg.s3, cfg.app, config_path=cfg.path)


class Lines(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)

    def text(self) -> str:
        return "\n".join(self)


def head(store: Store, key: str) -> dict:
    return store.client.head_object(Bucket=store.s3.bucket, Key=key)


# --- round trip -------------------------------------------------------------------------------


def test_round_trip_is_git_archive_and_idempotent(cfg: Config, store: Store, repo: Path) -> None:
    log = Lines()
    b = ensure_bundle(cfg, store, log=log)
    assert (
        b.uploaded and b.ref == "main" and b.committed_at == 1704067200
    )  # HEAD named as its branch
    assert (
        b.key == f"{cfg.s3.prefix}/bundles/{b.commit}.tar.gz"
        and b.uri == f"s3://{cfg.s3.bucket}/{b.key}"
    )
    assert b.uri in log.text() and b.commit in log.text() and b.sha256 in log.text()

    data = store.open_bundle(b.commit).read()
    assert hashlib.sha256(data).hexdigest() == b.sha256 and len(data) == b.size
    tar = subprocess.run(
        ["git", "-C", str(repo), "-c", "tar.umask=0022", "archive", "--format=tar", b.commit],
        capture_output=True,
        check=True,
    )
    assert gzip.decompress(data) == tar.stdout

    meta = store.head_bundle(b.commit)
    assert meta is not None
    assert {k: meta[k] for k in ("commit", "ref", "sha256", "size", "app", "committed-at")} == {
        "commit": b.commit,
        "ref": "main",
        "sha256": b.sha256,
        "size": str(b.size),
        "app": "shop",
        "committed-at": "1704067200",
    }
    assert meta["built-by"] and meta["built-at"].endswith("Z")

    # nodes fetch with plain urllib through a presigned URL
    with urllib.request.urlopen(store.presign_bundle(b.commit, expires=60)) as r:
        assert r.read() == data

    before = head(store, b.key)
    log2 = Lines()
    again = ensure_bundle(cfg, store, log=log2)
    assert not again.uploaded and again.sha256 == b.sha256
    assert "already in" in log2.text() and "nothing uploaded" in log2.text()
    rebuilt = build_and_upload(cfg, store, log=Lines())  # rebuilds and compares: same bytes
    assert not rebuilt.uploaded and rebuilt.sha256 == b.sha256
    after = head(store, b.key)
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])

    (repo / "app.py").write_text("print('two')\n")
    c2 = commit_all(repo, "two")
    b2 = ensure_bundle(cfg, store, log=Lines())
    assert b2.commit == c2 != b.commit and b2.key != b.key and b2.uploaded
    # an explicit older ref still maps to the first bundle
    assert ensure_bundle(cfg, store, ref=b.commit[:10], log=Lines()).key == b.key


def test_multipart_bundle(cfg: Config, store: Store, repo: Path) -> None:
    """Bigger than one part: the multipart path, byte-identical, no stray uploads."""
    (repo / "big.bin").write_bytes(os.urandom(19 * 1024 * 1024))
    commit_all(repo, "big")
    b = ensure_bundle(cfg, store, log=Lines())
    assert b.uploaded and b.size > 2 * 8 * 1024 * 1024
    assert hashlib.sha256(store.open_bundle(b.commit).read()).hexdigest() == b.sha256
    assert head(store, b.key)["ETag"].strip('"').endswith("-3")
    uploads = store.client.list_multipart_uploads(Bucket=store.s3.bucket, Prefix=cfg.s3.prefix)
    assert not uploads.get("Uploads")


def test_two_builds_same_sha_and_two_builders_never_overwrite(
    cfg: Config, store: Store, repo: Path
) -> None:
    b = ensure_bundle(cfg, store, log=Lines())
    other = make_cfg(repo, cfg.s3.endpoint_url or "", cfg.s3.bucket)  # fresh prefix
    b2 = ensure_bundle(other, Store(other.s3, other.app), log=Lines())
    assert b2.sha256 == b.sha256 and b2.uploaded
    with pytest.raises(ConflictError):
        store.upload_bundle(iter([b"other bytes"]), b.commit, {"sha256": "x"}, None)
    assert hashlib.sha256(store.open_bundle(b.commit).read()).hexdigest() == b.sha256


# --- error paths --------------------------------------------------------------------------------


def test_existing_bundle_with_other_sha256(cfg: Config, store: Store, repo: Path) -> None:
    sha = git(repo, "rev-parse", "HEAD").strip()
    store.client.put_object(
        Bucket=store.s3.bucket,
        Key=store.bundle_key(sha),
        Body=b"not this",
        Metadata={"sha256": "0" * 64, "size": "8", "commit": sha},
    )
    # Trusted without --verify (the commit names the content) ...
    assert ensure_bundle(cfg, store, log=Lines()).sha256 == "0" * 64
    # ... and caught by a rebuild.
    for build in (
        lambda: ensure_bundle(cfg, store, log=Lines(), verify=True),
        lambda: build_and_upload(cfg, store, log=Lines()),
    ):
        with pytest.raises(BundleError) as e:
            build()
        msg = str(e.value)
        assert msg.startswith(
            f"s3://{cfg.s3.bucket}/{store.bundle_key(sha)} exists with sha256 {'0' * 64} but this build is "
        )
        assert "something else wrote it; investigate before deploying" in msg


def test_existing_object_without_metadata_is_rebuilt_and_compared(
    cfg: Config, store: Store, repo: Path
) -> None:
    sha = git(repo, "rev-parse", "HEAD").strip()
    store.client.put_object(Bucket=store.s3.bucket, Key=store.bundle_key(sha), Body=b"?")
    # No sha256 to compare against, and the conditional create refuses to overwrite.
    with pytest.raises(BundleError, match="exists with sha256 <none>"):
        ensure_bundle(cfg, store, log=Lines())


def test_unknown_ref(cfg: Config, store: Store, repo: Path) -> None:
    with pytest.raises(BundleError, match=f"unknown ref 'v9.9' in repo {repo}"):
        ensure_bundle(cfg, store, ref="v9.9", log=Lines())


def test_not_a_git_repo(tmp_path: Path, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    c = make_cfg(plain, s3_server.endpoint, s3_server.bucket)
    with pytest.raises(BundleError, match=f"{plain} is not a git repository"):
        ensure_bundle(c, Store(c.s3, c.app), log=Lines())


def test_missing_repo_path(tmp_path: Path, s3_server) -> None:  # type: ignore[no-untyped-def]
    c = make_cfg(tmp_path / "gone", s3_server.endpoint, s3_server.bucket)
    with pytest.raises(BundleError, match="does not exist: fix `repo` in deploy.yml"):
        ensure_bundle(c, Store(c.s3, c.app), log=Lines())


def test_missing_bucket(repo: Path, s3_server) -> None:  # type: ignore[no-untyped-def]
    c = make_cfg(repo, s3_server.endpoint, "no-such-bucket-here")
    with pytest.raises(StoreError) as e:
        ensure_bundle(c, Store(c.s3, c.app, config_path=c.path), log=Lines())
    assert str(e.value) == (
        f"bucket no-such-bucket-here does not exist at {s3_server.endpoint}: "
        f"create it or fix s3.bucket in {c.path}"
    )
    with pytest.raises(StoreError, match="bucket no-such-bucket-here does not exist"):
        Store(c.s3, c.app).read_pointer()


def test_unreachable_endpoint(repo: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    endpoint = f"http://127.0.0.1:{port}"
    c = make_cfg(repo, endpoint, "bkt-x")
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        ensure_bundle(c, Store(c.s3, c.app), log=Lines())
    assert str(e.value).startswith(f"cannot reach S3 endpoint {endpoint} (")
    assert str(e.value).endswith("is it up?")
    assert time.monotonic() - t0 < 30


def test_dirty_tree_warning(cfg: Config, store: Store, repo: Path) -> None:
    (repo / "app.py").write_text("local edit\n")
    for i in range(12):
        (repo / f"new{i:02d}.txt").write_text("x")
    log = Lines()
    b = ensure_bundle(cfg, store, log=log)
    warning = next(line for line in log if "uncommitted" in line)
    assert warning.startswith(
        "warning: uncommitted changes are NOT in the bundle: app.py, new00.txt"
    )
    assert warning.endswith("and 3 more")
    assert gzip.decompress(store.open_bundle(b.commit).read()).count(b"local edit") == 0
    # The working tree is irrelevant when bundling another commit than HEAD.
    first = git(repo, "rev-parse", "HEAD").strip()
    (repo / "app.py").write_text("print('v2')\n")
    git(repo, "commit", "-q", "-am", "v2")
    log = Lines()
    ensure_bundle(cfg, store, ref=first, log=log)
    assert not any("uncommitted" in line for line in log)


def test_submodule_warning(cfg: Config, store: Store, repo: Path) -> None:
    sha = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{sha},vendor/lib")
    git(repo, "commit", "-q", "-m", "sub")
    log = Lines()
    ensure_bundle(cfg, store, log=log)
    assert "warning: submodules are not included in the bundle: vendor/lib" in log


# --- pointer -----------------------------------------------------------------------------------


def test_publish_and_idempotence(cfg: Config, store: Store, repo: Path) -> None:
    assert store.read_pointer() == (None, None)
    log = Lines()
    b, p = publish(cfg, store, log=log)
    assert (
        isinstance(b, Bundle) and p.commit == b.commit and p.key == b.key and p.sha256 == b.sha256
    )
    assert "first publish" in log.text()
    current, etag = store.read_pointer()
    assert current == p and etag
    log = Lines()
    _, p2 = publish(cfg, store, log=log)
    assert p2 == p and "already published" in log.text() and "nothing changed" in log.text()
    assert store.read_pointer()[1] == etag  # not rewritten


def test_pointer_conflicts(cfg: Config, store: Store) -> None:
    def ptr(commit: str, who: str) -> Pointer:
        return Pointer(
            store.bundle_key(commit), commit, "s" * 64, "main", 1, who, "2024-01-01T00:00:00Z"
        )

    first = store.write_pointer(ptr("a" * 40, "ann@a"), None)
    # first write with If-None-Match while one exists -> conflict
    with pytest.raises(ConflictError) as e:
        store.write_pointer(ptr("b" * 40, "bob@b"), None)
    assert "ann@a published aaaaaaaaaaaa (main)" in str(e.value) and "lost a race" in str(e.value)
    # two writers read the same etag; the second loses and learns who won
    store.write_pointer(ptr("c" * 40, "cat@c"), first)
    with pytest.raises(
        ConflictError, match="cat@c published cccccccccccc .main. at 2024-01-01T00:00:00Z meanwhile"
    ):
        store.write_pointer(ptr("d" * 40, "dan@d"), first)
    assert store.read_pointer()[0].commit == "c" * 40  # type: ignore[union-attr]


def test_pointer_history_newest_first(cfg: Config, store: Store) -> None:
    etag = None
    for c in "abc":
        p = Pointer(
            store.bundle_key(c * 40), c * 40, "s" * 64, "main", 1, "me@h", "2024-01-01T00:00:00Z"
        )
        etag = store.write_pointer(p, etag)
        time.sleep(0.005)  # distinct millisecond keys
    assert [p.commit[0] for p in store.pointer_history()] == ["c", "b", "a"]
    assert [p.commit[0] for p in store.pointer_history(limit=2)] == ["c", "b"]


def test_corrupt_pointer(store: Store) -> None:
    store.client.put_object(Bucket=store.s3.bucket, Key=store.pointer_key, Body=b"{oops")
    with pytest.raises(StoreError, match=f"{store.uri(store.pointer_key)} is not valid JSON"):
        store.read_pointer()


# --- lock --------------------------------------------------------------------------------------


def test_lock_lifecycle(store: Store) -> None:
    assert store.read_lock() is None
    lock = store.acquire_lock("ann@laptop", "deploy.roll", expiry=600)
    assert lock.etag and store.read_lock() == lock
    with pytest.raises(StoreError) as e:
        store.acquire_lock("bob@desk", "deploy.hotfix", expiry=600)
    msg = str(e.value)
    assert msg.startswith("deploy lock held by ann@laptop (deploy.roll) for 0s (expires in 9m")
    assert "wait, or if it is stale run `fab deploy.unlock --force`" in msg
    with pytest.raises(StoreError, match="has not expired"):
        store.break_lock()
    store.release_lock(lock)
    assert store.read_lock() is None
    store.release_lock(lock)  # already gone: fine


def test_expired_lock_and_break(store: Store) -> None:
    stale = store.acquire_lock("ann@laptop", "deploy.roll", expiry=0.05)
    time.sleep(0.1)
    with pytest.raises(StoreError) as e:
        store.acquire_lock("bob@desk", "deploy.roll", expiry=600)
    assert "held by ann@laptop (deploy.roll)" in str(e.value) and "expired 0s ago" in str(e.value)
    assert "run `fab deploy.unlock`" in str(e.value)
    broken = store.break_lock()
    assert broken is not None and broken.holder == "ann@laptop"
    assert store.break_lock() is None
    mine = store.acquire_lock("bob@desk", "deploy.roll", expiry=600)
    # ann's late release must not remove bob's lock
    with pytest.raises(ConflictError, match="now held by bob@desk"):
        store.release_lock(stale)
    assert store.read_lock() == mine
    assert store.break_lock(force=True) == mine
    assert store.read_lock() is None
