"""The one error hierarchy of meshvm.

Every expected failure is a :class:`MeshvmError`. The CLI prints ``str(error)`` as one line on stderr and exits
with ``error.exit_code``. Exit codes (documented in the README):

* 0 — success
* 1 — an operation failed (a peer refused, a host did not join, a test step failed)
* 2 — usage or configuration error (bad flag, bad file, invalid policy, missing tool, not root)
* 3 — a peer could not be reached (Consul, kube-apiserver, SSH)
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3


class MeshvmError(Exception):
    """Base class: an expected failure with a message a user can act on."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class ConfigError(MeshvmError):
    """A configuration, policy or inventory file is invalid; nothing was applied."""

    exit_code = ExitCode.USAGE


class UsageError(MeshvmError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = ExitCode.USAGE


class PrerequisiteError(MeshvmError):
    """This machine lacks something meshvm needs (a tool, root, a kernel feature)."""

    exit_code = ExitCode.USAGE


class PeerUnreachableError(MeshvmError):
    """A peer (Consul, kube-apiserver, a VM over SSH) did not answer."""

    exit_code = ExitCode.UNREACHABLE


class OperationFailedError(MeshvmError):
    """A peer answered, but the operation did not succeed."""

    exit_code = ExitCode.FAILED
