"""hotfix, rollback and status on a sandbox fleet: real fab, real sshd, local S3."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

HOSTS = ("web1", "web2", "web3")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("hotfix"), subnet="127.0.32", hosts=3)
    yield f
    sandbox.down(f.sb.dir)


def status_json(fleet: Fleet, *args: str) -> dict:
    r = fleet.fab("deploy.status", "--json", *args, check=False)
    return json.loads(r.stdout)


def test_hotfix_whole_fleet_publishes(fleet: Fleet) -> None:
    commit = fleet.git("rev-parse", "HEAD")
    r = fleet.fab("deploy.hotfix")
    for h in HOSTS:
        assert fleet.revision(h) == commit
        assert fleet.version(h) == commit  # restarted on the new release
    assert fleet.pointer()["commit"] == commit
    assert "3 ok, 0 failed" in r.stdout


def test_second_run_has_nothing_to_do(fleet: Fleet) -> None:
    before = {h: fleet.releases(h) for h in HOSTS}
    r = fleet.fab("deploy.hotfix")
    assert r.stdout.count("unchanged") >= 3, r.stdout
    assert {h: fleet.releases(h) for h in HOSTS} == before


def test_hotfix_one_host_drifts_and_does_not_publish(fleet: Fleet) -> None:
    old = fleet.git("rev-parse", "HEAD")
    new = fleet.commit("hotfix for web2")
    r = fleet.fab("deploy.hotfix", "--hosts=web2")
    assert fleet.revision("web2") == new and fleet.version("web2") == new
    assert fleet.revision("web1") == old and fleet.revision("web3") == old
    assert fleet.pointer()["commit"] == old
    assert "NOT the published" in r.stderr and "deploy.publish" in r.stderr
    st = {h["host"]: h for h in status_json(fleet)["hosts"]}
    assert st["web2"]["drift"] is True and st["web1"]["drift"] is False


def test_dash_H_means_the_same(fleet: Fleet) -> None:
    new = fleet.git("rev-parse", "HEAD")
    r = fleet.fab("-H", "web3", "deploy.hotfix")
    assert fleet.revision("web3") == new and fleet.revision("web1") != new
    # one run, one table: the result line appears once
    assert r.stdout.count("1 ok, 0 failed") == 1


def test_json_py_in_the_ssh_users_home_does_not_break_a_hotfix(fleet: Fleet) -> None:
    """The node program runs as `python3 -I -c ...` from the SSH user's home: a module there
    must not shadow the standard library (without -I, this json.py replaced the real one)."""
    fleet.ssh("web1", "echo 'raise SystemExit(\"home json.py imported\")' > ~/json.py")
    try:
        new = fleet.commit("hotfix with a json.py in the home directory")
        r = fleet.fab("deploy.hotfix", "--hosts=web1", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert fleet.revision("web1") == new
    finally:
        fleet.ssh("web1", "rm -f ~/json.py")


def test_push_sends_bundle_over_sftp_for_nodes_without_s3(fleet: Fleet) -> None:
    new = fleet.commit("pushed, not pulled")
    tmpdir = fleet.home / "tmp"
    tmpdir.mkdir(exist_ok=True)
    r = fleet.fab("deploy.hotfix", "--hosts=web1", "--push", env={"TMPDIR": str(tmpdir)})
    assert list(tmpdir.iterdir()) == []  # the controller's copy is gone too
    assert fleet.revision("web1") == new and fleet.version("web1") == new, r.stdout
    # The pushed copy is removed once activated...
    assert not [
        n for n in fleet.ssh("web1", "ls -a /srv/shop/.fabdeploy").split() if n.startswith("push-")
    ]
    # ...and when the host already runs it ("unchanged": the node never opens it), issue 13 §2.17.
    r = fleet.fab("deploy.hotfix", "--hosts=web1", "--push", env={"TMPDIR": str(tmpdir)})
    assert "unchanged" in r.stdout
    assert not [
        n for n in fleet.ssh("web1", "ls -a /srv/shop/.fabdeploy").split() if n.startswith("push-")
    ]


def test_unknown_host_lists_known_ones(fleet: Fleet) -> None:
    r = fleet.fab("deploy.hotfix", "--hosts=web9", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "unknown host web9" in r.stderr and "web1, web2, web3" in r.stderr


def test_dry_run_changes_nothing(fleet: Fleet) -> None:
    fleet.commit("not yet")
    before = {h: fleet.current(h) for h in HOSTS}
    r = fleet.fab("deploy.hotfix", "--dry-run")
    assert "dry run" in r.stdout and "web1" in r.stdout
    assert {h: fleet.current(h) for h in HOSTS} == before


def test_failing_before_hook_keeps_current(fleet: Fleet) -> None:
    cfg = fleet.variant("badhook", hooks={"before_swap": ["echo migrating the db; exit 3"]})
    before = fleet.current("web1")
    r = fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg, check=False)
    assert r.returncode != 0
    assert "migrating the db" in r.stdout + r.stderr and "exit" in (r.stdout + r.stderr).lower()
    assert fleet.current("web1") == before
    assert fleet.version("web1") == fleet.revision("web1")


def test_hook_output_streams_to_the_terminal_prefixed_by_the_host(fleet: Fleet) -> None:
    """Each line a hook prints on a host shows here as `web1 | …`, whole lines only (two
    hosts at once), for hotfix and rollback; the results table stays; no output, no lines."""
    cfg = fleet.variant(
        "talkinghooks",
        hooks={
            "before_swap": ["echo migrating 1 of 2; echo migrating 2 of 2 >&2"],
            "after_swap": ["true"],  # prints nothing: shows nothing
            "after_restart": ["echo warmed up"],
        },
    )
    fleet.commit("hooks that talk")
    r = fleet.fab("deploy.hotfix", "--hosts=web1,web2", config=cfg)
    lines = r.stdout.splitlines()
    for h in ("web1", "web2"):
        want = [f"{h} | migrating 1 of 2", f"{h} | migrating 2 of 2", f"{h} | warmed up"]
        assert [ln for ln in lines if ln.startswith(f"{h} | ")] == want, r.stdout
    assert not any(ln.startswith("web3 |") for ln in lines)
    title = next(i for i, ln in enumerate(lines) if ln.startswith("hotfix "))
    assert (
        max(i for i, ln in enumerate(lines) if re.match(r"web\d \| ", ln)) < title
    )  # then the table
    assert "2 ok, 0 failed" in r.stdout
    r = fleet.fab("deploy.rollback", "--hosts=web1", config=cfg)
    assert [ln for ln in r.stdout.splitlines() if re.match(r"web\d \| ", ln)] == [
        "web1 | warmed up"
    ]
    r = fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg)  # back on HEAD
    quiet = fleet.fab("deploy.hotfix", "--hosts=web3")  # no hooks here: no host lines at all
    assert not re.search(r"^web\d \| ", quiet.stdout, re.M), quiet.stdout


def test_failing_health_check_puts_previous_release_back(fleet: Fleet) -> None:
    app = (fleet.sb.app_repo / "app.py").read_text()
    bad = fleet.commit("break /health", {"app.py": app.replace('"/health"', '"/healthz-moved"')})
    cfg = fleet.variant("quickhealth", health={"timeout": 3})
    before = fleet.current("web1")
    r = fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg, check=False)
    assert r.returncode != 0 and "health check failed" in r.stdout
    assert fleet.current("web1") == before and fleet.revision("web1") != bad
    assert "rolled back to release" in fleet.ssh("web1", "tail -1 /srv/shop/revisions.log")
    assert wait_for(lambda: fleet.version("web1"), what="app back on web1") == fleet.revision(
        "web1"
    )
    # Undo the breakage for the following tests.
    (fleet.sb.app_repo / "app.py").write_text(app)
    fleet.commit("fix /health", {"app.py": app})


def test_host_down_is_reported_others_succeed(fleet: Fleet) -> None:
    hold = sandbox.host_dir(fleet.sb.dir, "web3") / "hold"
    hold.touch()
    fleet.ssh("web3", "systemctl reboot", check=False)
    wait_for(lambda: fleet.is_down("web3"), what="web3 to go down")
    try:
        new = fleet.git("rev-parse", "HEAD")
        r = fleet.fab("deploy.hotfix", check=False)
        assert r.returncode != 0
        assert fleet.revision("web1") == new and fleet.revision("web2") == new
        assert "web3" in r.stdout and "FAILED" in r.stdout and "cannot connect" in r.stdout
        assert "2 ok, 1 failed" in r.stdout
        assert fleet.pointer()["commit"] != new  # a partial fleet does not publish
    finally:
        hold.unlink()
    wait_for(lambda: fleet._try_boot_id("web3"), timeout=60, what="web3 back")


def test_rollback_after_two_hotfixes_returns_fleet_and_survives_reboot(fleet: Fleet) -> None:
    a = fleet.commit("release A")
    fleet.fab("deploy.hotfix")
    b = fleet.commit("release B")
    fleet.fab("deploy.hotfix")
    assert all(fleet.revision(h) == b for h in HOSTS) and fleet.pointer()["commit"] == b
    fleet.fab("deploy.rollback")
    for h in HOSTS:
        assert fleet.revision(h) == a and fleet.version(h) == a
        assert "rolled back to release" in fleet.ssh(h, "tail -1 /srv/shop/revisions.log")
    assert fleet.pointer()["commit"] == a
    fleet.reboot("web1")
    assert fleet.revision("web1") == a


def test_strict_host_keys_refuse_unknown_key(fleet: Fleet) -> None:
    kh = Path(fleet.sb.known_hosts)
    partial = kh.with_name("known_hosts.partial")
    partial.write_text(
        "".join(line for line in kh.read_text().splitlines(True) if not line.startswith("web2"))
    )
    cfg = fleet.variant("strict", ssh={"known_hosts": partial.name})
    r = fleet.fab("deploy.status", "--hosts=web2", config=cfg, check=False)
    assert r.returncode != 0
    assert "host key of web2" in r.stdout and "not in" in r.stdout


def test_changed_host_key_is_refused(fleet: Fleet) -> None:
    cfg = fleet.variant(
        "forged",
        ssh={"known_hosts": fleet.forged_known_hosts("web2", "web1", "known_hosts.forged")},
    )
    r = fleet.fab("deploy.status", "--hosts=web2", config=cfg, check=False)
    assert r.returncode != 0 and "CHANGED" in r.stdout


def test_rollback_without_previous_release_changes_nothing(fleet: Fleet) -> None:
    cfg = fleet.variant("norelease", deploy_to="/srv/empty")
    fleet.fab("deploy.setup", "--hosts=web1", config=cfg)
    r = fleet.fab("deploy.rollback", "--hosts=web1", config=cfg, check=False)
    assert r.returncode != 0 and "no previous release" in r.stdout
    assert fleet.ssh("web1", "test -e /srv/empty/current && echo yes || echo no").strip() == "no"
