"""The node checks its app's health itself (health.on: node): over its own address, after a
restart, reverting in the same command; and after a reboot, when `status --after-boot` asks.

Runs on Python 3.8+ with only pytest (scripts/test runs tests/node under a real 3.8): no
fabdeploy package import, no controller packages. The "app" is a real HTTP server on loopback.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from contextlib import contextmanager, redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from node_program import node

T0 = 1_700_000_000.0


def make_cfg(tmp_path: Path, health: dict[str, Any], **overrides: Any) -> node.Config:
    raw: dict[str, Any] = {
        "app": "shop",
        "deploy_to": str(tmp_path / "srv"),
        "keep_releases": 5,
        "s3": {"bucket": "b", "prefix": "shop"},
        "lock_timeout": 0.3,
        # Long enough for a busy machine when the check should pass; tests of failures shorten it.
        "health": {"timeout": 10, "interval": 0.05, **health},
    }
    raw.update(overrides)
    path = tmp_path / "node.json"
    path.write_text(json.dumps(raw))
    return node.load_config(str(path))


def deploy(cfg: node.Config, tmp_path: Path, commit: str, **kw: Any) -> dict[str, Any]:
    path = tmp_path / f"bundle-{commit}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        data = f"print({commit!r})".encode()
        ti = tarfile.TarInfo("./app.py")
        ti.size, ti.mode, ti.mtime = len(data), 0o644, int(T0)
        tf.addfile(ti, io.BytesIO(data))
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return node.activate(
        cfg, sha256=sha, commit=commit, source=node.Source("file", str(path)), user="alice", **kw
    )


class App:
    """A loopback HTTP app whose /health answers what `running` (the restarted revision) decides."""

    def __init__(self, bind: str = "127.0.0.1") -> None:
        self.running = Path(os.devnull)
        self.bad = {"c2"}
        self.hits = 0
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                app.hits += 1
                rev = app.running.read_text().strip() if app.running.is_file() else ""
                code = 200 if self.path == "/health" and rev not in app.bad else 503
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((bind, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def app_on(bind: str = "127.0.0.1"):
    a = App(bind)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture(autouse=True)
def _no_ssh_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_CONNECTION", raising=False)


def restart_cmd(tmp_path: Path) -> str:
    """The app's restart: records which revision now runs (and every restart, in order)."""
    return f'echo "$REVISION" > {tmp_path / "running"}; echo "$REVISION" >> {tmp_path / "restarts"}'


# ------------------------------------------------------------------------------------------


def test_host_placeholder_is_the_address_sshd_was_reached_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert node.own_address() == "127.0.0.1"  # no SSH (the boot unit): loopback
    monkeypatch.setenv("SSH_CONNECTION", "10.0.0.9 50000 127.0.0.2 22")
    assert node.own_address() == "127.0.0.2"
    monkeypatch.setenv("SSH_CONNECTION", "fd00::9 50000 fd00::5 22")
    assert node.own_address() == "[fd00::5]"
    # An app listening only on that address is found through {host}; on loopback it is not.
    with app_on("127.0.0.2") as app:
        cfg = make_cfg(tmp_path, {"url": f"http://{{host}}:{app.port}/health"})
        layout = node.Layout(cfg.deploy_to)
        monkeypatch.setenv("SSH_CONNECTION", "10.0.0.9 50000 127.0.0.2 22")
        h = node.check_health(cfg, layout, str(tmp_path))
        assert h["ok"] and f"http://127.0.0.2:{app.port}/health answered 200" == h["detail"]
        monkeypatch.delenv("SSH_CONNECTION")
        cfg.health.timeout = 0.3
        h = node.check_health(cfg, layout, str(tmp_path))
        assert not h["ok"] and f"http://127.0.0.1:{app.port}/health unreachable" in h["detail"]


def test_check_polls_until_healthy_and_ignores_http_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that does not exist: a check that went through it would never pass.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with app_on() as app:
        running = tmp_path / "running"
        running.write_text("c2\n")  # unhealthy at first
        app.running = running
        cfg = make_cfg(tmp_path, {"url": f"http://{{host}}:{app.port}/health", "timeout": 5})
        sleeps: list[float] = []

        def sleep(s: float) -> None:
            sleeps.append(s)
            if len(sleeps) == 3:
                running.write_text("c3\n")  # the app finished starting

        h = node.check_health(cfg, node.Layout(cfg.deploy_to), str(tmp_path), sleep=sleep)
        assert h["ok"] and app.hits == 4
        # Fast first probes, backing off to health.interval.
        assert sleeps == [0.01, 0.02, 0.04]


def test_probes_stay_close_together_for_two_seconds_then_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A roll waits for each host's check in turn: an app that needs 1.3 s to start is seen
    within 50 ms of it, not up to a whole interval later; an app that takes long gets probed
    every health.interval after the first two seconds."""
    with app_on() as app:
        running = tmp_path / "running"
        running.write_text("c2\n")  # never healthy
        app.running = running
        cfg = make_cfg(
            tmp_path,
            {"url": f"http://{{host}}:{app.port}/health", "timeout": 4, "interval": 0.2},
        )
        clock = [1000.0]

        class FakeTime:
            @staticmethod
            def monotonic() -> float:
                return clock[0]

        sleeps: list[float] = []

        def sleep(s: float) -> None:
            sleeps.append(s)
            clock[0] += s

        monkeypatch.setattr(node, "time", FakeTime)
        h = node.check_health(cfg, node.Layout(cfg.deploy_to), str(tmp_path), sleep=sleep)
        assert not h["ok"] and "health check failed after 4s" in h["detail"]
        at = [sum(sleeps[: i + 1]) for i in range(len(sleeps))]
        fast = [sleeps[i] for i in range(len(sleeps)) if at[i] - sleeps[i] < node.HEALTH_FAST_FOR]
        assert sleeps[:4] == [0.01, 0.02, 0.04, 0.05] and max(fast) == 0.05
        assert sleeps[-1] == 0.2 and sorted(sleeps) == sleeps  # then backs off, never faster
        assert len(sleeps) < 60  # 4 s of waiting: ~40 fast probes, then every 0.2 s


def test_expect_status_and_timeout(tmp_path: Path) -> None:
    with app_on() as app:
        cfg = make_cfg(
            tmp_path,
            {"url": f"http://{{host}}:{app.port}/health", "expect_status": 204, "timeout": 0.2},
        )
        h = node.check_health(cfg, node.Layout(cfg.deploy_to), str(tmp_path))
        assert not h["ok"] and h["detail"].startswith("health check failed after 0s on ")
        assert h["detail"].endswith(f"http://127.0.0.1:{app.port}/health answered 200")
        assert 0.2 <= h["seconds"] < 3


def test_unhealthy_release_is_reverted_in_the_same_command(tmp_path: Path) -> None:
    with app_on() as app:
        app.running = tmp_path / "running"
        cfg = make_cfg(
            tmp_path, {"url": f"http://{{host}}:{app.port}/health"}, restart=restart_cmd(tmp_path)
        )
        layout = node.Layout(cfg.deploy_to)
        first = deploy(cfg, tmp_path, "c1", now=lambda: T0, restart=True)
        assert first["health"]["ok"]
        cfg.health.timeout = 0.3
        with pytest.raises(node.NodeError) as err:
            deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1, restart=True)
        msg = err.value.message
        assert msg.startswith("health check failed after") and msg.endswith(
            f"answered 503; put back on {first['release']}"
        )
        # Back on the previous release, restarted, logged the way a rollback is.
        assert node.read_current(layout).release == first["release"]  # type: ignore[union-attr]
        assert (tmp_path / "restarts").read_text().split() == ["c1", "c2", "c1"]
        assert Path(layout.revisions_log).read_text().splitlines()[-1] == (
            f"alice rolled back to release {first['release']}"
        )
        assert err.value.extra["current"] == first["release"] and err.value.extra["commit"] == "c2"
        assert not os.path.exists(os.path.join(layout.state, node.RESTART_MARKER))
        saved = node.read_status(layout)
        assert saved["last"]["outcome"] == "failed" and saved["last_health"]["ok"] is False


def test_first_release_unhealthy_has_nothing_to_go_back_to(tmp_path: Path) -> None:
    with app_on() as app:
        app.running = tmp_path / "running"
        cfg = make_cfg(
            tmp_path,
            {"url": f"http://{{host}}:{app.port}/health", "timeout": 0.3},
            restart=restart_cmd(tmp_path),
        )
        with pytest.raises(node.NodeError, match="no previous release to go back to"):
            deploy(cfg, tmp_path, "c2", restart=True)


def test_command_check_runs_in_the_release(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        {"command": 'echo "checking $REVISION in $PWD"; test "$REVISION" != c2'},
        restart="true",
    )
    layout = node.Layout(cfg.deploy_to)
    first = deploy(cfg, tmp_path, "c1", now=lambda: T0, restart=True)
    cfg.health.timeout = 0.3
    assert first["health"] == {
        "ok": True,
        "detail": '`echo "checking $REVISION in $PWD"; test "$REVISION" != c2` exited 0',
        "seconds": first["health"]["seconds"],
    }
    with pytest.raises(node.NodeError) as err:
        deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1, restart=True)
    assert "exited 1: checking c2 in " in err.value.message
    assert node.read_current(layout).commit == "c1"  # type: ignore[union-attr]


def test_no_check_on_the_node_when_the_controller_does_it(tmp_path: Path) -> None:
    with app_on() as app:
        app.running = tmp_path / "running"
        cfg = make_cfg(
            tmp_path,
            {"url": f"http://{{host}}:{app.port}/health", "on": "controller"},
            restart=restart_cmd(tmp_path),
        )
        deploy(cfg, tmp_path, "c1", now=lambda: T0, restart=True)
        second = deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1, restart=True)
        assert "health" not in second and app.hits == 0
        assert node.read_current(node.Layout(cfg.deploy_to)).commit == "c2"  # type: ignore[union-attr]


def test_rollback_checks_health_but_does_not_revert_again(tmp_path: Path) -> None:
    with app_on() as app:
        app.running = tmp_path / "running"
        app.bad = {"c1"}
        cfg = make_cfg(
            tmp_path,
            {"url": f"http://{{host}}:{app.port}/health", "on": "controller"},
            restart=restart_cmd(tmp_path),
        )
        first = deploy(cfg, tmp_path, "c1", now=lambda: T0, restart=True)
        deploy(cfg, tmp_path, "c2", now=lambda: T0 + 1, restart=True)
        cfg = make_cfg(
            tmp_path,
            {"url": f"http://{{host}}:{app.port}/health", "timeout": 0.3},
            restart=restart_cmd(tmp_path),
        )
        with pytest.raises(node.NodeError) as err:
            node.rollback(cfg, restart=True, user="bob")
        assert err.value.message.startswith(
            f"rolled back to {first['release']} but health check failed"
        )
        assert node.read_current(node.Layout(cfg.deploy_to)).commit == "c1"  # type: ignore[union-attr]
        app.bad = set()
        again = node.rollback(cfg, release=first["release"], restart=True, user="bob")
        assert again["health"]["ok"] and again["changed"] is False


def test_status_after_a_reboot_waits_for_the_boot_unit_then_checks_health(tmp_path: Path) -> None:
    with app_on() as app:
        running = tmp_path / "running"
        running.write_text("c1\n")
        app.running = running
        cfg = make_cfg(tmp_path, {"url": f"http://{{host}}:{app.port}/health"})
        layout = node.Layout(cfg.deploy_to)
        deploy(cfg, tmp_path, "c1")
        me = node.boot_id()
        # Still the old boot: answers at once, no check.
        st = node.status(cfg, after_boot=me, wait=30)
        assert st["health"] is None and app.hits == 0
        # A new boot whose boot unit has not recorded anything yet: waits (bounded), no check.
        slept: list[float] = []
        st = node.status(cfg, after_boot="old-boot", wait=0.2, sleep=slept.append)
        assert st["health"] is None and slept and app.hits == 0

        # The boot unit records its outcome while status waits; then the app is checked.
        def boot_finishes(s: float) -> None:
            node.record_status(layout, "last_boot", {"outcome": "unchanged", "commit": "c1"})

        st = node.status(cfg, after_boot="old-boot", wait=30, sleep=boot_finishes)
        assert st["last_boot"]["boot_id"] == me and st["health"]["ok"] and app.hits == 1
        assert node.status(cfg)["last_health"]["ok"] is True  # recorded where status reads it
        # A boot that kept the old release is not health-checked: the roll fails it on the commit.
        node.record_status(layout, "last_boot", {"outcome": "kept", "commit": "c1"})
        assert node.status(cfg, after_boot="old-boot", wait=30)["health"] is None


def test_status_cli_takes_after_boot(tmp_path: Path) -> None:
    with app_on() as app:
        cfg = make_cfg(tmp_path, {"url": f"http://{{host}}:{app.port}/health"})
        node.record_status(node.Layout(cfg.deploy_to), "last_boot", {"outcome": "failed"})
        out = io.StringIO()
        with redirect_stdout(out):
            code = node.main(
                [
                    "--config",
                    str(tmp_path / "node.json"),
                    "status",
                    "--after-boot",
                    "x",
                    "--wait",
                    "0",
                ]
            )
        answer = json.loads(out.getvalue().strip().splitlines()[-1])
        assert code == 0 and answer["ok"] and answer["health"] is None
        assert answer["last_boot"]["outcome"] == "failed"


class FakeS3:
    def __init__(self) -> None:
        self.puts: list[dict[str, Any]] = []

    def put_object(self, **kw: Any) -> dict[str, Any]:
        self.puts.append(kw)
        return {"ETag": '"e"'}


def test_report_puts_the_boot_outcome_and_health_in_s3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a boot the node reports what `status --after-boot` would answer, under nodes/."""
    with app_on() as app:
        running = tmp_path / "running"
        running.write_text("c1\n")
        app.running = running
        cfg = make_cfg(tmp_path, {"url": f"http://{{host}}:{app.port}/health"}, report=True)
        deploy(cfg, tmp_path, "c1")
        node.record_status(
            node.Layout(cfg.deploy_to), "last_boot", {"outcome": "unchanged", "commit": "c1"}
        )
        s3 = FakeS3()
        monkeypatch.setattr(node, "s3_client", lambda c: s3)
        out = node.report(cfg)
    assert out["ok"] and out["key"] == f"shop/nodes/{node.hostname()}.json"
    assert node.status(cfg)["report_key"] == out["key"]
    (put,) = s3.puts
    assert put["Bucket"] == "b" and put["Key"] == out["key"]
    body = json.loads(put["Body"])
    assert body["boot_id"] == node.boot_id() and body["last_boot"]["boot_id"] == node.boot_id()
    assert body["health"]["ok"] is True and body["current"]["commit"] == "c1"


def test_report_failure_is_one_line_and_no_report_key_when_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(tmp_path, {}, report=True)
    node.record_status(node.Layout(cfg.deploy_to), "last_boot", {"outcome": "failed"})

    class Denied:
        def put_object(self, **kw: Any) -> None:
            raise RuntimeError("An error occurred (AccessDenied) when calling PutObject\nline 2")

    monkeypatch.setattr(node, "s3_client", lambda c: Denied())
    with pytest.raises(node.NodeError) as e:
        node.report(cfg)
    assert "AccessDenied" in e.value.message and "\n" not in e.value.message
    assert "s3:PutObject" in e.value.message
    assert node.status(make_cfg(tmp_path, {}))["report_key"] is None


def test_boot_starts_the_report_only_when_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    monkeypatch.setattr(node, "spawn_report", started.append)
    monkeypatch.setattr(node, "boot", lambda cfg: {"ok": True, "outcome": "unchanged"})
    for report in (False, True):
        make_cfg(tmp_path, {}, report=report)
        with redirect_stdout(io.StringIO()):
            assert node.main(["--config", str(tmp_path / "node.json"), "boot"]) == 0
    assert started == [str(tmp_path / "node.json")]


def test_the_boot_report_checks_health_on_the_address_ssh_last_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report runs with no SSH: `{host}` is the address a roll's status call came in on."""
    cfg = make_cfg(tmp_path, {}, report=True)
    deploy(cfg, tmp_path, "c1")
    layout = node.Layout(cfg.deploy_to)
    monkeypatch.delenv("SSH_CONNECTION", raising=False)
    assert node.own_address(layout) == "127.0.0.1"
    monkeypatch.setenv("SSH_CONNECTION", "10.0.0.9 50000 10.0.0.5 22")
    node.status(cfg)
    monkeypatch.delenv("SSH_CONNECTION")
    assert node.own_address(layout) == "10.0.0.5"
    (tmp_path / "srv" / ".fabdeploy" / "address").write_text("not an address\n")
    assert node.own_address(layout) == "127.0.0.1"  # anything but an IP address is ignored
