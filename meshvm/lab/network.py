"""The lab's private network: one bridge with 198.51.100.1/24, a network namespace and veth per VM.

198.51.100.0/24 is TEST-NET-2: never routed on the internet. An ``unreachable`` route for the subnet with a high
metric guards against lab traffic leaking to this machine's default route when the bridge is down.
VM namespaces get an address on the bridge subnet and no default route: they reach the bridge and nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from pathlib import Path

from meshvm.lab.procs import run

log = logging.getLogger(__name__)

SUBNET = ipaddress.IPv4Network("198.51.100.0/24")
BRIDGE = "mvlab0"
BRIDGE_ADDRESS = "198.51.100.1"
GUARD_METRIC = "4242"
FIRST_HOST_OCTET = 11
FIRST_POD_OCTET = 101
# Kubernetes Service addresses (kube-apiserver's --service-cluster-ip-range). Pods route them to their own link
# only: a sidecar redirects every connection to one before it leaves, and with no sidecar they go nowhere.
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/24")


def host_address(index: int) -> str:
    """Address of lab host number ``index`` (1-based): .11, .12, …"""
    return str(SUBNET.network_address + FIRST_HOST_OCTET - 1 + index)


def pod_address(index: int) -> str:
    """Address of lab pod number ``index`` (1-based): .101, .102, …"""
    return str(SUBNET.network_address + FIRST_POD_OCTET - 1 + index)


def _ip(*args: str) -> str:
    return run(["ip", *args], what=f"ip {' '.join(args)}", timeout=30)


def _exists(*args: str) -> bool:
    return subprocess.run(["ip", *args], capture_output=True, check=False).returncode == 0


def _guard_present() -> bool:
    routes = json.loads(_ip("-j", "route", "show", "type", "unreachable", str(SUBNET)) or "[]")
    return any(str(route.get("metric", "")) == GUARD_METRIC for route in routes)


def bridge_up() -> None:
    if not _exists("link", "show", BRIDGE):
        _ip("link", "add", BRIDGE, "type", "bridge")
    addresses = json.loads(_ip("-j", "addr", "show", "dev", BRIDGE))
    have = {info["local"] for entry in addresses for info in entry.get("addr_info", [])}
    if BRIDGE_ADDRESS not in have:
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/{SUBNET.prefixlen}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    if not _guard_present():
        _ip("route", "add", "unreachable", str(SUBNET), "metric", GUARD_METRIC)


def bridge_down() -> None:
    if _exists("link", "show", BRIDGE):
        _ip("link", "del", BRIDGE)
    if _guard_present():
        _ip("route", "del", "unreachable", str(SUBNET), "metric", GUARD_METRIC)


def netns_path(name: str) -> Path:
    return Path("/run/netns") / name


def veth_name(host: str) -> str:
    return f"mvl-{host}"[:15]


def mac_address(address: str) -> str:
    """A locally administered MAC made of the IPv4 address: a host or pod brought up again (a new namespace and
    veth) keeps its MAC, so its neighbours' ARP entries stay right. With a new random MAC, a neighbour whose entry
    was REACHABLE kept sending to the old one for its reachable time (15-45 s): connections to a restarted pod
    timed out for up to ~35 s."""
    return ":".join(f"{octet:02x}" for octet in (2, 0, *ipaddress.IPv4Address(address).packed))


def host_net_up(name: str, host: str, address: str, *, link_routes: tuple[str, ...] = ()) -> str:
    """Namespace ``name`` with ``eth0`` on the bridge at ``address`` (and ``link_routes`` on eth0); returns it."""
    veth = veth_name(host)
    if not netns_path(name).exists():
        _ip("netns", "add", name)
    if not _exists("link", "show", veth):
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "address", mac_address(address), "netns", name)
    _ip("link", "set", veth, "master", BRIDGE, "up")
    _ip("-n", name, "link", "set", "lo", "up")
    current = json.loads(_ip("-n", name, "-j", "addr", "show", "dev", "eth0"))
    have = {info["local"] for entry in current for info in entry.get("addr_info", [])}
    if address not in have:
        _ip("-n", name, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0")
    _ip("-n", name, "link", "set", "eth0", "up")
    for cidr in link_routes:
        _ip("-n", name, "route", "replace", cidr, "dev", "eth0", "scope", "link")
    return address


def host_net_down(name: str, host: str) -> None:
    veth = veth_name(host)
    if _exists("link", "show", veth):
        _ip("link", "del", veth)
    if netns_path(name).exists():
        _ip("netns", "del", name)
