"""The node program, loaded as a file like on a host: the tests beside this file must not need
the fabdeploy package or the controller's dependencies (they also run under Python 3.8)."""

import importlib.util
import sys
from pathlib import Path

NODE_PY = Path(__file__).resolve().parents[2] / "fabdeploy" / "node" / "node.py"


def _load():
    spec = importlib.util.spec_from_file_location("fabdeploy_node_program", str(NODE_PY))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


node = _load()
