"""`fab deploy.bundle` and `fab deploy.publish`: the bundle adapter with a Store made from the config."""

from __future__ import annotations

from fabdeploy.adapters.bundle import Bundle, Log, ensure_bundle, promote, publish_bundle
from fabdeploy.adapters.store import Pointer, store_for
from fabdeploy.basics.config import Config
from fabdeploy.ops.lock import fleet_lock


def bundle_for(
    cfg: Config, ref: str | None = None, *, verify: bool = False, log: Log = print
) -> Bundle:
    """`fab deploy.bundle`: ensure_bundle with a Store made from the config."""
    return ensure_bundle(cfg, store_for(cfg), ref, log, verify=verify)


def publish_for(cfg: Config, ref: str | None = None, *, log: Log = print) -> tuple[Bundle, Pointer]:
    """`fab deploy.publish`: ensure the bundle, then move the pointer under the fleet lock.

    The lock keeps a publish from moving the pointer in the middle of a roll (the roll's
    later batches and --rollback-on-failure would act on a pointer they did not set)."""
    store = store_for(cfg)
    b = ensure_bundle(cfg, store, ref, log)
    with fleet_lock(cfg, store, f"publish {b.commit[:12]}") as held:
        held.check(f"publishing {b.commit[:12]}")
        return b, publish_bundle(store, b, log, cfg=cfg)


def promote_for(cfg: Config, source: Config, *, log: Log = print) -> tuple[Bundle, Pointer]:
    """`fab production deploy.publish --from=staging`: publish what staging published, same bytes,
    under this stage's fleet lock (like any publish)."""
    store = store_for(cfg)
    with fleet_lock(cfg, store, f"publish --from={source.stage or '?'}"):
        return promote(store_for(source), store, source.stage or "?", log, cfg=cfg)
