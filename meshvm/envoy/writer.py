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
from meshvm.envoy.resources import Layout, Resources
from meshvm.fsutil import atomic_write

log = logging.getLogger(__name__)
FILE_MODE = 0o640  # Envoy reads them through its group; secrets hold private keys


@dataclass(frozen=True)
class WriteResult:
    written: int
    removed: int


def _dump(type_url: str, resources: list[dict[str, Any]]) -> str:
    body = [{"@type": type_url, **r} for r in resources]
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    version = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return f'{{"version_info":"{version}","resources":{canonical}}}\n'


def write(resources: Resources, layout: Layout) -> WriteResult:
    """Secrets, endpoints and routes first (they are referenced), then clusters, then listeners; stale last."""
    written = 0

    def put(path: Path, type_url: str, items: list[dict[str, Any]]) -> None:
        nonlocal written
        written += atomic_write(path, _dump(type_url, items), mode=FILE_MODE, durable=False)

    for name, secret in sorted(resources.secrets.items()):
        put(layout.sds(name), t.SECRET, [secret])
    for name, assignment in sorted(resources.endpoints.items()):
        put(layout.eds(name), t.CLUSTER_LOAD_ASSIGNMENT, [assignment])
    for name, route in sorted(resources.routes.items()):
        put(layout.rds(name), t.ROUTE_CONFIGURATION, [route])
    put(layout.cds, t.CLUSTER, resources.clusters)
    put(layout.lds, t.LISTENER, resources.listeners)
    removed = _remove_stale(layout, resources)
    return WriteResult(written=written, removed=removed)


def _remove_stale(layout: Layout, resources: Resources) -> int:
    removed = 0
    keep_sds = {layout.sds(n) for n in resources.secrets}
    keep_rds = {layout.rds(n) for n in resources.routes}
    for directory, keep in ((layout.root / "sds", keep_sds), (layout.root / "rds", keep_rds)):
        if directory.is_dir():
            for path in directory.glob("*.json"):
                if path not in keep:
                    path.unlink()
                    log.info("removed %s", path.relative_to(layout.root))
                    removed += 1
    eds = layout.root / "eds"
    if eds.is_dir():
        for directory in eds.iterdir():
            if directory.name not in resources.endpoints:
                shutil.rmtree(directory)
                log.info("removed %s", directory.relative_to(layout.root))
                removed += 1
    return removed
