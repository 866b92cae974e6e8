"""build: once on the deploying machine, in a clean export, the result shipped (issue 14 §1).

A scratch package is built into a wheel here (`pip wheel`, as test_app_repo.py does: test
setup, not the build); the build step vendors it with `pip install --no-index --find-links`,
so the build itself reaches no index.
Real `fab`, real sshd sandbox host, local S3.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

PKG = "fabdeploy-sample-dep"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("build"), subnet="127.0.38", hosts=1)
    yield f
    sandbox.down(f.sb.dir)


def wheel(tmp: Path, version: str) -> Path:
    """A tiny wheel of a scratch package, in its own find-links folder."""
    src = tmp / f"src-{version}"
    (src / "fabdeploy_sample_dep").mkdir(parents=True)
    (src / "fabdeploy_sample_dep" / "__init__.py").write_text(f'VERSION = "{version}"\n')
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{PKG}"\nversion = "{version}"\n'
        '[tool.setuptools]\npackages = ["fabdeploy_sample_dep"]\n'
    )
    out = tmp / f"wheels-{version}"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    assert [p.name for p in out.iterdir()] == [f"fabdeploy_sample_dep-{version}-py3-none-any.whl"]
    return out


def build_cfg(fleet: Fleet, name: str, links: Path) -> Path:
    return fleet.variant(
        name,
        build={
            "commands": [
                f"{sys.executable} -m pip install -q --no-index --find-links {links} --target vendor {PKG}"
            ],
            "exclude": ["vendor/*.dist-info"],
        },
    )


def deps(fleet: Fleet) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{fleet.sb.hosts['web1']}:8080/deps", timeout=5) as r:
            return r.read().decode().strip()
    except OSError:
        return None


def test_hotfix_serves_the_vendored_dependency_and_a_new_recipe_redeploys(
    fleet: Fleet, tmp_path: Path
) -> None:
    commit = fleet.git("rev-parse", "HEAD")
    (fleet.sb.app_repo / "untracked-notes.txt").write_text("local only\n")
    cfg1 = build_cfg(fleet, "build1", wheel(tmp_path, "1.0"))
    r = fleet.fab(
        "deploy.hotfix",
        "--hosts=web1",
        config=cfg1,
        env={"PIP_INDEX_URL": "http://127.0.0.1:9/nowhere", "PIP_NO_INPUT": "1"},
    )
    out = r.stdout + r.stderr
    assert "build [1/1] $" in out and "build done in" in out
    assert "uncommitted changes are NOT in the bundle: untracked-notes.txt" in out
    assert fleet.revision("web1") == commit
    assert wait_for(lambda: deps(fleet), what="app on web1") == "1.0"
    first_id = fleet.ssh("web1", "cat /srv/shop/current/.fabdeploy-bundle-id").strip()
    assert first_id.startswith(commit + "-") and len(first_id) == 40 + 13
    listing = fleet.ssh("web1", "ls /srv/shop/current/vendor")
    assert "fabdeploy_sample_dep" in listing and "dist-info" not in listing  # build.exclude
    assert "untracked-notes.txt" not in fleet.ssh("web1", "ls /srv/shop/current")

    # Same commit, same recipe: nothing built into S3 again, nothing changes on the host.
    releases = fleet.releases("web1")
    again = fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg1)
    assert "nothing uploaded" in again.stdout and "unchanged" in again.stdout
    assert fleet.releases("web1") == releases

    # Same commit, another recipe (a newer wheel): a new bundle id, so it deploys.
    cfg2 = build_cfg(fleet, "build2", wheel(tmp_path, "2.0"))
    fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg2)
    assert fleet.revision("web1") == commit
    assert wait_for(lambda: deps(fleet) == "2.0" and "2.0", what="app on 2.0") == "2.0"
    second_id = fleet.ssh("web1", "cat /srv/shop/current/.fabdeploy-bundle-id").strip()
    assert second_id != first_id and second_id.startswith(commit + "-")
    # Published, the pointer carries the id; status sees no drift (it compares ids).
    fleet.fab("deploy.publish", config=cfg2)
    assert fleet.pointer()["bundle_id"] == second_id
    import json

    st = json.loads(fleet.fab("deploy.status", "--json", config=cfg2).stdout)
    assert [h["drift"] for h in st["hosts"]] == [False]
    os.unlink(fleet.sb.app_repo / "untracked-notes.txt")


def test_a_failed_build_is_one_line_and_its_tail(fleet: Fleet) -> None:
    cfg = fleet.variant(
        "badbuild",
        build={"commands": ["echo compiling assets; echo 'error: no such file' >&2; exit 7"]},
    )
    r = fleet.fab("deploy.bundle", config=cfg, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "  | compiling assets" in r.stdout  # streamed as it ran
    err = r.stderr.strip().splitlines()
    first = next(i for i, line in enumerate(err) if "build command" in line)
    assert "failed with exit code 7" in err[first] and "nothing was uploaded" in err[first]
    assert err[first + 1 :] == ["  | compiling assets", "  | error: no such file"]


def test_a_bundle_every_node_would_refuse_fails_at_bundle_naming_the_member(fleet: Fleet) -> None:
    os.symlink("/var/log/sample", fleet.sb.app_repo / "vendorlog")
    fleet.git("add", "vendorlog")
    fleet.commit("capistrano-style log link")
    try:
        r = fleet.fab("deploy.bundle", check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        line = [x for x in r.stderr.splitlines() if "vendorlog" in x]
        assert len(line) == 1 and "would be refused by every node" in line[0]
        assert (
            "/var/log/sample" in line[0] and "linked_dirs" in line[0] and "relative link" in line[0]
        )
        # The fix it names works: excluded from the pack, linked to shared/ on the host.
        cfg = fleet.variant(
            "linked", build={"exclude": ["vendorlog"]}, linked_dirs=["log", "tmp/pids", "vendorlog"]
        )
        fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg)
        assert (
            fleet.ssh("web1", "readlink /srv/shop/current/vendorlog").strip()
            == "/srv/shop/shared/vendorlog"
        )
    finally:
        fleet.git("rm", "-q", "vendorlog")
        fleet.commit("drop the link")


def test_hooks_at_boot_get_their_environment_and_never_the_credentials(fleet: Fleet) -> None:
    """issue 14 §2: node_env's AWS keys used to leak into hook environments at boot."""
    cfg = fleet.variant(
        "hooks",
        hooks={
            "before_swap": ["env > /srv/shop/shared/before_swap.env"],
            "after_swap": [
                {
                    "run": "echo migrated >> /srv/shop/shared/hotfix-only.log",
                    "boot": False,
                    "timeout": 30,
                }
            ],
        },
    )
    fleet.fab("deploy.setup", config=cfg)  # node.json with the hooks
    before = fleet.current("web1")
    commit = fleet.commit("boot with hooks")
    fleet.fab("deploy.publish", config=cfg)
    fleet.reboot("web1")
    assert wait_for(lambda: fleet.revision("web1") == commit, what="web1 booted onto the commit")
    env = dict(
        line.split("=", 1)
        for line in fleet.ssh("web1", "cat /srv/shop/shared/before_swap.env").splitlines()
        if "=" in line
    )
    assert not {k for k in env if k.startswith("AWS_")}, sorted(env)
    assert env["REVISION"] == commit and env["DEPLOY_TO"] == "/srv/shop"
    assert (
        env["RELEASE_PATH"].startswith("/srv/shop/releases/") and env["PREVIOUS_RELEASE"] == before
    )
    assert (
        fleet.ssh("web1", "test -e /srv/shop/shared/hotfix-only.log && echo yes || echo no").strip()
        == "no"
    )
    # boot: false hooks do run on a hotfix.
    fleet.commit("hotfix with hooks")
    fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg)
    assert fleet.ssh("web1", "cat /srv/shop/shared/hotfix-only.log").split() == ["migrated"]
