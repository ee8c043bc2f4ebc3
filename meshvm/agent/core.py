"""The agent's decisions, as a pure function: ``step(state, event, now) -> (state, effects)``.

Every answer a watch brings (Consul, the policy key, the Istio identity), every watch failure and every timer that
fires is an :class:`Event`; :func:`step` returns the new :class:`State` (whose ``snapshot`` is what Envoy's
resources are rendered from) and the :class:`Effect` s for the shell to carry out: set a timer, render, log, move a
metric. No clock, no thread, no socket here, so each rule is a unit test.

The rules that need time are about Consul coming back after an outage: its answers can flap between stale, empty
and current for several seconds (a restarted server replaying its log, ACLs and the CA not loaded yet, gossip not
confirming nodes). Envoy keeps the last good state meanwhile: within ``SETTLE_WINDOW`` of an outage a change is
applied only once Consul's answer has stayed the same for ``SETTLE_QUIET``, and something we had that vanishes
within ``GRACE`` is only let go then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meshvm.envoy.snapshot import Instance, Leaf, Roots, Snapshot
from meshvm.errors import MeshvmError
from meshvm.policy import POLICY_KEY, AuthorizationRule, MeshPolicy, parse_policy_json

SETTLE_WINDOW = 30.0  # seconds after a Consul outage during which answers must settle before use
SETTLE_QUIET = 3.0  # ... settled meaning: unchanged for this long
GRACE = 15.0  # seconds after a Consul outage during which "it is gone" is not believed

# --- events -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstreams:
    service: str
    instances: tuple[Instance, ...]


@dataclass(frozen=True)
class LeafAnswer:
    leaf: Leaf


@dataclass(frozen=True)
class RootsAnswer:
    roots: Roots


@dataclass(frozen=True)
class Intentions:
    rules: tuple[AuthorizationRule, ...]


@dataclass(frozen=True)
class PolicyAnswer:
    raw: bytes | None  # None: no policy stored


@dataclass(frozen=True)
class IstioIdentity:
    leaf: Leaf
    roots: Roots


@dataclass(frozen=True)
class WatchHealth:
    key: str
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class TimerFired:
    key: str
    due: float


Event = Upstreams | LeafAnswer | RootsAnswer | Intentions | PolicyAnswer | IstioIdentity | WatchHealth | TimerFired

# --- effects ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetTimer:
    """Fire ``TimerFired(key, due)`` at ``due`` (replacing a pending timer of that key)."""

    key: str
    due: float


@dataclass(frozen=True)
class Render:
    """The snapshot changed: render it."""


@dataclass(frozen=True)
class Log:
    level: str  # "info", "warning", "error"
    message: str


@dataclass(frozen=True)
class Metric:
    name: str  # an AgentMetrics attribute
    op: str  # "set" or "inc"
    value: float = 1.0
    labels: tuple[tuple[str, str], ...] = ()


Effect = SetTimer | Render | Log | Metric

# --- state --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    snapshot: Snapshot
    last_outage: float = float("-inf")  # when a watch last failed (the shell's monotonic clock)
    latest_upstreams: Mapping[str, tuple[Instance, ...]] = field(default_factory=dict)  # as Consul last said
    latest_policy: bytes | None = None
    unhealthy: Mapping[str, str] = field(default_factory=dict)  # watch key -> its error
    timers: Mapping[str, float] = field(default_factory=dict)  # pending timers: key -> due
    policy_error: str = ""  # why the policy in KV is refused ("" while it is accepted)


def initial(snapshot: Snapshot) -> State:
    return State(snapshot=snapshot)


# --- the rules ----------------------------------------------------------------------------------------------


def _changed(state: State, **fields: Any) -> tuple[State, list[Effect]]:
    snapshot = state.snapshot
    if all(getattr(snapshot, name) == value for name, value in fields.items()):
        return state, []
    return replace(state, snapshot=replace(snapshot, **fields)), [Render()]


def _timer(state: State, key: str, due: float, *, restart: bool) -> tuple[State, list[Effect]]:
    """Schedule ``key`` at ``due``; ``restart`` pushes a pending one back, otherwise a pending one stays."""
    if key in state.timers and not restart:
        return state, []
    return replace(state, timers={**state.timers, key: due}), [SetTimer(key, due)]


def _settled(state: State, key: str, now: float, commit: Any) -> tuple[State, list[Effect]]:
    """Commit now, or, within the settle window after an outage, once the answer has been quiet for a while."""
    if now - state.last_outage < SETTLE_WINDOW:
        return _timer(state, key, now + SETTLE_QUIET, restart=True)
    result: tuple[State, list[Effect]] = commit(state, now)
    return result


def _kept_through_grace(state: State, what: str, key: str, now: float) -> tuple[State, list[Effect]] | None:
    """Something we had vanished right after Consul came back: keep it until the grace period ends."""
    since = now - state.last_outage
    if since >= GRACE:
        return None
    warning = Log(
        "warning",
        f"{what} vanished from Consul just after reconnecting; keeping the last good one for up to "
        f"{GRACE - since:.0f}s",
    )
    state, effects = _timer(state, f"{key}:grace", now + GRACE - since, restart=False)
    return state, [warning, *effects]


def _commit_upstream(service: str) -> Any:
    def commit(state: State, now: float) -> tuple[State, list[Effect]]:
        instances = state.latest_upstreams.get(service, ())
        known = bool(state.snapshot.upstreams.get(service))
        if not instances and known:
            kept = _kept_through_grace(state, f"every instance of {service}", f"upstream:{service}", now)
            if kept is not None:
                return kept
        effects: list[Effect] = [Metric("endpoints", "set", sum(i.healthy for i in instances), (("service", service),))]
        snapshot = state.snapshot
        fields: dict[str, Any] = {}
        if snapshot.upstreams.get(service) != instances:
            fields["upstreams"] = {**snapshot.upstreams, service: instances}
        # Remember what the destination speaks even when it has no instance for a while: a listener that flipped
        # to TCP and back on every outage would drop connections twice.
        protocols = {i.meta_dict().get("protocol") for i in instances} - {None}
        if len(protocols) == 1 and snapshot.protocols.get(service) not in protocols:
            fields["protocols"] = {**snapshot.protocols, service: protocols.pop()}
        state, more = _changed(state, **fields) if fields else (state, [])
        return state, effects + more

    return commit


def _commit_policy(state: State, now: float) -> tuple[State, list[Effect]]:
    raw = state.latest_policy
    if raw is None and state.snapshot.policy != MeshPolicy():
        kept = _kept_through_grace(state, "the mesh policy", "policy", now)
        if kept is not None:
            return kept
    key = f"{state.snapshot.config.consul.policy_prefix}/{POLICY_KEY}"
    if raw is None:
        policy = MeshPolicy()
    else:
        try:
            policy = parse_policy_json(raw, f"Consul KV {key}")
        except MeshvmError as exc:
            # Refuse it, keep serving the last good policy, and make the refusal visible.
            refused = replace(state, policy_error=str(exc))
            return refused, [
                Metric("policy_valid", "set", 0),
                Metric("errors", "inc", 1, (("kind", "policy"),)),
                Log("error", f"refusing the policy in Consul KV, keeping the last good one: {exc}"),
            ]
    state, effects = _changed(replace(state, policy_error=""), policy=policy)
    return state, [Metric("policy_valid", "set", 1), *effects]


def _on_leaf(state: State, leaf: Leaf) -> tuple[State, list[Effect]]:
    if state.snapshot.leaves.get(leaf.service) == leaf:
        return state, []
    state, effects = _changed(state, leaves={**state.snapshot.leaves, leaf.service: leaf})
    message = f"leaf certificate for {leaf.service}: serial {leaf.serial}, valid until {leaf.valid_before}"
    return state, [Metric("leaf_rotations", "inc", 1, (("service", leaf.service),)), Log("info", message), *effects]


def _on_health(state: State, event: WatchHealth, now: float) -> tuple[State, list[Effect]]:
    unhealthy = {k: v for k, v in state.unhealthy.items() if k != event.key}
    if not event.ok:
        unhealthy[event.key] = event.error
    state = replace(state, unhealthy=unhealthy, last_outage=state.last_outage if event.ok else now)
    effects: list[Effect] = [Metric("consul_up", "set", 0 if unhealthy else 1)]
    if not event.ok:
        effects.append(Metric("errors", "inc", 1, (("kind", "consul"),)))
    return state, effects


def _on_timer(state: State, event: TimerFired, now: float) -> tuple[State, list[Effect]]:
    if state.timers.get(event.key) != event.due:
        return state, []  # replaced by a later timer of the same key
    state = replace(state, timers={k: v for k, v in state.timers.items() if k != event.key})
    base = event.key.removesuffix(":grace")
    if base == "policy":
        return _commit_policy(state, now)
    if base.startswith("upstream:"):
        result: tuple[State, list[Effect]] = _commit_upstream(base.removeprefix("upstream:"))(state, now)
        return result
    return state, [Log("warning", f"a timer nobody set fired: {event.key}")]


def step(state: State, event: Event, now: float) -> tuple[State, tuple[Effect, ...]]:
    """The agent's whole reaction to ``event`` at ``now``."""
    effects: list[Effect]
    match event:
        case Upstreams(service, instances):
            state = replace(state, latest_upstreams={**state.latest_upstreams, service: instances})
            state, effects = _settled(state, f"upstream:{service}", now, _commit_upstream(service))
        case PolicyAnswer(raw):
            state = replace(state, latest_policy=raw)
            state, effects = _settled(state, "policy", now, _commit_policy)
        case LeafAnswer(leaf):
            state, effects = _on_leaf(state, leaf)
        case RootsAnswer(roots):
            state, effects = _changed(state, roots=roots)
        case Intentions(rules):
            state, effects = _changed(state, intentions=rules)
        case IstioIdentity(leaf, roots):
            state, effects = _changed(state, istio_leaf=leaf, istio_roots=roots)
        case WatchHealth():
            state, effects = _on_health(state, event, now)
        case TimerFired():
            state, effects = _on_timer(state, event, now)
    return state, tuple(effects)
