"""Rollback keys on the bundle id (commit + build recipe), not the commit (issue 14 §1).

One commit deployed with build recipe A, then with recipe B, then `fab deploy.rollback`: the
hosts go back to A's release, and the published pointer must name A's bundle too (it used to be
matched by commit, which B's bundle shares), so a reboot serves A as well.
Real `fab`, real sshd sandbox hosts, local S3.
"""

from __future__ import annotations

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

HOSTS = ["web1", "web2"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("rbid"), subnet="127.0.64", hosts=len(HOSTS))
    yield f
    sandbox.down(f.sb.dir)


def built(fleet: Fleet, host: str) -> str:
    return fleet.ssh(host, "cat /srv/shop/current/built.txt").strip()


def bid(fleet: Fleet, host: str) -> str:
    return fleet.ssh(host, "cat /srv/shop/current/.fabdeploy-bundle-id").strip()


def test_rollback_publishes_the_same_commits_earlier_recipe_and_boot_keeps_it(
    fleet: Fleet,
) -> None:
    commit = fleet.git("rev-parse", "HEAD")
    cfg_a = fleet.variant("recipeA", build={"commands": ["echo recipe-A > built.txt"]})
    cfg_b = fleet.variant("recipeB", build={"commands": ["echo recipe-B > built.txt"]})
    fleet.fab("deploy.setup", config=cfg_a)

    fleet.fab("deploy.hotfix", config=cfg_a)  # the whole fleet: published too
    a_id = fleet.pointer()["bundle_id"]
    a_release = {h: fleet.current(h) for h in HOSTS}
    assert a_id.startswith(commit + "-") and [bid(fleet, h) for h in HOSTS] == [a_id] * 2
    assert [built(fleet, h) for h in HOSTS] == ["recipe-A"] * 2

    fleet.fab("deploy.hotfix", config=cfg_b)
    b_id = fleet.pointer()["bundle_id"]
    assert b_id != a_id and b_id.startswith(commit + "-")
    assert [built(fleet, h) for h in HOSTS] == ["recipe-B"] * 2
    assert {h: fleet.current(h) for h in HOSTS} != a_release

    r = fleet.fab("deploy.rollback", config=cfg_b)
    assert "published pointer moved back to" in r.stdout, r.stdout + r.stderr
    p = fleet.pointer()
    assert (p["bundle_id"], p["commit"]) == (a_id, commit)
    assert p["key"].endswith(f"bundles/{a_id}.tar.gz")
    assert {h: fleet.current(h) for h in HOSTS} == a_release
    assert [built(fleet, h) for h in HOSTS] == ["recipe-A"] * 2

    st = __import__("json").loads(fleet.fab("deploy.status", "--json", config=cfg_b).stdout)
    assert [h["drift"] for h in st["hosts"]] == [False, False]

    # A reboot pulls the published bundle: it is A's, which the host already runs.
    releases = fleet.releases("web1")
    fleet.reboot("web1")
    assert wait_for(
        lambda: (
            fleet.node_status("web1").get("last_boot", {}).get("boot_id") == fleet.boot_id("web1")
        ),
        what="web1 boot outcome",
    )
    assert fleet.node_status("web1")["last_boot"]["outcome"] == "unchanged"
    assert fleet.current("web1") == a_release["web1"] and fleet.releases("web1") == releases
    assert built(fleet, "web1") == "recipe-A" and bid(fleet, "web1") == a_id
    assert wait_for(lambda: fleet.version("web1"), what="app on web1") == commit
