"""The fleet lock: one fleet-wide change at a time (an S3 object created conditionally).

While held it is renewed from a background thread (a conditional overwrite on its ETag,
every lock_expiry/3), so a roll longer than roll.lock_expiry keeps it. If a renewal finds
the lock broken (someone ran `fab deploy.unlock --force`, or took it after it expired),
that is a loud warning and `HeldLock.lost` says so: the operation stops before its next
fleet-wide change (batch, pointer move).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

from fabdeploy.adapters.bundle import local_user
from fabdeploy.basics.config import Config
from fabdeploy.basics.errors import ConflictError, StoreError
from fabdeploy.basics.output import warn


class HeldLock:
    """Our lock while it is held, kept fresh by a renewal thread."""

    def __init__(self, store: Any, lock: Any, expiry: float, every: float | None = None) -> None:
        self.store = store
        self.lock = lock
        self.expiry = expiry
        self.every = every if every is not None else expiry / 3
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="lock-renewal", daemon=True)

    def start(self) -> HeldLock:
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.lock = self.store.renew_lock(self.lock, self.expiry)
            except ConflictError as e:
                self.lost = str(e)
                warn(
                    f"LOST THE DEPLOY LOCK: {e}. Another deploy may be running: stopping before "
                    "the next fleet-wide change; check `fab deploy.status`"
                )
                return
            except StoreError as e:
                # Transient (S3 unreachable): the lock is still ours until it expires; retry.
                warn(f"could not renew the deploy lock ({e}); retrying")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def check(self, what: str) -> None:
        """Raise before `what` if the lock was lost."""
        if self.lost is not None:
            raise ConflictError(f"not {what}: {self.lost}")


@contextmanager
def fleet_lock(cfg: Config, store: Any, action: str, enabled: bool = True):
    """The app's deploy lock in S3, held (and renewed) for the duration of a fleet-wide change.

    Yields a HeldLock, or None when not enabled (a subset of hosts)."""
    if not enabled:
        yield None
        return
    expiry = cfg.roll.lock_expiry
    held = HeldLock(store, store.acquire_lock(local_user(), action, expiry), expiry).start()
    try:
        yield held
    finally:
        held.stop()
        if held.lost is None:
            try:
                store.release_lock(held.lock)
            except Exception as e:  # the deploy's outcome matters more than a tidy lock
                warn(
                    f"could not release the deploy lock ({e}); run `fab deploy.unlock` if it stays"
                )
