"""What a reboot roll must put back (load balancers, ASG standby, MinSize), kept in S3.

aws.Traffic records each change in `{prefix}/state/undo.json` before it makes it and
clears the record once the host is back, so a controller killed mid-roll (kill -9, a
lost laptop) does not strand an instance in Standby with MinSize lowered: the next
roll or whole-fleet hotfix, under the fleet lock, finds the record and puts it all back.
Writes are conditional on the ETag we last wrote (or on absence).
"""

from __future__ import annotations

from typing import Any

from fabdeploy.adapters import aws
from fabdeploy.adapters.bundle import local_user
from fabdeploy.adapters.store import now_iso
from fabdeploy.basics.config import Config
from fabdeploy.basics.errors import AWSError, StoreError
from fabdeploy.basics.output import say, warn


class S3Journal:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.etag: str | None = None
        self.by = local_user()
        self.at = now_iso()

    def save(self, state: dict[str, dict[str, Any]]) -> None:
        try:
            if not state:
                if self.etag is not None:
                    self.store.delete_undo(self.etag)
                    self.etag = None
                return
            body = {"version": 1, "by": self.by, "at": self.at, "instances": state}
            self.etag = self.store.write_undo(body, self.etag)
        except StoreError as e:
            raise AWSError(
                f"could not record what the roll must undo, so the instance was not changed: {e}"
            ) from None


def _valid(state: Any) -> dict[str, dict[str, Any]] | None:
    def strs(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    if not isinstance(state, dict) or not isinstance(state.get("instances"), dict):
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
    return out


def reconcile(
    cfg: Config, store: Any, traffic: Any = None, journal: S3Journal | None = None
) -> None:
    """Put back what an interrupted roll left (call it holding the fleet lock); one line about it."""
    try:
        raw, etag = store.read_undo()
    except StoreError as e:
        warn(str(e))
        return
    if raw is None:
        return
    where = store.uri(store.undo_key)
    state = _valid(raw)
    if state is None:
        warn(
            f"{where} is not a valid undo state: check the instances' load balancer registration and ASG "
            "standby/MinSize by hand, then delete it"
        )
        return
    if cfg.aws is None:
        warn(
            f"{where} says an interrupted roll left instances out of their load balancers or in Standby, "
            "but deploy.yml has no aws: section to put them back with; fix them by hand, then delete it"
        )
        return
    if journal is None:
        journal = S3Journal(store)
    journal.etag = etag
    if traffic is None:
        traffic = aws.Traffic(cfg, log=lambda h, m: None, journal=journal)
    hosts = traffic.adopt(state)
    traffic.restore_all()  # warns per instance it could not restore; what is left stays recorded
    left = journal.etag is not None
    names = ", ".join(f"{h.name} ({h.instance_id})" for h in hosts)
    say(
        f"reconciled an interrupted roll ({raw.get('by', '?')}, {raw.get('at', '?')}): {names} "
        + (
            "NOT fully put back (see the warnings; recorded for the next run)"
            if left
            else "put back (out of Standby, MinSize restored, registered in the load balancers again)"
        )
    )
