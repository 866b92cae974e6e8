"""Signed releases: the controller's ssh-keygen signatures, and the node's checks of them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from fabdeploy.adapters import signing
from fabdeploy.basics import config
from fabdeploy.basics.errors import ConfigError, SigningError
from fabdeploy.node import node


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture
def world(tmp_path: Path) -> dict:
    alice, mallory = tmp_path / "alice", tmp_path / "mallory"
    signers = tmp_path / "allowed_signers"
    signers.write_text(f"alice@example.com {keygen(alice)}\n")
    keygen(mallory)

    def cfg(key: Path) -> config.Config:
        p = tmp_path / f"deploy-{key.name}.yml"
        p.write_text(
            yaml.safe_dump(
                {
                    "app": "shop",
                    "repo": ".",
                    "s3": {"bucket": "b"},
                    "deploy_to": str(tmp_path / "srv"),
                    "hosts": ["web1"],
                    "signing": {"key": str(key), "allowed_signers": str(signers)},
                }
            )
        )
        return config.load(p)

    return {"alice": cfg(alice), "mallory": cfg(mallory), "signers": signers, "tmp": tmp_path}


def test_round_trip_names_the_signer(world: dict) -> None:
    env = signing.sign(world["alice"], {"commit": "abc", "n": 1}, signing.NS_MANIFEST)
    payload, who = signing.verify(world["alice"], env, signing.NS_MANIFEST, "manifest")
    assert payload == {"commit": "abc", "n": 1} and who == "alice@example.com"


def test_tampered_untrusted_unsigned_and_wrong_namespace_are_refused(world: dict) -> None:
    env = signing.sign(world["alice"], {"commit": "abc"}, signing.NS_MANIFEST)
    with pytest.raises(SigningError, match="does not match its content"):
        signing.verify(
            world["alice"],
            {**env, "payload": env["payload"].replace("abc", "abd")},
            signing.NS_MANIFEST,
            "m",
        )
    with pytest.raises(
        SigningError, match="does not match"
    ):  # a manifest signature can't pass as a pointer's
        signing.verify(world["alice"], env, signing.NS_POINTER, "m")
    evil = signing.sign(world["mallory"], {"commit": "abc"}, signing.NS_MANIFEST)
    with pytest.raises(SigningError, match="not in"):
        signing.verify(world["alice"], evil, signing.NS_MANIFEST, "m")
    with pytest.raises(SigningError, match="is not signed"):
        signing.verify(world["alice"], {"payload": env["payload"]}, signing.NS_MANIFEST, "m")


def test_a_key_without_trusted_signers_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "deploy.yml"
    p.write_text(
        yaml.safe_dump(
            {
                "app": "shop",
                "repo": ".",
                "s3": {"bucket": "b"},
                "deploy_to": "/srv/shop",
                "hosts": ["web1"],
                "signing": {"key": "id_ed25519"},
            }
        )
    )
    with pytest.raises(ConfigError, match="signing.allowed_signers"):
        config.load(p)


# --- the node's side: trusted_pointer ------------------------------------------------------


def node_cfg(world: dict, **signing_opts) -> node.Config:
    os.chmod(world["signers"], 0o644)
    return node.Config(
        {
            "app": "shop",
            "deploy_to": str(world["tmp"] / "srv"),
            "s3": {"bucket": "b"},
            "signing": {"signers": str(world["signers"]), **signing_opts},
        }
    )


def signed_pointer(
    world: dict, who: str = "alice", sequence: int = 10, sha: str = "a" * 64
) -> dict:
    c = world[who]
    manifest = signing.sign(
        c,
        {"app": "shop", "commit": "c1", "sha256": sha, "size": 5, "key": "shop/bundles/c1"},
        signing.NS_MANIFEST,
    )
    payload = {
        "key": "shop/bundles/c1",
        "commit": "c1",
        "sha256": sha,
        "size": 5,
        "sequence": sequence,
        "manifest": manifest,
    }
    return {
        "key": "x",
        "commit": "c1",
        "sha256": sha,
        "size": 5,
        "signed": signing.sign(c, payload, signing.NS_POINTER),
    }


def test_node_trusts_a_signed_pointer_and_refuses_a_replay(world: dict) -> None:
    if os.geteuid() != 0:
        pytest.skip("the trusted signers must be root's")
    cfg = node_cfg(world)
    layout = node.Layout(cfg.deploy_to)
    p, trust = node.trusted_pointer(cfg, layout, signed_pointer(world, sequence=10))
    assert p["commit"] == "c1" and trust == (10, "alice@example.com")
    node.record_trust(layout, *trust)
    with pytest.raises(node.TrustError, match="replayed"):
        node.trusted_pointer(cfg, layout, signed_pointer(world, sequence=9))
    assert node.trusted_pointer(cfg, layout, signed_pointer(world, sequence=10))[1] == (
        10,
        "alice@example.com",
    )


def test_node_refuses_unsigned_except_on_the_upgrade_path(world: dict) -> None:
    if os.geteuid() != 0:
        pytest.skip("the trusted signers must be root's")
    unsigned = {"key": "k", "commit": "c1", "sha256": "a" * 64, "size": 5}
    layout = node.Layout(str(world["tmp"] / "srv"))
    with pytest.raises(node.TrustError, match="not signed"):
        node.trusted_pointer(node_cfg(world), layout, unsigned)
    assert node.trusted_pointer(node_cfg(world, allow_unsigned=True), layout, unsigned) == (
        unsigned,
        None,
    )
    node.record_trust(
        layout, 1, "alice@example.com"
    )  # once a signed release ran, no more unsigned ones
    with pytest.raises(node.TrustError, match="already runs signed releases"):
        node.trusted_pointer(node_cfg(world, allow_unsigned=True), layout, unsigned)


def test_node_refuses_signers_others_can_write(world: dict) -> None:
    if os.geteuid() != 0:
        pytest.skip("the trusted signers must be root's")
    cfg = node_cfg(world)
    os.chmod(world["signers"], 0o664)
    with pytest.raises(node.TrustError, match="can be written by someone other than root"):
        node.trusted_pointer(cfg, node.Layout(cfg.deploy_to), signed_pointer(world))


def test_node_refuses_a_pointer_whose_manifest_names_another_bundle(world: dict) -> None:
    if os.geteuid() != 0:
        pytest.skip("the trusted signers must be root's")
    cfg = node_cfg(world)
    p = signed_pointer(world)
    payload = json.loads(p["signed"]["payload"])
    payload["sha256"] = "b" * 64  # the pointer says one bundle, its manifest another
    p["signed"] = signing.sign(world["alice"], payload, signing.NS_POINTER)
    with pytest.raises(node.TrustError, match="names another bundle"):
        node.trusted_pointer(cfg, node.Layout(cfg.deploy_to), p)
