"""Activation of big apps (issue 15 §4): the fast path for plain tar headers, and what a hotfix
makes durable (fsync of what it wrote, not syncfs of the whole filesystem).

Same rules as test_node_program.py: Python 3.8+, pytest only, node.py loaded as a file.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from node_program import node

T0 = 1_700_000_000


def make_cfg(tmp_path: Path, **overrides: Any) -> Any:
    raw: dict[str, Any] = {
        "app": "shop",
        "deploy_to": str(tmp_path / "srv"),
        "keep_releases": 5,
        "linked_files": [],
        "linked_dirs": ["log"],
        "s3": {"bucket": "b", "prefix": "shop", "region": "us-east-1", "endpoint_url": None},
        "lock_timeout": 0.3,
    }
    raw.update(overrides)
    path = tmp_path / "node.json"
    path.write_text(json.dumps(raw))
    return node.load_config(str(path))


def archive(fmt: int, long: str = "d" * 60 + "/" + "n" * 70) -> bytes:
    """Every plain member type, a long name, a V7 dir, a huge uid: headers on both paths."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:

        def add(name: str, kind: bytes, data: bytes = b"", **attrs: Any) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.size, ti.mtime, ti.mode = kind, len(data), T0, 0o644
            for k, v in attrs.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add("app", tarfile.DIRTYPE, mode=0o755)
        add("app/main.py", tarfile.REGTYPE, b"print(1)\n", uname="alice", gname="staff")
        add("app/empty", tarfile.REGTYPE)
        add("app/alias", tarfile.SYMTYPE, linkname="main.py")
        add("app/hard", tarfile.LNKTYPE, linkname="app/main.py")
        add("app/v7dir/", tarfile.AREGTYPE)
        add(long, tarfile.REGTYPE, b"long\n")
        if fmt != tarfile.USTAR_FORMAT:  # base-256 in GNU format, a pax header in pax
            add("app/big-uid", tarfile.REGTYPE, b"x", uid=3_000_000)
        add("app/\u00e9t\u00e9.txt", tarfile.REGTYPE, b"utf-8 name")
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt",
    [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
    ids=["gnu", "pax", "ustar"],
)
def test_plain_headers_parse_exactly_as_tarfile_does(fmt: int, monkeypatch) -> None:
    long = "d" * 60 + "/" + "n" * 70  # ustar: a prefix field; gnu: an L header; pax: an x header
    data = archive(fmt, long)
    fast = []
    real = node._plain_header

    def counting(*args: Any) -> Any:
        obj = real(*args)
        fast.append(obj is not None)
        return obj

    monkeypatch.setattr(node, "_plain_header", counting)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        expected = [(m.get_info(), m.offset, m.offset_data) for m in tf]
    safe = node._safe_tarfile_class()
    with safe.open(fileobj=io.BytesIO(data), mode="r:") as tf:  # type: ignore[call-overload]
        got = [(m.get_info(), m.offset, m.offset_data) for m in tf]
    assert got == expected
    names = [info["name"] for info, _, _ in got]
    assert long in names and "app/v7dir/" in names and "app/\u00e9t\u00e9.txt" in names
    assert sum(fast) >= 6, fast  # most headers took the fast path
    assert not all(fast)  # the end-of-archive block (and long names, base-256) did not


def test_a_malformed_plain_header_is_left_to_tarfile(monkeypatch) -> None:
    data = bytearray(archive(tarfile.USTAR_FORMAT))
    data[124:136] = b"0000000001x\0"  # size: not octal (the checksum is not fixed up either)
    assert node._plain_header(tarfile.TarInfo, bytes(data[:512]), "utf-8", "strict") is None
    good = bytes(archive(tarfile.USTAR_FORMAT)[:512])
    bad_sum = good[:148] + b"0000000\0" + good[156:]
    assert node._plain_header(tarfile.TarInfo, bad_sum, "utf-8", "strict") is None
    with pytest.raises(tarfile.ReadError):
        tarfile.open(fileobj=io.BytesIO(bad_sum + bytes(1024)), mode="r:")


def make_bundle(path: Path, changed: str, files: int = 5) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        entries = [("app/main.py", changed), ("log/dev.log", "replaced by the shared link")]
        entries += [(f"lib/m{i}.py", f"# module {i}\n") for i in range(files)]
        for name, text in entries:
            ti = tarfile.TarInfo(name)
            data = text.encode()
            ti.size, ti.mtime, ti.mode = len(data), T0, 0o644
            tf.addfile(ti, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    import hashlib

    return hashlib.sha256(buf.getvalue()).hexdigest()


def activate(cfg: Any, tmp_path: Path, commit: str, text: str) -> dict[str, Any]:
    bundle = tmp_path / f"{commit}.tar.gz"
    sha = make_bundle(bundle, text)
    return node.activate(
        cfg, sha256=sha, commit=commit, source=node.Source("file", str(bundle)), now=lambda: T0
    )


@pytest.fixture
def syncs(monkeypatch) -> list[Any]:
    calls: list[Any] = []
    real = node.sync_release
    monkeypatch.setattr(node, "sync_filesystem", lambda path: calls.append(("syncfs", path)))

    def sync_release(release: str, files: list[str], dirs: list[str]) -> None:
        calls.append(("fsync", release, files, dirs))
        real(release, files, dirs)

    monkeypatch.setattr(node, "sync_release", sync_release)
    return calls


def test_a_small_change_fsyncs_what_it_wrote_not_the_filesystem(
    tmp_path: Path, syncs: list[Any]
) -> None:
    cfg = make_cfg(tmp_path)
    activate(cfg, tmp_path, "c1", "v1")
    syncs.clear()
    r2 = activate(cfg, tmp_path, "c2", "v2")
    assert [c[0] for c in syncs] == ["fsync"]
    _, release, files, dirs = syncs[0]
    assert release.endswith(r2["release"])
    # The changed file and ours; not the linked ones, not the member link_shared replaced.
    assert sorted(files) == [".fabdeploy-pending", "REVISION", "REVISION_TIME", "app/main.py"]
    assert "" in dirs and "app" in dirs and "lib" in dirs and "log" not in dirs
    assert (Path(release) / "app/main.py").read_text() == "v2"


def test_many_written_files_or_a_before_swap_hook_sync_the_filesystem(
    tmp_path: Path, syncs: list[Any], monkeypatch
) -> None:
    cfg = make_cfg(tmp_path)
    monkeypatch.setattr(node, "FSYNC_MAX_FILES", 3)
    activate(cfg, tmp_path, "c1", "v1")  # 6 files written: more than 3
    assert [c[0] for c in syncs] == ["syncfs"]
    hooked = make_cfg(tmp_path, hooks={"before_swap": ["echo built > app/built.txt"]})
    syncs.clear()
    activate(hooked, tmp_path, "c2", "v2")  # one file written, but the hook may write anywhere
    assert [c[0] for c in syncs] == ["syncfs"]


def test_a_prepared_release_is_made_durable_when_prepared(tmp_path: Path, syncs: list[Any]) -> None:
    cfg = make_cfg(tmp_path)
    activate(cfg, tmp_path, "c1", "v1")
    bundle = tmp_path / "c2.tar.gz"
    sha = make_bundle(bundle, "v2")
    syncs.clear()
    node.prepare(cfg, sha256=sha, commit="c2", source=node.Source("file", str(bundle)))
    # log/dev.log too: the previous release has the shared link there, nothing to link from.
    assert [c[0] for c in syncs] == ["fsync"] and syncs[0][2] == ["app/main.py", "log/dev.log"]
    syncs.clear()
    r = node.activate(cfg, sha256=sha, commit="c2", source=node.Source("prepared", ""))
    # The switch syncs only what it added: REVISION and co, the release's top dir, the rename.
    assert [c[0] for c in syncs] == ["fsync"]
    _, release, files, dirs = syncs[0]
    assert release.endswith(r["release"]) and "app/main.py" not in files and dirs == [""]


def test_a_release_prepared_by_an_older_node_is_synced_whole(
    tmp_path: Path, syncs: list[Any]
) -> None:
    cfg = make_cfg(tmp_path)
    activate(cfg, tmp_path, "c1", "v1")
    bundle = tmp_path / "c2.tar.gz"
    sha = make_bundle(bundle, "v2")
    prepared = node.prepare(cfg, sha256=sha, commit="c2", source=node.Source("file", str(bundle)))
    marker = Path(cfg.deploy_to, "releases", prepared["prepared"], node.PREPARED_MARKER)
    info = json.loads(marker.read_text())
    del info["durable"]
    marker.write_text(json.dumps(info))
    syncs.clear()
    node.activate(cfg, sha256=sha, commit="c2", source=node.Source("prepared", ""))
    assert [c[0] for c in syncs] == ["syncfs"]


@pytest.mark.parametrize("fs", ["ext4", "btrfs"])
def test_on_an_ordered_journal_one_fsync_after_the_rename_covers_the_dirs(
    tmp_path: Path, monkeypatch, fs: str
) -> None:
    release = tmp_path / "releases" / "20261129000000"
    for d in ("app", "app/lib", "doc"):
        (release / d).mkdir(parents=True)
    (release / "app/main.py").write_text("v2")
    synced: list[str] = []
    real_fsync = node.os.fsync
    monkeypatch.setattr(node, "filesystem_type", lambda path: fs)
    monkeypatch.setattr(
        node.os,
        "fsync",
        lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd),
    )
    node.sync_release(str(release), ["app/main.py"], ["", "app", "app/lib", "doc"])
    expected = [release / "app/main.py", release]
    if fs == "btrfs":  # no ordered journal: every dir's entries on their own
        expected += [release / "app", release / "app/lib", release / "doc"]
    # Last: releases/, changed last (by the rename), whose commit covers everything before.
    assert synced == [str(p) for p in [*expected, release.parent]]


def test_filesystem_type_names_the_mount() -> None:
    assert node.filesystem_type("/proc") == "proc"
    assert node.filesystem_type("/no/such/path") is None
