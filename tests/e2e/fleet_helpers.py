"""A sandbox fleet driven the way an operator drives it: the real `fab` CLI, real ssh.

Each e2e module brings up its own fleet (own subnet, own S3) so modules cannot
leak state into each other; the helpers below only observe hosts from outside
(OpenSSH client, HTTP, the sandbox's boot records).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fabfile import sandbox

REPO = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).parent / "fab")


def can_run_sandbox() -> str | None:
    if os.geteuid() != 0:
        return "e2e tests need root (namespaces, mounts)"
    for tool in ("/usr/sbin/sshd", "/usr/bin/unshare", "/usr/bin/ssh"):
        if not Path(tool).exists():
            return f"{tool} is missing (run scripts/bootstrap)"
    return None


def wait_for(
    predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Fleet:
    sb: sandbox.Sandbox
    home: Path

    # --- driving ----------------------------------------------------------------
    def env(
        self, config: Path | None = None, extra: dict[str, str] | None = None
    ) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "SSH_", "DEPLOY_")) and k not in ("HOME",)
        }
        env.update(self.sb.env)
        env["HOME"] = str(self.home)
        env["DEPLOY_CONFIG"] = str(config or self.sb.deploy_yml)
        env["COLUMNS"] = "200"
        env.update(extra or {})
        return env

    def fab(
        self,
        *args: str,
        config: Path | None = None,
        check: bool = True,
        timeout: float = 300,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [FAB, *args],
            cwd=REPO,
            env=self.env(config, env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"fab {' '.join(args)} exited {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
            )
        return r

    def fab_bg(self, *args: str, config: Path | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [FAB, *args],
            cwd=REPO,
            env=self.env(config),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def ssh(self, host: str, cmd: str, check: bool = True) -> str:
        r = subprocess.run(
            ["ssh", "-F", str(self.sb.ssh_config), "-o", "BatchMode=yes", host, cmd],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"ssh {host} {cmd!r} exited {r.returncode}: {r.stderr}")
        return r.stdout

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.sb.app_repo), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    def commit(self, message: str, files: dict[str, str] | None = None) -> str:
        for name, text in (files or {}).items():
            p = self.sb.app_repo / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
            self.git("add", name)
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")

    def variant(self, name: str, **overrides: Any) -> Path:
        """A copy of the fleet's deploy.yml with some keys changed (nested dicts merge)."""
        data = yaml.safe_load(self.sb.deploy_yml.read_text())

        def merge(a: dict, b: dict) -> None:
            for k, v in b.items():
                if isinstance(v, dict) and isinstance(a.get(k), dict):
                    merge(a[k], v)
                else:
                    a[k] = v

        merge(data, overrides)
        p = self.sb.deploy_yml.with_name(f"deploy-{name}.yml")
        p.write_text(yaml.safe_dump(data))
        return p

    def forged_known_hosts(self, victim: str, donor: str, name: str) -> str:
        """A known_hosts where `victim`'s recorded key is `donor`'s: as if the victim's key changed."""
        kh = Path(self.sb.known_hosts)
        lines = kh.read_text().splitlines(True)
        key = next(line for line in lines if line.startswith(donor + ",")).split()[2]
        forged = kh.with_name(name)
        forged.write_text(
            "".join(
                line.replace(line.split()[2], key) if line.startswith(victim + ",") else line
                for line in lines
            )
        )
        return forged.name

    # --- observing --------------------------------------------------------------
    def revision(self, host: str) -> str:
        return self.ssh(host, "cat /srv/shop/current/REVISION").strip()

    def current(self, host: str) -> str:
        return self.ssh(host, "readlink /srv/shop/current").strip()

    def releases(self, host: str) -> list[str]:
        return self.ssh(host, "ls -x /srv/shop/releases").split()

    def version(self, host: str) -> str | None:
        try:
            with urllib.request.urlopen(
                f"http://{self.sb.hosts[host]}:8080/version", timeout=5
            ) as r:
                return r.read().decode().strip()
        except OSError:
            return None

    def node_status(self, host: str) -> dict[str, Any]:
        out = self.ssh(host, "/usr/bin/python3 /usr/local/lib/fabdeploy/shop/node.py status")
        return json.loads(out.strip().splitlines()[-1])

    def boots(self, host: str) -> list[dict[str, Any]]:
        path = sandbox.host_dir(self.sb.dir, host) / "boots.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def boot_id(self, host: str) -> str:
        return self.ssh(host, "cat /proc/sys/kernel/random/boot_id").strip()

    def reboot(self, host: str) -> str:
        """Reboot a host and wait until sshd is back with a new boot id; returns it."""
        before = self.boot_id(host)
        n = len(self.boots(host))
        self.ssh(host, "systemctl reboot", check=False)
        wait_for(
            lambda: len(self.boots(host)) > n and self.boots(host)[-1].get("sshd_ready"),
            timeout=60,
            what=f"{host} to boot",
        )
        after = wait_for(lambda: self._try_boot_id(host), timeout=30, what=f"{host} sshd")
        assert after != before
        return after

    def is_down(self, host: str) -> bool:
        import socket

        try:
            socket.create_connection((self.sb.hosts[host], 22), timeout=1).close()
            return False
        except OSError:
            return True

    def _try_boot_id(self, host: str) -> str | None:
        try:
            return self.boot_id(host)
        except AssertionError:
            return None

    def pointer(self) -> dict[str, Any] | None:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.sb.s3_direct,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        try:
            body = s3.get_object(Bucket=self.sb.bucket, Key="shop/published.json")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
        return json.loads(body)


def isolated(subnet: str) -> str:
    """127.0.Y, or 127.N.Y with FABDEPLOY_E2E_NET=N: two test runs on one machine (two checkouts,
    two developers) then use different addresses and don't clash (1 <= N <= 127)."""
    net = os.environ.get("FABDEPLOY_E2E_NET")
    if not net:
        return subnet
    a, _, c = subnet.split(".")
    return f"{a}.{int(net)}.{c}"


def start_fleet(
    tmp_root: Path,
    subnet: str,
    hosts: int = 3,
    reboot_delay: float = 0.3,
    rtt: float = 0.0,
    private_port: int | None = None,
    private_net: bool = False,
) -> Fleet:
    subnet = isolated(subnet)
    sb = sandbox.up(
        tmp_root / "sb",
        hosts=hosts,
        subnet=subnet,
        s3_port=0,
        reboot_delay=reboot_delay,
        rtt=rtt,
        private_port=private_port,
        private_net=private_net,
    )
    home = tmp_root / "home"
    home.mkdir(exist_ok=True)
    return Fleet(sb, home)
