"""The mesh traffic policy: per destination service, how callers reach it; plus who may call whom.

It lives in Consul KV as one JSON document at ``<prefix>/mesh`` so every agent sees the same policy, and is
written only by ``meshvm policy apply`` (validated, diffed, check-and-set).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from meshvm.config import HTTP_PROTOCOLS, Protocol, format_validation_error, load_yaml
from meshvm.errors import ConfigError
from meshvm.values import Destination, Duration, Name, Percent, is_kubernetes

POLICY_KEY = "mesh"
HTTP_RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
    }
)
GRPC_RETRY_ON = frozenset({"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Subset(Strict):
    """Instances of the destination that carry all these tags and, if given, this version (meta.version)."""

    tags: list[str] = []
    version: str | None = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not self.tags and self.version is None:
            raise ValueError("a subset needs tags or a version")
        return self


class HeaderMatch(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~:-]+$")
    exact: str | None = None
    prefix: str | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        if sum(v is not None for v in (self.exact, self.prefix, self.present)) != 1:
            raise ValueError(f"header {self.name}: give exactly one of exact, prefix, present")
        return self


class RouteMatch(Strict):
    path_prefix: str = Field("/", pattern=r"^/")
    headers: list[HeaderMatch] = []


class WeightedTarget(Strict):
    subset: Name | None = Field(None, description="null = every healthy instance")
    weight: int = Field(ge=0, le=100)


class Route(Strict):
    match: RouteMatch = RouteMatch()
    to: Name | None = Field(None, description="a subset; or use split")
    split: list[WeightedTarget] = []

    @model_validator(mode="after")
    def _target(self) -> Self:
        if self.to is not None and self.split:
            raise ValueError("give either to or split, not both")
        if self.split and sum(t.weight for t in self.split) != 100:
            raise ValueError(f"split weights must sum to 100, not {sum(t.weight for t in self.split)}")
        return self

    def targets(self) -> list[WeightedTarget]:
        if self.split:
            return list(self.split)
        return [WeightedTarget(subset=self.to, weight=100)]


class Retries(Strict):
    attempts: int = Field(2, ge=0, le=10)
    retry_on: list[str] = ["connect-failure", "refused-stream", "reset", "5xx"]
    status_codes: list[int] = Field([503], description="what retriable-status-codes retries")
    per_try_timeout: Duration | None = None

    @model_validator(mode="after")
    def _codes(self) -> Self:
        if any(not 100 <= code <= 599 for code in self.status_codes):
            raise ValueError(f"status_codes must be HTTP statuses (100-599), not {self.status_codes}")
        return self


class CircuitBreaker(Strict):
    max_connections: int = Field(1024, ge=1)
    max_pending_requests: int = Field(1024, ge=1)
    max_requests: int = Field(1024, ge=1)
    # Concurrent retries; Envoy's default of 3 makes retries fail under any real concurrency (Istio uses ~unlimited).
    max_retries: int = Field(1024, ge=0)


class OutlierDetection(Strict):
    consecutive_5xx: int = Field(5, ge=1)
    interval: Duration = 1.0
    base_ejection_time: Duration = 30.0
    max_ejection_percent: int = Field(50, ge=0, le=100)


class Delay(Strict):
    fixed: Duration
    percent: Percent = 100


class Abort(Strict):
    status: int = Field(ge=200, le=599)
    percent: Percent = 100


class Fault(Strict):
    delay: Delay | None = None
    abort: Abort | None = None

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a delay or an abort")
        return self


class RateLimit(Strict):
    """Token bucket on the destination's inbound listener; excess requests get 429."""

    requests_per_second: int = Field(ge=1)
    burst: int | None = Field(None, ge=1, description="bucket size; default: requests_per_second")


class Failover(Strict):
    """Callers in region ``from`` that have no healthy instance in their own region go to region ``to`` next."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    from_: str = Field(alias="from", min_length=1)
    to: str = Field(min_length=1)


class LocalityLb(Strict):
    """Locality-aware load balancing (callers and instances carry a locality): the caller's zone, then its region,
    then the failover regions in order, then the rest; each step only when the one before has no healthy instance
    left (Envoy's priority levels, with outlier detection and retries moving to the next level)."""

    enabled: bool = True
    failover: list[Failover] = []

    @model_validator(mode="after")
    def _one_order_per_region(self) -> Self:
        pairs = [(f.from_, f.to) for f in self.failover]
        if any(a == b for a, b in pairs):
            raise ValueError("locality.failover: a region cannot fail over to itself")
        if len(set(pairs)) != len(pairs):
            raise ValueError("locality.failover: a from/to pair is given twice")
        return self


class ServicePolicy(Strict):
    protocol: Protocol | None = None
    subsets: dict[Name, Subset] = {}
    routes: list[Route] = []
    retries: Retries | None = None
    timeout: Duration | None = None
    idle_timeout: Duration | None = Field(
        None, description="a request or upgraded stream (WebSocket) with no bytes for this long is closed; default 1h"
    )
    connect_timeout: Duration | None = None
    trace_sampling: Percent | None = Field(
        None, description="percent of calls to this service that start a trace; default: the VM's tracing.sampling"
    )
    circuit_breaker: CircuitBreaker | None = None
    locality: LocalityLb = LocalityLb()
    outlier_detection: OutlierDetection | None = None
    fault: Fault | None = None
    rate_limit: RateLimit | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for index, route in enumerate(self.routes):
            for target in route.targets():
                if target.subset is not None and target.subset not in self.subsets:
                    raise ValueError(f"routes[{index}] sends to subset {target.subset!r}, which is not in subsets")
        if self.protocol == "tcp":
            if any(r.match != RouteMatch() for r in self.routes) or len(self.routes) > 1:
                raise ValueError("protocol tcp allows one route without path or header match (a split only)")
            for field in ("retries", "timeout", "idle_timeout", "trace_sampling", "fault", "rate_limit"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field} needs an HTTP protocol (http, http2, grpc), not tcp")
        if self.retries is not None:
            allowed = HTTP_RETRY_ON | (GRPC_RETRY_ON if self.protocol in {None, "grpc"} else frozenset())
            unknown = sorted(set(self.retries.retry_on) - allowed)
            if unknown:
                raise ValueError(
                    f"retries.retry_on: unknown condition {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
                )
        return self

    def is_http(self, protocol: str) -> bool:
        return (self.protocol or protocol) in HTTP_PROTOCOLS


class AuthorizationRule(Strict):
    """Who may call a VM service. A source is a Consul service, ``k8s:<namespace>/<serviceaccount>`` (a workload of
    the cluster's Istio mesh, by its identity), or ``*`` (any caller either mesh authenticates)."""

    source: Destination | Literal["*"]
    destination: Name | Literal["*"]
    action: Literal["allow", "deny"]

    @property
    def precedence(self) -> int:
        """Consul's intention precedence: exact destination beats wildcard, then exact source."""
        return (2 if self.destination != "*" else 0) + (1 if self.source != "*" else 0)


class Authorization(Strict):
    default_action: Literal["allow", "deny"] = "deny"
    rules: list[AuthorizationRule] = []

    @model_validator(mode="after")
    def _no_contradictions(self) -> Self:
        seen: dict[tuple[str, str], str] = {}
        for rule in self.rules:
            key = (rule.source, rule.destination)
            if seen.get(key, rule.action) != rule.action:
                raise ValueError(f"rules say both allow and deny for {rule.source} -> {rule.destination}")
            seen[key] = rule.action
        return self


class MeshPolicy(Strict):
    version: Literal[1] = 1
    authorization: Authorization = Authorization()
    services: dict[Destination, ServicePolicy] = {}

    @model_validator(mode="after")
    def _kubernetes_destinations(self) -> Self:
        """Calls to the cluster's Services are shaped by the caller's Envoy; what only the callee could do (its
        subsets by Consul tags, its inbound rate limit) is the cluster mesh's own business."""
        for name, service in self.services.items():
            if is_kubernetes(name):
                for field in ("subsets", "rate_limit"):
                    if getattr(service, field):
                        raise ValueError(f"services[{name}].{field}: not for a Kubernetes destination")
                if service.locality != LocalityLb():
                    raise ValueError(f"services[{name}].locality: istiod orders a Kubernetes Service's endpoints")
        return self

    def for_service(self, name: str) -> ServicePolicy:
        return self.services.get(name, ServicePolicy())

    def to_json(self) -> str:
        """Canonical JSON: what is stored in Consul KV and compared by `policy diff`."""
        return (
            json.dumps(self.model_dump(mode="json", exclude_defaults=True, by_alias=True), sort_keys=True, indent=2)
            + "\n"
        )


def parse_policy(data: object, source: str) -> MeshPolicy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with version, authorization and services")
    try:
        return MeshPolicy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc


def load_policy(path: Path) -> MeshPolicy:
    return parse_policy(load_yaml(path, "policy"), f"policy {path}")


def parse_policy_json(raw: bytes | str, source: str) -> MeshPolicy:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid JSON ({exc})") from exc
    return parse_policy(data, source)
