"""A small, dependency-free Prometheus registry for the agent (counters, gauges, histograms)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._lock = threading.Lock()

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self.samples()]
        return "\n".join(lines) + "\n"


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> Iterable[str]:
        with self._lock:
            items = sorted(self._values.items()) or [((), 0.0)]
        return [f"{self.name}{_labels(dict(k))} {v:g}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] = value


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = BUCKETS) -> None:
        super().__init__(name, help_text)
        self._buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self._buckets, value)] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def samples(self) -> Iterable[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines, running = [], 0
        for bound, n in zip(self._buckets, counts, strict=False):
            running += n
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {count}')
        lines += [f"{self.name}_sum {total:g}", f"{self.name}_count {count}"]
        return lines


class AgentMetrics:
    """Every metric the agent exports, on 127.0.0.1:<agent.listen_port>/metrics."""

    def __init__(self) -> None:
        self.syncs = Counter("meshvm_syncs_total", "Envoy resource renders that were written")
        self.errors = Counter("meshvm_errors_total", "Errors, by kind (consul, policy, render, register)")
        self.last_sync = Gauge("meshvm_last_sync_timestamp_seconds", "Unix time of the last successful render")
        self.render_seconds = Histogram("meshvm_render_seconds", "Time to build and write Envoy resources")
        self.convergence_seconds = Histogram(
            "meshvm_convergence_seconds", "From a Consul change arriving to Envoy's files written"
        )
        self.consul_up = Gauge("meshvm_consul_reachable", "1 while every Consul watch is answering")
        self.policy_valid = Gauge("meshvm_policy_valid", "0 while the policy in Consul KV is refused")
        self.endpoints = Gauge("meshvm_upstream_endpoints", "Healthy endpoints per upstream service")
        self.leaf_rotations = Counter("meshvm_leaf_rotations_total", "Leaf certificates received from Consul")
        self.istio_renewals = Counter(
            "meshvm_istio_certificate_renewals_total", "Istio certificates from istiod, by the credential used"
        )
        self.istio_cert_expiry = Gauge(
            "meshvm_istio_certificate_expiry_timestamp_seconds", "When the VM's Istio certificate expires"
        )
        self.istio_token_refreshes = Counter(
            "meshvm_istio_token_refreshes_total", "Refresh tokens the VM minted to replace its own"
        )
        self.istio_token_expiry = Gauge(
            "meshvm_istio_token_expiry_timestamp_seconds", "When the VM's Istio refresh token expires"
        )

    def all(self) -> list[Metric]:
        return [
            self.syncs,
            self.errors,
            self.last_sync,
            self.render_seconds,
            self.convergence_seconds,
            self.consul_up,
            self.policy_valid,
            self.endpoints,
            self.leaf_rotations,
            self.istio_renewals,
            self.istio_token_refreshes,
            self.istio_cert_expiry,
            self.istio_token_expiry,
        ]

    def render(self, extra: str = "") -> str:
        return "".join(m.render() for m in self.all()) + extra
