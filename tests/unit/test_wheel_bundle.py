"""`meshvm artifacts bundle`: one deterministic archive per wheelhouse content, and clear errors for a bad one."""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path

import pytest

from meshvm.artifacts import VM_LEAVES_OUT, bundle, strip_wheel
from meshvm.errors import ConfigError


def _wheelhouse(path: Path, names: dict[str, bytes]) -> Path:
    path.mkdir()
    for name, content in names.items():
        (path / name).write_bytes(content)
    return path


def test_same_wheels_give_the_same_archive_and_a_sha256sum_manifest(tmp_path: Path) -> None:
    house = _wheelhouse(tmp_path / "wh", {"meshvm-0.1.0-py3-none-any.whl": b"ours", "dep-1.0-py3-none-any.whl": b"d"})
    first = bundle(house, cache=tmp_path / "cache")
    first_bytes = first.path.read_bytes()
    first.path.unlink()
    (house / "dep-1.0-py3-none-any.whl").touch()  # a new mtime must not change the archive
    again = bundle(house, cache=tmp_path / "cache")
    assert again.path == first.path
    assert again.path.read_bytes() == first_bytes
    assert again.meshvm_wheel == "meshvm-0.1.0-py3-none-any.whl"
    assert again.wheels == ["dep-1.0-py3-none-any.whl", "meshvm-0.1.0-py3-none-any.whl"]
    assert again.manifest.splitlines()[1] == f"{hashlib.sha256(b'ours').hexdigest()}  meshvm-0.1.0-py3-none-any.whl"
    with tarfile.open(again.path) as tar:
        assert sorted(tar.getnames()) == again.wheels
        assert tar.extractfile("meshvm-0.1.0-py3-none-any.whl").read() == b"ours"  # type: ignore[union-attr]


def test_a_changed_wheel_gives_a_new_archive(tmp_path: Path) -> None:
    house = _wheelhouse(tmp_path / "wh", {"meshvm-0.1.0-py3-none-any.whl": b"v1"})
    before = bundle(house, cache=tmp_path / "cache")
    (house / "meshvm-0.1.0-py3-none-any.whl").write_bytes(b"v2")
    after = bundle(house, cache=tmp_path / "cache")
    assert after.path != before.path
    assert after.manifest != before.manifest


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
    house = _wheelhouse(tmp_path / "wh", wheels)
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
