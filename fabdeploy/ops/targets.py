"""The target set of a run: which hosts, and whether they are the whole fleet.

deploy.yml's static hosts plus, when `aws:` names the fleet, its live instances;
`--hosts` / `-H` narrows that to a subset (names or instance ids), and `--roles` to the
hosts carrying any of those roles (Capistrano's ROLES=).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from fabdeploy.basics.config import Config, Host, known_roles
from fabdeploy.basics.errors import ConfigError


@dataclass
class Targets:
    hosts: list[Host]
    whole_fleet: bool


def targets_for(
    cfg: Config, hosts: str | Sequence[str] | None, roles: str | Sequence[str] | None = None
) -> Targets:
    selected = select_hosts(cfg, hosts)
    if roles:
        selected = with_roles(cfg, selected, parse_roles(roles))
    return Targets(selected, is_whole_fleet(cfg, selected))


def parse_roles(roles: str | Sequence[str]) -> list[str]:
    names = roles.split(",") if isinstance(roles, str) else list(roles)
    return list(dict.fromkeys(n.strip() for n in names if n.strip()))


def with_roles(cfg: Config, hosts: list[Host], roles: list[str]) -> list[Host]:
    """The hosts carrying any of `roles`; an unknown role is one line listing the known ones."""
    known = known_roles(cfg, resolve_hosts(cfg))
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise ConfigError(
            f"unknown role{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (no host in {cfg.path} has it); "
            + (
                f"known roles: {', '.join(known)}"
                if known
                else "no host has roles (hosts.X.roles, aws.role_tag)"
            )
        )
    chosen = [h for h in hosts if set(h.roles) & set(roles)]
    if not chosen:
        raise ConfigError(
            f"no host{'s' if len(hosts) > 1 else ''} among {', '.join(h.name for h in hosts)} "
            f"{'has' if len(hosts) == 1 else 'have'} role {' or '.join(roles)}"
        )
    return chosen


def by_role_order(hosts: list[Host], order: Sequence[str]) -> list[list[Host]]:
    """`hosts` split by `order` (a host goes with the first of its roles in it); the rest last."""
    groups: list[list[Host]] = [[] for _ in range(len(order) + 1)]
    for h in hosts:
        i = next((order.index(r) for r in order if r in h.roles), len(order))
        groups[i].append(h)
    return [g for g in groups if g]


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
