from __future__ import annotations

from pathlib import Path

from meshvm.fsutil import atomic_write


def test_atomic_write_replaces_by_rename_and_reports_change(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.json"
    assert atomic_write(target, "one", mode=0o640) is True
    inode = target.stat().st_ino
    assert target.read_text() == "one"
    assert target.stat().st_mode & 0o777 == 0o640
    assert atomic_write(target, "one", mode=0o640) is False, "identical content must not be rewritten"
    assert target.stat().st_ino == inode
    assert atomic_write(target, b"two", mode=0o640) is True
    assert target.read_text() == "two"
    assert target.stat().st_ino != inode, "a new file must be renamed over the old one"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"], "no temp file may be left behind"


def test_atomic_write_mode_change_alone_rewrites(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, "x", mode=0o644)
    assert atomic_write(target, "x", mode=0o600) is True
    assert target.stat().st_mode & 0o777 == 0o600
