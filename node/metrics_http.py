"""The metrics port: Prometheus text over HTTP, served on the node's event loop.

prometheus_client's own server starts a thread per connection and never times one out, so idle
connections to the metrics port pile up threads and descriptors without bound. This endpoint
serves the same answers (prometheus_client's WSGI app: content negotiation, gzip, ``name[]``
filters, the same content type) with no thread at all, one request per connection (as
prometheus_client's server does), at most ``max_connections`` connections at once, and
``timeout_s`` for a connection to send its request and take the answer; a slower one is cut.

When ``max_connections`` are open, a new connection takes the place of the one that has waited
longest for its request: a scraper sends its request at once, so idle connections cannot lock it
out (a scrape whose connection is cut in the instant before its request is read fails, and the next
one is served). Only when every open connection is being answered is a new one closed at accept.
(Sparing young connections from this instead locked out every scrape for the whole grace period of a
burst of connections, in a test with 1,000.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["MetricsEndpoint"]

log = logging.getLogger("headwater.node")
# Longest request line plus headers accepted; a scraper sends a few hundred bytes.
_MAX_HEAD_BYTES = 16 * 1024
# Connections the kernel queues before the loop accepts them (capped by net.core.somaxconn). With
# asyncio's 100, a burst of connections overflows the queue and a scraper's connect waits out a
# SYN retransmission (a second or more).
_ACCEPT_BACKLOG = 1024


class MetricsEndpoint:
    """An asyncio HTTP/1.1 server of one registry's metrics."""

    def __init__(self, registry: CollectorRegistry, max_connections: int, timeout_s: float) -> None:
        assert max_connections > 0 and timeout_s > 0
        self._app = make_wsgi_app(registry)
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        # Open connections, oldest first: the loop time each was accepted at while it waits for its
        # request, None once it is being answered. Invariant: len(self._open) <= max_connections.
        self._open: dict[asyncio.StreamWriter, float | None] = {}
        # Connections closed at accept because max_connections were open and all being answered.
        self.refused_connections = 0
        # Connections cut to make room for a newer one while still waiting for their request.
        self.evicted_connections = 0
        self._server: asyncio.Server | None = None

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=_MAX_HEAD_BYTES, backlog=_ACCEPT_BACKLOG
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    def _make_room(self) -> bool:
        """Cut the oldest connection still waiting for its request; False when none waits."""
        oldest = next((w for w, since in self._open.items() if since is not None), None)
        if oldest is None:
            return False
        del self._open[oldest]
        self.evicted_connections += 1
        oldest.transport.abort()  # its _serve ends on the lost connection
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        now = asyncio.get_running_loop().time()
        if len(self._open) >= self.max_connections and not self._make_room():
            self.refused_connections += 1
            writer.transport.abort()
            return
        self._open[writer] = now
        assert len(self._open) <= self.max_connections
        done = False
        try:
            # drain() returns once every byte is with the kernel, so the timeout covers a slow reader.
            writer.transport.set_write_buffer_limits(0)
            await asyncio.wait_for(self._exchange(reader, writer), self.timeout_s)
            done = True
        except (TimeoutError, OSError, EOFError, ValueError, asyncio.LimitOverrunError):
            pass  # a slow, silent, broken or oversized request: the connection is cut
        finally:
            self._open.pop(writer, None)
            if done:
                writer.close()
            else:
                writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if writer in self._open:
            self._open[writer] = None  # being answered: no longer a candidate to make room
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
        }
        if "accept" in headers:
            environ["HTTP_ACCEPT"] = headers["accept"]
        if "accept-encoding" in headers:
            environ["HTTP_ACCEPT_ENCODING"] = headers["accept-encoding"]
        answer: list[Any] = []

        def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
            answer[:] = [status, response_headers]

        body = b"".join(self._app(environ, start_response))
        status, response_headers = answer
        out = [f"HTTP/1.1 {status}"]
        out += [f"{k}: {v}" for k, v in response_headers]
        out += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        writer.write("\r\n".join(out).encode("latin-1") + body)
        await writer.drain()
