"""deploy.roll on a sandbox fleet with real reboots: order, health gate, stops, the lock."""

from __future__ import annotations

import signal

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabdeploy.adapters.store import Store
from fabdeploy.basics import config
from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

HOSTS = ("web1", "web2", "web3")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("roll"), subnet="127.0.33", hosts=3, reboot_delay=0.3)
    f.fab("deploy.setup")
    yield f
    sandbox.down(f.sb.dir)


def store_of(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Store:
    for k, v in fleet.sb.env.items():
        monkeypatch.setenv(k, v)
    cfg = config.load(fleet.sb.deploy_yml)
    return Store(cfg.s3, cfg.app)


def test_roll_reboots_each_host_once_in_order(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = fleet.git("rev-parse", "HEAD")
    boots_before = {h: len(fleet.boots(h)) for h in HOSTS}
    r = fleet.fab("deploy.roll")
    assert fleet.pointer()["commit"] == commit
    new_boots = {h: fleet.boots(h)[boots_before[h] :] for h in HOSTS}
    assert all(len(b) == 1 for b in new_boots.values()), new_boots  # each rebooted exactly once
    for h in HOSTS:
        assert fleet.revision(h) == commit and fleet.version(h) == commit
    # In order, and each host was back (sshd up after its boot) before the next went down.
    for a, b in zip(HOSTS, HOSTS[1:], strict=False):
        assert new_boots[a][0]["sshd_ready"] < new_boots[b][0]["down_at"], (a, b, new_boots)
    assert "ok" in r.stdout and "not touched" not in r.stdout
    store = store_of(fleet, monkeypatch)
    assert store.read_lock() is None  # released after success
    # Each node reported its new boot (outcome, health) to S3, where the roll looks for it
    # beside its SSH status call (which of the two comes first depends on the latency).
    assert r.stdout.count("from its S3 report") + r.stdout.count("over SSH") == len(HOSTS)
    for h in HOSTS:
        got = store.read_report(f"{store.prefix}/nodes/{h}.json")
        assert got is not None and got[0]["boot_id"] == new_boots[h][0]["boot_id"]
        assert got[0]["current"]["commit"] == commit and got[0]["health"]["ok"] is True


def test_resume_skips_hosts_already_on_the_commit(fleet: Fleet) -> None:
    boots_before = {h: len(fleet.boots(h)) for h in HOSTS}
    r = fleet.fab("deploy.roll", "--resume")
    assert r.stdout.count("skipped") >= 3
    assert {h: len(fleet.boots(h)) for h in HOSTS} == boots_before


def test_dry_run_prints_plan_and_changes_nothing(fleet: Fleet) -> None:
    boots_before = {h: len(fleet.boots(h)) for h in HOSTS}
    r = fleet.fab("deploy.roll", "--dry-run", "--batch=2")
    assert "batch 1: web1, web2" in r.stdout and "batch 2: web3" in r.stdout
    assert {h: len(fleet.boots(h)) for h in HOSTS} == boots_before


def test_failed_health_check_stops_the_roll(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    old = fleet.revision("web1")
    app = (fleet.sb.app_repo / "app.py").read_text()
    fleet.commit("break /health", {"app.py": app.replace('"/health"', '"/healthz-moved"')})
    cfg = fleet.variant("quickhealth", health={"timeout": 3})
    boots_before = {h: len(fleet.boots(h)) for h in HOSTS}
    r = fleet.fab("deploy.roll", config=cfg, check=False)
    assert r.returncode != 0
    assert "web1" in r.stdout and "health check failed" in r.stdout
    assert r.stdout.count("not touched") == 2
    assert len(fleet.boots("web1")) == boots_before["web1"] + 1
    for h in ("web2", "web3"):
        assert len(fleet.boots(h)) == boots_before[h]  # never rebooted
        assert fleet.revision(h) == old
    assert store_of(fleet, monkeypatch).read_lock() is None  # released after failure
    # Put things right: publish the fixed app and roll web1 back onto it.
    fleet.commit("fix /health", {"app.py": app})
    fleet.fab("deploy.roll", "--hosts=web1")


def test_rollback_on_failure_moves_pointer_back_and_reboots_failed_host(fleet: Fleet) -> None:
    good = fleet.revision("web1")
    assert fleet.pointer()["commit"] == good
    app = (fleet.sb.app_repo / "app.py").read_text()
    fleet.commit("break /health again", {"app.py": app.replace('"/health"', '"/healthz-moved"')})
    cfg = fleet.variant("quickhealth", health={"timeout": 3})
    boots_before = {h: len(fleet.boots(h)) for h in HOSTS}
    r = fleet.fab("deploy.roll", "--rollback-on-failure", config=cfg, check=False)
    assert r.returncode != 0 and "rolled back to" in r.stdout
    assert fleet.pointer()["commit"] == good
    assert (
        len(fleet.boots("web1")) == boots_before["web1"] + 2
    )  # the failed boot, then the way back
    assert fleet.revision("web1") == good and fleet.version("web1") == good
    assert all(len(fleet.boots(h)) == boots_before[h] for h in ("web2", "web3"))
    fleet.commit("fix /health", {"app.py": app})


def test_host_not_back_in_time_stops_the_roll(fleet: Fleet) -> None:
    hold = sandbox.host_dir(fleet.sb.dir, "web1") / "hold"
    hold.touch()
    cfg = fleet.variant("shorttimeout", roll={"reboot_timeout": 3})
    fleet.commit("one more")
    try:
        boots_before = {h: len(fleet.boots(h)) for h in ("web2", "web3")}
        r = fleet.fab("deploy.roll", config=cfg, check=False)
        assert r.returncode != 0
        assert "did not come back within 3s" in r.stdout
        assert {h: len(fleet.boots(h)) for h in ("web2", "web3")} == boots_before
    finally:
        hold.unlink()
    wait_for(lambda: fleet._try_boot_id("web1"), timeout=60, what="web1 back")


def test_second_roll_is_refused_while_lock_held(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(fleet, monkeypatch)
    lock = store.acquire_lock("alice@laptop", "roll abc123", 3600)
    try:
        r = fleet.fab("deploy.roll", check=False)
        assert r.returncode != 0 and "alice@laptop" in r.stderr and "Traceback" not in r.stderr
        r2 = fleet.fab("deploy.unlock", check=False)
        assert r2.returncode != 0 or "not" in (r2.stdout + r2.stderr)  # not expired: refused
        assert store.read_lock() is not None
    finally:
        store.release_lock(lock)


def test_ctrl_c_finishes_host_in_flight_and_releases_lock(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.commit("interrupted roll")
    boots_before = {h: len(fleet.boots(h)) for h in HOSTS}
    p = fleet.fab_bg("deploy.roll")
    seen = []
    for line in p.stdout:  # interrupt as soon as web1 is being rebooted
        seen.append(line)
        if "web1: rebooting" in line:
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    out = "".join(seen) + out
    assert p.returncode != 0, out + err
    assert "stopping after the hosts in flight" in err
    assert len(fleet.boots("web1")) == boots_before["web1"] + 1  # web1 finished its reboot
    assert fleet.revision("web1") == fleet.git("rev-parse", "HEAD")
    for h in ("web2", "web3"):
        assert len(fleet.boots(h)) == boots_before[h]
    assert out.count("not touched") == 2
    assert store_of(fleet, monkeypatch).read_lock() is None


def test_boot_hook_output_is_shown_prefixed_by_the_host(fleet: Fleet) -> None:
    """Hooks run at boot on a roll: the roll shows their output once the host is back,
    `web2 | …`, one line per output line, and the table still comes at the end."""
    cfg = fleet.variant(
        "talkinghooks", hooks={"before_swap": ["echo checking assets; echo 2 files ok"]}
    )
    commit = fleet.commit("a roll with talking hooks")
    r = fleet.fab("deploy.roll", "--hosts=web2", config=cfg)
    lines = r.stdout.splitlines()
    assert fleet.revision("web2") == commit
    assert lines.count("web2 | checking assets") == 1, r.stdout
    assert lines.index("web2 | checking assets") + 1 == lines.index("web2 | 2 files ok")
    table_at = next(i for i, ln in enumerate(lines) if ln.startswith("roll "))
    assert lines.index("web2 | 2 files ok") < table_at  # before the results table, which stays
    assert not any(ln.startswith(("web1 |", "web3 |")) for ln in lines)
