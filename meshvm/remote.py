"""meshvm's own SSH to VMs (paramiko): preflight checks and health probes, with Ansible's connection settings."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import paramiko

from meshvm.errors import PeerUnreachableError
from meshvm.inventory import InventoryHost

log = logging.getLogger(__name__)
TIMEOUT = 10.0


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


class Remote:
    """One SSH connection to an inventory host; use as a context manager."""

    def __init__(self, host: InventoryHost) -> None:
        self.host = host
        self._client = paramiko.SSHClient()

    def __enter__(self) -> Remote:
        client = self._client
        if self.host.known_hosts:
            client.load_host_keys(self.host.known_hosts)
        else:
            client.load_system_host_keys()
        client.set_missing_host_key_policy(
            paramiko.RejectPolicy() if self.host.strict_host_keys else paramiko.WarningPolicy()
        )
        try:
            client.connect(
                self.host.address,
                port=self.host.port,
                username=self.host.user,
                key_filename=str(Path(self.host.key_file).expanduser()) if self.host.key_file else None,
                timeout=TIMEOUT,
                banner_timeout=TIMEOUT,
                auth_timeout=TIMEOUT,
                look_for_keys=True,
                allow_agent=True,
            )
        except (OSError, paramiko.SSHException) as exc:
            client.close()
            raise PeerUnreachableError(
                f"{self.host.name} ({self.host.address}) is unreachable over SSH: {exc}"
            ) from exc
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def run(self, *argv: str, timeout: float = 30.0) -> Result:
        command = shlex.join(argv)
        try:
            _stdin, stdout, stderr = self._client.exec_command(command, timeout=timeout)
            out, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
        except (TimeoutError, OSError, paramiko.SSHException) as exc:
            raise PeerUnreachableError(f"{self.host.name}: `{command}` failed over SSH: {exc}") from exc
        return Result(code, out, err)

    def put(self, local: Path, dest: str, mode: int = 0o644) -> None:
        """Copy a file to the host over the same connection (SFTP)."""
        try:
            sftp = self._client.open_sftp()
            try:
                sftp.put(str(local), dest)
                sftp.chmod(dest, mode)
            finally:
                sftp.close()
        except (OSError, paramiko.SSHException) as exc:
            raise PeerUnreachableError(f"{self.host.name}: copying {local.name} failed: {exc}") from exc
