"""The sandbox's private network (up(private_net=True)): names, addresses, ssh_config."""

from __future__ import annotations

from pathlib import Path

from fabfile import sandbox


def test_addresses_and_names_per_subnet() -> None:
    assert sandbox.private_ip("127.28.46", 3) == "10.28.46.3"
    assert sandbox.netns_name("127.28.46") == "fdsb-28-46"
    outside, inside = sandbox._veth("127.127.255")
    assert len(outside) <= 15 and len(inside) <= 15 and outside != inside  # IFNAMSIZ


def test_every_host_but_the_bastion_is_reached_through_it(tmp_path: Path) -> None:
    hosts = {"web1": "10.0.46.1", "web2": "10.0.46.2", "gw": "10.0.46.253"}
    known = [f"{n},{ip} ssh-ed25519 AAAA{n}" for n, ip in hosts.items()]
    sandbox._write_client_files(tmp_path, hosts, known, gateway="gw")
    blocks = {
        b.split("\n", 1)[0].split()[1]: b
        for b in (tmp_path / "ssh_config").read_text().split("\n\n")
    }
    assert "ProxyJump gw\n" in blocks["web1"] and "ProxyJump gw\n" in blocks["web2"]
    assert "ProxyJump" not in blocks["gw"] and "HostName 10.0.46.253\n" in blocks["gw"]
    assert all("StrictHostKeyChecking yes" in b for b in blocks.values())
    assert (tmp_path / "known_hosts").read_text().splitlines()[-1].startswith("gw,10.0.46.253 ")
