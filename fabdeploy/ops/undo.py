"""What a run must put back (load balancers, traffic.drain, ASG standby, MinSize), kept in S3.

aws.Traffic (roll; hotfix/rollback's target groups and classic ELBs) and traffic.Drainer
(traffic.drain/restore) record each host they take out in `{prefix}/state/undo.json` before
they change it, and clear the record once the host is back, so a controller killed mid-run
(kill -9, a lost laptop) does not strand a host out of its load balancer, or an instance in
Standby with MinSize lowered: the next run under the fleet lock (roll, hotfix/rollback of the
whole fleet or with traffic settings) or `fab deploy.unlock` finds the record and puts it all
back, in one line. Writes are conditional on the ETag we last wrote (or on absence): the
record has one writer, the holder of the fleet lock.
"""

from __future__ import annotations

import threading
from typing import Any

from fabdeploy.adapters import aws
from fabdeploy.adapters.bundle import local_user
from fabdeploy.adapters.store import now_iso
from fabdeploy.adapters.traffic import Drainer
from fabdeploy.basics.config import Config
from fabdeploy.basics.errors import AWSError, StoreError
from fabdeploy.basics.output import say, warn


class S3Journal:
    """The run's record in S3: `instances` (aws.Traffic) and `drained` (traffic.Drainer)."""

    def __init__(self, store: Any, action: str = "roll") -> None:
        self.store = store
        self.etag: str | None = None
        self.by = local_user()
        self.at = now_iso()
        self.action = action
        self.instances: dict[str, dict[str, Any]] = {}
        self.drained: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def save(self, state: dict[str, dict[str, Any]]) -> None:
        """aws.Traffic's part: the instances still to put back."""
        with self._lock:
            self.instances = dict(state)
            self._write()

    def save_drained(self, drained: dict[str, dict[str, Any]]) -> None:
        """traffic.Drainer's part: the hosts still to run traffic.restore for."""
        with self._lock:
            self.drained = dict(drained)
            self._write()

    def _write(self) -> None:
        try:
            if not self.instances and not self.drained:
                if self.etag is not None:
                    self.store.delete_undo(self.etag)
                    self.etag = None
                return
            body = {
                "version": 1,
                "by": self.by,
                "at": self.at,
                "action": self.action,
                "instances": self.instances,
                "drained": self.drained,
            }
            self.etag = self.store.write_undo(body, self.etag)
        except StoreError as e:
            raise AWSError(
                f"could not record what the {self.action} must put back, so the host was not "
                f"taken out of traffic: {e}"
            ) from None


def _valid(state: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]] | None:
    """(instances, drained) of a well-formed record, else None."""

    def strs(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    if not isinstance(state, dict) or not isinstance(state.get("instances"), dict):
        return None
    drained = state.get("drained", {})
    if not isinstance(drained, dict):
        return None
    out = {}
    for iid, e in state["instances"].items():
        if not (
            isinstance(e, dict)
            and isinstance(e.get("host"), str)
            and aws.valid_address(e["host"])
            and strs(e.get("target_groups"))
            and strs(e.get("classic_elbs"))
            and (e.get("standby_group") is None or isinstance(e["standby_group"], str))
            and (
                e.get("restore_min") is None
                or (type(e["restore_min"]) is int and 0 <= e["restore_min"] < 100_000)
            )
        ):
            return None
        out[iid] = e
    for name, e in drained.items():
        if not (
            isinstance(e, dict)
            and aws.valid_address(name)
            and all(
                isinstance(e.get(k), str) and aws.valid_address(e[k]) for k in ("host", "address")
            )
        ):
            return None
    return out, drained


def reconcile(
    cfg: Config,
    store: Any,
    traffic: Any = None,
    journal: S3Journal | None = None,
    drainer: Drainer | None = None,
) -> None:
    """Put back what an interrupted run left (call it holding the fleet lock); one line about it.

    `traffic` / `drainer` (the run's own, sharing `journal`) take over what they could not put
    back, so it stays recorded and is tried again at the end of the run."""
    try:
        raw, etag = store.read_undo()
    except StoreError as e:
        warn(str(e))
        return
    if raw is None:
        return
    where = store.uri(store.undo_key)
    parts = _valid(raw)
    if parts is None:
        warn(
            f"{where} is not a valid undo state: check the hosts' load balancer registration (and "
            "traffic.drain) and ASG standby/MinSize by hand, then delete it"
        )
        return
    instances, drained = parts
    action = raw.get("action") if isinstance(raw.get("action"), str) else "roll"
    if instances and cfg.aws is None:
        warn(
            f"{where} says an interrupted {action} left instances out of their load balancers or in "
            "Standby, but deploy.yml has no aws: section to put them back with; fix them by hand, "
            "then delete it"
        )
        return
    kept: dict[str, dict[str, Any]] = {}
    if drained and not cfg.traffic.restore:
        warn(
            f"{where} says an interrupted {action} left {', '.join(sorted(drained))} drained, but "
            f"deploy.yml has no traffic.restore to put them back with; fix them by hand, then delete it"
        )
        kept, drained = drained, {}  # stays recorded; the instances are still put back
    if journal is None:
        journal = S3Journal(store)
    journal.etag = etag
    journal.instances, journal.drained = dict(instances), {**kept, **drained}
    if drainer is None:
        drainer = Drainer(cfg, journal=journal)
    drainer.keep(kept)
    if traffic is None:
        traffic = drainer.lb or aws.Traffic(cfg, log=lambda h, m: None, journal=journal)
    names = [f"{h.name} ({h.instance_id})" for h in traffic.adopt(instances)] if instances else []
    names += [h.name for h in drainer.adopt(drained)]
    log, drainer.log = drainer.log, lambda m: None  # one line below says it all
    try:
        if instances:
            traffic.restore_all()  # warns per instance it could not restore; the rest stays recorded
        if drained:
            drainer.restore_all()
    finally:
        drainer.log = log
    left = journal.etag is not None
    if not names:
        return  # nothing it could act on: the warning above says what to do
    say(
        f"reconciled an interrupted {action} ({raw.get('by', '?')}, {raw.get('at', '?')}): "
        + ", ".join(names)
        + (
            " NOT fully put back (see the warnings; recorded for the next run)"
            if left
            else " put back in traffic"
            + (" (out of Standby, MinSize restored, registered again)" if instances else "")
        )
    )


def drainer_for(cfg: Config, store: Any, action: str, held: Any) -> Drainer:
    """A hotfix/rollback's Drainer. Under the fleet lock (`held`), what it takes out of traffic is
    recorded in S3 first, and what a killed run left out is put back before it starts."""
    if held is None:
        return Drainer(cfg)
    journal = S3Journal(store, action)
    drainer = Drainer(cfg, journal=journal)
    reconcile(cfg, store, drainer.lb, journal, drainer)
    return drainer


def reconcile_after_unlock(cfg: Config, store: Any) -> None:
    """`fab deploy.unlock`: once the lock is gone, put back what the run that held it left out
    of traffic or in Standby (taking the lock for it: a new run may have started meanwhile)."""
    from fabdeploy.ops.lock import fleet_lock

    try:
        raw, _ = store.read_undo()
    except StoreError as e:
        warn(str(e))
        return
    if raw is None:
        return
    with fleet_lock(cfg, store, "unlock: putting back an interrupted run's hosts"):
        reconcile(cfg, store)
