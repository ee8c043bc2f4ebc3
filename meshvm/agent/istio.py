"""The agent's Istio identity: carries out what :mod:`meshvm.istio.renewal` decides, with the I/O it needs.

On start it loads the VM's key, certificate and refresh token from ``istio.credentials_dir`` (so a restart or a
reboot needs nobody), then keeps them current: a new key and certificate from istiod's CA at half the certificate's
life, authenticated by a short ``istio-ca`` token the VM mints for itself; the refresh token renewed at half its
life. When the API server cannot be reached but the certificate is still valid, the renewal authenticates with
that certificate instead (istiod accepts its own workload certificates), so an API outage never stops rotation.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from meshvm.agent.metrics import AgentMetrics
from meshvm.config import IstioSpec
from meshvm.envoy.snapshot import Leaf, Roots
from meshvm.errors import MeshvmError, OperationFailedError, PeerUnreachableError
from meshvm.fsutil import atomic_write
from meshvm.istio import ca, identity, renewal, tokens

log = logging.getLogger(__name__)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class IstioIdentity:
    """One VM's Istio workload identity. ``publish`` receives each new (leaf, roots) for the Envoy snapshot."""

    def __init__(
        self,
        spec: IstioSpec,
        publish: Callable[[Leaf, Roots], None],
        metrics: AgentMetrics,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self.spec = spec
        self.publish = publish
        self.metrics = metrics
        self.clock = clock
        self.minter = tokens.TokenMinter(
            api=spec.kube_api,
            ca_file=spec.kube_ca_file,
            namespace=spec.namespace,
            service_account=spec.service_account,
            bound_secret=spec.token_secret,
        )
        self.state = renewal.State()
        self._key_pem = ""

    # --- what is on disk -------------------------------------------------------------------------------------

    def _root_pem(self) -> str:
        try:
            return self.spec.root_cert_file.read_text()
        except OSError as exc:
            raise OperationFailedError(f"istio.root_cert_file {self.spec.root_cert_file}: {exc.strerror}") from exc

    def load(self) -> None:
        """Take up where the last run left off: the certificate (if it is for our key) and the refresh token."""
        spec = self.spec
        token = tokens.read(spec.token_file)
        certificate = None
        try:
            key_pem, chain = spec.key_file.read_text(), spec.cert_file.read_text()
        except FileNotFoundError:
            key_pem = chain = ""
        if key_pem and chain:
            try:
                certificate = identity.parse_chain(chain, identity.load_key(key_pem))
            except (MeshvmError, ValueError) as exc:
                log.warning("ignoring the Istio certificate on disk: %s", exc)
            else:
                self._key_pem = key_pem
        self.state = renewal.State(certificate=certificate, token=token)
        now = self.clock()
        if certificate is not None and not certificate.expired(now):
            self._publish(certificate)
        log.info(
            "Istio identity %s: certificate %s, refresh token %s",
            spec.identity,
            f"valid until {certificate.not_after:%Y-%m-%d %H:%M:%S}Z" if certificate else "none yet",
            f"valid until {token.expires:%Y-%m-%d %H:%M:%S}Z" if token else "missing",
        )

    def _publish(self, certificate: identity.Certificate) -> None:
        roots = Roots(self.spec.trust_domain, (self._root_pem(),))
        self.publish(Leaf("istio", certificate.chain_pem, self._key_pem, certificate.serial), roots)
        self.metrics.istio_cert_expiry.set(certificate.not_after.timestamp())

    # --- the steps -------------------------------------------------------------------------------------------

    def refresh_token(self) -> tokens.Token:
        current = self.state.token
        if current is None:
            raise OperationFailedError(f"no Istio refresh token in {self.spec.token_file}")
        fresh = self.minter.mint(current, audiences=None, seconds=int(self.spec.token_lifetime))
        atomic_write(self.spec.token_file, fresh.value + "\n", mode=0o600)
        log.info("Istio refresh token renewed, valid until %s", fresh.expires.isoformat(timespec="seconds"))
        self.metrics.istio_token_refreshes.inc()
        self.metrics.istio_token_expiry.set(fresh.expires.timestamp())
        return fresh

    def _credentials(self, now: dt.datetime) -> ca.Credentials:
        """A fresh istio-ca token; if the API server is away, the still valid certificate (mTLS) instead."""
        token, certificate = self.state.token, self.state.certificate
        valid = certificate is not None and not certificate.expired(now) and self._key_pem
        try:
            if token is None or token.expired(now):
                raise OperationFailedError(f"no valid Istio refresh token in {self.spec.token_file}")
            minted = self.minter.mint(token, audiences=[tokens.ISTIO_AUDIENCE], seconds=tokens.CA_TOKEN_SECONDS)
            return ca.Credentials(token=minted.value)
        except (PeerUnreachableError, OperationFailedError) as exc:
            if not valid or certificate is None:
                raise
            log.warning("renewing with the current Istio certificate: %s", exc)
            return ca.Credentials(cert_chain_pem=certificate.chain_pem, key_pem=self._key_pem)

    def renew_certificate(self) -> identity.Certificate:
        spec, now = self.spec, self.clock()
        credentials = self._credentials(now)
        key = identity.new_key()
        chain = ca.create_certificate(
            spec.istiod_address,
            self._root_pem(),
            identity.csr_pem(key, spec.identity),
            credentials,
            validity_seconds=int(spec.cert_lifetime),
            server_name=spec.istiod_name,
            cluster_id=spec.cluster_id,
        )
        certificate = identity.parse_chain(chain, key)
        if certificate.identity != spec.identity:
            raise OperationFailedError(
                f"istiod issued {certificate.identity}, not {spec.identity}",
                hint="the token is for another ServiceAccount: check istio.namespace and istio.service_account",
            )
        key_pem = identity.key_pem(key)
        spec.credentials_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Key first: a crash between the writes leaves a certificate that load() rejects for its key, not the
        # other way round.
        atomic_write(spec.key_file, key_pem, mode=0o600)
        atomic_write(spec.cert_file, certificate.chain_pem, mode=0o600)
        self._key_pem = key_pem
        self.metrics.istio_renewals.inc(credential="token" if credentials.token else "certificate")
        log.info(
            "Istio certificate %s: serial %s, valid until %s",
            certificate.identity,
            certificate.serial,
            certificate.not_after.isoformat(timespec="seconds"),
        )
        self._publish(certificate)
        return certificate

    # --- the loop --------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        try:
            self.load()
        except MeshvmError as exc:  # an unreadable root or token: renewing below says what is wrong, and retries
            log.warning("Istio identity: could not load what is on disk: %s", exc)
        while not stop.is_set():
            now = self.clock()
            step_plan = renewal.plan(self.state, now)
            for step in step_plan.steps:
                try:
                    if step is renewal.Step.REFRESH_TOKEN:
                        self.state = renewal.succeeded(self.state, token=self.refresh_token())
                    else:
                        self.state = renewal.succeeded(self.state, certificate=self.renew_certificate())
                except MeshvmError as exc:
                    self.state = renewal.failed(self.state, f"{step.value}: {exc}")
                    self.metrics.errors.inc(kind="istio")
                    log.warning("Istio identity: could not %s: %s", step.value, exc)
                    break
            wake = renewal.plan(self.state, self.clock()).wake if step_plan.steps else step_plan.wake
            stop.wait(max((wake - self.clock()).total_seconds(), 0.05))

    def status(self) -> dict[str, object]:
        certificate, token = self.state.certificate, self.state.token
        return {
            "identity": self.spec.identity,
            "certificate_expires": certificate.not_after.isoformat() if certificate else None,
            "certificate_serial": certificate.serial if certificate else None,
            "token_expires": token.expires.isoformat() if token else None,
            "last_error": self.state.last_error or None,
        }
