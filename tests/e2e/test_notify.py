"""What follows a deploy, on a sandbox fleet with real fab: local hooks (before_bundle,
after_deploy, after_failure) on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet

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
