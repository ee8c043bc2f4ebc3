"""Fixtures shared by the molecule scenarios' testinfra tests (molecule/<scenario>/tests/).

The hosts are the lab's VMs, reached over SSH with the lab's key and pinned host keys; the Consul the tests
question is the lab's server, with the management token from the lab state (never printed).

A test marked ``@pytest.mark.units("consul", ...)`` that fails gets the last lines of those units' journals on
every VM appended to its report, so a failure shows what the service said.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra

LAB_STATE = Path("/var/lib/meshvm-lab/lab.json")
VMS = ("vm1", "vm2", "vm3")
JOURNAL_LINES = 60
# How long a test waits for the lab's Consul server when another test run has stopped it.
CONSUL_PATIENCE = 180.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "units(*names): systemd units whose journals a failure report includes")


def _lab() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(LAB_STATE.read_text())
    return data


def _host(name: str) -> Any:
    lab = _lab()
    return testinfra.get_host(f"ssh://{name}", ssh_config=lab["ssh_config"], controlpersist=120)


@pytest.fixture(scope="session")
def lab() -> dict[str, Any]:
    if not LAB_STATE.exists():
        pytest.fail("no lab is up: these tests run on the lab's VMs (`meshvm lab up --hosts 3`)")
    return _lab()


@pytest.fixture(scope="session")
def vm() -> Callable[[str], Any]:
    """vm("vm1") -> a testinfra host."""
    hosts: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in hosts:
            hosts[name] = _host(name)
        return hosts[name]

    return get


@pytest.fixture(scope="session")
def consul(lab: dict[str, Any]) -> Callable[[str], Any]:
    """consul("/v1/...") -> the decoded JSON answer of the lab's Consul server (management token).

    Other test runs share the lab and may restart its Consul server for a while: a refused connection or a 500
    ("no leader") is retried for up to CONSUL_PATIENCE seconds before the test fails.
    """

    def get(path: str) -> Any:
        deadline = time.monotonic() + CONSUL_PATIENCE
        while True:
            request = urllib.request.Request(
                f"http://{_lab()['consul']['local_http_addr']}{path}",
                headers={"X-Consul-Token": lab["consul"]["management_token"]},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return json.loads(response.read() or b"null")
            except (urllib.error.URLError, ConnectionError) as exc:
                transient = not isinstance(exc, urllib.error.HTTPError) or exc.code >= 500
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    return get


def wait_for(
    what: str,
    probe: Callable[[], Any],
    timeout: float = 60.0,
    interval: float = 1.0,
    describe: Callable[[], Any] | None = None,
) -> Any:
    """Call probe until it returns something truthy; else fail with ``what`` and describe() (or the last value)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    detail = describe() if describe is not None else last
    pytest.fail(f"{what}: still not true after {timeout:.0f}s: {detail!r}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    marker = item.get_closest_marker("units")
    if marker is None or report.when != "call" or not report.failed:
        return report
    for name in VMS:
        try:
            host = _host(name)
            for unit in marker.args:
                # -m: the lab rewrites a VM's machine id when another VM is reset, so read every journal file.
                out = host.run(f"journalctl -m --no-pager -o short-iso -n {JOURNAL_LINES} -u {unit}").stdout
                report.sections.append((f"journal of {unit} on {name}", out or "(empty)"))
        except Exception as exc:  # noqa: BLE001 - a report helper must never hide the test's own failure
            report.sections.append((f"journal on {name}", f"could not read it: {exc}"))
    return report
