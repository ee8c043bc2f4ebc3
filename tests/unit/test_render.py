"""Rendering is a pure function of the snapshot; every rendering is checked by Envoy itself (oldest and newest)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from meshvm.config import LocalitySpec, parse_config
from meshvm.envoy import resources as r
from meshvm.envoy.bootstrap import bootstrap, initial_files, static_equivalent
from meshvm.envoy.snapshot import Instance, Snapshot
from meshvm.envoy.writer import write
from meshvm.policy import AuthorizationRule, LocalityLb, parse_policy
from tests.support.pki import MeshCA

CONFIG: dict[str, Any] = {
    "node": "vm1",
    "address": "198.51.100.11",
    "services": [
        {
            "name": "web",
            "port": 8080,
            "mesh_port": 21000,
            "version": "v1",
            "upstreams": [
                {"service": "api", "local_port": 9001, "protocol": "http"},
                {"service": "db", "local_port": 9002, "protocol": "tcp"},
                {"service": "rpc", "local_port": 9003, "protocol": "grpc"},
            ],
        },
        {"name": "db", "port": 5432, "protocol": "tcp", "mesh_port": 21001},
        {"name": "rpc", "port": 50051, "protocol": "grpc", "mesh_port": 21002, "check": {"type": "grpc"}},
    ],
}
POLICY: dict[str, Any] = {
    "authorization": {
        "default_action": "deny",
        "rules": [
            {"source": "api", "destination": "web", "action": "allow"},
            {"source": "*", "destination": "db", "action": "allow"},
            {"source": "batch", "destination": "db", "action": "deny"},
        ],
    },
    "services": {
        "api": {
            "subsets": {"v1": {"version": "v1"}, "v2": {"tags": ["canary"]}},
            "routes": [
                {"match": {"path_prefix": "/admin", "headers": [{"name": "x-canary", "exact": "1"}]}, "to": "v2"},
                {"split": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]},
            ],
            "retries": {"attempts": 3, "per_try_timeout": "500ms"},
            "timeout": "2s",
            "idle_timeout": "30m",
            "circuit_breaker": {"max_requests": 10},
            "outlier_detection": {"consecutive_5xx": 3},
            "fault": {"delay": {"fixed": "100ms", "percent": 10}, "abort": {"status": 503, "percent": 20}},
        },
        "db": {
            "subsets": {"a": {"tags": ["a"]}, "b": {"tags": ["b"]}},
            "routes": [{"split": [{"subset": "a", "weight": 50}, {"subset": "b", "weight": 50}]}],
        },
        "web": {"rate_limit": {"requests_per_second": 5, "burst": 10}},
    },
}
API_INSTANCES = (
    Instance("198.51.100.12", 21000, node="vm2", tags=("canary",), meta=(("version", "v2"),)),
    Instance("198.51.100.13", 21000, node="vm3", meta=(("version", "v1"),)),
)


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA()


def snapshot(
    ca: MeshCA, tmp: Path, policy: dict[str, Any] | None = None, envoy: dict[str, Any] | None = None
) -> Snapshot:
    config = parse_config({**CONFIG, "envoy": {"config_dir": str(tmp), **(envoy or {})}})
    return Snapshot(
        config=config,
        policy=parse_policy(POLICY if policy is None else policy, "test policy"),
        roots=ca.roots,
        leaves={s.name: ca.leaf(s.name) for s in config.services},
        upstreams={"api": API_INSTANCES},
    )


def envoy_validate(envoy: Path, document: dict[str, Any], tmp: Path) -> subprocess.CompletedProcess[str]:
    path = tmp / "validate.json"
    path.write_text(json.dumps(document))
    return subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(path), "-l", "error"], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("which", ["newest", "oldest"])
def test_every_resource_is_accepted_by_envoy(
    ca: MeshCA, tmp_path: Path, which: str, envoy_bin: Path, envoy_oldest_bin: Path
) -> None:
    snap = snapshot(ca, tmp_path)
    resources = r.build(snap, r.Layout(tmp_path))
    done = envoy_validate(
        envoy_bin if which == "newest" else envoy_oldest_bin, static_equivalent(snap.config, resources), tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_access_logs_can_be_turned_off(ca: MeshCA, tmp_path: Path, envoy_bin: Path) -> None:
    on = snapshot(ca, tmp_path)
    assert '"envoy.access_loggers.stdout"' in json.dumps(r.build(on, r.Layout(tmp_path)).__dict__)
    off = snapshot(ca, tmp_path, envoy={"access_log_path": None})
    rendered = json.dumps(r.build(off, r.Layout(tmp_path)).__dict__)
    assert "access_loggers" not in rendered
    done = envoy_validate(envoy_bin, static_equivalent(off.config, r.build(off, r.Layout(tmp_path))), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_bootstrap_is_accepted_once_initial_files_exist(ca: MeshCA, tmp_path: Path, envoy_bin: Path) -> None:
    snap = snapshot(ca, tmp_path)
    refused = envoy_validate(envoy_bin, bootstrap(snap.config), tmp_path)
    assert refused.returncode != 0, "without lds.json/cds.json Envoy must refuse the bootstrap"
    initial_files(snap.config)
    accepted = envoy_validate(envoy_bin, bootstrap(snap.config), tmp_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    admin = bootstrap(snap.config)["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"


def test_a_broken_resource_is_refused_by_envoy(ca: MeshCA, tmp_path: Path, envoy_bin: Path) -> None:
    snap = snapshot(ca, tmp_path)
    resources = r.build(snap, r.Layout(tmp_path))
    resources.clusters[0]["lb_policy"] = "NOT_A_POLICY"
    done = envoy_validate(envoy_bin, static_equivalent(snap.config, resources), tmp_path)
    assert done.returncode != 0


def test_rendering_is_deterministic(ca: MeshCA, tmp_path: Path) -> None:
    snap = snapshot(ca, tmp_path)
    first = r.build(snap, r.Layout(tmp_path))
    reordered = Snapshot(**{**snap.__dict__, "upstreams": {"api": tuple(reversed(API_INSTANCES))}})
    second = r.build(reordered, r.Layout(tmp_path))
    assert json.dumps(first.__dict__, sort_keys=True) == json.dumps(second.__dict__, sort_keys=True)


def test_subsets_split_and_header_route(ca: MeshCA, tmp_path: Path) -> None:
    resources = r.build(snapshot(ca, tmp_path), r.Layout(tmp_path))
    v2 = resources.endpoints["out.web.api.v2"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["address"] for e in v2] == ["198.51.100.12"]
    v1 = resources.endpoints["out.web.api.v1"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["address"] for e in v1] == ["198.51.100.13"]
    routes = resources.routes["out.web.api"]["virtual_hosts"][0]["routes"]
    assert routes[0]["match"] == {"prefix": "/admin", "headers": [{"name": "x-canary", "string_match": {"exact": "1"}}]}
    assert routes[0]["route"]["cluster"] == "out.web.api.v2"
    weights = {c["name"]: c["weight"] for c in routes[1]["route"]["weighted_clusters"]["clusters"]}
    assert weights == {"out.web.api.v1": 90, "out.web.api.v2": 10}
    assert routes[1]["route"]["retry_policy"]["num_retries"] == 3
    assert routes[1]["route"]["timeout"] == "2.000s"
    # The catch-all route keeps traffic flowing for requests no rule matched.
    assert len(routes) == 2, "a split on prefix / already catches everything"


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def test_websocket_upgrades_on_http_services_only(ca: MeshCA, tmp_path: Path, envoy_bin: Path) -> None:
    """HTTP/1.1 upgrades on both sidecars of an ``http`` service, carried between them as HTTP/2 extended CONNECT;
    the policy's idle timeout on both sides' routes, Envoy's 5-minute default raised for the rest."""
    config = {**CONFIG, "services": [*CONFIG["services"], {"name": "api", "port": 8081, "mesh_port": 21003}]}
    snap = snapshot(ca, tmp_path)
    snap = Snapshot(
        **{
            **snap.__dict__,
            "config": parse_config({**config, "envoy": {"config_dir": str(tmp_path)}}),
            "leaves": {**snap.leaves, "api": ca.leaf("api")},
        }
    )
    resources = r.build(snap, r.Layout(tmp_path))
    listeners = {x["name"]: x for x in resources.listeners}
    outbound, inbound = _hcm(listeners["outbound.web.api"]), _hcm(listeners["inbound.api"])
    for hcm in (outbound, inbound):
        assert hcm["upgrade_configs"] == [{"upgrade_type": "websocket"}]
        assert hcm["stream_idle_timeout"] == "3600.000s"
    assert inbound["http2_protocol_options"] == {"allow_connect": True}
    cluster = next(c for c in resources.clusters if c["name"] == "out.web.api")
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"]["http2_protocol_options"] == {"allow_connect": True}
    for route in resources.routes["out.web.api"]["virtual_hosts"][0]["routes"]:
        assert route["route"]["idle_timeout"] == "1800.000s"
    assert resources.routes["inbound.api"]["virtual_hosts"][0]["routes"][0]["route"]["idle_timeout"] == "1800.000s"
    for name in ("outbound.web.rpc", "inbound.rpc"):
        assert "upgrade_configs" not in _hcm(listeners[name]), "gRPC and HTTP/2 services have no HTTP/1.1 upgrade"
    done = envoy_validate(envoy_bin, static_equivalent(snap.config, resources), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("which", ["newest", "oldest"])
def test_tracing_spans_both_sides_and_each_service_samples_its_own_share(
    ca: MeshCA, tmp_path: Path, which: str, envoy_bin: Path, envoy_oldest_bin: Path
) -> None:
    policy = {**POLICY, "services": {**POLICY["services"], "rpc": {"trace_sampling": 0}}}
    config = parse_config(
        {
            **CONFIG,
            "envoy": {"config_dir": str(tmp_path)},
            "tracing": {"zipkin_address": "198.51.100.1:9411", "sampling": 25},
        }
    )
    snap = Snapshot(**{**snapshot(ca, tmp_path, policy).__dict__, "config": config})
    resources = r.build(snap, r.Layout(tmp_path))
    listeners = {x["name"]: x for x in resources.listeners}
    sampling = {
        name: _hcm(listener)["tracing"]["random_sampling"]["value"]
        for name, listener in listeners.items()
        if "tracing" in _hcm(listener)
    }
    # Calls to rpc and rpc's own inbound follow rpc's policy; the rest the VM's default; tcp has no spans.
    assert sampling == {"inbound.web": 25, "inbound.rpc": 0, "outbound.web.api": 25, "outbound.web.rpc": 0}
    zipkin = _hcm(listeners["inbound.web"])["tracing"]["provider"]["typed_config"]
    assert zipkin["collector_cluster"] == r.TRACING_CLUSTER
    assert zipkin["shared_span_context"] is False
    assert zipkin["trace_context_option"] == "USE_B3_WITH_W3C_PROPAGATION"
    collector = next(c for c in bootstrap(config)["static_resources"]["clusters"] if c["name"] == r.TRACING_CLUSTER)
    endpoint = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "198.51.100.1", "port_value": 9411}
    log_format = _hcm(listeners["inbound.web"])["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert log_format["trace_id"] == "%TRACE_ID%"
    untraced = r.build(snapshot(ca, tmp_path), r.Layout(tmp_path))
    assert not any("tracing" in _hcm(x) for x in untraced.listeners if x["name"] != "inbound.db")
    done = envoy_validate(
        envoy_bin if which == "newest" else envoy_oldest_bin, static_equivalent(config, resources), tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _at(address: str, region: str | None, zone: str = "") -> Instance:
    meta = (("region", region), ("zone", zone)) if region is not None else ()
    return Instance(address, 21000, node=address, meta=meta)


ZONES = (
    _at("198.51.100.21", "eu", "eu-a"),
    _at("198.51.100.22", "eu", "eu-a"),
    _at("198.51.100.23", "eu", "eu-b"),
    _at("198.51.100.24", "us", "us-a"),
    _at("198.51.100.25", "ap", "ap-a"),
    _at("198.51.100.26", None),
)


@pytest.mark.parametrize(
    ("caller", "failover", "expected"),
    [
        # zone, region, then every other region alike (instances without a locality with them)
        ({"region": "eu", "zone": "eu-a"}, [], [0, 0, 1, 2, 2, 2]),
        # the failover order puts ap before us, and the rest last
        (
            {"region": "eu", "zone": "eu-a"},
            [{"from": "eu", "to": "ap"}, {"from": "eu", "to": "us"}],
            [0, 0, 1, 3, 2, 4],
        ),
        # levels are dense: a caller in a zone with no instance starts at its region
        ({"region": "eu", "zone": "eu-c"}, [], [0, 0, 0, 1, 1, 1]),
        # another region's failover rules are not this caller's
        ({"region": "us", "zone": "us-a"}, [{"from": "eu", "to": "ap"}], [1, 1, 1, 0, 1, 1]),
        (None, [{"from": "eu", "to": "ap"}], [0, 0, 0, 0, 0, 0]),
    ],
)
def test_locality_priorities(
    caller: dict[str, str] | None, failover: list[dict[str, str]], expected: list[int]
) -> None:
    spec = LocalitySpec.model_validate(caller) if caller is not None else None
    priorities = r.locality_priorities(spec, LocalityLb.model_validate({"failover": failover}), list(ZONES))
    assert [priorities[i] for i in ZONES] == expected
    off = r.locality_priorities(spec, LocalityLb(enabled=False), list(ZONES))
    assert set(off.values()) == {0}


@pytest.mark.parametrize("which", ["newest", "oldest"])
def test_locality_levels_reach_envoy_with_retries_moving_down_a_level(
    ca: MeshCA, tmp_path: Path, which: str, envoy_bin: Path, envoy_oldest_bin: Path
) -> None:
    config = parse_config(
        {**CONFIG, "envoy": {"config_dir": str(tmp_path)}, "locality": {"region": "eu", "zone": "eu-a"}}
    )
    policy = {"services": {"api": {"locality": {"failover": [{"from": "eu", "to": "us"}]}}}}
    snap = Snapshot(**{**snapshot(ca, tmp_path, policy).__dict__, "config": config, "upstreams": {"api": ZONES}})
    resources = r.build(snap, r.Layout(tmp_path))
    groups = resources.endpoints["out.web.api"]["endpoints"]
    seen = [
        (
            g.get("priority", 0),
            g.get("locality"),
            [e["endpoint"]["address"]["socket_address"]["address"] for e in g["lb_endpoints"]],
        )
        for g in groups
    ]
    assert seen == [
        (0, {"region": "eu", "zone": "eu-a"}, ["198.51.100.21", "198.51.100.22"]),
        (1, {"region": "eu", "zone": "eu-b"}, ["198.51.100.23"]),
        (2, {"region": "us", "zone": "us-a"}, ["198.51.100.24"]),
        (3, None, ["198.51.100.26"]),
        (3, {"region": "ap", "zone": "ap-a"}, ["198.51.100.25"]),
    ]
    route = resources.routes["out.web.api"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["retry_policy"]["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
    assert bootstrap(config)["node"]["locality"] == {"region": "eu", "zone": "eu-a"}
    done = envoy_validate(
        envoy_bin if which == "newest" else envoy_oldest_bin, static_equivalent(config, resources), tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Without localities, one group and no retry priority: what every earlier release rendered.
    plain = r.build(snapshot(ca, tmp_path), r.Layout(tmp_path))
    assert [set(g) for g in plain.endpoints["out.web.api"]["endpoints"]] == [{"lb_endpoints"}]
    assert "retry_priority" not in plain.routes["out.web.api"]["virtual_hosts"][0]["routes"][0]["route"]["retry_policy"]


def test_outbound_cluster_verifies_the_destination_identity(ca: MeshCA, tmp_path: Path) -> None:
    resources = r.build(snapshot(ca, tmp_path), r.Layout(tmp_path))
    cluster = next(c for c in resources.clusters if c["name"] == "out.web.api")
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    matcher = tls["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"][0]
    assert matcher["san_type"] == "URI"
    assert matcher["matcher"]["safe_regex"]["regex"].endswith("/svc/api$")
    assert tls["tls_certificate_sds_secret_configs"][0]["name"] == "leaf.web"


def test_inbound_requires_client_certificates(ca: MeshCA, tmp_path: Path) -> None:
    resources = r.build(snapshot(ca, tmp_path), r.Layout(tmp_path))
    for listener in (x for x in resources.listeners if x["name"].startswith("inbound.")):
        tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
        assert tls["require_client_certificate"] is True
        assert listener["address"]["socket_address"]["port_value"] in {21000, 21001, 21002}


def rule(source: str, destination: str, action: str) -> AuthorizationRule:
    return AuthorizationRule.model_validate({"source": source, "destination": destination, "action": action})


@pytest.mark.parametrize(
    ("rules", "default", "expected"),
    [
        ([], "deny", r.Decision("deny", (), ())),
        ([], "allow", r.Decision("allow", (), ())),
        ([rule("web", "api", "allow")], "deny", r.Decision("deny", ("web",), ())),
        ([rule("*", "api", "allow"), rule("batch", "api", "deny")], "deny", r.Decision("allow", (), ("batch",))),
        # exact destination beats wildcard destination
        ([rule("web", "*", "deny"), rule("web", "api", "allow")], "deny", r.Decision("deny", ("web",), ())),
        ([rule("*", "api", "deny"), rule("web", "*", "allow")], "allow", r.Decision("deny", (), ())),
        # equal precedence: deny wins (an intention and a policy rule that disagree)
        ([rule("web", "api", "allow"), rule("web", "api", "deny")], "allow", r.Decision("allow", (), ("web",))),
        ([rule("web", "other", "allow")], "deny", r.Decision("deny", (), ())),
    ],
)
def test_authorization_follows_intention_precedence(
    rules: list[AuthorizationRule], default: str, expected: r.Decision
) -> None:
    assert r.decide("api", rules, default) == expected


def test_rbac_fails_closed_and_routes_carry_the_rules(ca: MeshCA, tmp_path: Path) -> None:
    resources = r.build(snapshot(ca, tmp_path, {}), r.Layout(tmp_path))
    inbound = next(x for x in resources.listeners if x["name"] == "inbound.web")
    hcm = inbound["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][0]["typed_config"]["rules"] == r.DENY_ALL, "listener-level rules must deny"
    route = resources.routes["inbound.web"]["virtual_hosts"][0]["routes"][0]
    assert route["typed_per_filter_config"]["envoy.filters.http.rbac"]["rbac"]["rules"] == r.DENY_ALL
    allowed = r.build(snapshot(ca, tmp_path), r.Layout(tmp_path)).routes["inbound.web"]
    rules = allowed["virtual_hosts"][0]["routes"][0]["typed_per_filter_config"]["envoy.filters.http.rbac"]["rbac"]
    principals = rules["rules"]["policies"]["intentions"]["principals"]
    assert [p["authenticated"]["principal_name"]["safe_regex"]["regex"].rsplit("/", 1)[-1] for p in principals] == [
        "api$"
    ]


def test_writer_is_ordered_idempotent_and_removes_stale(ca: MeshCA, tmp_path: Path) -> None:
    layout = r.Layout(tmp_path)
    snap = snapshot(ca, tmp_path)
    first = write(r.build(snap, layout), layout)
    assert first.written > 5
    assert (tmp_path / "eds" / "out.web.api.v2" / "cla.json").exists()
    assert (tmp_path / "sds" / "leaf.web.json").stat().st_mode & 0o777 == 0o640
    assert write(r.build(snap, layout), layout).written == 0, "unchanged resources must not touch files"
    without_subsets = write(r.build(Snapshot(**{**snap.__dict__, "policy": parse_policy({}, "empty")}), layout), layout)
    assert without_subsets.removed >= 4
    assert not (tmp_path / "eds" / "out.web.api.v2").exists()
    files = json.loads((tmp_path / "sds" / "leaf.web.json").read_text())
    assert len(files["resources"]) == 1, "Envoy accepts exactly one secret per SDS file"
