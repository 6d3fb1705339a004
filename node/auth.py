"""Proof that a controller request comes from a node of the cluster: an HMAC keyed by the secret.

Raft traffic is authenticated and encrypted by pysyncobj with the cluster secret. The controller's
gRPC calls that change a node's standing (RegisterNode, NodeHeartbeat, AlterPartition) carry a
token in the ``x-headwater-node-auth`` header: ``<unix_ms>:<hex HMAC-SHA256(key, "<node_id>:<unix_ms>")>``,
with ``key`` derived from the secret (so the secret itself never travels). The controller accepts a
token for the node id the request names, stamped within ``MAX_SKEW_MS`` of its own clock; anything
else fails with UNAUTHENTICATED. Over plaintext gRPC a token seen on the wire can be replayed within
that window; TLS on the client port is what closes that.
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

    def _mac(self, node_id: int, stamp_ms: int) -> str:
        return hmac.new(self._key, f"{node_id}:{stamp_ms}".encode(), hashlib.sha256).hexdigest()

    def metadata(self, node_id: int, now_ms: int | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC metadata that proves ``node_id`` holds the secret."""
        stamp = _now_ms() if now_ms is None else now_ms
        return ((AUTH_HEADER, f"{stamp}:{self._mac(node_id, stamp)}"),)

    def problem(self, metadata: Iterable[Any] | None, node_id: int, now_ms: int | None = None) -> str:
        """Why ``metadata`` does not prove ``node_id``'s membership ("" when it does)."""
        token = ""
        for item in metadata or ():
            key, value = item[0], item[1]
            if key == AUTH_HEADER:
                token = value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
        if not token:
            return f"the request carries no {AUTH_HEADER} token: nodes must hold the cluster secret"
        stamp_text, sep, mac = token.partition(":")
        if not sep or not stamp_text.isdigit():
            return "the node token is malformed"
        stamp = int(stamp_text)
        now = _now_ms() if now_ms is None else now_ms
        if abs(now - stamp) > MAX_SKEW_MS:
            return f"the node token is stamped {now - stamp} ms from the controller's clock"
        if not hmac.compare_digest(mac, self._mac(node_id, stamp)):
            return f"the node token does not prove node {node_id} holds the cluster secret"
        return ""
