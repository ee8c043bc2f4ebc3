"""meshvm.mesh.host_resources: one role's host checks (free space, free ports, Python modules) in one module run."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: host_resources
short_description: Check a host has the free space, free ports and Python modules a role needs, in one step
description:
  - Fails with one message that names the host, what is short and what to do (I(hint)) when a path has less than
    I(min_free_mib) free, when a port of I(ports) is held by a program not in I(owners), or when the host's
    Python cannot import a module of I(python_modules). Also says which of I(look_for) exist.
  - Reads free space with statvfs and listening sockets with C(ss) (iproute2). Changes nothing; runs in check mode.
options:
  role: {description: Who needs it (the role's name), for messages., type: str, required: true}
  free_space_paths:
    {description: Paths whose file systems need I(min_free_mib) MiB free., type: list, elements: path, default: []}
  min_free_mib: {description: Free MiB needed on each of I(free_space_paths)., type: int, default: 0}
  free_space_hint: {description: What to do when space is short., type: str, default: free some space}
  ports: {description: Ports that must be free (or held by I(owners))., type: list, elements: int, default: []}
  udp: {description: Also look at UDP sockets., type: bool, default: false}
  owners:
    {description: Programs allowed to hold I(ports) (the role's own)., type: list, elements: str, default: []}
  ports_hint: {description: What to do when a port is taken., type: str, default: stop the program holding it}
  python_modules: {description: Modules the host's Python must import., type: list, elements: str, default: []}
  python_hint: {description: What to do when a module is missing., type: str, default: install it}
  look_for:
    {description: Paths to report as existing or not (nothing is checked)., type: list, elements: path, default: []}
author: meshvm
"""

RETURN = r"""
free_mib: {description: Free MiB per path of I(free_space_paths)., type: dict, returned: always}
listeners: {description: The ss lines of sockets listening on I(ports)., type: list, elements: str, returned: always}
exists: {description: Path of I(look_for) -> whether it exists., type: dict, returned: always}
"""

ARGS: dict[str, dict[str, Any]] = {
    "role": {"type": "str", "required": True},
    "free_space_paths": {"type": "list", "elements": "path", "default": []},
    "min_free_mib": {"type": "int", "default": 0},
    "free_space_hint": {"type": "str", "default": "free some space"},
    "ports": {"type": "list", "elements": "int", "default": []},
    "udp": {"type": "bool", "default": False},
    "owners": {"type": "list", "elements": "str", "default": []},
    "ports_hint": {"type": "str", "default": "stop the program holding it"},
    "python_modules": {"type": "list", "elements": "str", "default": []},
    "python_hint": {"type": "str", "default": "install it"},
    "look_for": {"type": "list", "elements": "path", "default": []},
}


def listening_on(ss_output: str, ports: set[int], *, udp: bool) -> list[str]:
    """The lines of ``ss -H -l -n -p -t -u`` (protocol, state, queues, local address, peer, process) of TCP
    (and with ``udp`` UDP) sockets whose local port is in ``ports``."""
    found = []
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] not in (("tcp", "udp") if udp else ("tcp",)):
            continue
        port = fields[4].rsplit(":", 1)[-1]
        if port.isdigit() and int(port) in ports:
            found.append(line.strip())
    return found


def main() -> None:
    module = AnsibleModule(argument_spec=ARGS, supports_check_mode=True)
    p, host = module.params, os.uname().nodename
    problems: list[str] = []

    free = {}
    for path in p["free_space_paths"]:
        stat = os.statvfs(path)
        free[path] = stat.f_bavail * stat.f_frsize // (1024 * 1024)
    short = {path: mib for path, mib in free.items() if mib < p["min_free_mib"]}
    if short:
        where = ", ".join(f"{mib} MiB on {path}" for path, mib in short.items())
        problems.append(f"{host} has only {where}; {p['role']} needs {p['min_free_mib']}: {p['free_space_hint']}")

    listeners: list[str] = []
    if p["ports"]:
        rc, out, err = module.run_command(["ss", "-H", "-l", "-n", "-p", "-t", "-u"])
        if rc != 0:
            module.fail_json(msg=f"cannot list listening sockets on {host} with ss: {err.strip()}")
        listeners = listening_on(out, set(p["ports"]), udp=p["udp"])
        taken = [line for line in listeners if not any(f'(("{owner}"' in line for owner in p["owners"])]
        if taken:
            ports = ", ".join(map(str, p["ports"]))
            problems.append(
                f"{p['role']} needs ports {ports} on {host}, but another program holds some: {' | '.join(taken)}. "
                f"{p['ports_hint']}"
            )

    missing = [name for name in p["python_modules"] if importlib.util.find_spec(name) is None]
    if missing:
        problems.append(f"the Python of {host} cannot import {', '.join(missing)}: {p['python_hint']}")

    result = {
        "changed": False,
        "free_mib": free,
        "listeners": listeners,
        "exists": {path: os.path.lexists(path) for path in p["look_for"]},
    }
    if problems:
        module.fail_json(msg=" ".join(problems), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
