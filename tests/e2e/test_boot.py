"""The boot unit on real (sandbox) hosts: setup, then reboots pull the published bundle."""

from __future__ import annotations

import re

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("boot"), subnet="127.0.31", hosts=2)
    yield f
    sandbox.down(f.sb.dir)


def test_setup_installs_and_second_run_reports_no_changes(fleet: Fleet) -> None:
    r = fleet.fab("deploy.setup")
    # A progress line per host as it finishes, then the table: both say installed.
    assert sorted(re.findall(r"^\[ *[\d.]+s\] (web\d): installed$", r.stdout, re.M)) == [
        "web1",
        "web2",
    ], r.stdout
    assert r.stdout.count("installed") == 4, r.stdout
    for host in ("web1", "web2"):
        fleet.ssh(
            host,
            "test -f /usr/local/lib/fabdeploy/shop/node.py && test -d /srv/shop/releases "
            "&& test -L /etc/systemd/system/multi-user.target.wants/fabdeploy-shop.service",
        )
    # Installed on the hosts' private /usr/local, not on this machine.
    assert not __import__("os").path.exists("/usr/local/lib/fabdeploy/shop/node.py")
    again = fleet.fab("deploy.setup")
    assert "no changes" in again.stdout and "installed" not in again.stdout


def test_reboot_activates_published_bundle(fleet: Fleet) -> None:
    commit = fleet.git("rev-parse", "HEAD")
    fleet.fab("deploy.publish")
    assert fleet.pointer()["commit"] == commit
    fleet.reboot("web1")
    assert fleet.revision("web1") == commit
    assert wait_for(lambda: fleet.version("web1"), what="app on web1") == commit
    rel = fleet.current("web1")
    assert rel.startswith("/srv/shop/releases/") and len(rel.rsplit("/", 1)[1]) == 14
    assert (
        fleet.ssh("web1", "readlink /srv/shop/current/config/database.yml").strip()
        == "/srv/shop/shared/config/database.yml"
    )
    assert fleet.ssh("web1", "readlink /srv/shop/current/log").strip() == "/srv/shop/shared/log"
    log = fleet.ssh("web1", "cat /srv/shop/revisions.log").strip().splitlines()
    assert log[-1].startswith(f"Branch HEAD (at {commit}) deployed as release ") or log[
        -1
    ].startswith(f"Branch {fleet.pointer()['ref']} (at {commit}) deployed as release ")
    st = fleet.node_status("web1")
    assert st["last_boot"]["outcome"] == "activated" and st["last_boot"][
        "boot_id"
    ] == fleet.boot_id("web1")
    # web2 was not rebooted: still nothing deployed there.
    assert fleet.ssh("web2", "test -e /srv/shop/current && echo yes || echo no").strip() == "no"


def test_reboot_without_new_publish_creates_no_release(fleet: Fleet) -> None:
    before = fleet.releases("web1")
    fleet.reboot("web1")
    assert fleet.releases("web1") == before
    assert fleet.node_status("web1")["last_boot"]["outcome"] == "unchanged"
    assert wait_for(lambda: fleet.version("web1"), what="app on web1") == fleet.revision("web1")


def test_s3_down_at_boot_keeps_previous_release(fleet: Fleet) -> None:
    old = fleet.revision("web1")
    new = fleet.commit("a change published while S3 will be down")
    fleet.fab("deploy.publish")
    cfg = fleet.variant(
        "s3down", node={"boot_attempts": 2, "boot_backoff": 0.2, "download_timeout": 2}
    )
    fleet.fab("deploy.setup", config=cfg)
    state = fleet.sb.dir / "sandbox.json"
    import json
    import os
    import signal

    s3_pid = json.loads(state.read_text())["s3"]["pid"]
    os.kill(s3_pid, signal.SIGSTOP)  # S3 hangs: the worst kind of unreachable
    try:
        fleet.reboot("web1")
    finally:
        os.kill(s3_pid, signal.SIGCONT)
    assert fleet.revision("web1") == old != new
    st = fleet.node_status("web1")
    assert st["last_boot"]["outcome"] == "kept"
    assert st["last_boot"]["reason"]
    assert wait_for(lambda: fleet.version("web1"), what="app on web1") == old
    # With S3 back, the next boot catches up.
    fleet.reboot("web1")
    assert fleet.revision("web1") == new


def test_status_table_shows_hosts(fleet: Fleet) -> None:
    r = fleet.fab("deploy.status", check=False)
    assert "web1" in r.stdout and "web2" in r.stdout
    assert "no current release" in r.stdout  # web2 never booted with a publish


def test_exported_node_files_boot_a_fresh_instance(fleet: Fleet, tmp_path) -> None:
    """What an AMI build or user-data does: install.sh from `deploy.export-node`, then boot."""
    # A fresh instance: no node program, no releases; its shared config comes with the image.
    fleet.ssh(
        "web2",
        "rm -rf /usr/local/lib/fabdeploy /etc/systemd/system/fabdeploy-shop.service "
        "/etc/systemd/system/multi-user.target.wants/fabdeploy-shop.service "
        "/srv/shop/releases /srv/shop/current /srv/shop/.fabdeploy /srv/shop/revisions.log",
    )
    out = tmp_path / "node-bundle"  # /tmp is shared with the sandbox hosts
    fleet.fab("deploy.export-node", f"--out={out}")
    fleet.ssh("web2", f"sh {out}/install.sh")
    fleet.reboot("web2")
    published = fleet.pointer()["commit"]
    assert fleet.revision("web2") == published
    assert wait_for(lambda: fleet.version("web2"), what="app on web2") == published
    r = fleet.fab("deploy.setup", "--hosts=web2")
    assert "unchanged" in r.stdout and "no changes" in r.stdout
