"""Constrained value types shared by the agent configuration and the mesh policy."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lower-case letters, digits and '-', "
            "starting with a letter, at most 63 characters"
        )
    return value


def _duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '250ms', '2s', '1m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value.strip())):
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration: write it like '250ms', '2s' or '1m'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def envoy_duration(seconds: float) -> str:
    """Protobuf JSON form of a duration, e.g. 0.25 -> '0.250s'."""
    return f"{seconds:.3f}s"


def consul_duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _loopback(value: str) -> str:
    if not ipaddress.ip_address(value).is_loopback:
        raise ValueError(f"{value} is not a loopback address: admin and metrics endpoints stay on 127.0.0.1")
    return value


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address") from exc


@dataclass(frozen=True)
class KubeRef:
    """``k8s:<namespace>/<name>``: a ServiceAccount (as an authorization source) or a Service (as an upstream) of the
    cluster's mesh."""

    namespace: str
    name: str

    @classmethod
    def parse(cls, value: str) -> KubeRef:
        body = value.removeprefix(KUBE_PREFIX)
        namespace, slash, name = body.partition("/")
        if not value.startswith(KUBE_PREFIX) or not slash or not NAME_RE.match(namespace) or not NAME_RE.match(name):
            raise ValueError(
                f"{value!r} is not a Kubernetes name: write k8s:<namespace>/<name>, each a lower-case DNS label"
            )
        return cls(namespace, name)

    def __str__(self) -> str:
        return f"{KUBE_PREFIX}{self.namespace}/{self.name}"


KUBE_PREFIX = "k8s:"


def is_kubernetes(value: str) -> bool:
    return value.startswith(KUBE_PREFIX)


def _destination(value: str) -> str:
    if is_kubernetes(value):
        return str(KubeRef.parse(value))
    return _name(value)


Name = Annotated[str, AfterValidator(_name)]
# A Consul service name, or k8s:<namespace>/<name> in the cluster's mesh.
Destination = Annotated[str, AfterValidator(_destination)]
Duration = Annotated[float, BeforeValidator(_duration), PlainSerializer(lambda s: f"{s:g}s", return_type=str)]
Port = Annotated[int, Field(ge=1, le=65535)]
IPAddress = Annotated[str, AfterValidator(_ip)]
LoopbackAddress = Annotated[str, AfterValidator(_ip), AfterValidator(_loopback)]
Percent = Annotated[float, Field(ge=0, le=100)]
