"""The action plugin meshvm.mesh.consul_acl_tokens: its argument spec and its documentation say the same thing."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.ansible.argspec import REPO


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _significant(option: dict[str, Any]) -> dict[str, Any]:
    return {k: option[k] for k in ("type", "required", "default", "choices", "elements") if k in option}


def test_the_documented_options_are_the_plugins_arguments() -> None:
    action = _load(REPO / "plugins" / "action" / "consul_acl_tokens.py", "consul_acl_tokens_action")
    docs = _load(REPO / "plugins" / "modules" / "consul_acl_tokens.py", "consul_acl_tokens_docs")
    documented = yaml.safe_load(docs.DOCUMENTATION)["options"]
    assert sorted(documented) == sorted(action.ARGS)
    for name, option in action.ARGS.items():
        assert _significant(documented[name]) == _significant(option), name
    assert action.ARGS["issuer_token"]["no_log"] is True
