#!/usr/bin/python3
"""PID 1 of a sandbox host (see fabfile/sandbox.py). Stdlib only; runs under /usr/bin/python3.

Started by the controller as
    unshare --mount --pid --uts --fork --mount-proc --kill-child \
        /usr/bin/python3 host_init.py --name web1 --ip 127.0.10.1 --host-dir DIR/hosts/web1 ...

Once: set the hostname, mount the private /etc and /usr/local (overlays), /srv (bind) and the
boot id file. Then boot: new boot id, fresh /run, enabled units (oneshot in order, then simple),
sshd; record the boot in boots.jsonl. SIGINT (sent by `systemctl reboot`) reboots the host:
everything else in the PID namespace is killed, the host stays down for the reboot delay (and
while HOST_DIR/hold exists), then boots again. SIGTERM shuts the host down for good.

boots.jsonl: one line per boot; down_at is when the previous run had been fully stopped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import FrameType, ModuleType

HERE = Path(__file__).resolve().parent
STOP_GRACE = 1.5
SSHD_READY_TIMEOUT = 15.0


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} init: {message}", flush=True)


def load_systemctl() -> ModuleType:
    # The systemctl stand-in's logic, next to this file (the `systemctl` command imports it too).
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("systemctl_impl")


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


DEPLOY_USER = "deploy"


def add_deploy_user() -> None:
    """A non-root deploy user, its home in /run like root's (e2e deploys as it too). Its sudo
    rights are the drop-in sandbox.py writes into the host's /etc/sudoers.d."""
    passwd, group, shadow = Path("/etc/passwd"), Path("/etc/group"), Path("/etc/shadow")
    text = passwd.read_text()
    if any(line.startswith(DEPLOY_USER + ":") for line in text.splitlines()):
        return
    used = {
        int(line.split(":")[2])
        for f in (text, group.read_text())
        for line in f.splitlines()
        if line.count(":") >= 3 and line.split(":")[2].isdigit()
    }
    uid = next(n for n in range(1500, 60000) if n not in used)
    with passwd.open("a") as f:
        f.write(
            f"{DEPLOY_USER}:x:{uid}:{uid}:fabdeploy sandbox deploy user:/run/{DEPLOY_USER}:/bin/sh\n"
        )
    with group.open("a") as f:
        f.write(f"{DEPLOY_USER}:x:{uid}:\n")
    if shadow.exists():
        with shadow.open("a") as f:
            f.write(f"{DEPLOY_USER}:*:20000:0:99999:7:::\n")


class Host:
    def __init__(self, name: str, ip: str, host_dir: Path, reboot_delay: float) -> None:
        self.name = name
        self.ip = ip
        self.dir = host_dir
        self.default_reboot_delay = reboot_delay
        self.log_dir = host_dir / "log"
        self.boot_id_file = host_dir / "boot_id"
        self.systemctl = load_systemctl()
        self.reboot_requested = False
        self.poweroff_requested = False
        self._wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        # A Python-level SIGCHLD handler makes child exits wake the main loop for reaping.
        signal.signal(signal.SIGCHLD, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.reboot_requested = True
        elif signum == signal.SIGTERM:
            self.poweroff_requested = True

    def setup(self) -> None:
        socket.sethostname(self.name)
        mount("--make-rprivate", "/")
        for target, key in (("/etc", "etc"), ("/usr/local", "usr_local")):
            upper, work = self.dir / key / "upper", self.dir / key / "work"
            opts = f"lowerdir={target},upperdir={upper},workdir={work}"
            mount("-t", "overlay", f"sandbox-{key}", "-o", opts, target)
        # root's home on a host is its own (in /run, fresh per boot), not the machine's
        # /root: the operator's shell rc (pyenv and friends) would otherwise run on every
        # ssh command, and a real host's root has its own home anyway.
        passwd = Path("/etc/passwd")
        passwd.write_text(
            "".join(
                ("root:x:0:0:root:/run/root:/bin/sh\n" if line.startswith("root:") else line)
                for line in passwd.read_text().splitlines(True)
            )
        )
        add_deploy_user()
        self.boot_id_file.touch()
        mount("--bind", str(self.boot_id_file), "/proc/sys/kernel/random/boot_id")
        # Last: if the state dir were under /srv it would vanish here (sandbox.up refuses that).
        mount("--bind", str(self.dir / "srv"), "/srv")

    def run(self) -> int:
        self.setup()
        down_at: float | None = None
        requested_at: float | None = None
        booted = False
        while True:
            self.boot(down_at, remount_run=booted, requested_at=requested_at)
            booted = True
            while not (self.reboot_requested or self.poweroff_requested):
                self.wait(None)
            requested_at = time.time()
            # Let the ssh session that asked for the reboot usually get its exit status.
            self.wait(0.05)
            self.stop_all()
            down_at = time.time()
            if self.poweroff_requested:
                log("powered off")
                return 0
            log("down for reboot")
            deadline = time.monotonic() + self.reboot_delay()
            while not self.poweroff_requested and (
                time.monotonic() < deadline or (self.dir / "hold").exists()
            ):
                self.wait(max(0.0, min(0.05, deadline - time.monotonic())) or 0.05)
            if self.poweroff_requested:
                return 0

    def reboot_delay(self) -> float:
        try:
            return float((self.dir / "reboot_delay").read_text().strip())
        except (OSError, ValueError):
            return self.default_reboot_delay

    def wait(self, timeout: float | None) -> None:
        """Sleep until a signal arrives or timeout passes, reaping orphans that reparent to us."""
        select.select([self._wakeup_r], [], [], timeout)
        try:
            while os.read(self._wakeup_r, 512):
                pass
        except BlockingIOError:
            pass
        self.reap()

    @staticmethod
    def reap() -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    @staticmethod
    def others() -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and p != "1"]

    def stop_all(self) -> None:
        # kill(-1) from a PID namespace's init reaches every other process in the namespace.
        for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5.0)):
            try:
                os.kill(-1, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while self.others() and time.monotonic() < deadline:
                self.wait(0.02)
            if not self.others():
                return

    def boot(
        self, down_at: float | None, remount_run: bool, requested_at: float | None = None
    ) -> None:
        boot_start = time.time()
        self.reboot_requested = False
        boot_id = str(uuid.uuid4())
        # Rewrite in place: the bind mount follows the inode, so no atomic rename here.
        with self.boot_id_file.open("w") as f:
            f.write(boot_id + "\n")
        if remount_run:
            subprocess.run(["umount", "--lazy", "/run"], check=False)
        mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", "/run")
        for d in ("sshd", "lock", "sandbox-units"):
            os.makedirs(f"/run/{d}", mode=0o755, exist_ok=True)
        os.makedirs("/run/root", mode=0o700, exist_ok=True)
        deploy = pwd.getpwnam(DEPLOY_USER)
        os.makedirs(deploy.pw_dir, mode=0o700, exist_ok=True)
        os.chown(deploy.pw_dir, deploy.pw_uid, deploy.pw_gid)
        self.log_dir.mkdir(exist_ok=True)
        info = {
            "name": self.name,
            "ip": self.ip,
            "host_dir": str(self.dir),
            "log_dir": str(self.log_dir),
        }
        self.systemctl.write_host_info(info)
        log(f"booting {self.name} (boot id {boot_id})")
        self.start_units()
        units_done = time.time()
        self.start_sshd()
        sshd_ready = self.wait_sshd()
        record = {
            "boot_id": boot_id,
            "reboot_requested_at": requested_at,  # shutdown took down_at - this
            "down_at": down_at,
            "boot_start": boot_start,
            "units_done": units_done,
            "sshd_ready": sshd_ready,
        }
        with (self.dir / "boots.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"up in {sshd_ready - boot_start:.3f}s")

    def start_units(self) -> None:
        sc = self.systemctl
        names = list(sc.enabled_units())
        units = []
        seen: set[str] = set()
        while names:
            name = names.pop(0)
            if name in seen:
                continue
            seen.add(name)
            try:
                unit = sc.load_unit(name)
            except sc.UnitError as e:
                log(f"skipping {name}: {e}")
                continue
            units.append(unit)
            names.extend(n for n in unit.wants if os.path.isfile(f"{sc.UNIT_DIR}/{n}"))
        for kind in ("oneshot", "simple"):
            for unit in sc.boot_order([u for u in units if u.type == kind]):
                try:
                    code = sc.start(unit)
                except Exception as e:  # a broken unit must not stop the boot
                    log(f"{unit.name} failed to start: {e}")
                    continue
                log(f"{unit.name}: {'started' if kind == 'simple' else f'exited {code}'}")

    def start_sshd(self) -> None:
        with (self.log_dir / "sshd.log").open("ab") as out:
            subprocess.Popen(
                [
                    "/usr/sbin/sshd",
                    "-D",
                    "-f",
                    str(self.dir / "sshd_config"),
                    "-E",
                    str(self.log_dir / "sshd.log"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_sshd(self) -> float:
        deadline = time.monotonic() + SSHD_READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.ip, 22), timeout=1.0) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        s.sendall(b"SSH-2.0-sandbox-probe\r\n")  # else sshd logs an error
                        return time.time()
            except OSError:
                pass
            self.wait(0.005)
        log(
            f"sshd did not answer on {self.ip}:22 within {SSHD_READY_TIMEOUT}s; see {self.log_dir / 'sshd.log'}"
        )
        return time.time()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--ip", required=True)
    parser.add_argument("--host-dir", required=True, type=Path)
    parser.add_argument("--reboot-delay", type=float, default=1.0)
    args = parser.parse_args()
    if os.getpid() != 1:
        print(
            "host_init.py must run as PID 1 of a new PID namespace (see sandbox.py)",
            file=sys.stderr,
        )
        return 2
    return Host(args.name, args.ip, args.host_dir.resolve(), args.reboot_delay).run()


if __name__ == "__main__":
    sys.exit(main())
