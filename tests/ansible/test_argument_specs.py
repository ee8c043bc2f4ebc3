"""The roles' argument specs stay in step with their defaults, and meshvm_agent's with meshvm's model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshvm.config import AgentConfig
from tests.ansible.argspec import (
    OPTIONAL_SECTIONS,
    REPO,
    SCALARS,
    SECTIONS,
    expected_options,
    role_options,
    strip_descriptions,
)

ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if (p / "meta" / "argument_specs.yml").exists())


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_every_role_has_argument_specs() -> None:
    assert sorted(p.name for p in (REPO / "roles").iterdir() if p.is_dir()) == ROLES


@pytest.mark.parametrize("role", ROLES)
def test_defaults_and_main_entry_point_agree(role: str) -> None:
    defaults = _load(REPO / "roles" / role / "defaults" / "main.yml") or {}
    specs = _load(REPO / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]
    options = specs["main"]["options"]
    everywhere = {name for entry in specs.values() for name in entry.get("options", {})}
    assert all(name.startswith(f"{role}_") for name in defaults), "public variables carry the role's prefix"
    undocumented = sorted(set(defaults) - everywhere)
    assert not undocumented, f"defaults/main.yml has variables missing from meta/argument_specs.yml: {undocumented}"
    for entry in specs.values():
        for name, spec in entry.get("options", {}).items():
            if name in defaults and entry is not specs["main"]:
                same = strip_descriptions(spec) == strip_descriptions(options.get(name, spec))
                assert same, f"{name} has a different type or default in two entry points"
    # A variable the specs know but defaults/main.yml does not set must be required (or belong to another entry).
    not_required = sorted(n for n in set(options) - set(defaults) if not options[n].get("required"))
    assert not not_required, f"in argument_specs but neither in defaults nor required: {not_required}"
    for name in everywhere & set(defaults):
        spec = next(e["options"][name] for e in specs.values() if name in e.get("options", {}))
        assert not spec.get("required"), f"{name} has a default, so it cannot be required"
        value, documented = defaults[name], spec.get("default")
        if not (isinstance(value, str) and "{{" in value):
            assert documented == value, f"{name}: argument_specs default {documented!r}, defaults/main.yml {value!r}"


@pytest.mark.parametrize("role", ROLES)
def test_entry_points_have_task_files(role: str) -> None:
    specs = _load(REPO / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]
    for entry_point in specs:
        assert (REPO / "roles" / role / "tasks" / f"{entry_point}.yml").exists(), entry_point


def test_meshvm_agent_specs_match_the_configuration_model() -> None:
    options = strip_descriptions(role_options())
    expected = expected_options()
    for var in SCALARS:
        assert options[var]["type"] == expected[var]["type"], var
    for var in set(expected) - set(SCALARS):
        assert var in options, f"roles/meshvm_agent/meta/argument_specs.yml lacks {var}"
        assert options[var] == expected[var], (
            f"{var} differs from meshvm.config; `python -m tests.ansible.argspec` prints what the model says"
        )


def test_meshvm_agent_sections_are_the_model_sections() -> None:
    """Every section of AgentConfig is reachable from a role variable (except the role-managed token file)."""
    covered = {section for section, _model, _exclude in SECTIONS.values()} | set(SCALARS.values()) | {"services"}
    covered |= {section for section, _model in OPTIONAL_SECTIONS.values()}
    assert covered == set(AgentConfig.model_fields)
