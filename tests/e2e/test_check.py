"""`fab deploy.check` on a real fleet: passing, then failing for reasons only the node can see.

The node part runs the installed node program as the boot unit would (its node.json, a clean
environment): a host whose node.json lost its S3 credentials fails the pointer read even
though SSH and everything else work; a stopped app fails the health check; a missing linked
file is named. The disk column compares free space with the unpacked size deploy.bundle
recorded. The check changes nothing and exits non-zero on any failure.
"""

from __future__ import annotations

import json
import re

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

NODE_JSON = "/usr/local/lib/fabdeploy/shop/node.json"
HEALTHY = (
    "python3 -c \"import os, urllib.request; a = os.environ['SSH_CONNECTION'].split()[2]; "
    "urllib.request.urlopen('http://%s:8080/health' % a, timeout=2); print('up')\""
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("check"), subnet="127.0.45", hosts=2)
    yield f
    sandbox.down(f.sb.dir)


def flat(r) -> str:
    return " ".join(w for w in (r.stdout + r.stderr).split() if w not in "│┃")


def state(fleet: Fleet, host: str) -> str:
    """What a check must not change: current, the releases, the node's files and status."""
    return fleet.ssh(
        host,
        "readlink /srv/shop/current; ls -A /srv/shop/releases; "
        f"sha256sum {NODE_JSON} /usr/local/lib/fabdeploy/shop/node.sha; "
        "cat /srv/shop/.fabdeploy/status.json",
    )


def test_check_passes_then_names_what_the_node_cannot_do(fleet: Fleet) -> None:
    fleet.fab("deploy.setup")
    fleet.fab("deploy.hotfix")  # bundle (records the unpacked size), publish, activate
    r = fleet.fab("deploy.check")
    out = flat(r)
    for h in ("web1", "web2"):
        assert re.search(rf"{h} ok ok [\d.]+ MB needed, [\d.]+ [MG]B free ok -", out), r.stdout
    assert "Traceback" not in r.stderr

    # web2's node loses its S3 credentials (node_env) and its linked file; web1's app stops.
    fleet.ssh("web2", f"cp -p {NODE_JSON} /root/node.json.away")
    fleet.ssh(
        "web2",
        "python3 -c \"import json,sys; p=sys.argv[1]; c=json.load(open(p)); c['env']={}; "
        "json.dump(c, open(p, 'w'))\" " + NODE_JSON,
    )
    fleet.ssh("web2", "mv /srv/shop/shared/config/database.yml /root/database.yml.away")
    fleet.ssh("web1", "systemctl stop shop")
    before = {h: state(fleet, h) for h in ("web1", "web2")}
    r = fleet.fab("deploy.check", check=False)
    out = flat(r)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    # web2: SSH works, the deploying machine reads S3, but the node itself cannot.
    assert re.search(r"web2 FAILED NoCredentialsError [\d.]+ MB needed", out), r.stdout
    uri = f"s3://{fleet.sb.bucket}/shop/published.json"
    assert f"the node cannot read {uri} with its own credentials" in out, r.stdout
    assert "Unable to locate credentials" in out and "shared/config/database.yml is missing" in out
    # web1: its app does not answer.
    assert re.search(r"web1 FAILED ok [\d.]+ MB needed, [\d.]+ [MG]B free FAILED", out), r.stdout
    assert "health check failed" in out and ":8080/health unreachable" in out, r.stdout
    assert {h: state(fleet, h) for h in ("web1", "web2")} == before  # changed nothing

    # Put back: passes again.
    fleet.ssh("web2", f"mv /root/node.json.away {NODE_JSON}")
    fleet.ssh("web2", "mv /root/database.yml.away /srv/shop/shared/config/database.yml")
    fleet.ssh("web1", "systemctl start shop")
    wait_for(lambda: fleet.ssh("web1", HEALTHY, check=False) == "up\n", 30, what="web1 up")
    r = fleet.fab("deploy.check", "--hosts=web1,web2")
    assert flat(r).count(" ok ok ") == 2, r.stdout
    assert json.loads(fleet.ssh("web2", f"cat {NODE_JSON}"))["env"]
