"""Every decision of the agent, as step(state, event, now) -> (state, effects): no clock, thread or socket."""

from __future__ import annotations

import json

from meshvm.agent import core
from meshvm.config import parse_config
from meshvm.envoy.snapshot import Instance, Leaf, Snapshot

CONFIG = parse_config(
    {
        "node": "vm1",
        "address": "198.51.100.11",
        "services": [
            {"name": "web", "port": 8080, "mesh_port": 21000, "upstreams": [{"service": "api", "local_port": 9}]}
        ],
    }
)
API = (Instance("198.51.100.12", 21000, node="vm2", meta=(("protocol", "http"),)),)
OUTAGE = 100.0


def fresh() -> core.State:
    return core.initial(Snapshot(config=CONFIG))


def after_outage() -> core.State:
    """Consul failed at OUTAGE and came back; api was known before."""
    state, _ = core.step(fresh(), core.Upstreams("api", API), 0.0)
    state, _ = core.step(state, core.WatchHealth("upstream:api", ok=False, error="down"), OUTAGE)
    state, _ = core.step(state, core.WatchHealth("upstream:api", ok=True), OUTAGE + 1)
    return state


def kinds(effects: tuple[core.Effect, ...]) -> list[str]:
    return [type(e).__name__ for e in effects]


def test_an_answer_in_calm_times_is_applied_at_once() -> None:
    state, effects = core.step(fresh(), core.Upstreams("api", API), 50.0)
    assert state.snapshot.upstreams["api"] == API
    assert state.snapshot.protocols["api"] == "http"
    assert core.Render() in effects
    assert core.Metric("endpoints", "set", 1, (("service", "api"),)) in effects
    same, again = core.step(state, core.Upstreams("api", API), 51.0)
    assert same.snapshot == state.snapshot
    assert core.Render() not in again, "no change, no render"


def test_after_an_outage_answers_wait_until_they_settle() -> None:
    state = after_outage()
    changed = (*API, Instance("198.51.100.13", 21000, node="vm3"))
    state, effects = core.step(state, core.Upstreams("api", changed), OUTAGE + 2)
    assert state.snapshot.upstreams["api"] == API, "not applied yet"
    assert effects == (core.SetTimer("upstream:api", OUTAGE + 2 + core.SETTLE_QUIET),)
    state, effects = core.step(state, core.Upstreams("api", changed), OUTAGE + 3)
    assert effects == (core.SetTimer("upstream:api", OUTAGE + 3 + core.SETTLE_QUIET),), "pushed back"
    stale, nothing = core.step(state, core.TimerFired("upstream:api", OUTAGE + 2 + core.SETTLE_QUIET), OUTAGE + 5)
    assert nothing == ()
    assert stale.snapshot.upstreams["api"] == API, "a replaced timer does nothing"
    state, effects = core.step(state, core.TimerFired("upstream:api", OUTAGE + 3 + core.SETTLE_QUIET), OUTAGE + 6)
    assert state.snapshot.upstreams["api"] == changed
    assert "upstream:api" not in state.timers
    assert core.Render() in effects


def test_something_that_vanishes_right_after_an_outage_is_kept_through_the_grace_period() -> None:
    state = after_outage()
    late = OUTAGE + core.SETTLE_WINDOW + 1
    state, _ = core.step(state, core.WatchHealth("roots", ok=False, error="down"), late - 5)
    state, effects = core.step(state, core.Upstreams("api", ()), late - 4)
    assert kinds(effects) == ["SetTimer"]
    due = late - 4 + core.SETTLE_QUIET
    state, effects = core.step(state, core.TimerFired("upstream:api", due), due)
    assert state.snapshot.upstreams["api"] == API, "kept: Consul may not have confirmed the nodes yet"
    assert kinds(effects) == ["Log", "SetTimer"]
    assert "vanished" in effects[0].message  # type: ignore[union-attr]
    grace_due = (late - 5) + core.GRACE
    state, effects = core.step(state, core.TimerFired("upstream:api:grace", grace_due), grace_due)
    assert state.snapshot.upstreams["api"] == ()
    assert state.snapshot.protocols["api"] == "http", "what it speaks is remembered while it has no instance"
    assert core.Metric("endpoints", "set", 0, (("service", "api"),)) in effects


def test_an_invalid_policy_is_refused_and_the_last_good_one_kept() -> None:
    good = json.dumps({"authorization": {"default_action": "allow"}}).encode()
    state, effects = core.step(fresh(), core.PolicyAnswer(good), 50.0)
    assert state.snapshot.policy.authorization.default_action == "allow"
    assert core.Metric("policy_valid", "set", 1) in effects
    state, effects = core.step(state, core.PolicyAnswer(b'{"version": 7}'), 60.0)
    assert state.snapshot.policy.authorization.default_action == "allow"
    assert state.policy_error.startswith("Consul KV meshvm/policy/mesh")
    assert core.Metric("policy_valid", "set", 0) in effects
    assert core.Metric("errors", "inc", 1, (("kind", "policy"),)) in effects
    state, effects = core.step(state, core.PolicyAnswer(None), 70.0)
    assert state.snapshot.policy.authorization.default_action == "deny", "no policy stored: the default"
    assert state.policy_error == ""


def test_watch_health_marks_outages() -> None:
    state, effects = core.step(fresh(), core.WatchHealth("roots", ok=False, error="refused"), 10.0)
    assert state.last_outage == 10.0
    assert state.unhealthy == {"roots": "refused"}
    assert core.Metric("consul_up", "set", 0) in effects
    state, effects = core.step(state, core.WatchHealth("roots", ok=True), 11.0)
    assert state.unhealthy == {}
    assert state.last_outage == 10.0
    assert effects == (core.Metric("consul_up", "set", 1),)


def test_a_leaf_seen_again_changes_nothing() -> None:
    leaf = Leaf("web", "cert", "key", "01", "2026-12-02")
    state, effects = core.step(fresh(), core.LeafAnswer(leaf), 1.0)
    assert state.snapshot.leaves["web"] == leaf
    assert kinds(effects) == ["Metric", "Log", "Render"]
    assert core.step(state, core.LeafAnswer(leaf), 2.0) == (state, ())
