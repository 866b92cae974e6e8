"""The AWS fleet integration on a sandbox fleet, with moto's server as EC2/ASG/ELBv2.

The sandbox's local S3 is moto's server, which serves EC2, Auto Scaling and ELBv2 on
the same endpoint. In it: an ASG of 3 fake instances tagged Name=web1..web3 (moto's
instances have fake IPs, so deploy.yml addresses them by `tag:Name`, resolved through
the sandbox's ssh_config to the real sshd hosts), and a target group holding them.
The real `fab` CLI then discovers the fleet from the ASG and rolls it with real
reboots. What moto does not model: draining (a deregistered target is `unused` at
once, the deregistration delay is not honoured), health checks (a registered target
is `healthy` at once), Entering/ExitingStandby transitions. So these tests check
the order of our calls against the sandbox's real reboots, not AWS's timing.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from fleet_helpers import Fleet, can_run_sandbox, start_fleet, wait_for

from fabfile import sandbox

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(can_run_sandbox()), reason=can_run_sandbox() or ""),
]

HOSTS = ("web1", "web2", "web3")
GROUP = "shop-web"


class World:
    """The moto side: clients, the group, the instances (by host name), the target group."""

    def __init__(self, endpoint: str) -> None:
        kw = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        self.ec2 = boto3.client("ec2", **kw)
        self.asg = boto3.client("autoscaling", **kw)
        self.elbv2 = boto3.client("elbv2", **kw)
        ami = self.ec2.describe_images()["Images"][0]["ImageId"]
        self.ec2.create_launch_template(
            LaunchTemplateName=GROUP,
            LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.micro"},
        )
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName=GROUP,
            LaunchTemplate={"LaunchTemplateName": GROUP},
            MinSize=3,
            MaxSize=4,
            DesiredCapacity=3,
            AvailabilityZones=["us-east-1a"],
        )
        ids = sorted(i["InstanceId"] for i in self.group()["Instances"])
        self.ids = dict(zip(HOSTS, ids, strict=True))
        for name, iid in self.ids.items():
            self.ec2.create_tags(Resources=[iid], Tags=[{"Key": "Name", "Value": name}])
        vpc = self.ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
        self.tg = self.elbv2.create_target_group(
            Name="shop", Protocol="HTTP", Port=8080, VpcId=vpc
        )["TargetGroups"][0]["TargetGroupArn"]
        self.elbv2.modify_target_group_attributes(
            TargetGroupArn=self.tg,
            Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": "5"}],
        )
        self.elbv2.register_targets(TargetGroupArn=self.tg, Targets=[{"Id": i} for i in ids])

    def group(self) -> dict[str, Any]:
        return self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])[
            "AutoScalingGroups"
        ][0]

    def snapshot(self) -> tuple[float, dict[str, str], dict[str, str]]:
        """(wall time, target state by host, lifecycle state by host)."""
        t = time.time()
        health = self.elbv2.describe_target_health(
            TargetGroupArn=self.tg, Targets=[{"Id": i} for i in self.ids.values()]
        )["TargetHealthDescriptions"]
        by_id = {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in health}
        life = {
            i["InstanceId"]: i["LifecycleState"]
            for i in self.asg.describe_auto_scaling_instances(InstanceIds=list(self.ids.values()))[
                "AutoScalingInstances"
            ]
        }
        return (
            t,
            {h: by_id[i] for h, i in self.ids.items()},
            {h: life[i] for h, i in self.ids.items()},
        )


class Recorder(threading.Thread):
    """Target health and lifecycle state over time, polled from the test while fab runs."""

    def __init__(self, world: World) -> None:
        super().__init__(daemon=True)
        self.world, self.samples, self._done = world, [], threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append(self.world.snapshot())
            time.sleep(0.03)

    def stop(self) -> list[tuple[float, dict[str, str], dict[str, str]]]:
        self._done.set()
        self.join(10)
        return self.samples


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("aws"), subnet="127.0.60", hosts=3, reboot_delay=0.3)
    try:
        f.fab("deploy.setup")
        yield f
    finally:
        sandbox.down(f.sb.dir)


@pytest.fixture(scope="module")
def world(fleet: Fleet) -> World:
    return World(fleet.sb.s3_endpoint)


def aws_config(fleet: Fleet, world: World, name: str, **extra: Any) -> Path:
    """The sandbox's deploy.yml with `hosts` replaced by discovery from the ASG."""
    data = yaml.safe_load(fleet.sb.deploy_yml.read_text())
    del data["hosts"]
    data["aws"] = {
        "region": "us-east-1",
        "endpoint_url": fleet.sb.s3_endpoint,
        "autoscaling_groups": [GROUP],
        "address": "tag:Name",
        "target_groups": [world.tg],
        "standby": True,
        "min_healthy": "66%",
        "healthy_timeout": 30,
    }
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    p = fleet.sb.deploy_yml.with_name(f"deploy-{name}.yml")
    p.write_text(yaml.safe_dump(data))
    return p


def test_status_discovers_the_group(fleet: Fleet, world: World) -> None:
    cfg = aws_config(fleet, world, "aws")
    r = fleet.fab("deploy.status", config=cfg)
    for h, iid in world.ids.items():
        line = next(ln for ln in r.stdout.splitlines() if f" {h} " in ln)
        assert iid in line and "us-east-1a" in line, r.stdout
    r = fleet.fab("deploy.status", f"--hosts={world.ids['web2']}", config=cfg)
    assert "web2" in r.stdout and "web1" not in r.stdout and "web3" not in r.stdout


def transitions(
    samples: list[tuple[float, dict[str, str], dict[str, str]]], host: str, which: int
) -> list[tuple[float, str]]:
    """(time first seen, state) for each change of one host's state; which=1 target health, 2 lifecycle."""
    out: list[tuple[float, str]] = []
    for s in samples:
        state = s[which][host]
        if not out or out[-1][1] != state:
            out.append((s[0], state))
    return out


def test_roll_deregisters_and_stands_by_each_host_around_its_reboot(
    fleet: Fleet, world: World
) -> None:
    cfg = aws_config(fleet, world, "aws")
    fleet.commit("roll behind the load balancer")
    boots_before = {h: len(fleet.boots(h)) for h in HOSTS}
    rec = Recorder(world)
    rec.start()
    try:
        r = fleet.fab("deploy.roll", config=cfg)
    finally:
        samples = rec.stop()
    commit = fleet.git("rev-parse", "HEAD")
    assert all(fleet.revision(h) == commit for h in HOSTS)
    for h in HOSTS:
        new = fleet.boots(h)[boots_before[h] :]
        assert len(new) == 1, (h, new)
        boot = new[0]
        health = transitions(samples, h, 1)
        life = transitions(samples, h, 2)
        # healthy -> out of the target group -> healthy again, exactly once per host...
        assert [s for _, s in health] == ["healthy", "unused", "healthy"], (h, health)
        assert [s for _, s in life] == ["InService", "Standby", "InService"], (h, life)
        # ...and the host was out of it for the whole reboot: deregistered (and in Standby)
        # before it went down, back in only after sshd was up again.
        assert health[1][0] < boot["down_at"] and health[2][0] > boot["sshd_ready"], (
            h,
            health,
            boot,
        )
        assert life[1][0] < boot["down_at"] and life[2][0] > boot["sshd_ready"], (h, life, boot)
        # Batch 1 and min_healthy 66%: the other two served throughout.
        during = [s for s in samples if boot["down_at"] <= s[0] <= boot["sshd_ready"]]
        assert during and all(s[1][o] == "healthy" for s in during for o in HOSTS if o != h)
    # Standby had to lower MinSize 3 -> 2; it is back.
    g = world.group()
    assert (g["MinSize"], g["DesiredCapacity"]) == (3, 3)
    assert "deregistered from shop" in r.stdout and "in standby in shop-web" in r.stdout


STAMPS = "/srv/shop/shared/stamps"


def stamps(fleet: Fleet, host: str) -> list[tuple[str, float]]:
    """(hook, wall time) of each hook run the node recorded, oldest first."""
    out = fleet.ssh(host, f"cat {STAMPS} 2>/dev/null; rm -f {STAMPS}", check=False)
    return [(w, float(t)) for w, t in (ln.split() for ln in out.splitlines() if ln.strip())]


def test_hotfix_and_rollback_take_each_host_out_of_the_target_group_around_its_restart(
    fleet: Fleet, world: World
) -> None:
    """No standby for a restart; one host at a time (min_healthy 66% of 3); each host's swap
    and restart happen while it is deregistered, it is registered again after, all end healthy."""
    hook = f"echo {{}} $(date +%s.%N) >> {STAMPS}"
    cfg = aws_config(
        fleet,
        world,
        "aws-hotfix",
        hooks={
            "before_swap": [hook.format("swap")],
            "after_restart": [hook.format("restart")],
        },
    )
    for h in HOSTS:
        stamps(fleet, h)
    new = fleet.commit("a hotfix behind the load balancer")
    for task in ("deploy.hotfix", "deploy.rollback"):
        rec = Recorder(world)
        rec.start()
        try:
            r = fleet.fab(task, config=cfg)
        finally:
            samples = rec.stop()
        assert all(f"batch {i}/3" in r.stdout for i in (1, 2, 3)), r.stdout
        for h in HOSTS:
            health = transitions(samples, h, 1)
            assert [s for _, s in health] == ["healthy", "unused", "healthy"], (task, h, health)
            assert {s for _, s in transitions(samples, h, 2)} == {"InService"}, (task, h)
            hooks = stamps(fleet, h)
            assert "restart" in [w for w, _ in hooks], (task, h, hooks)
            # Out of the target group for every swap and restart of this host, back in after.
            assert all(health[1][0] < t < health[2][0] for _, t in hooks), (task, h, health, hooks)
            # One host at a time: the others served while this one was out.
            during = [s for s in samples if health[1][0] < s[0] < health[2][0]]
            assert all(s[1][o] == "healthy" for s in during for o in HOSTS if o != h), (task, h)
        _, health_now, life = world.snapshot()
        assert health_now == dict.fromkeys(HOSTS, "healthy"), task
        assert life == dict.fromkeys(HOSTS, "InService"), task
        assert r.stdout.count("deregistered from shop") == 3 and "standby" not in r.stdout
        for h in HOSTS:
            assert (fleet.revision(h) == new) is (task == "deploy.hotfix"), (task, h)
    g = world.group()
    assert (g["MinSize"], g["DesiredCapacity"]) == (3, 3)


def test_failed_host_is_put_back_in_service(fleet: Fleet, world: World) -> None:
    """web1 does not come back in time: the roll stops, and web1 leaves Standby and rejoins the target group."""
    cfg = aws_config(fleet, world, "aws-short", roll={"reboot_timeout": 3})
    hold = sandbox.host_dir(fleet.sb.dir, "web1") / "hold"
    hold.touch()
    fleet.commit("a roll that fails")
    try:
        r = fleet.fab("deploy.roll", config=cfg, check=False)
        assert r.returncode != 0 and "did not come back within 3s" in r.stdout, r.stdout + r.stderr
        _, health, life = world.snapshot()
        assert health == dict.fromkeys(HOSTS, "healthy") and life == dict.fromkeys(
            HOSTS, "InService"
        )
        g = world.group()
        assert (g["MinSize"], g["DesiredCapacity"]) == (3, 3)
    finally:
        hold.unlink()
    wait_for(lambda: fleet._try_boot_id("web1"), timeout=60, what="web1 back")


def test_aws_errors_are_one_line(fleet: Fleet, world: World) -> None:
    cfg = aws_config(fleet, world, "aws-missing", aws={"autoscaling_groups": ["nope"]})
    r = fleet.fab("deploy.status", config=cfg, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"error: auto scaling group nope not found at {fleet.sb.s3_endpoint} (us-east-1): "
        f"check aws.autoscaling_groups and aws.region in {cfg}"
    )
