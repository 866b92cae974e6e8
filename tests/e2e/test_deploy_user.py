"""A non-root deploy user with sudo for the restart and the reboot only, on a real fleet.

The fleet is first set up and deployed by root (as a team moving over has it), then moved to
`deploy`: setup (as root, the admin login) hands every tree to deploy; bundle, roll, hotfix
--hosts, rollback and status then run as deploy, whose only sudo rights are the sandbox's
drop-in (exactly `systemctl restart shop` and `systemctl reboot`). Nothing under deploy_to is
root's afterwards, and a missing sudo right is one line naming the host and the command.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

HOSTS = ("web1", "web2", "web3")
RESTART = "/usr/local/bin/systemctl restart shop"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(
        tmp_path_factory.mktemp("deployuser"), subnet="127.0.39", hosts=3, reboot_delay=0.3
    )
    yield f
    sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def cfg(fleet: Fleet):
    return fleet.variant(
        "deployuser",
        ssh={"user": "deploy", "sudo": True, "admin_user": "root"},
        restart=RESTART,
        reboot="/usr/local/bin/systemctl reboot",
    )


def flat(r) -> str:
    """fab's output with the table's borders and line wraps taken out."""
    return " ".join(w for w in (r.stdout + r.stderr).split() if w not in "│┃")


def not_deploys(fleet: Fleet, host: str) -> list[str]:
    out = fleet.ssh(host, "find /srv/shop /usr/local/lib/fabdeploy/shop ! -user deploy")
    return out.split()


def test_the_whole_flow_as_deploy(fleet: Fleet, cfg) -> None:
    # A root deploy first: root-owned releases, state and node program on every host.
    fleet.fab("deploy.setup")
    fleet.fab("deploy.hotfix")
    assert not_deploys(fleet, "web1")

    r = fleet.fab("deploy.setup", config=cfg)
    # A progress line per host, then the table.
    assert sorted(re.findall(r"^\[ *[\d.]+s\] (web\d): updated$", r.stdout, re.M)) == list(HOSTS), (
        r.stdout
    )
    for h in HOSTS:
        assert not_deploys(fleet, h) == [], h  # moved over
        assert "User=deploy" in fleet.ssh(h, "cat /etc/systemd/system/fabdeploy-shop.service")
    assert "no changes" in fleet.fab("deploy.setup", config=cfg).stdout

    # roll: publish, reboot (through sudo) each host; the boot unit activates as deploy.
    new = fleet.commit("as deploy")
    fleet.fab("deploy.bundle", config=cfg)
    r = fleet.fab("deploy.roll", config=cfg, timeout=400)
    for h in HOSTS:
        assert fleet.revision(h) == new and fleet.version(h) == new, (h, r.stdout)
    st = fleet.ssh(
        "web1", "stat -c %U /srv/shop/current/ /srv/shop/revisions.log /srv/shop/.fabdeploy"
    )
    assert st.split() == ["deploy"] * 3

    # hotfix one host (restart through sudo), then roll it back.
    fix = fleet.commit("hotfix as deploy")
    fleet.fab("deploy.hotfix", "--hosts=web2", config=cfg)
    assert fleet.revision("web2") == fix and fleet.version("web2") == fix
    fleet.fab("deploy.rollback", "--hosts=web2", config=cfg)
    assert fleet.revision("web2") == new and fleet.version("web2") == new

    out = json.loads(fleet.fab("deploy.status", "--json", config=cfg).stdout)
    assert [h["host"] for h in out["hosts"]] == list(HOSTS)
    assert all(h["ok"] for h in out["hosts"]), out
    for h in HOSTS:
        assert not_deploys(fleet, h) == [], h
        assert fleet.ssh(h, "find /srv/shop -user root").split() == []


def test_status_with_a_stale_deploy_yml_reinstalls_nothing(fleet: Fleet) -> None:
    stale = fleet.variant(
        "stale",
        ssh={"user": "deploy", "sudo": True, "admin_user": "root"},
        keep_releases=4,
        restart=RESTART,
        reboot="/usr/local/bin/systemctl reboot",
    )
    node_dir = "/usr/local/lib/fabdeploy/shop"
    before = fleet.ssh("web1", f"cat {node_dir}/node.sha {node_dir}/node.json")
    r = fleet.fab("deploy.status", "--json", config=stale)
    assert all(h["outdated"] for h in json.loads(r.stdout)["hosts"]), r.stdout
    assert "outdated node program/config (fab deploy.setup)" in flat(
        fleet.fab("deploy.status", config=stale)
    )
    assert fleet.ssh("web1", f"cat {node_dir}/node.sha {node_dir}/node.json") == before


def test_a_missing_sudo_right_is_one_line(fleet: Fleet, cfg) -> None:
    fleet.fab("deploy.setup", "--hosts=web3", config=cfg)
    r = fleet.fab("deploy.check", config=cfg)
    assert flat(r).count(" ok ") >= 3 and "FAILED" not in r.stdout, r.stdout
    before = fleet.current("web3")
    fleet.ssh(
        "web3", "rm /etc/sudoers.d/fabdeploy-shop"
    )  # the last test here: no need to put it back
    r = fleet.fab(
        "deploy.check", config=cfg, check=False
    )  # the preflight sees it, changing nothing
    assert (
        r.returncode == 1
        and re.search(r"web3 FAILED ok [\d.]+ MB needed", flat(r))
        and "deploy may not run `sudo /usr/local/bin/systemctl restart shop`" in flat(r)
    ), r.stdout
    assert fleet.current("web3") == before
    fleet.commit("no sudo on web3")
    t0 = time.monotonic()
    r = fleet.fab("deploy.hotfix", "--hosts=web3", config=cfg, check=False, timeout=120)
    assert time.monotonic() - t0 < 60  # sudo -n: never waits for a password
    assert r.returncode == 1
    assert f"web3: deploy may not run `sudo {RESTART}`" in flat(r), r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert fleet.current("web3") == before  # nothing changed

    # A whole-fleet roll: web3's missing reboot right stops it before it publishes the new
    # commit or reboots web1 and web2.
    pointer, boots = fleet.pointer(), {h: fleet.boot_id(h) for h in HOSTS}
    r = fleet.fab("deploy.roll", config=cfg, check=False, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "web3: deploy may not run `sudo /usr/local/bin/systemctl reboot`" in flat(
        r
    ) and "nothing was published or rebooted" in flat(r), r.stdout + r.stderr
    assert fleet.pointer() == pointer and {h: fleet.boot_id(h) for h in HOSTS} == boots
