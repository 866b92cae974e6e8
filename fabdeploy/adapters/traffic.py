"""Out of traffic and back around one host's swap + restart: deploy.yml's traffic.drain/restore,
and the `aws:` target groups / classic ELBs.

The commands run on the deploying machine (`run_on: local`) or on the host (`node`), with
{host} (the deploy.yml name) and {address} (what SSH connects to) shell-quoted in: HAProxy's
runtime API, nginx, Consul, ... A drain command returns once the host is drained;
`traffic.wait` adds a pause for balancers that cannot say. With `aws:` load balancers, the
host's instance is deregistered and drained too (roll's code, aws.Traffic, without standby),
and registered again and waited healthy on the way back. Whatever was drained is put
back: once healthy, when its change failed, and at the end of the run for the rest.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from fabric import Connection

from fabdeploy.adapters import aws
from fabdeploy.adapters.ssh import connect, run
from fabdeploy.basics.config import Config, Host
from fabdeploy.basics.errors import AWSError, DeployError, HostError
from fabdeploy.basics.output import say, warn


def balanced(cfg: Config) -> bool:
    """Load balancers to take hosts out of: traffic.drain/restore, or aws: target groups/classic ELBs."""
    return cfg.traffic.enabled or (
        cfg.aws is not None and bool(cfg.aws.target_groups or cfg.aws.classic_elbs)
    )


def command_for(template: str, host: Host, address: str) -> str:
    """The command with {host} and {address} filled in, shell-quoted."""
    return template.replace("{host}", shlex.quote(host.name)).replace(
        "{address}", shlex.quote(address)
    )


class DrainJournal(aws.Journal, Protocol):
    """Where the hosts drained by traffic.drain are recorded before the command runs, and
    cleared once traffic.restore worked (ops/undo.py keeps it in S3, beside aws.Traffic's)."""

    def save_drained(self, drained: dict[str, dict[str, Any]]) -> None: ...


class Drainer:
    def __init__(
        self,
        cfg: Config,
        log: Callable[[str], None] = say,
        lb: aws.Traffic | None = None,
        journal: DrainJournal | None = None,
    ) -> None:
        self.cfg = cfg
        self.t = cfg.traffic
        self.log = log
        self.journal = journal
        self._out: dict[str, Host] = {}
        self._saved: dict[str, dict[str, Any]] = {}  # what the journal holds: cleared on success
        self._lock = threading.Lock()
        if lb is None and cfg.aws is not None:
            lb = aws.Traffic(cfg, log=lambda h, m: self.log(f"{h.name}: {m}"), journal=journal)
        self.lb = lb if lb is not None and lb.balances else None

    def _save(self) -> None:
        if self.journal is not None:
            self.journal.save_drained(dict(self._saved))  # under self._lock: saves keep their order

    def keep(self, drained: dict[str, dict[str, Any]]) -> None:
        """Keep an earlier run's hosts recorded without putting them back (no traffic.restore)."""
        with self._lock:
            self._saved.update(drained)

    def adopt(self, drained: dict[str, dict[str, Any]]) -> list[Host]:
        """Take over what an earlier (killed) run drained, so restore_all() puts it back."""
        hosts = []
        with self._lock:
            for name, e in drained.items():
                host = Host(name=name, host=e["host"])
                self._out[name] = host
                self._saved[name] = dict(e)
                hosts.append(host)
        return hosts

    @property
    def enabled(self) -> bool:
        return self.t.enabled or self.lb is not None

    def _run(self, what: str, template: str, host: Host, conn: Connection) -> None:
        cmd = command_for(template, host, conn.host)
        limit = self.cfg.ssh.command_timeout
        if self.t.run_on == "node":
            r = run(self.cfg, host, conn, cmd, timeout=limit)
            code, out = r.exit_code, (r.stderr or r.stdout or "")
        else:
            try:
                p = subprocess.run(
                    ["/bin/sh", "-c", cmd], capture_output=True, text=True, timeout=limit
                )
            except subprocess.TimeoutExpired:
                raise HostError(
                    host.name,
                    f"{host.name}: traffic.{what} did not finish within {limit:g}s "
                    f"(ssh.command_timeout); check the command in {self.cfg.path}",
                    command=cmd,
                ) from None
            code, out = p.returncode, (p.stderr or p.stdout or "")
        if code != 0:
            last = (out.strip().splitlines() or ["no output"])[-1]
            raise HostError(
                host.name,
                f"{host.name}: traffic.{what} failed (exit {code}, {self.t.run_on}): {last}; "
                f"check traffic.{what} in {self.cfg.path}",
                command=cmd,
                exit_code=code,
                output=out,
            )

    def drain(self, host: Host, conn: Connection) -> None:
        with self._lock:
            self._out[host.name] = host  # recorded first: a drain cut short is still put back
            if self.t.restore:
                self._saved[host.name] = {"host": host.host, "address": conn.host}
                try:
                    self._save()  # in S3 before the command: a kill -9 leaves a record
                except DeployError as e:
                    self._out.pop(host.name, None)
                    self._saved.pop(host.name, None)
                    raise HostError(host.name, f"{host.name}: {e}") from None
        start = time.monotonic()
        if self.lb is not None:
            try:
                self.lb.before_restart(host)  # deregistered, drained (no standby for a restart)
            except AWSError as e:
                raise HostError(host.name, f"{host.name}: {e}") from None
        if self.t.drain:
            self._run("drain", self.t.drain, host, conn)
            if self.t.wait:
                time.sleep(self.t.wait)
        if self.t.drain or self.lb is not None:
            self.log(f"{host.name}: out of traffic ({time.monotonic() - start:.1f}s)")

    def restore(self, host: Host, conn: Connection) -> None:
        """Back in: the traffic.restore command, then the load balancers (waited healthy)."""
        with self._lock:
            if self._out.pop(host.name, None) is None:
                return
        try:
            if self.t.restore:
                self._run("restore", self.t.restore, host, conn)
            with self._lock:
                if self._saved.pop(host.name, None) is not None:
                    try:
                        self._save()
                    except DeployError as e:  # it is back; the record says otherwise: harmless
                        warn(f"{host.name}: {e}")
        finally:
            if self.lb is not None:
                try:
                    self.lb.after_healthy(host)
                except AWSError as e:
                    raise HostError(host.name, f"{host.name}: {e}") from None
        if self.t.restore or self.lb is not None:
            self.log(f"{host.name}: back in traffic")

    @contextmanager
    def around(self, host: Host, conn: Connection) -> Iterator[None]:
        """Drained for the body; put back after it, whether it worked or not."""
        try:
            self.drain(host, conn)
            yield
        except BaseException:
            try:
                self.restore(host, conn)
            except DeployError as e:
                warn(f"{host.name}: could not put it back in traffic: {e}")
            raise
        self.restore(host, conn)

    def restore_all(self) -> None:
        """Put back every host still drained (a Ctrl-C or a bug cut its change short)."""
        with self._lock:
            left = list(self._out.values())
        for host in left:
            conn = connect(self.cfg, host)
            try:
                self.restore(host, conn)
            except DeployError as e:
                warn(
                    f"{host.name}: could not put it back in traffic: {e}; run traffic.restore by hand"
                )
            finally:
                conn.close()
        if self.lb is not None:
            self.lb.restore_all()  # registers what a failed restore left out (warns, never raises)
