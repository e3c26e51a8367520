"""The replication protocol between storage daemons: lean binary frames over TCP.

Every request names one extent replica (volume name + uid + extent index)
and carries the extent generation its sender believes in. The receiving
daemon serves it only when its own record of that extent (from etcd) has
the same generation and lists this node in the replica set; otherwise it
answers ESTALE with the generation it knows, and the sender refreshes its
map. That is how a dropped replica (generation bumped without it) can never
take a write again, and how a node that was fenced cannot write through its
peers.

Request (56 bytes, network order) + volume name + payload (WRITE only)::

    u32 magic 0x42524431 | u8 op | u8 flags | u8 name_len | u8 pad
    u64 request id | u64 generation | 16s volume uid | u32 extent index
    u32 length | u64 offset (within the extent)

Reply (28 bytes) + payload (READ data, or an error message)::

    u32 magic 0x42524432 | u32 status (0 or an errno) | u64 request id
    u64 generation known to the replier | u32 payload length

Requests are pipelined on one connection and may complete out of order.
Why not gRPC streams: ``make bench`` section ``storage`` (peer_protocol)
measures both for 4 KiB writes; see docs/architecture.md for the numbers.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
import struct
import uuid
from dataclasses import dataclass

log = logging.getLogger("braid.storaged.peer")

REQ = struct.Struct("!IBBBxQQ16sIIQ")
REP = struct.Struct("!IIQQI")
REQ_MAGIC = 0x42524431
REP_MAGIC = 0x42524432

OP_READ, OP_WRITE, OP_SYNC, OP_ZERO, OP_TRIM, OP_PING, OP_CHANGES = 1, 2, 3, 4, 5, 6, 7
OPS = {OP_READ: "read", OP_WRITE: "write", OP_SYNC: "sync", OP_ZERO: "zero", OP_TRIM: "trim",
       OP_PING: "ping", OP_CHANGES: "changes"}
# OP_CHANGES: length = the generation a returning replica last belonged to, offset = when
# it was dropped (unix milliseconds); the reply (``storage_daemon.changes.encode_answer``) says
# which chunks changed since and the chunk digests of the member's replica
F_FUA = 1          # sync the replica before replying
F_PUNCH = 2        # ZERO: may deallocate
ALL_EXTENTS = 0xFFFFFFFF  # SYNC: every dirty replica of the volume

MAX_PAYLOAD = 64 << 20


class PeerError(Exception):
    """The peer answered with an error status."""

    def __init__(self, status: int, generation: int, message: str):
        super().__init__(f"{errno.errorcode.get(status, status)}: {message}")
        self.status = status
        self.generation = generation
        self.message = message

    @property
    def stale(self) -> bool:
        return self.status == errno.ESTALE


class PeerUnavailable(ConnectionError):
    """No connection to the peer (refused, reset, timed out)."""


@dataclass
class Request:
    op: int
    flags: int
    req_id: int
    generation: int
    volume: str
    uid: str
    index: int
    length: int
    offset: int
    payload: bytes | bytearray | memoryview = b""


def encode_request(r: Request) -> list:
    name = r.volume.encode()
    head = REQ.pack(REQ_MAGIC, r.op, r.flags, len(name), r.req_id, r.generation, uuid.UUID(r.uid).bytes,
                    r.index, r.length, r.offset)
    return [head, name, r.payload] if r.payload else [head, name]


class ProtocolError(Exception):
    pass


def decode_request_head(head: bytes) -> tuple[int, int, int, int, int, str, int, int, int]:
    magic, op, flags, name_len, req_id, gen, uid, index, length, offset = REQ.unpack(head)
    if magic != REQ_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"length {length} over the limit")
    return op, flags, name_len, req_id, gen, str(uuid.UUID(bytes=uid)), index, length, offset


class Corked:
    """Output batching for a transport: everything written during one pass
    of the event loop goes out in one writev (replies to 16 pipelined
    requests cost one syscall, not 16)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._out: list = []
        self._scheduled = False
        self.transport: asyncio.WriteTransport | None = None

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def write(self, data) -> None:
        self._out.append(data)
        self._schedule()

    def writelines(self, parts) -> None:
        self._out.extend(parts)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)


class _ClientProtocol(asyncio.Protocol):
    """Reads replies; requests are written through the client's Corked."""

    def __init__(self, client: "PeerClient"):
        self.client = client
        self.buf = bytearray()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        pending = self.client._pending
        while n - pos >= REP.size:
            magic, status, req_id, gen, length = REP.unpack_from(buf, pos)
            if magic != REP_MAGIC or length > MAX_PAYLOAD:
                self.client._fail(PeerUnavailable(f"peer {self.client.node}: garbled reply"))
                return
            if n - pos - REP.size < length:
                break
            start = pos + REP.size
            payload = bytes(buf[start:start + length]) if length else b""
            pos = start + length
            entry = pending.pop(req_id, None)
            if entry is None or entry[0].done():
                continue  # the caller gave up (timeout)
            if status:
                entry[0].set_exception(PeerError(status, gen, payload.decode(errors="replace")))
            else:
                entry[0].set_result((gen, payload))
        if pos:
            del buf[:pos]

    def connection_lost(self, exc) -> None:
        self.client._fail(PeerUnavailable(f"connection to peer {self.client.node} lost"
                                          f"{': ' + str(exc) if exc else ''}"), self)
        if not self.closed.done():
            self.closed.set_result(None)


class PeerClient:
    """One pipelined connection to a peer's replication server; reconnects
    on the next request after a failure. All methods run on one event loop.

    Requests time out after ``timeout`` seconds (checked by one timer per
    client, not one per request) with asyncio.TimeoutError."""

    def __init__(self, node: str, address: str, connect_timeout: float = 2.0, timeout: float = 0.0,
                 ssl_context=None):
        """``ssl_context``: a callable giving the client ``ssl.SSLContext`` for a
        new connection (mutual TLS; the peer's certificate must name its host),
        or None for plaintext."""
        self.node = node
        self.address = address
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.timeout = timeout or connect_timeout
        self._proto: _ClientProtocol | None = None
        self._out: Corked | None = None
        self._pending: dict[int, tuple[asyncio.Future, float]] = {}
        self._ids = itertools.count(1)
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return self._out is not None and not self._out.is_closing()

    async def _connect(self) -> None:
        if self.connected:
            return
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.connected:
                return
            loop = asyncio.get_running_loop()
            host, _, port = self.address.rpartition(":")
            try:
                tls = {"ssl": self.ssl_context(), "server_hostname": host.strip("[]")} if self.ssl_context else {}
                transport, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: _ClientProtocol(self), host, int(port), **tls),
                    self.connect_timeout)
            except (OSError, asyncio.TimeoutError, ValueError) as exc:
                raise PeerUnavailable(f"peer {self.node} at {self.address}: "
                                      f"{exc or 'connect timeout'}") from None
            out = Corked(loop)
            out.transport = transport
            self._proto, self._out = proto, out

    def _fail(self, err: Exception, proto: _ClientProtocol | None = None) -> None:
        """The connection is gone: every pending request fails with ``err``."""
        if proto is None or proto is self._proto:
            if self._out is not None and self._out.transport is not None:
                self._out.transport.abort()
            self._proto, self._out = None, None
            pending, self._pending = self._pending, {}
            for fut, _ in pending.values():
                if not fut.done():
                    fut.set_exception(err)

    def _arm_watchdog(self, loop) -> None:
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout / 4, self._check_deadlines, loop)

    def _check_deadlines(self, loop) -> None:
        self._watchdog = None
        now = loop.time()
        for req_id, (fut, deadline) in list(self._pending.items()):
            if deadline <= now:
                del self._pending[req_id]
                if not fut.done():
                    fut.set_exception(asyncio.TimeoutError())
        if self._pending:
            self._arm_watchdog(loop)

    def submit(self, op: int, volume: str, uid: str, index: int, generation: int, offset: int = 0,
               length: int = 0, payload=b"", flags: int = 0, timeout: float = 0.0) -> asyncio.Future:
        """Queue one request on the open connection; the future resolves to
        (generation, payload) or fails with PeerError, PeerUnavailable or
        asyncio.TimeoutError. Requires ``connected`` (else use ``call``)."""
        loop = asyncio.get_running_loop()
        req_id = next(self._ids)
        fut = loop.create_future()
        self._pending[req_id] = (fut, loop.time() + (timeout or self.timeout))
        self._arm_watchdog(loop)
        if op == OP_WRITE:
            length = len(payload)
        self._out.writelines(encode_request(Request(op, flags, req_id, generation, volume, uid, index,
                                                    length, offset, payload)))
        return fut

    async def call(self, op: int, volume: str, uid: str, index: int, generation: int, offset: int = 0,
                   length: int = 0, payload=b"", flags: int = 0, timeout: float = 0.0) -> tuple[int, bytes]:
        """Send one request, wait for its reply: (generation, payload).
        ``timeout``: this request's deadline (default: the client's)."""
        if not self.connected:
            await self._connect()
        fut = self.submit(op, volume, uid, index, generation, offset, length, payload, flags, timeout)
        transport = self._out.transport
        if transport.get_write_buffer_size() > (8 << 20):  # back-pressure: let it drain
            while transport.get_write_buffer_size() > (1 << 20) and not transport.is_closing():
                await asyncio.sleep(0.001)
        return await fut

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        proto = self._proto
        if self._out is not None and self._out.transport is not None:
            self._out.transport.close()
        if proto is not None:
            try:
                await asyncio.wait_for(proto.closed, 2)
            except asyncio.TimeoutError:
                pass
        self._fail(PeerUnavailable(f"connection to peer {self.node} closed"))


class ServerProtocol(asyncio.BufferedProtocol):
    """One peer connection on the replication server. Frames are received
    straight into their final buffers (a WRITE payload lands in its own
    bytearray, no copy); each request goes to ``dispatch(self, ...)``, which
    replies through ``self.write``/``writelines`` (corked per loop pass)."""

    def __init__(self, dispatch, log_name: str = "peer", admit=None):
        """``admit(transport) -> str``: "" to serve the connection, else why not
        (e.g. a TLS peer that is not a storage daemon of the cluster)."""
        self.dispatch = dispatch
        self.admit = admit
        self.out = Corked(asyncio.get_running_loop())
        self._head = bytearray(REQ.size)
        self._target = memoryview(self._head)
        self._filled = 0
        self._state = "head"
        self._req = None
        self._name = bytearray(256)
        self.transport = None
        self.tasks: set[asyncio.Task] = set()

    # replies (StorageNode._serve's writer interface)
    def is_closing(self) -> bool:
        return self.out.is_closing()

    def write(self, data) -> None:
        self.out.write(data)

    def writelines(self, parts) -> None:
        self.out.writelines(parts)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.out.transport = transport
        why = self.admit(transport) if self.admit else ""
        if why:
            log.warning("replication connection from %s refused: %s",
                        transport.get_extra_info("peername"), why)
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int):
        return self._target[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._target):
            return
        try:
            self._advance()
        except (ProtocolError, ValueError) as exc:
            log.warning("peer connection: %s; closing it", exc)
            self.transport.abort()

    def _expect(self, buf) -> None:
        self._target = memoryview(buf)
        self._filled = 0

    def _advance(self) -> None:
        if self._state == "head":
            self._req = decode_request_head(bytes(self._head))
            nlen = self._req[2]
            self._state = "name"
            self._expect(memoryview(self._name)[:nlen])
            if nlen:
                return
        if self._state == "name":
            op, length = self._req[0], self._req[7]
            self._req_name = bytes(self._target).decode(errors="replace")
            if op == OP_WRITE and length:
                self._state = "payload"
                self._expect(bytearray(length))
                return
            self._complete(b"")
            return
        if self._state == "payload":
            self._complete(self._target.obj)

    def _complete(self, payload) -> None:
        op, flags, _, req_id, gen, uid, index, length, offset = self._req
        self._state = "head"
        self._expect(self._head)
        self.dispatch(self, op, flags, req_id, gen, self._req_name, uid, index, length, offset, payload)

    def connection_lost(self, exc) -> None:
        self.out.transport = None
        for t in list(self.tasks):
            t.cancel()
