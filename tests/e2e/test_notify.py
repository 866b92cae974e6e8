"""What follows a deploy, on a sandbox fleet with real fab: local hooks (before_bundle,
after_deploy, after_failure) on this machine, and webhook notifications to a local HTTP
receiver started by the test."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet
from webhook_receiver import Receiver

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("notify"), subnet="127.0.47", hosts=2)
    yield f
    sandbox.down(f.sb.dir)


def read_env(p: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in p.read_text().splitlines() if "=" in line)


def test_before_bundle_checks_the_clean_export_and_a_failure_stops_the_bundle(
    fleet: Fleet, tmp_path: Path
) -> None:
    (fleet.sb.app_repo / "uncommitted.txt").write_text("never ships\n")
    seen = tmp_path / "seen"
    ok = fleet.variant(
        "checked", hooks={"before_bundle": [f"test ! -e uncommitted.txt && ls > {seen}"]}
    )
    commit = fleet.commit("checked by before_bundle")
    fleet.fab("deploy.bundle", config=ok)
    assert "app.py" in seen.read_text().split()  # it ran in the export of the commit
    bad = fleet.variant(
        "badcheck",
        hooks={"before_bundle": ["echo checking assets; echo 'app.css is missing'; exit 3"]},
        build={"commands": ["true"]},  # a new bundle id: something to build
    )
    r = fleet.fab("deploy.bundle", config=bad, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert err[0].startswith("error: before_bundle hook `echo checking assets;")
    assert "failed with exit code 3" in err[0] and "nothing was built or uploaded" in err[0]
    assert err[1:] == ["  | checking assets", "  | app.css is missing"]
    assert "before_bundle | app.css is missing" in r.stdout  # streamed as it ran
    (fleet.sb.app_repo / "uncommitted.txt").unlink()
    assert fleet.pointer() is None or fleet.pointer()["commit"] != commit


def test_after_deploy_and_after_failure_get_the_run_and_never_change_the_exit_code(
    fleet: Fleet, tmp_path: Path
) -> None:
    env_ok, env_bad = tmp_path / "ok.env", tmp_path / "bad.env"
    hooks = {
        "after_deploy": [f"env > {env_ok}", "echo tagging failed; exit 7"],
        "after_failure": [f"env > {env_bad}", "exit 5"],
    }
    cfg = fleet.variant("afterhooks", hooks=hooks)
    first = fleet.commit("a first release")
    fleet.fab("deploy.hotfix")  # no hooks: nothing runs after it
    assert not env_ok.exists() and not env_bad.exists()
    commit = fleet.commit("after hooks")
    r = fleet.fab("deploy.hotfix", config=cfg)  # exit 0 although after_deploy's 2nd command fails
    env = read_env(env_ok)
    assert env["DEPLOY_TASK"] == "hotfix" and env["DEPLOY_OUTCOME"] == "success"
    assert env["REVISION"] == commit and env["BUNDLE_ID"] == commit and env["REF"] == "main"
    assert (env["HOSTS_OK"], env["HOSTS_FAILED"], env["HOSTS_NOT_TOUCHED"]) == ("2", "0", "0")
    assert env["DEPLOY_HOSTS"] == "web1,web2" and env["DEPLOY_USER"]
    assert "after_deploy | tagging failed" in r.stdout
    assert "warning: after_deploy hook `echo tagging failed; exit 7` failed" in r.stderr
    assert not env_bad.exists()

    broken = fleet.variant("afterhooks-broken", hooks={**hooks, "before_swap": ["exit 4"]})
    fleet.commit("a release whose before_swap fails")
    r = fleet.fab("deploy.hotfix", "--hosts=web2", config=broken, check=False)
    assert r.returncode == 1  # the hotfix's own verdict, not after_failure's exit 5
    env = read_env(env_bad)
    assert env["DEPLOY_OUTCOME"] == "failure" and env["HOSTS_FAILED"] == "1"
    assert env["DEPLOY_HOSTS"] == "web2"
    assert "warning: after_failure hook `exit 5` failed" in r.stderr

    env_ok.unlink()
    fleet.fab("deploy.rollback", "--hosts=web1", config=cfg)
    env = read_env(env_ok)
    assert env["DEPLOY_TASK"] == "rollback" and env["HOSTS_OK"] == "1"
    assert env["REVISION"] == first  # where web1 went back to


@pytest.fixture
def receiver() -> Receiver:
    r = Receiver()
    yield r
    r.close()


def test_webhooks_hear_the_start_and_outcome_of_hotfix_roll_and_rollback(
    fleet: Fleet, receiver: Receiver
) -> None:
    failures = receiver.url.replace("/SECRET", "/FAILURES")
    notify = {"webhooks": [receiver.url, {"url": failures, "events": ["failure"]}], "timeout": 5}
    cfg = fleet.variant("notify", notify=notify)
    commit = fleet.commit("notified")

    def posts(path: str = "/SECRET") -> list[dict]:
        return [
            p["fabdeploy"] | {"text": p["text"]} for p in receiver.posts if p["path"].endswith(path)
        ]

    fleet.fab("deploy.hotfix", config=cfg)
    start, done = posts()
    assert start["event"] == "start" and done["event"] == "success"
    for p in (start, done):
        assert (p["app"], p["task"], p["commit"], p["bundle_id"], p["ref"]) == (
            "shop",
            "hotfix",
            commit,
            commit,
            "main",
        )
        assert p["hosts"] == ["web1", "web2"] and p["user"]
    assert (
        start["text"] == f"shop: {start['user']} started a hotfix of {commit[:8]} (main) on 2 hosts"
    )
    assert done["counts"] == {"ok": 2, "unchanged": 0, "failed": 0, "not_touched": 0}
    assert done["seconds"] > 0 and done["text"].endswith(
        "succeeded in " + f"{done['seconds']:.1f}s: 2 ok, 0 failed"
    )
    assert posts("/FAILURES") == []  # that one asked for failures only

    receiver.posts.clear()
    broken = fleet.variant("notify-broken", notify=notify, hooks={"before_swap": ["exit 4"]})
    fleet.commit("a release whose before_swap fails")
    r = fleet.fab("deploy.hotfix", config=broken, check=False)
    assert r.returncode == 1
    (failed,) = posts("/FAILURES")
    assert failed["event"] == "failure" and failed["counts"]["failed"] == 2
    assert " FAILED after " in failed["text"] and failed["text"].endswith("0 ok, 2 failed")
    assert [p["event"] for p in posts()] == ["start", "failure"]

    receiver.posts.clear()
    fleet.fab("deploy.rollback", "--hosts=web1", config=cfg)
    start, done = posts()
    back = fleet.revision("web1")  # its previous release
    assert back != commit
    assert (start["task"], start["commit"], done["event"], done["commit"]) == (
        "rollback",
        None,
        "success",
        back,
    )
    assert done["text"].startswith(f"shop: rollback to {back[:8]} by ")

    receiver.posts.clear()
    fleet.git("reset", "-q", "--hard", commit)  # drop the broken commit
    fleet.fab("deploy.roll", "--hosts=web1", config=cfg)
    start, done = posts()
    assert (start["task"], done["event"], done["commit"]) == ("roll", "success", commit)
    assert done["counts"]["ok"] == 1 and done["hosts"] == ["web1"]
    assert fleet.revision("web1") == commit


def test_a_hung_or_failing_webhook_changes_neither_the_time_nor_the_exit_code(
    fleet: Fleet, receiver: Receiver
) -> None:
    fleet.fab("deploy.hotfix", "--hosts=web1")  # web1 on HEAD: the timed runs have nothing to do

    def timed(config: Path | None = None, *args: str) -> tuple[float, object]:
        t0 = time.monotonic()
        r = fleet.fab("deploy.hotfix", "--hosts=web1", *args, config=config, check=False)
        return time.monotonic() - t0, r

    base, r = timed()
    assert r.returncode == 0
    receiver.mode = "hang"  # accepts, reads the post, never answers
    bound = 3.0
    hung, r = timed(
        fleet.variant("notify-hung", notify={"webhooks": [receiver.url], "timeout": bound})
    )
    assert r.returncode == 0 and "unchanged" in r.stdout
    # Waiting for the posts in line would cost 4 timeouts (start and success, one retry each);
    # the run waits at most one bound for them at its end (plus noise on a busy machine).
    assert hung - base < bound + 4.0, (base, hung)
    # Start's two attempts may time out within the run (one line), and what is left in flight
    # at the end is one line too.
    said = [ln for ln in r.stderr.splitlines() if "notification" in ln]
    assert said and all(
        re.fullmatch(r"warning: \d notifications? still in flight after 3s; .*", ln)
        or re.fullmatch(r"warning: notification \(start\) to .* failed twice: TimeoutError.*", ln)
        for ln in said
    ), said
    assert "still in flight after 3s" in said[-1]
    assert receiver.requests >= 1 and "SECRET" not in r.stderr

    receiver.release.set()
    receiver.mode, receiver.requests = "fail", 0
    failing = fleet.variant("notify-500", notify={"webhooks": [receiver.url], "timeout": bound})
    took, r = timed(failing)
    assert r.returncode == 0 and took - base < bound + 4.0
    assert receiver.requests == 4  # start and success, each posted twice (one retry)
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: notification")]
    assert warned == [
        f"warning: notification ({e}) to http://127.0.0.1:{receiver.server.server_port}/… failed twice: HTTP 500"
        for e in ("start", "success")
    ]
    r = fleet.fab("deploy.hotfix", "--hosts=web9", config=failing, check=False)
    assert r.returncode == 1 and "unknown host web9" in r.stderr  # its own error, as before
