"""deploy.roll: publish, then reboot the fleet in turn, each batch health-gated.

A node that boots runs the boot unit, which activates the published bundle; the
roll only has to reboot, watch the boot id change, check that the node came back
on the published commit and is healthy, and stop at the first host that is not.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fabdeploy.adapters import aws, nodectl
from fabdeploy.adapters import bundle as bundles
from fabdeploy.adapters.health import wait_healthy
from fabdeploy.adapters.ssh import (
    SUDO_REFUSED,
    as_root,
    connect,
    open_spare_session,
    run,
    run_parallel,
    sudo_refusal,
    sudo_right_check,
)
from fabdeploy.adapters.store import store_for
from fabdeploy.basics.config import Config, Host, for_host
from fabdeploy.basics.errors import AWSError, HostError, StoreError
from fabdeploy.basics.output import say, short, table, warn
from fabdeploy.ops.batches import Plan
from fabdeploy.ops.batches import plan as batch_plan
from fabdeploy.ops.events import DeployRun
from fabdeploy.ops.lock import fleet_lock
from fabdeploy.ops.once import describe as describe_once
from fabdeploy.ops.once import plan as once_plan
from fabdeploy.ops.once import run_once_hooks
from fabdeploy.ops.targets import Targets, by_role_order, resolve_hosts
from fabdeploy.ops.undo import S3Journal, reconcile


@dataclass
class HostRoll:
    host: str
    ok: bool = False
    skipped: bool = False
    old: dict[str, Any] = field(default_factory=dict)
    new: dict[str, Any] = field(default_factory=dict)
    down_s: float | None = None
    healthy_s: float | None = None
    error: str | None = None


class _Interrupt:
    """First Ctrl-C: finish the batch in flight, then stop. Second: stop now."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        warn("Ctrl-C: stopping after the hosts in flight are back (Ctrl-C again to stop now)")

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _log(t0: float, host: str, msg: str) -> None:
    say(f"[{time.monotonic() - t0:6.1f}s] {host}: {msg}")


def _boot_id(
    cfg: Config, host: Host, old_boot: str | None = None
) -> tuple[str | None, dict[str, Any] | None]:
    """One fresh connection: (boot id, node status) or (None, None) while the host is down.

    Given the boot id from before the reboot, a node on a new boot answers once its boot unit
    has recorded the outcome, with its app's health checked there (health.on: node): the
    roll learns both in this one command instead of polling, then probing from here."""
    conn = connect(cfg, host)
    args, timeout = ["status"], 15.0
    if old_boot:
        args += ["--after-boot", old_boot, "--wait", f"{cfg.roll.boot_timeout:g}"]
        timeout += cfg.roll.boot_timeout + (cfg.health.timeout if cfg.health.on == "node" else 0)
    try:
        data = nodectl.call(cfg, host, conn, *args, timeout=timeout)
        return data.get("boot_id"), data
    except HostError:
        return None, None
    finally:
        _close(conn)


def _close(conn: Any) -> None:
    """Best effort: closing a session its host dropped (rebooting) must not raise. An SFTP
    client opened on it (a node program (re)installed on the way) sends a close that fails."""
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - EOFError, OSError, paramiko's SSHException: all mean "gone"
        pass


def _sshd_answers(address: str, port: int) -> bool:
    """A TCP probe for sshd's banner: far cheaper than an SSH login while a host boots."""
    try:
        with socket.create_connection((address, port), timeout=0.5) as s:
            s.settimeout(0.5)
            return s.recv(4) == b"SSH-"
    except OSError:
        return False


@dataclass
class Prepared:
    """A host's connection and status, fetched while the batch before it was rebooting."""

    conn: Any
    status: dict[str, Any] | None = None
    error: HostError | None = None
    # Where the node reports its boots in S3 (node.py report) and that object's ETag now.
    report: tuple[str, str | None] | None = None


def prepare(cfg: Config, host: Host, store: Any = None) -> Prepared:
    conn = connect(cfg, host)
    try:
        status = nodectl.call(cfg, host, conn, "status", timeout=30)
    except HostError as e:
        return Prepared(conn, error=e)
    open_spare_session(conn)  # the reboot command's channel, ready before its turn
    key = status.get("report_key")
    report = None
    if store is not None and store.report_key_ok(key):
        try:
            got = store.read_report(key)
            report = (str(key), got[1] if got else None)
        except StoreError:
            report = None  # no report then: the roll logs in to see the node back
    return Prepared(conn, status, report=report)


REPORT_POLL = 0.05  # seconds between two reads of a rebooting node's report


class BootReport:
    """Watch S3 for a rebooted node's report of its new boot (node.py report: the boot unit's
    outcome and the app's health, as `status --after-boot` answers them over SSH).

    One S3 read tells the roll what an SSH login plus a command would, a few round trips
    sooner; the SSH path keeps running beside it, so a node that cannot report (no
    s3:PutObject, an old node program) is still seen. A report counts only once it differs
    from the object read before the reboot (ETag) and names a boot other than the one before."""

    def __init__(self, store: Any, key: str, etag: str | None, old_boot: str, until: float):
        self.store, self.key, self.etag, self.old_boot, self.until = (
            store,
            key,
            etag,
            old_boot,
            until,
        )
        self.result: dict[str, Any] | None = None
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._first = threading.Event()
        self._took = 0.0
        # Two readers half a read apart: the report is seen ~3/4 of a round trip after it
        # lands on average, instead of one whole round trip with a single reader.
        threading.Thread(target=self._poll, name="boot-report", daemon=True).start()
        threading.Thread(target=self._poll, args=(True,), name="boot-report", daemon=True).start()

    def fresh(self, body: Any, etag: str | None) -> bool:
        if etag == self.etag or not isinstance(body, dict):
            return False
        me = body.get("boot_id")
        last = body.get("last_boot")
        return (
            isinstance(me, str)
            and me != self.old_boot
            and isinstance(last, dict)
            and last.get("boot_id") == me
            and isinstance(body.get("current"), dict)
        )

    def _poll(self, second: bool = False) -> None:
        if second:
            self._first.wait(self.until - time.monotonic())
            self._stop.wait(self._took / 2)
        while not self._stop.is_set() and time.monotonic() < self.until:
            t = time.monotonic()
            try:
                got = self.store.read_report(self.key)
            except StoreError:
                got = None
            if not second and not self._first.is_set():
                self._took = time.monotonic() - t
                self._first.set()
            if got is not None and self.fresh(*got):
                self.result = got[0]
                self.wake.set()
                return
            self._stop.wait(REPORT_POLL)

    def stop(self) -> None:
        self._stop.set()


class _Cancelled(Exception):
    pass


def _back(
    cfg: Config, host: Host, old_boot: str | None, start: float, report: BootReport | None
) -> tuple[str, dict[str, Any] | None, str]:
    """The new boot id and the node's status: from its S3 report or over SSH, whichever first."""
    if report is None:
        return (*_wait_back(cfg, host, old_boot, start), "over SSH")
    box: dict[str, Any] = {}
    cancel = threading.Event()

    def over_ssh() -> None:
        try:
            box["ssh"] = _wait_back(cfg, host, old_boot, start, cancel)
        except _Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e
        finally:
            report.wake.set()

    threading.Thread(target=over_ssh, name=f"back-{host.name}", daemon=True).start()
    try:
        while True:
            report.wake.wait(0.05)
            if report.result is not None:
                return str(report.result["boot_id"]), report.result, "from its S3 report"
            if "ssh" in box:
                return (*box["ssh"], "over SSH")
            if "error" in box:
                raise box["error"]
    finally:
        cancel.set()
        report.stop()


def missing_reboot_rights(cfg: Config, hosts: list[Host]) -> list[HostError]:
    """Each host's reboot command through sudo, asked of sudo (`sudo -n -l`, or `-S -l` with
    the password) on every host at once: a roll that cannot reboot a host must stop before it
    publishes. A host that cannot be reached here is left to its batch to report."""
    if not cfg.ssh.sudo:
        return []

    def work(host: Host, conn: Any) -> dict[str, Any]:
        reboot = for_host(cfg, host).reboot
        cmd, stdin = sudo_right_check(cfg, reboot)
        refused = sudo_refusal(host, cfg.ssh.user, reboot, run(cfg, host, conn, cmd, stdin=stdin))
        return {"refused": refused}

    return [r.data["refused"] for r in run_parallel(cfg, hosts, work) if r.data.get("refused")]


def _refuse(refusals: list[HostError]) -> None:
    if refusals:
        first, more = refusals[0], [e.host for e in refusals[1:]]
        raise HostError(
            first.host,
            f"{first.message}; nothing was published or rebooted"
            + (f" (also refused: {', '.join(more)})" if more else ""),
        )


def _wait_back(
    cfg: Config,
    host: Host,
    old_boot: str | None,
    start: float,
    cancel: threading.Event | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """Wait for a new boot id; returns it with the node status read at that moment."""
    probe = connect(cfg, host)
    # Through a gateway only SSH can tell; directly, a banner probe every 20 ms can.
    direct = not probe.gateway
    deadline = start + cfg.roll.reboot_timeout
    went_down: float | None = None
    last_login = 0.0
    while True:
        if cancel is not None and cancel.is_set():
            raise _Cancelled  # the node's S3 report came first
        now = time.monotonic()
        if now > deadline:
            raise HostError(
                host.name,
                f"{host.name} did not come back within {cfg.roll.reboot_timeout:g}s "
                f"after the reboot ({'it went down' if went_down else 'it never went down'}); "
                "check its console, then `fab deploy.roll --resume`",
            )
        if direct and not _sshd_answers(probe.host, probe.port):
            went_down = went_down or now
            time.sleep(0.02)
            continue
        if direct and went_down is None and now - last_login < 0.5:
            # sshd still answers: most likely the old boot, not yet gone down.
            time.sleep(0.02)
            continue
        last_login = now
        boot_id, status = _boot_id(cfg, host, old_boot)
        if boot_id is None:
            went_down = went_down or now
        elif boot_id != old_boot:
            return boot_id, status
        time.sleep(0.02 if direct else 0.1)


def _bundle_of(cur: dict[str, Any]) -> str | None:
    """What a host runs, as a bundle id (commit + build recipe); older node programs report the commit."""
    return cur.get("bundle_id") or cur.get("commit")


def reboot_one(
    cfg: Config,
    host: Host,
    commit: str,
    t0: float,
    resume: bool,
    traffic: Any = None,
    prepared: Prepared | None = None,
    store: Any = None,
) -> HostRoll:
    res = HostRoll(host.name)
    cfg = for_host(cfg, host)  # its role's reboot command and health check
    signed = bundles.signing_on(cfg)
    prepared = prepared or prepare(cfg, host, store)
    conn = prepared.conn
    try:
        if prepared.error is not None:
            raise prepared.error
        before = prepared.status or {}
        cur = before.get("current") or {}
        res.old = {"release": cur.get("release"), "commit": cur.get("commit")}
        if resume and cur.get("ok") and _bundle_of(cur) == commit:
            res.ok, res.skipped, res.new = True, True, dict(res.old)
            _log(t0, host.name, f"already on {short(commit)}, skipped (--resume)")
            return res
        old_boot = before.get("boot_id")
        reboot, stdin = as_root(cfg, cfg.reboot, sudo=cfg.ssh.sudo)
        if traffic is not None and cfg.ssh.sudo and stdin is None:
            # A missing sudo right must stop the roll before the host leaves its load balancer.
            refused = sudo_refusal(
                host,
                cfg.ssh.user,
                cfg.reboot,
                run(
                    cfg,
                    host,
                    conn,
                    f"sudo -n -l -- {cfg.reboot} >/dev/null 2>&1 || exit {SUDO_REFUSED}",
                ),
            )
            if refused:
                raise refused
        if traffic is not None:
            traffic.before_reboot(host)  # out of the load balancer (and into standby) first
        _log(t0, host.name, f"rebooting ({cfg.reboot})")
        start = time.monotonic()
        try:
            r = run(cfg, host, conn, reboot, timeout=30, stdin=stdin)
            refused = sudo_refusal(host, cfg.ssh.user, cfg.reboot, r) if cfg.ssh.sudo else None
            if refused:
                raise refused
            if r.exit_code not in (0, -1):
                raise HostError(
                    host.name,
                    f"{host.name}: reboot command failed (exit {r.exit_code}): "
                    + ((r.stderr or r.stdout).strip().splitlines() or ["no output"])[-1],
                    command=cfg.reboot,
                    exit_code=r.exit_code,
                    output=r.stderr,
                )
        except HostError as e:
            if not e.session_ended:
                raise
            # The session dropping is what a reboot looks like from here.
    finally:
        _close(conn)  # a rebooted host needs a new transport (and SFTP client)

    report = None
    # The report is not signed: with signed releases, only what the node says over SSH counts.
    if store is not None and prepared.report is not None and old_boot and not signed:
        key, etag = prepared.report
        report = BootReport(store, key, etag, old_boot, start + cfg.roll.reboot_timeout)
    boot_id, status, seen = _back(cfg, host, old_boot, start, report)
    res.down_s = time.monotonic() - start
    _log(t0, host.name, f"back after {res.down_s:.1f}s (new boot id, {seen})")

    # Wait until the boot unit has recorded its outcome for this boot.
    boot_deadline = time.monotonic() + cfg.roll.boot_timeout
    while not ((status or {}).get("last_boot") or {}).get("boot_id") == boot_id:
        if time.monotonic() > boot_deadline:
            raise HostError(
                host.name,
                f"{host.name} came back but its boot unit ({cfg.boot_unit}) recorded "
                f"no outcome within {cfg.roll.boot_timeout:g}s; is it enabled? (fab deploy.setup)",
            )
        time.sleep(0.2)
        _, status = _boot_id(cfg, host, old_boot)
    cur = (status or {}).get("current") or {}
    res.new = {"release": cur.get("release"), "commit": cur.get("commit")}
    last_boot = (status or {}).get("last_boot") or {}
    if _bundle_of(cur) != commit:
        raise HostError(
            host.name,
            f"{host.name} booted but kept {short(cur.get('commit'))} instead of "
            f"{short(commit)}: {last_boot.get('reason') or last_boot.get('outcome')}",
        )
    _check_health(cfg, host, commit, status)
    if traffic is not None:
        traffic.after_healthy(host)
    res.healthy_s = time.monotonic() - start
    res.ok = True
    _log(
        t0,
        host.name,
        f"on {short(commit)} release {cur.get('release')}, healthy ({res.healthy_s:.1f}s)",
    )
    return res


def _check_health(cfg: Config, host: Host, commit: str, status: dict[str, Any] | None) -> None:
    """The rebooted host's health: as its node reported it (health.on: node), else probed from here."""
    if cfg.health.on == "controller":
        h = wait_healthy(cfg, connect(cfg, host).host)
        ok, detail = h.ok, h.detail
    elif not (cfg.health.url or cfg.health.command):
        return
    else:
        reported = (status or {}).get("health")
        if not isinstance(reported, dict):
            raise HostError(
                host.name,
                f"{host.name} is on {short(commit)} but its node program reported no health "
                "check for this boot; run `fab deploy.setup` and roll it again",
            )
        ok, detail = bool(reported.get("ok")), str(reported.get("detail"))
    if not ok:
        raise HostError(host.name, f"{host.name} is on {short(commit)} but {detail}")


def _attempt(
    cfg: Config,
    host: Host,
    commit: str,
    t0: float,
    resume: bool,
    traffic: Any = None,
    prepared: Any = None,
    store: Any = None,
) -> HostRoll:
    try:
        return reboot_one(
            cfg,
            host,
            commit,
            t0,
            resume,
            traffic,
            prepared.result() if prepared else None,
            store=store,
        )
    except (HostError, AWSError) as e:
        _log(t0, host.name, f"FAILED: {e}")
        r = HostRoll(host.name, error=str(e))
        return r


def run_roll(
    cfg: Config,
    targets: Targets,
    ref: str | None,
    *,
    batch: str | None = None,
    resume: bool = False,
    dry_run: bool = False,
    rollback_on_failure: bool = False,
    role_order: list[str] | None = None,
    skip_once: bool = False,
    run: DeployRun | None = None,
) -> bool:
    # AZs interleaved (aws:) and capped by min_healthy of the live fleet; roles one after
    # another in role_order (--roles=worker,web, else roll.role_order), never mixed in a batch.
    order = role_order if role_order is not None else list(cfg.roll.role_order)
    live = len(resolve_hosts(cfg))
    the_plan = Plan(
        [
            g
            for part in (by_role_order(targets.hosts, order) if order else [targets.hosts])
            for g in batch_plan(cfg, part, batch or cfg.roll.batch, live=live).groups
        ]
    )
    groups = the_plan.groups
    in_order = [h for g in groups for h in g]
    once = bool(cfg.hooks.once) and not skip_once
    if once:
        once_plan(cfg, in_order)  # a hook whose roles no host of the roll has: before anything
    if dry_run:
        commit, _ = bundles.resolve_commit(cfg.repo, ref or cfg.ref)
        if once:
            say(
                "dry run: would run the run-once hooks first (unless they already ran for this "
                f"bundle) {describe_once(cfg, in_order)}"
            )
        say(f"dry run: would publish {short(commit)} ({ref or cfg.ref}) and reboot, in this order:")
        for line in the_plan.describe():
            say(line)
        return True

    store = store_for(cfg)
    results: list[HostRoll] = []
    t0 = time.monotonic()
    traffic = None
    journal = S3Journal(store)  # what the roll must undo, in S3 before each change
    if cfg.aws is not None:
        traffic = aws.Traffic(cfg, log=lambda h, msg: _log(t0, h.name, msg), journal=journal)
    with fleet_lock(cfg, store, "roll") as held, _Interrupt() as stop:
        # Every host's reboot right, asked while the bundle is made: checked before publishing.
        rights = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rights")
        refusals = rights.submit(missing_reboot_rights, cfg, targets.hosts)
        rights.shutdown(wait=False)
        reconcile(cfg, store, traffic, journal)  # a killed earlier roll's standby/LB changes
        b = bundles.ensure_bundle(cfg, store, ref)
        if run is not None:
            run.bundle(b)
        _refuse(refusals.result())  # before run-once hooks (migrations) and the publish
        if once:
            # Before the pointer moves: a host that boots from now on runs the new code.
            run_once_hooks(cfg, store, b, in_order, held=held)
        previous, _ = store.read_pointer(replacing=True)
        bundles.publish_bundle(store, b, log=say, cfg=cfg)
        ahead = ThreadPoolExecutor(
            max_workers=max(len(g) for g in groups), thread_name_prefix="ahead"
        )
        nxt: dict[str, Any] = {}
        try:
            # The next batch's connections and status are fetched while this one reboots.
            nxt = {h.name: ahead.submit(prepare, cfg, h, store) for h in groups[0]}
            for i, group in enumerate(groups, 1):
                if stop.requested:
                    warn(f"stopped by Ctrl-C before batch {i}")
                    break
                if held.lost is not None:
                    warn(f"stopped before batch {i}: the deploy lock was lost ({held.lost})")
                    break
                mine, nxt = (
                    nxt,
                    (
                        {h.name: ahead.submit(prepare, cfg, h, store) for h in groups[i]}
                        if i < len(groups)
                        else {}
                    ),
                )
                with ThreadPoolExecutor(max_workers=len(group)) as pool:
                    batch_results = list(
                        pool.map(
                            lambda h, mine=mine: _attempt(
                                cfg, h, b.bundle_id, t0, resume, traffic, mine.get(h.name), store
                            ),
                            group,
                        )
                    )
                results += batch_results
                failed = [r for r in batch_results if not r.ok]
                if failed:
                    if rollback_on_failure:
                        _roll_back_failed(cfg, store, previous, group, failed, t0, traffic, held)
                    break
        finally:
            for f in nxt.values():  # prepared for a batch that will not run
                f.add_done_callback(lambda f: _close(f.result().conn))
            ahead.shutdown(wait=False)
            if traffic is not None:
                # A failed host, or Ctrl-C, must not leave instances out of the LB or in Standby.
                traffic.restore_all()
    _print(cfg, targets, b, results, t0)
    if run is not None:
        done = {r.host for r in results}
        run.count(results, [h.name for h in targets.hosts if h.name not in done])
    return bool(results) and all(r.ok for r in results) and len(results) == len(targets.hosts)


def _roll_back_failed(
    cfg: Config,
    store: Any,
    previous: Any,
    group: list[Host],
    failed: list[HostRoll],
    t0: float,
    traffic: Any = None,
    held: Any = None,
) -> None:
    if previous is None:
        warn("--rollback-on-failure: there is no previous published bundle to go back to")
        return
    if held is not None and held.lost is not None:
        warn(
            f"--rollback-on-failure: the published pointer was NOT moved back: the deploy lock was lost ({held.lost})"
        )
        return
    current, etag = store.read_pointer(replacing=True)
    # A new pointer (signed, with a newer sequence) to the old bundle: nodes refuse replays.
    back = bundles.new_pointer(
        cfg, bundles.bundle_of_pointer(cfg, store, previous, log=say), current
    )
    store.write_pointer(back, etag)
    say(f"published pointer moved back to {short(previous.commit)} ({previous.ref})")
    names = {f.host for f in failed}
    for host in group:
        if host.name in names:
            r = _attempt(cfg, host, previous.id, t0, resume=True, traffic=traffic, store=store)
            for f in failed:
                if f.host == host.name:
                    f.error = (f.error or "") + (
                        f"; rolled back to {short(previous.commit)}"
                        if r.ok
                        else f"; rollback ALSO failed: {r.error}"
                    )


def _print(cfg: Config, targets: Targets, b: Any, results: list[HostRoll], t0: float) -> None:
    done = {r.host for r in results}
    rows = []
    for r in results:
        outcome = (
            "skipped (already on it)" if r.skipped else ("ok" if r.ok else f"FAILED: {r.error}")
        )
        rows.append(
            [
                r.host,
                f"{r.old.get('release') or '-'} {short(r.old.get('commit'))}",
                f"{r.new.get('release') or '-'} {short(r.new.get('commit'))}",
                "" if r.down_s is None else f"{r.down_s:.1f}s",
                "" if r.healthy_s is None else f"{r.healthy_s:.1f}s",
                outcome,
            ]
        )
    for h in targets.hosts:
        if h.name not in done:
            rows.append([h.name, "", "", "", "", "not touched"])
    table(
        f"roll {short(b.commit)} ({b.ref}) in {time.monotonic() - t0:.1f}s",
        ["host", "old", "new", "back after", "healthy after", "outcome"],
        rows,
    )
    if any(not r.ok for r in results) or len(done) < len(targets.hosts):
        say(
            "the roll stopped; the hosts it did not reach still run their old release. "
            "Resume with `fab deploy.roll --resume`, or go back with `fab deploy.rollback`."
        )
