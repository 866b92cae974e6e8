"""Hook output streamed to the deploying terminal: whole lines, prefixed by the host name,
as they arrive, never mixed with the node program's JSON answer on stdout."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import invoke
import pytest

from fabdeploy.adapters import nodectl, ssh
from fabdeploy.basics import output
from fabdeploy.basics.config import Host
from tests.unit.test_fleet import make_cfg


def test_line_sink_hands_on_whole_lines_across_chunks() -> None:
    got: list[str] = []
    sink = ssh.LineSink(got.append)
    for chunk in ("fabdeploy-node: before_swap | migr", "ating…\r\nsecond", " line\nthi", "rd"):
        sink.write(chunk)
    assert got == ["fabdeploy-node: before_swap | migrating…", "second line"]
    sink.close()  # a last line without its newline still comes out, once
    sink.close()
    assert got[-1] == "third" and len(got) == 3


def test_relay_shows_hook_lines_only_prefixed_by_the_host() -> None:
    shown: list[tuple[str, str]] = []
    relay = nodectl.hook_relay(
        Host("web2", "10.0.0.2"), show=lambda h, line: shown.append((h, line))
    )
    for line in (
        "fabdeploy-node: before_swap: bin/migrate",  # the node's own log line: not hook output
        "fabdeploy-node: before_swap | migrating 3 tables",
        "fabdeploy-node: after_restart | warm | ok",
        "fabdeploy-node: restart | Job for shop.service started",  # the restart's: not a hook's
        "fabdeploy-node: current -> /srv/shop/releases/1",
        "Traceback (most recent call last):",
    ):
        relay(line)
    assert shown == [("web2", "migrating 3 tables"), ("web2", "warm | ok")]


def test_host_lines_from_many_threads_never_interleave(capsys: pytest.CaptureFixture[str]) -> None:
    def talk(host: str) -> None:
        for i in range(200):
            output.host_line(host, f"line {i} " + "x" * 50)

    threads = [threading.Thread(target=talk, args=(f"web{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 800
    assert all(ln.startswith("web") and ln.endswith("x" * 50) for ln in lines)


class LocalConn:
    """Runs the command locally with invoke's own runner: the same hide/err_stream handling
    Fabric's remote runner has."""

    host, port, gateway = "127.0.0.1", 22, None

    def run(self, command: str, **kw: Any) -> Any:
        return invoke.Context().run(command, **kw)


def test_run_streams_stderr_lines_while_the_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssh, "open_connection", lambda *a: None)
    cfg = make_cfg(tmp_path)
    flag = tmp_path / "seen"
    got: list[str] = []

    def on_line(line: str) -> None:
        got.append(line)
        flag.touch()  # the command only finishes once the first line was seen here

    r = ssh.run(
        cfg,
        cfg.hosts[0],
        LocalConn(),  # type: ignore[arg-type]
        f"echo 'fabdeploy-node: before_swap | one' >&2; "
        f"while [ ! -e {flag} ]; do sleep 0.01; done; echo '{{\"ok\": true}}'; printf tail >&2",
        timeout=20,
        on_stderr_line=on_line,
    )
    assert got == ["fabdeploy-node: before_swap | one", "tail"]
    assert r.exit_code == 0 and r.stdout == '{"ok": true}\n'  # the answer stays on stdout alone
    assert r.stderr == "fabdeploy-node: before_swap | one\ntail"  # and stderr is still collected
