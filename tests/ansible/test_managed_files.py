"""The module meshvm.mesh.managed_files run by Ansible on this machine (connection local) in a scratch directory:
made once, then left alone; drift in content or mode repaired; a file failing its check never installed; check
mode writes nothing; diffs show content except the secrets'; contents never logged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.ansible import modules
from tests.ansible.argspec import REPO

SECRET = "s3cr3t-token-value"


def _run(args: dict[str, Any], *flags: str) -> dict[str, Any]:
    """The module's result; the secret appears nowhere in what Ansible printed or returned, even at -vvv."""
    result, printed = modules.run("managed_files", args, *flags)
    assert SECRET not in printed
    return result


def _args(root: Path, *, validate: str | None = None, config: str = "a = 1\n") -> dict[str, Any]:
    me = {"owner": "root", "group": "root"} if os.geteuid() == 0 else {}
    if not me:
        pytest.skip("sets owners: runs as root (as CI does)")
    return {
        "directories": [{"path": str(root / "etc" / "app"), "mode": "0750", **me}],
        "files": [
            {
                "dest": str(root / "etc" / "app" / "token"),
                "content": f"{SECRET}\n",
                "mode": "0640",
                "diff": False,
                **me,
            },
            {
                "dest": str(root / "etc" / "app" / "app.conf"),
                "content": config,
                "mode": "0644",
                **({"validate": validate} if validate else {}),
                **me,
            },
            {"dest": str(root / "etc" / "app" / "seed"), "content": "first\n", "mode": "0600", "force": False, **me},
        ],
        "secrets": {"token": f"{SECRET}\n"},
    }


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_made_once_then_left_alone_and_drift_is_repaired(tmp_path: Path) -> None:
    app = tmp_path / "etc" / "app"
    made = _run(_args(tmp_path, validate="/bin/grep -q '^a = ' %s"))
    assert made["changed"] is True
    assert made["ansible_exit"] == 0
    assert made["changed_paths"] == [str(app), str(app / "token"), str(app / "app.conf"), str(app / "seed")]
    assert (app / "token").read_text() == f"{SECRET}\n"
    assert (app / "app.conf").read_text() == "a = 1\n"
    assert (_mode(app), _mode(app / "token"), _mode(app / "app.conf"), _mode(app / "seed")) == (
        0o750,
        0o640,
        0o644,
        0o600,
    )

    again = _run(_args(tmp_path, validate="/bin/grep -q '^a = ' %s"))
    assert again["changed"] is False
    assert again["changed_paths"] == []

    (app / "app.conf").write_text("a = 2\n")
    (app / "token").chmod(0o666)
    (app / "seed").write_text("the host's own\n")  # force: false, the host owns it once made
    repaired = _run(_args(tmp_path))
    assert repaired["changed_paths"] == [str(app / "token"), str(app / "app.conf")]
    assert (app / "app.conf").read_text() == "a = 1\n"
    assert _mode(app / "token") == 0o640
    assert (app / "seed").read_text() == "the host's own\n"
    assert sorted(p.name for p in app.iterdir()) == ["app.conf", "seed", "token"]  # no temporary files left


def test_a_file_failing_its_check_is_never_installed(tmp_path: Path) -> None:
    app = tmp_path / "etc" / "app"
    _run(_args(tmp_path))
    refused = _run(_args(tmp_path, validate="/bin/grep -q '^a = ' %s", config="b = 2\n"))
    assert refused["ansible_exit"] == 2  # the host failed
    assert f"{app / 'app.conf'} failed its check (/bin/grep -q '^a = ' %s), nothing written" in refused["msg"]
    assert (app / "app.conf").read_text() == "a = 1\n"
    assert sorted(p.name for p in app.iterdir()) == ["app.conf", "seed", "token"]


def test_check_mode_writes_nothing_and_diffs_hide_secrets(tmp_path: Path) -> None:
    app = tmp_path / "etc" / "app"
    planned = _run(_args(tmp_path), "--check", "--diff")
    assert planned["changed"] is True
    assert planned["changed_paths"] == [str(app), str(app / "token"), str(app / "app.conf"), str(app / "seed")]
    assert not (tmp_path / "etc").exists()
    diffs = {d["after_header"]: d for d in planned["diff"]}
    assert diffs[str(app / "app.conf")]["after"] == "a = 1\n"
    assert diffs[str(app / "token")]["after"] == "(content hidden)\n"

    _run(_args(tmp_path))
    (app / "app.conf").write_text("a = 2\n")
    drift = _run(_args(tmp_path), "--check", "--diff")
    assert drift["changed_paths"] == [str(app / "app.conf")]
    assert drift["diff"] == [
        {
            "before_header": str(app / "app.conf"),
            "after_header": str(app / "app.conf"),
            "before": "a = 2\n",
            "after": "a = 1\n",
        }
    ]
    assert (app / "app.conf").read_text() == "a = 2\n"


def test_the_documented_options_are_the_module_s_arguments() -> None:
    module, documented = modules.documentation(REPO / "plugins" / "modules" / "managed_files.py")
    assert sorted(documented) == ["directories", "files", "secrets"]
    modules.assert_documented(documented["directories"]["suboptions"], module.DIRECTORY_SPEC)
    modules.assert_documented(documented["files"]["suboptions"], module.FILE_SPEC)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"mode": "0644"}, "give either content or secret"),
        ({"mode": "0644", "content": "x", "secret": "token"}, "give either content or secret"),
        ({"mode": "0644", "secret": "nope"}, "secret 'nope' is not in secrets"),
        ({"mode": "0644", "content": "x", "validate": "/bin/true"}, "validate of {dest} must name the candidate file"),
    ],
)
def test_a_wrong_entry_is_refused_in_one_line_and_nothing_is_written(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    dest = tmp_path / "app.conf"
    result = _run({"files": [{"dest": str(dest), **entry}], "secrets": {"token": f"{SECRET}\n"}})
    assert result["ansible_exit"] == 2
    assert str(dest) in result["msg"]
    assert message.format(dest=dest) in result["msg"]
    assert "\n" not in result["msg"]
    assert list(tmp_path.iterdir()) == []
