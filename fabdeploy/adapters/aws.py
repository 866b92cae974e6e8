"""AWS fleet integration: host discovery, load balancer traffic, ASG standby, instance refresh.

The only module that talks to EC2, Auto Scaling and Elastic Load Balancing. Like
store.py it builds boto3 clients lazily (`fab --list` must not import boto3) and
turns every botocore failure into one `AWSError` line: what failed, where
(region/endpoint), what to do — for AccessDenied, the IAM action that is missing.

A reboot roll drives three things around each host, in this order:

    before_reboot: deregister from target groups / classic ELBs, wait for draining,
                   then (optionally) enter ASG Standby — lowering MinSize if needed
    after_healthy: exit Standby, restore MinSize, register again, wait until healthy

and remembers every step it took, so `restore_all()` (run in a finally) can undo
whatever a failure or Ctrl-C left half-done.
"""

from __future__ import annotations

import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from fabdeploy.adapters import boto
from fabdeploy.basics.config import AWSConfig, Config, Host
from fabdeploy.basics.errors import AWSError
from fabdeploy.basics.poll import poll

POLL = 1.0  # seconds between AWS polls; tests lower it (moto answers at once)
DRAIN_MARGIN = 30.0  # past the deregistration delay, AWS should have finished draining


# IAM service prefix of each boto3 client, to name the missing permission on AccessDenied.
_IAM_PREFIX = {
    "ec2": "ec2",
    "autoscaling": "autoscaling",
    "elbv2": "elasticloadbalancing",
    "elb": "elasticloadbalancing",
}


class Clients:
    """boto3 clients for one deploy.yml, made on first use and shared across threads."""

    def __init__(self, cfg: Config) -> None:
        aws = cfg.aws or AWSConfig()
        self.aws = aws
        self.region = aws.region or cfg.s3.region
        self.config_path = cfg.path
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        if self.aws.endpoint_url:
            return f"{self.aws.endpoint_url} ({self.region or 'default region'})"
        return f"region {self.region or '(default)'}"

    def get(self, service: str) -> Any:
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self._make(service)
            return self._clients[service]

    def _make(self, service: str) -> Any:
        import boto3
        import botocore.config
        import botocore.exceptions

        try:
            session = boto3.Session(profile_name=self.aws.profile, region_name=self.region)
        except botocore.exceptions.ProfileNotFound:
            raise AWSError(
                f"AWS profile {self.aws.profile!r} (aws.profile in {self.config_path}) not found "
                "in ~/.aws/config or ~/.aws/credentials: create it or fix aws.profile"
            ) from None
        if session.region_name is None:
            raise AWSError(
                f"no AWS region for {service}: set aws.region (or s3.region) in {self.config_path}"
            )
        conf = botocore.config.Config(
            connect_timeout=5, read_timeout=30, retries={"max_attempts": 5, "mode": "standard"}
        )
        return session.client(service, endpoint_url=self.aws.endpoint_url, config=conf)

    def call(self, service: str, op: str, what: str, **params: Any) -> dict[str, Any]:
        """One API call; any failure becomes an AWSError saying `what` we were doing."""
        try:
            return getattr(self.get(service), op)(**params)
        except AWSError:
            raise
        except Exception as e:
            raise self.error(e, service, what) from None

    def pages(self, service: str, op: str, key: str, what: str, **params: Any) -> list[Any]:
        try:
            out: list[Any] = []
            for page in self.get(service).get_paginator(op).paginate(**params):
                out.extend(page.get(key, []))
            return out
        except AWSError:
            raise
        except Exception as e:
            raise self.error(e, service, what) from None

    def wait(
        self, service: str, waiter: str, what: str, *, timeout: float, **params: Any
    ) -> tuple[bool, dict[str, Any]]:
        """botocore's waiter `waiter`, asking every POLL s for up to `timeout` s: (done, the
        last answer). An API error (not a "not yet") becomes an AWSError saying `what`."""
        import botocore.exceptions as bex

        attempts = max(2, math.ceil(timeout / POLL) + 1)
        try:
            self.get(service).get_waiter(waiter).wait(
                WaiterConfig={"Delay": POLL, "MaxAttempts": attempts}, **params
            )
            return True, {}
        except bex.WaiterError as e:
            last = e.last_response or {}
            if "Error" in last and "Max attempts exceeded" not in str(e.kwargs.get("reason")):
                op = self.get(service).get_waiter(waiter).config.operation
                raise self.error(bex.ClientError(last, op), service, what) from None
            return False, last
        except AWSError:
            raise
        except Exception as e:
            raise self.error(e, service, what) from None

    def error(self, exc: BaseException, service: str, what: str) -> AWSError:
        f = boto.classify(exc)
        if f.kind == boto.NO_CREDENTIALS:
            return AWSError(
                f"no AWS credentials found while {what}: set AWS_PROFILE/AWS_ACCESS_KEY_ID "
                f"or aws.profile in {self.config_path}"
            )
        if f.kind == boto.UNREACHABLE:
            return AWSError(
                f"cannot reach AWS {service} at {self.where} while {what}: "
                "check the network, aws.region and aws.endpoint_url"
            )
        if f.kind == boto.DENIED:
            perm = f"{_IAM_PREFIX.get(service, service)}:{f.operation or '?'}"
            return AWSError(
                f"access denied while {what} at {self.where}: the credentials lack IAM "
                f"permission {perm}; add it to the deploy role/user's policy"
            )
        if f.kind == boto.BAD_CREDENTIALS:
            return AWSError(
                f"AWS rejected the credentials ({f.code}) while {what} at {self.where}: "
                "check AWS_PROFILE/AWS_ACCESS_KEY_ID or aws.profile"
            )
        if f.code:
            return AWSError(
                f"AWS {f.operation or '?'} failed while {what} at {self.where}: {f.code}: {f.message}"
            )
        if f.kind in (boto.API, boto.SLOW):
            return AWSError(f"AWS {service} failed while {what} at {self.where}: {f.message}")
        return AWSError(f"AWS {service} failed while {what}: {f.message}")


# --- discovery ------------------------------------------------------------------


def _roles_of(inst: dict[str, Any], tag: str | None) -> tuple[str, ...]:
    """An instance's roles: the comma-separated value of its aws.role_tag tag (none without one)."""
    if not tag:
        return ()
    value = _tags(inst).get(tag) or ""
    return tuple(dict.fromkeys(r.strip() for r in value.split(",") if r.strip()))


def _tags(inst: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in inst.get("Tags", [])}


def _address_of(inst: dict[str, Any], address: str) -> str | None:
    if address.startswith("tag:"):
        return _tags(inst).get(address[4:]) or None
    key = {
        "private_ip": "PrivateIpAddress",
        "public_ip": "PublicIpAddress",
        "public_dns": "PublicDnsName",
        "private_dns": "PrivateDnsName",
    }[address]
    return inst.get(key) or None


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def valid_address(addr: str) -> bool:
    """A host name (an ssh_config alias counts: letters, digits, '-', '_', dots) or an IP address.

    Discovered names come from tags anyone with ec2:CreateTags can set, and become SSH targets:
    `ops@evil.example:2222`, `-oProxyCommand=...` or a space must not."""
    import ipaddress

    try:
        ipaddress.ip_address(addr)
        return True
    except ValueError:
        pass
    name = addr[:-1] if addr.endswith(".") else addr
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def discover(cfg: Config, clients: Clients | None = None) -> list[Host]:
    """The in-service instances named by aws.autoscaling_groups and/or aws.tag_filters.

    Both given: instances of those groups that also carry the tags (tags narrow a
    group, e.g. role=web). Tags only: running instances; those in an ASG count only
    while InService (not Pending, Standby, Terminating).
    """
    aws = cfg.aws
    if aws is None or not aws.discovers:
        return []
    c = clients or Clients(cfg)
    ids: list[str] | None = None
    if aws.autoscaling_groups:
        ids = _group_instances(cfg, c, aws.autoscaling_groups)
    filters = [{"Name": "instance-state-name", "Values": ["running"]}]
    filters += [{"Name": f"tag:{k}", "Values": list(v)} for k, v in aws.tag_filters.items()]
    params: dict[str, Any] = {"Filters": filters}
    if ids is not None:
        if not ids:
            return _no_instances(cfg, c)
        params["InstanceIds"] = ids
    reservations = c.pages(
        "ec2",
        "describe_instances",
        "Reservations",
        "listing the fleet's instances (ec2:DescribeInstances)",
        **params,
    )
    instances = [i for r in reservations for i in r.get("Instances", [])]
    if ids is None and instances:
        instances = _drop_not_in_service(c, instances)
    if not instances:
        return _no_instances(cfg, c)
    hosts: list[Host] = []
    for inst in sorted(instances, key=lambda i: i["InstanceId"]):
        iid = inst["InstanceId"]
        addr = _address_of(inst, aws.address)
        if addr is None:
            raise AWSError(
                f"instance {iid} has no {aws.address} (aws.address in {cfg.path}): pick an address "
                "every instance has, e.g. private_ip, or tag:Name with a Name tag on each"
            )
        if not valid_address(addr):
            raise AWSError(
                f"instance {iid} has {aws.address} {addr[:80]!r}, which is not a host name or IP "
                "address (no user@, :port, spaces or leading '-'); refusing to use it as a target: "
                f"fix the instance's tag, or pick another aws.address in {cfg.path}"
            )
        hosts.append(
            Host(
                name=addr,
                host=addr,
                instance_id=iid,
                roles=_roles_of(inst, aws.role_tag),
                az=inst.get("Placement", {}).get("AvailabilityZone"),
            )
        )
    dupes = sorted({h.name for h in hosts if [x.name for x in hosts].count(h.name) > 1})
    if dupes:
        raise AWSError(
            f"several instances share the address {', '.join(dupes)} (aws.address: {aws.address} in "
            f"{cfg.path}): give each a distinct tag, or address them by private_ip"
        )
    return sorted(hosts, key=lambda h: h.name)


def _group_instances(cfg: Config, c: Clients, names: Iterable[str]) -> list[str]:
    names = list(names)
    groups = c.pages(
        "autoscaling",
        "describe_auto_scaling_groups",
        "AutoScalingGroups",
        "reading auto scaling groups",
        AutoScalingGroupNames=names,
    )
    found = {g["AutoScalingGroupName"] for g in groups}
    missing = [n for n in names if n not in found]
    if missing:
        raise AWSError(
            f"auto scaling group {', '.join(missing)} not found at {c.where}: "
            f"check aws.autoscaling_groups and aws.region in {cfg.path}"
        )
    return [
        i["InstanceId"]
        for g in groups
        for i in g.get("Instances", [])
        if i.get("LifecycleState") == "InService"
    ]


def _drop_not_in_service(c: Clients, instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    in_asg = [i["InstanceId"] for i in instances if "aws:autoscaling:groupName" in _tags(i)]
    if not in_asg:
        return instances
    states = {s["InstanceId"]: s["LifecycleState"] for s in _asg_instances(c, in_asg)}
    return [
        i
        for i in instances
        if i["InstanceId"] not in states or states[i["InstanceId"]] == "InService"
    ]


def _asg_instances(c: Clients, ids: list[str]) -> list[dict[str, Any]]:
    return c.pages(
        "autoscaling",
        "describe_auto_scaling_instances",
        "AutoScalingInstances",
        "reading instances' auto scaling states",
        InstanceIds=ids,
    )


def _no_instances(cfg: Config, c: Clients) -> list[Host]:
    aws = cfg.aws
    assert aws is not None
    what = []
    if aws.autoscaling_groups:
        what.append(f"auto scaling group(s) {', '.join(aws.autoscaling_groups)}")
    if aws.tag_filters:
        what.append("tags " + ", ".join(f"{k}={'|'.join(v)}" for k, v in aws.tag_filters.items()))
    raise AWSError(
        f"no in-service instances in {' with '.join(what)} at {c.where}: is the group scaled to 0, "
        f"or are instances still launching? (check aws: in {cfg.path})"
    )


# --- batches: AZ spread and min healthy ----------------------------------------------


# --- traffic and standby around one host's reboot -------------------------------------


@dataclass
class _Undo:
    """What was changed for one instance and not yet put back."""

    target_groups: list[str] = field(default_factory=list)
    classic_elbs: list[str] = field(default_factory=list)
    standby_group: str | None = None
    restore_min: int | None = None


class Journal(Protocol):
    """Where Traffic records what it must undo, before each change, so a controller killed
    mid-roll leaves a record the next run can act on (ops/undo.py keeps it in S3)."""

    def save(self, state: dict[str, dict[str, Any]]) -> None: ...


class Traffic:
    """Deregister/standby a host before its reboot, put it back once healthy, undo on failure."""

    def __init__(
        self,
        cfg: Config,
        log: Callable[[Host, str], None] | None = None,
        clients: Clients | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.aws = cfg.aws or AWSConfig()
        self.c = clients or (Clients(cfg) if cfg.aws else None)
        self.log = log or (lambda host, msg: print(f"{host.name}: {msg}", flush=True))
        self._undo: dict[str, tuple[Host, _Undo]] = {}
        self._lock = threading.Lock()
        # Lowering MinSize is read-modify-write on the group: one host at a time per run.
        self._group_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.c is not None and bool(
            self.aws.target_groups or self.aws.classic_elbs or self.aws.standby
        )

    def _record(self, host: Host | None = None, iid: str | None = None, **pending: Any) -> None:
        """Save everything still to undo, plus `pending` (the change about to be made) for `iid`."""
        if self.journal is None:
            return
        with self._lock:
            state = {i: {"host": h.name, **asdict(u)} for i, (h, u) in self._undo.items()}
            if iid is not None and host is not None:
                entry = state.setdefault(iid, {"host": host.name, **asdict(_Undo())})
                for k, v in pending.items():
                    entry[k] = sorted({*entry[k], v}) if isinstance(entry[k], list) else v
            state = {
                i: e
                for i, e in state.items()
                if e["target_groups"]
                or e["classic_elbs"]
                or e["standby_group"]
                or e["restore_min"] is not None
            }
            self.journal.save(state)  # under the lock: saves land in the order of the changes

    def adopt(self, state: dict[str, dict[str, Any]]) -> list[Host]:
        """Take over what an earlier (killed) run recorded, so restore_all() puts it back."""
        hosts = []
        with self._lock:
            for iid, e in state.items():
                host = Host(name=e["host"], host=e["host"], instance_id=iid)
                self._undo[iid] = (
                    host,
                    _Undo(
                        list(e["target_groups"]),
                        list(e["classic_elbs"]),
                        e["standby_group"],
                        e["restore_min"],
                    ),
                )
                hosts.append(host)
        return hosts

    def _need_id(self, host: Host) -> str | None:
        if host.instance_id is None:
            self.log(
                host,
                "no instance id (a static host, not discovered from AWS): "
                "not deregistered from load balancers nor put in standby",
            )
        return host.instance_id

    @property
    def balances(self) -> bool:
        """Target groups or classic ELBs to take a host out of (what a hotfix/rollback uses)."""
        return self.c is not None and bool(self.aws.target_groups or self.aws.classic_elbs)

    def before_reboot(self, host: Host) -> None:
        if self.enabled:
            self.take_out(host, standby=self.aws.standby)

    def before_restart(self, host: Host) -> None:
        """A hotfix/rollback: out of the load balancers and drained; no standby for a restart."""
        if self.balances:
            self.take_out(host, standby=False)

    def take_out(self, host: Host, *, standby: bool) -> None:
        if (iid := self._need_id(host)) is None:
            return
        assert self.c is not None
        with self._lock:
            # A host rebooted again in the same run (--rollback-on-failure) keeps its pending undo.
            undo = self._undo.setdefault(iid, (host, _Undo()))[1]
        for arn in self.aws.target_groups:
            if self._tg_state(arn, iid) in ("unused", None):
                continue  # not registered there: nothing to drain, nothing to put back
            self._record(host, iid, target_groups=arn)
            self.c.call(
                "elbv2",
                "deregister_targets",
                f"deregistering {iid} from target group {arn}",
                TargetGroupArn=arn,
                Targets=[{"Id": iid}],
            )
            undo.target_groups.append(arn)
            self.log(host, f"deregistered from {_tg_name(arn)}; draining")
        for name in self.aws.classic_elbs:
            self._record(host, iid, classic_elbs=name)
            self.c.call(
                "elb",
                "deregister_instances_from_load_balancer",
                f"deregistering {iid} from classic load balancer {name}",
                LoadBalancerName=name,
                Instances=[{"InstanceId": iid}],
            )
            undo.classic_elbs.append(name)
            self.log(host, f"deregistered from classic ELB {name}")
        for arn in undo.target_groups:
            self._wait_drained(host, arn, iid)
        if standby:
            self._enter_standby(host, iid, undo)

    def after_healthy(self, host: Host) -> None:
        """Back in service (out of standby, registered) and healthy in every load balancer."""
        if not self.enabled or host.instance_id is None:
            return
        self._put_back(host, host.instance_id, wait=True)

    def restore_all(self) -> None:
        """Undo what any host still has pending (failure, Ctrl-C); report, never raise."""
        with self._lock:
            pending = list(self._undo.items())
        for iid, (host, _) in pending:
            try:
                self._put_back(host, iid, wait=False)
            except AWSError as e:
                print(
                    f"warning: could not restore {host.name} ({iid}): {e}",
                    file=sys.stderr,
                    flush=True,
                )

    def _put_back(self, host: Host, iid: str, wait: bool) -> None:
        assert self.c is not None
        with self._lock:
            entry = self._undo.get(iid)
        if entry is None:
            return
        undo = entry[1]
        if undo.standby_group:
            self._exit_standby(host, iid, undo)
        for arn in list(undo.target_groups):
            self.c.call(
                "elbv2",
                "register_targets",
                f"registering {iid} in target group {arn}",
                TargetGroupArn=arn,
                Targets=[{"Id": iid}],
            )
            self.log(host, f"registered in {_tg_name(arn)}")
            if wait:
                self._wait_tg_healthy(host, arn, iid)
            undo.target_groups.remove(arn)
        for name in list(undo.classic_elbs):
            self.c.call(
                "elb",
                "register_instances_with_load_balancer",
                f"registering {iid} with classic load balancer {name}",
                LoadBalancerName=name,
                Instances=[{"InstanceId": iid}],
            )
            if wait:
                self._wait_classic_in_service(host, name, iid)
            undo.classic_elbs.remove(name)
        with self._lock:
            self._undo.pop(iid, None)
        self._record()

    # --- target groups ---

    def _tg_state(self, arn: str, iid: str) -> str | None:
        assert self.c is not None
        return _tg_state_of(
            self.c.call(
                "elbv2",
                "describe_target_health",
                f"reading health of {iid} in target group {arn}",
                TargetGroupArn=arn,
                Targets=[{"Id": iid}],
            )
        )

    def _drain_limit(self, arn: str) -> float:
        assert self.c is not None
        r = self.c.call(
            "elbv2",
            "describe_target_group_attributes",
            f"reading target group {arn}",
            TargetGroupArn=arn,
        )
        attrs = {a["Key"]: a["Value"] for a in r.get("Attributes", [])}
        return float(attrs.get("deregistration_delay.timeout_seconds", 300))

    def _wait_drained(self, host: Host, arn: str, iid: str) -> None:
        limit = self._drain_limit(arn) + DRAIN_MARGIN
        assert self.c is not None
        done, last = self.c.wait(
            "elbv2",
            "target_deregistered",
            f"waiting for {iid} to drain from target group {arn}",
            timeout=limit,
            TargetGroupArn=arn,
            Targets=[{"Id": iid}],
        )
        if not done:
            self.log(
                host,
                f"still {_tg_state_of(last)} in {_tg_name(arn)} after {limit:.0f}s "
                "(deregistration delay + margin); going on anyway",
            )
            return
        self.log(host, f"drained from {_tg_name(arn)}")

    def _wait_tg_healthy(self, host: Host, arn: str, iid: str) -> None:
        assert self.c is not None
        done, last = self.c.wait(
            "elbv2",
            "target_in_service",
            f"waiting for {iid} to turn healthy in target group {arn}",
            timeout=self.aws.healthy_timeout,
            TargetGroupArn=arn,
            Targets=[{"Id": iid}],
        )
        if not done:
            raise AWSError(
                f"{host.name} ({iid}) is registered in target group {_tg_name(arn)} but still "
                f"{_tg_state_of(last)} after {self.aws.healthy_timeout:g}s (aws.healthy_timeout): "
                "check the target group's health check path/port against the app"
            )
        self.log(host, f"healthy in {_tg_name(arn)}")

    def _wait_classic_in_service(self, host: Host, name: str, iid: str) -> None:
        assert self.c is not None
        done, last = self.c.wait(
            "elb",
            "instance_in_service",
            f"waiting for {iid} to be InService in classic ELB {name}",
            timeout=self.aws.healthy_timeout,
            LoadBalancerName=name,
            Instances=[{"InstanceId": iid}],
        )
        if not done:
            state = next((s.get("State") for s in last.get("InstanceStates", [])), None)
            raise AWSError(
                f"{host.name} ({iid}) is registered with classic ELB {name} but still {state} "
                f"after {self.aws.healthy_timeout:g}s (aws.healthy_timeout): check its health check"
            )
        self.log(host, f"InService in classic ELB {name}")

    # --- standby ---

    def _lifecycle(self, iid: str) -> tuple[str | None, str | None]:
        assert self.c is not None
        rows = _asg_instances(self.c, [iid])
        return (
            (rows[0].get("AutoScalingGroupName"), rows[0].get("LifecycleState"))
            if rows
            else (None, None)
        )

    def _group(self, name: str) -> dict[str, Any]:
        assert self.c is not None
        groups = self.c.call(
            "autoscaling",
            "describe_auto_scaling_groups",
            f"reading auto scaling group {name}",
            AutoScalingGroupNames=[name],
        ).get("AutoScalingGroups", [])
        if not groups:
            raise AWSError(f"auto scaling group {name} disappeared at {self.c.where}")
        return groups[0]

    def _enter_standby(self, host: Host, iid: str, undo: _Undo) -> None:
        assert self.c is not None
        if undo.standby_group:
            return
        group_name, state = self._lifecycle(iid)
        if group_name is None:
            self.log(host, "not in an auto scaling group: no standby")
            return
        if state != "InService":
            raise AWSError(
                f"{host.name} ({iid}) is {state} in auto scaling group {group_name}, not InService: "
                "wait for the group to settle, then `fab deploy.roll --resume`"
            )
        with self._group_lock:
            g = self._group(group_name)
            # Standby lowers desired capacity (else the group launches a replacement); AWS refuses to go
            # below MinSize, so lower MinSize for the reboot and put it back afterwards.
            if g["DesiredCapacity"] - 1 < g["MinSize"]:
                self._record(host, iid, restore_min=g["MinSize"], standby_group=group_name)
                self.c.call(
                    "autoscaling",
                    "update_auto_scaling_group",
                    f"lowering MinSize of {group_name} for {iid}'s standby",
                    AutoScalingGroupName=group_name,
                    MinSize=g["DesiredCapacity"] - 1,
                )
                undo.restore_min = g["MinSize"]
                self.log(
                    host,
                    f"MinSize of {group_name} lowered {g['MinSize']} -> {g['DesiredCapacity'] - 1}",
                )
            self._record(host, iid, standby_group=group_name)
            self.c.call(
                "autoscaling",
                "enter_standby",
                f"putting {iid} into standby in {group_name}",
                AutoScalingGroupName=group_name,
                InstanceIds=[iid],
                ShouldDecrementDesiredCapacity=True,
            )
            undo.standby_group = group_name
        self._wait_lifecycle(host, iid, "Standby")
        self.log(host, f"in standby in {group_name}")

    def _exit_standby(self, host: Host, iid: str, undo: _Undo) -> None:
        assert self.c is not None and undo.standby_group
        group_name = undo.standby_group
        _, state = self._lifecycle(iid)
        if state in ("Standby", "EnteringStandby"):
            if state == "EnteringStandby":
                self._wait_lifecycle(host, iid, "Standby")
            self.c.call(
                "autoscaling",
                "exit_standby",
                f"taking {iid} out of standby in {group_name}",
                AutoScalingGroupName=group_name,
                InstanceIds=[iid],
            )
            self._wait_lifecycle(host, iid, "InService")
            self.log(host, f"out of standby, InService in {group_name}")
        undo.standby_group = None
        if undo.restore_min is not None:
            # Only after ExitStandby has raised desired capacity again, else MinSize > desired.
            with self._group_lock:
                self.c.call(
                    "autoscaling",
                    "update_auto_scaling_group",
                    f"restoring MinSize of {group_name} to {undo.restore_min}",
                    AutoScalingGroupName=group_name,
                    MinSize=undo.restore_min,
                )
            self.log(host, f"MinSize of {group_name} restored to {undo.restore_min}")
            undo.restore_min = None

    def _wait_lifecycle(self, host: Host, iid: str, want: str) -> None:
        # No botocore waiter for ASG lifecycle states: the one poll loop (basics/poll.py).
        got = poll(
            lambda: ((state := self._lifecycle(iid)[1]) == want, state),
            timeout=self.aws.healthy_timeout,
            interval=POLL,
        )
        if not got.done:
            raise AWSError(
                f"{host.name} ({iid}) is still {got.last}, not {want}, after "
                f"{self.aws.healthy_timeout:g}s; check the group's activity history"
            )


def _tg_state_of(answer: dict[str, Any]) -> str | None:
    """The target's state in a DescribeTargetHealth answer (None: not described)."""
    states = [
        d.get("TargetHealth", {}).get("State") for d in answer.get("TargetHealthDescriptions", [])
    ]
    return states[0] if states else None


def _tg_name(arn: str) -> str:
    # arn:aws:elasticloadbalancing:...:targetgroup/<name>/<id>
    parts = arn.split("/")
    return parts[1] if len(parts) >= 3 and parts[0].endswith("targetgroup") else arn


# --- the instance-refresh engine -----------------------------------------------------

_REFRESH_DONE = {"Successful", "Failed", "Cancelled", "RollbackSuccessful", "RollbackFailed"}


def _bar(pct: int, width: int = 30) -> str:
    filled = width * max(0, min(100, pct)) // 100
    return "[" + "#" * filled + "-" * (width - filled) + f"] {pct:3d}%"


def refresh_preferences(cfg: Config) -> dict[str, Any]:
    ir = (cfg.aws or AWSConfig()).instance_refresh
    # SkipMatching off: the launch template is unchanged by a deploy, yet every instance must be
    # replaced so it boots and pulls the newly published bundle.
    prefs: dict[str, Any] = {
        "MinHealthyPercentage": ir.min_healthy_percentage,
        "SkipMatching": False,
    }
    if ir.instance_warmup is not None:
        prefs["InstanceWarmup"] = ir.instance_warmup
    if ir.checkpoint_percentages:
        prefs["CheckpointPercentages"] = list(ir.checkpoint_percentages)
        if ir.checkpoint_delay is not None:
            prefs["CheckpointDelay"] = ir.checkpoint_delay
    return prefs


def start_refresh(cfg: Config, c: Clients, group: str) -> str:
    import botocore.exceptions as bex

    try:
        r = c.get("autoscaling").start_instance_refresh(
            AutoScalingGroupName=group, Strategy="Rolling", Preferences=refresh_preferences(cfg)
        )
    except bex.ClientError as e:
        code = e.response.get("Error", {}).get("Code")
        if code == "InstanceRefreshInProgress":
            raise AWSError(
                f"an instance refresh is already running on {group}: let it finish, or cancel it "
                f"(aws autoscaling cancel-instance-refresh --auto-scaling-group-name {group})"
            ) from None
        if code == "ResourceContention":
            raise AWSError(
                f"{group} is busy with another scaling activity: retry in a minute"
            ) from None
        raise c.error(e, "autoscaling", f"starting an instance refresh of {group}") from None
    except Exception as e:
        raise c.error(e, "autoscaling", f"starting an instance refresh of {group}") from None
    return str(r["InstanceRefreshId"])


def follow_refresh(
    cfg: Config,
    c: Clients,
    group: str,
    refresh_id: str,
    *,
    interactive: bool | None = None,
    ask: Callable[[str], str] = input,
    sleep: Callable[[float], None] = time.sleep,
    poll: float = 15.0,
) -> str:
    """Print progress until the refresh ends; returns its final status.

    Ctrl-C offers to cancel (a non-interactive run cancels), then keeps following
    until AWS reports the cancel done, so the exit code tells the truth.
    """
    interactive = sys.stdin.isatty() if interactive is None else interactive
    last: tuple[Any, ...] = ()
    cancelling = False
    while True:
        try:
            r = c.call(
                "autoscaling",
                "describe_instance_refreshes",
                f"following the instance refresh of {group}",
                AutoScalingGroupName=group,
                InstanceRefreshIds=[refresh_id],
            )
            refreshes = r.get("InstanceRefreshes", [])
            if not refreshes:
                raise AWSError(f"instance refresh {refresh_id} of {group} vanished at {c.where}")
            ref = refreshes[0]
            status = ref.get("Status", "?")
            pct = int(ref.get("PercentageComplete") or 0)
            left = ref.get("InstancesToUpdate")
            now = (status, pct, left)
            if now != last:
                tail = f", {left} instance(s) to update" if left is not None else ""
                reason = (
                    f": {ref['StatusReason']}"
                    if ref.get("StatusReason") and status not in ("Pending",)
                    else ""
                )
                print(f"{group} {_bar(pct)} {status}{tail}{reason}", flush=True)
                last = now
            if status in _REFRESH_DONE:
                return status
            sleep(poll)
        except KeyboardInterrupt:
            if cancelling:
                raise
            answer = "y"
            if interactive:
                try:
                    answer = (
                        ask(f"\ncancel the instance refresh of {group}? [y/N] ").strip().lower()
                    )
                except (KeyboardInterrupt, EOFError):
                    answer = "y"
            if answer not in ("y", "yes"):
                print(
                    "not cancelled; still following (the refresh goes on without us if you quit)",
                    flush=True,
                )
                continue
            c.call(
                "autoscaling",
                "cancel_instance_refresh",
                f"cancelling the instance refresh of {group}",
                AutoScalingGroupName=group,
            )
            print(
                f"cancelling the instance refresh of {group} (instances already replaced stay)",
                flush=True,
            )
            cancelling = True
