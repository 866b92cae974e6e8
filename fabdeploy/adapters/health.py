"""Health checks, from the deploying machine, with a readiness loop (never a fixed sleep)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from fabdeploy.basics.config import Config


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
    deadline = start + (timeout if timeout is not None else cfg.health.timeout)
    last = "no answer"
    # A restarted app usually answers within milliseconds: start probing fast, back off
    # to health.interval, so no host pays a whole interval for nothing.
    pause = min(0.01, cfg.health.interval)
    while True:
        try:
            with urllib.request.urlopen(url, timeout=min(5.0, cfg.health.timeout)) as resp:
                if resp.status == cfg.health.expect_status:
                    return Health(True, f"{url} answered {resp.status}", time.monotonic() - start)
                last = f"{url} answered {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"{url} answered {e.code}"
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            last = f"{url} unreachable: {reason}"
        if time.monotonic() >= deadline:
            waited = time.monotonic() - start
            return Health(False, f"health check failed after {waited:.0f}s: {last}", waited)
        time.sleep(pause)
        pause = min(pause * 2, cfg.health.interval)
