"""Hooks on the deploying machine: before_bundle, after_deploy, after_failure.

Each command runs with `sh -c` in a given folder, its output streamed here line by line as
`<stage> | <line>`; the first failure (or a timeout, which kills its process group) raises
LocalHookFailed: one line, with the last lines of output kept for the caller to show.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from fabdeploy.basics.config import Hook
from fabdeploy.basics.errors import DeployError

TAIL_LINES = 20


class LocalHookFailed(DeployError):
    def __init__(self, message: str, stage: str, command: str, tail: list[str]) -> None:
        super().__init__(message)
        self.stage, self.command, self.tail = stage, command, tail

    def tail_text(self) -> str:
        return "\n".join(f"  | {x}" for x in self.tail) if self.tail else "  (no output)"


def run_local_hooks(
    stage: str,
    hooks: Sequence[Hook],
    cwd: Path,
    env: dict[str, str],
    show: Callable[[str], None] = lambda line: print(line, flush=True),
) -> None:
    """Run `hooks` in turn in `cwd` with os.environ + `env`; raise on the first failure."""
    for hook in hooks:
        _run_one(stage, hook, cwd, {**os.environ, **env}, show)


def _run_one(
    stage: str, hook: Hook, cwd: Path, env: dict[str, str], show: Callable[[str], None]
) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(
            ["sh", "-c", hook.run],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a timeout kills the whole group, as on the nodes
        )
    except OSError as e:
        raise LocalHookFailed(
            f"{stage} hook `{hook.run}` could not start in {cwd}: {e}", stage, hook.run, []
        ) from None
    fired: list[bool] = []

    def kill() -> None:
        fired.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(hook.timeout, kill) if hook.timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n").rstrip("\r")
            tail.append(line)
            show(f"{stage} | {line}")
        rc = proc.wait()
    except BaseException:  # Ctrl-C: the hook goes too
        kill()
        proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if rc != 0:
        how = (
            f"timed out after {hook.timeout:g}s (killed)"
            if fired
            else f"failed with exit code {rc}"
        )
        raise LocalHookFailed(f"{stage} hook `{hook.run}` {how}", stage, hook.run, list(tail))
