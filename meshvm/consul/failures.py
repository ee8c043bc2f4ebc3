"""What a Consul 5xx answer means for meshvm: its servers are away (exit 3, retried by the agent), or a server
refused the request and said why (exit 1). Consul answers both with 500, so the text decides.

Used by the HTTP client (py-consul) and the blocking watches (their own HTTP), which must agree.
"""

from __future__ import annotations

from meshvm.errors import MeshvmError, OperationFailedError, PeerUnreachableError

# What a Consul agent or server says when it cannot reach a server or the servers have no leader (1.8 to 1.2x);
# lower case. Anything else in a 500 is the server's answer to the request itself ("... already exists").
SERVERS_AWAY = (
    "no cluster leader",
    "no known consul servers",
    "no path to datacenter",
    "leadership lost",
    "raft leader not found",
    "failed to get conn",
    "rpc error getting client",
    "connection refused",
    "connection reset",
    "i/o timeout",
    "timed out",
)


def server_error(what: str, status: int, text: str) -> MeshvmError:
    """The error for Consul's ``status`` (5xx) answer with body ``text`` to ``what``."""
    detail = text.strip()[:200]
    if status != 500 or not detail or any(sign in detail.lower() for sign in SERVERS_AWAY):
        return PeerUnreachableError(f"Consul servers unreachable ({what}): {status} {detail}".rstrip())
    return OperationFailedError(f"Consul refused {what}: {status} {detail}")
