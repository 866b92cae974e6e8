"""fabdeploy: bundle to S3, boot-time activation, reboot rolls and SSH hotfixes, on Fabric.

In an app repo, a two-line fabfile gives every task:

    from fabdeploy import deploy
    from invoke import Collection; ns = Collection(deploy)   # add your own tasks beside it

Layers (imports point down only): tasks.py → ops/ (the flows) → adapters/ (S3, git bundle,
SSH, the node program's protocol, AWS) → basics/ (config, errors, output). node/ is the
program that runs on hosts: standard library only, sharing nothing but its JSON protocol.
"""

from fabdeploy.tasks import deploy

__version__ = "0.2.0"
__all__ = ["deploy"]
