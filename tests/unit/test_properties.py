"""Property tests over the two models: whatever they accept renders a configuration Envoy accepts, and whatever
they refuse gets a one-line error naming the field, never a traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshvm.config import parse_config
from meshvm.envoy.offline import render_offline
from meshvm.errors import ConfigError
from meshvm.policy import parse_policy

NAMES = st.sampled_from(["web", "api", "db", "cache", "auth-v2", "billing"])
PROTOCOLS = st.sampled_from(["http", "http2", "grpc", "tcp"])
DURATIONS = st.sampled_from(["100ms", "250ms", "1s", "2s", "1.5s", 3])


@st.composite
def agent_configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    ports = iter(draw(st.lists(st.integers(20000, 29999), min_size=20, max_size=20, unique=True)))
    services = []
    for name in names:
        protocol = draw(PROTOCOLS)
        upstream_names = draw(st.lists(NAMES.filter(lambda n, me=name: n != me), max_size=3, unique=True))
        services.append(
            {
                "name": name,
                "port": next(ports),
                "mesh_port": next(ports),
                "protocol": protocol,
                "tags": draw(st.lists(st.sampled_from(["a", "b", "canary"]), max_size=2, unique=True)),
                "check": {
                    "type": draw(st.sampled_from(["tcp", "none", "http"] + (["grpc"] if protocol == "grpc" else [])))
                },
                "upstreams": [
                    {"service": u, "local_port": next(ports), "protocol": draw(st.none() | PROTOCOLS)}
                    for u in upstream_names
                ],
            }
        )
    return {"address": "198.51.100.11", "services": services}


@st.composite
def service_policies(draw: st.DrawFn, protocol: str | None) -> dict[str, Any]:
    policy: dict[str, Any] = {}
    if protocol is not None:
        policy["protocol"] = protocol
    subsets = draw(st.lists(st.sampled_from(["v1", "v2", "canary"]), max_size=3, unique=True))
    if subsets:
        policy["subsets"] = {s: {"version": s} for s in subsets}
    http = protocol != "tcp"
    if subsets and draw(st.booleans()):
        first = draw(st.integers(0, 100))
        split = [{"subset": subsets[0], "weight": first}, {"subset": None, "weight": 100 - first}]
        if http and draw(st.booleans()):
            policy["routes"] = [
                {"match": {"path_prefix": "/x", "headers": [{"name": "x-v", "exact": "2"}]}, "to": subsets[-1]},
                {"split": split},
            ]
        else:
            policy["routes"] = [{"split": split}]
    if http:
        if draw(st.booleans()):
            policy["retries"] = {"attempts": draw(st.integers(0, 10)), "per_try_timeout": draw(st.none() | DURATIONS)}
        if draw(st.booleans()):
            policy["timeout"] = draw(DURATIONS)
        if draw(st.booleans()):
            policy["fault"] = {
                "abort": {"status": draw(st.integers(400, 599)), "percent": draw(st.floats(0, 100))},
                "delay": {"fixed": draw(DURATIONS), "percent": draw(st.integers(0, 100))},
            }
        if draw(st.booleans()):
            policy["rate_limit"] = {"requests_per_second": draw(st.integers(1, 10_000))}
    if draw(st.booleans()):
        policy["circuit_breaker"] = {"max_requests": draw(st.integers(1, 5000)), "max_retries": draw(st.integers(0, 9))}
    if draw(st.booleans()):
        policy["outlier_detection"] = {"consecutive_5xx": draw(st.integers(1, 20)), "interval": draw(DURATIONS)}
    return policy


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(NAMES, max_size=3, unique=True))
    return {
        "authorization": {
            "default_action": draw(st.sampled_from(["allow", "deny"])),
            "rules": draw(
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "source": NAMES | st.just("*"),
                            "destination": NAMES | st.just("*"),
                            "action": st.just("allow"),
                        }
                    ),
                    max_size=4,
                )
            ),
        },
        "services": {n: draw(service_policies(draw(st.none() | PROTOCOLS))) for n in names},
    }


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(config=agent_configs(), policy=policies())
def test_every_accepted_input_renders_what_envoy_accepts(
    config: dict[str, Any], policy: dict[str, Any], envoy_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    try:
        parsed_config = parse_config(config)
        parsed_policy = parse_policy(policy, "generated policy")
    except ConfigError as exc:
        # Generated values can still break cross-field rules (e.g. tcp + retries); refusal must be clean.
        assert len(str(exc).splitlines()) == 1  # noqa: PT017 - a parse may pass; only a refusal is checked
        return
    tmp = tmp_path_factory.mktemp("prop")
    document = render_offline(
        parsed_config.model_copy(update={"envoy": parsed_config.envoy.model_copy(update={"config_dir": tmp})}),
        parsed_policy,
    )
    (tmp / "static.json").write_text(json.dumps(document))
    done = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(tmp / "static.json"), "-l", "error"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 70000) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


def _mutate(document: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(document))
    node: Any = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


def _paths(node: Any, prefix: list[str | int]) -> list[list[str | int]]:
    found: list[list[str | int]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append([*prefix, key])
            found += _paths(value, [*prefix, key])
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.append([*prefix, index])
            found += _paths(value, [*prefix, index])
    return found


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_refusal_is_a_clean_error_naming_the_field(data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["config", "policy"]))
    valid = data.draw(agent_configs() if which == "config" else policies())
    paths = _paths(valid, [])
    if not paths:
        return
    path = data.draw(st.sampled_from(paths))
    broken = _mutate(valid, path, data.draw(JSON_VALUES))
    parse = parse_config if which == "config" else (lambda d: parse_policy(d, "policy"))
    try:
        parse(broken)
    except ConfigError as exc:  # a parse may pass (the mutation can be harmless); only a refusal is checked
        message = str(exc)
        assert "\n" not in message
        assert "Traceback" not in message
        assert ": " in message, "an error says where and what"
    # Anything else (a TypeError, a KeyError…) escapes and fails the test.


@settings(max_examples=200, deadline=None)
@given(document=JSON_VALUES)
def test_arbitrary_documents_never_crash_the_models(document: Any) -> None:
    for parse in (parse_config, lambda d: parse_policy(d, "policy")):
        try:
            parse(document)
        except ConfigError as exc:
            assert "\n" not in str(exc)  # noqa: PT017 - a parse may pass; only a refusal is checked
