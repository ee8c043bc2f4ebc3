"""Atomic file writes: other processes (Envoy, systemd, Ansible) never see a half-written file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644, durable: bool = True) -> bool:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync and rename.

    ``durable=False`` skips the fsyncs: readers still never see a partial file (rename is atomic), but a power
    cut may lose the update. Right for files that are regenerated at start-up anyway (Envoy resources).

    Returns False (and leaves the file untouched) when the content is already identical, so callers can tell
    whether anything changed and Envoy is not woken for nothing.
    """
    payload = data.encode() if isinstance(data, str) else data
    try:
        if path.read_bytes() == payload and (path.stat().st_mode & 0o7777) == mode:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        Path(tmp_name).chmod(mode)
        Path(tmp_name).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp_name).unlink()
        raise
    if not durable:
        return True
    dir_fd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True
