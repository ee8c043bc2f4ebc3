"""Running meshvm's playbooks through ansible-runner, with live per-host progress and no secret on a command line."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshvm.errors import ConfigError, PrerequisiteError
from meshvm.fsutil import atomic_write

log = logging.getLogger(__name__)


def project_dir(explicit: Path | None = None) -> Path:
    """The meshvm tree holding playbooks/ and roles/: --project, else the checkout this package runs from."""
    candidate = explicit or Path(__file__).resolve().parents[1]
    if not (candidate / "playbooks" / "enroll.yml").exists():
        raise ConfigError(
            f"{candidate} has no playbooks/enroll.yml", hint="pass --project with the path of a meshvm checkout"
        )
    return candidate


@dataclass
class HostOutcome:
    """How one host fared in a playbook run."""

    ok: bool = True
    failed_task: str = ""
    message: str = ""
    changed: int = 0
    last_task: str = ""


@dataclass
class PlaybookRun:
    rc: int
    hosts: dict[str, HostOutcome] = field(default_factory=dict)

    def failed(self) -> dict[str, HostOutcome]:
        return {h: o for h, o in self.hosts.items() if not o.ok}


def run(
    playbook: str,
    *,
    inventory: Sequence[Path],
    project: Path,
    limit: list[str],
    extravars: dict[str, Any],
    host_vars: dict[str, dict[str, Any]] | None = None,
    check: bool = False,
    on_task: Callable[[str, str], None] | None = None,
) -> PlaybookRun:
    """Run ``playbooks/<playbook>`` for ``limit``; ``on_task(host, task)`` reports progress as it happens.

    ``host_vars`` (host -> variables, secrets among them) reach the play as a second inventory source that
    overrides the first for those hosts; like the extra vars, it lives only in the private runner directory.
    """
    try:
        import ansible_runner
    except ImportError as exc:
        raise PrerequisiteError("ansible-runner is not installed", hint="pip install 'meshvm[controller]'") from exc
    outcome: dict[str, HostOutcome] = {h: HostOutcome() for h in limit}

    stats: dict[str, Any] = {}

    def handle(event: dict[str, Any]) -> bool:
        data = event.get("event_data") or {}
        if event.get("event") == "playbook_on_stats":
            stats.update(data)
        host, task = data.get("host"), data.get("task", "")
        if host not in outcome:
            return True
        kind = event.get("event", "")
        if kind == "runner_on_start":
            outcome[host].last_task = task
            if on_task:
                on_task(host, task)
        elif kind == "runner_on_ok" and (data.get("res") or {}).get("changed"):
            outcome[host].changed += 1
        elif (kind == "runner_on_failed" and not data.get("ignore_errors")) or kind == "runner_on_unreachable":
            result = data.get("res") or {}
            outcome[host].ok = False
            outcome[host].failed_task = task
            outcome[host].message = str(result.get("msg") or result.get("stderr") or "unreachable")[:300]
        return False  # keep no event in memory or on disk beyond what we summarise

    env = {
        "ANSIBLE_CONFIG": str(project / "ansible.cfg"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_NOCOLOR": "1",
    }
    # The private data dir holds the extra vars (the bootstrap secrets among them): private, and deleted after.
    with tempfile.TemporaryDirectory(prefix="meshvm-runner-") as private:
        Path(private).chmod(0o700)
        inventories = [str(source.resolve()) for source in inventory]
        if host_vars:
            overlay = Path(private) / "meshvm-host-vars.yml"
            atomic_write(overlay, yaml.safe_dump({"all": {"hosts": host_vars}}), mode=0o600)
            inventories.append(str(overlay))
        result = ansible_runner.run(
            private_data_dir=private,
            project_dir=str(project),
            playbook=str(project / "playbooks" / playbook),
            inventory=inventories,
            limit=",".join(limit),
            extravars=extravars,
            envvars=env,
            cmdline="--check --diff" if check else None,
            event_handler=handle,
            quiet=True,
        )
    processed = stats.get("processed") or {}
    for host, state in outcome.items():
        if state.ok and host not in processed:
            # The play stopped early (max_fail_percentage) or the host was left out before its turn.
            state.ok, state.failed_task, state.message = False, "(not run)", "the playbook stopped before this host"
        log.debug("%s: %s", host, state)
    return PlaybookRun(rc=int(result.rc or 0), hosts=outcome)
