"""Proof that a controller request comes from a node of the cluster: an HMAC keyed by the secret.

Raft traffic is authenticated and encrypted by pysyncobj with the cluster secret. The controller's
gRPC calls that change a node's standing (RegisterNode, NodeHeartbeat, AlterPartition) carry a
token in the ``x-headwater-node-auth`` header (a Replicate stream carries it in its first request's
``node_token``, scope ``replicate:<broker_epoch>``),
``<unix_ms>:<hex HMAC-SHA256(key, "<scope>:<node_id>:<unix_ms>")>``, with ``key`` derived from the
secret (so the secret itself never travels) and ``scope`` naming the method and the request's
fields that matter (``request_scope``): a token proves one request, not
any request of that node. The controller accepts a token stamped within ``MAX_SKEW_MS`` of its own
clock; anything else fails with UNAUTHENTICATED. Over plaintext gRPC a request seen on the wire can
still be replayed as it is within that window; TLS on the client port is what closes that.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["NodeAuth", "AUTH_HEADER", "MAX_SKEW_MS"]

AUTH_HEADER = "x-headwater-node-auth"
MAX_SKEW_MS = 60_000
_CONTEXT = b"headwater node auth v1"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class NodeAuth:
    """Makes and checks node tokens. Holds a key derived from the secret, never the secret."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("a cluster secret is required")
        self._key = hmac.new(secret.encode(), _CONTEXT, hashlib.sha256).digest()

    def _mac(self, scope: str, node_id: int, stamp_ms: int) -> str:
        return hmac.new(self._key, f"{scope}:{node_id}:{stamp_ms}".encode(), hashlib.sha256).hexdigest()

    def token(self, request: Any, now_ms: int | None = None) -> str:
        """The token that proves ``request``'s node holds the secret."""
        scope, node_id = request_scope(request)
        stamp = _now_ms() if now_ms is None else now_ms
        return f"{stamp}:{self._mac(scope, node_id, stamp)}"

    def metadata(self, request: Any, now_ms: int | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC metadata that proves ``request``'s node holds the secret."""
        return ((AUTH_HEADER, self.token(request, now_ms)),)

    def problem(self, metadata: Iterable[Any] | None, request: Any, now_ms: int | None = None) -> str:
        """Why ``metadata`` does not prove ``request`` comes from its node ("" when it does)."""
        token = ""
        for item in metadata or ():
            key, value = item[0], item[1]
            if key == AUTH_HEADER:
                token = value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
        if not token:
            return f"the request carries no {AUTH_HEADER} token: nodes must hold the cluster secret"
        return self.token_problem(token, request, now_ms)

    def token_problem(self, token: str, request: Any, now_ms: int | None = None) -> str:
        """Why ``token`` does not prove ``request`` comes from its node ("" when it does)."""
        scope, node_id = request_scope(request)
        if not token:
            return "the request carries no node token: nodes must hold the cluster secret"
        stamp_text, sep, mac = token.partition(":")
        if (
            not sep
            or not stamp_text.isascii()
            or not stamp_text.isdigit()
            or len(stamp_text) > 16
            or not mac.isascii()
            or len(mac) != 64
        ):
            return "the node token is malformed"
        stamp = int(stamp_text)
        now = _now_ms() if now_ms is None else now_ms
        if abs(now - stamp) > MAX_SKEW_MS:
            return f"the node token is stamped {now - stamp} ms from this node's clock"
        if not hmac.compare_digest(mac.encode(), self._mac(scope, node_id, stamp).encode()):
            return f"the node token does not prove node {node_id} holds the cluster secret"
        return ""


def request_scope(request: Any) -> tuple[str, int]:
    """What a token covers for a controller request, and the node it speaks for."""
    name = type(request).__name__
    if name == "RegisterNodeRequest":
        scope = f"register:{request.incarnation_id.hex()}:{request.host}:{request.port}:{request.rack}"
        return scope, int(request.node_id)
    if name == "NodeHeartbeatRequest":
        scope = f"heartbeat:{request.broker_epoch}:{int(request.want_fence)}:{int(request.want_shutdown)}"
        return scope, int(request.node_id)
    if name == "AlterPartitionRequest":
        isr = ",".join(str(r) for r in request.new_isr)
        scope = (
            f"alter-partition:{request.topic_id.hex()}:{request.partition}:{request.broker_epoch}:"
            f"{request.leader_epoch}:{request.partition_epoch}:{isr}"
        )
        return scope, int(request.leader_id)
    if name == "ReplicateRequest":
        # One token proves a stream: it names the follower's incarnation, not a single fetch.
        return f"replicate:{request.broker_epoch}", int(request.replica_id)
    raise ValueError(f"no node token for {name}")
