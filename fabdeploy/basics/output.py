"""What the user sees: one table per multi-host run (Fabric's GroupResult idea), lines, warnings.

Host-supplied text (hook output, error messages, paths) is never parsed as rich markup:
every cell is a plain `Text`, so `[/etc/app.conf]` prints as itself.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(title), title_justify="left", show_lines=False)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*(Text("" if v is None else str(v)) for v in row))
    # Wide enough that CI logs and pipes keep one line per host.
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def dump_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def short(commit: str | None) -> str:
    return (commit or "")[:8]


def say(msg: str) -> None:
    print(msg, flush=True)


_LINES = threading.Lock()


def host_line(host: str, line: str) -> None:
    """One line of a host's output (`web2 | migrating…`), whole even with many hosts at once."""
    with _LINES:
        print(f"{host} | {line}", flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def progress_line(started: float) -> Callable[[Any], None]:
    """A line per host as it finishes (`[  1.2s] web1: ok`), like roll's; the table comes at the end."""
    lock = threading.Lock()

    def done(r: Any) -> None:
        if r.ok:
            what = r.data.get("outcome") or ("ok" if r.data.get("changed", True) else "unchanged")
            if r.data.get("config_changed"):  # sourced linked files fetched anew (and restarted)
                what = ("ok; " if r.data.get("changed", True) else "") + "config changed"
        else:
            what = f"FAILED: {(r.error or '').splitlines()[0] if r.error else ''}"
        with lock:  # whole lines, even from many threads
            print(f"[{time.monotonic() - started:6.1f}s] {r.host}: {what}", flush=True)

    return done
