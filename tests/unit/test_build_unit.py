"""The build step and the deterministic pack (adapters/bundle.py), with real git, sh and tar.

No S3: `_build`'s pieces are called directly, and the store is a small in-memory fake.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from gitrepo import git

from fabdeploy.adapters import bundle as bundles
from fabdeploy.adapters.bundle import archive, build_pack, bundle_id, recipe_json, resolve_commit
from fabdeploy.basics.config import _build
from fabdeploy.basics.errors import BundleError, ConfigError


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "app"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "app.py").write_text("print('hello')\nline two\n")
    (r / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (r / "run.sh").chmod(0o775)
    (r / "lib").mkdir()
    (r / "lib" / "data.bin").write_bytes(bytes(range(256)) * 8)
    (r / "lib" / "notes.txt").write_text("a\nb\n")
    (r / "docs").mkdir()
    (r / "docs" / "big.md").write_text("docs\n")
    os.symlink("lib/notes.txt", r / "notes")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "one")
    return r


def cfg_for(repo: Path, build: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {
        "app": "shop",
        "repo": str(repo),
        "s3": {"bucket": "b"},
        "deploy_to": "/srv/shop",
        "hosts": ["web1"],
    }
    if build is not None:
        data["build"] = build
    return _build(data, repo / "deploy.yml")


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        return {m.name: m for m in tf.getmembers()}


def hostile_git_config(repo: Path) -> None:
    """What today changes the bytes of the same commit: a group-writable umask, CRLF checkouts."""
    git(repo, "config", "tar.umask", "0000")
    git(repo, "config", "core.autocrlf", "true")
    git(repo, "config", "core.eol", "crlf")


BUILD = {
    "commands": [
        "mkdir -p vendor/pkg && printf 'v1\\n' > vendor/pkg/__init__.py",
        "touch -d 2001-01-01 vendor/pkg/__init__.py; chmod 666 vendor/pkg/__init__.py",
    ],
    "exclude": ["docs"],
}


# --- recipe identity ----------------------------------------------------------------------


def test_no_recipe_keeps_the_commit_as_id(repo: Path) -> None:
    cfg = cfg_for(repo)
    assert cfg.build.recipe is None and recipe_json(cfg.build) is None
    assert bundle_id("a" * 40, cfg.build) == "a" * 40


def test_recipe_identity_covers_commands_and_rules(repo: Path) -> None:
    a = cfg_for(repo, {"commands": ["make"]}).build
    same = cfg_for(repo, {"commands": "make"}).build  # one command may be given as a string
    other_cmd = cfg_for(repo, {"commands": ["make all"]}).build
    other_rules = cfg_for(repo, {"commands": ["make"], "exclude": ["*.map"]}).build
    ids = {bundle_id("c" * 40, b) for b in (a, other_cmd, other_rules)}
    assert len(ids) == 3
    assert bundle_id("c" * 40, a) == bundle_id("c" * 40, same)
    assert all(i.startswith("c" * 40 + "-") and len(i) == 40 + 1 + 12 for i in ids)
    assert recipe_json(a) == '{"commands":["make"],"exclude":[],"include":[]}'


@pytest.mark.parametrize(
    "bad",
    [{"commands": [""]}, {"exclude": ["/abs"]}, {"include": ["../up"]}, {"shell": "bash"}, "make"],
)
def test_build_section_is_validated(repo: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match="build"):
        cfg_for(repo, bad)


# --- determinism ---------------------------------------------------------------------------


def test_git_archive_bytes_ignore_the_builders_git_config(repo: Path) -> None:
    sha, _ = resolve_commit(repo, "HEAD")
    clean = io.BytesIO()
    archive(repo, sha, clean)
    hostile_git_config(repo)
    (repo / ".git" / "info").mkdir(exist_ok=True)
    raw = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", sha], capture_output=True, check=True
    ).stdout
    assert b"line two\r\n" in raw  # the unpinned archive really differs here...
    pinned = io.BytesIO()
    archive(repo, sha, pinned)
    assert pinned.getvalue() == clean.getvalue()  # ...and the bundle does not
    m = members(clean.getvalue())
    assert m["app.py"].mode == 0o644 and m["run.sh"].mode == 0o755 and m["lib"].mode == 0o755


def test_build_pack_is_byte_identical_across_git_config_and_runs(repo: Path) -> None:
    sha, ct = resolve_commit(repo, "HEAD")
    cfg = cfg_for(repo, BUILD)
    first = io.BytesIO()
    digest, size, _ = build_pack(cfg, sha, ct, first, log=lambda _: None)
    hostile_git_config(repo)
    old = os.umask(0o000)
    try:
        second = io.BytesIO()
        digest2, _, _ = build_pack(cfg, sha, ct, second, log=lambda _: None)
    finally:
        os.umask(old)
    assert (
        first.getvalue() == second.getvalue()
        and digest == digest2
        and size == len(first.getvalue())
    )
    data = first.getvalue()
    assert data[3] == 0 and data[4:8] == b"\0\0\0\0"  # gzip header: no name, mtime 0
    m = members(data)
    names = list(m)
    assert names == [
        "app.py",
        "lib",
        "lib/data.bin",
        "lib/notes.txt",
        "notes",
        "run.sh",
        "vendor",
        "vendor/pkg",
        "vendor/pkg/__init__.py",
    ]  # sorted; docs/ excluded
    for info in m.values():
        assert (info.uid, info.gid, info.uname, info.gname, info.mtime) == (
            0,
            0,
            "root",
            "root",
            ct,
        )
        assert not info.mode & 0o022
    assert m["vendor/pkg/__init__.py"].mode == 0o644 and m["run.sh"].mode == 0o755
    assert m["notes"].issym() and m["notes"].linkname == "lib/notes.txt"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        assert (
            tf.extractfile("app.py").read() == b"print('hello')\nline two\n"
        )  # LF, whatever autocrlf


def test_build_runs_in_a_clean_export_never_the_working_tree(repo: Path) -> None:
    (repo / "app.py").write_text("uncommitted\n")
    (repo / "untracked.txt").write_text("x")
    sha, ct = resolve_commit(repo, "HEAD")
    cfg = cfg_for(
        repo, {"commands": ["test ! -e untracked.txt && git status 2>/dev/null; pwd > where"]}
    )
    out = io.BytesIO()
    build_pack(cfg, sha, ct, out, log=lambda _: None)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tf:
        assert tf.extractfile("app.py").read() == b"print('hello')\nline two\n"
        where = tf.extractfile("where").read().decode()
        assert "untracked.txt" not in tf.getnames()
    assert not where.startswith(str(repo))


def test_tmpdir_is_where_the_build_runs_and_not_part_of_the_recipe(
    repo: Path, tmp_path: Path
) -> None:
    here = tmp_path / "fast"
    here.mkdir()
    sha, ct = resolve_commit(repo, "HEAD")
    cfg = cfg_for(repo, {"commands": ["pwd > where"], "tmpdir": str(here)})
    assert bundle_id(sha, cfg.build) == bundle_id(
        sha, cfg_for(repo, {"commands": ["pwd > where"]}).build
    )
    out = io.BytesIO()
    build_pack(cfg, sha, ct, out, log=lambda _: None)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tf:
        assert tf.extractfile("where").read().decode().startswith(str(here) + "/fabdeploy-build-")
    assert list(here.iterdir()) == []  # cleaned up
    with pytest.raises(BundleError, match="build.tmpdir .*gone is not a directory"):
        build_pack(
            cfg_for(repo, {"commands": ["true"], "tmpdir": str(tmp_path / "gone")}),
            sha,
            ct,
            out,
            log=print,
        )


def test_include_and_exclude(repo: Path) -> None:
    sha, ct = resolve_commit(repo, "HEAD")
    cfg = cfg_for(repo, {"include": ["lib", "app.py"], "exclude": ["*.bin"]})
    out = io.BytesIO()
    build_pack(cfg, sha, ct, out, log=lambda _: None)
    assert list(members(out.getvalue())) == ["app.py", "lib", "lib/notes.txt"]


# --- streaming and failures ------------------------------------------------------------------


def test_build_output_streams_and_a_failure_is_one_line_plus_the_tail(repo: Path) -> None:
    sha, ct = resolve_commit(repo, "HEAD")
    cfg = cfg_for(
        repo,
        {
            "commands": [
                "echo first",
                "for i in $(seq 1 30); do echo line$i; done; echo oops >&2; exit 3",
            ]
        },
    )
    lines: list[str] = []
    with pytest.raises(BundleError) as e:
        build_pack(cfg, sha, ct, io.BytesIO(), log=lines.append)
    assert "  | first" in lines and "  | line30" in lines  # streamed as they came
    msg = str(e.value).splitlines()
    assert (
        msg[0].startswith("build command `for i in")
        and "exit code 3" in msg[0]
        and sha[:12] in msg[0]
    )
    assert msg[1:] == [f"  | line{i}" for i in range(12, 31)] + ["  | oops"]


def test_build_env_has_source_date_epoch_and_revision(repo: Path) -> None:
    sha, ct = resolve_commit(repo, "HEAD")
    cfg = cfg_for(repo, {"commands": ["echo $SOURCE_DATE_EPOCH $REVISION > stamp"]})
    out = io.BytesIO()
    build_pack(cfg, sha, ct, out, log=lambda _: None)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tf:
        assert tf.extractfile("stamp").read().decode().split() == [str(ct), sha]


# --- the node's member rules, at bundle time -----------------------------------------------------


def test_absolute_symlink_in_the_commit_fails_at_bundle_naming_it(repo: Path) -> None:
    os.symlink("/var/log/sample", repo / "vendorlog")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "cap-style log link")
    cfg = cfg_for(repo)
    store = FakeStore()
    with pytest.raises(BundleError) as e:
        bundles.ensure_bundle(cfg, store, log=lambda _: None)  # type: ignore[arg-type]
    msg = str(e.value)
    assert "\n" not in msg
    assert (
        "would be refused by every node" in msg
        and "'vendorlog'" in msg
        and "/var/log/sample" in msg
    )
    assert "build.exclude" in msg and "linked_dirs" in msg and "relative link" in msg
    assert store.objects == {}  # nothing uploaded
    # The fix it offers works: excluded from the pack, linked to shared/ on the nodes.
    fixed = cfg_for(repo, {"exclude": ["vendorlog"]})
    b = bundles.ensure_bundle(fixed, store, log=lambda _: None)  # type: ignore[arg-type]
    assert "vendorlog" not in members(store.objects[b.key][0]) and "app.py" in members(
        store.objects[b.key][0]
    )


def test_a_build_that_leaves_an_escaping_link_fails_before_upload(repo: Path) -> None:
    cfg = cfg_for(repo, {"commands": ["ln -s ../../etc/passwd leak"]})
    store = FakeStore()
    with pytest.raises(
        BundleError, match="build of .* would be refused by every node: symlink 'leak'"
    ):
        bundles.ensure_bundle(cfg, store, log=lambda _: None)  # type: ignore[arg-type]
    assert store.objects == {}


# --- identity in the store ---------------------------------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}

    def bundle_key(self, bid: str) -> str:
        return f"shop/bundles/{bid}.tar.gz"

    def uri(self, key: str) -> str:
        return f"s3://b/{key}"

    def head_bundle(self, bid: str) -> dict[str, str] | None:
        o = self.objects.get(self.bundle_key(bid))
        return None if o is None else dict(o[1])

    def upload_bundle(
        self, f: Any, bid: str, meta: dict[str, Any], size_hint: int | None, progress: Any = None
    ) -> None:
        self.objects[self.bundle_key(bid)] = (f.read(), {k: str(v) for k, v in meta.items()})


def test_rebundling_same_commit_and_recipe_uploads_nothing_and_a_new_recipe_is_a_new_bundle(
    repo: Path,
) -> None:
    store = FakeStore()
    cfg = cfg_for(repo, BUILD)
    b1 = bundles.build_and_upload(cfg, store, log=lambda _: None)  # type: ignore[arg-type]
    assert b1.uploaded and b1.bundle_id == bundle_id(b1.commit, cfg.build) != b1.commit
    b2 = bundles.build_and_upload(cfg, store, log=lambda _: None)  # type: ignore[arg-type]
    assert not b2.uploaded and b2.sha256 == b1.sha256 and len(store.objects) == 1
    meta = store.objects[b1.key][1]
    assert (
        meta["recipe"] == recipe_json(cfg.build)
        and meta["bundle-id"] == b1.bundle_id
        and meta["pack"] == "2"
    )
    plain = bundles.ensure_bundle(cfg_for(repo), store, log=lambda _: None)  # type: ignore[arg-type]
    assert (
        plain.uploaded
        and plain.bundle_id == plain.commit
        and plain.key == f"shop/bundles/{plain.commit}.tar.gz"
    )
    assert "recipe" not in store.objects[plain.key][1]
    assert len(store.objects) == 2
    # The unpacked size (deploy.check's disk check) is recorded with both, and read back.
    for b in (b1, plain):
        assert b.unpacked_size and store.objects[b.key][1]["unpacked-size"] == str(b.unpacked_size)
    assert b2.unpacked_size == b1.unpacked_size


def test_a_bundle_packed_by_an_older_fabdeploy_is_kept(repo: Path) -> None:
    store = FakeStore()
    cfg = cfg_for(repo)
    sha, ct = resolve_commit(repo, "HEAD")
    old = subprocess.run(
        ["git", "-C", str(repo), "-c", "tar.umask=0002", "archive", "--format=tar.gz", "-1", sha],
        capture_output=True,
        check=True,
    ).stdout
    old_sha = hashlib.sha256(old).hexdigest()
    store.objects[store.bundle_key(sha)] = (
        old,
        {"sha256": old_sha, "size": str(len(old)), "commit": sha},
    )
    lines: list[str] = []
    b = bundles.build_and_upload(cfg, store, log=lines.append)  # type: ignore[arg-type]
    assert b.sha256 == old_sha and not b.uploaded
    assert any("older fabdeploy" in x for x in lines)
    assert store.objects[store.bundle_key(sha)][0] == old  # untouched
    # Anything else under that key is still an alarm.
    store.objects[store.bundle_key(sha)] = (b"x", {"sha256": "f" * 64, "size": "1", "commit": sha})
    with pytest.raises(BundleError, match="something else wrote it; investigate before deploying"):
        bundles.build_and_upload(cfg, store, log=lines.append)  # type: ignore[arg-type]
