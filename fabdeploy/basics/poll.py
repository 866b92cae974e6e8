"""The one poll loop: ask until done or out of time, fast first, backing off to an interval."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Polled(Generic[T]):
    done: bool
    last: T  # what the last probe saw (for the message when it timed out)
    seconds: float


def poll(
    probe: Callable[[], tuple[bool, T]],
    *,
    timeout: float,
    interval: float,
    first: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Polled[T]:
    """Call `probe` until it says done or `timeout` passes; it is always called at least once.

    The pause starts at `first` (default: `interval`) and doubles up to `interval`, so a
    condition that is met within milliseconds is not charged a whole interval.
    """
    start = time.monotonic()
    deadline = start + timeout
    pause = min(first if first is not None else interval, interval)
    while True:
        done, last = probe()
        if done or time.monotonic() >= deadline:
            return Polled(done, last, time.monotonic() - start)
        sleep(pause)
        pause = min(pause * 2, interval)
