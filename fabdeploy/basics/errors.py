"""Every expected failure is a DeployError: one line for the user (what, where, what to do).

The task layer turns any DeployError into `invoke.Exit` (no traceback); anything else
is a bug and keeps its traceback. Errors carry data, not just text (Invoke's
UnexpectedExit is the model): HostError has the host, command, exit code and output.
"""

from __future__ import annotations

from typing import Any


class DeployError(Exception):
    """Base of every expected failure; its str() is the one line shown to the user."""


class ConfigError(DeployError):
    """A deploy.yml problem, already phrased as one line for the user."""


class BundleError(DeployError):
    """A bundling problem phrased as one line for the user."""


class StoreError(DeployError):
    """An S3 problem phrased as one line: what, where, what to do."""


class ConflictError(StoreError):
    """A conditional write lost: someone else changed the object first."""


class AWSError(DeployError):
    """An AWS problem phrased as one line: what, where, what to do."""


class SigningError(DeployError):
    """A signature could not be made or did not verify; one line saying which key and why."""


class HostError(DeployError):
    """Something went wrong on one host; carries the data needed to act on it."""

    def __init__(
        self,
        host: str,
        message: str,
        *,
        command: str | None = None,
        exit_code: int | None = None,
        output: str = "",
        data: dict[str, Any] | None = None,
        session_ended: bool = False,
    ) -> None:
        super().__init__(message)
        self.host = host
        self.message = message
        self.data = data or {}  # what the host reported before failing (releases, commits)
        # The command's session died or timed out after it started: what a reboot looks like.
        self.session_ended = session_ended
        self.command = command
        self.exit_code = exit_code
        self.output = output

    def tail(self, lines: int = 8) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])

    def __str__(self) -> str:
        return self.message
