"""Role variables -> the agent configuration, through meshvm's own model (meshvm.config.AgentConfig).

The role never describes the configuration a second time: these filters hand the variables to
``meshvm.config.parse_config`` and either return what the model made of them (every default filled in) or stop
the play with meshvm's one-line error naming the bad field. The controller needs the meshvm package (it is
in the same virtualenv as ansible-core when you follow the README).
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from ansible.errors import AnsibleFilterError

try:
    from meshvm.config import parse_config
    from meshvm.errors import MeshvmError
except ImportError as exc:  # pragma: no cover - depends on the controller's environment
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None


def _plain(value: Any) -> Any:
    """Ansible's tagged strings, ints and mappings as plain JSON types (what a YAML file would give meshvm)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise AnsibleFilterError(f"meshvm agent configuration: not plain data ({exc})") from exc


def meshvm_agent_config(data: Any, source: str = "meshvm_agent variables") -> dict[str, Any]:
    """Validate ``data`` with meshvm's AgentConfig; return the full configuration (defaults filled in)."""
    if _IMPORT_ERROR is not None:
        raise AnsibleFilterError(
            f"the meshvm package is not importable on the controller ({_IMPORT_ERROR}): run ansible-playbook from "
            "the virtualenv meshvm is installed in (pip install meshvm)"
        )
    try:
        config = parse_config(_plain(data), source)
    except MeshvmError as exc:
        # meshvm's message is the whole story (one line naming the field); the pydantic traceback is not.
        raise AnsibleFilterError(str(exc)) from None
    dumped: dict[str, Any] = config.model_dump(mode="json")
    return dumped


def meshvm_agent_config_yaml(data: Any, source: str = "meshvm_agent variables") -> str:
    """The same, as the YAML document `meshvm agent -c` reads."""
    return yaml.safe_dump(meshvm_agent_config(data, source), sort_keys=False, default_flow_style=False)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "meshvm_agent_config": meshvm_agent_config,
            "meshvm_agent_config_yaml": meshvm_agent_config_yaml,
        }
