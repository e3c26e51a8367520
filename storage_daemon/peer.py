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
import struct
import uuid
from dataclasses import dataclass

log = logging.getLogger("braid.storaged.peer")

REQ = struct.Struct("!IBBBxQQ16sIIQ")
REP = struct.Struct("!IIQQI")
REQ_MAGIC = 0x42524431
REP_MAGIC = 0x42524432

OP_READ, OP_WRITE, OP_SYNC, OP_ZERO, OP_TRIM, OP_PING = 1, 2, 3, 4, 5, 6
OPS = {OP_READ: "read", OP_WRITE: "write", OP_SYNC: "sync", OP_ZERO: "zero", OP_TRIM: "trim",
       OP_PING: "ping"}
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


class PeerClient:
    """One pipelined connection to a peer's replication server; reconnects
    on the next request after a failure. All methods run on one event loop."""

    def __init__(self, node: str, address: str, connect_timeout: float = 2.0):
        self.node = node
        self.address = address
        self.connect_timeout = connect_timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            host, _, port = self.address.rpartition(":")
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)),
                                                        self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                raise PeerUnavailable(f"peer {self.node} at {self.address}: {exc or 'connect timeout'}") \
                    from None
            sock = writer.get_extra_info("socket")
            if sock is not None:
                import socket as _s
                sock.setsockopt(_s.IPPROTO_TCP, _s.TCP_NODELAY, 1)
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(self._read_replies(reader, writer))
            return writer

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        err: Exception = PeerUnavailable(f"connection to peer {self.node} closed")
        try:
            while True:
                head = await reader.readexactly(REP.size)
                magic, status, req_id, gen, length = REP.unpack(head)
                if magic != REP_MAGIC or length > MAX_PAYLOAD:
                    err = PeerUnavailable(f"peer {self.node}: garbled reply")
                    break
                payload = await reader.readexactly(length) if length else b""
                fut = self._pending.pop(req_id, None)
                if fut is None or fut.done():
                    continue  # the caller gave up (timeout)
                if status:
                    fut.set_exception(PeerError(status, gen, payload.decode(errors="replace")))
                else:
                    fut.set_result((gen, payload))
        except (asyncio.IncompleteReadError, OSError) as exc:
            err = PeerUnavailable(f"connection to peer {self.node} lost: {exc}")
        except asyncio.CancelledError:
            err = PeerUnavailable(f"connection to peer {self.node} closed")
            raise
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(err)

    async def call(self, op: int, volume: str, uid: str, index: int, generation: int, offset: int = 0,
                   length: int = 0, payload=b"", flags: int = 0) -> tuple[int, bytes]:
        """Send one request, wait for its reply: (generation, payload).
        Raises PeerError (an error status) or PeerUnavailable."""
        writer = await self._connect()
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        if op == OP_WRITE:
            length = len(payload)
        writer.writelines(encode_request(Request(op, flags, req_id, generation, volume, uid, index,
                                                 length, offset, payload)))
        try:
            if writer.transport.get_write_buffer_size() > (4 << 20):
                await writer.drain()
            return await fut
        finally:
            self._pending.pop(req_id, None)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass
