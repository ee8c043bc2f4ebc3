"""Connecting to the cluster and applying manifests, shared by the lab, `meshvm rbac --apply` and `meshvm join`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from meshvm.errors import ConfigError, MeshvmError, OperationFailedError, PeerUnreachableError

log = logging.getLogger(__name__)
FIELD_MANAGER = "meshvm"
RBAC_HINT = "grant the identity `meshvm rbac` (or use a kubeconfig that has it)"
T = TypeVar("T")


def api_client(kubeconfig: Path | None = None, context: str | None = None) -> Any:
    """An ApiClient for ``kubeconfig`` (or the in-cluster / default config when None)."""
    from kubernetes import client, config

    if kubeconfig is not None and not kubeconfig.exists():
        raise ConfigError(f"kubeconfig {kubeconfig} does not exist", hint="pass --kubeconfig with a readable file")
    configuration = client.Configuration()
    try:
        config.load_kube_config(
            config_file=str(kubeconfig) if kubeconfig else None, context=context, client_configuration=configuration
        )
    except config.ConfigException as exc:
        raise ConfigError(f"kubeconfig {kubeconfig or '~/.kube/config'}: {exc}") from exc
    return client.ApiClient(configuration)


def call(what: str, fn: Callable[[], T], *, forbidden_hint: str = RBAC_HINT) -> T:
    """Run one API call. What no caller can handle becomes one meshvm error naming ``what``: credentials the API
    server does not accept (401, exit 2), a refusal (403), a server that does not answer (exit 3). Other API errors
    (404, 409, ...) are raised as they are, for the caller to handle."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn()
    except ApiException as exc:
        if exc.status == 401:
            raise ConfigError(
                f"Kubernetes did not accept the kubeconfig's credentials ({what}): 401 unauthorized",
                hint="the token or certificate is expired or revoked: get a current kubeconfig",
            ) from exc
        if exc.status == 403:
            raise OperationFailedError(f"Kubernetes refused {what}: 403 forbidden", hint=forbidden_hint) from exc
        raise
    except HTTPError as exc:
        raise PeerUnreachableError(f"kube-apiserver unreachable ({what}): {exc}") from exc


def call_or_fail(
    what: str, fn: Callable[[], T], *, not_found: MeshvmError | None = None, forbidden_hint: str = RBAC_HINT
) -> T:
    """:func:`call`, with every other API error one line too: 404 as ``not_found`` when given, the rest as an
    operation that failed."""
    from kubernetes.client.exceptions import ApiException

    try:
        return call(what, fn, forbidden_hint=forbidden_hint)
    except ApiException as exc:
        if exc.status == 404 and not_found is not None:
            raise not_found from exc
        raise OperationFailedError(f"{what}: {exc.status} {exc.reason}") from exc


def apply(api: Any, manifests: list[dict[str, Any]]) -> list[str]:
    """Server-side apply each manifest; returns ``kind/name`` of each, in order."""
    from kubernetes import dynamic
    from kubernetes.client.exceptions import ApiException

    dyn = call("reading the API's discovery", lambda: dynamic.DynamicClient(api))
    applied = []
    for manifest in manifests:
        kind, meta = manifest["kind"], manifest["metadata"]
        resource = dyn.resources.get(api_version=manifest["apiVersion"], kind=kind)
        try:
            call(
                f"applying {kind}/{meta['name']}",
                functools.partial(
                    resource.server_side_apply,
                    body=manifest,
                    name=meta["name"],
                    namespace=meta.get("namespace"),
                    field_manager=FIELD_MANAGER,
                    force_conflicts=True,
                ),
            )
        except ApiException as exc:
            raise OperationFailedError(f"applying {kind}/{meta['name']} failed: {exc.status} {exc.reason}") from exc
        applied.append(f"{kind}/{meta['name']}")
        log.debug("applied %s/%s", kind, meta["name"])
    return applied
