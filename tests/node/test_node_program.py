"""Unit tests for the node-side program (fabdeploy/node/node.py) on temp dirs: no network, no root.

Like the node program itself, this file runs on Python 3.8+ with only pytest installed:
scripts/test also runs it under Python 3.8. So: no fabdeploy package import (node.py is
loaded as a file, as on a host), no controller packages, and no 3.9+ syntax at runtime.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import resource
import signal
import stat
import sys
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from node_program import node

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


# ------------------------------------------------------------------------------------------
# helpers


def make_cfg(tmp_path: Path, **overrides: Any) -> node.Config:
    raw: dict[str, Any] = {
        "app": "shop",
        "deploy_to": str(tmp_path / "srv"),
        "keep_releases": 5,
        "linked_files": [],
        "linked_dirs": [],
        "s3": {"bucket": "b", "prefix": "shop", "region": "us-east-1", "endpoint_url": None},
        "boot": {"attempts": 3, "first_boot_attempts": 4, "backoff": 0.001, "max_backoff": 0.002},
        "lock_timeout": 0.3,
    }
    raw.update(overrides)
    path = tmp_path / "node.json"
    path.write_text(json.dumps(raw))
    return node.load_config(str(path))


# Annotations are never evaluated here (postponed), so this alias is only a name for them.
Entry = "tuple[str, str, Any]"


def make_tar(path: Path, entries: Iterable[Entry], mode: str = "w:gz") -> str:
    """Build a tarball member by member (so hostile members are possible); returns sha256."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = int(T0)
            if kind == "file":
                data = str(payload).encode()
                ti.size = len(data)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(data))
                continue
            if kind == "suid":
                ti.size = 2
                ti.mode = 0o6755
                tf.addfile(ti, io.BytesIO(b"#!"))
                continue
            ti.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            ti.mode = 0o755 if kind == "dir" else 0o644
            if kind in ("symlink", "hardlink"):
                ti.linkname = payload
            tf.addfile(ti)
    return sha256(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def app_entries(tag: str = "v1") -> list[Entry]:
    return [
        ("./", "dir", None),
        ("./app", "dir", None),
        ("./app/main.py", "file", f"print('{tag}')"),
        ("./log", "dir", None),
        ("./log/dev.log", "file", "should be replaced by the shared link"),
        ("./bin", "dir", None),
        ("./bin/run", "suid", None),
    ]


def good_bundle(tmp_path: Path, tag: str = "v1") -> tuple[Path, str]:
    path = tmp_path / f"bundle-{tag}.tar.gz"
    return path, make_tar(path, app_entries(tag))


def activate(cfg: node.Config, bundle: Path, sha: str, commit: str, **kw: Any) -> dict[str, Any]:
    return node.activate(
        cfg, sha256=sha, commit=commit, source=node.Source("file", str(bundle)), **kw
    )


def deploy(cfg: node.Config, tmp_path: Path, commit: str, **kw: Any) -> dict[str, Any]:
    bundle, sha = good_bundle(tmp_path, commit)
    return activate(cfg, bundle, sha, commit, **kw)


def snapshot(root: Path) -> dict[str, Any]:
    """Everything under root (without following links), to prove nothing was written."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", p.read_bytes())
            else:
                out[str(p)] = ("dir",)
    return out


@pytest.fixture
def cfg(tmp_path: Path) -> node.Config:
    return make_cfg(tmp_path)


@pytest.fixture
def layout(cfg: node.Config) -> node.Layout:
    return node.Layout(cfg.deploy_to)


# ------------------------------------------------------------------------------------------
# activation basics


def test_activate_builds_capistrano_layout(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    bundle, sha = good_bundle(tmp_path)
    result = activate(
        cfg, bundle, sha, "c1", ref="main", user="alice", committed_at=1234, now=lambda: T0
    )

    assert result["ok"] and result["changed"]
    assert result["release"] == "20231114221320"
    assert result["previous"] is None
    assert set(result["seconds"]) == {"download", "extract", "total"}
    release = Path(layout.release_path("20231114221320"))
    # current is a symlink holding the absolute release path, as Capistrano writes it.
    assert os.path.islink(layout.current)
    assert os.readlink(layout.current) == str(release)
    assert os.path.isabs(os.readlink(layout.current))
    assert (release / "REVISION").read_text() == "c1\n"
    assert (release / "REVISION_TIME").read_text() == "1234\n"
    assert (release / "app/main.py").read_text() == "print('v1')"
    mode = (release / "bin/run").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID)
    assert mode & 0o777 == 0o755
    assert Path(layout.revisions_log).read_text() == (
        "Branch main (at c1) deployed as release 20231114221320 by alice\n"
    )
    # Nothing of ours is visible to Capistrano's `ls -x releases`.
    assert sorted(os.listdir(layout.releases)) == ["20231114221320"]
    assert sorted(os.listdir(layout.state)) == ["lock", "status.json"]
    last = node.read_status(layout)["last"]
    assert (
        last["outcome"] == "ok" and last["commit"] == "c1" and last["release"] == "20231114221320"
    )


def test_same_commit_is_no_change_unless_forced(tmp_path: Path, cfg: node.Config) -> None:
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    again = deploy(cfg, tmp_path, "c1", now=lambda: T0 + 5)
    assert again == {"ok": True, "changed": False, "release": first["release"], "commit": "c1"}
    forced = deploy(cfg, tmp_path, "c1", now=lambda: T0 + 5, force=True)
    assert forced["changed"] and forced["release"] == "20231114221325"


def test_default_ref_and_user(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUDO_USER", "bob")
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    assert Path(layout.revisions_log).read_text() == (
        "Branch HEAD (at c1) deployed as release 20231114221320 by bob\n"
    )


def test_two_activations_in_the_same_second_do_not_collide(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    a = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    b = deploy(cfg, tmp_path, "c2", now=lambda: T0)
    c = deploy(cfg, tmp_path, "c3", now=lambda: T0 - 3600)  # clock stepped back
    assert [a["release"], b["release"], c["release"]] == [
        "20231114221320",
        "20231114221321",
        "20231114221322",
    ]
    assert node.list_releases(layout)[-1] == c["release"]
    assert node.read_current(layout).release == c["release"]  # type: ignore[union-attr]
    assert b["previous"] == {"release": "20231114221320", "commit": "c1"}


def test_next_release_name_after_odd_newest(layout: node.Layout) -> None:
    os.makedirs(layout.release_path("20231114221320"))
    assert node.next_release_name(layout, T0) == "20231114221321"
    os.makedirs(layout.release_path("20231399999999"))  # not a real date, still must sort last
    assert node.next_release_name(layout, T0) == "20231400000000"


def test_pruning_keeps_newest_and_never_current(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, keep_releases=2)
    layout = node.Layout(cfg.deploy_to)
    results = [deploy(cfg, tmp_path, f"c{i}", now=lambda i=i: T0 + i) for i in range(4)]
    assert results[2]["pruned"] == ["20231114221320"]
    assert results[3]["pruned"] == ["20231114221321"]
    assert node.list_releases(layout) == ["20231114221322", "20231114221323"]

    # current on the oldest release: pruning must skip it, and leave stray dirs alone.
    os.makedirs(layout.release_path("20231114221324"))
    Path(layout.release_path("20231114221324"), "REVISION").write_text("x\n")
    os.makedirs(layout.release_path("not-a-release"))
    node.swap_current(layout, layout.release_path("20231114221322"))
    pruned = node.prune(layout, 2)
    assert pruned == []  # 22 is current, 23 and 24 are the newest two
    cfg3 = make_cfg(tmp_path, keep_releases=1)
    assert node.cleanup(cfg3)["pruned"] == ["20231114221323"]
    assert sorted(os.listdir(layout.releases)) == [
        "20231114221322",
        "20231114221324",
        "not-a-release",
    ]


def test_prune_unlinks_symlinked_release_without_following(
    tmp_path: Path, layout: node.Layout
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    os.makedirs(layout.releases)
    os.symlink(victim, layout.release_path("20200101000000"))
    for name in ("20231114221320", "20231114221321"):
        os.makedirs(layout.release_path(name))
    node.swap_current(layout, layout.release_path("20231114221321"))
    assert node.prune(layout, 1) == ["20200101000000", "20231114221320"]
    assert (victim / "keep.txt").read_text() == "precious"


def test_swap_refuses_real_current_directory(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    os.makedirs(layout.current)
    with pytest.raises(node.NodeError, match="real directory"):
        deploy(cfg, tmp_path, "c1")
    assert os.path.isdir(layout.current) and not os.path.islink(layout.current)


# ------------------------------------------------------------------------------------------
# safe extraction


HOSTILE: list[tuple[str, Any, str]] = [
    ("dotdot", [("../x", "file", "pwned")], "'..'"),
    ("dotdot-nested", [("a/../../x", "file", "pwned")], "'..'"),
    ("absolute", lambda out: [(str(out / "abs"), "file", "pwned")], "absolute"),
    (
        "symlink-abs-then-write",
        lambda out: [("evil", "symlink", str(out)), ("evil/passwd", "file", "pwned")],
        "absolute path",
    ),
    (
        "symlink-rel-then-write",
        [("evil", "symlink", "../outside"), ("evil/passwd", "file", "pwned")],
        "goes through symlink",
    ),
    ("symlink-abs", lambda out: [("evil", "symlink", str(out))], "absolute"),
    (
        "symlink-relative-escape",
        [("a", "dir", None), ("a/evil", "symlink", "../../outside")],
        "outside",
    ),
    (
        "symlink-chain-escape",
        [("d", "dir", None), ("d/s", "symlink", ".."), ("t", "symlink", "d/s/..")],
        "outside",
    ),
    ("symlink-loop", [("a", "symlink", "b"), ("b", "symlink", "a/x")], "outside"),
    (
        "write-through-inner-symlink",
        [("d", "dir", None), ("l", "symlink", "d"), ("l/f", "file", "x")],
        "goes through symlink",
    ),
    (
        "symlink-then-same-name-file",
        [("f", "symlink", "g"), ("f", "file", "x")],
        "appears twice",
    ),
    ("implicit-dir-then-symlink", [("d/f", "file", "x"), ("d", "symlink", "..")], "appears twice"),
    ("hardlink-abs", [("h", "hardlink", "/etc/passwd")], "absolute"),
    ("hardlink-dotdot", [("h", "hardlink", "../outside/secret")], "'..'"),
    ("hardlink-nonmember", [("h", "hardlink", "etc/passwd")], "not an earlier regular file"),
    (
        "hardlink-to-later",
        [("h", "hardlink", "f"), ("f", "file", "x")],
        "not an earlier regular file",
    ),
    ("chardev", [("null", "chr", None)], "special file"),
    ("fifo", [("pipe", "fifo", None)], "special file"),
]


@pytest.mark.parametrize("data_filter", [True, False], ids=["filter", "nofilter"])
@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_bundles_are_rejected_without_side_effects(
    tmp_path: Path, case: tuple[str, Any, str], data_filter: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Debian 12's Python 3.11.2 has no tarfile data filter: our own checks must suffice.
    monkeypatch.setattr(node, "USE_DATA_FILTER", data_filter)
    _, entries, expected = case
    cfg = make_cfg(tmp_path)
    layout = node.Layout(cfg.deploy_to)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    good = deploy(cfg, tmp_path, "good", now=lambda: T0)
    before_out = snapshot(outside)
    before_releases = snapshot(Path(layout.releases))
    members = entries(outside) if callable(entries) else entries
    bundle = tmp_path / "hostile.tar.gz"
    sha = make_tar(bundle, [("ok.txt", "file", "fine"), *members])

    with pytest.raises(node.NodeError, match=expected) as err:
        activate(cfg, bundle, sha, "evil", now=lambda: T0 + 10)

    assert "unsafe bundle" in err.value.message and "nothing was activated" in err.value.message
    assert snapshot(outside) == before_out
    assert snapshot(Path(layout.releases)) == before_releases  # no staging left, no new release
    assert node.read_current(layout).release == good["release"]  # type: ignore[union-attr]
    assert node.read_status(layout)["last"]["outcome"] == "failed"


def test_safe_inside_symlinks_and_hardlinks_are_fine(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    bundle = tmp_path / "b.tar.gz"
    sha = make_tar(
        bundle,
        [
            ("lib", "dir", None),
            ("lib/real.txt", "file", "data"),
            ("lib/alias", "symlink", "real.txt"),
            ("up", "symlink", "lib/.."),
            ("hard", "hardlink", "lib/real.txt"),
            ("dangling", "symlink", "lib/missing"),
        ],
    )
    result = activate(cfg, bundle, sha, "c1")
    release = Path(layout.release_path(result["release"]))
    assert (release / "lib/alias").read_text() == "data"
    assert (release / "hard").read_text() == "data"
    assert os.readlink(release / "up") == "lib/.."


def test_too_many_files(tmp_path: Path, layout: node.Layout) -> None:
    cfg = make_cfg(tmp_path, max_files=5)
    bundle = tmp_path / "many.tar.gz"
    sha = make_tar(bundle, [(f"f{i}", "file", i) for i in range(10)])
    with pytest.raises(node.NodeError, match="max_files=5"):
        activate(cfg, bundle, sha, "c1")
    assert os.listdir(layout.releases) == []
    assert not os.path.lexists(layout.current)


@pytest.mark.parametrize("cut", ["half", "trailer"])
def test_truncated_gzip(tmp_path: Path, cfg: node.Config, layout: node.Layout, cut: str) -> None:
    full = tmp_path / "full.tar.gz"
    make_tar(full, [(f"f{i}", "file", os.urandom(2000).hex()) for i in range(20)])
    data = full.read_bytes()
    bundle = tmp_path / "cut.tar.gz"
    bundle.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-4])
    with pytest.raises(node.NodeError, match="corrupt or truncated"):
        activate(cfg, bundle, sha256(bundle), "c1")
    assert os.listdir(layout.releases) == []


def test_not_a_tarball(tmp_path: Path, cfg: node.Config) -> None:
    bundle = tmp_path / "junk.tar.gz"
    bundle.write_bytes(gzip.compress(b"hello world, not a tar"))
    with pytest.raises(node.NodeError, match="corrupt or truncated"):
        activate(cfg, bundle, sha256(bundle), "c1")


def test_sha_mismatch_extracts_nothing(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    bundle, sha = good_bundle(tmp_path)
    with pytest.raises(node.VerificationError) as err:
        activate(cfg, bundle, "0" * 64, "c1")
    assert f"expected {'0' * 64}" in err.value.message and f"got {sha}" in err.value.message
    assert str(bundle) in err.value.message
    assert os.listdir(layout.releases) == []
    assert bundle.exists()  # a --file bundle outside .fabdeploy is left alone


def test_bundle_inside_state_dir_is_consumed(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    os.makedirs(layout.state)
    bundle = Path(layout.state) / "upload.tar.gz"
    sha = make_tar(bundle, app_entries())
    activate(cfg, bundle, sha, "c1")
    assert not bundle.exists()


def test_not_enough_space(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node, "disk_free", lambda path: 1024 * 1024)
    with pytest.raises(node.NodeError) as err:
        deploy(cfg, tmp_path, "c1")
    msg = err.value.message
    assert "not enough disk space" in msg and "MB needed" in msg and "1.0 MB free" in msg
    assert node.hostname() in msg and layout.releases in msg
    assert os.listdir(layout.releases) == []


def test_enospc_during_extraction(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(node, "_write_all", full_disk)
    with pytest.raises(node.NodeError, match="not enough disk space"):
        deploy(cfg, tmp_path, "c1")
    assert os.listdir(layout.releases) == []


def test_validate_members_drops_owner_and_special_bits() -> None:
    ti = tarfile.TarInfo("./a/b")
    ti.mode = 0o4777
    ti.uid, ti.uname = 1234, "mallory"
    (out,) = node.validate_members([ti])
    assert out.name == "a/b" and out.mode == 0o755 and out.uid == 0 and out.uname == ""


# ------------------------------------------------------------------------------------------
# linked files/dirs and hooks


def test_linked_files_and_dirs(tmp_path: Path, layout: node.Layout) -> None:
    cfg = make_cfg(tmp_path, linked_files=["config/database.yml"], linked_dirs=["log", "tmp/pids"])
    shared_db = Path(layout.shared) / "config/database.yml"
    shared_db.parent.mkdir(parents=True)
    shared_db.write_text("prod: {}")
    release = Path(layout.release_path(deploy(cfg, tmp_path, "c1")["release"]))

    assert os.readlink(release / "config/database.yml") == str(shared_db)
    assert os.readlink(release / "log") == os.path.join(layout.shared, "log")
    assert os.readlink(release / "tmp/pids") == os.path.join(layout.shared, "tmp/pids")
    assert os.path.isdir(os.path.join(layout.shared, "log"))
    assert not os.path.exists(os.path.join(layout.shared, "log", "dev.log"))  # release copy dropped


def test_missing_linked_file_fails_before_current_changes(
    tmp_path: Path, layout: node.Layout
) -> None:
    cfg0 = make_cfg(tmp_path)
    good = deploy(cfg0, tmp_path, "c1", now=lambda: T0)
    cfg = make_cfg(tmp_path, linked_files=["config/database.yml"])
    with pytest.raises(node.NodeError) as err:
        deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)
    full = os.path.join(layout.shared, "config/database.yml")
    assert err.value.message == (
        f"linked file shared/config/database.yml is missing on {node.hostname()} ({full}): "
        "create it, then deploy again"
    )
    assert node.read_current(layout).release == good["release"]  # type: ignore[union-attr]
    assert node.list_releases(layout) == [good["release"]]


@pytest.mark.parametrize("key", ["linked_files", "linked_dirs"])
@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a/../../b", "."])
def test_linked_paths_must_stay_inside(tmp_path: Path, key: str, bad: str) -> None:
    cfg = make_cfg(tmp_path, **{key: [bad]})
    with pytest.raises(node.NodeError, match="must be a relative path"):
        deploy(cfg, tmp_path, "c1")
    assert not os.path.exists(tmp_path / "etc")


def test_before_swap_hook_runs_in_release(tmp_path: Path, layout: node.Layout) -> None:
    out = tmp_path / "hook.out"
    cfg = make_cfg(
        tmp_path, hooks={"before_swap": [f'echo "$PWD $RELEASE_PATH $DEPLOY_TO $REVISION" > {out}']}
    )
    release = layout.release_path(deploy(cfg, tmp_path, "c1")["release"])
    assert out.read_text().split() == [release, release, cfg.deploy_to, "c1"]


def test_before_swap_hook_failure(tmp_path: Path, layout: node.Layout) -> None:
    good = deploy(make_cfg(tmp_path), tmp_path, "c1", now=lambda: T0)
    cfg = make_cfg(
        tmp_path,
        hooks={
            "before_swap": ["for i in $(seq 1 30); do echo line$i; done; echo boom >&2; exit 3"]
        },
    )
    with pytest.raises(node.NodeError) as err:
        deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)
    msg = err.value.message
    assert "exit code 3" in msg and "boom" in msg and "line30" in msg and "line5 " not in msg
    assert "\n" not in msg
    assert err.value.extra["output_tail"][-1] == "boom"
    assert len(err.value.extra["output_tail"]) == 20
    assert node.list_releases(layout) == [good["release"]]
    assert node.read_current(layout).release == good["release"]  # type: ignore[union-attr]


def test_restart_failure_swaps_back(tmp_path: Path, layout: node.Layout) -> None:
    marker = tmp_path / "restarts"
    cfg = make_cfg(
        tmp_path, restart=f'echo "$REVISION" >> {marker}; echo nope; test "$REVISION" != c2'
    )
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0, restart=True)
    with pytest.raises(node.NodeError) as err:
        deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1, restart=True, user="alice")
    assert (
        f"back on {first['release']}" in err.value.message and "restarted OK" in err.value.message
    )
    assert node.read_current(layout).release == first["release"]  # type: ignore[union-attr]
    assert node.list_releases(layout) == [first["release"]]
    assert marker.read_text().split() == ["c1", "c2", "c1"]
    assert Path(layout.revisions_log).read_text().splitlines()[-1] == (
        f"alice rolled back to release {first['release']}"
    )


def test_restart_only_when_asked(tmp_path: Path) -> None:
    marker = tmp_path / "restarted"
    cfg = make_cfg(tmp_path, restart=f"touch {marker}")
    deploy(cfg, tmp_path, "c1")
    assert not marker.exists()
    deploy(cfg, tmp_path, "c2", restart=True)
    assert marker.exists()


# ------------------------------------------------------------------------------------------
# rollback


def test_rollback(tmp_path: Path, cfg: node.Config, layout: node.Layout) -> None:
    r = [deploy(cfg, tmp_path, f"c{i}", now=lambda i=i: T0 + i)["release"] for i in range(3)]
    result = node.rollback(cfg, user="alice", reason="bad deploy")
    assert result == {
        "ok": True,
        "changed": True,
        "release": r[1],
        "commit": "c1",
        "previous": {"release": r[2], "commit": "c2"},
    }
    assert os.readlink(layout.current) == layout.release_path(r[1])
    assert (
        Path(layout.revisions_log).read_text().splitlines()[-1]
        == f"alice rolled back to release {r[1]}"
    )
    assert node.rollback(cfg, user="alice")["release"] == r[0]
    with pytest.raises(
        node.NodeError, match=r"no previous release to roll back to on .* \(releases: "
    ):
        node.rollback(cfg)
    assert node.read_current(layout).release == r[0]  # type: ignore[union-attr]
    # Named forward "rollback" is allowed.
    assert node.rollback(cfg, release=r[2], user="bob")["commit"] == "c2"
    last = node.read_status(layout)["last"]
    assert last["action"] == "rollback" and last["outcome"] == "ok"


def test_rollback_errors(tmp_path: Path, cfg: node.Config, layout: node.Layout) -> None:
    with pytest.raises(node.NodeError, match="nothing to roll back to"):
        node.rollback(cfg)
    r = [deploy(cfg, tmp_path, f"c{i}", now=lambda i=i: T0 + i)["release"] for i in range(2)]
    with pytest.raises(node.NodeError, match="does not exist or is incomplete"):
        node.rollback(cfg, release="20990101000000")
    with pytest.raises(node.NodeError, match="does not exist or is incomplete"):
        node.rollback(cfg, release="../../etc")
    os.unlink(os.path.join(layout.release_path(r[0]), "REVISION"))  # e.g. Capistrano mid-deploy
    with pytest.raises(node.NodeError, match="no previous release"):
        node.rollback(cfg)
    assert node.read_current(layout).release == r[1]  # type: ignore[union-attr]
    assert node.read_status(layout)["last"]["outcome"] == "failed"


# ------------------------------------------------------------------------------------------
# status, cleanup, lock


def test_status_with_dangling_current(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    a = deploy(cfg, tmp_path, "c1", now=lambda: T0)["release"]
    b = deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)["release"]
    node.remove_path(layout.release_path(b))
    os.makedirs(layout.release_path(".staging-20231114221399-1"))
    os.makedirs(layout.release_path("manual-copy"))
    s = node.status(cfg)
    assert s["ok"] and s["host"] == node.hostname() and s["node_version"] == node.VERSION
    assert s["current"] == {
        "release": b,
        "commit": None,
        "path": layout.release_path(b),
        "ok": False,
    }
    assert s["releases"] == [{"release": a, "commit": "c1"}]
    assert s["stray"] == ["manual-copy"]
    assert s["staging"] == [".staging-20231114221399-1"]
    assert s["last"]["commit"] == "c2"
    assert s["revision_log_tail"][-1].startswith("Branch HEAD (at c2)")
    json.dumps(s)


def test_status_on_empty_host(cfg: node.Config) -> None:
    s = node.status(cfg)
    assert s["current"] is None and s["releases"] == [] and s["last"] is None


def test_status_does_not_take_the_lock(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    deploy(cfg, tmp_path, "c1")
    with open(layout.lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        assert node.status(cfg)["current"]["commit"] == "c1"


def test_cleanup_removes_leftovers(tmp_path: Path, cfg: node.Config, layout: node.Layout) -> None:
    deploy(cfg, tmp_path, "c1")
    staging = layout.release_path(".staging-20231114221320-99999")
    os.makedirs(os.path.join(staging, "app"))
    download = os.path.join(layout.state, "dl-99999-abc.tar.gz")
    Path(download).write_bytes(b"partial")
    tmp_link = os.path.join(layout.deploy_to, ".current-tmp-99999")
    os.symlink("/nonexistent", tmp_link)
    result = node.cleanup(cfg)
    assert sorted(result["removed"]) == sorted([staging, download, tmp_link])
    assert not os.path.lexists(staging) and not os.path.lexists(download)
    assert os.path.islink(layout.current)


def test_lock_is_bounded_and_names_holder(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    layout.ensure()
    with open(layout.lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps({"pid": 4242, "action": "activate", "user": "carol", "since": "x"}))
        fh.flush()
        with pytest.raises(node.NodeError, match="pid 4242 running activate for carol"):
            deploy(cfg, tmp_path, "c1")
    assert not os.path.lexists(layout.current)
    deploy(cfg, tmp_path, "c1")  # released lock: works again


# ------------------------------------------------------------------------------------------
# boot


def pointer_for(tmp_path: Path, commit: str) -> tuple[dict[str, Any], Path]:
    bundle, sha = good_bundle(tmp_path, commit)
    pointer = {
        "key": f"shop/bundles/{commit}.tar.gz",
        "commit": commit,
        "sha256": sha,
        "ref": "main",
        "size": bundle.stat().st_size,
        "published_by": "ci",
        "published_at": "2023-11-14T22:13:20Z",
        "committed_at": 1_699_000_000,
    }
    return pointer, bundle


class Sleeper:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def test_boot_unchanged(tmp_path: Path, cfg: node.Config, layout: node.Layout) -> None:
    deploy(cfg, tmp_path, "c1")
    pointer, _ = pointer_for(tmp_path, "c1")
    result = node.boot(
        cfg, pointer_source=lambda: pointer, source_for=lambda p: pytest.fail("no fetch")
    )
    assert result["outcome"] == "unchanged" and result["commit"] == "c1"
    assert node.read_status(layout)["last_boot"]["outcome"] == "unchanged"


def test_boot_activates_published_commit(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    pointer, bundle = pointer_for(tmp_path, "c2")
    result = node.boot(
        cfg, pointer_source=lambda: pointer, source_for=lambda p: node.Source("file", str(bundle))
    )
    assert result["ok"] and result["outcome"] == "activated" and result["commit"] == "c2"
    current = node.read_current(layout)
    assert current is not None and current.commit == "c2"
    release = layout.release_path(current.release)
    assert Path(release, "REVISION_TIME").read_text() == "1699000000\n"
    assert Path(layout.revisions_log).read_text().splitlines()[-1].startswith("Branch main (at c2)")
    assert node.read_status(layout)["last_boot"]["outcome"] == "activated"


def test_boot_keeps_current_when_s3_fails(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    deploy(cfg, tmp_path, "c1")
    calls: list[int] = []

    def broken() -> dict[str, Any]:
        calls.append(1)
        raise node.NodeError("cannot read pointer s3://b/shop/published.json: connection refused")

    sleeper = Sleeper()
    result = node.boot(cfg, pointer_source=broken, sleep=sleeper)
    assert result["ok"] and result["outcome"] == "kept" and result["commit"] == "c1"
    assert "connection refused" in result["reason"]
    assert len(calls) == 3 and sleeper.calls == [0.001, 0.002]
    last_boot = node.read_status(layout)["last_boot"]
    assert last_boot["outcome"] == "kept" and "connection refused" in last_boot["reason"]


@pytest.mark.parametrize(
    "pointer",
    [{"commit": "c2"}, ["not", "an", "object"], {"key": "k", "commit": "c2", "sha256": "xyz"}],
)
def test_boot_bad_pointer_keeps_current(tmp_path: Path, cfg: node.Config, pointer: Any) -> None:
    deploy(cfg, tmp_path, "c1")
    result = node.boot(cfg, pointer_source=lambda: pointer, sleep=Sleeper())
    assert result["outcome"] == "kept" and "re-publish" in result["reason"]


def test_boot_verification_failure_retried_once(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    deploy(cfg, tmp_path, "c1")
    pointer, bundle = pointer_for(tmp_path, "c2")
    pointer["sha256"] = "f" * 64
    fetches: list[int] = []

    def source_for(p: dict[str, Any]) -> node.Source:
        fetches.append(1)
        return node.Source("file", str(bundle))

    cfg.boot.attempts = 10
    result = node.boot(cfg, pointer_source=lambda: pointer, source_for=source_for, sleep=Sleeper())
    assert result["outcome"] == "kept" and "sha256 mismatch" in result["reason"]
    assert len(fetches) == 2
    assert node.read_current(layout).commit == "c1"  # type: ignore[union-attr]


def test_first_boot_failure_is_loud(tmp_path: Path, cfg: node.Config, layout: node.Layout) -> None:
    calls: list[int] = []

    def missing() -> dict[str, Any]:
        calls.append(1)
        raise node.NodeError("pointer s3://b/shop/published.json does not exist")

    with pytest.raises(node.NodeError, match="no current release"):
        node.boot(cfg, pointer_source=missing, sleep=Sleeper())
    assert len(calls) == cfg.boot.first_boot_attempts == 4
    assert node.read_status(layout)["last_boot"]["outcome"] == "failed"


def test_first_boot_recovers_after_retries(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    pointer, bundle = pointer_for(tmp_path, "c1")
    answers: list[Any] = [node.NodeError("s3 down"), node.NodeError("s3 down"), pointer]

    def flaky() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    result = node.boot(
        cfg,
        pointer_source=flaky,
        source_for=lambda p: node.Source("file", str(bundle)),
        sleep=Sleeper(),
    )
    assert result["outcome"] == "activated"
    assert node.read_current(layout).commit == "c1"  # type: ignore[union-attr]


def test_boot_total_time_is_bounded(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, boot={"attempts": 50, "backoff": 10, "max_backoff": 100, "max_seconds": 25}
    )
    deploy(cfg, tmp_path, "c1")
    sleeper = Sleeper()

    def broken() -> dict[str, Any]:
        raise node.NodeError("down")

    assert node.boot(cfg, pointer_source=broken, sleep=sleeper)["outcome"] == "kept"
    assert sleeper.calls == [10]  # 10 + 20 would exceed the 25 s budget


# ------------------------------------------------------------------------------------------
# config and CLI


def run_main(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> tuple[int, dict[str, Any], str]:
    code = node.main(argv)
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, ["version"])[:2] == (0, {"ok": True, "version": node.VERSION})


def test_cli_activate_and_status(
    tmp_path: Path, cfg: node.Config, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, sha = good_bundle(tmp_path)
    conf = str(tmp_path / "node.json")
    args = ["--config", conf, "activate", "--sha256", sha, "--commit", "c1", "--file", str(bundle)]
    code, out, err = run_main(capsys, [*args, "--ref", "main", "--committed-at", "5"])
    assert code == 0 and out["changed"] and out["commit"] == "c1"
    assert all(line.startswith("fabdeploy-node: ") for line in err.splitlines())
    code, out, _ = run_main(capsys, ["--config", conf, "status"])
    assert code == 0 and out["current"]["commit"] == "c1"
    code, out, _ = run_main(capsys, [*args[:-1], str(tmp_path / "missing.tar.gz"), "--force"])
    assert code == 1 and out["ok"] is False and "missing.tar.gz" in out["error"]
    assert out["host"] == node.hostname()


def test_cli_missing_required_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "node.json"
    conf.write_text(json.dumps({"app": "shop", "deploy_to": str(tmp_path / "srv")}))
    code, out, _ = run_main(capsys, ["--config", str(conf), "status"])
    assert code == 1 and "'s3.bucket'" in out["error"] and "\n" not in out["error"]


def test_cli_bad_config_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "node.json"
    conf.write_text("{nope")
    code, out, _ = run_main(capsys, ["--config", str(conf), "status"])
    assert code == 1 and "cannot read config" in out["error"]
    code, out, _ = run_main(capsys, ["activate", "--commit", "x"])
    assert code == 1 and out["ok"] is False and "usage error" in out["error"]


def test_cli_builds_only_the_named_subcommand_and_parses_it_the_same() -> None:
    """A hotfix builds only `activate`'s parser (all eleven cost ~10 ms per host); what it
    parses must not change, and anything else still gets the whole CLI."""
    full = node._parser()
    choices = next(a for a in full._actions if a.dest == "command").choices
    assert sorted(choices) == sorted(node.COMMANDS)  # one list of commands
    samples = [
        [
            "--config",
            "/x/node.json",
            "activate",
            "--sha256",
            "s",
            "--commit",
            "c",
            "--url-stdin",
            "--manifest-stdin",
            "--size",
            "9",
            "--restart",
            "--user",
            "u@h",
            "--ref",
            "main",
        ],
        ["activate", "--sha256", "s", "--commit", "c", "--prepared"],
        ["--config=/x/node.json", "rollback", "--check", "--release", "20260101000000"],
        ["status", "--after-boot", "b", "--wait", "2.5"],
        ["once", "--sha256", "s", "--commit", "c", "--s3-key", "k", "--hooks", "[]"],
        ["shared", "--fetch"],
        *[[c] for c in ("boot", "check", "cleanup", "version", "report")],
    ]
    for argv in samples:
        only = node._command_of(argv)
        assert only == next(a for a in argv if not a.startswith("-") and a in node.COMMANDS)
        small = node._parser(only)
        assert list(next(a for a in small._actions if a.dest == "command").choices) == [only]
        assert vars(small.parse_args(argv)) == vars(full.parse_args(argv)), argv
    assert node._command_of(["--config", "/x", "nope"]) is None  # whole CLI: its error lists all
    assert node._command_of(["--config"]) is None and node._command_of([]) is None


def test_cli_unexpected_exception_is_json(
    tmp_path: Path,
    cfg: node.Config,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(cfg: node.Config, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(node, "status", boom)
    code, out, _ = run_main(capsys, ["--config", str(tmp_path / "node.json"), "status"])
    assert code == 1 and "RuntimeError: kaboom" in out["error"]


def test_config_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "node.json"
    conf.write_text(
        json.dumps({"app": "a", "deploy_to": "/srv/a", "s3": {"bucket": "b"}, "new_key": 1})
    )
    cfg = node.load_config(str(conf))
    assert cfg.keep_releases == 5 and cfg.max_files == 200000 and cfg.restart is None
    assert cfg.boot.attempts == 5 and cfg.boot.first_boot_attempts == 30
    assert cfg.s3.key("published.json") == "published.json"


def test_import_is_lean() -> None:
    import subprocess
    import sys

    # Load the file on its own, as on a host (the fabdeploy package is not shipped there).
    code = (
        "import importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('node', {node.__file__!r});"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec));"
        "print(sorted(m for m in ('boto3', 'botocore', 'tarfile', 'subprocess', 'urllib.request',"
        " 'argparse', 'socket', 'shutil') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-E", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_activation_cleans_leftovers_of_a_killed_run(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    # What a kill -9 mid-extraction / mid-swap leaves behind.
    staging = layout.release_path(".staging-20231114221320-4242")
    os.makedirs(os.path.join(staging, "half"))
    os.symlink(
        layout.release_path(first["release"]), os.path.join(layout.deploy_to, ".current-tmp-4242")
    )
    assert node.read_current(layout).ok  # type: ignore[union-attr]
    deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)
    assert not os.path.lexists(staging)
    assert not os.path.lexists(os.path.join(layout.deploy_to, ".current-tmp-4242"))
    assert node.status(cfg)["staging"] == []


def test_release_killed_during_hooks_is_never_a_rollback_target(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    r1 = deploy(cfg, tmp_path, "c1", now=lambda: T0)["release"]
    r2 = deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)["release"]
    # A run killed while its before_swap hook ran: renamed, has REVISION, never went live.
    orphan = layout.release_path("20231114221330")
    os.makedirs(orphan)
    Path(orphan, "REVISION").write_text("c9\n")
    Path(orphan, node.PENDING_MARKER).write_text("4242\n")
    assert node.status(cfg)["pending"] == ["20231114221330"]
    assert node.complete_releases(layout) == [r1, r2]
    assert node.rollback(cfg)["release"] == r1
    assert not os.path.lexists(orphan)  # the locked run cleaned it up first
    assert node.status(cfg)["pending"] == []


def test_pending_marker_on_current_is_cleared(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    r1 = deploy(cfg, tmp_path, "c1")["release"]
    Path(layout.release_path(r1), node.PENDING_MARKER).write_text("1\n")  # killed right after swap
    node.cleanup(cfg)
    assert os.path.isdir(layout.release_path(r1))
    assert not node.is_pending(layout.release_path(r1))


def test_sync_filesystem_flushes_only_that_filesystem(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(node.os, "sync", lambda: calls.append("sync"))
    node.sync_filesystem(str(tmp_path))  # syncfs(2) via libc: no global sync needed
    assert calls == []
    node.sync_filesystem(str(tmp_path / "missing"))  # cannot open it: the safe fallback
    assert calls == ["sync"]


def test_rollback_rerun_finishes_an_interrupted_restart(tmp_path: Path) -> None:
    """A rollback killed between its swap and its restart: the rerun restarts the app."""
    restarts = tmp_path / "restarts"
    cfg = make_cfg(tmp_path, restart=f'echo "$REVISION" >> {restarts}')
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)
    layout = node.Layout(cfg.deploy_to)
    # What the killed rollback left behind: marker written, current swapped, no restart.
    state = Path(layout.state) / node.RESTART_MARKER
    state.write_text(json.dumps({"release": first["release"], "boot_id": node.boot_id()}))
    node.swap_current(layout, layout.release_path(first["release"]))
    again = node.rollback(cfg, release=first["release"], restart=True, user="bob")
    assert again["changed"] is False
    assert restarts.read_text().split() == ["c1"]
    assert not state.exists()
    # Without the marker, a rerun is a no-op: no needless restart.
    node.rollback(cfg, release=first["release"], restart=True, user="bob")
    assert restarts.read_text().split() == ["c1"]


def test_rollback_clears_its_restart_marker(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, restart="true")
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)
    node.rollback(cfg, restart=True, user="bob")
    assert not (Path(node.Layout(cfg.deploy_to).state) / node.RESTART_MARKER).exists()


# ------------------------------------------------------------------------------------------
# audit (issue 13 §2): bounded work and memory, no writes outside, no group-writable release


class deadline:
    """Fail (instead of hanging the suite) if the block takes more than `seconds`."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def _fire(self, signum: int, frame: Any) -> None:
        raise AssertionError(f"took more than {self.seconds}s")

    def __enter__(self) -> None:
        self.old = signal.signal(signal.SIGALRM, self._fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: Any) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def chained_links(n: int) -> list[Entry]:
    # L_i -> L_{i-1}/../L_{i-1}: resolving naively doubles the work at every level.
    entries: list[Entry] = [("L0", "dir", None)]
    entries += [(f"L{i}", "symlink", f"L{i - 1}/../L{i - 1}") for i in range(1, n)]
    return entries


def test_symlink_chains_validate_in_linear_time(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    bundle = tmp_path / "chain.tar.gz"
    sha = make_tar(bundle, chained_links(60))  # 2**60 steps without the memo
    with deadline(20):
        result = activate(cfg, bundle, sha, "c1")
    assert os.path.islink(Path(layout.release_path(result["release"])) / "L59")


def test_symlink_resolution_work_is_capped(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node, "MAX_RESOLVE_STEPS_PER_MEMBER", 1)
    bundle = tmp_path / "chain.tar.gz"
    sha = make_tar(bundle, chained_links(30))
    with pytest.raises(node.NodeError, match=r"steps to resolve \(at symlink 'L\d+'\)") as err:
        activate(cfg, bundle, sha, "c1")
    assert "\n" not in err.value.message and "nothing was activated" in err.value.message
    assert os.listdir(layout.releases) == []


def big_header_tar(path: Path, kind: str) -> str:
    fmt = tarfile.GNU_FORMAT if kind == "longname" else tarfile.PAX_FORMAT
    glob = {"comment": "x" * 8192} if kind == "global" else None
    with tarfile.open(path, "w:gz", format=fmt, pax_headers=glob) as tf:
        if kind == "pax":
            ti = tarfile.TarInfo("f")
            ti.pax_headers = {"comment": "x" * (4 << 20)}  # 4 MiB read into RAM by tarfile
        elif kind == "global":
            ti = tarfile.TarInfo("f")
        else:
            ti = tarfile.TarInfo("d/" * 60_000 + "f")  # a 120 KB GNU long name
        tf.addfile(ti, io.BytesIO(b""))
    return sha256(path)


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("pax", r"a pax header at offset \d+ claims \d+ bytes \(limit 65536\)"),
        ("longname", r"a GNU long-name header at offset \d+ claims \d+ bytes"),
        ("global", "pax global headers exceed 4096 bytes"),
    ],
)
def test_oversized_tar_metadata_is_refused_unread(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, kind: str, expected: str
) -> None:
    bundle = tmp_path / "big.tar.gz"
    sha = big_header_tar(bundle, kind)
    with pytest.raises(node.NodeError, match=expected) as err:
        activate(cfg, bundle, sha, "c1")
    assert "unsafe bundle" in err.value.message and "\n" not in err.value.message
    assert os.listdir(layout.releases) == []


def test_pax_header_memory_stays_small(tmp_path: Path) -> None:
    """The 1.8 MB bundle of the audit (one pax header claiming ~420 MiB) in a child whose
    address space is capped: refused with a clear line, no MemoryError."""
    bundle = tmp_path / "bomb.tar.gz"
    claimed = 420 << 20
    with gzip.open(bundle, "wb", compresslevel=1) as gz:  # streamed: the test stays small too
        header = tarfile.TarInfo("././@PaxHeader")
        header.type, header.size = tarfile.XHDTYPE, claimed
        gz.write(header.tobuf(tarfile.USTAR_FORMAT))
        zeros = bytes(1 << 20)
        for _ in range(claimed >> 20):
            gz.write(zeros)
        gz.write(tarfile.TarInfo("f").tobuf(tarfile.USTAR_FORMAT) + bytes(1024))
    assert bundle.stat().st_size < 4 << 20
    code = (
        "import resource, sys, importlib.util\n"
        "spec = importlib.util.spec_from_file_location('n', sys.argv[1])\n"
        "n = importlib.util.module_from_spec(spec); spec.loader.exec_module(n)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), int(sys.argv[3])))\n"
        "try:\n"
        "    n.extract_bundle(sys.argv[2], sys.argv[2] + '.d', 1000)\n"
        "except n.NodeError as e:\n"
        "    print(e.message)\n"
    )
    import subprocess

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    limit = 300 << 20 if soft == resource.RLIM_INFINITY else min(soft, 300 << 20)
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, node.__file__, str(bundle), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "claims" in out.stdout and "MemoryError" not in out.stderr, out.stdout + out.stderr


def test_git_archive_style_metadata_is_fine(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    bundle = tmp_path / "git.tar.gz"
    long_name = "src/" + "deep/" * 60 + "main.py"  # > 100 chars: a per-file pax header
    with tarfile.open(
        bundle, "w:gz", format=tarfile.PAX_FORMAT, pax_headers={"comment": "c" * 40}
    ) as tf:
        ti = tarfile.TarInfo(long_name)
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"ok"))
    result = activate(cfg, bundle, sha256(bundle), "c1")
    assert (Path(layout.release_path(result["release"])) / long_name).read_text() == "ok"


@pytest.mark.parametrize("data_filter", [True, False], ids=["filter", "nofilter"])
def test_release_is_not_group_or_other_writable(
    tmp_path: Path,
    cfg: node.Config,
    layout: node.Layout,
    monkeypatch: pytest.MonkeyPatch,
    data_filter: bool,
) -> None:
    """git archive's default tar.umask (002) gives 0664/0775 members; even without tarfile's
    data filter (Debian 12's 3.11.2) and under a loose umask, the release is 0644/0755."""
    monkeypatch.setattr(node, "USE_DATA_FILTER", data_filter)
    bundle = tmp_path / "loose.tar.gz"
    with tarfile.open(bundle, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name, mode, kind in (
            ("app", 0o775, tarfile.DIRTYPE),
            ("app/x.py", 0o664, None),
            ("bin/run", 0o777, None),
            ("implicit/y.txt", 0o666, None),
        ):
            ti = tarfile.TarInfo(name)
            ti.mode = mode
            if kind:
                ti.type = kind
                tf.addfile(ti)
            else:
                ti.size = 1
                tf.addfile(ti, io.BytesIO(b"x"))
    old = os.umask(0o002)
    try:
        result = activate(cfg, bundle, sha256(bundle), "c1")
    finally:
        os.umask(old)
    release = Path(layout.release_path(result["release"]))
    modes = {
        p.relative_to(release).as_posix(): stat.S_IMODE(p.lstat().st_mode)
        for p in release.rglob("*")
        if not p.is_symlink()
    }
    loose = {name: oct(mode) for name, mode in modes.items() if mode & 0o022}
    assert loose == {}
    assert modes["app/x.py"] == 0o644 and modes["bin/run"] == 0o755 and modes["app"] == 0o755


def test_keep_releases_1_still_spares_the_previous_release(tmp_path: Path) -> None:
    """The health check's revert needs the release that current pointed to before the swap."""
    cfg = make_cfg(tmp_path, keep_releases=1)
    layout = node.Layout(cfg.deploy_to)
    r1 = deploy(cfg, tmp_path, "c1", now=lambda: T0)["release"]
    r2 = deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)
    assert r2["pruned"] == [] and r2["previous"]["release"] == r1
    assert node.rollback(cfg, release=r1)["release"] == r1  # the revert works
    r3 = deploy(cfg, tmp_path, "c3", now=lambda: T0 + 2)
    assert r3["previous"]["release"] == r1 and r3["pruned"] == [r2["release"]]
    assert node.list_releases(layout) == [r1, r3["release"]]
    # A later cleanup spares it too: the revert may still be on its way.
    assert node.cleanup(cfg)["pruned"] == []


def test_rollback_to_an_old_release_then_activate_spares_it(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, keep_releases=3)
    names = [deploy(cfg, tmp_path, f"c{i}", now=lambda i=i: T0 + i)["release"] for i in range(3)]
    node.rollback(cfg, release=names[0])  # current: the oldest
    new = deploy(cfg, tmp_path, "c9", now=lambda: T0 + 9)
    assert new["previous"]["release"] == names[0]
    assert new["pruned"] == []  # the oldest is beyond keep_releases, but it is the revert target
    assert node.rollback(cfg, release=names[0])["release"] == names[0]


def test_link_shared_creates_nothing_through_a_symlink(tmp_path: Path) -> None:
    """A hand-built release whose `config` is a symlink leading outside (a bundle cannot
    have one): link_shared refuses before creating any directory."""
    cfg = make_cfg(tmp_path, linked_files=["config/sub/database.yml"], linked_dirs=["config/x/y"])
    layout = node.Layout(cfg.deploy_to)
    layout.ensure()
    (Path(layout.shared) / "config/sub").mkdir(parents=True)
    (Path(layout.shared) / "config/sub/database.yml").write_text("db")
    outside = tmp_path / "outside"
    outside.mkdir()
    release = Path(layout.releases) / "20231114221320"
    release.mkdir()
    (release / "config").symlink_to(outside)
    with pytest.raises(node.NodeError, match="would leave release .* via symlink") as err:
        node.link_shared(cfg, layout, str(release))
    assert "\n" not in err.value.message
    assert list(outside.iterdir()) == []


def test_lock_and_revisions_log_symlinks_are_not_followed(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.unlink(layout.lock)
    os.symlink(victim, layout.lock)
    with pytest.raises(node.NodeError, match="lock on .* is a symlink: refusing to follow it"):
        deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)
    assert victim.read_text() == "precious\n"
    os.unlink(layout.lock)
    os.unlink(layout.revisions_log)
    os.symlink(victim, layout.revisions_log)
    result = deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)  # the log line is skipped, not fatal
    assert result["changed"] and victim.read_text() == "precious\n"


def test_status_temp_file_symlink_is_not_followed(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, f"{layout.status}.tmp-{os.getpid()}")
    node.record_status(layout, "last", {"outcome": "ok"})
    assert victim.read_text() == "precious\n"
    assert node.read_status(layout)["last"]["outcome"] == "ok"


@pytest.mark.parametrize("which", ["deploy_to", "state"])
def test_deploy_to_writable_by_others_is_refused(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, which: str
) -> None:
    deploy(cfg, tmp_path, "c1", now=lambda: T0)
    path = getattr(layout, which)
    os.chmod(path, 0o777)
    with pytest.raises(node.NodeError) as err:
        deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)
    assert err.value.message == (
        f"{path} on {node.hostname()} is writable by other users (mode 0777): "
        f"run `chmod go-w {path}` and retry"
    )
    os.chmod(path, 0o755)
    assert deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1)["changed"]


def test_state_dir_symlink_is_refused(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.makedirs(layout.deploy_to)
    os.symlink(elsewhere, layout.state)
    with pytest.raises(node.NodeError, match="is not a directory \\(it is a symlink\\)"):
        deploy(cfg, tmp_path, "c1")
    assert list(elsewhere.iterdir()) == []


class Store:
    """A real HTTP server that may send more than the bundle (a swapped object)."""

    def __init__(self, body: bytes, content_length: bool = True) -> None:
        import http.server

        outer = self
        self.body = body
        self.sent = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                if content_length:
                    self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                try:
                    for i in range(0, len(outer.body), 65536):
                        self.wfile.write(outer.body[i : i + 65536])
                        outer.sent += len(outer.body[i : i + 65536])
                except OSError:
                    pass  # the node hung up: what we want

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/b.tar.gz?X-Amz-Signature=s"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("content_length", [True, False], ids=["announced", "streamed"])
def test_download_stops_at_the_bundle_size(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, content_length: bool
) -> None:
    bundle, sha = good_bundle(tmp_path)
    size = bundle.stat().st_size
    store = Store(bundle.read_bytes() + os.urandom(32 << 20), content_length)  # +32 MiB
    try:
        with pytest.raises(node.VerificationError) as err:
            node.activate(cfg, sha256=sha, commit="c1", source=node.Source("url", store.url, size))
    finally:
        store.close()
    msg = err.value.message
    assert f"should be {size} bytes" in msg and "download stopped" in msg and "\n" not in msg
    assert "X-Amz-Signature" not in msg
    assert os.listdir(layout.state) == ["lock", "status.json"]  # no temp download left
    assert store.sent < (8 << 20)  # we hung up early, not after the whole object


def test_download_of_the_right_size_works_and_url_comes_from_stdin(
    tmp_path: Path,
    cfg: node.Config,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle, sha = good_bundle(tmp_path)
    store = Store(bundle.read_bytes())
    monkeypatch.setattr(sys, "stdin", io.StringIO(store.url + "\n"))
    try:
        code, out, err = run_main(
            capsys,
            [
                "--config",
                str(tmp_path / "node.json"),
                "activate",
                "--sha256",
                sha,
                "--commit",
                "c1",
                "--url-stdin",
                "--size",
                str(bundle.stat().st_size),
            ],
        )
    finally:
        store.close()
    assert code == 0 and out["changed"], out
    assert "X-Amz-Signature" not in err


def test_s3_download_stops_at_the_pointer_size(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, sha = good_bundle(tmp_path)
    size = bundle.stat().st_size

    class Body(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            assert n != -1 and n <= node.CHUNK  # never "everything"
            return super().read(n)

    class Client:
        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
            return {"ContentLength": None, "Body": Body(bundle.read_bytes() + b"x" * (4 << 20))}

    monkeypatch.setattr(node, "s3_client", lambda cfg: Client())
    pointer, _ = pointer_for(tmp_path, "c1")
    with pytest.raises(node.VerificationError, match=f"should be {size} bytes"):
        node.activate(cfg, sha256=sha, commit="c1", source=node.Source("s3", "k", size))
    bad = {**pointer, "size": "12"}
    with pytest.raises(node.NodeError, match="lacks a valid 'size'"):
        node.validate_pointer(bad, cfg)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"key": "k", "commit": "c2", "sha256": "'
        + b"a" * 64
        + b'", "size": 1, "committed_at": Infinity}',
        b'{"key": "k", "commit": "c2", "sha256": "'
        + b"a" * 64
        + b'", "size": 1, "committed_at": NaN}',
        b'{"key": "k", "commit": "c2", "sha256": "'
        + b"a" * 64
        + b'", "size": 1, "committed_at": 1e999}',
        b'{"key": "k", "commit": "c2", "sha256": "'
        + b"a" * 64
        + b'", "size": 1, "committed_at": -5}',
        b"[" * 100000 + b"]" * 100000,
    ],
)
def test_boot_malformed_pointer_is_a_recorded_outcome_not_a_crash(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, raw: bytes
) -> None:
    """Audit 13.8: a pointer anyone with bucket write could craft must leave current alone."""
    deploy(cfg, tmp_path, "c1")
    result = node.boot(
        cfg, pointer_source=lambda: node.parse_pointer(raw, "pointer"), sleep=Sleeper()
    )
    assert result["outcome"] == "kept" and result["commit"] == "c1"
    assert "re-publish" in result["reason"]
    assert node.read_status(layout)["last_boot"]["outcome"] == "kept"


def test_boot_survives_an_unexpected_error(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    deploy(cfg, tmp_path, "c1")

    def boom() -> Any:
        raise OverflowError("cannot convert float infinity to integer")

    result = node.boot(cfg, pointer_source=boom, sleep=Sleeper())
    assert result["outcome"] == "kept" and "unexpected error: OverflowError" in result["reason"]


# ------------------------------------------------------------------------------------------
# one-pass activation: unchanged files hardlinked from the previous release


def release_dir(layout: node.Layout, result: dict[str, Any]) -> Path:
    return Path(layout.release_path(result["release"]))


def big_app(changed: str = "v1") -> list[Entry]:
    big = "B" * (node.CHUNK + 10)  # more than one read: compared chunk by chunk
    return [
        ("app", "dir", None),
        ("app/same.py", "file", "unchanged"),
        ("app/changed.py", "file", f"print('{changed}')"),  # same size in v1 and v2
        ("app/big.bin", "file", big if changed == "v1" else big[:-1] + "C"),  # last chunk differs
        ("app/big2.bin", "file", big),
        ("app/alias", "symlink", "same.py"),
        ("app/hard", "hardlink", "app/same.py"),
    ]


def test_unchanged_files_are_hardlinked_from_the_previous_release(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    b1, b2 = tmp_path / "v1.tar.gz", tmp_path / "v2.tar.gz"
    r1 = release_dir(layout, activate(cfg, b1, make_tar(b1, big_app("v1")), "c1", now=lambda: T0))
    r2 = release_dir(
        layout, activate(cfg, b2, make_tar(b2, big_app("v2")), "c2", now=lambda: T0 + 10)
    )
    ino = lambda p: os.lstat(p).st_ino  # noqa: E731
    assert ino(r2 / "app/same.py") == ino(r1 / "app/same.py")
    assert ino(r2 / "app/big2.bin") == ino(r1 / "app/big2.bin")
    assert ino(r2 / "app/hard") == ino(r2 / "app/same.py")
    for name in ("app/changed.py", "app/big.bin"):
        assert ino(r2 / name) != ino(r1 / name)
    assert (r2 / "app/changed.py").read_text() == "print('v2')"
    assert (r1 / "app/changed.py").read_text() == "print('v1')"
    big = (r2 / "app/big.bin").read_text()  # prefix copied from v1, differing chunk from v2
    assert len(big) == node.CHUNK + 10 and big.endswith("BC") and big.count("C") == 1
    assert os.readlink(r2 / "app/alias") == "same.py"
    assert stat.S_IMODE(os.lstat(r2 / "app/changed.py").st_mode) == 0o644


def test_link_unchanged_off_writes_independent_copies(tmp_path: Path, layout: node.Layout) -> None:
    cfg = make_cfg(tmp_path, link_unchanged=False)
    r1 = release_dir(layout, deploy(cfg, tmp_path, "c1", now=lambda: T0))
    r2 = release_dir(layout, deploy(cfg, tmp_path, "c2", now=lambda: T0 + 10))
    assert os.lstat(r2 / "bin/run").st_ino != os.lstat(r1 / "bin/run").st_ino


def test_files_differing_in_mode_or_content_or_behind_links_are_not_linked(
    tmp_path: Path, layout: node.Layout
) -> None:
    cfg = make_cfg(tmp_path, linked_dirs=["log"])
    os.makedirs(Path(cfg.deploy_to) / "shared/log")
    b1 = tmp_path / "v1.tar.gz"
    entries: list[Entry] = [
        ("a.txt", "file", "same"),
        ("b.txt", "file", "same"),
        ("log", "dir", None),
    ]
    r1 = release_dir(layout, activate(cfg, b1, make_tar(b1, entries), "c1", now=lambda: T0))
    assert (r1 / "log").is_symlink()
    os.chmod(r1 / "a.txt", 0o600)  # mode differs now
    (r1 / "b.txt").write_text("SAME")  # the app changed it in place: same size, other bytes
    # shared/log/x.log has the very bytes and mode of the next bundle's log/x.log: it must
    # not be linked through current's `log` symlink into the new release.
    shared_log = Path(cfg.deploy_to) / "shared/log/x.log"
    shared_log.write_text("log line")
    os.chmod(shared_log, 0o644)
    b2 = tmp_path / "v2.tar.gz"
    sha = make_tar(b2, [*entries, ("log/x.log", "file", "log line")])
    r2 = release_dir(layout, activate(cfg, b2, sha, "c2", now=lambda: T0 + 10))
    assert os.lstat(r2 / "a.txt").st_ino != os.lstat(r1 / "a.txt").st_ino
    assert (r2 / "b.txt").read_text() == "same"
    assert os.lstat(shared_log).st_nlink == 1


def test_corrupted_download_is_a_sha_mismatch_not_a_corrupt_bundle(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    good = tmp_path / "good.tar.gz"
    sha = make_tar(good, [(f"f{i}", "file", os.urandom(3000).hex()) for i in range(30)])
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in transit: the gzip stream breaks
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(node.VerificationError, match="sha256 mismatch"):
        activate(cfg, bad, sha, "c1")
    assert os.listdir(layout.releases) == []  # the staging dir is gone


@pytest.mark.parametrize("mode", ["w", "w:bz2", "w:xz"])
def test_other_compressions_and_plain_tar(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, mode: str
) -> None:
    bundle = tmp_path / "b.tar"
    sha = make_tar(bundle, app_entries("plain"), mode=mode)
    result = activate(cfg, bundle, sha, "c1")
    assert (release_dir(layout, result) / "app/main.py").read_text() == "print('plain')"


def test_concatenated_gzip_members_are_one_stream(
    tmp_path: Path, cfg: node.Config, layout: node.Layout
) -> None:
    plain = tmp_path / "p.tar"
    make_tar(plain, app_entries("cat"), mode="w")
    raw = plain.read_bytes()
    bundle = tmp_path / "cat.tar.gz"
    bundle.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    result = activate(cfg, bundle, sha256(bundle), "c1")
    assert (release_dir(layout, result) / "app/main.py").read_text() == "print('cat')"


def test_decompression_bomb_is_read_in_bounded_steps(tmp_path: Path) -> None:
    """200 MiB of zeros in one member: streamed in CHUNK pieces, never held in memory."""
    bundle = tmp_path / "zeros.tar.gz"
    size = 200 << 20
    with gzip.open(bundle, "wb", compresslevel=1) as gz:
        ti = tarfile.TarInfo("zeros")
        ti.size = size
        gz.write(ti.tobuf(tarfile.USTAR_FORMAT))
        zeros = bytes(1 << 20)
        for _ in range(size >> 20):
            gz.write(zeros)
        gz.write(bytes(1024))
    code = (
        "import resource, sys, importlib.util\n"
        "spec = importlib.util.spec_from_file_location('n', sys.argv[1])\n"
        "n = importlib.util.module_from_spec(spec); spec.loader.exec_module(n)\n"
        "n.extract_bundle(sys.argv[2], sys.argv[2] + '.d', 1000)\n"
        # VmHWM, not ru_maxrss: the latter carries the forking pytest's peak across exec.
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-I", "-c", code, node.__file__, str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) < 100 * 1024  # KiB: far below the member's 200 MiB
    assert os.path.getsize(str(bundle) + ".d/zeros") == size


def test_space_slack_is_kept_even_when_every_file_is_linked(
    tmp_path: Path, cfg: node.Config, layout: node.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0)
    bundle, sha = good_bundle(tmp_path, "c1")  # the same files: all of them would be linked
    monkeypatch.setattr(node, "disk_free", lambda path: 1024 * 1024)
    with pytest.raises(node.NodeError, match="not enough disk space.*16.0 MB needed"):
        activate(cfg, bundle, sha, "c2", now=lambda: T0 + 10)
    assert os.listdir(layout.releases) == [first["release"]]


def test_restart_goes_through_sudo_with_the_password_on_stdin(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """ssh.sudo: `sudo -n` without a password (never a prompt); with one, `sudo -S` reads it
    from stdin and it is in no argv."""
    bin_dir, seen, marker = tmp_path / "bin", tmp_path / "sudo-calls", tmp_path / "restarted"
    bin_dir.mkdir()
    fake = bin_dir / "sudo"
    fake.write_text(
        f'#!/bin/sh\necho "ARGS $*" >> {seen}\n'
        f'case "$1" in -S) IFS= read -r pw; echo "STDIN $pw" >> {seen};; esac\n'
        'while [ "$1" != "--" ]; do shift; done; shift; exec "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = make_cfg(tmp_path, restart=f"touch {marker}", sudo=True)
    assert cfg.sudo is True
    deploy(cfg, tmp_path, "c1", restart=True)
    assert marker.exists() and seen.read_text().splitlines() == [f"ARGS -n -- touch {marker}"]

    seen.unlink()
    monkeypatch.setattr(node, "SUDO_PASSWORD", "s3cret word")
    deploy(cfg, tmp_path, "c2", restart=True)
    assert seen.read_text().splitlines() == [f"ARGS -S -p  -- touch {marker}", "STDIN s3cret word"]
