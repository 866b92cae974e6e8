"""Shared config that new instances get by themselves (issue 14 §3), on a real fleet.

config/database.yml is a linked file whose source is an SSM SecureString in the local moto
server (which serves SSM and Secrets Manager as well as S3). The app of this test reads it at
start-up (as Rails reads database.yml) and serves its sha256 at /config, so "the app serves"
means "the app started with that config". Everything runs as the `deploy` user (sudo for the
restart and the reboot only): the fetched file must be deploy's, mode 0600.

- `fab deploy.config` pushes, shows and diffs it without printing the value;
- a fresh host with nothing but `deploy.export-node`'s files boots the app with it;
- with the source unreachable, a reboot keeps the last good copy and the app still serves;
- a changed parameter + a hotfix puts the new content on every node (and restarts the app,
  though the release did not change); `--sync` fetches without a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import urllib.request

import pytest
import yaml
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

PARAM = "/shop/production/database.yml"
DB = "config/database.yml"
V1 = "production:\n  adapter: sqlite3\n  password: s3cret-one\n"
V2 = "production:\n  adapter: sqlite3\n  password: s3cret-two\n  pool: 5\n"
V3 = "production:\n  adapter: sqlite3\n  password: s3cret-three\n"
ENV, SECRET_ID, ENV_TEXT = "config/app.env", "shop/production/env", "API_KEY=s3cret-env\n"
SETTINGS, SETTINGS_TEXT = "config/settings.json", '{"feature": true}\n'


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("sharedcfg"), subnet="127.0.44", hosts=2)
    yield f
    sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def cfg(fleet: Fleet):
    return variant(fleet, "sharedcfg")


def variant(fleet: Fleet, name: str, **more):
    endpoint = yaml.safe_load(fleet.sb.deploy_yml.read_text())["s3"]["endpoint_url"]
    return fleet.variant(
        name,
        ssh={"user": "deploy", "sudo": True, "admin_user": "root"},
        restart="/usr/local/bin/systemctl restart shop",
        reboot="/usr/local/bin/systemctl reboot",
        linked_files=[
            {"path": DB, "ssm": PARAM},
            {"path": ENV, "secret": SECRET_ID},  # Secrets Manager, in the same moto server
            {"path": SETTINGS, "s3": "config/settings.json"},  # under the deploy prefix
        ],
        # Spelled out for the nodes: their boto3 (Debian 12's 1.26) ignores AWS_ENDPOINT_URL.
        config_sources={"ssm_endpoint_url": endpoint, "secretsmanager_endpoint_url": endpoint},
        node={"boot_attempts": 2, "boot_backoff": 0.2, "download_timeout": 2},
        **more,
    )


def app_config(fleet: Fleet, host: str) -> str | None:
    try:
        url = f"http://{fleet.sb.hosts[host]}:8080/config"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode().strip()
    except OSError:
        return None


def owner_mode(fleet: Fleet, host: str) -> str:
    return fleet.ssh(host, f"stat -c '%U %a' /srv/shop/shared/{DB}").strip()


def flat(r) -> str:
    """fab's output with the table's borders and line wraps taken out."""
    return " ".join(w for w in (r.stdout + r.stderr).split() if w not in "│┃")


def test_push_show_and_diff_never_print_the_value(fleet: Fleet, cfg, tmp_path) -> None:
    local = tmp_path / "database.yml"
    local.write_text(V1)
    r = fleet.fab("deploy.config", f"--push={local}", config=cfg, check=False)
    assert r.returncode == 1 and "name the linked file with --path" in r.stderr, r.stderr
    r = fleet.fab("deploy.config", f"--push={local}", f"--path={DB}", config=cfg)
    assert f"pushed {local} to ssm:{PARAM} for {DB}: version 1" in r.stdout, r.stdout
    assert "s3cret" not in r.stdout + r.stderr
    for path, text in ((ENV, ENV_TEXT), (SETTINGS, SETTINGS_TEXT)):
        other = tmp_path / path.replace("/", "_")
        other.write_text(text)
        fleet.fab("deploy.config", f"--push={other}", f"--path={path}", config=cfg)

    r = fleet.fab("deploy.config", config=cfg)
    out = flat(r)
    assert f"ssm:{PARAM}" in out and sha(V1)[:12] in out and "3 lines" in out, out
    assert "s3cret" not in out
    assert (
        f"secretsmanager:{SECRET_ID}" in out
        and "s3://fabdeploy-sandbox/shop/config/settings.json" in out
    )
    shown = fleet.fab("deploy.config", "--show-secrets", config=cfg)
    assert "s3cret-one" in shown.stdout and "s3cret-env" in shown.stdout

    local.write_text(V2)
    r = fleet.fab("deploy.config", f"--diff={local}", f"--path={DB}", config=cfg, check=False)
    assert r.returncode == 1 and "+2 -1 lines" in r.stdout, r.stdout + r.stderr
    assert "s3cret" not in r.stdout + r.stderr


def test_fresh_host_boots_the_app_with_its_config_from_ssm(fleet: Fleet, cfg, tmp_path) -> None:
    # The app now needs its config to start, and serves the sha256 of what it read.
    app = (fleet.sb.app_repo / "app.py").read_text()
    app = app.replace(
        "class Handler(BaseHTTPRequestHandler):",
        "import hashlib\n\n"
        "with open(os.path.join(RELEASE_DIR, 'config/database.yml'), 'rb') as _f:\n"
        "    CONFIG_SHA = hashlib.sha256(_f.read()).hexdigest()\n\n\n"
        "class Handler(BaseHTTPRequestHandler):",
    ).replace(
        '        elif self.path == "/deps":',
        '        elif self.path == "/config":\n'
        "            self.reply(200, CONFIG_SHA)\n"
        '        elif self.path == "/deps":',
    )
    commit = fleet.commit("the app reads config/database.yml", {"app.py": app})
    fleet.fab("deploy.publish", config=cfg)

    # A fresh instance: nothing of the app at all, not even shared/config/database.yml.
    fleet.ssh(
        "web2",
        "rm -rf /usr/local/lib/fabdeploy /etc/systemd/system/fabdeploy-shop.service "
        "/etc/systemd/system/multi-user.target.wants/fabdeploy-shop.service /srv/shop",
    )
    out = tmp_path / "node-bundle"  # /tmp is shared with the sandbox hosts
    fleet.fab("deploy.export-node", f"--out={out}", config=cfg)
    node_json = json.loads((out / "node.json").read_text())
    assert node_json["shared_config"]["files"] == [
        {"path": DB, "ssm": PARAM},
        {"path": ENV, "secret": SECRET_ID},
        {"path": SETTINGS, "s3_bucket": "fabdeploy-sandbox", "s3_key": "shop/config/settings.json"},
    ]
    fleet.ssh("web2", f"sh {out}/install.sh")
    fleet.reboot("web2")

    assert fleet.revision("web2") == commit
    assert wait_for(lambda: app_config(fleet, "web2"), what="app on web2") == sha(V1)
    assert owner_mode(fleet, "web2") == "deploy 600"
    assert fleet.ssh("web2", f"cat /srv/shop/current/{ENV}") == ENV_TEXT
    assert fleet.ssh("web2", f"cat /srv/shop/current/{SETTINGS}") == SETTINGS_TEXT
    status = fleet.node_status("web2")
    assert status["last_boot"]["outcome"] == "activated", status

    r = fleet.fab("deploy.config", "--nodes", "--hosts=web2", config=cfg)
    assert flat(r).count(" same") == 3 and "s3cret" not in r.stdout, flat(r)


def test_unreachable_source_keeps_the_last_good_copy(fleet: Fleet, cfg) -> None:
    s3_pid = json.loads((fleet.sb.dir / "sandbox.json").read_text())["s3"]["pid"]
    os.kill(s3_pid, signal.SIGSTOP)  # SSM and S3 hang: the worst kind of unreachable
    try:
        fleet.reboot("web2")
    finally:
        os.kill(s3_pid, signal.SIGCONT)
    assert wait_for(lambda: app_config(fleet, "web2"), what="app on web2") == sha(V1)
    shared = json.loads(fleet.ssh("web2", "cat /srv/shop/.fabdeploy/status.json").strip())[
        "shared_config"
    ]["files"]
    assert shared[0]["outcome"] == "kept" and shared[0]["reason"], shared
    assert fleet.node_status("web2")["last_boot"]["outcome"] == "kept"
    # deploy.status carries it (its table says "shared config ... kept (source unreadable)").
    r = fleet.fab("deploy.status", "--hosts=web2", "--json", config=cfg)
    host = json.loads(r.stdout)["hosts"][0]
    assert host["shared_config"]["files"][0]["outcome"] == "kept", host


def test_changed_parameter_and_hotfix_put_new_content_on_every_node(
    fleet: Fleet, cfg, tmp_path
) -> None:
    fleet.fab("deploy.setup", config=cfg)  # web1 moves to deploy and gets the node program
    fleet.fab("deploy.hotfix", config=cfg)
    for h in ("web1", "web2"):
        assert wait_for(lambda h=h: app_config(fleet, h), what=f"app on {h}") == sha(V1)

    local = tmp_path / "v2.yml"
    local.write_text(V2)
    fleet.fab("deploy.config", f"--push={local}", f"--path={DB}", config=cfg)
    r = fleet.fab("deploy.config", "--nodes", config=cfg, check=False)
    assert r.returncode == 1 and flat(r).count("DIFFERS") == 2, flat(r)

    # Same bundle, new config: the hotfix fetches it and restarts the app on it.
    r = fleet.fab("deploy.hotfix", config=cfg)
    assert flat(r).count(f"config changed: {DB}; restarted") == 2, flat(r)  # the table
    assert len(re.findall(r"\] web\d: config changed$", r.stdout, re.M)) == 2, r.stdout
    for h in ("web1", "web2"):
        assert fleet.ssh(h, f"cat /srv/shop/current/{DB}") == V2
        assert app_config(fleet, h) == sha(V2)
        assert owner_mode(fleet, h) == "deploy 600"
    assert fleet.fab("deploy.config", "--nodes", config=cfg).returncode == 0

    # --sync fetches without restarting: the file changes, the running app keeps what it read.
    local.write_text(V3)
    fleet.fab("deploy.config", f"--push={local}", f"--path={DB}", config=cfg)
    r = fleet.fab("deploy.config", "--sync", "--hosts=web1", config=cfg)
    assert "written" in flat(r), flat(r)
    assert fleet.ssh("web1", f"cat /srv/shop/shared/{DB}") == V3
    assert fleet.ssh("web2", f"cat /srv/shop/shared/{DB}") == V2
    assert app_config(fleet, "web1") == sha(V2)

    # With traffic settings a hotfix first prepares every host while it is still in traffic
    # (nothing written there), then drains and switches only the hosts with something to do:
    # a changed config is something to do.
    drained = tmp_path / "drained"
    traffic = variant(
        fleet,
        "sharedcfg-traffic",
        traffic={"drain": f"echo {{host}} >> {drained}", "restore": "true"},
    )
    local.write_text(V1)
    fleet.fab("deploy.config", f"--push={local}", f"--path={DB}", config=traffic)
    r = fleet.fab("deploy.hotfix", config=traffic)
    assert flat(r).count(f"config changed: {DB}; restarted") == 2, flat(r)  # the table
    assert len(re.findall(r"\] web\d: config changed$", r.stdout, re.M)) == 2, r.stdout
    assert sorted(drained.read_text().split()) == ["web1", "web2"]
    for h in ("web1", "web2"):
        assert app_config(fleet, h) == sha(V1)
    drained.unlink()
    r = fleet.fab("deploy.hotfix", config=traffic)  # nothing changed: nobody leaves traffic
    assert not drained.exists() and "config changed" not in flat(r), flat(r)
