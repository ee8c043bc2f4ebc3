"""Consul blocking queries for the agent, all in one asyncio loop.

One kept-alive connection and one coroutine per watched thing (roots, leaf certificates, the policy key,
intentions, each upstream): a thousand watches cost a few megabytes, where a thread each cost about 40 kB more
apiece. Non-watch calls (registration, KV writes) stay on py-consul.

Each watch is one connection to the local Consul agent, whose ``limits.http_max_conns_per_client`` defaults to
200: a VM calling more than ~190 services needs that limit raised (the consul_agent role sets it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshvm.config import ConsulSpec
from meshvm.consul.failures import server_error
from meshvm.errors import MeshvmError, OperationFailedError, PeerUnreachableError
from meshvm.values import consul_duration

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_START = 0.2
BACKOFF_MAX = 1.0  # with full jitter: back within ~1 s of Consul, without agents retrying in lockstep
MIN_QUERY_INTERVAL = 0.01  # do not spin if Consul keeps returning at once
CONNECT_TIMEOUT = 5.0


@dataclass
class Connection:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class ConsulReader:
    """GETs against the local Consul agent's HTTP API; ``index`` > 0 makes them blocking queries."""

    spec: ConsulSpec
    token: str | None
    _ssl: ssl.SSLContext | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.host, port = self.spec.http_addr.rsplit(":", 1)
        self.port = int(port)
        if self.spec.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=str(self.spec.ca_file) if self.spec.ca_file else None)

    async def get(
        self, conn: Connection, path: str, index: int, params: tuple[tuple[str, str], ...] = ()
    ) -> tuple[int, Any]:
        """(X-Consul-Index, decoded JSON or None for 404). Raises PeerUnreachableError / OperationFailedError."""
        query = list(params)
        if index:
            query += [("index", str(index)), ("wait", consul_duration(self.spec.blocking_wait))]
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        budget = self.spec.blocking_wait * 17 / 16 + 10 if index else 30
        try:
            status, headers, body = await asyncio.wait_for(self._request(conn, target), timeout=budget)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            conn.close()
            raise PeerUnreachableError(
                f"Consul at {self.spec.http_addr} is unreachable ({path})",
                hint="is the Consul agent running and the address right?",
            ) from exc
        new_index = int(headers.get("x-consul-index", "0") or 0)
        if status == 200:
            return new_index, json.loads(body) if body else None
        if status == 404:
            return new_index, None
        text = body.decode(errors="replace").strip()[:200]
        if status >= 500:
            raise server_error(path, status, text)
        if status == 403:
            raise OperationFailedError(
                f"Consul refused {path}: permission denied", hint="the ACL token lacks the right"
            )
        raise OperationFailedError(f"Consul failed {path}: {status} {text}")

    async def _request(self, conn: Connection, target: str) -> tuple[int, dict[str, str], bytes]:
        if conn.writer is None or conn.writer.is_closing():
            conn.reader, conn.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._ssl), timeout=CONNECT_TIMEOUT
            )
        reader, writer = conn.reader, conn.writer
        if reader is None or writer is None:
            raise ConnectionResetError("no connection to Consul")
        token = f"X-Consul-Token: {self.token}\r\n" if self.token else ""
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.spec.http_addr}\r\n{token}Accept: */*\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("connection closed by Consul")
        status = int(status_line.split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                parts.append(await reader.readexactly(size))
                await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            body = b"".join(parts)
        else:
            body = await reader.read()
            conn.close()
        if headers.get("connection", "").lower() == "close":
            conn.close()
        return status, headers, body


async def watch(
    key: str,
    fetch: Callable[[Connection, int], Awaitable[tuple[int, T]]],
    apply: Callable[[T], None],
    on_health: Callable[[str, bool, str], None],
    on_first: Callable[[str], None] = lambda _key: None,
) -> None:
    """Call ``fetch`` forever (until cancelled); hand each new value to ``apply``, the first one too."""
    conn = Connection()
    index, backoff, seen = 0, BACKOFF_START, False
    loop = asyncio.get_running_loop()
    try:
        while True:
            started = loop.time()
            try:
                new_index, value = await fetch(conn, index)
            except MeshvmError as exc:
                on_health(key, False, str(exc))
                # Come back with a plain read, not a blocking one on an index from before the outage: it answers at
                # once (so recovery is seen at once) and the state it returns is current.
                index = 0
                delay = random.uniform(0, backoff)  # noqa: S311 - full jitter, not cryptography
                log.warning("watch %s: %s; retrying in %.1fs", key, exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            on_health(key, True, "")
            backoff = BACKOFF_START
            if new_index < index:
                log.info("watch %s: index reset (%d -> %d)", key, index, new_index)  # a restored or new cluster
                index = 0
                continue
            if new_index == index:
                continue  # the wait expired with nothing new
            first, index = index == 0 and not seen, new_index
            seen = True
            try:
                apply(value)
            except MeshvmError as exc:
                log.error("watch %s: %s", key, exc)
            if first:
                on_first(key)
            elapsed = loop.time() - started
            if elapsed < MIN_QUERY_INTERVAL:
                await asyncio.sleep(MIN_QUERY_INTERVAL - elapsed)
    finally:
        conn.close()
