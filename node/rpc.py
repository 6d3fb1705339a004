"""Service registration shared by the node's gRPC services.

Like the generated ``add_*_to_server`` helpers, except that an undecodable request body reaches the
handler as a ``Malformed`` value (so it answers INVALID_ARGUMENT, where the generated deserializer
would fail the call with UNKNOWN), and a handler may answer with wire bytes it already holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any, TypeVar

import grpc

__all__ = ["Malformed", "add_service", "next_unless_stopping"]


class Malformed:
    """Stands in for a request body that is not a valid message, so the handler can refuse it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except Exception as e:  # DecodeError and friends: the body is not this message
            return Malformed(e)

    return deserialize


def _serializer(message_type: Any) -> Callable[[Any], bytes]:
    """Messages are serialized; a handler that already holds the wire bytes returns them as they are."""
    serialize = message_type.SerializeToString

    def to_wire(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return to_wire


def add_service(servicer: object, server: grpc.aio.Server, module: ModuleType, service_name: str) -> None:
    """Register every method of ``service_name`` (defined in the generated ``module``) on ``server``."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient(getattr(module, method.input_type.name)),
            response_serializer=_serializer(getattr(module, method.output_type.name)),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


T = TypeVar("T")


async def next_unless_stopping(incoming: AsyncIterator[T], stopping: asyncio.Event) -> T | None:
    """A stream's next message; None at its end, or once ``stopping`` is set (the node is stopping:
    a handler waiting for a peer's next request would otherwise hold the server's shutdown for its
    whole grace period)."""
    if stopping.is_set():
        return None
    message = asyncio.ensure_future(anext(incoming))
    stopped = asyncio.ensure_future(stopping.wait())
    await asyncio.wait((message, stopped), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not message.done():
        message.cancel()
        return None
    try:
        return message.result()
    except StopAsyncIteration:
        return None
