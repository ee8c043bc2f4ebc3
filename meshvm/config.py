"""The one configuration model of `meshvm agent`, shared by the CLI, the agent and the Ansible roles.

Ansible renders the role variables into this model's YAML (``meshvm_agent`` role) and checks the result with
``meshvm validate``; the agent loads the same file; ``meshvm render`` builds Envoy's bootstrap from it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from meshvm.errors import ConfigError
from meshvm.values import (
    Destination,
    Duration,
    IPAddress,
    KubeRef,
    LoopbackAddress,
    Name,
    Percent,
    Port,
    is_kubernetes,
)

Protocol = Literal["http", "http2", "grpc", "tcp"]
HTTP_PROTOCOLS: frozenset[str] = frozenset({"http", "http2", "grpc"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckSpec(Strict):
    """How Consul checks the local application (not the sidecar)."""

    type: Literal["http", "tcp", "grpc", "none"] = "tcp"
    path: str = Field("/health", pattern=r"^/", description="HTTP path for type=http")
    interval: Duration = 1.0
    timeout: Duration = 1.0
    deregister_critical_after: Duration = 300.0

    @model_validator(mode="after")
    def _sane(self) -> Self:
        if self.type != "none" and self.interval < 1.0:
            raise ValueError("interval must be at least 1s (Consul's minimum check interval)")
        if self.timeout > self.interval:
            raise ValueError("timeout must not be longer than interval")
        if self.deregister_critical_after < 60:
            raise ValueError("deregister_critical_after must be at least 1m (Consul's minimum)")
        return self


class UpstreamSpec(Strict):
    """A service this one calls: Envoy listens on 127.0.0.1:local_port and forwards over mTLS.

    ``service`` is a Consul service name, or ``k8s:<namespace>/<service>`` for a Service of the cluster's Istio mesh
    (its endpoints come from istiod; the call uses the VM's Istio identity and checks the callee's).
    """

    service: Destination
    local_port: Port
    protocol: Protocol | None = Field(
        None, description="default: the protocol the destination registered (Consul), else tcp; http for k8s:"
    )
    port: Port | None = Field(None, description="k8s: upstreams: the Kubernetes Service port to call")
    service_accounts: tuple[Name, ...] = Field(
        (), description="k8s: upstreams: the ServiceAccounts the callee may run as (default: the service's name)"
    )

    @model_validator(mode="after")
    def _kubernetes_fields(self) -> Self:
        if is_kubernetes(self.service):
            if self.port is None:
                raise ValueError(f"upstream {self.service}: give the Kubernetes Service port (port: 80)")
        elif self.port is not None or self.service_accounts:
            raise ValueError(f"upstream {self.service}: port and service_accounts are for k8s: upstreams only")
        return self

    @property
    def kubernetes(self) -> KubeRef | None:
        return KubeRef.parse(self.service) if is_kubernetes(self.service) else None

    def callee_accounts(self) -> list[str]:
        ref = self.kubernetes
        if ref is None:
            return []
        return list(self.service_accounts) or [ref.name]


class ServiceSpec(Strict):
    """A service this VM runs, brought into the mesh."""

    name: Name
    port: Port = Field(description="where the application listens, on `address`")
    address: IPAddress = "127.0.0.1"
    protocol: Protocol = "http"
    mesh_port: Port = Field(description="Envoy's inbound mTLS listener for this service, on the VM address")
    tags: list[str] = []
    meta: dict[str, str] = {}
    version: str | None = Field(None, description="subset label, also registered as meta.version")
    check: CheckSpec = CheckSpec()
    upstreams: list[UpstreamSpec] = []

    @property
    def sidecar_id(self) -> str:
        return f"{self.name}-sidecar-proxy"

    @model_validator(mode="after")
    def _upstreams_unique(self) -> Self:
        names = [u.service for u in self.upstreams]
        if len(names) != len(set(names)):
            raise ValueError(f"upstreams of {self.name} list a service twice")
        if self.name in names:
            raise ValueError(f"service {self.name} lists itself as an upstream")
        if self.check.type == "grpc" and self.protocol != "grpc":
            raise ValueError("check.type grpc needs protocol grpc")
        return self


class IstioSpec(Strict):
    """Membership in the cluster's Istio mesh: the VM's Istio identity, and where istiod is."""

    namespace: Name = Field(description="the VM workload's namespace in the cluster")
    service_account: Name = Field(description="its ServiceAccount: spiffe://<trust_domain>/ns/<namespace>/sa/<sa>")
    trust_domain: str = Field("cluster.local", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    cluster_domain: str = Field("cluster.local", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    istiod_address: str = Field(
        "istiod.istio-system.svc:15012", pattern=r"^[^:/\s]+:\d{1,5}$", description="istiod's CA and xDS, host:port"
    )
    istiod_name: str = Field("istiod.istio-system.svc", description="the name istiod's serving certificate carries")
    cluster_id: str = Field("Kubernetes", min_length=1)
    network: str = ""
    root_cert_file: Path = Field(Path("/etc/meshvm/istio/root-cert.pem"), description="istio-ca-root-cert")
    credentials_dir: Path = Field(
        Path("/var/lib/meshvm/istio"), description="the VM's key and certificate, and its refresh token"
    )
    kube_api: str = Field(pattern=r"^https://[^/\s]+$", description="the API server, for TokenRequest")
    kube_ca_file: Path = Field(Path("/etc/meshvm/istio/kube-ca.crt"), description="the API server's CA")
    token_secret: Name = Field(description="the Secret the VM's tokens are bound to (delete it to revoke them)")
    cert_lifetime: Duration = Field(86400.0, description="requested workload certificate lifetime")
    token_lifetime: Duration = Field(172800.0, description="lifetime of the refresh token the VM keeps")

    @model_validator(mode="after")
    def _lifetimes(self) -> Self:
        if self.cert_lifetime < 60:
            raise ValueError("cert_lifetime must be at least 1m")
        if self.token_lifetime < 600:
            raise ValueError("token_lifetime must be at least 10m (the Kubernetes TokenRequest minimum)")
        return self

    @property
    def identity(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def token_file(self) -> Path:
        return self.credentials_dir / "token"

    @property
    def key_file(self) -> Path:
        return self.credentials_dir / "key.pem"

    @property
    def cert_file(self) -> Path:
        return self.credentials_dir / "cert-chain.pem"


class ConsulSpec(Strict):
    http_addr: str = Field("127.0.0.1:8500", pattern=r"^[^:/\s]+:\d{1,5}$", description="the local Consul agent")
    scheme: Literal["http", "https"] = "http"
    token_file: Path | None = Field(None, description="file holding the ACL token (never the token itself)")
    ca_file: Path | None = None
    policy_prefix: str = Field("meshvm/policy", pattern=r"^[A-Za-z0-9_./-]+[^/]$")
    blocking_wait: Duration = 30.0

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                f"consul.token_file {self.token_file}: {exc.strerror}",
                hint="check the path and that the meshvm user can read it",
            ) from exc


class EnvoySpec(Strict):
    admin_address: LoopbackAddress = "127.0.0.1"
    admin_port: Port = 19000
    bind_address: IPAddress = "0.0.0.0"
    config_dir: Path = Path("/var/lib/meshvm/envoy")
    bootstrap_path: Path = Path("/etc/meshvm/envoy.json")
    prometheus_port: Port | None = Field(19102, description="/stats/prometheus on bind_address; null = off")
    access_log_path: str | None = Field(
        "/dev/stdout", description="one JSON line per request: a file, /dev/stdout (the journal); null = off"
    )
    drain_time: Duration = 5.0
    connect_timeout: Duration = 2.0


LOCALITY_LABEL = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"


class LocalitySpec(Strict):
    """Where the VM runs. Callers send to instances in their own zone first, then their region, then further (the
    policy's ``locality.failover`` orders regions); registered as the services' meta ``region`` and ``zone``."""

    region: str = Field(pattern=LOCALITY_LABEL)
    zone: str = Field("", pattern=r"^$|" + LOCALITY_LABEL)


class TracingSpec(Strict):
    """Distributed tracing by the sidecar: a span per request on each side of every hop, propagated in B3 headers
    (what Istio's sidecars send) and W3C ``traceparent``, sent as Zipkin v2 JSON (Jaeger, Zipkin and the
    OpenTelemetry Collector all take it)."""

    zipkin_address: str = Field(
        pattern=r"^[A-Za-z0-9.-]+:\d{1,5}$", description="host:port of the collector's Zipkin endpoint"
    )
    zipkin_path: str = Field("/api/v2/spans", pattern=r"^/")
    sampling: Percent = Field(
        1.0, description="percent of requests arriving without a trace that start one (a service's policy may differ)"
    )

    @property
    def host(self) -> str:
        return self.zipkin_address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.zipkin_address.rsplit(":", 1)[1])


class AgentSpec(Strict):
    listen_address: LoopbackAddress = "127.0.0.1"
    listen_port: Port = 19200
    debounce: Duration = 0.05
    log_format: Literal["text", "json"] = "text"


class AgentConfig(Strict):
    node: str = Field(default_factory=socket.gethostname, min_length=1)
    address: IPAddress = Field(description="this VM's address in the mesh; sidecars are registered with it")
    consul: ConsulSpec = ConsulSpec()
    envoy: EnvoySpec = EnvoySpec()
    agent: AgentSpec = AgentSpec()
    istio: IstioSpec | None = Field(None, description="membership in the cluster's Istio mesh (omit: Consul only)")
    tracing: TracingSpec | None = Field(None, description="where spans go (omit: no tracing)")
    locality: LocalitySpec | None = Field(None, description="region and zone (omit: every instance is equal)")
    services: list[ServiceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _no_clashes(self) -> Self:
        names = [s.name for s in self.services]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"service names must be unique; repeated: {', '.join(duplicates)}")
        ports: dict[int, str] = {}

        def claim(port: int | None, what: str) -> None:
            if port is None:
                return
            if port in ports:
                raise ValueError(f"port {port} is used twice: {ports[port]} and {what}")
            ports[port] = what

        claim(self.envoy.admin_port, "envoy.admin_port")
        claim(self.envoy.prometheus_port, "envoy.prometheus_port")
        claim(self.agent.listen_port, "agent.listen_port")
        for service in self.services:
            claim(service.mesh_port, f"services[{service.name}].mesh_port")
            for upstream in service.upstreams:
                claim(upstream.local_port, f"services[{service.name}].upstreams[{upstream.service}].local_port")
        for service in self.services:
            if service.port in ports and service.address in {"127.0.0.1", self.address, "0.0.0.0"}:
                raise ValueError(f"services[{service.name}].port {service.port} clashes with {ports[service.port]}")
        kubernetes = [u.service for s in self.services for u in s.upstreams if u.kubernetes is not None]
        if kubernetes and self.istio is None:
            raise ValueError(f"upstream {kubernetes[0]} is in the cluster's mesh: configure istio: to reach it")
        return self

    def check_files(self) -> None:
        """Every CA file this configuration names holds PEM certificates valid now. (The VM's own Istio key and
        certificate are not checked here: they are the agent's to renew, and an expired one must not stop the
        configuration that lets the agent get a new one.)"""
        from meshvm import pki

        if self.consul.ca_file is not None:
            pki.check_certificates(self.consul.ca_file, "consul.ca_file")
        istio = self.istio
        if istio is None:
            return
        pki.check_certificates(istio.root_cert_file, "istio.root_cert_file")
        pki.check_certificates(istio.kube_ca_file, "istio.kube_ca_file")

    def service(self, name: str) -> ServiceSpec:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line: ``source: field.path: what is wrong; …`` (at most three problems, then a count)."""
    parts = []
    for item in error.errors()[:3]:  # one line, whatever the input: control characters are escaped
        location = ".".join(str(p) for p in item["loc"] if p not in {"function-after[_no_clashes()]"})
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    extra = len(error.errors()) - 3
    if extra > 0:
        parts.append(f"and {extra} more")
    line = f"{source}: " + "; ".join(parts)
    return line.encode("unicode_escape").decode("ascii") if not line.isprintable() else line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: PyYAML reports it itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key] + 1}): remove one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path, what: str) -> object:
    """The YAML document in ``path``; a bad file (missing, unreadable, not YAML, a key given twice) is a
    ConfigError naming the file and line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}", hint="check the path") from exc
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc


def parse_config(data: object, source: str = "agent config") -> AgentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc


def load_config(path: Path) -> AgentConfig:
    return parse_config(load_yaml(path, "agent config"), f"agent config {path}")
