"""Unit-file parsing and boot ordering of the sandbox's systemctl stand-in."""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest

SYSTEMCTL = Path(__file__).resolve().parents[2] / "fabfile" / "sandbox_files" / "systemctl"


def _load() -> ModuleType:
    loader = SourceFileLoader("sandbox_systemctl_under_test", str(SYSTEMCTL))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


sc = _load()

UNIT = """\
[Unit]
Description=Activate the current release
After=network.target
Before=shop.service
Wants=other.service

[Service]
Type=oneshot
ExecStart=-/usr/bin/python3 /opt/activate.py --app "my shop"
WorkingDirectory=/srv/shop
Environment=A=1 "B=two words"
Environment=C=3
EnvironmentFile=-/etc/default/shop
User=deploy

[Install]
WantedBy=multi-user.target
"""


def test_parse_unit_subset() -> None:
    unit = sc.parse_unit(UNIT, "fabdeploy-shop")
    assert unit.name == "fabdeploy-shop.service"
    assert unit.description == "Activate the current release"
    assert unit.type == "oneshot"
    assert unit.exec_start == ["/usr/bin/python3", "/opt/activate.py", "--app", "my shop"]
    assert unit.ignore_failure is True
    assert unit.working_directory == "/srv/shop"
    assert unit.environment == {"A": "1", "B": "two words", "C": "3"}
    assert unit.environment_files == [("/etc/default/shop", True)]
    assert unit.after == ["network.target"]
    assert unit.before == ["shop.service"]
    assert unit.wants == ["other.service"]
    assert unit.wanted_by == ["multi-user.target"]


def test_parse_unit_defaults_and_errors() -> None:
    unit = sc.parse_unit("[Service]\nExecStart=/bin/true\n", "x.service")
    assert (unit.type, unit.ignore_failure, unit.wanted_by) == ("simple", False, [])
    with pytest.raises(sc.UnitError, match="no ExecStart"):
        sc.parse_unit("[Service]\nType=simple\n", "x")
    with pytest.raises(sc.UnitError, match="unsupported Type=forking"):
        sc.parse_unit("[Service]\nType=forking\nExecStart=/bin/true\n", "x")


def test_parse_env_file() -> None:
    text = "# comment\nexport A=1\nB='two words'\nC=\"3\"\n\nnot an assignment\n"
    assert sc.parse_env_file(text) == {"A": "1", "B": "two words", "C": "3"}


def test_unit_env_is_clean_and_layers_files_then_environment(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("A=from-file\nB=from-file\n")
    unit = sc.parse_unit(
        f"[Service]\nExecStart=/bin/true\nEnvironmentFile={env_file}\nEnvironment=B=from-unit\n",
        "x",
    )
    env = sc.unit_env(unit)
    assert env["A"] == "from-file" and env["B"] == "from-unit"
    assert env["PATH"].startswith("/usr/local/sbin:/usr/local/bin")
    missing = sc.parse_unit("[Service]\nExecStart=/bin/true\nEnvironmentFile=/nope\n", "x")
    with pytest.raises(sc.UnitError, match="EnvironmentFile /nope not found"):
        sc.unit_env(missing)


def _unit(name: str, before: str = "", after: str = "") -> object:
    text = f"[Unit]\nBefore={before}\nAfter={after}\n[Service]\nType=oneshot\nExecStart=/bin/true\n"
    return sc.parse_unit(text, name)


def test_boot_order_is_name_order_adjusted_for_before_after() -> None:
    units = [_unit("c"), _unit("a", after="c"), _unit("b"), _unit("d", before="b")]
    assert [u.name for u in sc.boot_order(units)] == [
        "c.service",
        "a.service",
        "d.service",
        "b.service",
    ]


def test_boot_order_breaks_cycles_instead_of_hanging() -> None:
    units = [_unit("a", after="b"), _unit("b", after="a")]
    assert sorted(u.name for u in sc.boot_order(units)) == ["a.service", "b.service"]


def test_unit_name() -> None:
    assert sc.unit_name("shop") == "shop.service"
    assert sc.unit_name("shop.service") == "shop.service"


def test_user_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import pwd

    unit = sc.parse_unit(UNIT, "fabdeploy-shop")
    assert unit.user == "deploy"
    me = pwd.getpwuid(os.getuid())
    unit.user = me.pw_name
    env = {"HOME": "/root", "USER": "root"}
    creds = sc.credentials(unit, env)
    if me.pw_uid == 0:
        assert creds == {} and env["USER"] == "root"
    else:
        assert creds["user"] == me.pw_uid and env["USER"] == me.pw_name
    unit.user = "no-such-user-fabdeploy"
    monkeypatch.setattr(sc, "_log_line", lambda *a: None)
    with pytest.raises(sc.UnitError, match="217/USER"):
        sc.credentials(unit, {})
