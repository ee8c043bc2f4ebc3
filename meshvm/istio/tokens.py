"""Kubernetes ServiceAccount tokens for a VM's Istio identity, minted by the VM itself (TokenRequest).

The VM keeps one *refresh token*: a token of its workload's ServiceAccount for the API server's own audience,
bound to a per-VM Secret. RBAC lets that ServiceAccount do exactly one thing: create tokens for itself
(``serviceaccounts/token``, resourceNames: itself). With it the VM mints

* a short ``istio-ca`` token each time it asks istiod for a certificate, and
* a new refresh token (bound to the same Secret) before the current one is half spent,

so nothing expires while the VM runs, a reboot finds a valid token on disk, and deleting the Secret revokes every
token of that VM at once (the API server refuses tokens whose bound object is gone).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from meshvm.errors import OperationFailedError, PeerUnreachableError

ISTIO_AUDIENCE = "istio-ca"
CA_TOKEN_SECONDS = 600  # the shortest the API server issues
TIMEOUT = 10.0


@dataclass(frozen=True)
class Token:
    value: str
    issued: dt.datetime
    expires: dt.datetime

    def refresh_after(self) -> dt.datetime:
        return self.issued + (self.expires - self.issued) / 2

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.expires


def parse(value: str) -> Token:
    """Read ``iat``/``exp`` from a JWT's claims (our own token: nothing to verify here, the API server does)."""
    try:
        payload = value.strip().split(".")[1]
        claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        issued = dt.datetime.fromtimestamp(int(claims["iat"]), dt.UTC)
        expires = dt.datetime.fromtimestamp(int(claims["exp"]), dt.UTC)
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise OperationFailedError("the Istio refresh token is not a ServiceAccount token (JWT with iat/exp)") from exc
    return Token(value=value.strip(), issued=issued, expires=expires)


def read(path: Path) -> Token | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OperationFailedError(f"reading the Istio refresh token {path}: {exc.strerror}") from exc
    return parse(text) if text.strip() else None


@dataclass(frozen=True)
class TokenMinter:
    """TokenRequest for the VM's own ServiceAccount, authenticated by the refresh token."""

    api: str  # https://host:port
    ca_file: Path
    namespace: str
    service_account: str
    bound_secret: str

    def mint(self, refresh: Token, *, audiences: list[str] | None, seconds: int) -> Token:
        spec: dict[str, Any] = {
            "expirationSeconds": seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Secret", "name": self.bound_secret},
        }
        if audiences:
            spec["audiences"] = audiences
        url = f"{self.api}/api/v1/namespaces/{self.namespace}/serviceaccounts/{self.service_account}/token"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        try:
            answer = requests.post(
                url,
                json=body,
                headers={"Authorization": f"Bearer {refresh.value}"},
                verify=str(self.ca_file),
                timeout=TIMEOUT,
            )
        except requests.RequestException as exc:
            raise PeerUnreachableError(f"kube-apiserver at {self.api} is unreachable (TokenRequest): {exc}") from exc
        if answer.status_code != 201:
            reason = (
                answer.json().get("message", "")
                if answer.headers.get("content-type", "").startswith("application/json")
                else answer.text[:200]
            )
            raise OperationFailedError(
                f"kube-apiserver refused a token for {self.namespace}/{self.service_account}: "
                f"{answer.status_code} {reason}".strip(),
                hint="the refresh token expired or was revoked (its Secret deleted): run `meshvm join` for this VM",
            )
        return parse(str(answer.json()["status"]["token"]))
