"""The wheelhouse is rebuilt exactly when what goes into meshvm's wheel (or the target Python) changes."""

from __future__ import annotations

from pathlib import Path

from meshvm.artifacts import _source_key


def _tree(root: Path) -> Path:
    (root / "meshvm" / "agent").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'meshvm'\n")
    (root / "README.md").write_text("# meshvm\n")
    (root / "meshvm" / "__init__.py").write_text("")
    (root / "meshvm" / "agent" / "runner.py").write_text("x = 1\n")
    return root


def test_same_tree_same_key_and_bytecode_does_not_count(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    before = _source_key(tree, "3.11", "manylinux2014_x86_64")
    (tree / "meshvm" / "__pycache__").mkdir()
    (tree / "meshvm" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert _source_key(tree, "3.11", "manylinux2014_x86_64") == before


def test_any_source_change_or_other_target_changes_the_key(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    keys = {_source_key(tree, "3.11", "manylinux2014_x86_64")}
    keys.add(_source_key(tree, "3.12", "manylinux2014_x86_64"))
    (tree / "meshvm" / "agent" / "runner.py").write_text("x = 2\n")
    keys.add(_source_key(tree, "3.11", "manylinux2014_x86_64"))
    (tree / "meshvm" / "agent" / "runner.py").rename(tree / "meshvm" / "agent" / "other.py")
    keys.add(_source_key(tree, "3.11", "manylinux2014_x86_64"))
    (tree / "README.md").write_text("# meshvm, changed\n")
    keys.add(_source_key(tree, "3.11", "manylinux2014_x86_64"))
    assert len(keys) == 5
