"""Detached lab processes: started in their own session, logged to files, stopped by PID."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from meshvm.errors import OperationFailedError

log = logging.getLogger(__name__)
_random = random.SystemRandom()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host``, below the kernel's ephemeral range.

    A port from the ephemeral range (what binding to port 0 gives) can be taken by any outgoing connection
    between choosing it and the server binding it; ports below that range are only ever taken by a listener.
    """
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = _random.randrange(20000, min(low, 65536))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OperationFailedError(f"no free TCP port found on {host} in 20000-{low}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different ports free right now on ``host`` (see :func:`free_port`)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def spawn(argv: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> int:
    """Start ``argv`` detached (new session, stdin from /dev/null, output appended to ``log_path``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    log.debug("started pid %d: %s", proc.pid, " ".join(argv))
    return proc.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def stop(pid: int, *, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    log.warning("pid %d ignored signal %d for %.0fs; killing it", pid, sig, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_until(
    what: str, probe: Callable[[], bool], *, timeout: float, log_path: Path | None = None, pid: int | None = None
) -> None:
    """Poll ``probe`` until it returns True; fail with the tail of ``log_path`` if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        if pid is not None and not alive(pid):
            break
        time.sleep(0.1)
    tail = ""
    if log_path is not None and log_path.exists():
        lines = log_path.read_text(errors="replace").splitlines()[-15:]
        tail = "\n" + "\n".join(lines)
    state = "exited" if pid is not None and not alive(pid) else f"not ready after {timeout:.0f}s"
    raise OperationFailedError(f"{what} {state}; log: {log_path}{tail}")


def tcp_open(host: str, port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return probe


def http_ok(
    url: str, *, context: ssl.SSLContext | None = None, headers: Mapping[str, str] | None = None
) -> Callable[[], bool]:
    def probe() -> bool:
        request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 - lab URLs only
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:  # noqa: S310
                return bool(200 <= response.status < 300)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    return probe


def run(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input_text: str | None = None,
) -> str:
    """Run a short command; on failure raise with the command's own last words."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=input_text,
        )
    except subprocess.TimeoutExpired as exc:
        raise OperationFailedError(f"{what} timed out after {timeout:.0f}s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
        raise OperationFailedError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout
