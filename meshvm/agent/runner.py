"""The agent's main loop: register, watch Consul, render Envoy's resources on every change, report health."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from meshvm.agent import core
from meshvm.agent.istio import IstioIdentity
from meshvm.agent.metrics import AgentMetrics
from meshvm.config import AgentConfig
from meshvm.consul.client import ConsulClient
from meshvm.consul.parse import parse_health_connect, parse_intentions, parse_kv, parse_leaf, parse_roots
from meshvm.consul.watch import Connection, ConsulReader, watch
from meshvm.envoy import resources as envoy_resources
from meshvm.envoy import writer
from meshvm.envoy.snapshot import Instance, Leaf, Roots, Snapshot
from meshvm.errors import MeshvmError, OperationFailedError
from meshvm.policy import POLICY_KEY, AuthorizationRule

log = logging.getLogger(__name__)
REGISTER_BACKOFF_MAX = 10.0
REGISTRATION_CHECK_INTERVAL = 5.0
INITIAL_SYNC_TIMEOUT = 10.0  # seconds to wait for every watch's first answer before rendering anyway


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


class Agent:
    def __init__(self, config: AgentConfig, client: ConsulClient | None = None) -> None:
        self.config = config
        self.client = client or ConsulClient.for_agent(config)
        self.reader = ConsulReader(config.consul, config.consul.token())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch_tasks: list[asyncio.Task[None]] = []
        self._watch_thread: threading.Thread | None = None
        self.layout = envoy_resources.Layout(config.envoy.config_dir)
        self._render_cache = envoy_resources.RenderCache()
        self._writer = writer.Writer(self.layout)
        self.metrics = AgentMetrics()
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._state = core.initial(Snapshot(config=config))
        self._pending_since: float | None = None
        self._timers: dict[str, threading.Timer] = {}
        self._rendered_once = False
        self._last_error = ""
        self._intentions_supported = True
        self._awaiting_first: set[str] = {"(not started)"}
        self._started = time.monotonic()
        self._server: ThreadingHTTPServer | None = None
        self.metrics.policy_valid.set(1)
        self.istio = IstioIdentity(config.istio, self._set_istio, self.metrics) if config.istio else None

    # --- state updates: every watch answer, failure and timer goes through core.step --------------------------

    @property
    def _snapshot(self) -> Snapshot:
        return self._state.snapshot

    def _event(self, event: core.Event) -> None:
        """Apply ``event`` to the state (core.step, under the lock) and carry out its effects."""
        with self._lock:
            self._state, effects = core.step(self._state, event, time.monotonic())
            for effect in effects:
                if isinstance(effect, core.Render) and self._pending_since is None:
                    self._pending_since = time.monotonic()
                elif isinstance(effect, core.SetTimer):
                    self._set_timer(effect)
        for effect in effects:
            if isinstance(effect, core.Render):
                self._dirty.set()
            elif isinstance(effect, core.Metric):
                metric = getattr(self.metrics, effect.name)
                (metric.set if effect.op == "set" else metric.inc)(effect.value, **dict(effect.labels))
            elif isinstance(effect, core.Log):
                getattr(log, effect.level)("%s", effect.message)

    def _set_timer(self, effect: core.SetTimer) -> None:
        """Called with the lock held: (re)arm the timer that delivers TimerFired(key, due)."""
        pending = self._timers.pop(effect.key, None)
        if pending is not None:
            pending.cancel()
        delay = max(effect.due - time.monotonic(), 0.0)
        timer = threading.Timer(delay, self._event, args=(core.TimerFired(effect.key, effect.due),))
        timer.daemon = True
        self._timers[effect.key] = timer
        timer.start()

    def _set_upstream(self, service: str) -> Callable[[tuple[Instance, ...]], None]:
        return lambda instances: self._event(core.Upstreams(service, instances))

    def _set_istio(self, leaf: Leaf, roots: Roots) -> None:
        self._event(core.IstioIdentity(leaf, roots))

    def _on_health(self, key: str, ok: bool, error: str) -> None:
        self._event(core.WatchHealth(key, ok, error))

    # --- watches -------------------------------------------------------------------------------------------

    # Each fetch takes the watch's connection and the index to block on, and returns (new index, value).

    async def _fetch_roots(self, conn: Connection, index: int) -> tuple[int, Roots]:
        new_index, data = await self.reader.get(conn, "/v1/agent/connect/ca/roots", index)
        return new_index, parse_roots(data)

    async def _fetch_leaf(self, service: str, conn: Connection, index: int) -> tuple[int, Leaf]:
        new_index, data = await self.reader.get(conn, f"/v1/agent/connect/ca/leaf/{service}", index)
        return new_index, parse_leaf(service, data)

    async def _fetch_upstream(self, service: str, conn: Connection, index: int) -> tuple[int, tuple[Instance, ...]]:
        new_index, data = await self.reader.get(conn, f"/v1/health/connect/{service}", index)
        return new_index, parse_health_connect(data)

    async def _fetch_policy(self, conn: Connection, index: int) -> tuple[int, bytes | None]:
        key = f"{self.config.consul.policy_prefix}/{POLICY_KEY}"
        new_index, data = await self.reader.get(conn, f"/v1/kv/{key}", index)
        return new_index, parse_kv(data)

    async def _fetch_intentions(self, conn: Connection, index: int) -> tuple[int, tuple[AuthorizationRule, ...]]:
        if not self._intentions_supported:
            await asyncio.sleep(3600)
            return index, ()
        try:
            new_index, data = await self.reader.get(conn, "/v1/connect/intentions", index)
        except OperationFailedError as exc:
            # No intentions API or no right to read it: the policy's authorization rules still apply.
            log.warning("not watching Consul intentions: %s", exc)
            self._intentions_supported = False
            return index + 1, ()
        return new_index, parse_intentions(data)

    def watches(
        self,
    ) -> list[tuple[str, Callable[[Connection, int], Awaitable[tuple[int, Any]]], Callable[[Any], None]]]:
        """(key, fetch, apply) for everything the agent watches."""
        found: list[tuple[str, Callable[[Connection, int], Awaitable[tuple[int, Any]]], Callable[[Any], None]]] = [
            ("roots", self._fetch_roots, lambda roots: self._event(core.RootsAnswer(roots))),
            ("policy", self._fetch_policy, lambda raw: self._event(core.PolicyAnswer(raw))),
            ("intentions", self._fetch_intentions, lambda rules: self._event(core.Intentions(rules))),
        ]
        for service in self.config.services:
            found.append(
                (
                    f"leaf:{service.name}",
                    functools.partial(self._fetch_leaf, service.name),
                    lambda leaf: self._event(core.LeafAnswer(leaf)),
                )
            )
        for destination in sorted({u.service for s in self.config.services for u in s.upstreams}):
            found.append(
                (
                    f"upstream:{destination}",
                    functools.partial(self._fetch_upstream, destination),
                    self._set_upstream(destination),
                )
            )
        return found

    def _run_watches(self) -> None:
        """The watch thread: one asyncio loop, one coroutine per watch, cancelled by :meth:`shutdown`."""

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            watches = self.watches()
            self._awaiting_first = {key for key, _fetch, _apply in watches}
            tasks = [
                asyncio.create_task(watch(key, fetch, apply, self._on_health, self._first_answer))
                for key, fetch, apply in watches
            ]
            self._watch_tasks = tasks
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())

    # --- rendering -----------------------------------------------------------------------------------------

    def _first_answer(self, key: str) -> None:
        with self._lock:
            self._awaiting_first.discard(key)
            done = not self._awaiting_first
        if done:
            log.info("initial sync from Consul complete in %.1fs", time.monotonic() - self._started)
            self._dirty.set()

    def _initial_sync_pending(self) -> bool:
        """Until every watch has answered once (or INITIAL_SYNC_TIMEOUT passed), one full render beats many partial
        ones: a VM calling 1000 services would otherwise rewrite its listeners once per arriving answer."""
        with self._lock:
            pending = bool(self._awaiting_first)
        return pending and time.monotonic() - self._started < INITIAL_SYNC_TIMEOUT

    def render_once(self) -> bool:
        """Render and write the current snapshot; False while certificates are still missing."""
        if not self._rendered_once and self._initial_sync_pending():
            return False
        with self._lock:
            snapshot, pending_since = self._snapshot, self._pending_since
            self._pending_since = None
        if not snapshot.ready():
            log.debug("waiting for the CA roots and leaf certificates before the first render")
            return False
        started = time.monotonic()
        try:
            result = self._writer.write(envoy_resources.build(snapshot, self.layout, self._render_cache))
        except (OSError, ValueError, KeyError) as exc:
            self.metrics.errors.inc(kind="render")
            self._last_error = f"render: {exc}"
            log.exception("rendering Envoy resources failed; the previous files stay in place")
            return False
        finished = time.monotonic()
        self.metrics.render_seconds.observe(finished - started)
        if pending_since is not None:
            self.metrics.convergence_seconds.observe(finished - pending_since)
        self.metrics.syncs.inc()
        self.metrics.last_sync.set(time.time())
        if result.written or result.removed:
            log.info(
                "Envoy resources: %d files written, %d removed in %.1f ms",
                result.written,
                result.removed,
                (finished - started) * 1000,
            )
        if self._last_error.startswith("render"):
            self._last_error = ""
        if not self._rendered_once:
            self._rendered_once = True
            sd_notify("READY=1\nSTATUS=Envoy resources rendered")
        return True

    def _register_until_done(self) -> None:
        delay = 0.5
        while not self.stop_event.is_set():
            try:
                self.client.register(self.config)
                log.info(
                    "registered %s with Consul at %s",
                    ", ".join(s.name for s in self.config.services),
                    self.client.address,
                )
                return
            except MeshvmError as exc:
                self.metrics.errors.inc(kind="register")
                self._last_error = f"register: {exc}"
                log.warning("registration failed (%s); retrying in %.1fs", exc, delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, REGISTER_BACKOFF_MAX)
        return

    def _keep_registered(self) -> None:
        """Anti-entropy for our own registrations: a local Consul agent that lost them (wiped, rebuilt) gets
        them back within ``REGISTRATION_CHECK_INTERVAL``."""
        expected = {s.name for s in self.config.services} | {s.sidecar_id for s in self.config.services}
        while not self.stop_event.wait(REGISTRATION_CHECK_INTERVAL):
            try:
                missing = expected - set(self.client.registered())
                if missing:
                    log.warning("Consul lost %s; registering again", ", ".join(sorted(missing)))
                    self.client.register(self.config)
            except MeshvmError as exc:
                log.debug("registration check skipped: %s", exc)

    # --- health endpoint -----------------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            consul_errors = dict(self._state.unhealthy)
            policy_error = self._state.policy_error
        last = self.metrics.last_sync.value()
        body: dict[str, Any] = {
            "rendered": self._rendered_once,
            "last_sync_age_seconds": round(time.time() - last, 3) if last else None,
            "consul_reachable": not consul_errors,
            "consul_errors": consul_errors,
            "policy_valid": self.metrics.policy_valid.value() == 1,
            "last_error": policy_error or self._last_error or None,
        }
        if self.istio is not None:
            body["istio"] = self.istio.status()
        # Healthy means Envoy has a configuration from us; Consul being away is degraded, not down.
        return (200 if self._rendered_once else 503), body

    def serve_http(self) -> ThreadingHTTPServer:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    status, payload, ctype = 200, agent.metrics.render().encode(), "text/plain; version=0.0.4"
                elif self.path in {"/health", "/healthz"}:
                    status, body = agent.health()
                    payload, ctype = json.dumps(body).encode(), "application/json"
                else:
                    status, payload, ctype = 404, b"not found\n", "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: %s", format % args)

        server = ThreadingHTTPServer((self.config.agent.listen_address, self.config.agent.listen_port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="agent-http", daemon=True).start()
        self._server = server
        return server

    # --- lifecycle -----------------------------------------------------------------------------------------

    def run(self, *, deregister_on_stop: bool = True) -> None:
        """Run until :attr:`stop_event` is set (SIGTERM in the CLI); then deregister."""
        self.config.envoy.config_dir.mkdir(parents=True, exist_ok=True)
        self.serve_http()
        self._register_until_done()
        self._watch_thread = threading.Thread(target=self._run_watches, name="watches", daemon=True)
        self._watch_thread.start()
        threading.Thread(target=self._keep_registered, name="registration", daemon=True).start()
        if self.istio is not None:
            threading.Thread(target=self.istio.run, args=(self.stop_event,), name="istio", daemon=True).start()
        debounce = self.config.agent.debounce
        while not self.stop_event.is_set():
            if not self._dirty.wait(timeout=1.0):
                if not self._rendered_once and not self._initial_sync_pending():
                    self._dirty.set()  # the initial sync timed out: render what we have
                continue
            # Debounce: let a burst of changes settle into one render.
            self.stop_event.wait(debounce)
            self._dirty.clear()
            self.render_once()
        self.shutdown(deregister=deregister_on_stop)

    def shutdown(self, *, deregister: bool) -> None:
        if self._loop is not None:
            for task in self._watch_tasks:
                self._loop.call_soon_threadsafe(task.cancel)
        if deregister:
            try:
                self.client.deregister(self.config)
                log.info("deregistered %s from Consul", ", ".join(s.name for s in self.config.services))
            except MeshvmError as exc:
                log.warning("could not deregister on stop: %s", exc)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
