"""A deploy user whose sudo needs a password, typed at `fab --prompt-for-sudo-password`'s prompt
(through a real pty, as at a terminal): it reaches sudo on the node over stdin, never argv.

web1's drop-in loses NOPASSWD and `deploy` gets a password; sudo logs what it runs. Without the
password a hotfix is refused in one line before anything changes; with it the restart goes
through sudo (its log says so) and no process on the host ever had the password in its
command line (a snapshot of every /proc/*/cmdline taken by the health check, while the node
program is still running, and `fab -e`'s echo of every remote command); a wrong password is
one line, not a hang, and the host keeps its release.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
import time

import pytest
from fleet_helpers import FAB, REPO, Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

PASSWORD = "pw-Zq81-never-in-argv"
PROMPT = "Desired 'sudo.password' config value: "
RESTART = "/usr/local/bin/systemctl restart shop"
SNAPSHOT = "/tmp/cmdlines-during-hotfix"
SUDO_LOG = "/var/log/sudo-fabdeploy.log"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("sudopw"), subnet="127.0.46", hosts=1)
    yield f
    sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def cfg(fleet: Fleet):
    # The health check also snapshots every process's command line while the node program
    # (which runs it after the restart) and its SSH session are alive.
    snap = (
        "for f in /proc/[0-9]*/cmdline; do tr '\\000' ' ' < $f; echo; done > "
        f"{SNAPSHOT} 2>/dev/null; true"
    )
    return fleet.variant(
        "sudopw",
        ssh={"user": "deploy", "sudo": True, "admin_user": "root"},
        restart=RESTART,
        reboot="/usr/local/bin/systemctl reboot",
        health={"command": snap},
    )


def flat(text: str) -> str:
    return " ".join(w for w in text.split() if w not in "│┃")


def fab_at_a_terminal(
    fleet: Fleet, config, *args: str, password: str, timeout: float = 120
) -> tuple[int, str]:
    """`fab --prompt-for-sudo-password ARGS` in a pty (util-linux `script`); the password is
    typed once the prompt shows (getpass flushes anything typed earlier)."""
    cmd = shlex.join([FAB, "--prompt-for-sudo-password", *args])
    p = subprocess.Popen(
        ["script", "-qec", cmd, "/dev/null"],
        cwd=REPO,
        env=fleet.env(config),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = bytearray()

    def pump() -> None:
        assert p.stdout is not None
        while chunk := p.stdout.read1(65536):
            out.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        wait_for(lambda: PROMPT.encode() in out, 60, what="the sudo password prompt")
        assert p.stdin is not None
        p.stdin.write(password.encode() + b"\n")
        p.stdin.flush()
        p.wait(timeout)  # never a hang on a prompt: bounded
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        reader.join(10)
        if p.stdin:
            p.stdin.close()
    return p.returncode, out.decode(errors="replace")


def test_a_sudo_password_reaches_sudo_on_stdin_only(fleet: Fleet, cfg) -> None:
    fleet.fab("deploy.setup", config=cfg)
    fleet.fab("deploy.hotfix", config=cfg)  # NOPASSWD still: a release to start from
    fleet.ssh(
        "web1",
        f"echo 'deploy:{PASSWORD}' | chpasswd && sed -i 's/NOPASSWD: //' "
        "/etc/sudoers.d/fabdeploy-shop && printf '%s\\n' "
        f"'Defaults:deploy timestamp_timeout=0, passwd_tries=1' 'Defaults logfile={SUDO_LOG}' "
        "> /etc/sudoers.d/zz-sandbox-log && chmod 0440 /etc/sudoers.d/zz-sandbox-log && "
        "visudo -cq",
    )
    before = fleet.current("web1")

    # No password given: the restart right is asked with sudo -n first, one line, nothing changed.
    fix = fleet.commit("needs the sudo password")
    t0 = time.monotonic()
    r = fleet.fab("deploy.hotfix", "--hosts=web1", config=cfg, check=False, timeout=120)
    assert time.monotonic() - t0 < 60 and r.returncode == 1 and "Traceback" not in r.stderr
    assert f"web1: deploy may not run `sudo {RESTART}`" in flat(r.stdout + r.stderr), r.stderr
    assert fleet.current("web1") == before
    check = fleet.fab("deploy.check", config=cfg, check=False)
    assert check.returncode == 1 and "(sudo -n -l)" in flat(check.stdout)

    # The right password at the prompt: deploy.check passes, then the hotfix restarts through sudo.
    code, out = fab_at_a_terminal(fleet, cfg, "deploy.check", password=PASSWORD)
    assert code == 0 and "FAILED" not in out, out
    code, out = fab_at_a_terminal(
        fleet, cfg, "-e", "deploy.hotfix", "--hosts=web1", password=PASSWORD
    )
    assert code == 0, out
    assert fleet.revision("web1") == fix and fleet.version("web1") == fix
    assert "node.json activate" in out  # -e echoed the remote commands...
    assert PASSWORD not in out  # ...and none of them carries the password
    log = " ".join(fleet.ssh("web1", f"cat {SUDO_LOG}").split())  # sudo wraps its lines
    assert f"USER=root ; COMMAND={RESTART}" in log and PASSWORD not in log
    snapshot = fleet.ssh("web1", f"cat {SNAPSHOT}")
    assert "node.json activate" in snapshot  # taken while the node program ran
    assert PASSWORD not in snapshot

    # A wrong password: sudo is asked (sudo -S -l) before anything changes; one line, bounded.
    fleet.commit("wrong password")
    fixed = fleet.current("web1")
    t0 = time.monotonic()
    code, out = fab_at_a_terminal(fleet, cfg, "deploy.hotfix", "--hosts=web1", password="nope")
    assert code == 1 and time.monotonic() - t0 < 90, out
    assert "Traceback" not in out
    assert (
        f"web1: deploy may not run `sudo {RESTART}` (sudo: 1 incorrect password attempt): "
        "the sudo password is wrong" in flat(out)
    ), out
    assert fleet.current("web1") == fixed and fleet.version("web1") == fix  # nothing changed
