"""Health checks, from the deploying machine, with a readiness loop (never a fixed sleep)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from fabdeploy.basics.config import Config
from fabdeploy.basics.poll import poll


@dataclass
class Health:
    ok: bool
    detail: str
    seconds: float


def url_for(cfg: Config, address: str) -> str | None:
    return cfg.health.url.replace("{host}", address) if cfg.health.url else None


def wait_healthy(cfg: Config, address: str, timeout: float | None = None) -> Health:
    """Poll the health URL until it answers the expected status or the timeout passes."""
    url = url_for(cfg, address)
    start = time.monotonic()
    if url is None:
        return Health(True, "no health check configured", 0.0)

    def probe() -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(url, timeout=min(5.0, cfg.health.timeout)) as resp:
                return resp.status == cfg.health.expect_status, f"{url} answered {resp.status}"
        except urllib.error.HTTPError as e:
            return False, f"{url} answered {e.code}"
        except (urllib.error.URLError, OSError) as e:
            return False, f"{url} unreachable: {getattr(e, 'reason', e)}"

    # A restarted app usually answers within milliseconds: start probing fast, back off
    # to health.interval, so no host pays a whole interval for nothing.
    r = poll(
        probe,
        timeout=timeout if timeout is not None else cfg.health.timeout,
        interval=cfg.health.interval,
        first=0.01,
    )
    if r.done:
        return Health(True, r.last, time.monotonic() - start)
    waited = time.monotonic() - start
    return Health(False, f"health check failed after {waited:.0f}s: {r.last}", waited)
