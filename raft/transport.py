"""A bounded TCP transport for pysyncobj: what a stranger on the Raft port can cost a voter.

pysyncobj's own ``TcpConnection`` buffers a frame of any announced length before it checks the
frame's signature (copying the whole buffer on every read), reads one socket for as long as data
keeps arriving, which holds the tick thread that runs Raft, and looks at a connection's timeout only
when an event arrives on it. So a stranger who announces a 2 GiB frame and keeps writing freezes a
voter's Raft (the others depose it while it still believes it leads), and idle connections stay open
for ever. This module keeps pysyncobj's wire format and handshake, so a voter on it talks to a voter
on pysyncobj's own transport, and bounds each of those costs (``TransportLimits``; the values and
their defaults live in ``QuorumSettings``):

- **Authenticated** means that a message on the connection decrypted under the cluster secret and
  carried the random key this side chose for the connection (pysyncobj's handshake: a replayed
  recording of another connection does not carry it). Before that, a frame may announce at most
  ``max_frame_bytes_before_auth`` bytes (the handshake's frames are a few hundred bytes); after it,
  ``max_frame_bytes``. A larger or negative length closes the connection as soon as its four bytes
  are in, before its body is read, let alone decrypted or unpickled.
- **Fair reading.** One poll event reads at most ``max_read_bytes_per_event`` from a connection and
  returns to the poller, so one busy connection can never hold the tick thread. Bytes are buffered
  in a ``bytearray`` read from an offset (no copy of the buffer per read).
- **Deadlines on the tick.** A connection not authenticated within ``auth_timeout_s`` of being
  opened, or that reads nothing for ``idle_timeout_s`` (pysyncobj's ``connectionTimeout``), is
  closed by a sweep on every tick, not only when an event arrives on it.
- **Few strangers at once.** At most ``max_unauthenticated_connections`` accepted connections wait
  to authenticate; accepting one more closes the oldest of them (not the newcomer, so that holding
  that many idle sockets open does not lock a restarting voter out). The listen backlog is
  ``listen_backlog``.
- **Warnings, rate-limited.** A connection closed for breaking a bound is logged as a warning that
  names the peer address and the bound, at most once per ``warning_interval_s`` (the next warning
  counts the ones left out). Neither the secret nor message contents are ever logged.

All of this runs on pysyncobj's tick thread, like the transport it replaces; nothing here takes a
lock.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pysyncobj.pickle as _pysyncobj_pickle
from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, set_keepalive
from pysyncobj.transport import TCPTransport

__all__ = ["TransportLimits", "BoundedConnection", "BoundedTransport", "bounded_transport_class"]

logger = logging.getLogger(__name__)

# pysyncobj's frame: a native-order signed 32-bit length, then the (encrypted) zlib'd pickle.
_LENGTH = struct.Struct("i")
# Connections accepted per readable event of the listening socket: a burst of connects is taken in
# a few ticks without one tick accepting without end.
_ACCEPTS_PER_EVENT = 16
# accept() errors that mean "not now" (out of descriptors or memory, or the peer gave up): the
# server stays bound. pysyncobj's own server unbinds on any of them and never binds again.
_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """The bounds of the Raft port (see the module docstring). Defaults live in ``QuorumSettings``."""

    max_frame_bytes_before_auth: int
    max_frame_bytes: int
    max_read_bytes_per_event: int
    auth_timeout_s: float
    idle_timeout_s: float
    max_unauthenticated_connections: int
    listen_backlog: int
    warning_interval_s: float

    def __post_init__(self) -> None:
        # The handshake's second frame carries a 32-byte key and this voter's address: ~300 bytes.
        if self.max_frame_bytes_before_auth < 1024:
            raise ValueError("max_frame_bytes_before_auth must be at least 1024 (the handshake's frames)")
        if self.max_frame_bytes < self.max_frame_bytes_before_auth:
            raise ValueError("max_frame_bytes must be at least max_frame_bytes_before_auth")
        if self.max_frame_bytes > 2**31 - 1:
            raise ValueError("max_frame_bytes cannot exceed the frame header's 2**31 - 1")
        if self.max_read_bytes_per_event <= 0:
            raise ValueError("max_read_bytes_per_event must be positive")
        if self.auth_timeout_s <= 0 or self.idle_timeout_s <= 0 or self.warning_interval_s < 0:
            raise ValueError("auth_timeout_s and idle_timeout_s must be positive")
        if self.max_unauthenticated_connections < 1 or self.listen_backlog < 1:
            raise ValueError("max_unauthenticated_connections and listen_backlog must be at least 1")


class _Warnings:
    """At most one warning per ``interval_s``; the next one says how many were left out."""

    def __init__(self, interval_s: float, clock: Callable[[], float]):
        self._interval_s = interval_s
        self._clock = clock
        self._next_at = float("-inf")
        self._left_out = 0

    def connection_closed(self, peer: str, reason: str) -> None:
        now = self._clock()
        if now < self._next_at:
            self._left_out += 1
            return
        more = f" ({self._left_out} more closed since the last warning)" if self._left_out else ""
        logger.warning("raft port: closed the connection with %s: %s%s", peer, reason, more)
        self._left_out = 0
        self._next_at = now + self._interval_s


def _address_family(host: str) -> socket.AddressFamily:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except OSError:
            pass
    raise ValueError(f"{host!r} is not an IP address")


def _peer_name(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


class BoundedConnection:
    """One peer connection, with the interface and wire format of pysyncobj's ``TcpConnection``.

    Either accepted (``sock`` given; it is connected) or dialled later with ``connect``. The
    transport reads ``sendRandKey``, ``recvRandKey``, ``recvLastTimestamp`` and sets ``encryptor``
    as on pysyncobj's connection; ``check_deadlines`` is called by the transport's tick.
    """

    def __init__(
        self,
        poller: Any,
        limits: TransportLimits,
        warnings: _Warnings,
        *,
        sock: socket.socket | None = None,
        peer: str = "",
        send_buffer_bytes: int = 2**16,
        recv_buffer_bytes: int = 2**16,
        keepalive: tuple[int, int, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # pysyncobj's handshake state, read and written by TCPTransport.
        self.sendRandKey: Any = None
        self.recvRandKey: bytes | None = None
        self.recvLastTimestamp = 0
        self.encryptor: Any = None

        self._poller = poller
        self._limits = limits
        self._warnings = warnings
        self._clock = clock
        self._peer = peer
        self._send_buffer_bytes = send_buffer_bytes
        self._recv_buffer_bytes = recv_buffer_bytes
        self._keepalive = keepalive
        self._on_message: Callable[[Any], None] | None = None
        self._on_connected: Callable[[], None] | None = None
        self._on_disconnected: Callable[[], None] | None = None
        # Received bytes; everything before _read_pos is parsed. Holds at most one frame of at most
        # the current bound plus one event's read.
        self._read_buf = bytearray()
        self._read_pos = 0
        self._write_buf = bytearray()
        self._authenticated = False
        self._opened_at = clock()
        self._last_read_at = self._opened_at
        self._sock = sock
        self._fileno: int | None = None
        self._state = CONNECTION_STATE.DISCONNECTED
        if sock is not None:
            self._fileno = sock.fileno()
            self._state = CONNECTION_STATE.CONNECTED
            self.setSockoptKeepalive()
            self._subscribe(POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR)

    # ------------------------------------------------------------ pysyncobj's connection interface

    @property
    def state(self) -> int:
        return int(self._state)

    @property
    def authenticated(self) -> bool:
        """A message decrypted under the secret and carried this side's random key."""
        return self._authenticated

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def opened_at(self) -> float:
        return self._opened_at

    def fileno(self) -> int | None:
        return self._fileno

    def getSendBufferSize(self) -> int:
        return len(self._write_buf)

    def setOnConnectedCallback(self, callback: Callable[[], None] | None) -> None:
        self._on_connected = callback

    def setOnMessageReceivedCallback(self, callback: Callable[[Any], None] | None) -> None:
        self._on_message = callback

    def setOnDisconnectedCallback(self, callback: Callable[[], None] | None) -> None:
        self._on_disconnected = callback

    def setSockoptKeepalive(self) -> None:
        if self._sock is not None and self._keepalive is not None:
            set_keepalive(self._sock, *self._keepalive)

    def connect(self, host: str | None, port: int) -> bool:
        """Start dialling ``host:port`` (an IP address); False if that failed at once."""
        if host is None:
            return False
        self._close_socket()
        self._reset()
        self._peer = f"{host}:{port}"
        sock = socket.socket(_address_family(host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_buffer_bytes)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self._sock = sock
        self.setSockoptKeepalive()
        self._opened_at = self._last_read_at = self._clock()
        try:
            sock.connect((host, port))
        except OSError as e:
            if e.errno not in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                self._close_socket()
                return False
        self._fileno = sock.fileno()
        self._state = CONNECTION_STATE.CONNECTING
        self._subscribe(POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR)
        return True

    def send(self, message: Any) -> None:
        """Frame ``message`` as pysyncobj does and write what the socket takes now."""
        if self._sock is None:
            return
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = zlib.compress(_pysyncobj_pickle.dumps(message), 3)
        if self.encryptor:
            data = self.encryptor.encrypt_at_time(data, int(self._clock()))
        self._write_buf += _LENGTH.pack(len(data))
        self._write_buf += data
        self._flush()

    def disconnect(self) -> None:
        """Close the connection; the disconnected callback runs if it was not closed already."""
        notify = self._on_disconnected is not None and self._state != CONNECTION_STATE.DISCONNECTED
        self._close_socket()
        self._reset()
        self._state = CONNECTION_STATE.DISCONNECTED
        if notify:
            assert self._on_disconnected is not None
            self._on_disconnected()

    # ------------------------------------------------------------------------------ deadlines

    def check_deadlines(self, now: float) -> None:
        """Close this connection if it has not authenticated in time or has gone idle (the tick)."""
        if self._state == CONNECTION_STATE.DISCONNECTED:
            return
        limits = self._limits
        if not self._authenticated and now - self._opened_at > limits.auth_timeout_s:
            if self._state == CONNECTION_STATE.CONNECTING:
                self.disconnect()  # a voter we dial that does not answer: a connect timeout
            else:
                self.close_for(f"not authenticated within {limits.auth_timeout_s:g} s")
        elif now - self._last_read_at > limits.idle_timeout_s:
            logger.debug("raft port: closing the connection with %s, idle", self._peer)
            self.disconnect()

    def close_for(self, reason: str) -> None:
        """Close this connection for breaking a bound, with a (rate-limited) warning."""
        if self._state == CONNECTION_STATE.DISCONNECTED:
            return
        self._warnings.connection_closed(self._peer, reason)
        self.disconnect()

    # ------------------------------------------------------------------------------ internals

    def _reset(self) -> None:
        self.sendRandKey = None
        self.recvRandKey = None
        self.recvLastTimestamp = 0
        self._authenticated = False
        self._read_buf = bytearray()
        self._read_pos = 0
        self._write_buf = bytearray()

    def _close_socket(self) -> None:
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _subscribe(self, events: int) -> None:
        self._poller.subscribe(self._fileno, self._on_event, events)

    # A callback may close this connection, and closing a connection the transport dials redials it
    # at once on this same object with a new socket: each step below checks that the socket it
    # started with is still this connection's (``sock``) before it goes on.

    def _on_event(self, descr: int, event: int) -> None:
        sock = self._sock
        if descr != self._fileno or sock is None:
            self._poller.unsubscribe(descr)
            return
        if event & POLL_EVENT_TYPE.ERROR or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()
            return
        if self._state == CONNECTION_STATE.CONNECTING:
            if self._on_connected is not None:
                self._on_connected()
            if self._sock is sock:
                self._state = CONNECTION_STATE.CONNECTED
                self._last_read_at = self._clock()
            return
        if event & POLL_EVENT_TYPE.WRITE:
            self._flush()
        if event & POLL_EVENT_TYPE.READ and self._sock is sock:
            self._read(sock)
            if self._sock is sock:
                self._deliver_frames(sock)

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while self._write_buf:
            try:
                sent = sock.send(self._write_buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.disconnect()
                return
            if sent <= 0:
                break
            del self._write_buf[:sent]  # CPython drops a bytearray's head without copying the rest
        events = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
        if self._write_buf:
            events |= POLL_EVENT_TYPE.WRITE
        self._subscribe(events)

    def _read(self, sock: socket.socket) -> None:
        """Read at most one event's budget, refusing an oversized frame as soon as its length is in."""
        budget = self._limits.max_read_bytes_per_event
        while budget > 0:
            want = min(self._recv_buffer_bytes, budget)
            try:
                chunk = sock.recv(want)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.disconnect()
                return
            if not chunk:
                self.disconnect()  # the peer closed
                return
            self._read_buf += chunk
            budget -= len(chunk)
            self._last_read_at = self._clock()
            self._frame_length()  # closes the connection if the frame being read breaks a bound
            if self._sock is not sock or len(chunk) < want:
                return  # closed, or drained (skip the recv that would only say EAGAIN)

    def _frame_length(self) -> int | None:
        """The length of the frame at the read position, or None if its header is not in yet or it
        breaks the bound (then the connection is closed)."""
        if len(self._read_buf) - self._read_pos < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._read_buf, self._read_pos)
        if length < 0:
            self.close_for(f"negative frame length {length}")
            return None
        if self._authenticated:
            if length > self._limits.max_frame_bytes:
                self.close_for(f"frame of {length} bytes (limit {self._limits.max_frame_bytes})")
                return None
        elif length > self._limits.max_frame_bytes_before_auth:
            limit = self._limits.max_frame_bytes_before_auth
            self.close_for(f"frame of {length} bytes before authentication (limit {limit})")
            return None
        return int(length)

    def _deliver_frames(self, sock: socket.socket) -> None:
        while self._sock is sock:
            length = self._frame_length()
            if length is None:
                break
            start = self._read_pos + _LENGTH.size
            if len(self._read_buf) - start < length:
                break
            frame = bytes(self._read_buf[start : start + length])
            self._read_pos = start + length
            ok, message = self._open(frame)
            if not ok:
                return
            if self._on_message is not None:
                self._on_message(message)
        if self._read_pos and self._sock is sock:
            del self._read_buf[: self._read_pos]
            self._read_pos = 0

    def _open(self, frame: bytes) -> tuple[bool, Any]:
        """Decrypt and unpickle one frame as pysyncobj does. Nothing is unpickled unless it
        decrypted under the secret (Fernet checks its HMAC before it decrypts)."""
        encryptor = self.encryptor
        try:
            if encryptor:
                timestamp = encryptor.extract_timestamp(frame)
                if timestamp < self.recvLastTimestamp:
                    raise ValueError("timestamp went back")
                self.recvLastTimestamp = timestamp
                frame = encryptor.decrypt(frame)
        except Exception:
            self.close_for("a message that did not decrypt with the cluster secret")
            return False, None
        try:
            message = _pysyncobj_pickle.loads(zlib.decompress(frame))
            if self.recvRandKey:
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise ValueError("wrong connection key")
                # Only a holder of the secret, answering this connection, can have sent this.
                self._authenticated = True
        except Exception:
            self.close_for("a malformed message")
            return False, None
        return True, message


class _BoundedServer:
    """pysyncobj's ``TcpServer`` with a larger backlog, several accepts per event, and a server
    that stays bound when the process runs out of descriptors for a moment."""

    def __init__(
        self,
        poller: Any,
        host: str,
        port: int,
        backlog: int,
        on_accepted: Callable[[socket.socket, str], None],
        warnings: _Warnings,
        send_buffer_bytes: int,
        recv_buffer_bytes: int,
    ) -> None:
        self._poller = poller
        self._host = host
        self._port = port
        self._backlog = backlog
        self._on_accepted = on_accepted
        self._warnings = warnings
        self._send_buffer_bytes = send_buffer_bytes
        self._recv_buffer_bytes = recv_buffer_bytes
        self._sock: socket.socket | None = None
        self._fileno: int | None = None

    def bind(self) -> None:
        sock = socket.socket(_address_family(self._host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_buffer_bytes)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((self._host, self._port))
            sock.listen(self._backlog)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._fileno = sock.fileno()
        self._poller.subscribe(self._fileno, self._on_event, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def unbind(self) -> None:
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _on_event(self, descr: int, event: int) -> None:
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()
            return
        for _ in range(_ACCEPTS_PER_EVENT):
            if self._sock is None:
                return
            try:
                sock, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _TRANSIENT_ACCEPT_ERRORS:
                    self._warnings.connection_closed("a new peer", f"accept failed: {os.strerror(e.errno)}")
                    return
                self.unbind()
                return
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer_bytes)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_buffer_bytes)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
            except OSError:
                sock.close()  # the peer is gone already
                continue
            self._on_accepted(sock, _peer_name(address))


class BoundedTransport(TCPTransport):  # type: ignore[misc]
    """pysyncobj's ``TCPTransport`` with ``BoundedConnection`` and ``_BoundedServer`` (see the module
    docstring). Pass it as ``SyncObj(..., transportClass=bounded_transport_class(limits))``. It needs
    the cluster secret (``SyncObjConf.password``): without it pysyncobj unpickles what strangers send.
    """

    def __init__(
        self,
        syncObj: Any,
        selfNode: Any,
        otherNodes: Iterable[Any],
        *,
        limits: TransportLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if syncObj.encryptor is None:
            raise ValueError("the bounded Raft transport needs the cluster secret (SyncObjConf.password)")
        # Set before TCPTransport.__init__, which calls addNode and _createServer.
        self._limits = limits
        self._clock = clock
        self._warnings = _Warnings(limits.warning_interval_s, clock)
        # Accepted connections still open, oldest first (dict order).
        self._incoming: dict[BoundedConnection, None] = {}
        super().__init__(syncObj, selfNode, otherNodes)

    def _new_connection(self, sock: socket.socket | None = None, peer: str = "") -> BoundedConnection:
        conf = self._syncObj.conf
        return BoundedConnection(
            self._syncObj._poller,
            self._limits,
            self._warnings,
            sock=sock,
            peer=peer,
            send_buffer_bytes=conf.sendBufferSize,
            recv_buffer_bytes=conf.recvBufferSize,
            # pysyncobj sets keepalive on the connections it dials only; so does this transport.
            keepalive=conf.tcp_keepalive if sock is None else None,
            clock=self._clock,
        )

    def _createServer(self) -> None:
        conf = self._syncObj.conf
        if conf.bindAddress is not None:
            host, port = conf.bindAddress.rsplit(":", 1)
        elif self._selfNode is not None and self._selfNode.address is not None:
            host, port = self._selfNode.address.rsplit(":", 1)
            host = "::" if ":" in host else "0.0.0.0"
        else:
            raise RuntimeError("unable to determine the bind address")
        if host != "0.0.0.0":
            host = globalDnsResolver().resolve(host)
        self._server = _BoundedServer(
            self._syncObj._poller,
            host,
            int(port),
            self._limits.listen_backlog,
            self._on_accepted,
            self._warnings,
            conf.sendBufferSize,
            conf.recvBufferSize,
        )

    def _on_accepted(self, sock: socket.socket, peer: str) -> None:
        self._forget_closed()
        waiting = [c for c in self._incoming if not c.authenticated]
        cap = self._limits.max_unauthenticated_connections
        for oldest in waiting[: max(0, len(waiting) - cap + 1)]:
            oldest.close_for(f"{cap} connections were already waiting to authenticate")
        self._forget_closed()
        conn = self._new_connection(sock, peer)
        self._incoming[conn] = None
        self._onNewIncomingConnection(conn)

    def addNode(self, node: Any) -> None:
        """TCPTransport.addNode, with a BoundedConnection for the voters this one dials."""
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conn = self._new_connection(peer=node.address)
            conn.encryptor = self._syncObj.encryptor
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    def _onTick(self) -> None:
        super()._onTick()
        self.sweep(self._clock())

    def sweep(self, now: float) -> None:
        """Close the connections past their auth or idle deadline (every tick)."""
        for conn in list(self._incoming) + list(self._connections.values()):
            conn.check_deadlines(now)
        self._forget_closed()

    def _forget_closed(self) -> None:
        closed = [c for c in self._incoming if c.state == CONNECTION_STATE.DISCONNECTED]
        for conn in closed:
            del self._incoming[conn]

    def destroy(self) -> None:
        super().destroy()
        for conn in list(self._incoming):
            conn.disconnect()
        self._incoming.clear()


def bounded_transport_class(limits: TransportLimits) -> Callable[..., BoundedTransport]:
    """The ``transportClass`` argument of ``SyncObj`` for a transport with these limits."""
    return functools.partial(BoundedTransport, limits=limits)
