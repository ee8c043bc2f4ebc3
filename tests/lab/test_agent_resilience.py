"""Static stability and bad input: the last good configuration stays while Consul is away or the policy is bad."""

from __future__ import annotations

import copy
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshvm import lab as lab_api
from meshvm.lab import consul_server
from meshvm.lab.procs import stop
from meshvm.lab.state import LabState
from tests.support.mesh import MeshNode, management, meshvm_exe, wait_for
from tests.support.traffic import HttpServer, Load, http_get

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def topo(node_factory: Callable[[str], MeshNode], mesh_tag: str, policy: Callable[[dict[str, Any]], None]) -> Any:
    names = {k: f"{mesh_tag}-{k}" for k in ("web", "api")}
    policy({"authorization": {"rules": [{"source": names["web"], "destination": names["api"], "action": "allow"}]}})
    apps = {"a": HttpServer("a").start(), "b": HttpServer("b").start()}
    server = node_factory("api-a")
    server.add_service(names["api"], apps["a"].port, check={"type": "http", "path": "/health"})
    client = node_factory("client")
    client.add_service(names["web"], 1, check={"type": "none"}, upstreams=[{"service": names["api"]}])
    server.start()
    client.start()
    cluster = f"out.{names['web']}.{names['api']}"
    wait_for("instance", lambda: len(client.endpoints(cluster)) == 1, timeout=20)
    yield {
        "names": names,
        "server": server,
        "client": client,
        "apps": apps,
        "cluster": cluster,
        "factory": node_factory,
        "url": client.upstream_url(names["web"], names["api"]),
    }
    for app in apps.values():
        app.stop()


def _metric(node: MeshNode, name: str) -> float:
    for line in node.agent_metrics().splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


def test_a_bad_policy_in_kv_is_refused_and_the_last_good_one_stays(topo: Any, lab: LabState, mesh_tag: str) -> None:
    url = topo["url"]
    errors_before = _metric(topo["server"], 'meshvm_errors_total{kind="policy"}')
    # Written around `meshvm policy apply`, straight into KV: weights that do not add up, and broken JSON.
    for bad in (json.dumps({"services": {"x": {"routes": [{"split": [{"weight": 50}]}]}}}), "{not json"):
        management(lab).kv.put(f"meshvm/tests/{mesh_tag}/mesh", bad)
        wait_for("agent refuses it", lambda: _metric(topo["server"], "meshvm_policy_valid") == 0, timeout=10)
        health = topo["server"].agent_health()
        assert health["policy_valid"] is False
        assert f"meshvm/tests/{mesh_tag}/mesh" in health["last_error"]
        status, _, _ = http_get(url)
        assert status == 200, "the last good authorization (web may call api) must stay in force"
    assert _metric(topo["server"], 'meshvm_errors_total{kind="policy"}') >= errors_before + 2
    log = (topo["server"].dir / "agent.log").read_text()
    assert "refusing the policy in Consul KV" in log


def test_policy_apply_refuses_bad_files_and_writes_nothing(
    topo: Any, lab: LabState, mesh_tag: str, tmp_path: Path
) -> None:
    assert lab.consul is not None
    key = f"meshvm/tests/{mesh_tag}/mesh"
    _, before = management(lab).kv.get(key)
    cases = {
        "weights.yaml": (
            {
                "services": {
                    "api": {"subsets": {"a": {"tags": ["a"]}}, "routes": [{"split": [{"subset": "a", "weight": 60}]}]}
                }
            },
            "services.api.routes.0: split weights must sum to 100, not 60",
        ),
        "subset.yaml": ({"services": {"api": {"routes": [{"to": "nope"}]}}}, "subset 'nope', which is not in subsets"),
        "field.yaml": ({"services": {"api": {"retrys": {"attempts": 2}}}}, "services.api.retrys: Extra inputs"),
        "action.yaml": (
            {"authorization": {"rules": [{"source": "a", "destination": "b", "action": "maybe"}]}},
            "authorization.rules.0.action",
        ),
    }
    env = {"CONSUL_HTTP_TOKEN": lab.consul.management_token, "PATH": "/usr/bin:/bin"}
    for filename, (document, expected) in cases.items():
        path = tmp_path / filename
        path.write_text(yaml.safe_dump(document))
        done = subprocess.run(
            [
                meshvm_exe(),
                "policy",
                "apply",
                "-f",
                str(path),
                "--consul",
                lab.consul.local_http_addr,
                "--prefix",
                f"meshvm/tests/{mesh_tag}",
            ],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            timeout=30,
        )
        assert done.returncode == 2, (filename, done.stderr)
        assert expected in done.stderr, (filename, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert str(path) in done.stderr
    (tmp_path / "syntax.yaml").write_text("services: [unclosed\n")
    done = subprocess.run(
        [meshvm_exe(), "policy", "apply", "-f", str(tmp_path / "syntax.yaml"), "--consul", lab.consul.local_http_addr],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert done.returncode == 2
    assert "not valid YAML" in done.stderr
    _, after = management(lab).kv.get(key)
    assert (after or {}).get("ModifyIndex") == (before or {}).get("ModifyIndex"), "nothing may be written"


def test_policy_apply_diff_and_cas(topo: Any, lab: LabState, mesh_tag: str, tmp_path: Path) -> None:
    assert lab.consul is not None
    names = topo["names"]
    prefix = f"meshvm/tests/{mesh_tag}"
    good = {
        "authorization": {"rules": [{"source": names["web"], "destination": names["api"], "action": "allow"}]},
        "services": {names["api"]: {"timeout": "3s"}},
    }
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(good))
    env = {"CONSUL_HTTP_TOKEN": lab.consul.management_token, "PATH": "/usr/bin:/bin"}
    base = ["--consul", lab.consul.local_http_addr, "--prefix", prefix]
    diff = subprocess.run(
        [meshvm_exe(), "policy", "diff", "-f", str(path), *base], capture_output=True, text=True, check=False, env=env
    )
    assert diff.returncode == 1
    assert '"timeout": "3s"' in diff.stdout
    applied = subprocess.run(
        [meshvm_exe(), "policy", "apply", "-f", str(path), *base], capture_output=True, text=True, check=False, env=env
    )
    assert applied.returncode == 0, applied.stderr
    wait_for("policy valid again", lambda: _metric(topo["server"], "meshvm_policy_valid") == 1, timeout=10)
    again = subprocess.run(
        [meshvm_exe(), "policy", "apply", "-f", str(path), *base], capture_output=True, text=True, check=False, env=env
    )
    assert again.returncode == 0
    assert "no changes" in again.stderr
    got = subprocess.run([meshvm_exe(), "policy", "get", *base], capture_output=True, text=True, check=False, env=env)
    assert json.loads(got.stdout)["services"][names["api"]]["timeout"] == "3s"


def _ca_ready(lab: LabState) -> bool:
    try:
        management(lab).agent.connect.ca.leaf("readiness-probe")
    except Exception:  # noqa: BLE001 - any failure means not ready yet
        return False
    return True


def test_consul_away_for_30s_traffic_flows_and_agents_resync(topo: Any, lab: LabState) -> None:
    assert lab.consul is not None
    names, client, url = topo["names"], topo["client"], topo["url"]
    with Load(url, rate_per_s=50, concurrency=2) as load:
        time.sleep(1)
        stop(lab.consul.pid)
        client.stop_consul()
        away_since = time.monotonic()
        wait_for("agent notices", lambda: client.agent_health()["consul_reachable"] is False, timeout=15)
        time.sleep(max(0.0, 30 - (time.monotonic() - away_since)))
        assert client.agent_health()["rendered"] is True
        pid = consul_server.launch(Path(lab.consul.binary), Path(lab.state_dir))
        state = lab_api.load()
        assert state is not None
        assert state.consul is not None
        state.consul.pid = pid
        state.save()
        lab.consul.pid = pid
        client.start_consul()
        # Consul is back when its CA signs again (a restarted server answers "CA provider is nil" for a while).
        wait_for("Consul's CA is ready", lambda: _ca_ready(lab), timeout=60, interval=0.1)
        back = time.monotonic()
        wait_for("agent reconnects", lambda: client.agent_health()["consul_reachable"] is True, timeout=30)
        reconnect = time.monotonic() - back
    summary = load.summary()
    assert summary.total > 1000
    assert summary.failed == 0, f"traffic between known services must keep flowing: {summary.by_status}"
    assert reconnect < 2.5, f"agent took {reconnect:.1f}s to resync after Consul came back"
    # Resync: a new instance that registers after the outage reaches the client's Envoy.
    newcomer = topo["factory"]("api-b")
    newcomer.add_service(names["api"], topo["apps"]["b"].port, check={"type": "http", "path": "/health"})
    newcomer.start()
    wait_for("new instance after the outage", lambda: len(client.endpoints(topo["cluster"])) == 2, timeout=20)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.pop("services"), "services: Field required"),
        (
            lambda c: c["envoy"].update(admin_address="198.51.100.1"),
            "envoy.admin_address: 198.51.100.1 is not a loopback",
        ),
        (lambda c: c["services"][0].update(name="Bad_Name"), "services.0.name: 'Bad_Name' is not a valid name"),
        (lambda c: c["services"][0].update(mesh_port=c["envoy"]["admin_port"]), "is used twice"),
        (lambda c: c["services"][0]["check"].update(interval="100ms"), "interval must be at least 1s"),
    ],
)
def test_bad_agent_config_exits_2_and_registers_nothing(
    topo: Any, lab: LabState, tmp_path: Path, change: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    config = copy.deepcopy(topo["server"].agent_config())
    config["node"] = "never-registered"
    change(config)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in (["validate", "-c", str(path)], ["agent", "-c", str(path)]):
        done = subprocess.run([meshvm_exe(), *command], capture_output=True, text=True, check=False, timeout=30)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    _, nodes = management(lab).catalog.nodes()
    assert "never-registered" not in {n["Node"] for n in nodes}
