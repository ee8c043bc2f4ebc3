"""The least privilege meshvm needs in the cluster: only its own kinds, only in one namespace."""

from __future__ import annotations

from typing import Any

REGISTRAR = "meshvm-registrar"
MANAGED_BY = {"app.kubernetes.io/managed-by": "meshvm"}

# Every resource and verb `meshvm join/leave/status/prune` uses, and nothing else.
RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "resources": ["services"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    },
    {
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    },
    {
        "apiGroups": ["networking.istio.io"],
        "resources": ["workloadentries", "serviceentries"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    },
    {
        "apiGroups": [""],
        "resources": ["configmaps", "secrets"],
        "resourceNames": ["meshvm-bootstrap"],
        "verbs": ["get"],
    },
    # --mesh istio: each VM's identity. Its ServiceAccount, the Role that lets that account mint its own tokens
    # (granting it needs the right itself, hence serviceaccounts/token), the Secret its tokens are bound to
    # (created and deleted by name, never read or listed), the first token, and Istio's root to give the VM.
    {
        "apiGroups": [""],
        "resources": ["serviceaccounts"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
    {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["istio-ca-root-cert"], "verbs": ["get"]},
]


def manifests(namespace: str, *, user: str | None = None) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding for the registrar; ``user`` also binds a token-file user (the lab)."""
    subjects: list[dict[str, Any]] = [{"kind": "ServiceAccount", "name": REGISTRAR, "namespace": namespace}]
    if user is not None:
        subjects.append({"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"})
    meta = {"namespace": namespace, "labels": dict(MANAGED_BY)}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": dict(MANAGED_BY)}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": REGISTRAR, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": REGISTRAR, **meta},
            "rules": RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": REGISTRAR, **meta},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": REGISTRAR},
            "subjects": subjects,
        },
    ]
