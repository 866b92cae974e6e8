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

import dataclasses
import inspect
import sys
from pathlib import Path
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

    def execute(self, *tasks: Any) -> Any:
        results = super().execute(*tasks)
        if results and all(is_fabdeploy_task(t) for t in results):
            exit_now()
        return results

    def expand_calls(self, calls: list[Any], apply_hosts: bool = True) -> list[Any]:
        if apply_hosts:
            check_stage_order([getattr(c, "task", c) for c in calls])
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
                        raise Exit(
                            f"error: -H {host_str} and --hosts={given} name different hosts; "
                            "give one of them",
                            1,
                        )
                    call.kwargs["hosts"] = host_str
                out.extend(super().expand_calls(call.pre, apply_hosts=False))
                out.append(call)
                out.extend(super().expand_calls(call.post, apply_hosts=False))
            else:
                out.extend(super().expand_calls([call], apply_hosts=True))
        return out


def exit_now() -> None:
    """End a successful `fab` run of fabdeploy tasks without the interpreter's teardown.

    Freeing every object of boto3's models, paramiko and Fabric at exit took ~0.25 s, a tenth
    of a whole hotfix on a small fleet, after all the work and output are done. Only the `fab`
    console script does this: an embedding program (a test, a bench) keeps its normal exit.
    atexit handlers still run; any thread still alive is a connection nobody took (closed by
    the kernel as the process ends)."""
    import os

    if os.path.basename(sys.argv[0]) != "fab":
        return
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _names(hosts: str) -> list[str]:
    return sorted(n.strip() for n in str(hosts).split(",") if n.strip())


# --- stages: `fab production deploy.roll` ---------------------------------------------------
#
# A stage task (one per name in deploy.yml's `stages:`) runs first and records its name in the
# invocation's Config, which Invoke shares between all the tasks of one `fab` run.

STAGE_KEY = "fabdeploy_stage"
RAN_KEY = "fabdeploy_ran"


def check_stage_order(tasks: list[Any]) -> None:
    """Refuse `fab deploy.roll production` (stage second) and two stages, before anything runs."""
    stage = ran = None
    for t in tasks:
        name = getattr(t, "fabdeploy_stage", None)
        if name is not None:
            if ran is not None:
                raise Exit(
                    f"error: stage {name} comes after {ran}; name the stage first: fab {name} {ran}",
                    1,
                )
            if stage is not None and stage != name:
                raise Exit(
                    f"error: two stages in one run ({stage}, {name}); deploy one stage per run", 1
                )
            stage = name
        elif is_fabdeploy_task(t) and ran is None:
            ran = getattr(t, "fabdeploy_name", None) or getattr(t, "name", "a fabdeploy task")


def select_stage(c: Any, name: str) -> None:
    """The stage task's body: later fabdeploy tasks of this run work on `name`."""
    fc = c.config
    ran, chosen = fc.get(RAN_KEY), fc.get(STAGE_KEY)
    if ran:
        raise Exit(
            f"error: stage {name} comes after deploy.{ran}; name the stage first: fab {name} deploy.{ran}",
            1,
        )
    if chosen and chosen != name:
        raise Exit(f"error: two stages in one run ({chosen}, {name}); deploy one stage per run", 1)
    fc[STAGE_KEY] = name


def mark_ran(c: Any, name: str) -> str | None:
    """A fabdeploy task starts: no stage may follow it. Returns the stage chosen so far."""
    fc = getattr(c, "config", None)
    if fc is None or not hasattr(fc, "get"):
        return None
    fc[RAN_KEY] = name
    return fc.get(STAGE_KEY)


def _add_stage_tasks(collection: Any, tasks: list[Any]) -> None:
    for t in tasks:
        if t.name not in collection.tasks and t.name not in collection.collections:
            collection.add_task(t)


def install(stage_tasks: Any = None) -> None:
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
    if stage_tasks is not None and not getattr(program, "_fabdeploy_stages", False):
        # Stage names live in deploy.yml, found from the fabfile's folder: known only once the
        # collection is loaded, so the stage tasks join the root collection just before parsing.
        program._fabdeploy_stages = True
        make_parser = program._make_parser

        def _make_parser() -> Any:
            _add_stage_tasks(program.collection, stage_tasks(config_start(program.config)))
            return make_parser()

        program._make_parser = _make_parser


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


# --- Fabric's own flags: honoured, or refused with one line -------------------------------
#
# Precedence: the command line, then deploy.yml, then Fabric's config files (~/.fabric.yaml,
# -f, FABRIC_* env). `fab` puts command-line flags at the config's override level, which is
# how a flag is told apart from the same setting in a file.

_REFUSED = {
    "pty": "-p/--pty: the node program talks JSON over a plain channel; drop -p",
    "warn": "-w/--warn-only: every host already runs and every failure is reported, with a non-zero "
    "exit; -w would hide a failed deploy, so drop it",
    "hide": "--hide: fabdeploy prints one table per run and never streams remote output; drop --hide",
}


def _overrides(fc: Any) -> dict[str, Any]:
    return getattr(fc, "_overrides", None) or {}


def check_flags(fc: Any, name: str, takes_dry_run: bool) -> bool:
    """Refuse flags we can't honour; returns True when -R/--dry asks for a dry run."""
    run = _overrides(fc).get("run") or {}
    for flag, message in _REFUSED.items():
        if run.get(flag):
            raise Exit(f"error: deploy.{name} does not take {message}", 1)
    if (_overrides(fc).get("sudo") or {}).get("password") is not None and not _uses_sudo(fc, name):
        raise Exit(
            f"error: deploy.{name} needs no sudo password: deploy.yml has no ssh.sudo: true "
            "(drop --prompt-for-sudo-password)",
            1,
        )
    if run.get("dry"):
        if not takes_dry_run:
            raise Exit(
                f"error: deploy.{name} has no dry run, and -R/--dry must change nothing: drop -R", 1
            )
        return True
    return False


def _uses_sudo(fc: Any, name: str) -> bool:
    """deploy.yml turns sudo on: ssh.sudo, or a deploy user (setup may need an admin's sudo)."""
    from fabdeploy.basics import config

    try:
        cfg = config.load(start=config_start(fc))
    except Exception:  # the task itself reports a bad deploy.yml, in one line
        return True
    return cfg.ssh.sudo or (name == "setup" and cfg.run_as is not None)


def takes(fn: Any, param: str) -> bool:
    return param in inspect.signature(fn).parameters


def apply_flags(cfg: Any, fc: Any) -> Any:
    """deploy.yml's Config with Fabric's flags and config files applied, in our precedence."""
    from fabric import Config as FabricConfig

    if not isinstance(fc, FabricConfig):  # `inv`, or a library caller: nothing from Fabric to apply
        return cfg
    over = _overrides(fc)
    okw = over.get("connect_kwargs") or {}
    ssh = cfg.ssh
    changes: dict[str, Any] = {}
    if okw.get("key_filename"):  # -i (repeatable)
        changes["identity_files"] = tuple(Path(p) for p in okw["key_filename"])
    if okw.get("timeout"):  # -t
        changes["connect_timeout"] = float(okw["timeout"])
    elif "ssh.connect_timeout" not in cfg.given and fc.timeouts.connect:
        changes["connect_timeout"] = float(fc.timeouts.connect)
    if (over.get("timeouts") or {}).get("command"):  # -T
        changes["command_timeout"] = float(over["timeouts"]["command"])
    elif "ssh.command_timeout" not in cfg.given and fc.timeouts.command:
        changes["command_timeout"] = float(fc.timeouts.command)
    runtime = getattr(fc, "_runtime_ssh_path", None)
    if runtime and runtime != fc.get("ssh_config_path"):  # -S
        changes["config"] = Path(runtime)
    elif runtime and "ssh.config" not in cfg.given:
        changes["config"] = Path(runtime)
    return dataclasses.replace(cfg, ssh=dataclasses.replace(ssh, **changes), fabric=fc)


def config_start(fc: Any) -> Path | None:
    """Where to look for deploy.yml: the current folder, or the fabfile's when `fab -r` found it elsewhere."""
    prefix = getattr(fc, "_project_prefix", None) if fc is not None else None
    if not prefix:
        return None
    project = Path(prefix).resolve()
    here = Path.cwd().resolve()
    return None if here == project or project in here.parents else project
