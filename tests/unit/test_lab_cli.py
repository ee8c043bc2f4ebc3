"""The lab's command line refuses what it cannot do with one clear line and exit 2, and changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshvm.errors import PrerequisiteError
from meshvm.lab import network
from meshvm.lab.lifecycle import UP_TOOLS
from meshvm.lab.tools import require_tools


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60, **kwargs)  # type: ignore[call-overload]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop to nobody")
def test_lab_up_as_non_root_says_so(meshvm_cli: str, tmp_path: Path) -> None:
    done = _run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            meshvm_cli,
            "lab",
            "up",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "needs root" in lines[0]
    assert not (tmp_path / "state").exists()


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PrerequisiteError) as info:
        require_tools("systemd-nspawn", "debootstrap")
    message = str(info.value)
    assert "systemd-nspawn" in message
    assert "systemd-container" in message
    assert "debootstrap" in message
    assert info.value.exit_code == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="lab commands need root")
def test_lab_up_with_missing_tool_exits_2_and_creates_nothing(meshvm_cli: str, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (t for t in UP_TOOLS if t != "systemd-nspawn"):  # every tool `lab up` needs but one
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    done = _run(
        [meshvm_cli, "lab", "up", "--state-dir", str(tmp_path / "state")],
        env={**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}"},
    )
    assert done.returncode == 2, done.stderr
    assert "systemd-nspawn" in done.stderr
    assert "apt-get install -y systemd-container" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="lab commands need root")
def test_lab_down_with_nothing_up_is_a_no_op(meshvm_cli: str, tmp_path: Path) -> None:
    done = _run([meshvm_cli, "lab", "down", "--state-dir", str(tmp_path / "none")])
    assert done.returncode == 0
    assert "nothing to do" in done.stderr
    assert not (tmp_path / "none").exists()


def test_lab_status_with_nothing_up_exits_1(meshvm_cli: str, tmp_path: Path) -> None:
    done = _run([meshvm_cli, "lab", "status", "--state-dir", str(tmp_path / "none")])
    assert done.returncode == 1
    assert "no lab is up" in done.stderr


def test_lab_where_the_lab_is_not_installed_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The VMs' wheel leaves meshvm.lab out; `meshvm lab ...` there says so instead of a traceback."""
    without_lab = "import sys; sys.modules['meshvm.lab'] = None; from meshvm.cli import main; main()"
    for args in (["status"], ["up", "--hosts", "1"], ["down"]):
        done = _run([sys.executable, "-c", without_lab, "lab", *args, "--state-dir", str(tmp_path)])
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (
            "meshvm: error: meshvm lab: the lab is not part of this installation (the VMs' meshvm leaves it out): "
            "run it from a meshvm checkout (see README)"
        )


def test_lab_up_rejects_a_bad_host_count(meshvm_cli: str, tmp_path: Path) -> None:
    done = _run([meshvm_cli, "lab", "up", "--hosts", "0", "--state-dir", str(tmp_path / "s")])
    assert done.returncode == 2
    assert "--hosts must be between 1 and 50" in done.stderr
    assert not (tmp_path / "s").exists()


def test_host_addresses_stay_in_the_lab_subnet() -> None:
    assert network.host_address(1) == "198.51.100.11"
    assert network.host_address(2) == "198.51.100.12"
    for index in range(1, 51):
        assert network.host_address(index).startswith("198.51.100.")
