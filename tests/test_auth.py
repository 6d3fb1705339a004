"""Node tokens: bound to the secret, the node, the request and the time; odd input is refused."""

from __future__ import annotations

from headwater.node.auth import AUTH_HEADER, MAX_SKEW_MS, NodeAuth
from headwater.v1 import controller_pb2 as cpb

NOW = 1_800_000_000_000


def test_a_token_proves_one_request_of_one_node_with_the_secret() -> None:
    auth = NodeAuth("secret")
    hb = cpb.NodeHeartbeatRequest(node_id=3, broker_epoch=7)
    token = auth.metadata(hb, now_ms=NOW)
    assert auth.problem(token, hb, now_ms=NOW) == ""
    assert auth.problem(token, hb, now_ms=NOW + MAX_SKEW_MS - 1) == ""
    assert "stamped" in auth.problem(token, hb, now_ms=NOW + MAX_SKEW_MS + 1)
    assert "does not prove" in NodeAuth("other").problem(token, hb, now_ms=NOW)
    for other in (
        cpb.NodeHeartbeatRequest(node_id=4, broker_epoch=7),
        cpb.NodeHeartbeatRequest(node_id=3, broker_epoch=8),
        cpb.NodeHeartbeatRequest(node_id=3, broker_epoch=7, want_shutdown=True),
    ):
        assert "does not prove" in auth.problem(token, other, now_ms=NOW)
    reg = cpb.RegisterNodeRequest(node_id=3, incarnation_id=b"i" * 16, host="h", port=1)
    assert auth.problem(auth.metadata(reg, now_ms=NOW), reg, now_ms=NOW) == ""
    assert (
        auth.problem(
            auth.metadata(reg, now_ms=NOW),
            cpb.RegisterNodeRequest(node_id=3, incarnation_id=b"i" * 16, host="elsewhere", port=1),
            now_ms=NOW,
        )
        != ""
    )


def test_malformed_tokens_are_refused_without_raising() -> None:
    auth = NodeAuth("secret")
    hb = cpb.NodeHeartbeatRequest(node_id=1, broker_epoch=0)
    for value in (
        "",
        "nocolon",
        "x:" + "a" * 64,
        "9" * 5000 + ":" + "a" * 64,
        "1:" + "\u00e9" * 64,
        "1:" + "a" * 63,
        "\u0661\u0662:" + "a" * 64,
        b"\xff\xfe:abc",
    ):
        problem = auth.problem(((AUTH_HEADER, value),), hb, now_ms=NOW)
        assert problem, value
    assert "no x-headwater-node-auth" in auth.problem((), hb, now_ms=NOW)
