"""This repo's fabfile: fabdeploy's tasks, plus the sandbox (a local fleet to try them on).

An app repo needs only the first two lines below; the sandbox is development tooling of
this repo and is not part of the installed library.
"""

from invoke import Collection, Exit, task

from fabdeploy import deploy
from fabdeploy.basics.errors import DeployError


def _sandbox_errors(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeployError as e:
            raise Exit(f"error: {e}", 1) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", 130) from None

    return wrapper


def _sandbox_dir(dir):
    from pathlib import Path

    return Path(dir) if dir else Path(__file__).resolve().parent.parent / ".sandbox"


@task(
    name="up",
    help={
        "hosts": "number of hosts (web1..webN)",
        "dir": "state dir (default .sandbox/)",
        "reboot_delay": "seconds a host stays down on reboot",
        "s3_port": "port of the local S3",
        "rtt": "network round trip between this machine and the fleet and its S3, "
        "e.g. 100ms, 0.1s or 100 (ms); 0 = none (no latency proxy)",
        "handshake": "with --rtt, charge one round trip per new TCP connection",
        "private_port": "the sample app also serves on this port, which --rtt's proxy does not "
        "forward: only the host itself reaches it (a node behind a bastion)",
        "private_net": "the hosts in their own network namespace, reachable from here only "
        "through a bastion host, gw (ssh_config: ProxyJump gw); they reach S3 over a veth pair",
    },
)
@_sandbox_errors
def sandbox_up(
    c,
    hosts=3,
    dir=None,
    reboot_delay=1.0,
    s3_port=9555,
    rtt="0",
    handshake=True,
    private_port=None,
    private_net=False,
):
    """Start a local fleet: N hosts with real sshd in namespaces, a local S3, a sample app."""
    from . import sandbox

    sb = sandbox.up(
        _sandbox_dir(dir),
        hosts=int(hosts),
        reboot_delay=float(reboot_delay),
        s3_port=int(s3_port),
        rtt=sandbox.parse_rtt(rtt),
        handshake=bool(handshake),
        private_port=int(private_port) if private_port else None,
        private_net=bool(private_net),
    )
    print(
        f"sandbox up: {', '.join(f'{n} ({ip})' for n, ip in sb.hosts.items())}; S3 at {sb.s3_endpoint}"
    )
    if sb.gateway:
        print(f"private network: reached through the bastion {sb.gateway} ({sb.gateway_ip})")
    if sb.rtt:
        print(
            f"latency: {sb.rtt * 1000:g} ms round trip to the hosts (ssh_config's HostName is the latency "
            f"path) and to S3; the hosts reach S3 directly at {sb.s3_direct}"
        )
    print(
        f"config: {sb.deploy_yml}\nshell:  . {sb.dir / 'env'}   # AWS creds + DEPLOY_CONFIG for fab"
    )


@task(name="down", help={"dir": "state dir (default .sandbox/)"})
@_sandbox_errors
def sandbox_down(c, dir=None):
    """Stop every process the sandbox started."""
    from . import sandbox

    stopped = sandbox.down(_sandbox_dir(dir))
    print(
        "sandbox down"
        + (f": stopped {', '.join(stopped)}" if stopped else " (nothing was running)")
    )


sandbox_ns = Collection("sandbox")
sandbox_ns.add_task(sandbox_up, "up")
sandbox_ns.add_task(sandbox_down, "down")

ns = Collection(deploy, sandbox_ns)
