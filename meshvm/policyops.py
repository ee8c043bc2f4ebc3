"""`meshvm policy get|diff|apply`: the mesh policy in Consul KV, always validated, written with check-and-set."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from meshvm.consul.client import ConsulClient
from meshvm.errors import ConfigError, OperationFailedError
from meshvm.policy import POLICY_KEY, MeshPolicy, parse_policy_json


def policy_key(prefix: str) -> str:
    return f"{prefix}/{POLICY_KEY}"


@dataclass(frozen=True)
class Stored:
    """The policy document in KV: canonical text when valid, raw text (and the reason) when not."""

    text: str
    modify_index: int
    exists: bool
    error: str | None = None


def read(client: ConsulClient, prefix: str) -> Stored:
    key = policy_key(prefix)
    _, raw, modify_index = client.kv_get(key)
    if raw is None:
        return Stored(text="", modify_index=0, exists=False)
    try:
        return Stored(text=parse_policy_json(raw, f"Consul KV {key}").to_json(), modify_index=modify_index, exists=True)
    except ConfigError as exc:
        # A corrupt stored value must not block a fix: diff against its raw text and replace it.
        return Stored(text=raw.decode(errors="replace"), modify_index=modify_index, exists=True, error=str(exc))


def diff(stored: Stored, new: MeshPolicy, prefix: str) -> str:
    return "".join(
        difflib.unified_diff(
            stored.text.splitlines(keepends=True),
            new.to_json().splitlines(keepends=True),
            fromfile=f"consul:{policy_key(prefix)}",
            tofile="policy (new)",
        )
    )


def apply(client: ConsulClient, new: MeshPolicy, prefix: str) -> str:
    """Write ``new`` unless identical, failing if anybody wrote in between (check-and-set); returns the diff."""
    stored = read(client, prefix)
    text = diff(stored, new, prefix)
    if not text:
        return ""
    # cas=0 means "only if the key does not exist yet".
    if not client.kv_cas(policy_key(prefix), new.to_json().encode(), stored.modify_index):
        raise OperationFailedError(
            f"the policy at {policy_key(prefix)} changed while it was being applied",
            hint="run `meshvm policy diff` and apply again",
        )
    return text
