"""Keeps one lab VM running: ``python -m meshvm.lab.launcher --cgroup NAME -- systemd-nspawn …``.

It moves itself into a cgroup of its own in every hierarchy systemd inside the container looks at (else all VMs
would share one cgroup), then runs systemd-nspawn, starting it again when the container asks for a reboot
(nspawn exits 133). SIGTERM is passed on to nspawn, which powers the container off cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
REBOOT_EXIT = 133


def cgroup_dirs(name: str) -> list[Path]:
    return [root / "meshvm-lab" / name for root in CGROUP_ROOTS if root.is_dir()]


def enter_cgroup(name: str) -> None:
    for directory in cgroup_dirs(name):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text(f"{os.getpid()}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshvm-lab-launcher")
    parser.add_argument("--cgroup", required=True)
    parser.add_argument("--pidfile", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    enter_cgroup(args.cgroup)
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while True:
        child = subprocess.Popen(command)
        args.pidfile.write_text(f"{child.pid}\n")
        code = child.wait()
        print(f"launcher: nspawn exited with {code}", file=sys.stderr, flush=True)
        if stopping or code != REBOOT_EXIT:
            args.pidfile.unlink(missing_ok=True)
            return code


if __name__ == "__main__":
    sys.exit(main())
