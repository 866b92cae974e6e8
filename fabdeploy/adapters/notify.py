"""Webhook notifications: a JSON post (Slack-compatible) per event, sent in the background.

One daemon thread per webhook (so posts to one URL keep their order, and a hung URL holds
up no other), a timeout per attempt and one retry. Nothing here raises into a deploy or
waits for it: `close(wait)` waits at most `wait` seconds for what is still in flight and then
leaves it (daemon threads end with the process). A failed post is one warning line, with the
URL shown without its path (webhook URLs carry their secret there).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from fabdeploy.basics.config import ENV_REF, Webhook
from fabdeploy.basics.output import warn

MAX_PENDING = 16  # per webhook: more than this in flight and new posts are dropped (one warning)
_STOP = object()


def safe_url(url: str) -> str:
    """scheme://host/… : where a post went, without the path or query that hold its token."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.hostname or '?'}{':' + str(p.port) if p.port else ''}/…"


def expand(url: str, environ: dict[str, str] | None = None) -> str:
    """`${NAME}` from the environment; KeyError naming the first one that is not set."""
    env = os.environ if environ is None else environ

    def one(m: Any) -> str:
        if not env.get(m.group(1)):
            raise KeyError(m.group(1))
        return env[m.group(1)]

    return ENV_REF.sub(one, url)


def post_json(url: str, payload: dict[str, Any], timeout: float) -> None:
    """One POST; raises OSError/HTTPError on any failure (a non-2xx status included)."""
    body = json.dumps(payload).encode()
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "fabdeploy"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - http(s) checked at load
        r.read(65536)


class Notifier:
    """Posts to each webhook whose events include the event, in the background."""

    def __init__(
        self,
        webhooks: tuple[Webhook, ...],
        timeout: float,
        *,
        say: Callable[[str], None] = warn,
        send: Callable[[str, dict[str, Any], float], None] = post_json,
    ) -> None:
        self.timeout = timeout
        self._say, self._send = say, send
        self._workers: list[tuple[Webhook, queue.Queue[Any], threading.Thread]] = []
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        for hook in webhooks:
            q: queue.Queue[Any] = queue.Queue(MAX_PENDING)
            t = threading.Thread(target=self._work, args=(hook, q), name="notify", daemon=True)
            self._workers.append((hook, q, t))
            t.start()

    def post(self, event: str, payload: dict[str, Any]) -> None:
        for hook, q, _ in self._workers:
            if event not in hook.events:
                continue
            try:
                url = expand(hook.url)
            except KeyError as e:
                self._say(f"notification ({event}) not sent: ${{{e.args[0]}}} is not set")
                continue
            with self._lock:
                self._pending += 1
            try:
                q.put_nowait((event, url, payload))
            except queue.Full:
                self._done()
                self._say(f"notification ({event}) to {safe_url(url)} dropped: too many pending")

    def close(self, wait: float | None = None) -> None:
        """Wait at most `wait` seconds (default: the timeout) for posts in flight, then go."""
        deadline = time.monotonic() + (self.timeout if wait is None else wait)
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            left_over = self._pending
        for _, q, _ in self._workers:
            try:
                q.put_nowait(_STOP)
            except queue.Full:
                pass
        if left_over:
            self._say(
                f"{left_over} notification{'s' if left_over > 1 else ''} still in flight after "
                f"{self.timeout if wait is None else wait:g}s; not waiting for "
                f"{'them' if left_over > 1 else 'it'} (notify.timeout)"
            )

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _work(self, hook: Webhook, q: queue.Queue[Any]) -> None:
        while True:
            item = q.get()
            if item is _STOP:
                return
            event, url, payload = item
            try:
                self._deliver(event, url, payload)
            finally:
                self._done()

    def _deliver(self, event: str, url: str, payload: dict[str, Any]) -> None:
        why = ""
        for _attempt in range(2):  # one retry
            try:
                self._send(url, payload, self.timeout)
                return
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}"
            except Exception as e:  # noqa: BLE001 - any failure is one warning, never the deploy's
                reason = getattr(e, "reason", None) or e
                why = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        self._say(f"notification ({event}) to {safe_url(url)} failed twice: {why}")
