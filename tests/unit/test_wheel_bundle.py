"""`meshvm artifacts bundle`: the wheelhouse installed on the controller for the VMs' Python, as one deterministic
archive laid out like the VMs' virtualenv; clear errors for a bad wheelhouse."""

from __future__ import annotations

import base64
import hashlib
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from meshvm.artifacts import INSTALLED_FROM, VM_LEAVES_OUT, bundle, strip_wheel
from meshvm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _wheel(house: Path, name: str, version: str, modules: dict[str, str]) -> Path:
    """A minimal valid wheel (pure Python) pip installs."""
    house.mkdir(exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        **{f"{module}.py": source for module, source in modules.items()},
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = house / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as out:
        for path, text in files.items():
            out.writestr(zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0)), text)
    return wheel


def _members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {member.name: member for member in tar.getmembers()}


def _read(archive: Path, name: str) -> str:
    with tarfile.open(archive) as tar:
        extracted = tar.extractfile(name)
        assert extracted is not None
        return extracted.read().decode()


def test_the_archive_is_the_virtualenv_s_contents_and_the_same_wheels_give_the_same_bytes(tmp_path: Path) -> None:
    house = tmp_path / "wh"
    _wheel(house, "meshvm", "0.1.0", {"meshvm_mod": "VALUE = 'ours'\n"})
    dep = _wheel(house, "dep", "1.0", {"dep_mod": "VALUE = 'dep'\n"})
    first = bundle(house, cache=tmp_path / "cache", python_version=PYTHON)
    first_bytes = first.path.read_bytes()
    first.path.unlink()
    dep.touch()  # a new mtime must not change the archive
    again = bundle(house, cache=tmp_path / "cache", python_version=PYTHON)
    assert again.path == first.path
    assert again.path.read_bytes() == first_bytes
    assert again.meshvm_wheel == "meshvm-0.1.0-py3-none-any.whl"
    assert again.wheels == ["dep-1.0-py3-none-any.whl", "meshvm-0.1.0-py3-none-any.whl"]
    assert again.manifest.splitlines()[0] == f"{hashlib.sha256(dep.read_bytes()).hexdigest()}  {dep.name}"

    members, site = _members(again.path), f"lib/python{PYTHON}/site-packages"
    assert _read(again.path, f"{site}/meshvm_mod.py") == "VALUE = 'ours'\n"
    assert f"{site}/dep_mod.py" in members
    assert f"{site}/meshvm-0.1.0.dist-info/METADATA" in members
    # Byte code compiled here (same Python as the target), valid whatever the files' times on the VM.
    pyc = f"{site}/__pycache__/meshvm_mod.cpython-{PYTHON.replace('.', '')}.pyc"
    assert pyc in members
    with tarfile.open(again.path) as tar:
        compiled = tar.extractfile(pyc)
        assert compiled is not None
        flags = int.from_bytes(compiled.read()[4:8], "little")
    assert flags == 0b01  # hash-based, not checked against the source
    # The launcher names the VM's virtualenv, not the controller's interpreter; nothing else is in bin/.
    assert [n for n in members if n.startswith("bin/")] == ["bin/meshvm"]
    assert _read(again.path, "bin/meshvm").startswith("#!/opt/meshvm/bin/python\n")
    assert "from meshvm.cli import main" in _read(again.path, "bin/meshvm")
    assert members["bin/meshvm"].mode == 0o755
    assert members[f"{site}/meshvm_mod.py"].mode == 0o644
    assert {(m.uid, m.gid, m.mtime) for m in members.values()} == {(0, 0, 0)}
    # Last in the archive, the record of what it was installed from, where the role looks for it.
    assert list(members)[-1] == INSTALLED_FROM
    assert _read(again.path, INSTALLED_FROM) == again.manifest
    role_vars = (REPO / "roles" / "meshvm_agent" / "vars" / "main.yml").read_text()
    assert f'_meshvm_agent_installed_stamp: "{{{{ meshvm_agent_prefix }}}}/{INSTALLED_FROM}"' in role_vars


def test_a_changed_wheel_or_prefix_or_python_gives_a_new_archive(tmp_path: Path) -> None:
    house = tmp_path / "wh"
    _wheel(house, "meshvm", "0.1.0", {"meshvm_mod": "VALUE = 1\n"})
    before = bundle(house, cache=tmp_path / "cache", python_version=PYTHON)
    elsewhere = bundle(house, cache=tmp_path / "cache", python_version=PYTHON, prefix="/srv/meshvm")
    assert elsewhere.path != before.path
    assert _read(elsewhere.path, "bin/meshvm").startswith("#!/srv/meshvm/bin/python\n")
    other_python = bundle(house, cache=tmp_path / "cache", python_version="3.99")
    assert other_python.path != before.path
    assert "lib/python3.99/site-packages/meshvm_mod.py" in _members(other_python.path)
    assert not [n for n in _members(other_python.path) if n.endswith(".pyc")]  # not compiled for another Python
    _wheel(house, "meshvm", "0.1.0", {"meshvm_mod": "VALUE = 2\n"})
    after = bundle(house, cache=tmp_path / "cache", python_version=PYTHON)
    assert after.path != before.path
    assert after.manifest != before.manifest


def test_a_relative_prefix_is_refused(tmp_path: Path) -> None:
    house = tmp_path / "wh"
    _wheel(house, "meshvm", "0.1.0", {"meshvm_mod": ""})
    with pytest.raises(ConfigError, match="prefix 'opt/meshvm' is not an absolute path"):
        bundle(house, cache=tmp_path / "cache", prefix="opt/meshvm")


@pytest.mark.parametrize(
    ("wheels", "message"),
    [
        ({}, "holds 0 meshvm wheels (none), not one"),
        (
            {"meshvm-0.1.0-py3-none-any.whl": b"a", "meshvm-0.2.0-py3-none-any.whl": b"b"},
            "holds 2 meshvm wheels (meshvm-0.1.0-py3-none-any.whl, meshvm-0.2.0-py3-none-any.whl)",
        ),
    ],
)
def test_a_wheelhouse_without_exactly_one_meshvm_wheel_is_refused(
    tmp_path: Path, wheels: dict[str, bytes], message: str
) -> None:
    house = tmp_path / "wh"
    house.mkdir()
    for name, content in wheels.items():
        (house / name).write_bytes(content)
    with pytest.raises(ConfigError, match="meshvm wheels") as raised:
        bundle(house, cache=tmp_path / "cache")
    assert message in str(raised.value)
    assert "meshvm artifacts wheelhouse" in str(raised.value.hint)
    assert not (tmp_path / "cache").exists()


def test_a_missing_wheelhouse_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        bundle(tmp_path / "nope", cache=tmp_path / "cache")


def test_the_vm_wheel_leaves_the_lab_out_and_stays_reproducible(tmp_path: Path) -> None:
    record = "meshvm/__init__.py,sha256=a,1\nmeshvm/lab/up.py,sha256=b,2\nmeshvm-0.1.0.dist-info/RECORD,,\n"
    files = {"meshvm/__init__.py": b"core", "meshvm/lab/up.py": b"lab", "meshvm-0.1.0.dist-info/RECORD": record}
    wheels = []
    for name in ("a", "b"):
        wheel = tmp_path / name / "meshvm-0.1.0-py3-none-any.whl"
        wheel.parent.mkdir()
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as out:
            for path, data in files.items():
                out.writestr(zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0)), data)
        assert strip_wheel(wheel, VM_LEAVES_OUT) == ["meshvm/lab/up.py"]
        wheels.append(wheel)
    with zipfile.ZipFile(wheels[0]) as stripped:
        assert stripped.namelist() == ["meshvm/__init__.py", "meshvm-0.1.0.dist-info/RECORD"]
        assert b"meshvm/lab" not in stripped.read("meshvm-0.1.0.dist-info/RECORD")
        assert stripped.read("meshvm/__init__.py") == b"core"
        assert stripped.getinfo("meshvm/__init__.py").date_time == (1980, 1, 1, 0, 0, 0)
    assert wheels[0].read_bytes() == wheels[1].read_bytes()
