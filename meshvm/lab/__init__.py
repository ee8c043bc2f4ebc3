"""The lab: real Consul, kube-apiserver + etcd, Envoy and systemd-nspawn VMs on one machine."""

from __future__ import annotations

from meshvm.lab.lifecycle import down, reset, start_istiod, status, stop_istiod, up
from meshvm.lab.state import DEFAULT_STATE_DIR, LabState, load

__all__ = [
    "DEFAULT_STATE_DIR",
    "LabState",
    "down",
    "load",
    "reset",
    "start_istiod",
    "status",
    "stop_istiod",
    "up",
]
