"""The module meshvm.mesh.host_resources run by Ansible on this machine: each shortage is one clear message that
names what is short and what to do; nothing short, nothing said."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ansible import modules
from tests.ansible.argspec import REPO


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A TCP port this test process listens on (its program name is python's, not a role's)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_nothing_short_passes_and_reports_what_it_saw(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    result, _ = modules.run(
        "host_resources",
        {
            "role": "demo",
            "free_space_paths": [str(tmp_path)],
            "min_free_mib": 1,
            "python_modules": ["venv"],
            "look_for": [str(tmp_path / "token"), str(tmp_path / "absent")],
        },
    )
    assert result["ansible_exit"] == 0
    assert result["free_mib"][str(tmp_path)] >= 1
    assert result["exists"] == {str(tmp_path / "token"): True, str(tmp_path / "absent"): False}


def test_too_little_space_names_the_path_the_need_and_the_hint(tmp_path: Path) -> None:
    result, _ = modules.run(
        "host_resources",
        {"role": "demo", "free_space_paths": [str(tmp_path)], "min_free_mib": 10**9, "free_space_hint": "free it."},
    )
    assert result["ansible_exit"] == 2
    free = result["free_mib"][str(tmp_path)]
    assert result["msg"].endswith(f"has only {free} MiB on {tmp_path}; demo needs {10**9}: free it.")


def test_a_port_held_by_another_program_is_named_unless_it_is_an_owner(taken_port: int) -> None:
    args = {"role": "demo", "ports": [taken_port], "ports_hint": "Stop it."}
    refused, _ = modules.run("host_resources", args)
    assert refused["ansible_exit"] == 2
    assert f"demo needs ports {taken_port} on " in refused["msg"]
    assert f"127.0.0.1:{taken_port}" in refused["msg"]
    assert refused["msg"].endswith("Stop it.")
    held = refused["listeners"][0]
    owner = held.split('users:(("', 1)[1].split('"', 1)[0]
    allowed, _ = modules.run("host_resources", {**args, "owners": [owner]})
    assert allowed["ansible_exit"] == 0
    assert allowed["listeners"] == [held]


def test_a_missing_python_module_is_named() -> None:
    result, _ = modules.run(
        "host_resources", {"role": "demo", "python_modules": ["venv", "no_such_module_here"], "python_hint": "add it"}
    )
    assert result["ansible_exit"] == 2
    assert result["msg"].endswith("cannot import no_such_module_here: add it")


def test_the_documented_options_are_the_module_s_arguments() -> None:
    module, documented = modules.documentation(REPO / "plugins" / "modules" / "host_resources.py")
    modules.assert_documented(documented, module.ARGS)


def test_ss_lines_are_matched_on_the_local_port_and_protocol() -> None:
    module = modules.load(REPO / "plugins" / "modules" / "host_resources.py")
    ss = (
        'udp UNCONN 0 0 198.51.100.11:8301 0.0.0.0:* users:(("consul",pid=219,fd=8))\n'
        'tcp LISTEN 0 128 198.51.100.11:8301 0.0.0.0:* users:(("consul",pid=219,fd=7))\n'
        'tcp LISTEN 0 4096 [::1]:19000 [::]:* users:(("envoy",pid=529,fd=22))\n'
        'tcp LISTEN 0 4096 0.0.0.0:190000 0.0.0.0:* users:(("x",pid=1,fd=1))\n'
    )
    assert module.listening_on(ss, {8301}, udp=False) == [ss.splitlines()[1]]
    assert module.listening_on(ss, {8301}, udp=True) == ss.splitlines()[:2]
    assert module.listening_on(ss, {19000}, udp=False) == [ss.splitlines()[2]]
    assert module.listening_on(ss, {9000}, udp=True) == []
