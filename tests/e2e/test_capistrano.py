"""Capistrano 3 and fabdeploy on the same hosts and the same deploy_to, taking turns.

The real `cap` (Debian's capistrano 3.17, git SCM from a local bare repo) against the
sandbox's real sshd: each tool must read the other's releases, and neither may trip
over the other's files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from fleet_helpers import REPO, Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
    pytest.mark.skipif(
        shutil.which("cap") is None, reason="capistrano not installed (apt-get install capistrano)"
    ),
]

HOSTS = ("web1", "web2")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("cap"), subnet="127.0.34", hosts=2)
    f.fab("deploy.setup")
    yield f
    sandbox.down(f.sb.dir)


def cap(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    bare = fleet.sb.dir / "app.git"
    subprocess.run(
        ["git", "clone", "-q", "--bare", "--no-local", str(fleet.sb.app_repo), str(bare)],
        check=False,
        capture_output=True,
    )
    subprocess.run(
        ["git", "-C", str(fleet.sb.app_repo), "push", "-q", "--force", str(bare), "main"],
        check=True,
        capture_output=True,
    )
    workdir = fleet.sb.dir / "cap"
    if not workdir.exists():
        shutil.copytree(REPO / "bench" / "cap", workdir, ignore=shutil.ignore_patterns("log"))
    env = {
        **os.environ,
        "HOME": str(fleet.home),
        "CAP_REPO_URL": f"file://{bare}",
        "CAP_BRANCH": "main",
        "CAP_DEPLOY_TO": "/srv/shop",
        "CAP_APP": "shop",
        "CAP_SSH_CONFIG": str(fleet.sb.ssh_config),
        "CAP_SSH_KEY": str(fleet.sb.key),
        "CAP_KNOWN_HOSTS": str(fleet.sb.known_hosts),
        "CAP_HOSTS": ",".join(HOSTS),
        "CAP_RESTART": "systemctl restart shop",
        "CAP_FORMAT": "pretty",
    }
    r = subprocess.run(
        ["cap", "production", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, f"cap {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def test_fab_then_cap_then_fab_then_cap_rollback(fleet: Fleet) -> None:
    a = fleet.commit("deployed by fabdeploy")
    fleet.fab("deploy.hotfix")
    fab_release = fleet.current("web1")

    b = fleet.commit("deployed by capistrano")
    cap(fleet, "deploy")
    for h in HOSTS:
        assert fleet.revision(h) == b
        assert fleet.version(h) == b
        # cap's release sorts after ours and ours is still there for it to roll back to.
        rels = fleet.releases(h)
        assert rels == sorted(rels) and len(rels) == 2
    assert fleet.current("web1") != fab_release

    st = fleet.fab("deploy.status", "--json")
    hosts = {h["host"]: h for h in json.loads(st.stdout)["hosts"]}
    assert hosts["web1"]["current"]["commit"] == b and hosts["web1"]["current"]["ok"]

    c = fleet.commit("fabdeploy again, after capistrano")
    fleet.fab("deploy.hotfix")
    for h in HOSTS:
        assert fleet.revision(h) == c and fleet.version(h) == c
        log = fleet.ssh(h, "cat /srv/shop/revisions.log").strip().splitlines()
        assert [line.split(" (at ")[1][:40] for line in log if line.startswith("Branch ")] == [
            a,
            b,
            c,
        ]

    # Capistrano's rollback reads our releases (and ignores our hidden staging/state).
    cap(fleet, "deploy:rollback")
    for h in HOSTS:
        assert fleet.revision(h) == b and fleet.version(h) == b
        assert "rolled back to release" in fleet.ssh(h, "tail -1 /srv/shop/revisions.log")
        assert fleet.ssh(h, "test -d /srv/shop/.fabdeploy && echo ok").strip() == "ok"


def test_cap_cleanup_prunes_our_releases_and_ignores_staging(fleet: Fleet) -> None:
    cfg = fleet.variant("keep9", keep_releases=9)  # so fabdeploy itself prunes nothing here
    for i in range(4):
        fleet.commit(f"release {i}")
        fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg)
    assert len(fleet.releases("web1")) > 5
    current = fleet.current("web1")
    # A staging dir left by an interrupted activation (our next run removes it) must be
    # invisible to cap meanwhile: it would otherwise count as the newest release.
    fleet.ssh("web1", "mkdir -p /srv/shop/releases/.staging-20990101000000-1")
    cap(fleet, "deploy:cleanup")  # Capistrano keeps its keep_releases (5) newest
    assert len(fleet.releases("web1")) == 5
    assert fleet.current("web1") == current
    assert fleet.ssh("web1", "ls -a /srv/shop/releases").count(".staging-") == 1
