"""Who talks to whom in the mesh, from each VM's Envoy statistics, drawn as an SVG picture.

Every outbound cluster the agent writes is named ``out.<source>.<destination>[.<subset>]`` (names are DNS
labels, so the dots are unambiguous; a Service of the cluster's mesh is ``k8s.<namespace>.<service>`` and is
drawn as ``k8s:<namespace>/<service>``); its ``upstream_rq_total`` (HTTP, gRPC) or ``upstream_cx_total`` (TCP)
counters say how much ``source`` called ``destination`` since Envoy started.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

from meshvm.errors import MeshvmError
from meshvm.inventory import InventoryHost
from meshvm.remote import Remote

STAT_FILTER = r"^cluster\.out\..*\.(upstream_rq_total|upstream_rq_5xx|upstream_cx_total)$"
COUNTERS = ("upstream_rq_total", "upstream_rq_5xx", "upstream_cx_total")


@dataclass
class Edge:
    source: str
    destination: str
    requests: int = 0
    errors: int = 0  # 5xx answers
    connections: int = 0

    @property
    def weight(self) -> int:
        return self.requests or self.connections


@dataclass
class Graph:
    services: dict[str, list[str]] = field(default_factory=dict)  # service -> hosts running it
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)  # host -> why its Envoy could not be read

    def add_stats(self, stats: dict[str, Any]) -> None:
        """Add one Envoy's ``/stats?format=json`` answer (counters of its outbound clusters)."""
        for stat in stats.get("stats", []):
            name, value = stat.get("name", ""), stat.get("value")
            if not isinstance(value, int) or not name.startswith("cluster.out."):
                continue
            cluster, _, counter = name.removeprefix("cluster.").rpartition(".")
            parts = cluster.split(".")
            if counter not in COUNTERS or len(parts) < 3:
                continue
            source, destination = parts[1], parts[2]
            if destination == "k8s" and len(parts) >= 5:
                destination = f"k8s:{parts[3]}/{parts[4]}"
            edge = self.edges.setdefault((source, destination), Edge(source, destination))
            if counter == "upstream_rq_total":
                edge.requests += value
            elif counter == "upstream_rq_5xx":
                edge.errors += value
            else:
                edge.connections += value

    def as_json(self) -> dict[str, Any]:
        return {
            "services": self.services,
            "edges": [vars(e) for e in sorted(self.edges.values(), key=lambda e: (e.source, e.destination))],
            "unreachable": self.unreachable,
        }


def collect(hosts: dict[str, InventoryHost]) -> Graph:
    """Read every host's Envoy counters over SSH (in parallel); a host that cannot be read is noted, not fatal."""
    graph = Graph()
    for name, host in sorted(hosts.items()):
        for service in host.services:
            graph.services.setdefault(service.name, []).append(name)

    def read(host: InventoryHost) -> dict[str, Any]:
        url = f"http://127.0.0.1:{host.envoy_admin_port}/stats?format=json&filter={STAT_FILTER}"
        with Remote(host) as remote:
            done = remote.run("curl", "-s", "--fail", "--max-time", "5", url)
        if done.code != 0:
            raise MeshvmError(f"Envoy's admin endpoint did not answer (curl exit {done.code})")
        parsed: dict[str, Any] = json.loads(done.out)
        return parsed

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = {name: pool.submit(read, host) for name, host in hosts.items()}
    for name, future in sorted(futures.items()):
        try:
            graph.add_stats(future.result())
        except (MeshvmError, ValueError) as exc:
            graph.unreachable[name] = str(exc)
    for edge in graph.edges.values():
        graph.services.setdefault(edge.destination, [])
    return graph


def _layers(graph: Graph) -> dict[str, int]:
    """Callers left of the services they call: a node's column is its longest call chain from a pure caller."""
    names = set(graph.services) | {n for edge in graph.edges for n in edge}
    layer = dict.fromkeys(sorted(names), 0)
    for _ in range(len(layer)):  # at most n relaxations; cycles stop there
        changed = False
        for edge in graph.edges.values():
            if edge.source != edge.destination and layer[edge.destination] < layer[edge.source] + 1:
                layer[edge.destination] = min(layer[edge.source] + 1, len(layer) - 1)
                changed = True
        if not changed:
            break
    return layer


def svg(graph: Graph, title: str = "meshvm") -> str:
    """The graph as a self-contained SVG: a box per service (with its hosts), an arrow per caller/callee pair
    labelled with requests (or connections) and 5xx answers, thicker for more traffic."""
    box_w, box_h, gap_x, gap_y, margin = 200, 56, 140, 36, 40
    layer = _layers(graph)
    columns: dict[int, list[str]] = {}
    for name in sorted(layer):
        columns.setdefault(layer[name], []).append(name)
    position: dict[str, tuple[float, float]] = {}
    for col, names in columns.items():
        for row, name in enumerate(names):
            position[name] = (margin + col * (box_w + gap_x), margin + 30 + row * (box_h + gap_y))
    width = margin * 2 + max([*columns, 0]) * (box_w + gap_x) + box_w
    height = margin * 2 + 30 + max([len(n) for n in columns.values()] + [1]) * (box_h + gap_y)
    heaviest = max([e.weight for e in graph.edges.values()] + [1])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
        f'<text x="{margin}" y="{margin}" font-size="16" font-weight="bold">{escape(title)}</text>',
    ]
    for edge in sorted(graph.edges.values(), key=lambda e: (e.source, e.destination)):
        (x1, y1), (x2, y2) = position[edge.source], position[edge.destination]
        start = (x1 + box_w, y1 + box_h / 2)
        end = (x2, y2 + box_h / 2) if x2 > x1 else (x2 + box_w / 2, y2 + (0 if y2 > y1 else box_h))
        stroke = 1 + 5 * math.log1p(edge.weight) / math.log1p(heaviest)
        colour = "#c0392b" if edge.errors else "#555"
        unit = "req" if edge.requests else "conn"
        label = f"{edge.weight} {unit}" + (f", {edge.errors} 5xx" if edge.errors else "")
        parts.append(
            f'<line class="edge" data-source="{escape(edge.source)}" data-destination="{escape(edge.destination)}" '
            f'x1="{start[0]:.0f}" y1="{start[1]:.0f}" x2="{end[0]:.0f}" y2="{end[1]:.0f}" stroke="{colour}" '
            f'stroke-width="{stroke:.1f}" marker-end="url(#arrow)"/>'
        )
        parts.append(
            f'<text x="{(start[0] + end[0]) / 2:.0f}" y="{(start[1] + end[1]) / 2 - 6:.0f}" text-anchor="middle" '
            f'fill="{colour}">{escape(label)}</text>'
        )
    for name, (x, y) in sorted(position.items()):
        where = "in the cluster" if name.startswith("k8s:") else "outside the inventory"
        hosts = ", ".join(graph.services.get(name, [])) or where
        parts.append(
            f'<g class="service" data-name="{escape(name)}"><rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" '
            f'rx="8" fill="#eef4fb" stroke="#2c6fb7"/>'
            f'<text x="{x + box_w / 2}" y="{y + 22}" text-anchor="middle" font-weight="bold">{escape(name)}</text>'
            f'<text x="{x + box_w / 2}" y="{y + 42}" text-anchor="middle" fill="#555">{escape(hosts)}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
