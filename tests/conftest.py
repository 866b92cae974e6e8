"""Shared fixtures: environment isolation, local S3, the sandbox fleet, and CLI helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fabfile import sandbox as sandbox_mod

REPO_ROOT = Path(__file__).resolve().parent.parent
FAB = Path(sys.executable).parent / "fab"


@pytest.fixture(autouse=True)
def _isolated_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Keep tests away from the user's ~/.ssh, ~/.aws and deploy config."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    for name in list(os.environ):
        if name.startswith("AWS_") or name in ("DEPLOY_CONFIG", "SSH_AUTH_SOCK"):
            monkeypatch.delenv(name)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server on a free port with the sandbox bucket created."""
    state = tmp_path_factory.mktemp("s3")
    endpoint = sandbox_mod.start_s3(state, 0)
    try:
        yield S3Server(endpoint=endpoint, bucket=sandbox_mod.BUCKET)
    finally:
        sandbox_mod.down(state)


@pytest.fixture
def moto_store(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A Store of app "shop" on the moto server, under a prefix of its own (tests share it)."""
    import uuid

    from fabdeploy.adapters.store import Store
    from fabdeploy.basics.config import S3Config

    for k, v in sandbox_mod.AWS_ENV.items():
        monkeypatch.setenv(k, v)
    s3 = S3Config(s3_server.bucket, f"t-{uuid.uuid4().hex[:10]}", "us-east-1", s3_server.endpoint)
    return Store(s3, "shop", config_path=Path("/x/deploy.yml"))


def _sandbox_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "sandbox needs root (namespaces, mounts)"
    if not os.access("/usr/sbin/sshd", os.X_OK):
        return "/usr/sbin/sshd not installed (apt-get install openssh-server)"
    if shutil.which("unshare") is None:
        return "unshare not found (util-linux)"
    return None


@pytest.fixture(scope="session")
def needs_sandbox() -> None:
    """Skip unless this machine can run sandbox hosts."""
    reason = _sandbox_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def sandbox(
    needs_sandbox: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[sandbox_mod.Sandbox]:
    """Three-host sandbox fleet (web1..web3 on 127.0.20.K) with local S3, for e2e tests."""
    state = tmp_path_factory.mktemp("sandbox")
    sb = sandbox_mod.up(state, hosts=3, subnet="127.0.20", s3_port=0, reboot_delay=0.5)
    try:
        yield sb
    finally:
        sandbox_mod.down(state)


FabRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def fab(request: pytest.FixtureRequest) -> FabRunner:
    """Run the real `fab` CLI from the repo root; DEPLOY_CONFIG defaults to the sandbox's."""

    def run(
        *args: str,
        config: Path | str | None = None,
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        if config is None:
            # Only now: tests that pass their own config must not force the fleet up.
            config = request.getfixturevalue("sandbox").deploy_yml
        full_env = {
            **os.environ,
            **sandbox_mod.AWS_ENV,
            "DEPLOY_CONFIG": str(config),
            **(env or {}),
        }
        cmd = [str(FAB), *args]
        try:
            proc = subprocess.run(
                cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"{' '.join(cmd)} timed out after {timeout}s\n--- stdout\n{e.stdout}\n--- stderr\n{e.stderr}"
            )
        if check and proc.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    return run


SshRunner = Callable[..., str]


@pytest.fixture
def ssh_run(sandbox: sandbox_mod.Sandbox) -> SshRunner:
    """Run a command on a sandbox host with the real OpenSSH client; returns stdout."""

    def run(host: str, cmd: str, check: bool = True, timeout: float = 30) -> str:
        proc = subprocess.run(
            ["ssh", "-F", str(sandbox.ssh_config), host, cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"ssh {host} {cmd!r} exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    return run
