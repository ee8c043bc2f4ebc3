"""Logging set up once, from the CLI's -v/-q flags."""

from __future__ import annotations

import logging
import sys


def configure(verbosity: int) -> None:
    """0 = warnings and progress (INFO for meshvm), >0 debug, <0 errors only."""
    if verbosity < 0:
        level = logging.ERROR
    elif verbosity == 0:
        level = logging.INFO
    else:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if verbosity <= 0 else logging.DEBUG)
    logging.getLogger("meshvm").setLevel(level)
