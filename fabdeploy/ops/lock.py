"""The fleet lock: one fleet-wide change at a time (an S3 object created conditionally)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from fabdeploy.adapters.bundle import local_user
from fabdeploy.basics.config import Config
from fabdeploy.basics.output import warn


@contextmanager
def fleet_lock(cfg: Config, store: Any, action: str, enabled: bool = True):
    """The app's deploy lock in S3, held for the duration of a fleet-wide change."""
    if not enabled:
        yield None
        return
    lock = store.acquire_lock(local_user(), action, cfg.roll.lock_expiry)
    try:
        yield lock
    finally:
        try:
            store.release_lock(lock)
        except Exception as e:  # the deploy's outcome matters more than a tidy lock
            warn(f"could not release the deploy lock ({e}); run `fab deploy.unlock` if it stays")
