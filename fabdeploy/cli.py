"""How fabdeploy plugs into `fab`: the executor that makes `-H` mean "these hosts, one run".

Stock Fabric calls a task once per `-H` host with a Connection. fabdeploy's tasks work on
the whole target set at once (one pool, one table, one exit code), so `FleetExecutor` hands
the `-H` list to their `hosts` parameter instead. Invoke picks the executor class after the
fabfile is imported, so importing fabdeploy from a fabfile installs it (`install()`); a
project can also name it in its Fabric config (`tasks.executor_class:
fabdeploy.cli.FleetExecutor`). If neither happened, every fabdeploy task refuses to run
per host (`refuse_per_host_call`), so `-H` can never silently fan out.
"""

from __future__ import annotations

import sys
from typing import Any

from fabric.executor import Executor
from invoke import Call, Exit

EXECUTOR_PATH = "fabdeploy.cli.FleetExecutor"


def is_fabdeploy_task(task: Any) -> bool:
    return bool(getattr(task, "fabdeploy", False))


class FleetExecutor(Executor):
    """`fab -H web2 deploy.hotfix` means `fab deploy.hotfix --hosts=web2`: one run, one table.

    fabdeploy tasks never run once per host: one with a `hosts` parameter gets the -H list,
    one without (a stage selector) just runs once. Other tasks in the same fabfile (the app's
    own) keep Fabric's usual per-host calls.
    """

    def expand_calls(self, calls: list[Any], apply_hosts: bool = True) -> list[Any]:
        host_str = self.core[0].args.hosts.value if apply_hosts else None
        if not host_str:
            return super().expand_calls(calls, apply_hosts=apply_hosts)
        out = []
        for call in calls:
            if not isinstance(call, Call):
                call = Call(task=call)
            takes_hosts = "hosts" in call.task.argspec(call.task.body).parameters
            if takes_hosts or is_fabdeploy_task(call.task):
                if takes_hosts:
                    given = call.kwargs.get("hosts")
                    if given and _names(given) != _names(host_str):
                        raise Exit(f"error: -H {host_str} and --hosts={given} name different hosts; "
                                   "give one of them", 1)
                    call.kwargs["hosts"] = host_str
                out.extend(super().expand_calls(call.pre, apply_hosts=False))
                out.append(call)
                out.extend(super().expand_calls(call.post, apply_hosts=False))
            else:
                out.extend(super().expand_calls([call], apply_hosts=True))
        return out


def _names(hosts: str) -> list[str]:
    return sorted(n.strip() for n in str(hosts).split(",") if n.strip())


def install() -> None:
    """Make a running `fab` use FleetExecutor, unless its config names another executor.

    Called when a fabfile imports fabdeploy: that happens inside `fab`'s collection loading,
    before Invoke instantiates the executor, so the class set here is the one used.
    """
    main = sys.modules.get("fabric.main")
    program = getattr(main, "program", None)
    if program is None:
        return
    if program.executor_class is Executor or program.executor_class is None:
        program.executor_class = FleetExecutor


def refuse_per_host_call(c: Any, name: str) -> None:
    """A fabdeploy task handed a per-host Connection: stock Fabric expanded -H. Refuse, once."""
    from fabric import Connection

    if isinstance(c, Connection):
        raise Exit(
            f"error: deploy.{name} got one Fabric connection per -H host: fabdeploy's executor is not "
            f"in charge. Import fabdeploy in your fabfile (`from fabdeploy import deploy`) or set "
            f"tasks.executor_class: {EXECUTOR_PATH} in fabric.yaml; or use --hosts after the task name",
            1,
        )
