"""A deploy user with sudo only where needed: config, the commands built, the unit, the drop-in."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import yaml
from fabric import Config as FabricConfig

from fabdeploy.adapters import nodectl, ssh
from fabdeploy.basics import config
from fabdeploy.basics.config import ConfigError, Host
from fabdeploy.basics.errors import HostError

BASE = {
    "app": "shop",
    "repo": ".",
    "s3": {"bucket": "b"},
    "deploy_to": "/srv/shop",
    "hosts": ["web1"],
    "restart": "sudo systemctl restart shop",
}
DEPLOY = {"ssh": {"user": "deploy", "sudo": True}, "restart": "/usr/bin/systemctl restart shop"}


def load(tmp_path: Path, **over) -> config.Config:
    p = tmp_path / "deploy.yml"
    p.write_text(yaml.safe_dump({**BASE, **over}))
    return config.load(p)


def error(tmp_path: Path, **over) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, **over)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_sudo_needs_a_non_root_user(tmp_path: Path) -> None:
    assert "ssh.sudo needs ssh.user" in error(tmp_path, ssh={"sudo": True})
    assert "ssh.sudo needs ssh.user" in error(tmp_path, ssh={"user": "root", "sudo": True})


def test_sudo_commands_are_exact_full_paths(tmp_path: Path) -> None:
    msg = error(
        tmp_path, ssh={"user": "deploy", "sudo": True}
    )  # restart: sudo systemctl restart shop
    assert "restart must be one command with its full path" in msg
    assert "full path" in error(
        tmp_path, **{**DEPLOY, "restart": "/usr/bin/systemctl restart shop; rm -rf /"}
    )
    cfg = load(tmp_path, **{**DEPLOY, "restart": "sudo /usr/bin/systemctl restart shop"})
    assert cfg.restart == "/usr/bin/systemctl restart shop"  # its own sudo is dropped
    assert cfg.reboot == "/usr/bin/systemctl reboot"  # the default, as a full path
    assert cfg.run_as == "deploy"


def test_root_config_is_unchanged(tmp_path: Path) -> None:
    cfg = load(tmp_path, ssh={"user": "root"})
    assert cfg.run_as is None and cfg.restart == "sudo systemctl restart shop"
    assert "User=" not in nodectl.unit_text(cfg) and "sudo" not in nodectl.node_json(cfg)


def test_boot_unit_runs_as_the_deploy_user(tmp_path: Path) -> None:
    cfg = load(tmp_path, **DEPLOY, node={"app_unit": "shop.service"})
    unit = nodectl.unit_text(cfg)
    assert "\nUser=deploy\n" in unit and "\nBefore=shop.service\n" in unit
    assert nodectl.node_json(cfg)["sudo"] is True


def test_role_commands_are_exact_too_and_in_the_drop_in(tmp_path: Path) -> None:
    roles = {"worker": {"restart": "sudo /usr/bin/systemctl restart worker"}}
    cfg = load(tmp_path, **DEPLOY, roles=roles)
    assert cfg.roles["worker"].restart == "/usr/bin/systemctl restart worker"
    assert (
        "/usr/bin/systemctl restart shop, /usr/bin/systemctl reboot, /usr/bin/systemctl restart worker"
        in nodectl.sudoers(cfg)
    )
    assert "roles.worker.restart must be one command" in error(
        tmp_path, **DEPLOY, roles={"worker": {"restart": "systemctl restart worker"}}
    )


def test_sudoers_drop_in_names_exactly_restart_and_reboot(tmp_path: Path) -> None:
    cfg = load(tmp_path, **DEPLOY)
    text = nodectl.sudoers(cfg)
    assert (
        "Cmnd_Alias FABDEPLOY_SHOP = /usr/bin/systemctl restart shop, /usr/bin/systemctl reboot\n"
        in text
    )
    assert "deploy ALL=(root) NOPASSWD: FABDEPLOY_SHOP\n" in text
    rules = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert len(rules) == 2 and "ALL" not in rules[0]
    with pytest.raises(ConfigError):
        nodectl.sudoers(load(tmp_path))


def test_export_writes_the_drop_in_and_install_sh_checks_it(tmp_path: Path) -> None:
    cfg = load(tmp_path, **DEPLOY)
    names = {p.name: p for p in nodectl.export(cfg, tmp_path / "out", sudoers=True)}
    drop = names["fabdeploy-shop.sudoers"]
    assert drop.stat().st_mode & 0o777 == 0o440
    script = names["install.sh"].read_text()
    assert "visudo -cqf" in script and "/etc/sudoers.d/fabdeploy-shop" in script
    assert "chown -h deploy:" in script


def with_password(cfg: config.Config, pw: str | None) -> config.Config:
    fc = FabricConfig()
    if pw is not None:
        fc["sudo"]["password"] = pw
    return dataclasses.replace(cfg, fabric=fc)


def test_sudo_n_without_a_password_and_stdin_with_one(tmp_path: Path) -> None:
    cfg = load(tmp_path, **DEPLOY)
    assert ssh.as_root(cfg, "/usr/bin/systemctl reboot", sudo=True) == (
        "sudo -n -- /usr/bin/systemctl reboot",
        None,
    )
    assert ssh.as_root(cfg, "x", sudo=False) == ("x", None)
    cmd, stdin = ssh.as_root(with_password(cfg, "s3cret"), "/usr/bin/systemctl reboot", sudo=True)
    assert "s3cret" not in cmd and cmd.startswith("sudo -S ") and stdin == "s3cret\n"


def test_restart_is_checked_with_sudo_n_l_before_anything_changes(tmp_path: Path) -> None:
    cfg = load(tmp_path, **DEPLOY)
    cmd = nodectl.guarded(cfg, "activate", "--restart")
    assert (
        f"sudo -n -l -- /usr/bin/systemctl restart shop >/dev/null 2>&1 || {{ exit {ssh.SUDO_REFUSED}; }}"
        in cmd
    )
    assert cmd.index("sudo -n -l") < cmd.index("exec ")
    assert "sudo" not in nodectl.guarded(cfg, "status")
    assert "sudo -n -l" not in nodectl.guarded(with_password(cfg, "pw"), "activate", "--restart")


def test_a_refusal_is_one_line_naming_host_and_command() -> None:
    r = ssh.CommandResult("", "sudo: a password is required\n", 1)
    e = ssh.sudo_refusal(Host("web2", "web2"), "deploy", "/usr/bin/systemctl reboot", r)
    assert e is not None and "\n" not in e.message
    assert e.message.startswith(
        "web2: deploy may not run `sudo /usr/bin/systemctl reboot` (sudo: a password"
    )
    assert ssh.sudo_refusal(Host("w", "w"), "deploy", "x", ssh.CommandResult("", "boom", 1)) is None
    assert ssh.sudo_refusal(Host("w", "w"), "deploy", "x", ssh.CommandResult("", "", 0)) is None
    missing = ssh.sudo_refusal(
        Host("w", "w"), "deploy", "x", ssh.CommandResult("", "sh: 1: sudo: not found", 127)
    )
    assert missing is not None and "apt-get install sudo" in missing.message


def test_root_script_moves_trees_over_and_installs_as_root(tmp_path: Path) -> None:
    cfg = load(tmp_path, **DEPLOY)
    s = nodectl.root_script(cfg, "/tmp/fabdeploy-setup.abc", "f" * 64)
    assert (
        'find /srv/shop /usr/local/lib/fabdeploy/shop ! -user "$u" -exec chown -h "$u:$g" {} +'
    ) in s
    signed = nodectl.root_script(cfg, "/tmp/x", "f" * 64, signers=True)
    assert (
        "install -o root -g root -m 0644 /tmp/x/allowed_signers /etc/fabdeploy/shop/allowed_signers"
        in signed
    )
    assert "install -o root -g root -m 0644 /tmp/fabdeploy-setup.abc/unit" in s
    assert 'install -o "$u" -g "$g" -m 0600 /tmp/fabdeploy-setup.abc/node.json' in s
    assert s.index("chown -h") < s.index("systemctl daemon-reload") < s.index("systemctl enable")


def test_the_password_travels_on_stdin_before_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = with_password(load(tmp_path, **DEPLOY), "s3cret")
    sent: list[tuple[str, str | None]] = []

    def fake_run(cfg_, host, conn, command, *, timeout=None, stdin=None, on_stderr_line=None):
        sent.append((command, stdin))
        return ssh.CommandResult('{"ok": true}\n', "", 0)

    monkeypatch.setattr(nodectl, "run", fake_run)
    nodectl.call(
        cfg, Host("web1", "web1"), None, "activate", "--url-stdin", "--restart", stdin="https://u\n"
    )
    ((command, stdin),) = sent
    assert "s3cret" not in command and "--sudo-stdin" in command
    assert stdin == "s3cret\nhttps://u\n"
    sent.clear()
    nodectl.call(cfg, Host("web1", "web1"), None, "status")
    assert sent == [(sent[0][0], None)] and "--sudo-stdin" not in sent[0][0]


def test_check_reports_each_problem_and_nothing_when_all_is_well(tmp_path: Path) -> None:
    cfg = load(tmp_path, **DEPLOY, linked_files=["config/database.yml"])
    host = Host("web1", "web1")
    script = nodectl.check_script(cfg, host)
    assert script.index("sudo -n -l -- /usr/bin/systemctl restart shop") < script.index("python=ok")
    assert (
        "sudo -n -l -- /usr/bin/systemctl reboot" in script
        and "/srv/shop/shared/config/database.yml" in script
    )
    good = {
        "sudo0": "ok",
        "sudo1": "ok",
        "linked0": "ok",
        "python": "ok",
        "pyver": "3.11",
        "boto3": "ok",
        "sha": nodectl.fingerprint(cfg, host),
        "enabled": "yes",
        "user": "ok",
        "owner": "ok",
        "unit": hashlib.sha256(nodectl.unit_text(cfg).encode()).hexdigest(),
    }
    assert nodectl.check_problems(cfg, host, good) == []
    bad = {
        **good,
        "sudo1": "refused",
        "linked0": "missing",
        "pyver": "3.6",
        "boto3": "missing",
        "sha": "x",
    }
    assert nodectl.check_problems(cfg, host, bad) == [
        "deploy may not run `sudo /usr/bin/systemctl reboot` (sudo -n -l)",
        "shared/config/database.yml is missing",
        "Python 3.6 < 3.8",
        "boto3 is missing (the boot unit needs it)",
        "node program/config not current (fab deploy.setup)",
    ]


def test_a_read_never_reinstalls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load(tmp_path, **DEPLOY)
    codes = [nodectl.NEEDS_INSTALL, 0]
    sent: list[str] = []

    def fake_run(cfg_, host, conn, command, *, timeout=None, stdin=None, on_stderr_line=None):
        sent.append(command)
        return ssh.CommandResult('{"ok": true}\n', "", codes.pop(0))

    monkeypatch.setattr(nodectl, "run", fake_run)
    monkeypatch.setattr(nodectl, "install", lambda *a, **k: pytest.fail("status must not install"))
    data = nodectl.call(cfg, Host("web1", "web1"), None, "status", reinstall=False)
    assert data["outdated"] is True and "node.sha" not in sent[1] and "exit 98" in sent[1]


def test_the_reboot_right_is_asked_of_sudo_on_every_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabdeploy.ops import roll

    cfg = load(tmp_path, **DEPLOY, hosts=["web1", "web2"])
    sent: list[tuple[str, str, str | None]] = []

    def fake_parallel(cfg_, hosts, work):
        return [ssh.HostResult(h.name, True, work(h, None)) for h in hosts]

    def fake_run(cfg_, host, conn, command, *, timeout=None, stdin=None):
        sent.append((host.name, command, stdin))
        return ssh.CommandResult("", "", ssh.SUDO_REFUSED if host.name == "web2" else 0)

    monkeypatch.setattr(roll, "run_parallel", fake_parallel)
    monkeypatch.setattr(roll, "run", fake_run)
    (refused,) = roll.missing_reboot_rights(cfg, list(cfg.hosts))
    assert refused.host == "web2" and "\n" not in refused.message
    assert "web2: deploy may not run `sudo /usr/bin/systemctl reboot`" in refused.message
    assert sent[0] == (
        "web1",
        f"sudo -n -l -- /usr/bin/systemctl reboot >/dev/null 2>&1 || exit {ssh.SUDO_REFUSED}",
        None,
    )
    # With a password: sudo -S, the password on stdin only.
    sent.clear()
    cfg = with_password(cfg, "s3cret")
    roll.missing_reboot_rights(cfg, list(cfg.hosts))
    assert all("s3cret" not in c and "sudo -S" in c and s == "s3cret\n" for _, c, s in sent)
    # Root fleets (no ssh.sudo) ask nothing.
    sent.clear()
    assert roll.missing_reboot_rights(load(tmp_path), list(cfg.hosts)) == [] and sent == []


def test_with_a_password_the_restart_right_is_asked_before_anything_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = with_password(load(tmp_path, **DEPLOY), "s3cret")
    sent: list[tuple[str, str | None]] = []

    def fake_run(cfg_, host, conn, command, *, timeout=None, stdin=None, on_stderr_line=None):
        sent.append((command, stdin))
        return ssh.CommandResult("", "sudo: 1 incorrect password attempt\n", ssh.SUDO_REFUSED)

    monkeypatch.setattr(nodectl, "run", fake_run)
    with pytest.raises(HostError) as e:
        nodectl.call(cfg, Host("web1", "web1"), None, "rollback", "--restart")
    ((command, stdin),) = sent
    assert "s3cret" not in command and stdin == "s3cret\n"
    assert (
        """IFS= read -r pw; printf '%s\\n' "$pw" | sudo -S -p '' -l -- /usr/bin/systemctl restart"""
        in command
    )
    # The node program gets the same stdin back (the password first), through a pipe.
    assert """{ printf '%s\\n' "$pw"; cat; } | """ in command and "--sudo-stdin" in command
    assert str(e.value) == (
        "web1: deploy may not run `sudo /usr/bin/systemctl restart shop` (sudo: 1 incorrect "
        "password attempt): the sudo password is wrong: give the right one to fab "
        "--prompt-for-sudo-password"
    )
