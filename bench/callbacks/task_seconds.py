"""Ansible callback for bench.enroll: wall seconds of every task (summed over its hosts' results) and how many tasks
each host ran, written as JSON to $MESHVM_BENCH_TASKS when the playbook ends. Handlers count as tasks."""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: task_seconds
type: aggregate
short_description: wall seconds per task and tasks per host, as JSON (meshvm's enrollment benchmark)
requirements: [MESHVM_BENCH_TASKS names the output file]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "task_seconds"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._current: tuple[str, float] | None = None
        self._seconds: defaultdict[str, float] = defaultdict(float)
        self._per_host: Counter[str] = Counter()

    def _close(self) -> None:
        if self._current is not None:
            name, started = self._current
            self._seconds[name] += time.monotonic() - started
        self._current = None

    def _start(self, task) -> None:  # type: ignore[no-untyped-def]
        self._close()
        self._current = (f"{task.get_name()}", time.monotonic())

    def v2_playbook_on_task_start(self, task, is_conditional):  # type: ignore[no-untyped-def]
        self._start(task)

    def v2_playbook_on_handler_task_start(self, task):  # type: ignore[no-untyped-def]
        self._start(task)

    def _ran(self, result) -> None:  # type: ignore[no-untyped-def]
        self._per_host[result._host.get_name()] += 1

    v2_runner_on_ok = v2_runner_on_failed = v2_runner_on_unreachable = _ran  # skipped tasks are not counted

    def v2_playbook_on_stats(self, stats):  # type: ignore[no-untyped-def]
        self._close()
        target = os.environ.get("MESHVM_BENCH_TASKS")
        if target:
            profile = {"seconds": dict(self._seconds), "tasks_per_host": dict(self._per_host)}
            Path(target).write_text(json.dumps(profile, indent=1), encoding="utf-8")
