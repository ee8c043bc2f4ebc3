"""meshvm.mesh.managed_files: a role's directories and small files in one module run instead of one per path."""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: managed_files
short_description: Several directories and small text files in one step, each checked, validated and written whole
description:
  - Makes the directories, then writes the files, in the order given, in one run on the host (the builtin
    C(file), C(copy) and C(template) need one to three runs per path). A file whose content differs from the one
    given is written to a temporary file next to it, given its owner, group and mode, checked with C(validate) and
    moved over the old one, so a reader never sees half a file and a file that fails its check is never
    installed. Owner, group and mode are corrected on paths whose content is already right.
  - Files are written in order, so a file's C(validate) may use a file written before it in the same run.
  - Supports check mode (nothing is written or validated; what would change is reported) and diff mode (one diff
    per changed path; secret files show no content).
  - Secret contents go in I(secrets), which Ansible hides everywhere (C(no_log)); files name them with I(secret).
options:
  directories:
    description: Directories to make (with missing parents), in order.
    type: list
    elements: dict
    default: []
    suboptions:
      path: {description: Absolute path., type: path, required: true}
      owner: {description: Owner., type: str, default: root}
      group: {description: Group., type: str, default: root}
      mode: {description: Mode as an octal string., type: str, required: true}
      include: {description: false leaves this entry out (one that depends on a setting)., type: bool, default: true}
  files:
    description: Files to write, in order.
    type: list
    elements: dict
    default: []
    suboptions:
      dest: {description: Absolute path., type: path, required: true}
      content: {description: The whole text of the file (this or I(secret))., type: str}
      secret:
        description: Name of the entry of I(secrets) that is the whole text of the file; never logged or diffed.
        type: str
      owner: {description: Owner., type: str, default: root}
      group: {description: Group., type: str, default: root}
      mode: {description: Mode as an octal string., type: str, required: true}
      validate:
        description: Command that checks the candidate before it is installed; C(%s) is its path. Run without a shell.
        type: str
      force:
        description: false writes the file only when it does not exist (a seed the host then owns).
        type: bool
        default: true
      diff:
        description: false keeps the content out of diffs.
        type: bool
        default: true
      include: {description: false leaves this entry out (one that depends on a setting)., type: bool, default: true}
  secrets:
    description: Texts of secret files by name (see I(files[].secret)); hidden in logs and results.
    type: dict
    default: {}
author: meshvm
"""

EXAMPLES = r"""
- name: Write the agent's configuration and unit
  meshvm.mesh.managed_files:
    directories:
      - {path: /etc/example, group: example, mode: "0750"}
    files:
      - dest: /etc/example/token
        secret: token
        group: example
        mode: "0640"
      - dest: /etc/systemd/system/example.service
        content: "{{ lookup('ansible.builtin.template', 'example.service.j2') }}"
        mode: "0644"
        validate: systemd-analyze verify %s
    secrets:
      token: "{{ example_token }}\n"
  register: example_files
  notify: restart example
"""

RETURN = r"""
changed_paths:
  description: The directories and files that were (or in check mode would be) made or changed, in order.
  type: list
  elements: str
  returned: always
"""

DIRECTORY_SPEC = {
    "path": {"type": "path", "required": True},
    "owner": {"type": "str", "default": "root"},
    "group": {"type": "str", "default": "root"},
    "mode": {"type": "str", "required": True},
    "include": {"type": "bool", "default": True},
}
FILE_SPEC = {
    "dest": {"type": "path", "required": True},
    "content": {"type": "str"},
    "secret": {"type": "str"},
    "owner": {"type": "str", "default": "root"},
    "group": {"type": "str", "default": "root"},
    "mode": {"type": "str", "required": True},
    "validate": {"type": "str"},
    "force": {"type": "bool", "default": True},
    "diff": {"type": "bool", "default": True},
    "include": {"type": "bool", "default": True},
}
# Longer texts are not put in diffs.
DIFF_LIMIT = 64 * 1024

Spec = dict[str, Any]
Diff = dict[str, Any]


def _attributes(module: AnsibleModule, path: str, spec: Spec, changed: bool, diff: Diff | None = None) -> bool:
    """Owner, group and mode of ``path`` as ``spec`` says (only reported in check mode); True if any differed.
    ``diff`` gets their old and new values, as the builtin file module reports them."""
    changed = module.set_owner_if_different(path, spec["owner"], changed, diff)
    changed = module.set_group_if_different(path, spec["group"], changed, diff)
    return bool(module.set_mode_if_different(path, spec["mode"], changed, diff))


def _corrected(module: AnsibleModule, path: str, spec: Spec) -> tuple[bool, Diff | None]:
    """(changed, diff) for a path whose content is right: only its owner, group and mode may differ."""
    diff: Diff = {"before": {"path": path}, "after": {"path": path}}
    return (True, diff) if _attributes(module, path, spec, False, diff) else (False, None)


def _directory(module: AnsibleModule, spec: Spec) -> tuple[bool, Diff | None]:
    path = Path(spec["path"])
    if path.is_dir():
        return _corrected(module, str(path), spec)
    if path.is_symlink() or path.exists():
        module.fail_json(msg=f"{path} exists and is not a directory: move it away, then run again")
    if not module.check_mode:
        path.mkdir(parents=True)
        _attributes(module, str(path), spec, True)
    return True, {
        "before_header": str(path),
        "after_header": str(path),
        "before": "(absent)\n",
        "after": "(directory)\n",
    }


def _read(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def _text(module: AnsibleModule, spec: Spec) -> str:
    """The file's wanted content: given inline, or named in ``secrets``."""
    dest, secrets = spec["dest"], module.params["secrets"]
    if (spec["content"] is None) == (spec["secret"] is None):
        module.fail_json(msg=f"{dest}: give either content or secret")
    if spec["secret"] is None:
        return str(spec["content"])
    if spec["secret"] not in secrets:
        module.fail_json(msg=f"{dest}: secret {spec['secret']!r} is not in secrets")
    return str(secrets[spec["secret"]])


def _file(module: AnsibleModule, spec: Spec) -> tuple[bool, Diff | None]:
    dest, text = spec["dest"], _text(module, spec)
    wanted, current = text.encode(), _read(spec["dest"])
    if current is not None and (current == wanted or not spec["force"]):
        return _corrected(module, dest, spec)
    if not module.check_mode:
        _install(module, spec, wanted)
    if not spec["diff"] or spec["secret"] is not None:
        before = after = "(content hidden)\n"
    elif len(wanted) > DIFF_LIMIT or (current is not None and len(current) > DIFF_LIMIT):
        before = after = "(too long to show)\n"
    else:
        before, after = ("" if current is None else current.decode(errors="replace")), text
    return True, {"before_header": dest, "after_header": dest, "before": before, "after": after}


def _install(module: AnsibleModule, spec: Spec, content: bytes) -> None:
    """Write ``content`` next to the destination, set its attributes, validate it, and move it into place."""
    dest = Path(spec["dest"])
    if not dest.parent.is_dir():
        module.fail_json(msg=f"cannot write {dest}: its directory {dest.parent} does not exist")
    # Same directory (the move is atomic), same extension (validators that read the format from it).
    handle, candidate = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=dest.suffix)
    try:
        with open(handle, "wb") as stream:  # noqa: PTH123 (a descriptor, not a path)
            stream.write(content)
        _attributes(module, candidate, spec, True)
        if spec["validate"]:
            if "%s" not in spec["validate"]:
                module.fail_json(msg=f"validate of {dest} must name the candidate file as %s")
            rc, out, err = module.run_command(shlex.split(spec["validate"].replace("%s", shlex.quote(candidate))))
            if rc != 0:
                detail = (err or out).strip()
                module.fail_json(msg=f"{dest} failed its check ({spec['validate']}), nothing written: {detail}")
        Path(candidate).rename(dest)
    finally:
        Path(candidate).unlink(missing_ok=True)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "directories": {"type": "list", "elements": "dict", "default": [], "options": DIRECTORY_SPEC},
            "files": {"type": "list", "elements": "dict", "default": [], "options": FILE_SPEC},
            "secrets": {"type": "dict", "default": {}, "no_log": True},
        },
        supports_check_mode=True,
    )
    changed_paths: list[str] = []
    diffs: list[Diff | None] = []
    for spec in (d for d in module.params["directories"] if d["include"]):
        changed, diff = _directory(module, spec)
        if changed:
            changed_paths.append(spec["path"])
            diffs.append(diff)
    for spec in (f for f in module.params["files"] if f["include"]):
        changed, diff = _file(module, spec)
        if changed:
            changed_paths.append(spec["dest"])
            diffs.append(diff)
    result: dict[str, Any] = {"changed": bool(changed_paths), "changed_paths": changed_paths}
    if module._diff:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
