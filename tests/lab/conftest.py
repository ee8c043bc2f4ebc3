"""Fixtures for agent tests on the lab: mesh nodes (Consul client + meshvm agent + Envoy) on loopback addresses."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshvm.lab.state import LabState
from tests.support.mesh import MeshNode, apply_policy, purge_nodes


@pytest.fixture(scope="module")
def mesh_tag(request: pytest.FixtureRequest) -> str:
    """A short tag per test module: its service names and policy key never meet another module's (or the VMs')."""
    return str(request.module.__name__).rsplit(".", 1)[-1].removeprefix("test_agent_")[:8].replace("_", "-")


@pytest.fixture(scope="module")
def node_factory(
    lab: LabState, envoy_bin: Path, tmp_path_factory: pytest.TempPathFactory, mesh_tag: str
) -> Iterator[Callable[..., MeshNode]]:
    """Make nodes; every node made is stopped (and its Consul agent leaves) when the module ends."""
    made: list[MeshNode] = []
    workdir = tmp_path_factory.mktemp("mesh")
    purge_nodes(lab, f"{mesh_tag}-")

    def make(name: str) -> MeshNode:
        node = MeshNode(lab, f"{mesh_tag}-{name}", workdir, envoy_bin, policy_prefix=f"meshvm/tests/{mesh_tag}")
        made.append(node)
        return node

    yield make
    # Stopping is mostly waiting (a Consul agent leaving the cluster): do it for all nodes at once.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(len(made), 1)) as pool:
        list(pool.map(MeshNode.stop, made))


@pytest.fixture
def dump_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[list[MeshNode]]:
    """Nodes appended to the yielded list get their last log lines printed if the test fails."""
    nodes: list[MeshNode] = []
    yield nodes
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for node in nodes:
            print(node.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="module")
def policy(lab: LabState, mesh_tag: str) -> Callable[[dict[str, object]], None]:
    return lambda document: apply_policy(lab, document, f"meshvm/tests/{mesh_tag}")
