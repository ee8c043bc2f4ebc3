"""Consul's HTTP API for everything but the agent's watches, over py-consul: registration, node health, the
policy key (check-and-set), ACL policies and tokens.

Every method raises :class:`meshvm.errors.PeerUnreachableError` when Consul cannot be reached and
:class:`meshvm.errors.OperationFailedError` when it answers with an error, so callers handle two cases only.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import consul
import requests

from meshvm.config import AgentConfig, CheckSpec, ConsulSpec, ServiceSpec
from meshvm.consul.failures import server_error
from meshvm.errors import OperationFailedError, PeerUnreachableError
from meshvm.values import consul_duration

log = logging.getLogger(__name__)
T = TypeVar("T")
Indexed = tuple[int, T]


@contextmanager
def _translate(what: str, address: str) -> Iterator[None]:
    try:
        yield
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise PeerUnreachableError(
            f"Consul at {address} is unreachable ({what})", hint="is the Consul agent running and the address right?"
        ) from exc
    except consul.ACLPermissionDenied as exc:
        raise OperationFailedError(
            f"Consul refused {what}: permission denied", hint="the ACL token lacks the rights for it"
        ) from exc
    except consul.ConsulException as exc:
        # py-consul words a 5xx as "<status> <body>".
        status, _, text = str(exc).partition(" ")
        if status.isdigit() and 500 <= int(status) < 600:
            raise server_error(what, int(status), text) from exc
        raise OperationFailedError(f"Consul failed {what}: {exc}") from exc


class ConsulClient:
    def __init__(self, spec: ConsulSpec, token: str | None = None) -> None:
        host, port = spec.http_addr.rsplit(":", 1)
        self.address = spec.http_addr
        self.wait = consul_duration(spec.blocking_wait)
        verify: bool | str = str(spec.ca_file) if spec.ca_file else True
        self.api = consul.Consul(host=host, port=int(port), scheme=spec.scheme, token=token, verify=verify)

    @classmethod
    def for_agent(cls, config: AgentConfig) -> ConsulClient:
        return cls(config.consul, config.consul.token())

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        with _translate(what, self.address):
            return fn()

    # --- status ------------------------------------------------------------------------------------------

    def leader(self) -> str:
        return str(self._call("status/leader", self.api.status.leader))

    def datacenter(self) -> str:
        me = self._call("agent/self", self.api.agent.self)
        return str(me["Config"]["Datacenter"])

    def version(self) -> str:
        me = self._call("agent/self", self.api.agent.self)
        return str(me["Config"]["Version"])

    # --- registration ------------------------------------------------------------------------------------

    @staticmethod
    def _app_check(service: ServiceSpec, check: CheckSpec) -> dict[str, Any] | None:
        target = f"{service.address}:{service.port}"
        common = {
            "Name": f"{service.name} application",
            "Interval": consul_duration(check.interval),
            "Timeout": consul_duration(check.timeout),
            "DeregisterCriticalServiceAfter": consul_duration(check.deregister_critical_after),
        }
        if check.type == "http":
            return {**common, "HTTP": f"http://{target}{check.path}"}
        if check.type == "tcp":
            return {**common, "TCP": target}
        if check.type == "grpc":
            return {**common, "GRPC": target, "GRPCUseTLS": False}
        return None

    def register(self, config: AgentConfig) -> None:
        """Register each local service with its check, and its sidecar (alias of the app + Envoy's listener)."""
        for service in config.services:
            meta = {**service.meta, "protocol": service.protocol, "managed-by": "meshvm"}
            if service.version:
                meta["version"] = service.version
            if config.locality is not None:
                meta |= {"region": config.locality.region, "zone": config.locality.zone}
            common = {"address": config.address, "tags": service.tags, "meta": meta, "replace_existing_checks": True}
            self._register(service.name, port=service.port, check=self._app_check(service, service.check), **common)
            sidecar_checks = [
                {
                    "Name": f"{service.name} sidecar listener",
                    "TCP": f"{config.address}:{service.mesh_port}",
                    "Interval": "1s",
                    "Timeout": "1s",
                    "DeregisterCriticalServiceAfter": "5m",
                },
            ]
            proxy = {
                "DestinationServiceName": service.name,
                "DestinationServiceID": service.name,
                "LocalServiceAddress": service.address,
                "LocalServicePort": service.port,
                "Upstreams": [
                    {"DestinationName": u.service, "LocalBindPort": u.local_port, "LocalBindAddress": "127.0.0.1"}
                    for u in service.upstreams
                ],
            }
            self._register(
                service.sidecar_id,
                port=service.mesh_port,
                check={"Name": f"{service.name} application alive", "AliasService": service.name},
                extra_checks=sidecar_checks,
                kind="connect-proxy",
                proxy=proxy,
                **common,
            )

    def _register(self, service_id: str, **fields: Any) -> None:
        """One service in the local agent, under ``service_id`` as both its name and its id."""
        register = functools.partial(self.api.agent.service.register, service_id, service_id=service_id, **fields)
        self._call(f"registering {service_id}", register)

    def deregister(self, config: AgentConfig) -> None:
        for service in config.services:
            for service_id in (service.sidecar_id, service.name):
                self._call(
                    f"deregistering {service_id}", functools.partial(self.api.agent.service.deregister, service_id)
                )

    def node_checks(self, node: str) -> list[dict[str, Any]]:
        """Every check of ``node`` (its services' and serfHealth), as Consul's /v1/health/node lists them."""
        _index, checks = self._call(f"health of node {node}", functools.partial(self.api.health.node, node))
        return list(checks or [])

    def ensure_acl_policy(self, name: str, rules: dict[str, Any]) -> None:
        """The ACL policy ``name`` with ``rules`` (Consul's rules in their JSON form): made if missing, its rules
        set again if they differ."""
        policies = self._acl_policies()
        if name not in policies:
            try:
                create = functools.partial(self.api.acl.policy.create, name, rules=rules)
                self._call(f"creating ACL policy {name}", create)
                return
            except OperationFailedError:
                # Several hosts' runs make the same policy at once: the one that lost finds it made (Consul 1.8
                # answers it with a 500, "already exists").
                policies = self._acl_policies()
                if name not in policies:
                    raise
        policy_id = policies[name]["ID"]
        current = self._call(f"reading ACL policy {name}", functools.partial(self.api.acl.policy.read, policy_id))
        try:
            same = json.loads(current.get("Rules") or "{}") == rules
        except ValueError:  # rules written in HCL by someone else
            same = False
        if not same:
            update = functools.partial(self.api.acl.policy.update, policy_id, name, rules=rules)
            self._call(f"updating ACL policy {name}", update)

    def _acl_policies(self) -> dict[str, dict[str, Any]]:
        """Every ACL policy (without rules) by name."""
        return {p["Name"]: p for p in self._call("listing ACL policies", self.api.acl.policy.list)}

    def create_acl_token(self, name: str, rules: dict[str, Any], description: str) -> str:
        """A new token holding the ACL policy ``name`` (made with ``rules`` if missing); returns its secret."""
        self.ensure_acl_policy(name, rules)
        token = self._call(
            f"creating an ACL token for {name}",
            functools.partial(self.api.acl.token.create, description=description, policies_name=[name]),
        )
        return str(token["SecretID"])

    def acl_token(self, accessor_id: str) -> dict[str, Any] | None:
        """The token with ``accessor_id`` (its secret included, for a token with acl:write), or None."""
        with _translate(f"reading ACL token {accessor_id}", self.address):
            try:
                return dict(self.api.acl.token.read(accessor_id))
            except consul.NotFound:
                return None
            except consul.ACLPermissionDenied as exc:
                # Consul 1.8 answers a token it does not have with 403 "ACL not found"; newer ones with 404.
                if "not found" in str(exc).lower():
                    return None
                raise

    def put_acl_token(self, accessor_id: str, *, exists: bool, **fields: Any) -> dict[str, Any]:
        """Create the token ``accessor_id`` (``exists`` False), or replace what it holds, with ``fields``
        (py-consul's arguments of ``acl.token.create``: description, policies_name, node_identities,
        service_identities). An existing token keeps its secret. Returns the token as Consul now has it."""
        write = (
            functools.partial(self.api.acl.token.update, accessor_id, **fields)
            if exists
            else functools.partial(self.api.acl.token.create, accessor_id=accessor_id, **fields)
        )
        return dict(self._call(f"writing ACL token {fields.get('description') or accessor_id}", write))

    def delete_acl_token(self, accessor_id: str) -> bool:
        """Delete the token if it exists; True if it did."""
        if self.acl_token(accessor_id) is None:
            return False
        self._call(f"deleting ACL token {accessor_id}", functools.partial(self.api.acl.token.delete, accessor_id))
        return True

    def registered(self) -> dict[str, Any]:
        return dict(self._call("agent/services", self.api.agent.services))

    def kv_get(self, key: str, index: int = 0) -> tuple[int, bytes | None, int]:
        """(index, value or None, modify index of the key or 0 when it does not exist)."""

        def get() -> tuple[Any, Any]:
            if index:
                return self.api.kv.get(key, index=index, wait=self.wait)  # type: ignore[no-any-return]
            return self.api.kv.get(key)  # type: ignore[no-any-return]

        new_index, item = self._call(f"kv get {key}", get)
        if item is None:
            return int(new_index or 0), None, 0
        return int(new_index), item["Value"] or b"", int(item["ModifyIndex"])

    def kv_cas(self, key: str, value: bytes, modify_index: int) -> bool:
        """Check-and-set: True when written; False when someone changed the key since ``modify_index``."""
        return bool(self._call(f"kv put {key}", lambda: self.api.kv.put(key, value, cas=modify_index)))
