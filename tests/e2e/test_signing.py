"""Signed releases on a sandbox fleet: nodes run only what a trusted deployer signed.

Someone with write access to the bucket (but no deployer's key) tampers with the bundle, the
pointer, or signs with a key of their own, or strips the signature: every one is refused at
boot and on hotfix, and the host keeps serving its release.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from fleet_helpers import Fleet, can_run_sandbox, start_fleet

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

POINTER = "shop/published.json"
NODE = "/usr/local/lib/fabdeploy/shop"


def keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("signing"), subnet="127.0.41", hosts=2)
    yield f
    sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def keys(fleet: Fleet) -> dict[str, Path]:
    d = fleet.sb.dir / "keys"
    d.mkdir()
    alice, mallory = d / "alice", d / "mallory"
    signers = d / "allowed_signers"
    signers.write_text(f"alice@example.com {keygen(alice)}\n")
    keygen(mallory)
    (d / "mallory_signers").write_text(
        f"mallory@evil.example {mallory.with_suffix('.pub').read_text()}"
    )
    return {
        "alice": alice,
        "mallory": mallory,
        "signers": signers,
        "mallory_signers": d / "mallory_signers",
    }


@pytest.fixture(scope="module")
def cfg(fleet: Fleet, keys: dict[str, Path]) -> Path:
    c = fleet.variant(
        "signed", signing={"key": str(keys["alice"]), "allowed_signers": str(keys["signers"])}
    )
    fleet.fab("deploy.setup", config=c)
    return c


def s3(fleet: Fleet):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=fleet.sb.s3_direct,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def put_pointer(fleet: Fleet, data: dict) -> None:
    s3(fleet).put_object(Bucket=fleet.sb.bucket, Key=POINTER, Body=json.dumps(data).encode())


def last_boot(fleet: Fleet, host: str) -> dict:
    return fleet.node_status(host)["last_boot"]


def serving(fleet: Fleet, host: str, commit: str) -> None:
    assert fleet.revision(host) == commit and fleet.version(host) == commit


def test_setup_installs_root_owned_signers(fleet: Fleet, cfg: Path, keys: dict[str, Path]) -> None:
    signers = "/etc/fabdeploy/shop/allowed_signers"
    out = fleet.ssh("web1", f"stat -c '%U %a' {signers} /etc/fabdeploy/shop; cat {signers}")
    assert out.splitlines()[:2] == ["root 644", "root 755"] and "alice@example.com" in out


def test_a_signed_release_boots(fleet: Fleet, cfg: Path) -> None:
    commit = fleet.commit("signed release")
    r = fleet.fab("deploy.publish", config=cfg)
    assert "signed, sequence" in r.stdout
    p = fleet.pointer()
    assert p["commit"] == commit and p["signed"]["signature"].startswith(
        "-----BEGIN SSH SIGNATURE-----"
    )
    fleet.reboot("web1")
    assert last_boot(fleet, "web1")["outcome"] == "activated"
    serving(fleet, "web1", commit)
    # A hotfix hands the node the signed manifest; it checks it before downloading.
    fleet.fab("deploy.hotfix", "--hosts=web2", config=cfg)
    serving(fleet, "web2", commit)
    trust = json.loads(fleet.ssh("web1", "cat /srv/shop/.fabdeploy/trust.json"))
    assert trust["principal"] == "alice@example.com" and trust["sequence"] == p["sequence"]


def _new_release(fleet: Fleet, cfg: Path, what: str) -> tuple[str, dict]:
    """A new signed release published (web1 not rebooted yet): (its commit, its pointer)."""
    fleet.commit(what)
    fleet.fab("deploy.publish", config=cfg)
    return fleet.git("rev-parse", "HEAD"), fleet.pointer()


def test_tampered_pointer_is_refused_at_boot(fleet: Fleet, cfg: Path) -> None:
    running = fleet.revision("web1")
    _, p = _new_release(fleet, cfg, "release whose pointer gets tampered with")
    payload = json.loads(p["signed"]["payload"])
    payload["key"] = payload["key"].replace("bundles/", "bundles/evil-")
    p["signed"]["payload"] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    put_pointer(fleet, p)
    fleet.reboot("web1")
    b = last_boot(fleet, "web1")
    assert b["outcome"] == "kept" and "does not match its content" in b["reason"], b
    serving(fleet, "web1", running)


def test_pointer_signed_by_an_untrusted_key_is_refused_at_boot(
    fleet: Fleet, cfg: Path, keys: dict[str, Path]
) -> None:
    from fabdeploy.adapters import signing
    from fabdeploy.basics import config

    running = fleet.revision("web1")
    _, p = _new_release(fleet, cfg, "release re-signed by mallory")
    mallory = config.load(
        fleet.variant(
            "mallory",
            signing={"key": str(keys["mallory"]), "allowed_signers": str(keys["mallory_signers"])},
        )
    )
    payload = json.loads(p["signed"]["payload"])
    payload["sequence"] += 1
    p["signed"] = signing.sign(mallory, payload, signing.NS_POINTER)
    put_pointer(fleet, p)
    fleet.reboot("web1")
    b = last_boot(fleet, "web1")
    assert b["outcome"] == "kept" and "not trusted" in b["reason"], b
    serving(fleet, "web1", running)


def test_unsigned_pointer_is_refused_at_boot(fleet: Fleet, cfg: Path) -> None:
    running = fleet.revision("web1")
    _, p = _new_release(fleet, cfg, "release whose signature gets stripped")
    del p["signed"], p["sequence"]
    put_pointer(fleet, p)
    fleet.reboot("web1")
    b = last_boot(fleet, "web1")
    assert b["outcome"] == "kept" and "not signed" in b["reason"], b
    serving(fleet, "web1", running)
    r = fleet.fab("deploy.status", "--json", "--hosts=web1", config=cfg, check=False)
    reason = json.loads(r.stdout)["hosts"][0]["last_boot"][
        "reason"
    ]  # status shows why, in one line
    assert "not signed" in reason and "\n" not in reason


def test_tampered_bundle_is_refused_at_boot_and_on_hotfix(fleet: Fleet, cfg: Path) -> None:
    running = {h: fleet.revision(h) for h in ("web1", "web2")}
    commit, p = _new_release(fleet, cfg, "release whose bundle gets replaced")
    evil = (b"not the bundle that was signed" * (p["size"] // 30 + 1))[
        : p["size"]
    ]  # same size: the sha decides
    s3(fleet).put_object(
        Bucket=fleet.sb.bucket,
        Key=p["key"],
        Body=evil,
        Metadata={
            "sha256": __import__("hashlib").sha256(evil).hexdigest(),
            "size": str(len(evil)),
            "commit": commit,
        },
    )
    fleet.reboot("web1")
    b = last_boot(fleet, "web1")
    assert b["outcome"] == "kept" and "sha256 mismatch" in b["reason"], b
    serving(fleet, "web1", running["web1"])
    # The deploying machine trusts the signed manifest, not the object's metadata: the node
    # downloads, finds other bytes, and refuses them.
    r = fleet.fab("deploy.hotfix", "--hosts=web2", config=cfg, check=False)
    assert r.returncode == 1 and "sha256 mismatch" in r.stdout, r.stdout + r.stderr
    serving(fleet, "web2", running["web2"])


@pytest.mark.parametrize("case", ["tampered", "untrusted", "unsigned"])
def test_hotfix_manifest_is_checked_on_the_node(
    fleet: Fleet, cfg: Path, keys: dict[str, Path], case: str
) -> None:
    """What the node's activate does with a manifest that a trusted key did not sign as is."""
    from fabdeploy.adapters import signing
    from fabdeploy.basics import config

    fleet.commit(f"hotfix with a {case} manifest")
    fleet.fab("deploy.bundle", config=cfg)
    commit = fleet.git("rev-parse", "HEAD")
    env = json.loads(
        s3(fleet)
        .get_object(Bucket=fleet.sb.bucket, Key=f"shop/manifests/{commit}.json")["Body"]
        .read()
    )
    m = json.loads(env["payload"])
    if case == "tampered":
        env["payload"] = env["payload"].replace(m["sha256"], "0" * 64)
        m["sha256"] = "0" * 64
    elif case == "untrusted":
        mallory = config.load(
            fleet.variant(
                "mallory2",
                signing={
                    "key": str(keys["mallory"]),
                    "allowed_signers": str(keys["mallory_signers"]),
                },
            )
        )
        env = signing.sign(mallory, m, signing.NS_MANIFEST)
    else:
        env = {}
    running = fleet.revision("web2")
    url = "http://127.0.0.1:9/never-fetched"
    cmd = (
        f"/usr/bin/python3 {NODE}/node.py --config {NODE}/node.json activate --sha256 {m['sha256']} "
        f"--commit {commit} --size {m['size']} --url-stdin --manifest-stdin --restart"
    )
    r = subprocess.run(
        ["ssh", "-F", str(fleet.sb.ssh_config), "-o", "BatchMode=yes", "web2", cmd],
        input=f"{url}\n{json.dumps(env)}\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode != 0 and answer["ok"] is False
    assert {
        "tampered": "does not match its content",
        "untrusted": "not trusted",
        "unsigned": "not signed",
    }[case] in answer["error"], answer
    serving(fleet, "web2", running)


def test_rollback_publishes_a_new_signed_pointer(fleet: Fleet, cfg: Path) -> None:
    commit = fleet.commit("good release again")
    fleet.fab("deploy.hotfix", config=cfg)
    before = fleet.pointer()
    assert before["commit"] == commit
    fleet.fab("deploy.rollback", config=cfg)
    after = fleet.pointer()
    assert after["commit"] != commit and after["sequence"] > before["sequence"] and after["signed"]
    fleet.reboot("web1")  # the node accepts the newer pointer to the older bundle
    assert last_boot(fleet, "web1")["outcome"] in ("unchanged", "activated")
    assert fleet.revision("web1") == after["commit"]
