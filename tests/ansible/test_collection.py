"""The roles and playbooks as the Ansible collection meshvm.mesh: it builds, installs, and its playbooks run by
their collection names with the roles found by fully qualified name, away from this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.ansible.argspec import REPO

BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(p.stem for p in (REPO / "playbooks").glob("*.yml"))
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if p.is_dir())


def _galaxy() -> dict[str, object]:
    return dict(yaml.safe_load((REPO / "galaxy.yml").read_text()))


def test_the_collection_has_the_python_packages_version() -> None:
    assert _galaxy()["version"] == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert (REPO / "collections" / "ansible_collections" / "meshvm" / "mesh").resolve() == REPO


def test_playbooks_name_every_role_by_its_fully_qualified_name() -> None:
    for path in sorted((REPO / "playbooks").rglob("*.yml")):
        text = path.read_text()
        for role in ROLES:
            for short in (f"- role: {role}\n", f"name: {role}\n"):
                assert short not in text, f"{path.name} names the role {role} without meshvm.mesh."


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection built from this checkout and installed into an empty collections path."""
    work = tmp_path_factory.mktemp("collection")
    env = {**os.environ, "ANSIBLE_CONFIG": str(work / "none.cfg")}
    built = subprocess.run(
        [BIN / "ansible-galaxy", "collection", "build", "--output-path", work, REPO],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    tarball = work / f"meshvm-mesh-{_galaxy()['version']}.tar.gz"
    with tarfile.open(tarball) as archive:
        names = archive.getnames()
    assert all(not n.startswith(("meshvm/", "tests/", "molecule/", "collections/", "bench/")) for n in names), names
    assert {f"roles/{role}/tasks/main.yml" for role in ROLES} <= set(names)
    done = subprocess.run(
        [BIN / "ansible-galaxy", "collection", "install", "--force", "-p", work / "installed", tarball],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return work / "installed"


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_installed_playbooks_resolve_their_roles_by_collection_name(installed: Path, playbook: str) -> None:
    inventory = REPO / "inventories" / "example" / "hosts.yml"
    env = {**os.environ, "ANSIBLE_CONFIG": str(installed / "none.cfg"), "ANSIBLE_COLLECTIONS_PATH": str(installed)}
    done = subprocess.run(
        [BIN / "ansible-playbook", "--list-tasks", "-i", inventory, f"meshvm.mesh.{playbook}"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=installed,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"playbook: {installed}/ansible_collections/meshvm/mesh/playbooks/{playbook}.yml" in done.stdout
    if playbook in {"enroll", "upgrade"}:
        for role in ("consul_agent", "meshvm_agent", "envoy"):
            assert f"meshvm.mesh.{role} : " in done.stdout
