"""fabdeploy/adapters/aws.py: the aws: config section, discovery, traffic/standby, batches, instance refresh.

Two kinds of AWS here, and each test says which:
- moto's server (the session fixture `s3_server`: a real HTTP process that also
  serves EC2, Auto Scaling and ELBv2) for what moto implements: ASGs, instances,
  tags, target groups, EnterStandby/ExitStandby, DescribeAutoScalingInstances.
  Moto has no draining (a deregistered target is `unused` at once) and no
  EnteringStandby/Pending states, so waits are only exercised in their trivial case there.
- botocore's Stubber where moto does not implement the API (StartInstanceRefresh,
  DescribeInstanceRefreshes, CancelInstanceRefresh) or cannot produce the answer
  (AccessDenied): these check the request sequence and parameters we send, not AWS.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from fabdeploy.adapters import aws
from fabdeploy.adapters.aws import AWSError, Clients, Traffic
from fabdeploy.adapters.store import Store
from fabdeploy.basics import config
from fabdeploy.basics.config import ConfigError, Host, S3Config
from fabdeploy.ops.batches import plan, spread_by_az
from fabdeploy.ops.targets import select_hosts
from fabdeploy.ops.undo import S3Journal, reconcile
from fabfile import sandbox

BASE = """\
app: shop
repo: .
s3: {bucket: b, region: us-east-1}
deploy_to: /srv/shop
"""


def load(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "deploy.yml"
    p.write_text(BASE + text)
    return config.load(p)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    return str(e.value)


# --- config ---------------------------------------------------------------------------


def test_aws_section_parses_and_hosts_become_optional(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """\
aws:
  region: eu-west-1
  autoscaling_groups: [shop-web]
  tag_filters: {role: web, env: [prod, staging]}
  address: tag:Name
  target_groups: [arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/shop/abc]
  standby: true
  min_healthy: 66%
  instance_refresh: {min_healthy_percentage: 80, instance_warmup: 60, checkpoint_percentages: [50, 100], checkpoint_delay: 120}
""",
    )
    assert cfg.hosts == ()
    a = cfg.aws
    assert a is not None and a.discovers and a.standby and a.min_healthy == "66%"
    assert a.tag_filters == {"role": ("web",), "env": ("prod", "staging")}
    assert a.instance_refresh.checkpoint_percentages == (50, 100)
    assert aws.refresh_preferences(cfg) == {
        "MinHealthyPercentage": 80,
        "SkipMatching": False,
        "InstanceWarmup": 60,
        "CheckpointPercentages": [50, 100],
        "CheckpointDelay": 120,
    }


def test_hosts_required_without_discovery(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "aws: {region: us-east-1, standby: true}\n")
    assert "missing required key 'hosts'" in msg and "aws.autoscaling_groups" in msg
    assert "missing required key 'hosts'" in error_of(tmp_path, "")


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("aws: {autoscaling_groups: [g], adress: private_ip}\n", "unknown key 'aws.adress'"),
        ("aws: {autoscaling_groups: [g], address: ipv6}\n", "aws.address must be private_ip"),
        ("aws: {autoscaling_groups: [g], min_healthy: 150%}\n", "aws.min_healthy must be"),
        ("aws: {autoscaling_groups: g}\n", "aws.autoscaling_groups must be a list"),
        (
            "aws: {autoscaling_groups: [g], instance_refresh: {checkpoint_percentages: [50, 20]}}\n",
            "aws.instance_refresh.checkpoint_percentages must be",
        ),
    ],
)
def test_aws_config_errors_are_one_line(tmp_path: Path, text: str, expect: str) -> None:
    msg = error_of(tmp_path, text)
    assert expect in msg and "\n" not in msg


# --- batches (pure) -------------------------------------------------------------------


def hosts_in(azs: dict[str, int]) -> list[Host]:
    return [
        Host(f"{az[-1]}{i}", f"{az[-1]}{i}", instance_id=f"i-{az[-1]}{i}", az=az)
        for az, n in azs.items()
        for i in range(1, n + 1)
    ]


def test_roll_order_interleaves_azs() -> None:
    hs = hosts_in({"us-east-1a": 3, "us-east-1b": 2, "us-east-1c": 1})
    assert [h.name for h in spread_by_az(hs)] == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_min_healthy_caps_the_batch_from_the_live_count(tmp_path: Path) -> None:
    cfg = load(tmp_path, "aws: {autoscaling_groups: [g], min_healthy: 66%}\n")
    hs = hosts_in({"us-east-1a": 3, "us-east-1b": 3})
    # 6 live, keep ceil(3.96)=4 -> at most 2 down at once, whatever --batch asks for.
    assert [len(b) for b in plan(cfg, hs, "50%", live=6).groups] == [2, 2, 2]
    assert [[h.az for h in b] for b in plan(cfg, hs, "3", live=6).groups][0] == [
        "us-east-1a",
        "us-east-1b",
    ]
    cfg2 = load(tmp_path, "aws: {autoscaling_groups: [g], min_healthy: 2}\n")
    with pytest.raises(
        ConfigError, match="aws.min_healthy 2 of 2 live host.* leaves none to take out"
    ):
        plan(cfg2, hs[:2], "1", live=2)


def test_a_batch_never_takes_every_host_of_an_az() -> None:
    hs = hosts_in({"us-east-1a": 2, "us-east-1b": 2})
    cfg = config.Config(
        path=Path("x"),
        app="a",
        repo=Path("."),
        s3=config.S3Config("b", "a"),
        deploy_to="/srv/a",
        hosts=(),
        aws=config.AWSConfig(autoscaling_groups=("g",)),
    )
    for b in plan(cfg, hs, "100%", live=4).groups:
        assert len({h.az for h in b}) == len(b)  # one per AZ in each batch


# --- against moto's server ------------------------------------------------------------


@pytest.fixture
def moto(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    for k, v in sandbox.AWS_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(aws, "POLL", 0.01)
    kw = {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}
    return {
        "endpoint": s3_server.endpoint,
        "ec2": boto3.client("ec2", **kw),
        "asg": boto3.client("autoscaling", **kw),
        "elbv2": boto3.client("elbv2", **kw),
    }


def make_group(
    moto: dict[str, Any], n: int = 3, min_size: int | None = None
) -> tuple[str, list[str], str]:
    """An ASG of n moto instances tagged Name=<group>-K and a target group holding them."""
    name = f"g-{uuid.uuid4().hex[:8]}"
    ec2, asg, elbv2 = moto["ec2"], moto["asg"], moto["elbv2"]
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.create_launch_template(
        LaunchTemplateName=name, LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.micro"}
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateName": name},
        MinSize=n if min_size is None else min_size,
        MaxSize=n + 1,
        DesiredCapacity=n,
        AvailabilityZones=["us-east-1a"],
    )
    ids = sorted(
        i["InstanceId"]
        for i in asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])[
            "AutoScalingGroups"
        ][0]["Instances"]
    )
    for k, iid in enumerate(ids, 1):
        ec2.create_tags(
            Resources=[iid],
            Tags=[{"Key": "Name", "Value": f"{name}-{k}"}, {"Key": "fleet", "Value": name}],
        )
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    tg = elbv2.create_target_group(Name=name, Protocol="HTTP", Port=8080, VpcId=vpc)[
        "TargetGroups"
    ][0]["TargetGroupArn"]
    elbv2.register_targets(TargetGroupArn=tg, Targets=[{"Id": i} for i in ids])
    return name, ids, tg


def aws_cfg(tmp_path: Path, moto: dict[str, Any], body: str) -> config.Config:
    return load(tmp_path, f"aws:\n  endpoint_url: {moto['endpoint']}\n  region: us-east-1\n{body}")


def test_discovery_from_asg_in_service_only_addressed_by_tag(
    tmp_path: Path, moto: dict[str, Any]
) -> None:
    """moto: DescribeAutoScalingGroups + DescribeInstances; a Standby instance is left out."""
    name, ids, _ = make_group(moto, 3, min_size=0)
    moto["asg"].enter_standby(
        AutoScalingGroupName=name, InstanceIds=[ids[2]], ShouldDecrementDesiredCapacity=True
    )
    cfg = aws_cfg(tmp_path, moto, f"  autoscaling_groups: [{name}]\n  address: tag:Name\n")
    hosts = aws.discover(cfg)
    assert [(h.name, h.host, h.instance_id, h.az) for h in hosts] == [
        (f"{name}-1", f"{name}-1", ids[0], "us-east-1a"),
        (f"{name}-2", f"{name}-2", ids[1], "us-east-1a"),
    ]
    # --hosts takes a name or an instance id.
    assert [h.name for h in select_hosts(cfg, f"{ids[1]},{name}-1")] == [f"{name}-2", f"{name}-1"]


def test_discovery_by_tags_and_private_ip(tmp_path: Path, moto: dict[str, Any]) -> None:
    """moto: DescribeInstances with tag filters; addresses are moto's fake private IPs."""
    name, ids, _ = make_group(moto, 2)
    cfg = aws_cfg(tmp_path, moto, f"  tag_filters: {{fleet: [{name}]}}\n")
    hosts = aws.discover(cfg)
    assert sorted(h.instance_id for h in hosts) == ids
    assert all(h.name == h.host and h.host.count(".") == 3 for h in hosts)


@pytest.mark.parametrize(
    "bad",
    [
        "ops@evil.example:2222",
        "evil.example:2222",
        "-oProxyCommand=touch /tmp/x",
        "web 1",
        "web1\nHost *",
    ],
)
def test_discovered_address_that_is_not_a_host_name_is_refused(
    tmp_path: Path, moto: dict[str, Any], bad: str
) -> None:
    """moto: a Name tag is anyone-with-ec2:CreateTags' input; it must not become user@host:port or an option."""
    name, ids, _ = make_group(moto, 2)
    moto["ec2"].create_tags(Resources=[ids[1]], Tags=[{"Key": "Name", "Value": bad}])
    cfg = aws_cfg(tmp_path, moto, f"  autoscaling_groups: [{name}]\n  address: tag:Name\n")
    with pytest.raises(AWSError) as e:
        aws.discover(cfg)
    msg = str(e.value)
    assert (
        msg.startswith(f"instance {ids[1]} has tag:Name ")
        and "not a host name or IP address" in msg
    )
    assert "\n" not in msg


def test_discovered_host_names_and_ips_are_accepted() -> None:
    for ok in ("10.0.0.1", "fe80::1", "ip-10-0-0-1.ec2.internal", "web_1", "web-1.example.com."):
        assert aws.valid_address(ok), ok
    for bad in ("a@b", "b:22", "-x", "a b", "", "a..b", "web-", "x" * 254):
        assert not aws.valid_address(bad), bad


def test_group_not_found_is_one_line(tmp_path: Path, moto: dict[str, Any]) -> None:
    cfg = aws_cfg(tmp_path, moto, "  autoscaling_groups: [no-such-group]\n")
    with pytest.raises(AWSError) as e:
        aws.discover(cfg)
    assert str(e.value).startswith("auto scaling group no-such-group not found at http://")
    assert "aws.autoscaling_groups" in str(e.value) and "\n" not in str(e.value)


def test_no_in_service_instances_is_one_line(tmp_path: Path, moto: dict[str, Any]) -> None:
    name, _, _ = make_group(moto, 1)
    moto["asg"].update_auto_scaling_group(AutoScalingGroupName=name, MinSize=0, DesiredCapacity=0)
    cfg = aws_cfg(tmp_path, moto, f"  autoscaling_groups: [{name}]\n")
    with pytest.raises(
        AWSError, match=f"no in-service instances in auto scaling group\\(s\\) {name} at "
    ):
        aws.discover(cfg)
    cfg2 = aws_cfg(tmp_path, moto, "  tag_filters: {fleet: [nothing-has-this]}\n")
    with pytest.raises(AWSError, match="no in-service instances in tags fleet=nothing-has-this"):
        aws.discover(cfg2)


def tg_state(moto: dict[str, Any], tg: str, iid: str) -> str:
    d = moto["elbv2"].describe_target_health(TargetGroupArn=tg, Targets=[{"Id": iid}])
    return d["TargetHealthDescriptions"][0]["TargetHealth"]["State"]


def group(moto: dict[str, Any], name: str) -> dict[str, Any]:
    return moto["asg"].describe_auto_scaling_groups(AutoScalingGroupNames=[name])[
        "AutoScalingGroups"
    ][0]


def lifecycle(moto: dict[str, Any], iid: str) -> str:
    return moto["asg"].describe_auto_scaling_instances(InstanceIds=[iid])["AutoScalingInstances"][
        0
    ]["LifecycleState"]


def test_traffic_deregisters_enters_standby_then_puts_back(
    tmp_path: Path, moto: dict[str, Any]
) -> None:
    """moto: DeregisterTargets/RegisterTargets, EnterStandby/ExitStandby, MinSize lowered and restored."""
    name, ids, tg = make_group(moto, 3)  # MinSize == desired: standby must lower MinSize
    cfg = aws_cfg(
        tmp_path,
        moto,
        f"  autoscaling_groups: [{name}]\n  target_groups: [{tg}]\n  standby: true\n",
    )
    host = next(h for h in aws.discover(cfg) if h.instance_id == ids[0])
    t = Traffic(cfg, log=lambda h, m: None)
    t.before_reboot(host)
    assert tg_state(moto, tg, ids[0]) == "unused" and lifecycle(moto, ids[0]) == "Standby"
    assert (group(moto, name)["MinSize"], group(moto, name)["DesiredCapacity"]) == (2, 2)
    assert tg_state(moto, tg, ids[1]) == "healthy"  # the others keep serving
    t.after_healthy(host)
    assert tg_state(moto, tg, ids[0]) == "healthy" and lifecycle(moto, ids[0]) == "InService"
    assert (group(moto, name)["MinSize"], group(moto, name)["DesiredCapacity"]) == (3, 3)
    t.restore_all()  # nothing pending: no calls, no change
    assert (group(moto, name)["MinSize"], group(moto, name)["DesiredCapacity"]) == (3, 3)


def test_restore_all_undoes_a_host_that_never_came_back(
    tmp_path: Path, moto: dict[str, Any]
) -> None:
    """moto: what run_roll's finally does after a failure or Ctrl-C mid-reboot."""
    name, ids, tg = make_group(moto, 2)
    cfg = aws_cfg(
        tmp_path,
        moto,
        f"  autoscaling_groups: [{name}]\n  target_groups: [{tg}]\n  standby: true\n",
    )
    hosts = {h.instance_id: h for h in aws.discover(cfg)}
    t = Traffic(cfg, log=lambda h, m: None)
    t.before_reboot(hosts[ids[1]])
    assert lifecycle(moto, ids[1]) == "Standby"
    t.restore_all()
    assert tg_state(moto, tg, ids[1]) == "healthy" and lifecycle(moto, ids[1]) == "InService"
    assert (group(moto, name)["MinSize"], group(moto, name)["DesiredCapacity"]) == (2, 2)


def test_target_not_registered_is_left_alone(tmp_path: Path, moto: dict[str, Any]) -> None:
    name, ids, tg = make_group(moto, 2)
    moto["elbv2"].deregister_targets(TargetGroupArn=tg, Targets=[{"Id": ids[0]}])
    cfg = aws_cfg(tmp_path, moto, f"  autoscaling_groups: [{name}]\n  target_groups: [{tg}]\n")
    host = next(h for h in aws.discover(cfg) if h.instance_id == ids[0])
    t = Traffic(cfg, log=lambda h, m: None)
    t.before_reboot(host)
    t.after_healthy(host)
    assert tg_state(moto, tg, ids[0]) == "unused"  # it was not in the LB, so it is not put in


def test_hotfix_drainer_takes_each_host_out_of_the_target_group_without_standby(
    tmp_path: Path, moto: dict[str, Any]
) -> None:
    """moto: a hotfix/rollback host is deregistered around its change (no standby), registered
    and healthy after it, also when the change failed; restore_all puts back a cut-short one."""
    from fabdeploy.adapters.traffic import Drainer, balanced

    name, ids, tg = make_group(moto, 3)
    cfg = aws_cfg(
        tmp_path,
        moto,
        f"  autoscaling_groups: [{name}]\n  target_groups: [{tg}]\n  standby: true\n",
    )
    assert balanced(cfg)
    hosts = {h.instance_id: h for h in aws.discover(cfg)}
    lines: list[str] = []
    d = Drainer(cfg, log=lines.append)
    assert d.enabled and d.lb is not None
    conn: Any = None  # no traffic.drain/restore commands: no connection is used
    seen = []
    with d.around(hosts[ids[0]], conn):
        seen.append((tg_state(moto, tg, ids[0]), lifecycle(moto, ids[0])))
        assert tg_state(moto, tg, ids[1]) == "healthy"
    assert seen == [("unused", "InService")]  # out of the LB, not in standby
    assert tg_state(moto, tg, ids[0]) == "healthy"
    assert any("out of traffic" in ln for ln in lines) and any(
        "back in traffic" in ln for ln in lines
    )
    with pytest.raises(RuntimeError), d.around(hosts[ids[1]], conn):
        raise RuntimeError("the change failed")
    assert tg_state(moto, tg, ids[1]) == "healthy"
    d.drain(hosts[ids[2]], conn)  # a Ctrl-C before its restore
    assert tg_state(moto, tg, ids[2]) == "unused"
    d.restore_all()
    assert tg_state(moto, tg, ids[2]) == "healthy"
    assert (group(moto, name)["MinSize"], group(moto, name)["DesiredCapacity"]) == (3, 3)


def test_no_load_balancers_no_drainer(tmp_path: Path, moto: dict[str, Any]) -> None:
    from fabdeploy.adapters.traffic import Drainer, balanced

    cfg = aws_cfg(tmp_path, moto, "  autoscaling_groups: [g]\n  standby: true\n")
    assert not balanced(cfg) and not Drainer(cfg).enabled


# --- Stubber: APIs moto lacks, answers moto cannot give ---------------------------------


def stubbed(cfg: config.Config, service: str) -> tuple[Clients, Stubber]:
    client = boto3.client(
        service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    c = Clients(cfg)
    c._clients[service] = client
    return c, Stubber(client)


def test_access_denied_names_the_missing_permission(tmp_path: Path) -> None:
    """Stubber: moto's server does not enforce IAM; an AccessDenied answer to DescribeAutoScalingGroups."""
    cfg = load(tmp_path, "aws: {autoscaling_groups: [web]}\n")
    c, stub = stubbed(cfg, "autoscaling")
    stub.add_client_error(
        "describe_auto_scaling_groups",
        service_error_code="AccessDenied",
        service_message="User: arn:aws:iam::1:user/ci is not authorized",
        http_status_code=403,
    )
    with stub, pytest.raises(AWSError) as e:
        aws.discover(cfg, c)
    msg = str(e.value)
    assert "access denied while reading auto scaling groups" in msg
    assert "IAM permission autoscaling:DescribeAutoScalingGroups" in msg and "\n" not in msg


def refresh_row(status: str, pct: int, left: int = 0) -> dict[str, Any]:
    return {
        "InstanceRefreshes": [
            {
                "InstanceRefreshId": "r-1",
                "AutoScalingGroupName": "web",
                "Status": status,
                "PercentageComplete": pct,
                "InstancesToUpdate": left,
            }
        ]
    }


def test_instance_refresh_request_sequence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stubber (moto's server has no StartInstanceRefresh): the start request's parameters
    and the following of its progress until Successful."""
    cfg = load(
        tmp_path,
        "aws:\n  autoscaling_groups: [web]\n  instance_refresh: {min_healthy_percentage: 75, "
        "instance_warmup: 30, checkpoint_percentages: [50, 100], checkpoint_delay: 60}\n",
    )
    c, stub = stubbed(cfg, "autoscaling")
    stub.add_response(
        "start_instance_refresh",
        {"InstanceRefreshId": "r-1"},
        expected_params={
            "AutoScalingGroupName": "web",
            "Strategy": "Rolling",
            "Preferences": {
                "MinHealthyPercentage": 75,
                "SkipMatching": False,
                "InstanceWarmup": 30,
                "CheckpointPercentages": [50, 100],
                "CheckpointDelay": 60,
            },
        },
    )
    q = {"AutoScalingGroupName": "web", "InstanceRefreshIds": ["r-1"]}
    for row in (
        refresh_row("Pending", 0, 4),
        refresh_row("InProgress", 50, 2),
        refresh_row("InProgress", 50, 2),
        refresh_row("Successful", 100),
    ):
        stub.add_response("describe_instance_refreshes", row, expected_params=q)
    with stub:
        rid = aws.start_refresh(cfg, c, "web")
        status = aws.follow_refresh(cfg, c, "web", rid, interactive=False, sleep=lambda s: None)
        stub.assert_no_pending_responses()
    assert status == "Successful"
    out = capsys.readouterr().out
    assert out.count("InProgress") == 1  # a line per change, not per poll
    assert "[###############---------------]  50% InProgress, 2 instance(s) to update" in out


def test_instance_refresh_ctrl_c_cancels_when_not_interactive(tmp_path: Path) -> None:
    """Stubber: Ctrl-C while following -> CancelInstanceRefresh, then follow until Cancelled."""
    cfg = load(tmp_path, "aws: {autoscaling_groups: [web]}\n")
    c, stub = stubbed(cfg, "autoscaling")
    stub.add_response("describe_instance_refreshes", refresh_row("InProgress", 20, 4))
    stub.add_response(
        "cancel_instance_refresh",
        {"InstanceRefreshId": "r-1"},
        expected_params={"AutoScalingGroupName": "web"},
    )
    stub.add_response("describe_instance_refreshes", refresh_row("Cancelling", 20, 4))
    stub.add_response("describe_instance_refreshes", refresh_row("Cancelled", 20, 4))
    calls = {"n": 0}

    def sleep(_: float) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    with stub:
        assert (
            aws.follow_refresh(cfg, c, "web", "r-1", interactive=False, sleep=sleep) == "Cancelled"
        )
        stub.assert_no_pending_responses()


def test_instance_refresh_ctrl_c_declined_keeps_following(tmp_path: Path) -> None:
    """Stubber: interactive Ctrl-C answered 'n' sends no cancel; a Failed refresh is reported."""
    cfg = load(tmp_path, "aws: {autoscaling_groups: [web]}\n")
    c, stub = stubbed(cfg, "autoscaling")
    stub.add_response("describe_instance_refreshes", refresh_row("InProgress", 20, 4))
    stub.add_response("describe_instance_refreshes", refresh_row("Failed", 40, 3))
    fired = []

    def sleep(_: float) -> None:
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt

    with stub:
        status = aws.follow_refresh(
            cfg, c, "web", "r-1", interactive=True, ask=lambda q: "n", sleep=sleep
        )
        stub.assert_no_pending_responses()
    assert status == "Failed"


TG = "arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/shop/abc"


def health_answer(state: str) -> dict[str, Any]:
    return {
        "TargetHealthDescriptions": [
            {"Target": {"Id": "i-1", "Port": 80}, "TargetHealth": {"State": state}}
        ]
    }


def test_a_target_that_never_turns_healthy_is_one_line_naming_group_and_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stubber: botocore's target_in_service waiter sees `initial` until aws.healthy_timeout."""
    monkeypatch.setattr(aws, "POLL", 0.01)
    cfg = load(
        tmp_path, f"aws: {{tag_filters: {{a: b}}, target_groups: [{TG}], healthy_timeout: 0.03}}\n"
    )
    c, stub = stubbed(cfg, "elbv2")
    for _ in range(5):
        stub.add_response(
            "describe_target_health",
            health_answer("initial"),
            {"TargetGroupArn": TG, "Targets": [{"Id": "i-1"}]},
        )
    t = Traffic(cfg, log=lambda h, m: None, clients=c)
    with stub, pytest.raises(AWSError) as e:
        t._wait_tg_healthy(Host("web1", "web1", instance_id="i-1"), TG, "i-1")
    assert str(e.value) == (
        "web1 (i-1) is registered in target group shop but still initial after 0.03s "
        "(aws.healthy_timeout): check the target group's health check path/port against the app"
    )


def test_an_api_error_while_waiting_names_the_missing_permission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stubber: the waiter's DescribeTargetHealth answered AccessDenied: no wait, one line."""
    monkeypatch.setattr(aws, "POLL", 0.01)
    cfg = load(tmp_path, f"aws: {{tag_filters: {{a: b}}, target_groups: [{TG}]}}\n")
    c, stub = stubbed(cfg, "elbv2")
    stub.add_client_error(
        "describe_target_health", service_error_code="AccessDenied", http_status_code=403
    )
    t = Traffic(cfg, log=lambda h, m: None, clients=c)
    with stub, pytest.raises(AWSError) as e:
        t._wait_tg_healthy(Host("web1", "web1", instance_id="i-1"), TG, "i-1")
    msg = str(e.value)
    assert msg.startswith(
        f"access denied while waiting for i-1 to turn healthy in target group {TG}"
    )
    assert "elasticloadbalancing:DescribeTargetHealth" in msg and "\n" not in msg


def test_a_target_still_draining_past_the_delay_is_a_note_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stubber: target_deregistered sees `draining` past deregistration delay + margin: go on."""
    monkeypatch.setattr(aws, "POLL", 0.01)
    monkeypatch.setattr(aws, "DRAIN_MARGIN", 0.0)
    cfg = load(tmp_path, f"aws: {{tag_filters: {{a: b}}, target_groups: [{TG}]}}\n")
    c, stub = stubbed(cfg, "elbv2")
    stub.add_response(
        "describe_target_group_attributes",
        {"Attributes": [{"Key": "deregistration_delay.timeout_seconds", "Value": "0.02"}]},
    )
    for _ in range(5):
        stub.add_response("describe_target_health", health_answer("draining"))
    lines: list[str] = []
    t = Traffic(cfg, log=lambda h, m: lines.append(m), clients=c)
    with stub:
        t._wait_drained(Host("web1", "web1", instance_id="i-1"), TG, "i-1")
    assert lines == [
        "still draining in shop after 0s (deregistration delay + margin); going on anyway"
    ]


def test_classic_elb_deregistered_around_a_restart_and_waited_in_service(
    tmp_path: Path, moto: dict[str, Any]
) -> None:
    """moto: DeregisterInstancesFromLoadBalancer / Register... and the instance_in_service waiter."""
    from fabdeploy.adapters.traffic import Drainer

    name, ids, _ = make_group(moto, 2)
    elb = boto3.client("elb", endpoint_url=moto["endpoint"], region_name="us-east-1")
    lb = f"lb-{uuid.uuid4().hex[:8]}"
    elb.create_load_balancer(
        LoadBalancerName=lb,
        Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstancePort": 8080}],
        AvailabilityZones=["us-east-1a"],
    )
    elb.register_instances_with_load_balancer(
        LoadBalancerName=lb, Instances=[{"InstanceId": i} for i in ids]
    )

    def state(iid: str) -> str:
        return elb.describe_instance_health(LoadBalancerName=lb, Instances=[{"InstanceId": iid}])[
            "InstanceStates"
        ][0]["State"]

    cfg = aws_cfg(tmp_path, moto, f"  autoscaling_groups: [{name}]\n  classic_elbs: [{lb}]\n")
    host = next(h for h in aws.discover(cfg) if h.instance_id == ids[0])
    lines: list[str] = []
    d = Drainer(cfg, log=lines.append)
    seen = []
    with d.around(host, None):  # type: ignore[arg-type]  # no traffic.drain command
        seen.append((state(ids[0]), state(ids[1])))
    assert seen == [("Unknown", "InService")] and state(ids[0]) == "InService"
    assert f"{host.name}: InService in classic ELB {lb}" in lines


def test_refresh_already_running_is_one_line(tmp_path: Path) -> None:
    """Stubber: StartInstanceRefresh answered InstanceRefreshInProgress."""
    cfg = load(tmp_path, "aws: {autoscaling_groups: [web]}\n")
    c, stub = stubbed(cfg, "autoscaling")
    stub.add_client_error(
        "start_instance_refresh",
        service_error_code="InstanceRefreshInProgress",
        service_message="An Instance Refresh is already in progress",
    )
    with (
        stub,
        pytest.raises(
            AWSError, match="an instance refresh is already running on web: let it finish"
        ),
    ):
        aws.start_refresh(cfg, c, "web")


def test_no_boto3_at_import() -> None:
    import subprocess
    import sys

    code = "import sys, fabdeploy, fabdeploy.adapters.aws, fabdeploy.ops.roll, fabdeploy.ops.refresh; print('boto3' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


# --- the undo state in S3: a controller killed mid-roll (issue 13 §2.10) ----------------------


@pytest.fixture
def undo_store(moto: dict[str, Any], s3_server: Any) -> Store:
    s3 = S3Config(s3_server.bucket, f"undo-{uuid.uuid4().hex[:8]}", "us-east-1", s3_server.endpoint)
    return Store(s3, "shop")


def undo_on_s3(store: Store) -> dict[str, Any] | None:
    return store.read_undo()[0]


def test_undo_state_is_in_s3_before_each_change_and_cleared_after(
    tmp_path: Path, moto: dict[str, Any], undo_store: Store
) -> None:
    """moto: every save lands before the change it records; nothing is left once the host is back."""
    name, ids, tg = make_group(moto, 3)
    cfg = aws_cfg(
        tmp_path,
        moto,
        f"  autoscaling_groups: [{name}]\n  target_groups: [{tg}]\n  standby: true\n",
    )
    host = next(h for h in aws.discover(cfg) if h.instance_id == ids[0])
    seen: list[tuple[dict[str, Any], str, int, str]] = []

    class Watching(S3Journal):
        def save(self, state: dict[str, dict[str, Any]]) -> None:
            seen.append(
                (
                    state,
                    lifecycle(moto, ids[0]),
                    group(moto, name)["MinSize"],
                    tg_state(moto, tg, ids[0]),
                )
            )
            super().save(state)

    t = Traffic(cfg, log=lambda h, m: None, journal=Watching(undo_store))
    t.before_reboot(host)
    recorded = undo_on_s3(undo_store)
    assert recorded is not None and recorded["instances"][ids[0]] == {
        "host": host.name,
        "target_groups": [tg],
        "classic_elbs": [],
        "standby_group": name,
        "restore_min": 3,
    }
    # recorded before the change: still registered / InService / MinSize 3 when each save landed
    assert seen[0][0][ids[0]]["target_groups"] == [tg] and seen[0][3] == "healthy"
    assert any(s[ids[0]].get("restore_min") == 3 and ms == 3 for s, _, ms, _ in seen)
    assert any(s[ids[0]].get("standby_group") == name and lc == "InService" for s, lc, _, _ in seen)
    t.after_healthy(host)
    assert undo_on_s3(undo_store) is None
    assert lifecycle(moto, ids[0]) == "InService" and group(moto, name)["MinSize"] == 3


def test_a_roll_killed_in_standby_is_put_back_by_the_next_run(
    tmp_path: Path, moto: dict[str, Any], undo_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """moto: the killed controller's in-memory undo is gone; the next run reads S3 and puts it all back."""
    name, ids, tg = make_group(moto, 3)
    cfg = aws_cfg(
        tmp_path,
        moto,
        f"  autoscaling_groups: [{name}]\n  target_groups: [{tg}]\n  standby: true\n",
    )
    host = next(h for h in aws.discover(cfg) if h.instance_id == ids[1])
    killed = Traffic(cfg, log=lambda h, m: None, journal=S3Journal(undo_store))
    killed.before_reboot(host)
    del killed  # kill -9: no restore_all
    assert lifecycle(moto, ids[1]) == "Standby" and group(moto, name)["MinSize"] == 2
    capsys.readouterr()
    reconcile(cfg, undo_store)
    out = capsys.readouterr().out.strip().splitlines()
    assert lifecycle(moto, ids[1]) == "InService" and tg_state(moto, tg, ids[1]) == "healthy"
    assert (group(moto, name)["MinSize"], group(moto, name)["DesiredCapacity"]) == (3, 3)
    assert undo_on_s3(undo_store) is None
    assert (
        len(out) == 1 and out[0].startswith("reconciled an interrupted roll (") and ids[1] in out[0]
    )
    reconcile(cfg, undo_store)  # nothing left: silent
    assert capsys.readouterr().out == ""


def test_a_hotfix_killed_while_a_host_is_deregistered_is_put_back_by_the_next_run(
    tmp_path: Path, moto: dict[str, Any], undo_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """moto: the hotfix's Drainer records the target group before deregistering; the next run
    (or deploy.unlock) reads S3 and registers the instance again, in one line."""
    from fabdeploy.adapters.traffic import Drainer
    from fabdeploy.ops.undo import drainer_for

    name, ids, tg = make_group(moto, 3)
    cfg = aws_cfg(tmp_path, moto, f"  autoscaling_groups: [{name}]\n  target_groups: [{tg}]\n")
    host = next(h for h in aws.discover(cfg) if h.instance_id == ids[1])
    killed = Drainer(cfg, log=lambda m: None, journal=S3Journal(undo_store, "hotfix"))
    killed.drain(host, None)  # type: ignore[arg-type]  # no traffic.drain command: no connection
    del killed  # kill -9: no restore_all
    recorded = undo_on_s3(undo_store)
    assert recorded is not None and recorded["action"] == "hotfix"
    assert recorded["instances"][ids[1]]["target_groups"] == [tg]
    assert tg_state(moto, tg, ids[1]) == "unused"
    capsys.readouterr()
    drainer_for(cfg, undo_store, "hotfix", held=object())
    out = capsys.readouterr().out.strip().splitlines()
    assert tg_state(moto, tg, ids[1]) == "healthy" and undo_on_s3(undo_store) is None
    assert len(out) == 1 and out[0].startswith("reconciled an interrupted hotfix ("), out
    assert f"{host.name} ({ids[1]})" in out[0] and "put back in traffic" in out[0]


@pytest.mark.parametrize(
    "body",
    [
        b"{oops",
        b"[" * 100_000,
        b'{"instances": {"i-1": {"host": "a@b:22", "target_groups": [], "classic_elbs": [],'
        b' "standby_group": null, "restore_min": null}}}',
    ],
)
def test_damaged_undo_state_is_one_warning(
    tmp_path: Path,
    moto: dict[str, Any],
    undo_store: Store,
    body: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = aws_cfg(tmp_path, moto, "  standby: true\n  tag_filters: {fleet: [x]}\n")
    undo_store.client.put_object(Bucket=undo_store.s3.bucket, Key=undo_store.undo_key, Body=body)
    reconcile(cfg, undo_store)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and undo_store.uri(undo_store.undo_key) in err[0] and "by hand" in err[0]
