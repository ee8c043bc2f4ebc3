"""Connecting to the cluster and applying manifests, shared by the lab, `meshvm rbac --apply` and `meshvm join`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from meshvm.errors import ConfigError, OperationFailedError, PeerUnreachableError

log = logging.getLogger(__name__)
FIELD_MANAGER = "meshvm"


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


def apply(api: Any, manifests: list[dict[str, Any]]) -> list[str]:
    """Server-side apply each manifest; returns ``kind/name`` of each, in order."""
    from kubernetes import dynamic
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        dyn = dynamic.DynamicClient(api)
    except HTTPError as exc:
        raise PeerUnreachableError(f"kube-apiserver at {api.configuration.host} did not answer: {exc}") from exc
    applied = []
    for manifest in manifests:
        kind, meta = manifest["kind"], manifest["metadata"]
        resource = dyn.resources.get(api_version=manifest["apiVersion"], kind=kind)
        try:
            resource.server_side_apply(
                body=manifest,
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except ApiException as exc:
            raise OperationFailedError(f"applying {kind}/{meta['name']} failed: {exc.status} {exc.reason}") from exc
        applied.append(f"{kind}/{meta['name']}")
        log.debug("applied %s/%s", kind, meta["name"])
    return applied
