"""`fab deploy.bundle` and `fab deploy.publish`: the bundle adapter with a Store made from the config."""

from __future__ import annotations

from fabdeploy.adapters.bundle import Bundle, Log, ensure_bundle, promote, publish
from fabdeploy.adapters.store import Pointer, store_for
from fabdeploy.basics.config import Config


def bundle_for(cfg: Config, ref: str | None = None, *, verify: bool = False, log: Log = print) -> Bundle:
    """`fab deploy.bundle`: ensure_bundle with a Store made from the config."""
    return ensure_bundle(cfg, store_for(cfg), ref, log, verify=verify)


def publish_for(cfg: Config, ref: str | None = None, *, log: Log = print) -> tuple[Bundle, Pointer]:
    """`fab deploy.publish`: publish with a Store made from the config."""
    return publish(cfg, store_for(cfg), ref, log)


def promote_for(cfg: Config, source: Config, *, log: Log = print) -> tuple[Bundle, Pointer]:
    """`fab production deploy.publish --from=staging`: publish what staging published, same bytes."""
    return promote(store_for(source), store_for(cfg), source.stage or "?", log, cfg=cfg)
