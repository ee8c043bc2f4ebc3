"""One Consul blocking query kept alive in a thread, with backoff and jitter while Consul is away."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from meshvm.errors import MeshvmError

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_START = 0.2
BACKOFF_MAX = 2.0  # with full jitter: back within 2 s of Consul, without agents retrying in lockstep
MIN_QUERY_INTERVAL = 0.01  # do not spin if Consul keeps returning at once


class Watch(threading.Thread, Generic[T]):
    """Calls ``fetch(index)`` forever; hands each new value to ``apply`` (the first one too)."""

    def __init__(
        self,
        name: str,
        fetch: Callable[[int], tuple[int, T]],
        apply: Callable[[T], None],
        *,
        stop: threading.Event,
        on_health: Callable[[str, bool, str], None],
    ) -> None:
        super().__init__(name=f"watch:{name}", daemon=True)
        self.key = name
        self._fetch = fetch
        self._apply = apply
        self._stopping = stop
        self._on_health = on_health
        self.index = 0

    def run(self) -> None:
        backoff = BACKOFF_START
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                new_index, value = self._fetch(self.index)
            except MeshvmError as exc:
                self._on_health(self.key, False, str(exc))
                # Come back with a plain read, not a blocking one on an index from before the outage: it
                # answers at once (so recovery is seen at once) and the state it returns is current.
                self.index = 0
                # Full jitter: agents that lost Consul together must not come back together.
                delay = random.uniform(0, backoff)  # noqa: S311 - jitter, not cryptography
                log.warning("%s: %s; retrying in %.1fs", self.name, exc, delay)
                self._stopping.wait(delay)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self._on_health(self.key, True, "")
            backoff = BACKOFF_START
            if new_index < self.index:
                # Consul's index went backwards (a restored or new cluster): start over.
                log.info("%s: index reset (%d -> %d)", self.name, self.index, new_index)
                self.index = 0
                continue
            if new_index == self.index:
                continue  # the wait expired with nothing new
            self.index = new_index
            try:
                self._apply(value)
            except MeshvmError as exc:
                log.error("%s: %s", self.name, exc)
            elapsed = time.monotonic() - started
            if elapsed < MIN_QUERY_INTERVAL:
                self._stopping.wait(MIN_QUERY_INTERVAL - elapsed)
