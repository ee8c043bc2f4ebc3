"""Helpers for tests that act as a lab pod's app (its traffic goes through the pod's Istio sidecar)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

from meshvm.lab import pods
from meshvm.lab.state import LabState
from tests.support.mesh import wait_for


def in_pod(lab: LabState, name: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pods.in_pod(lab.pod(name), list(argv)), capture_output=True, text=True, check=False, timeout=timeout
    )


def curl(lab: LabState, name: str, url: str) -> tuple[int, str]:
    """(HTTP status, body) of a GET from the pod's app side: the pod's sidecar captures it."""
    done = in_pod(lab, name, "curl", "-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}", url)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def eventually(what: str, probe: Callable[[], Any], *, timeout: float = 30.0) -> Any:
    """What ``probe`` returns once it is truthy (configuration takes a moment to reach every sidecar)."""
    seen: list[Any] = []
    wait_for(what, lambda: seen.append(probe()) or seen[-1], timeout=timeout, interval=0.5)
    return seen[-1]


def curl_until(lab: LabState, name: str, url: str, status: int, *, timeout: float = 30.0) -> str:
    """The body of the first answer with ``status`` (policies take a moment to reach the sidecars)."""
    answers: list[tuple[int, str]] = []

    def probe() -> bool:
        answers.append(curl(lab, name, url))
        return answers[-1][0] == status

    eventually(f"{name}: GET {url} -> {status}", probe, timeout=timeout)
    return answers[-1][1]


def envoy_admin(lab: LabState, name: str, path: str) -> str:
    done = in_pod(lab, name, "curl", "-sf", f"http://127.0.0.1:15000{path}")
    assert done.returncode == 0, done.stderr
    return done.stdout


# Many requests from inside a pod in one process (one `ip netns exec` each would cost more than the requests):
# prints {"<status or error>": count, ...} and the "hostname" field of each 200 answer's JSON, counted.
LOOP = """
import collections, http.client, json, sys, time, urllib.parse
url, count, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
parts = urllib.parse.urlsplit(url)
codes, hosts = collections.Counter(), collections.Counter()
conn = None
for _ in range(count):
    try:
        if conn is None:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=5)
        conn.request("GET", parts.path or "/")
        reply = conn.getresponse()
        body = reply.read()
        codes[str(reply.status)] += 1
        if reply.status == 200:
            hosts[json.loads(body).get("hostname", "?")] += 1
        if reply.getheader("connection", "").lower() == "close":
            conn.close(); conn = None
    except Exception as exc:
        codes[type(exc).__name__] += 1
        conn = None
    if pause:
        time.sleep(pause)
print(json.dumps({"codes": codes, "hosts": hosts}))
"""
