"""The target set of a run: which hosts, and whether they are the whole fleet.

deploy.yml's static hosts plus, when `aws:` names the fleet, its live instances;
`--hosts` / `-H` narrows that to a subset (names or instance ids).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from fabdeploy.basics.config import Config, Host
from fabdeploy.basics.errors import ConfigError


@dataclass
class Targets:
    hosts: list[Host]
    whole_fleet: bool


def targets_for(cfg: Config, hosts: str | Sequence[str] | None) -> Targets:
    selected = select_hosts(cfg, hosts)
    return Targets(selected, is_whole_fleet(cfg, selected))


_resolved: dict[int, tuple[Config, list[Host]]] = {}
_resolved_lock = threading.Lock()


def resolve_hosts(cfg: Config) -> list[Host]:
    """deploy.yml's static hosts plus, when aws: names the fleet, its live instances.

    Discovery is lazy (here, not at config load) so config errors stay fast and
    offline; it runs once per Config per run.
    """
    if cfg.aws is None or not cfg.aws.discovers:
        return list(cfg.hosts)
    with _resolved_lock:
        hit = _resolved.get(id(cfg))
        if hit is None or hit[0] is not cfg:
            from fabdeploy.adapters import aws

            static = list(cfg.hosts)
            names = {h.name for h in static}
            hit = (cfg, static + [h for h in aws.discover(cfg) if h.name not in names])
            _resolved[id(cfg)] = hit
        return list(hit[1])


def select_hosts(cfg: Config, hosts: str | Sequence[str] | None) -> list[Host]:
    """The hosts named by --hosts/-H (comma-separated names or instance ids), or all of them."""
    fleet = resolve_hosts(cfg)
    if not hosts:
        return fleet
    names = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    names = [n.strip() for n in names if n.strip()]
    known = {h.name: h for h in fleet}
    known.update({h.instance_id: h for h in fleet if h.instance_id and h.instance_id not in known})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"unknown host{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(not in hosts of {cfg.path}); known hosts: {', '.join(h.name for h in fleet)}"
        )
    seen: dict[str, Host] = {}
    for n in names:
        seen.setdefault(known[n].name, known[n])
    return list(seen.values())


def is_whole_fleet(cfg: Config, targets: Sequence[Host]) -> bool:
    return {h.name for h in targets} == {h.name for h in resolve_hosts(cfg)}
