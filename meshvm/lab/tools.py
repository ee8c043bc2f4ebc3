"""What the lab needs from this machine, checked up front with a line naming what to install."""

from __future__ import annotations

import os
import shutil

from meshvm.errors import PrerequisiteError

# tool -> Debian package that provides it
LAB_TOOLS: dict[str, str] = {
    "ip": "iproute2",
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "go": "golang (Go >= 1.26 from https://go.dev, or the machine image)",
    "dpkg-deb": "dpkg",
    "tar": "tar",
    "mount": "mount",
    "zstd": "zstd",
    "iptables": "iptables",
    "setpriv": "util-linux",
}


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PrerequisiteError(
            f"{what} needs root (network namespaces, overlay mounts, systemd-nspawn, iptables)", hint="run it with sudo"
        )


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        packages = sorted({LAB_TOOLS.get(name, name) for name in missing})
        raise PrerequisiteError(
            f"missing tool{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
            hint=f"install {' '.join(packages)} (apt-get install -y {' '.join(packages)})",
        )
