"""A deploy's start and end, for what follows it: local hooks (after_deploy, after_failure)
and webhook notifications (start, success, failure).

Roll, hotfix and rollback each run inside `deploy_run`, and fill in what they learn (the
commit and bundle id, each host's outcome) on the DeployRun it yields. Nothing here can change
a deploy's outcome or exit code: a failing after_* hook or webhook is one warning line, and
posts go out in the background (the end waits at most notify.timeout for them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fabdeploy.adapters import bundle as bundles
from fabdeploy.adapters.bundle import local_user
from fabdeploy.adapters.localhooks import LocalHookFailed, run_local_hooks
from fabdeploy.adapters.notify import Notifier
from fabdeploy.basics.config import Config
from fabdeploy.basics.errors import DeployError
from fabdeploy.basics.output import warn
from fabdeploy.ops.targets import Targets


@dataclass
class Counts:
    """Hosts by outcome: changed and healthy, already there, failed, never reached."""

    ok: int = 0
    unchanged: int = 0
    failed: int = 0
    not_touched: int = 0

    def line(self) -> str:
        parts = [f"{self.ok} ok", f"{self.failed} failed"]
        if self.unchanged:
            parts.append(f"{self.unchanged} unchanged")
        if self.not_touched:
            parts.append(f"{self.not_touched} not touched")
        return ", ".join(parts)


@dataclass
class DeployRun:
    """One roll, hotfix or rollback, as its after_* hooks (and notifications) see it."""

    cfg: Config
    task: str  # roll, hotfix, rollback
    user: str = field(default_factory=local_user)
    started: float = field(default_factory=time.monotonic)
    hosts: list[str] = field(default_factory=list)
    commit: str | None = None
    ref: str | None = None
    bundle_id: str | None = None
    counts: Counts = field(default_factory=Counts)
    ok: bool | None = None  # set by the caller: the run's own verdict
    error: str | None = None  # why it failed, when it raised

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def bundle(self, b: Any) -> None:
        """What is being deployed: a Bundle of adapters.bundle."""
        self.commit, self.ref = b.commit, b.ref
        self.bundle_id = getattr(b, "bundle_id", None) or b.commit

    def count(self, results: list[Any], not_touched: list[str] | None = None) -> None:
        """Hotfix/rollback results (ssh.HostResult) or a roll's (HostRoll: `skipped`)."""
        c = Counts(not_touched=len(not_touched or ()))
        for r in results:
            data = getattr(r, "data", None) or {}
            if not r.ok:
                c.failed += 1
            elif getattr(r, "skipped", False) or data.get("changed", True) is False:
                c.unchanged += 1
            else:
                c.ok += 1
        self.counts = c

    def resolve(self, ref: str | None) -> None:
        """The commit a roll or hotfix is about to deploy, from git alone (for the start post)."""
        try:
            self.commit, _ = bundles.resolve_commit(self.cfg.repo, ref or self.cfg.ref)
            # Named as the bundle will name it (a branch, not HEAD), so start and end agree.
            self.ref = bundles.branch_name(self.cfg.repo, ref or self.cfg.ref)
            self.bundle_id = bundles.bundle_id(self.commit, self.cfg.build)
        except Exception:  # noqa: BLE001 - the deploy itself will say what is wrong with the ref
            pass

    def payload(self, event: str) -> dict[str, Any]:
        """A Slack-compatible post: `text` for people, `fabdeploy` for machines."""
        cfg, c = self.cfg, self.counts
        secs = round(self.seconds, 1)  # one reading of the clock for the text and the field
        where = f"{cfg.app} ({cfg.stage})" if cfg.stage else cfg.app
        what = f"{self.task} of {self.commit[:8]} ({self.ref})" if self.commit else self.task
        if self.task == "rollback":
            what = f"rollback to {self.commit[:8]}" if self.commit else "rollback"
        if event == "start":
            n = len(self.hosts)
            on = f" on {n} host{'s' if n != 1 else ''}" if n else ""
            text = f"{where}: {self.user} started a {what}{on}"
        elif event == "success":
            text = f"{where}: {what} by {self.user} succeeded in {secs:.1f}s: {c.line()}"
        else:
            text = f"{where}: {what} by {self.user} FAILED after {secs:.1f}s: {c.line()}"
            if self.error:
                text += f" ({self.error.splitlines()[0][:300]})"
        return {
            "text": _slack_escape(text),
            "fabdeploy": {
                "event": event,
                "app": cfg.app,
                "stage": cfg.stage,
                "task": self.task,
                "commit": self.commit,
                "ref": self.ref,
                "bundle_id": self.bundle_id,
                "user": self.user,
                "hosts": list(self.hosts),
                "seconds": None if event == "start" else secs,
                "counts": None if event == "start" else dict(vars(c)),
                "error": self.error,
            },
        }

    def env(self, outcome: str) -> dict[str, str]:
        """The after_* hooks' environment (Capistrano's fetch(:...) values, as variables)."""
        c = self.counts
        return {
            "DEPLOY_TASK": self.task,
            "DEPLOY_OUTCOME": outcome,
            "DEPLOY_USER": self.user,
            "DEPLOY_SECONDS": f"{self.seconds:.1f}",
            "DEPLOY_HOSTS": ",".join(self.hosts),
            "REVISION": self.commit or "",
            "REF": self.ref or "",
            "BUNDLE_ID": self.bundle_id or "",
            "HOSTS_OK": str(c.ok),
            "HOSTS_UNCHANGED": str(c.unchanged),
            "HOSTS_FAILED": str(c.failed),
            "HOSTS_NOT_TOUCHED": str(c.not_touched),
            **({"DEPLOY_ERROR": self.error} if self.error else {}),
            **({"STAGE": self.cfg.stage} if self.cfg.stage else {}),
        }


def _slack_escape(text: str) -> str:
    """Slack's three control characters in message text (a ref or an error may hold them)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@contextmanager
def deploy_run(
    cfg: Config,
    task: str,
    targets: Targets | None = None,
    *,
    ref: str | None = None,
    dry_run: bool = False,
) -> Iterator[DeployRun]:
    """Around one deploy: the start post; after it, the success or failure post and
    after_deploy or after_failure (nothing on a dry run).

    The run failed if the body raised or left `run.ok` false; the exception still propagates."""
    run = DeployRun(cfg, task, hosts=[h.name for h in targets.hosts] if targets else [])
    if dry_run:
        yield run
        return
    notifier = None
    if cfg.notify.webhooks:
        if task != "rollback":
            run.resolve(ref)
        notifier = Notifier(cfg.notify.webhooks, cfg.notify.timeout)
        notifier.post("start", run.payload("start"))
    try:
        yield run
    except BaseException as e:
        run.ok = False
        run.error = (
            str(e)
            if isinstance(e, DeployError)
            else "interrupted"
            if isinstance(e, KeyboardInterrupt)
            else f"{type(e).__name__}: {e}"
        )
        raise
    finally:
        _after(run, notifier)


def _after(run: DeployRun, notifier: Notifier | None) -> None:
    outcome = "success" if run.ok else "failure"
    if notifier is not None:
        notifier.post(outcome, run.payload(outcome))  # in the background, while the hooks run
    try:
        _after_hooks(run, outcome)
    finally:
        if notifier is not None:
            notifier.close()  # waits at most notify.timeout for posts in flight


def _after_hooks(run: DeployRun, outcome: str) -> None:
    hooks = run.cfg.hooks.after_deploy if run.ok else run.cfg.hooks.after_failure
    stage = "after_deploy" if run.ok else "after_failure"
    if not hooks:
        return
    try:
        run_local_hooks(stage, hooks, run.cfg.repo, run.env(outcome))
    except LocalHookFailed as e:
        warn(
            f"{e} (the {run.task} itself {'succeeded' if run.ok else 'failed'}; exit code unchanged)"
        )
    except Exception as e:  # noqa: BLE001 - a hook's problem never becomes the deploy's
        warn(f"{stage} hook could not run: {e} (exit code unchanged)")
