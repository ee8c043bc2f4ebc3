"""When to renew a VM's Istio certificate and refresh its token: a pure function of (state, now).

The agent's shell (``meshvm.agent.istio``) carries out the steps :func:`plan` asks for, reports each outcome back
with :func:`succeeded` / :func:`failed`, and sleeps until the plan's ``wake``. Every decision is here, so each is a
unit test: renew at half the certificate's life, refresh the token at half of its own, back off on failures (and
never wait past the moment a certificate expires).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, replace

from meshvm.istio.identity import Certificate
from meshvm.istio.tokens import Token

BACKOFF_START = dt.timedelta(seconds=1)
BACKOFF_MAX = dt.timedelta(seconds=30)
IDLE_MAX = dt.timedelta(hours=1)  # look again at least this often


class Step(enum.Enum):
    REFRESH_TOKEN = "refresh the token"  # noqa: S105 - a step name, not a secret
    RENEW_CERTIFICATE = "renew the certificate"


@dataclass(frozen=True)
class State:
    certificate: Certificate | None = None
    token: Token | None = None  # the refresh token on disk
    failures: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    wake: dt.datetime


def plan(state: State, now: dt.datetime) -> Plan:
    steps: list[Step] = []
    token, certificate = state.token, state.certificate
    if token is not None and not token.expired(now) and now >= token.refresh_after():
        steps.append(Step.REFRESH_TOKEN)
    if certificate is None or now >= certificate.renew_after():
        steps.append(Step.RENEW_CERTIFICATE)
    if state.failures:
        wake = now + min(BACKOFF_START * 2 ** (state.failures - 1), BACKOFF_MAX)
    else:
        moments = [now + IDLE_MAX]
        if certificate is not None:
            moments.append(certificate.renew_after())
        if token is not None and not token.expired(now):
            moments.append(token.refresh_after())
        wake = min(m for m in moments if m > now) if any(m > now for m in moments) else now + BACKOFF_START
    return Plan(tuple(steps), wake)


def succeeded(state: State, *, certificate: Certificate | None = None, token: Token | None = None) -> State:
    return replace(
        state,
        certificate=certificate or state.certificate,
        token=token or state.token,
        failures=0,
        last_error="",
    )


def failed(state: State, error: str) -> State:
    return replace(state, failures=state.failures + 1, last_error=error)
