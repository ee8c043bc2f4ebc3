"""The meshvm_agent role's argument specs, derived from meshvm's configuration model.

The role hands its variables to meshvm.config.AgentConfig (through its filter plugin), so its
meta/argument_specs.yml must describe exactly that model: the same fields, types, choices, required fields and
defaults. ``model_options()`` derives those from the model; the test compares them with the role's file, and
``python -m tests.ansible.argspec`` prints them as YAML when the model grows a field.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from meshvm.config import AgentConfig, AgentSpec, ConsulSpec, EnvoySpec, IstioSpec, LocalitySpec, TracingSpec

REPO = Path(__file__).resolve().parents[2]
ARGUMENT_SPECS = REPO / "roles" / "meshvm_agent" / "meta" / "argument_specs.yml"

# Role variable -> (section of agent.yaml, model, fields the role sets itself and so does not take).
SECTIONS: dict[str, tuple[str, type[BaseModel], frozenset[str]]] = {
    "meshvm_agent_consul": ("consul", ConsulSpec, frozenset({"token_file"})),
    "meshvm_agent_envoy": ("envoy", EnvoySpec, frozenset()),
    "meshvm_agent_agent": ("agent", AgentSpec, frozenset()),
}
# Optional sections: null (the default) leaves them out of agent.yaml; set, their required fields are required.
OPTIONAL_SECTIONS: dict[str, tuple[str, type[BaseModel]]] = {
    "meshvm_agent_istio": ("istio", IstioSpec),
    "meshvm_agent_tracing": ("tracing", TracingSpec),
    "meshvm_agent_locality": ("locality", LocalitySpec),
}
SERVICES_VAR = "meshvm_agent_services"
# Top-level fields of AgentConfig and the role variables that carry them.
SCALARS = {"meshvm_agent_node": "node", "meshvm_agent_address": "address"}
# Python types of the model -> argument spec types.
SIMPLE_TYPES: dict[Any, str] = {Path: "path", bool: "bool", int: "int", float: "float", str: "str"}


def _is_duration(info: FieldInfo | None, annotation: Any) -> bool:
    metadata = list(info.metadata) if info is not None else []
    if typing.get_origin(annotation) is typing.Annotated:
        metadata += list(typing.get_args(annotation)[1:])
    return any(getattr(getattr(m, "func", None), "__name__", "") == "_duration" for m in metadata)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type without Optional/Annotated, whether None is allowed)."""
    nullable = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) != len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation, nullable


def _type_spec(annotation: Any, info: FieldInfo | None = None) -> dict[str, Any]:
    duration = _is_duration(info, annotation)
    inner, _ = _unwrap(annotation)
    if duration:
        return {"type": "raw"}
    if typing.get_origin(inner) is typing.Literal:
        return {"type": "str", "choices": list(typing.get_args(inner))}
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return {"type": "dict", "options": model_options(inner)}
    if typing.get_origin(inner) in (list, tuple):
        element = typing.get_args(inner)[0]
        element_spec = _type_spec(element)
        spec: dict[str, Any] = {"type": "list", "elements": element_spec["type"]}
        if "options" in element_spec:
            spec["options"] = element_spec["options"]
        return spec
    if typing.get_origin(inner) is dict or inner is dict:
        return {"type": "dict"}
    if inner in SIMPLE_TYPES:
        return {"type": SIMPLE_TYPES[inner]}
    raise TypeError(f"no argument spec type for {annotation!r}")


def field_spec(info: FieldInfo) -> dict[str, Any]:
    spec = _type_spec(info.annotation, info)
    if info.is_required():
        spec["required"] = True
        return spec
    if info.default_factory is None and info.default is not None:
        inner, _ = _unwrap(info.annotation)
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            annotated = typing.Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            spec["default"] = TypeAdapter(annotated).dump_python(info.default, mode="json")
    return spec


def model_options(model: type[BaseModel], exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {name: field_spec(info) for name, info in model.model_fields.items() if name not in exclude}


def expected_options() -> dict[str, Any]:
    """The argument spec of every role variable that maps onto AgentConfig (descriptions aside)."""
    options: dict[str, Any] = {}
    for var, field in SCALARS.items():
        options[var] = {"type": _type_spec(AgentConfig.model_fields[field].annotation)["type"]}
    for var, (_section, model, exclude) in SECTIONS.items():
        options[var] = {"type": "dict", "default": {}, "options": model_options(model, exclude)}
    for var, (_section, model) in OPTIONAL_SECTIONS.items():
        options[var] = {"type": "dict", "options": model_options(model)}
    services = field_spec(AgentConfig.model_fields["services"])
    options[SERVICES_VAR] = services
    return options


def strip_descriptions(spec: Any) -> Any:
    """The parts of an argument spec the model decides: everything except descriptions and version_added."""
    if isinstance(spec, dict):
        return {k: strip_descriptions(v) for k, v in spec.items() if k not in {"description", "version_added"}}
    if isinstance(spec, list):
        return [strip_descriptions(v) for v in spec]
    return spec


def role_options(entry_point: str = "main") -> dict[str, Any]:
    data = yaml.safe_load(ARGUMENT_SPECS.read_text())
    options: dict[str, Any] = data["argument_specs"][entry_point]["options"]
    return options


if __name__ == "__main__":
    yaml.safe_dump(expected_options(), sys.stdout, sort_keys=False)
