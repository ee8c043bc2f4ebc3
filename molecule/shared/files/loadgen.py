#!/usr/bin/python3
"""A load loop for the molecule scenarios: GET a URL over and over, count what happens, write it as JSON.

Usage: loadgen.py URL OUT [--interval SECONDS] [--timeout SECONDS]

Each request opens a new connection (as a short-lived client would). Results go to OUT (atomically) every
second and when SIGTERM ends the loop: requests, ok, failed, failures by reason (with the first few in full) and
the instances that answered (the `hostname` field of the demo app's JSON).
"""

import argparse
import json
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

stop = False


def _stop(*_: object) -> None:
    global stop  # noqa: PLW0603 - the signal handler's only way to end the loop
    stop = True


def write(path: str, data: dict[str, object]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    requests = ok = 0
    reasons: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    first_failures: list[str] = []
    started = time.time()
    last_write = 0.0
    while not stop:
        requests += 1
        try:
            with urllib.request.urlopen(args.url, timeout=args.timeout) as response:
                body = json.loads(response.read())
            ok += 1
            answered[str(body.get("hostname"))] += 1
        except urllib.error.HTTPError as exc:
            reasons[f"HTTP {exc.code}"] += 1
            if len(first_failures) < 20:
                first_failures.append(f"{time.time():.3f} HTTP {exc.code}: {exc.read()[:200]!r}")
        except (OSError, ValueError) as exc:
            reasons[type(exc).__name__] += 1
            if len(first_failures) < 20:
                first_failures.append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
        now = time.time()
        if now - last_write >= 1.0:
            last_write = now
            write(args.out, snapshot(started, requests, ok, reasons, answered, first_failures, running=True))
        time.sleep(args.interval)
    write(args.out, snapshot(started, requests, ok, reasons, answered, first_failures, running=False))


def snapshot(
    started: float,
    requests: int,
    ok: int,
    reasons: Counter[str],
    answered: Counter[str],
    first_failures: list[str],
    *,
    running: bool,
) -> dict[str, object]:
    return {
        "running": running,
        "seconds": round(time.time() - started, 1),
        "requests": requests,
        "ok": ok,
        "failed": requests - ok,
        "reasons": dict(reasons),
        "answered_by": dict(answered),
        "first_failures": first_failures,
    }


if __name__ == "__main__":
    main()
