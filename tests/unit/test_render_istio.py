"""A VM in the cluster's Istio mesh: what its Envoy is given, checked as data and by Envoy itself."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshvm import pki
from meshvm.config import parse_config
from meshvm.envoy import resources as r
from meshvm.envoy.bootstrap import bootstrap, initial_files, static_equivalent
from meshvm.envoy.snapshot import Leaf, Roots, Snapshot
from meshvm.errors import ConfigError
from meshvm.policy import parse_policy
from tests.support.pki import MeshCA
from tests.unit.test_render import envoy_validate

ISTIO = {
    "namespace": "meshvm",
    "service_account": "api",
    "istiod_address": "198.51.100.1:15012",
    "kube_api": "https://198.51.100.1:6443",
    "token_secret": "meshvm-vm-vm2",
}
CONFIG: dict[str, Any] = {
    "node": "vm2",
    "address": "198.51.100.12",
    "istio": ISTIO,
    "services": [
        {
            "name": "api",
            "port": 8080,
            "mesh_port": 21000,
            "upstreams": [
                {"service": "k8s:shop/pod2", "port": 80, "local_port": 9301},
                {"service": "k8s:shop/pod1", "port": 9090, "local_port": 9302, "protocol": "grpc"},
                {"service": "db", "local_port": 9303, "protocol": "tcp"},
            ],
        }
    ],
}
POLICY: dict[str, Any] = {
    "authorization": {
        "default_action": "deny",
        "rules": [
            {"source": "k8s:shop/pod1", "destination": "api", "action": "allow"},
            {"source": "web", "destination": "api", "action": "allow"},
        ],
    },
    "services": {
        "k8s:shop/pod2": {
            "retries": {"attempts": 3, "retry_on": ["5xx"]},
            "timeout": "2s",
            "fault": {"abort": {"status": 503, "percent": 10}},
            "routes": [{"split": [{"weight": 100}]}],
        }
    },
}


def istio_snapshot(tmp: Path, *, with_identity: bool = True, policy: dict[str, Any] | None = None) -> Snapshot:
    ca = MeshCA()
    config = parse_config({**CONFIG, "envoy": {"config_dir": str(tmp)}})
    snap = Snapshot(
        config=config,
        policy=parse_policy(POLICY if policy is None else policy, "test policy"),
        roots=ca.roots,
        leaves={"api": ca.leaf("api")},
    )
    if not with_identity:
        return snap
    istio_ca = pki.new_ca("test Istio CA")
    pair = pki.issue(istio_ca, "api", uris=("spiffe://cluster.local/ns/meshvm/sa/api",))
    return replace(
        snap,
        istio_leaf=Leaf("istio", pair.cert_pem, pair.key_pem),
        istio_roots=Roots("cluster.local", (istio_ca.cert_pem,)),
    )


def _cluster(resources: r.Resources, name: str) -> dict[str, Any]:
    return next(c for c in resources.clusters if c["name"] == name)


@pytest.mark.parametrize("which", ["newest", "oldest"])
def test_envoy_accepts_every_resource_and_the_bootstrap(
    tmp_path: Path, which: str, envoy_bin: Path, envoy_oldest_bin: Path
) -> None:
    envoy = envoy_bin if which == "newest" else envoy_oldest_bin
    snap = istio_snapshot(tmp_path)
    done = envoy_validate(envoy, static_equivalent(snap.config, r.build(snap, r.Layout(tmp_path))), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    initial_files(snap.config)
    booted = envoy_validate(envoy, bootstrap(snap.config), tmp_path)
    assert booted.returncode == 0, booted.stdout + booted.stderr


def test_inbound_serves_istio_callers_by_alpn_and_everyone_else_on_consul(tmp_path: Path) -> None:
    resources = r.build(istio_snapshot(tmp_path), r.Layout(tmp_path))
    listener = next(x for x in resources.listeners if x["name"] == "inbound.api")
    assert [f["name"] for f in listener["listener_filters"]] == ["envoy.filters.listener.tls_inspector"]
    istio, consul = listener["filter_chains"]
    assert istio["filter_chain_match"]["application_protocols"][0] == "istio"
    # Envoy matches level by level without falling back: both chains are on the tls level, Istio's more specific.
    assert consul["filter_chain_match"] == {"transport_protocol": "tls"}, "the Consul chain takes every other ALPN"

    def secrets(chain: dict[str, Any]) -> tuple[str, str]:
        tls = chain["transport_socket"]["typed_config"]
        assert tls["require_client_certificate"] is True
        common = tls["common_tls_context"]
        return common["tls_certificate_sds_secret_configs"][0]["name"], common["validation_context_sds_secret_config"][
            "name"
        ]

    assert secrets(istio) == (r.ISTIO_LEAF, r.ISTIO_ROOTS)
    assert secrets(consul) == ("leaf.api", r.ROOTS)
    assert istio["filters"] == consul["filters"], "one route and one rule set for callers of both meshes"
    assert set(resources.secrets) >= {r.ISTIO_LEAF, r.ISTIO_ROOTS}


def test_one_rule_set_names_consul_services_and_kubernetes_identities(tmp_path: Path) -> None:
    resources = r.build(istio_snapshot(tmp_path), r.Layout(tmp_path))
    route = resources.routes["inbound.api"]["virtual_hosts"][0]["routes"][0]
    principals = route["typed_per_filter_config"]["envoy.filters.http.rbac"]["rbac"]["rules"]["policies"]["intentions"][
        "principals"
    ]
    names = [p["authenticated"]["principal_name"] for p in principals]
    assert {"exact": "spiffe://cluster.local/ns/shop/sa/pod1"} in names
    assert any(n.get("safe_regex", {}).get("regex", "").endswith("/svc/web$") for n in names)


def test_wildcard_source_means_any_caller_either_mesh_authenticates() -> None:
    domains = r.TrustDomains("x.consul", "cluster.local")
    anyone = domains.principal("*")["or_ids"]["ids"]
    regexes = [p["authenticated"]["principal_name"]["safe_regex"]["regex"] for p in anyone]
    assert regexes[0].startswith("^spiffe://x\\.consul/")
    assert regexes[1] == "^spiffe://cluster\\.local/ns/[^/]+/sa/[^/]+$"
    assert "or_ids" not in r.TrustDomains("x.consul").principal("*"), "no Istio mesh, no Istio callers"


def test_kubernetes_upstream_dials_as_an_istio_sidecar(tmp_path: Path) -> None:
    resources = r.build(istio_snapshot(tmp_path), r.Layout(tmp_path))
    cluster = _cluster(resources, "out.api.k8s.shop.pod2")
    assert cluster["eds_cluster_config"] == {
        "service_name": "outbound|80||pod2.shop.svc.cluster.local",
        "eds_config": {"ads": {}, "resource_api_version": "V3"},
    }
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "outbound_.80_._.pod2.shop.svc.cluster.local"
    common = tls["common_tls_context"]
    assert common["alpn_protocols"] == ["istio"]
    assert common["tls_certificate_sds_secret_configs"][0]["name"] == r.ISTIO_LEAF
    sans = common["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/shop/sa/pod2"}}]
    assert "typed_extension_protocol_options" not in cluster, "HTTP/1.1 to an HTTP port, as Istio's sidecars"
    assert "out.api.k8s.shop.pod2" not in resources.endpoints, "its endpoints come from istiod"
    grpc = _cluster(resources, "out.api.k8s.shop.pod1")
    assert grpc["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] == ["istio", "h2"]
    assert "typed_extension_protocol_options" in grpc


def test_traffic_policy_applies_to_calls_into_the_cluster(tmp_path: Path) -> None:
    resources = r.build(istio_snapshot(tmp_path), r.Layout(tmp_path))
    host = resources.routes["out.api.k8s.shop.pod2"]["virtual_hosts"][0]
    route = host["routes"][0]["route"]
    assert route["retry_policy"]["num_retries"] == 3
    assert route["timeout"] == "2.000s"
    assert host["typed_per_filter_config"]["envoy.filters.http.fault"]["abort"]["http_status"] == 503


def test_until_the_istio_identity_arrives_the_vm_serves_consul_only(tmp_path: Path) -> None:
    resources = r.build(istio_snapshot(tmp_path, with_identity=False), r.Layout(tmp_path))
    listener = next(x for x in resources.listeners if x["name"] == "inbound.api")
    assert len(listener["filter_chains"]) == 1
    assert "listener_filters" not in listener
    names = {c["name"] for c in resources.clusters}
    assert "out.api.db" in names
    assert not any(".k8s." in n for n in names), "an Istio cluster without its certificate would be refused"
    assert resources.secrets[r.ISTIO_LEAF] is None, "its file exists (the bootstrap names it), with no secret yet"


def test_bootstrap_presents_the_vm_to_istiod_as_a_sidecar_of_its_workload(tmp_path: Path) -> None:
    boot = bootstrap(istio_snapshot(tmp_path).config)
    assert boot["node"]["id"] == "sidecar~198.51.100.12~vm2.meshvm~meshvm.svc.cluster.local"
    meta = boot["node"]["metadata"]
    assert (meta["NAMESPACE"], meta["SERVICE_ACCOUNT"], meta["CLUSTER_ID"]) == ("meshvm", "api", "Kubernetes")
    istiod = next(c for c in boot["static_resources"]["clusters"] if c["name"] == r.ISTIOD_CLUSTER)
    assert istiod["type"] == "STATIC"
    assert istiod["transport_socket"]["typed_config"]["sni"] == "istiod.istio-system.svc"
    assert boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] == "istiod"
    plain = bootstrap(parse_config({**CONFIG, "istio": None, "services": [{**CONFIG["services"][0], "upstreams": []}]}))
    assert "ads_config" not in plain["dynamic_resources"]
    assert plain["node"]["id"] == "vm2"


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"authorization": {"rules": [{"source": "k8s:shop", "destination": "api", "action": "allow"}]}}, "k8s:shop"),
        ({"authorization": {"rules": [{"source": "k8s:Shop/x", "destination": "api", "action": "allow"}]}}, "k8s:"),
        ({"services": {"k8s:shop/pod2": {"subsets": {"v1": {"version": "v1"}}}}}, "subsets"),
        ({"services": {"k8s:shop/pod2": {"rate_limit": {"requests_per_second": 5}}}}, "rate_limit"),
        ({"services": {"k8s:shop/pod2": {"locality": {"enabled": False}}}}, "services[k8s:shop/pod2].locality"),
        ({"services": {"api": {"locality": {"failover": [{"from": "eu", "to": "eu"}]}}}}, "to itself"),
        ({"services": {"api": {"locality": {"failover": [{"from": "eu"}]}}}}, "services.api.locality.failover.0.to"),
        ({"services": {"api": {"protocol": "tcp", "trace_sampling": 10}}}, "trace_sampling needs an HTTP protocol"),
        ({"services": {"api": {"idle_timeout": "soon"}}}, "services.api.idle_timeout"),
    ],
)
def test_kubernetes_names_in_the_policy_are_checked(document: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(document, "policy.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert fragment in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"istio": None}, "configure istio"),
        (
            {"services": [{**CONFIG["services"][0], "upstreams": [{"service": "k8s:shop/pod2", "local_port": 9}]}]},
            "port",
        ),
        ({"istio": {**ISTIO, "token_lifetime": "5m"}}, "10m"),
        ({"istio": {**ISTIO, "kube_api": "http://198.51.100.1:6443"}}, "kube_api"),
    ],
)
def test_istio_settings_are_checked(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**CONFIG, **change})
    assert fragment in str(info.value)


def test_rendering_with_istio_is_deterministic(tmp_path: Path) -> None:
    snap = istio_snapshot(tmp_path)
    first = json.dumps(r.build(snap, r.Layout(tmp_path)).__dict__, sort_keys=True)
    assert first == json.dumps(r.build(snap, r.Layout(tmp_path)).__dict__, sort_keys=True)
