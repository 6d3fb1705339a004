"""Waiting for a node to serve, by polling its standard gRPC health service (``grpc.health.v1``).

A node reports SERVING once it has joined its cluster: registered, caught up and unfenced. The
``headwater local up`` launcher, the benchmarks and the tests all wait for that the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["SERVING", "EXITED", "STOPPED", "TIMED_OUT", "wait_serving"]

SERVING = "serving"
EXITED = "exited"
STOPPED = "stopped"
TIMED_OUT = "timed out"


def _never() -> bool:
    return False


def wait_serving(
    address: str,
    deadline: float,
    *,
    exited: Callable[[], bool] = _never,
    stopping: Callable[[], bool] = _never,
    interval_s: float = 0.05,
) -> str:
    """Poll the node at ``address`` until it reports SERVING, and say how the wait ended.

    Returns ``SERVING``, or ``EXITED`` once ``exited()`` says its process is gone, ``STOPPED`` once
    ``stopping()`` says the caller gave up, or ``TIMED_OUT`` past ``deadline`` (``time.monotonic``).
    The channel is fresh: one kept from the node's previous life may be in reconnect back-off.
    """
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if stopping():
                return STOPPED
            if exited():
                return EXITED
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return SERVING
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                return TIMED_OUT
            time.sleep(interval_s)
