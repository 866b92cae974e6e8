"""fabdeploy used the way an app team uses it: pip-installed into the app's own venv, with a
two-line fabfile in the app repo beside the team's own tasks, run from a subfolder, no
fabric.yaml and no DEPLOY_CONFIG. This is the README's "Use it in your app" section.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fleet_helpers import REPO, Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

# The README's fabfile, verbatim, plus one task of the team's own.
FABFILE = """\
from fabdeploy import deploy
from invoke import Collection, task


@task
def hello(c):
    print("the app's own task")


ns = Collection(deploy, hello)
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("apprepo"), subnet="127.0.35", hosts=2)
    yield f
    sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with fabdeploy installed from a wheel built from this checkout."""
    root = tmp_path_factory.mktemp("venv")
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("fabdeploy-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return venv


@pytest.fixture(scope="module")
def app(fleet: Fleet) -> Path:
    repo = fleet.sb.app_repo
    data = yaml.safe_load(fleet.sb.deploy_yml.read_text())
    data["repo"] = "."
    data["ssh"]["config"] = str(fleet.sb.ssh_config)
    data["ssh"]["known_hosts"] = str(fleet.sb.known_hosts)
    (repo / "deploy.yml").write_text(yaml.safe_dump(data))
    (repo / "deploy.yml").chmod(0o644)
    (repo / "fabfile.py").write_text(FABFILE)
    (repo / "lib").mkdir(exist_ok=True)
    (repo / "lib" / "keep").write_text("")
    fleet.git("add", "deploy.yml", "fabfile.py", "lib/keep")
    fleet.git("commit", "-q", "-m", "fabdeploy in the app repo")
    return repo


def fab(fleet: Fleet, venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in fleet.env().items() if k != "DEPLOY_CONFIG"}
    env["PATH"] = f"{venv / 'bin'}:{os.environ['PATH']}"
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(venv / "bin" / "fab"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_the_library_is_not_this_repo(venv: Path) -> None:
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import fabdeploy; print(fabdeploy.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert r.returncode == 0 and str(venv) in r.stdout, r.stdout + r.stderr
    # The sandbox (moto-dependent dev tooling) is not part of what an app installs.
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import moto"], capture_output=True, text=True
    )
    assert r.returncode != 0


def test_tasks_sit_beside_the_apps_own(fleet: Fleet, venv: Path, app: Path) -> None:
    r = fab(fleet, venv, app / "lib", "--list")
    assert r.returncode == 0, r.stderr
    assert "deploy.hotfix" in r.stdout and "deploy.roll" in r.stdout and "hello" in r.stdout
    assert "sandbox" not in r.stdout


def test_deploy_from_a_subfolder_of_the_app_repo(fleet: Fleet, venv: Path, app: Path) -> None:
    commit = fleet.git("rev-parse", "HEAD")
    r = fab(fleet, venv, app / "lib", "deploy.setup")
    assert r.returncode == 0, r.stdout + r.stderr
    r = fab(fleet, venv, app / "lib", "-H", "web2", "deploy.hotfix")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 ok, 0 failed" in r.stdout and "web1" not in r.stdout  # one run, over web2 only
    assert fleet.revision("web2") == commit
    assert fleet.ssh("web1", "test -e /srv/shop/current && echo yes || echo no").strip() == "no"
    r = fab(fleet, venv, app, "hello")
    assert r.returncode == 0 and "the app's own task" in r.stdout
