"""Roles (issue 12 §3): per-role restart/health/reboot, --roles, role order, per-role node config."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabdeploy.adapters import aws, nodectl
from fabdeploy.basics import config
from fabdeploy.basics.config import ConfigError, Host, for_host
from fabdeploy.ops.targets import by_role_order, targets_for

BASE = """\
app: shop
repo: .
s3: {bucket: b}
deploy_to: /srv/shop
restart: /bin/systemctl restart shop
health: {url: "http://{host}:8000/up", timeout: 30}
hosts:
  web1: {roles: [web]}
  web2: {roles: web}
  work1: {roles: [worker]}
  plain: {}
roles:
  worker:
    restart: /bin/systemctl restart shop-worker
    reboot: /sbin/reboot
    health: {command: "test -e /tmp/ok", timeout: 5}
"""


def load(tmp_path: Path, text: str = BASE) -> config.Config:
    p = tmp_path / "deploy.yml"
    p.write_text(text)
    return config.load(p)


def test_a_role_overrides_restart_reboot_and_replaces_the_health_check(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    worker = for_host(cfg, cfg.host("work1"))
    assert worker.restart == "/bin/systemctl restart shop-worker"
    assert worker.reboot == "/sbin/reboot"
    # A role's command check replaces the top-level url check; unset keys come from the top level.
    assert (worker.health.command, worker.health.url) == ("test -e /tmp/ok", None)
    assert worker.health.timeout == 5 and worker.health.on == "node"
    web = for_host(cfg, cfg.host("web1"))  # a role without overrides: the top-level values
    assert web.restart == cfg.restart and web.health == cfg.health and web.reboot == cfg.reboot
    assert cfg.host("web2").roles == ("web",)  # one name is a list of one


def test_a_host_with_two_roles_takes_each_key_from_the_first_role_setting_it(
    tmp_path: Path,
) -> None:
    cfg = load(
        tmp_path,
        BASE.replace("work1: {roles: [worker]}", "work1: {roles: [web, cron, worker]}")
        + "  cron: {restart: /bin/cron-restart}\n",
    )
    mine = for_host(cfg, cfg.host("work1"))
    assert mine.restart == "/bin/cron-restart" and mine.reboot == "/sbin/reboot"
    assert mine.health.command == "test -e /tmp/ok"


def test_the_node_config_and_its_fingerprint_are_per_role(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    web, worker, plain = (cfg.host(n) for n in ("web1", "work1", "plain"))
    wj, kj = nodectl.node_json(cfg, web), nodectl.node_json(cfg, worker)
    assert (
        wj["restart"] == "/bin/systemctl restart shop"
        and wj["health"]["url"] == "http://{host}:8000/up"
    )
    assert kj["restart"] == "/bin/systemctl restart shop-worker"
    assert kj["health"]["command"] == "test -e /tmp/ok" and kj["health"]["url"] is None
    assert kj["roles"] == ["worker"] and "roles" not in nodectl.node_json(cfg, plain)
    fps = {nodectl.fingerprint(cfg, h) for h in (web, worker, plain)}
    assert len(fps) == 3
    # A host without roles keeps exactly the node.json (and fingerprint) it had before roles existed.
    assert nodectl.fingerprint(cfg, plain) == nodectl.fingerprint(cfg)
    assert nodectl.fingerprint(cfg, worker) in nodectl.guarded(cfg, "status", host=worker)


def test_export_node_writes_a_roles_config(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    out = tmp_path / "out"
    nodectl.export(cfg, out, Host(name="role-worker", host="", roles=("worker",)))
    assert "shop-worker" in (out / "node.json").read_text()
    assert (
        nodectl.fingerprint(cfg, Host("x", "x", roles=("worker",)))
        in (out / "install.sh").read_text()
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (
            BASE + "  web: {restrat: x}\n",
            "unknown key 'roles.web.restrat'; valid keys here: health, reboot, restart",
        ),
        (BASE + "  web: {health: {on: sideways}}\n", "roles.web.health.on must be node"),
        (
            BASE + "  web: {health: {command: 'true', on: controller}}\n",
            "health command of role web runs on the node",
        ),
        (
            BASE.replace("web2: {roles: web}", "web2: {roles: [we b]}"),
            "hosts.web2.roles must be role names",
        ),
        (
            BASE + "roll: {role_order: [worker, db]}\n",
            "roll.role_order names unknown role(s) db; known roles: worker, web",
        ),
        (BASE + "  'a b': {}\n", "role names in roles must be"),
    ],
)
def test_role_config_problems_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        load(tmp_path, text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_roles_filter_targets_like_capistranos_ROLES(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    t = targets_for(cfg, None, "worker")
    assert [h.name for h in t.hosts] == ["work1"] and not t.whole_fleet
    assert [h.name for h in targets_for(cfg, None, "web, worker").hosts] == [
        "web1",
        "web2",
        "work1",
    ]
    assert [h.name for h in targets_for(cfg, "web1,work1", "web").hosts] == ["web1"]
    with pytest.raises(ConfigError) as e:
        targets_for(cfg, None, "db,web")
    assert str(e.value).startswith("unknown role db ") and "known roles: worker, web" in str(
        e.value
    )
    with pytest.raises(ConfigError, match="no host among web1 has role worker"):
        targets_for(cfg, "web1", "worker")


def test_role_order_groups_hosts_and_leaves_the_rest_last(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    groups = by_role_order(list(cfg.hosts), ["worker", "web"])
    assert [[h.name for h in g] for g in groups] == [["work1"], ["web1", "web2"], ["plain"]]


def test_roll_plans_roles_one_after_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fabdeploy.ops import roll

    cfg = load(tmp_path, BASE + "roll: {role_order: [worker, web], batch: '100%'}\n")
    said: list[str] = []
    monkeypatch.setattr(roll, "say", said.append)
    monkeypatch.setattr(roll.bundles, "resolve_commit", lambda repo, ref: ("a" * 40, None))
    assert roll.run_roll(cfg, targets_for(cfg, None), None, dry_run=True)
    assert said[1:] == ["  batch 1: work1", "  batch 2: web1, web2", "  batch 3: plain"]
    said.clear()
    assert roll.run_roll(
        cfg, targets_for(cfg, None, "web,worker"), None, dry_run=True, role_order=["web", "worker"]
    )
    assert said[1:] == ["  batch 1: web1, web2", "  batch 2: work1"]


def test_discovered_instances_take_their_roles_from_the_role_tag() -> None:
    inst = {"Tags": [{"Key": "Role", "Value": "worker, cron"}, {"Key": "Name", "Value": "w"}]}
    assert aws._roles_of(inst, "Role") == ("worker", "cron")
    assert aws._roles_of(inst, None) == () and aws._roles_of({"Tags": []}, "Role") == ()


def test_an_unquoted_on_key_is_read_as_on_not_as_yaml_true(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        BASE.replace("health: {url", "health: {on: controller, url").replace(
            "health: {command", "health: {on: node, command"
        )
        + "  web: {health: {on: node}}\n",
    )
    assert cfg.health.on == "controller" and for_host(cfg, cfg.host("web1")).health.on == "node"


def test_status_names_each_hosts_roles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabdeploy.adapters.ssh import HostResult
    from fabdeploy.ops import status

    cfg = load(tmp_path)
    monkeypatch.setattr(
        status,
        "run_parallel",
        lambda cfg, hosts, work: [
            HostResult(
                h.name, True, data={"current": {"release": "1", "commit": "a" * 40, "ok": True}}
            )
            for h in hosts
        ],
    )

    class Store:
        def read_pointer(self):
            return None, None

    info, results = status.collect(cfg, list(cfg.hosts), Store())
    assert {r.host: r.data.get("roles") for r in results} == {
        "web1": ["web"],
        "web2": ["web"],
        "work1": ["worker"],
        "plain": None,
    }
    status.show(cfg, info, results, as_json=False)
    out = capsys.readouterr().out
    assert "roles" in out and "worker" in out


def test_a_roll_reboots_each_host_with_its_roles_reboot_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from fabdeploy.basics.errors import HostError
    from fabdeploy.ops import roll

    cfg = load(tmp_path)
    ran: list[str] = []

    class Conn:
        def close(self) -> None:
            pass

    def stop(cfg: config.Config, host: Host, *a: object) -> None:
        raise HostError(host.name, "stopped after the reboot command")

    monkeypatch.setattr(
        roll,
        "prepare",
        lambda cfg, host, store=None: roll.Prepared(Conn(), {"boot_id": "b0", "current": {}}),
    )
    monkeypatch.setattr(
        roll,
        "run",
        lambda cfg, host, conn, cmd, timeout=None, **kw: (
            ran.append(cmd) or SimpleNamespace(exit_code=0, stdout="", stderr="")
        ),
    )
    monkeypatch.setattr(roll, "_wait_back", stop)
    monkeypatch.setattr(roll, "say", lambda *a: None)
    for name in ("work1", "web1"):
        with pytest.raises(HostError, match="stopped after"):
            roll.reboot_one(cfg, cfg.host(name), "a" * 40, 0.0, False)
    assert ran == ["/sbin/reboot", cfg.reboot]
