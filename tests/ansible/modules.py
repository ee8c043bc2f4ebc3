"""Running the collection's own modules with Ansible on this machine (connection local), and checking their
DOCUMENTATION says what their argument specs do."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.ansible.argspec import REPO

SIGNIFICANT = ("type", "required", "default", "elements")


def run(module: str, args: dict[str, Any], *flags: str) -> tuple[dict[str, Any], str]:
    """(the result of ``meshvm.mesh.<module>`` with ``args``, everything Ansible printed). -vvv: the output shows
    the module's arguments and the result keeps its diffs."""
    with tempfile.TemporaryDirectory() as tree:
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.builtin.tree",
            "ANSIBLE_CALLBACK_TREE_DIR": tree,
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        }
        argv = [str(Path(sys.executable).parent / "ansible"), "localhost", "-c", "local", "-vvv"]
        argv += ["-m", f"meshvm.mesh.{module}", "-a", json.dumps(args), *flags]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO, env=env)
        output = Path(tree, "localhost").read_text()
    result: dict[str, Any] = json.loads(output)
    result["ansible_exit"] = done.returncode
    return result, done.stdout + done.stderr + output


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def assert_documented(documented: dict[str, Any], spec: dict[str, dict[str, Any]]) -> None:
    """The documented options are the spec's, with the same type, requirement, default and element type."""
    assert sorted(documented) == sorted(spec)
    for name, option in spec.items():
        wanted = {k: option[k] for k in SIGNIFICANT if k in option}
        assert {k: documented[name][k] for k in SIGNIFICANT if k in documented[name]} == wanted, name


def documentation(path: Path) -> tuple[ModuleType, dict[str, Any]]:
    loaded = load(path)
    options: dict[str, Any] = yaml.safe_load(loaded.DOCUMENTATION)["options"]
    return loaded, options
