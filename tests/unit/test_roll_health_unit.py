"""The roll reads a rebooted host's health from its node's status answer (health.on: node),
and a session its rebooting host dropped closes quietly, SFTP client and all."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from fabdeploy.basics.config import Config, HealthConfig, Host, S3Config
from fabdeploy.basics.errors import HostError
from fabdeploy.ops import roll

HOST = Host("web1", "web1")


class DroppedConn:
    """What a rebooted host leaves: closing its SFTP client fails to send (paramiko's EOFError)."""

    closed = 0

    def close(self) -> None:
        DroppedConn.closed += 1
        raise EOFError()


def cfg(tmp_path: Path, **health: Any) -> Config:
    return Config(
        path=tmp_path / "deploy.yml",
        app="shop",
        repo=tmp_path,
        s3=S3Config("b", "shop"),
        deploy_to="/srv/shop",
        hosts=(HOST,),
        restart="true",
        health=HealthConfig(url="http://{host}:8080/health", **health),
    )


def reboot(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    health: dict[str, Any] | None,
    **cfg_health: Any,
) -> roll.HostRoll:
    def fake_run(cfg: Any, host: Host, conn: Any, cmd: str, **kw: Any) -> Any:
        raise HostError(host.name, "connection lost", session_ended=True)  # the reboot

    status = {
        "boot_id": "b2",
        "last_boot": {"boot_id": "b2", "outcome": "activated"},
        "current": {"ok": True, "release": "20260101000001", "commit": "c2"},
        "health": health,
    }
    monkeypatch.setattr(roll, "run", fake_run)
    monkeypatch.setattr(roll, "_wait_back", lambda cfg, host, old, start: ("b2", status))
    prepared = roll.Prepared(
        DroppedConn(), {"boot_id": "b1", "current": {"ok": True, "commit": "c1"}}
    )
    return roll.reboot_one(
        cfg(tmp_path, **cfg_health), HOST, "c2", 0.0, resume=False, prepared=prepared
    )


def test_healthy_as_the_node_reported_it_and_the_dropped_session_closes_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        roll, "wait_healthy", lambda *a, **kw: pytest.fail("no HTTP check from here")
    )
    before = DroppedConn.closed
    res = reboot(
        tmp_path, monkeypatch, {"ok": True, "detail": "http://10.0.0.5:8080/health answered 200"}
    )
    assert res.ok and res.new["commit"] == "c2" and DroppedConn.closed == before + 1


def test_unhealthy_as_the_node_reported_it_stops_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(
        HostError, match=r"web1 is on c2 but health check failed after 3s on web1: .* answered 404"
    ):
        reboot(
            tmp_path,
            monkeypatch,
            {
                "ok": False,
                "detail": "health check failed after 3s on web1: "
                "http://10.0.0.5:8080/health answered 404",
            },
        )
    with pytest.raises(HostError, match="reported no health check for this boot"):
        reboot(tmp_path, monkeypatch, None)


def test_controller_side_check_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fabdeploy.adapters.health import Health

    probed: list[str] = []

    def wait_healthy(cfg: Config, address: str, timeout: float | None = None) -> Health:
        probed.append(address)
        return Health(True, "answered 200", 0.01)

    monkeypatch.setattr(roll, "wait_healthy", wait_healthy)
    monkeypatch.setattr(roll, "connect", lambda cfg, host: type("C", (), {"host": "10.0.0.5"})())
    res = reboot(tmp_path, monkeypatch, None, on="controller")
    assert res.ok and probed == ["10.0.0.5"]  # its ssh_config HostName
    assert (
        dataclasses.replace(cfg(tmp_path), health=HealthConfig()).health.on == "node"
    )  # the default


def test_a_restart_checked_on_the_node_gets_the_health_timeout_on_top(tmp_path: Path) -> None:
    from fabdeploy.adapters import nodectl

    c = cfg(tmp_path, timeout=7)
    assert (
        nodectl.call_timeout(c, HOST, ("activate", "--restart"), None) == c.ssh.command_timeout + 7
    )
    assert nodectl.call_timeout(c, HOST, ("status",), None) is None  # ssh.command_timeout
    assert (
        nodectl.call_timeout(c, HOST, ("rollback", "--restart"), 30) == 30
    )  # the caller's own bound
    assert (
        nodectl.call_timeout(cfg(tmp_path, on="controller"), HOST, ("activate", "--restart"), None)
        is None
    )
