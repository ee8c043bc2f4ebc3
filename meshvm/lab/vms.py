"""Lab VMs: real systemd hosts booted with systemd-nspawn on an overlay of a shared Debian root filesystem."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from meshvm.errors import OperationFailedError
from meshvm.lab import network
from meshvm.lab.launcher import cgroup_dirs
from meshvm.lab.procs import alive, run, spawn, stop, tcp_open, wait_until

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 60.0


@dataclass(frozen=True)
class VmPaths:
    root: Path

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def launcher_pid(self) -> Path:
        return self.root / "launcher.pid"

    @property
    def nspawn_pid(self) -> Path:
        return self.root / "nspawn.pid"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"


def machine_name(host: str) -> str:
    return f"meshvm-{host}"


def unpack_rootfs(tarball: Path, dest: Path) -> None:
    """Unpack the shared lower layer once; VMs never write to it."""
    stamp = dest / ".meshvm-rootfs"
    if stamp.exists() and stamp.read_text() == tarball.name:
        return
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    run(
        ["tar", "--numeric-owner", "--xattrs", "-C", str(dest), "-I", "zstd", "-xf", str(tarball)],
        what="unpacking the VM root filesystem",
    )
    stamp.write_text(tarball.name)


def _is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with Path("/proc/self/mountinfo").open() as mounts:
        return any(line.split()[4] == target for line in mounts)


def _customise(merged: Path, *, host: str, address: str, public_key: str, hosts_file: str) -> list[str]:
    """Identity of one VM: hostname, machine-id, SSH host keys, root's lab key. Returns known_hosts lines."""
    (merged / "etc/hostname").write_text(f"{host}\n")
    (merged / "etc/hosts").write_text(hosts_file)
    (merged / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    ssh_dir = merged / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key)
    (ssh_dir / "authorized_keys").chmod(0o600)
    known: list[str] = []
    for kind in ("ed25519", "ecdsa"):
        key = merged / f"etc/ssh/ssh_host_{kind}_key"
        if not key.exists():
            run(
                ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{host}", "-f", str(key)],
                what=f"ssh-keygen for {host}",
            )
        pub = Path(f"{key}.pub").read_text().split()
        known.append(f"{address} {pub[0]} {pub[1]}")
    # No RSA host key: sshd would log an error for each missing default key, so name the ones we have.
    (merged / "etc/ssh/sshd_config.d").mkdir(exist_ok=True)
    (merged / "etc/ssh/sshd_config.d/meshvm-lab.conf").write_text(
        "# written by meshvm lab\nHostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
    )
    return known


def nspawn_argv(host: str, merged: Path, netns: str) -> list[str]:
    return [
        "systemd-nspawn",
        "-b",
        "-D",
        str(merged),
        "-M",
        machine_name(host),
        "--hostname",
        host,
        "--register=no",
        "--keep-unit",
        "--link-journal=no",
        "--resolv-conf=off",
        "--timezone=off",
        f"--network-namespace-path={network.netns_path(netns)}",
        "--console=pipe",
    ]


def start(
    host: str, index: int, *, vm_root: Path, lower: Path, public_key: str, hosts_file: str
) -> tuple[str, list[str]]:
    """Create (if needed) and boot VM ``host``; returns its address and known_hosts lines."""
    paths = VmPaths(vm_root)
    netns = machine_name(host)
    address = network.host_net_up(netns, host, network.host_address(index))
    for directory in (paths.upper, paths.work, paths.merged):
        directory.mkdir(parents=True, exist_ok=True)
    if not _is_mounted(paths.merged):
        run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={paths.upper},workdir={paths.work}",
                str(paths.merged),
            ],
            what=f"overlay mount for {host}",
        )
    known = _customise(paths.merged, host=host, address=address, public_key=public_key, hosts_file=hosts_file)
    if paths.launcher_pid.exists() and alive(int(paths.launcher_pid.read_text())):
        return address, known
    argv = [
        sys.executable,
        "-m",
        "meshvm.lab.launcher",
        "--cgroup",
        host,
        "--pidfile",
        str(paths.nspawn_pid),
        "--",
        *nspawn_argv(host, paths.merged, netns),
    ]
    env = dict(os.environ, SYSTEMD_NSPAWN_TMPFS_TMP="1")
    pid = spawn(argv, log_path=paths.console_log, env=env)
    paths.launcher_pid.write_text(f"{pid}\n")
    return address, known


def wait_booted(host: str, address: str, *, vm_root: Path, ssh_argv: list[str]) -> None:
    paths = VmPaths(vm_root)
    pid = int(paths.launcher_pid.read_text())
    wait_until(f"VM {host} SSH", tcp_open(address, 22), timeout=BOOT_TIMEOUT, log_path=paths.console_log, pid=pid)
    deadline = time.monotonic() + BOOT_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        done = subprocess.run(
            [*ssh_argv, "systemctl", "is-system-running", "--wait"],
            capture_output=True,
            text=True,
            timeout=BOOT_TIMEOUT,
            check=False,
        )
        state = done.stdout.strip()
        if state in {"running", "degraded"}:
            if state == "degraded":
                failed = subprocess.run(
                    [*ssh_argv, "systemctl", "--failed", "--no-legend", "--plain"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                ).stdout.strip()
                log.warning("VM %s booted degraded; failed units: %s", host, failed.replace("\n", "; "))
            return
        time.sleep(0.5)
    raise OperationFailedError(f"VM {host} did not finish booting (state {state!r}); log: {paths.console_log}")


def stop_vm(host: str, *, vm_root: Path) -> None:
    paths = VmPaths(vm_root)
    for pidfile in (paths.nspawn_pid, paths.launcher_pid):
        if pidfile.exists():
            with contextlib.suppress(ValueError):
                stop(int(pidfile.read_text()), timeout=30)
            pidfile.unlink(missing_ok=True)
    if paths.merged.exists() and _is_mounted(paths.merged):
        run(["umount", str(paths.merged)], what=f"unmount {host}")
    for directory in cgroup_dirs(host):
        remove_cgroup(directory)
    network.host_net_down(machine_name(host), host)
    shutil.rmtree(vm_root, ignore_errors=True)


def remove_cgroup(directory: Path) -> None:
    """Remove a cgroup tree depth first (cgroup directories are removed with rmdir, never unlink)."""
    if not directory.is_dir():
        return
    for child in sorted((p for p in directory.iterdir() if p.is_dir()), reverse=True):
        remove_cgroup(child)
    for _ in range(50):
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    log.warning("could not remove cgroup %s (processes still inside?)", directory)
