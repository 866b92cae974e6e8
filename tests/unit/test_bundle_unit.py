"""Pure logic of fabdeploy.adapters.bundle / .store: no S3 server.

Error mapping for responses moto cannot produce (AccessDenied: moto's server
accepts any credentials) is checked with botocore's Stubber on a real client.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gitrepo import GIT_ENV, git  # noqa: E402,F401

from fabdeploy.adapters.bundle import (
    BundleError,
    archive,
    dirty_files,
    has_submodules,
    local_user,
    resolve_commit,
    submodule_paths,
)
from fabdeploy.adapters.store import (
    HISTORY_SPAN,
    PART_SIZE,
    ConflictError,
    Lock,
    Pointer,
    Store,
    StoreError,
    _chunks,
    _file_slices,
    _meta_value,
)
from fabdeploy.basics.config import S3Config


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "app"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "app.py").write_text("print('hello')\n" * 100)
    (r / "lib").mkdir()
    (r / "lib" / "data.bin").write_bytes(bytes(range(256)) * 64)
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "one")
    return r


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def store(prefix: str = "shop", endpoint: str | None = "http://127.0.0.1:9") -> Store:
    return Store(
        S3Config("bkt", prefix, "us-east-1", endpoint), "shop", config_path=Path("/x/deploy.yml")
    )


# --- naming -----------------------------------------------------------------------------


def test_keys_and_uris() -> None:
    s = store()
    assert s.bundle_key("abc") == "shop/bundles/abc.tar.gz"
    assert s.uri(s.bundle_key("abc")) == "s3://bkt/shop/bundles/abc.tar.gz"
    assert s.pointer_key == "shop/published.json"
    assert s.lock_key == "shop/lock.json"
    assert s.history_prefix == "shop/history/"
    assert store(prefix="").bundle_key("abc") == "bundles/abc.tar.gz"


def test_history_keys_sort_newest_first() -> None:
    keys = [
        f"{HISTORY_SPAN - ms:013d}"
        for ms in (1_700_000_000_000, 1_700_000_000_001, 1_800_000_000_000)
    ]
    assert sorted(keys) == list(reversed(keys))
    assert {len(k) for k in keys} == {13}


def test_local_user_has_host() -> None:
    user, _, host = local_user().partition("@")
    assert user and host


# --- pointer / lock JSON --------------------------------------------------------------------


def pointer(**kw: object) -> Pointer:
    base: dict[str, object] = dict(
        key="shop/bundles/a.tar.gz",
        commit="a" * 40,
        sha256="b" * 64,
        ref="main",
        size=10,
        published_by="me@host",
        published_at="2024-01-01T00:00:00Z",
        committed_at=1,
    )
    base.update(kw)
    return Pointer(**base)  # type: ignore[arg-type]


def test_pointer_round_trip() -> None:
    p = pointer()
    assert Pointer.from_json(p.to_json(), "s3://bkt/p") == p
    assert Pointer.from_json(pointer(committed_at=None).to_json(), "w").committed_at is None


@pytest.mark.parametrize(
    "data, words",
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"key": "k"}).encode(), "lacks commit"),
        (json.dumps({**json.loads(pointer().to_json()), "size": "big"}).encode(), "invalid size"),
        (json.dumps({**json.loads(pointer().to_json()), "commit": ""}).encode(), "invalid commit"),
    ],
)
def test_pointer_invalid(data: bytes, words: str) -> None:
    with pytest.raises(StoreError) as e:
        Pointer.from_json(data, "s3://bkt/shop/published.json")
    assert "s3://bkt/shop/published.json" in str(e.value) and words in str(e.value)


def test_lock_json_and_age() -> None:
    now = time.time()
    lock = Lock("me@host", "roll", now - 90, now + 10, etag='"e"')
    back = Lock.from_json(lock.to_json(), "w", '"e"')
    assert back == lock
    assert 89 <= back.age < 100 and not back.expired
    assert "me@host (roll) for 1m3" in back.describe()
    with pytest.raises(StoreError, match="not a valid lock"):
        Lock.from_json(b"{}", "s3://bkt/shop/lock.json", None)


def test_held_lock_messages() -> None:
    now = time.time()
    fresh = Store._held_message(Lock("ann@a", "deploy.roll", now - 5, now + 600))
    assert fresh.startswith("deploy lock held by ann@a (deploy.roll) for 5s")
    assert "expires in" in fresh and "fab deploy.unlock --force" in fresh
    stale = Store._held_message(Lock("bob@b", "hotfix", now - 7200, now - 3600))
    assert "expired 1h00m ago" in stale and "run `fab deploy.unlock`" in stale


def test_metadata_values_are_header_safe() -> None:
    assert _meta_value("main") == "main"
    assert _meta_value(12) == "12"
    assert _meta_value("feature/über") == "feature%2F%C3%BCber"
    assert _meta_value("a\nb") == "a%0Ab"


# --- streaming helpers -------------------------------------------------------------------------


class Trickle(io.RawIOBase):
    """A pipe-like reader that returns short reads."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = min(n if n >= 0 else len(self.data), 1000)
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_chunks_recut_to_part_size() -> None:
    data = os.urandom(10_000)
    parts = list(_chunks(Trickle(data), 4096))
    assert [len(p) for p in parts] == [4096, 4096, 1808] and b"".join(parts) == data
    parts = list(_chunks([data[:3], data[3:5000], data[5000:]], 4096))
    assert [len(p) for p in parts] == [4096, 4096, 1808] and b"".join(parts) == data
    assert list(_chunks(io.BytesIO(b""), 4096)) == []


def test_file_slices_read_without_copying_whole_parts(tmp_path: Path) -> None:
    data = os.urandom(PART_SIZE * 2 + 123)
    f = (tmp_path / "b").open("w+b")
    f.write(data)
    f.seek(0)
    slices = list(_file_slices(f, len(data)) or [])
    assert [len(s) for s in slices] == [PART_SIZE, PART_SIZE, 123]
    assert b"".join(s.read() for s in slices) == data
    s = slices[2]
    s.seek(0)
    assert s.read(10) == data[2 * PART_SIZE : 2 * PART_SIZE + 10]
    assert s.seek(0, io.SEEK_END) == 123 and s.read() == b""
    assert _file_slices(io.BytesIO(data), None) is None  # no fd: fall back to chunks
    assert _file_slices(f, 5) is None  # size mismatch: don't trust the file


# --- git side ----------------------------------------------------------------------------------


def test_resolve_commit(repo: Path) -> None:
    sha, epoch = resolve_commit(repo, "HEAD")
    assert len(sha) == 40 and epoch == 1704067200
    assert resolve_commit(repo, "main")[0] == sha
    assert resolve_commit(repo, sha[:8])[0] == sha


@pytest.mark.parametrize(
    "ref, words",
    [
        ("nope", "unknown ref 'nope' in repo"),
        ("-x", "invalid ref '-x'"),
        ("HEAD~5", "unknown ref 'HEAD~5'"),
    ],
)
def test_resolve_commit_bad_ref(repo: Path, ref: str, words: str) -> None:
    with pytest.raises(BundleError) as e:
        resolve_commit(repo, ref)
    assert words in str(e.value) and str(repo) in str(e.value)


def test_resolve_commit_not_a_repo(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    # GIT_CEILING_DIRECTORIES: a repo around tmp would otherwise be found
    os.environ["GIT_CEILING_DIRECTORIES"] = str(tmp_path)
    try:
        with pytest.raises(BundleError, match=f"{plain} is not a git repository"):
            resolve_commit(plain, "HEAD")
    finally:
        del os.environ["GIT_CEILING_DIRECTORIES"]


def test_resolve_commit_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=f"repo {tmp_path / 'gone'} does not exist"):
        resolve_commit(tmp_path / "gone", "HEAD")


def test_archive_is_deterministic_gzip_of_git_archive(repo: Path, tmp_path: Path) -> None:
    sha, _ = resolve_commit(repo, "HEAD")
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        digest, size = archive(repo, sha, buf)
        data = buf.getvalue()
        assert digest == hashlib.sha256(data).hexdigest() and size == len(data)
        outs.append(data)
    assert outs[0] == outs[1]
    header = outs[0][:10]
    assert (
        header[:3] == b"\x1f\x8b\x08" and header[3] == 0 and header[4:8] == b"\0\0\0\0"
    )  # no name, mtime 0
    tar = subprocess.run(
        ["git", "-C", str(repo), "-c", "tar.umask=0022", "archive", "--format=tar", sha],
        capture_output=True,
        check=True,
    )
    assert gzip.decompress(outs[0]) == tar.stdout


def test_archive_failure_is_one_line(repo: Path) -> None:
    with pytest.raises(BundleError, match="git archive of 000000000000 in .* failed"):
        archive(repo, "0" * 40, io.BytesIO())


def test_dirty_files(repo: Path) -> None:
    assert dirty_files(repo) == []
    (repo / "app.py").write_text("changed\n")
    (repo / "new file.txt").write_text("x")
    git(repo, "mv", "lib/data.bin", "lib/moved.bin")
    assert sorted(dirty_files(repo)) == ["app.py", "lib/moved.bin", "new file.txt"]


def test_submodules(repo: Path) -> None:
    sha, _ = resolve_commit(repo, "HEAD")
    assert not has_submodules(repo, sha)
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{sha},vendor/lib")
    git(repo, "commit", "-q", "-m", "sub")
    sha2, _ = resolve_commit(repo, "HEAD")
    assert submodule_paths(repo, sha2) == ["vendor/lib"] and has_submodules(repo, sha2)


# --- error mapping ----------------------------------------------------------------------------


def stubbed(s: Store, method: str, code: str, status: int) -> object:
    from botocore.stub import Stubber

    stub = Stubber(s.client)
    stub.add_client_error(method, service_error_code=code, http_status_code=status)
    stub.activate()
    return stub


@pytest.mark.parametrize("code", ["AccessDenied", "403"])
def test_access_denied(creds: None, code: str) -> None:
    s = store()
    stubbed(s, "head_object", code, 403)
    with pytest.raises(StoreError) as e:
        s.head_bundle("abc")
    msg = str(e.value)
    assert msg.startswith("access denied to s3://bkt/shop/bundles/abc.tar.gz")
    assert "s3:GetObject" in msg and "IAM policy" in msg


def test_bad_credentials(creds: None) -> None:
    s = store()
    stubbed(s, "get_object", "InvalidAccessKeyId", 403)
    with pytest.raises(StoreError, match="rejected the AWS credentials .InvalidAccessKeyId"):
        s.read_pointer()


def test_no_such_bucket(creds: None) -> None:
    s = store()
    stubbed(s, "put_object", "NoSuchBucket", 404)
    with pytest.raises(StoreError) as e:
        s.upload_bundle(io.BytesIO(b"x"), "abc", {}, 1)
    assert str(e.value) == (
        "bucket bkt does not exist at http://127.0.0.1:9: create it or fix s3.bucket in /x/deploy.yml"
    )


@pytest.mark.parametrize(
    "code, status", [("PreconditionFailed", 412), ("ConditionalRequestConflict", 409)]
)
def test_conditional_failures_are_conflicts(creds: None, code: str, status: int) -> None:
    s = store()
    stubbed(s, "put_object", code, status)
    with pytest.raises(ConflictError):
        s.upload_bundle(io.BytesIO(b"x"), "abc", {}, 1)


def test_no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no IMDS probing on CI hosts
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(StoreError) as e:
        store().head_bundle("abc")
    assert (
        str(e.value) == "no AWS credentials found: set AWS_PROFILE/AWS_ACCESS_KEY_ID or s3.profile"
    )


def test_unknown_profile(creds: None) -> None:
    s = Store(S3Config("bkt", "shop", "us-east-1", None, profile="nosuch"), "shop")
    with pytest.raises(StoreError, match="AWS profile 'nosuch' .s3.profile. not found"):
        s.head_bundle("abc")


def test_fab_list_does_not_import_boto3() -> None:
    code = "import sys, fabdeploy.adapters.bundle, fabdeploy.adapters.store; sys.exit('boto3' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
    )
