"""Write rendered resources to the files Envoy watches, in an order that never leaves a dangling reference."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshvm.envoy import types as t
from meshvm.envoy.resources import Layout, Raw, Resources
from meshvm.fsutil import atomic_write

log = logging.getLogger(__name__)
FILE_MODE = 0o640  # Envoy reads them through its group; secrets hold private keys


@dataclass(frozen=True)
class WriteResult:
    written: int
    removed: int


class Writer:
    """Keeps what it wrote (path -> text) and each resource's JSON, so an unchanged resource costs nothing.

    The render cache hands back the very same objects for unchanged upstreams; their text is reused by
    identity (the cache holds the object too, so its id cannot be recycled).
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._scanned = False
        self._on_disk: dict[str, int] = {}  # path -> hash of the text written there
        self._texts: dict[int, tuple[dict[str, Any], str]] = {}
        self._next_texts: dict[int, tuple[dict[str, Any], str]] = {}

    def _text(self, type_url: str, item: dict[str, Any] | Raw) -> str:
        if isinstance(item, Raw):
            return item
        cached = self._texts.get(id(item))
        if cached is not None and cached[0] is item:
            text = cached[1]
        else:
            text = json.dumps({"@type": type_url, **item}, separators=(",", ":"))
        self._next_texts[id(item)] = (item, text)
        return text

    def _document(self, type_url: str, items: list[Any]) -> str:
        body = ",".join(self._text(type_url, item) for item in items)
        version = hashlib.sha256(body.encode()).hexdigest()[:16]
        return f'{{"version_info":"{version}","resources":[{body}]}}\n'

    def _put(self, path: str, text: str) -> bool:
        digest = hash(text)
        if self._on_disk.get(path) == digest:
            return False
        changed = atomic_write(Path(path), text, mode=FILE_MODE, durable=False)
        self._on_disk[path] = digest
        if changed:
            log.debug("wrote %s", Path(path).relative_to(self.layout.root))
        return changed

    def write(self, resources: Resources) -> WriteResult:
        """Secrets, endpoints and routes first (they are referenced), then clusters, then listeners; stale last."""
        layout, written = self.layout, 0
        wanted: set[str] = set()
        self._next_texts = {}
        for name, secret in sorted(resources.secrets.items()):
            path = str(layout.sds(name))
            wanted.add(path)
            written += self._put(path, self._document(t.SECRET, [] if secret is None else [secret]))
        for name, assignment in sorted(resources.endpoints.items()):
            path = str(layout.eds(name))
            wanted.add(path)
            written += self._put(path, self._document(t.CLUSTER_LOAD_ASSIGNMENT, [assignment]))
        for name, route in sorted(resources.routes.items()):
            path = str(layout.rds(name))
            wanted.add(path)
            written += self._put(path, self._document(t.ROUTE_CONFIGURATION, [route]))
        written += self._put(str(layout.cds), self._document(t.CLUSTER, resources.clusters))
        written += self._put(str(layout.lds), self._document(t.LISTENER, resources.listeners))
        wanted |= {str(layout.cds), str(layout.lds)}
        self._texts = self._next_texts
        removed = self._remove_stale(wanted)
        return WriteResult(written=written, removed=removed)

    def _remove_stale(self, wanted: set[str]) -> int:
        """Files under sds/, rds/ and eds/ that the current render does not have (including leftovers on disk
        from an earlier run of the agent, found on the first write)."""
        root = self.layout.root
        if not self._on_disk.keys() - wanted and self._scanned:
            return 0
        removed = 0
        for sub in ("sds", "rds"):
            directory = root / sub
            if directory.is_dir():
                for path in directory.glob("*.json"):
                    if str(path) not in wanted:
                        path.unlink()
                        log.info("removed %s", path.relative_to(root))
                        removed += 1
        eds = root / "eds"
        if eds.is_dir():
            for directory in eds.iterdir():
                if str(directory / "cla.json") not in wanted:
                    shutil.rmtree(directory)
                    log.info("removed %s", directory.relative_to(root))
                    removed += 1
        self._on_disk = {p: digest for p, digest in self._on_disk.items() if p in wanted}
        self._scanned = True
        return removed


def write(resources: Resources, layout: Layout) -> WriteResult:
    """One-off write (tests, `meshvm render`); the agent keeps a :class:`Writer` across renders."""
    return Writer(layout).write(resources)
