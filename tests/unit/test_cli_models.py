"""The CLI over the config and policy models: clear one-line errors with exit 2, real Envoy accepts the renders."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

GOOD_CONFIG: dict[str, Any] = {
    "address": "198.51.100.11",
    "services": [
        {"name": "web", "port": 8080, "mesh_port": 21000, "upstreams": [{"service": "api", "local_port": 9001}]}
    ],
}
GOOD_POLICY: dict[str, Any] = {
    "authorization": {"rules": [{"source": "web", "destination": "api", "action": "allow"}]},
    "services": {"api": {"retries": {"attempts": 2}, "timeout": "2s"}},
}


def run(cli: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cli, *args], capture_output=True, text=True, check=False, timeout=60)


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_accepts_a_good_config(meshvm_cli: str, tmp_path: Path) -> None:
    done = run(meshvm_cli, "validate", "-c", str(write(tmp_path / "a.yaml", GOOD_CONFIG)))
    assert done.returncode == 0, done.stderr
    assert "1 service(s): web" in done.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "No such file"),
        ("services: [", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        (yaml.safe_dump({**GOOD_CONFIG, "address": "nowhere"}), "address: 'nowhere' is not an IP address"),
        (yaml.safe_dump({**GOOD_CONFIG, "surprise": 1}), "surprise: Extra inputs are not permitted"),
        (yaml.safe_dump({**GOOD_CONFIG, "services": []}), "services: List should have at least 1 item"),
        (yaml.safe_dump({**GOOD_CONFIG, "tracing": {"zipkin_address": "jaeger"}}), "tracing.zipkin_address:"),
        (
            yaml.safe_dump({**GOOD_CONFIG, "tracing": {"zipkin_address": "j:9411", "sampling": 101}}),
            "tracing.sampling: Input should be less than or equal to 100",
        ),
        (yaml.safe_dump({**GOOD_CONFIG, "locality": {"zone": "a"}}), "locality.region: Field required"),
        (yaml.safe_dump({**GOOD_CONFIG, "locality": {"region": "eu west"}}), "locality.region:"),
    ],
)
def test_validate_refuses_bad_configs_in_one_line(
    meshvm_cli: str, tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "agent.yaml"
    if content is not None:
        path.write_text(content)
    done = run(meshvm_cli, "validate", "-c", str(path))
    assert done.returncode == 2
    assert expected in done.stderr
    assert str(path) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_policy_validate(meshvm_cli: str, tmp_path: Path) -> None:
    ok = run(meshvm_cli, "policy", "validate", "-f", str(write(tmp_path / "p.yaml", GOOD_POLICY)))
    assert ok.returncode == 0, ok.stderr
    bad = {"services": {"api": {"fault": {"abort": {"status": 700, "percent": 20}}}}}
    done = run(meshvm_cli, "policy", "validate", "-f", str(write(tmp_path / "bad.yaml", bad)))
    assert done.returncode == 2
    assert "services.api.fault.abort.status: Input should be less than or equal to 599" in done.stderr


def test_policy_apply_with_consul_unreachable_exits_3(meshvm_cli: str, tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", GOOD_POLICY)
    done = run(meshvm_cli, "policy", "apply", "-f", str(path), "--consul", "127.0.0.1:1")
    assert done.returncode == 3
    assert "unreachable" in done.stderr


def test_render_bootstrap_and_resources_are_accepted_by_envoy(meshvm_cli: str, tmp_path: Path, envoy_bin: Path) -> None:
    config = {**GOOD_CONFIG, "envoy": {"config_dir": str(tmp_path / "xds")}}
    cfg = write(tmp_path / "agent.yaml", config)
    out = tmp_path / "envoy.json"
    done = run(meshvm_cli, "render", "bootstrap", "-c", str(cfg), "-o", str(out))
    assert done.returncode == 0, done.stderr
    boot = json.loads(out.read_text())
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert (tmp_path / "xds" / "lds.json").exists()
    check = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(out), "-l", "error"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    policy = write(tmp_path / "p.yaml", GOOD_POLICY)
    rendered = run(meshvm_cli, "render", "resources", "-c", str(cfg), "-p", str(policy))
    assert rendered.returncode == 0, rendered.stderr
    (tmp_path / "static.json").write_text(rendered.stdout)
    check = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(tmp_path / "static.json"), "-l", "error"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_rbac_prints_only_namespaced_least_privilege(meshvm_cli: str) -> None:
    done = run(meshvm_cli, "rbac", "--namespace", "vms")
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert [d["kind"] for d in docs] == ["Namespace", "ServiceAccount", "Role", "RoleBinding"]
    role = docs[2]
    assert role["metadata"]["namespace"] == "vms"
    assert {r for rule in role["rules"] for r in rule["resources"]} == {
        "services",
        "endpointslices",
        "workloadentries",
        "serviceentries",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "serviceaccounts/token",
        "roles",
        "rolebindings",
    }
    secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    readable = [r for r in secret_rules if {"get", "list", "watch"} & set(r["verbs"])]
    assert [(r["verbs"], r.get("resourceNames")) for r in readable] == [(["get"], ["meshvm-bootstrap"])], (
        "only the bootstrap secret can be read, never all secrets"
    )
    assert ["create", "delete"] in [r["verbs"] for r in secret_rules], "VMs' token Secrets: made and removed by name"
    assert "ClusterRole" not in done.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-o", "mesh.png"], "--output mesh.png: meshvm draws SVG; name the file *.svg"),
        (["-i", "/nonexistent/inventory"], "/nonexistent/inventory"),
    ],
)
def test_graph_refuses_bad_input_in_one_line(meshvm_cli: str, args: list[str], expected: str) -> None:
    done = run(meshvm_cli, "graph", *args)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_readmes_policy_example_is_a_valid_policy(meshvm_cli: str, tmp_path: Path) -> None:
    """Every knob the README shows is one the model takes (the example is checked as users would check it)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    example = next(b for b in blocks if b.startswith("version: 1\nauthorization:"))
    for knob in ("idle_timeout", "trace_sampling", "failover"):
        assert knob in example
    path = tmp_path / "readme-policy.yaml"
    path.write_text(example)
    done = run(meshvm_cli, "policy", "validate", "-f", str(path))
    assert done.returncode == 0, done.stderr
