"""An asyncio NBD server: the protocol layer of braid-storaged's data path.

This module speaks the Network Block Device protocol (fixed newstyle
negotiation, simple and structured replies, the ``base:allocation`` metadata
context) and hands every data operation to an :class:`Export`, which the
storage daemon implements on top of its replicated volumes.  The protocol is
specified in ``doc/proto.md`` of https://github.com/NetworkBlockDevice/nbd.

Design notes:

* Each connection is an :class:`asyncio.BufferedProtocol`.  Request headers
  are parsed straight out of a per-connection scratch buffer (many pipelined
  headers per ``recv``), and the payload of a large ``NBD_CMD_WRITE`` is
  received directly into the bytearray handed to :meth:`Export.write`, so the
  write path copies nothing in Python beyond what already sat in the scratch
  buffer.
* Requests on one connection run concurrently as tasks, at most
  ``max_inflight`` at a time; replies go out in completion order.  Each reply
  is queued whole (header and data as separate buffers, never concatenated)
  and everything queued during one loop iteration goes out in a single
  ``writelines`` call, which uvloop turns into one ``writev``: replies can
  never interleave, no writer lock is needed, and a pipelining client costs
  one send syscall per batch rather than per reply.  (On asyncio 3.11, whose
  ``writelines`` would copy, each reply is written as it is produced.)
* Flow control: the connection stops reading from the socket while
  ``max_inflight`` requests are in flight, while the scratch buffer is full,
  or while the transport's write buffer is above its high-water mark
  (``pause_writing``).  Together these bound what one client can make the
  server buffer to about ``max_inflight * max_request`` plus the write-buffer
  high-water mark.
* Handshake options are handled by one coroutine per connection that reads
  the same scratch buffer; option payloads are capped at 64 KiB (bigger ones
  are discarded in chunks and refused with ``NBD_REP_ERR_TOO_BIG``), a
  connection gets at most 256 options and ``handshake_timeout`` seconds.
* Ending a connection (``NBD_CMD_DISC``, the client's EOF, a protocol
  violation, server shutdown) stops reading, lets the requests in flight
  finish and reply, then closes.  If the client vanished, its in-flight
  requests still run to completion (their replies are dropped); only
  :meth:`NbdServer.shutdown` past its timeout cancels handlers.

TLS (``NBD_OPT_STARTTLS``) only where the server is given an ssl context, and
then it is required (every other option before it: ``NBD_REP_ERR_TLS_REQD``);
elsewhere STARTTLS is refused with ``NBD_REP_ERR_POLICY``. Extended headers and
``NBD_CMD_CACHE`` are not supported: extended headers
with ``NBD_REP_ERR_UNSUP``, and the cache command (never advertised) fails
with ``NBD_EINVAL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import logging
import os
import shutil
import socket
import stat
import struct
from typing import Callable, Protocol

__all__ = [
    "EINVAL",
    "EIO",
    "ENOMEM",
    "ENOSPC",
    "ENOTSUP",
    "EOVERFLOW",
    "EPERM",
    "ESHUTDOWN",
    "NBD_STATE_HOLE",
    "NBD_STATE_ZERO",
    "Export",
    "NbdError",
    "NbdServer",
]

# --- NBD error values (the protocol fixes these; they are not the host's errno) ---
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
_ERROR_NAMES = {EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL", ENOSPC: "ENOSPC",
                EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN"}

# --- base:allocation status flags ---
NBD_STATE_HOLE = 1
NBD_STATE_ZERO = 2

# --- magics ---
_NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT", also the option request magic
_OPT_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags (server) and client flags (same bits) ---
_FLAG_FIXED_NEWSTYLE = 1 << 0
_FLAG_NO_ZEROES = 1 << 1
_SERVER_HANDSHAKE_FLAGS = _FLAG_FIXED_NEWSTYLE | _FLAG_NO_ZEROES

# --- transmission flags ---
_TF_HAS_FLAGS = 1 << 0
_TF_READ_ONLY = 1 << 1
_TF_SEND_FLUSH = 1 << 2
_TF_SEND_FUA = 1 << 3
_TF_SEND_TRIM = 1 << 5
_TF_SEND_WRITE_ZEROES = 1 << 6
_TF_SEND_DF = 1 << 7
_TF_CAN_MULTI_CONN = 1 << 8
_TF_SEND_FAST_ZERO = 1 << 11
_TF_BASE = (_TF_HAS_FLAGS | _TF_SEND_FLUSH | _TF_SEND_FUA | _TF_SEND_TRIM | _TF_SEND_WRITE_ZEROES
            | _TF_CAN_MULTI_CONN | _TF_SEND_FAST_ZERO)

# --- options ---
_OPT_EXPORT_NAME = 1
_OPT_ABORT = 2
_OPT_LIST = 3
_OPT_STARTTLS = 5
_OPT_INFO = 6
_OPT_GO = 7
_OPT_STRUCTURED_REPLY = 8
_OPT_LIST_META_CONTEXT = 9
_OPT_SET_META_CONTEXT = 10

# --- option replies ---
_REP_ACK = 1
_REP_SERVER = 2
_REP_INFO = 3
_REP_META_CONTEXT = 4
_REP_ERR_UNSUP = (1 << 31) + 1
_REP_ERR_POLICY = (1 << 31) + 2
_REP_ERR_INVALID = (1 << 31) + 3
_REP_ERR_TLS_REQD = (1 << 31) + 5
_REP_ERR_UNKNOWN = (1 << 31) + 6
_REP_ERR_TOO_BIG = (1 << 31) + 9

# --- NBD_REP_INFO types ---
_INFO_EXPORT = 0
_INFO_NAME = 1
_INFO_DESCRIPTION = 2
_INFO_BLOCK_SIZE = 3

# --- commands and command flags ---
_CMD_READ = 0
_CMD_WRITE = 1
_CMD_DISC = 2
_CMD_FLUSH = 3
_CMD_TRIM = 4
_CMD_WRITE_ZEROES = 6
_CMD_BLOCK_STATUS = 7
_CMD_NAMES = {_CMD_READ: "read", _CMD_WRITE: "write", _CMD_DISC: "disc", _CMD_FLUSH: "flush",
              _CMD_TRIM: "trim", _CMD_WRITE_ZEROES: "write_zeroes", _CMD_BLOCK_STATUS: "block_status"}

_CMD_FLAG_FUA = 1 << 0
_CMD_FLAG_NO_HOLE = 1 << 1
_CMD_FLAG_DF = 1 << 2
_CMD_FLAG_REQ_ONE = 1 << 3
_CMD_FLAG_FAST_ZERO = 1 << 4

# Command flags each command accepts.  FUA is valid on every command once
# NBD_FLAG_SEND_FUA is advertised (the spec says the server MUST accept it).
_ALLOWED_FLAGS = {
    _CMD_READ: _CMD_FLAG_FUA | _CMD_FLAG_DF,
    _CMD_WRITE: _CMD_FLAG_FUA,
    _CMD_FLUSH: _CMD_FLAG_FUA,
    _CMD_TRIM: _CMD_FLAG_FUA,
    _CMD_WRITE_ZEROES: _CMD_FLAG_FUA | _CMD_FLAG_NO_HOLE | _CMD_FLAG_FAST_ZERO,
    _CMD_BLOCK_STATUS: _CMD_FLAG_FUA | _CMD_FLAG_REQ_ONE,
}

# --- structured replies ---
_REPLY_FLAG_DONE = 1 << 0
_REPLY_TYPE_OFFSET_DATA = 1
_REPLY_TYPE_BLOCK_STATUS = 5
_REPLY_TYPE_ERROR = (1 << 15) + 1
_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

_BASE_ALLOCATION = "base:allocation"
_BASE_ALLOCATION_ID = 1       # our (only) metadata context id in SET_META_CONTEXT replies

# --- limits ---
_MAX_OPTION_LENGTH = 64 * 1024   # bigger option payloads are discarded and refused
_MAX_OPTIONS = 256               # options per connection before we call it a DoS and hang up
_MAX_STRING = 4096               # the spec's limit on names, queries and messages
_MAX_EXTENTS = 1 << 20           # the spec's limit on descriptors per block-status chunk
_SCRATCH_SIZE = 256 * 1024       # per-connection receive buffer for headers and small payloads
_MIN_RECV = 4096                 # compact the scratch buffer when less than this is free
_WRITE_HIGH_WATER = 4 * 1024 * 1024
_WRITE_LOW_WATER = 1024 * 1024
_SMALL_REPLY = 16 * 1024         # below this, join header and data when the transport can't writev

# --- wire formats (all big-endian) ---
_HELLO = struct.pack(">QQH", _NBDMAGIC, _IHAVEOPT, _SERVER_HANDSHAKE_FLAGS)
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")             # magic, option, length
_OPTION_REPLY = struct.Struct(">QIII")             # magic, option, reply type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")          # size, transmission flags
_INFO_EXPORT_STRUCT = struct.Struct(">HQH")        # NBD_INFO_EXPORT, size, flags
_INFO_BLOCK_SIZE_STRUCT = struct.Struct(">HIII")   # NBD_INFO_BLOCK_SIZE, min, preferred, max
_REQUEST = struct.Struct(">IHHQQI")                # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")              # magic, error, cookie
_CHUNK_HEADER = struct.Struct(">IHHQI")            # magic, flags, type, cookie, length
_OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")     # chunk header + offset
_ERROR_PREFIX = struct.Struct(">IH")               # error, message length
_U64 = struct.Struct(">Q")

_REQUEST_SIZE = _REQUEST.size
_ZEROES_124 = bytes(124)


class NbdError(Exception):
    """Raised by an Export to send an NBD error reply.

    ``errno`` is the NBD error value (EPERM=1, EIO=5, ENOMEM=12, EINVAL=22,
    ENOSPC=28, EOVERFLOW=75, ENOTSUP=95, ESHUTDOWN=108); ``message`` is shown
    to the client's user when structured replies are in use.  ``offset`` may
    name the first byte that failed (within the request); it is then reported
    with ``NBD_REPLY_TYPE_ERROR_OFFSET``.
    """

    def __init__(self, errno: int, message: str = "", *, offset: int | None = None):
        super().__init__(errno, message)
        self.errno = errno
        self.message = message
        self.offset = offset

    def __str__(self) -> str:
        name = _ERROR_NAMES.get(self.errno, str(self.errno))
        return f"{name}: {self.message}" if self.message else name


class Export(Protocol):
    """What the server needs from one exported volume (implemented by the storage daemon).

    ``size`` may grow while connections are open: it is read again for every
    request.  Methods raise :class:`NbdError` to fail a request with a specific
    NBD error; any other exception is logged and reported as EIO.  Requests
    on one connection (and across connections) run concurrently.
    """

    size: int
    read_only: bool
    description: str

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return exactly ``length`` bytes.  The object is handed to the transport as is,
        so it must not be modified afterwards."""

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Write ``data`` (the export may keep a reference to it)."""

    async def flush(self) -> None:
        """Make every completed write durable (on all connections: we advertise multi-conn)."""

    async def trim(self, offset: int, length: int, fua: bool) -> None: ...

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs starting at offset, flags NBD_STATE_HOLE=1 | NBD_STATE_ZERO=2."""


class _Closed(Exception):
    """The peer went away (EOF or connection lost) while the handshake was reading."""


def _encode_string(text: str) -> bytes:
    """UTF-8 encode ``text``, truncated (on a character boundary) to the spec's 4096 bytes."""
    raw = text.encode("utf-8", "replace")
    if len(raw) > _MAX_STRING:
        raw = raw[:_MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


def _decode_string(raw: bytes) -> str | None:
    """Decode a client string, or None if it is not a valid NBD string (UTF-8, no NUL, <= 4096 bytes)."""
    if len(raw) > _MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _Stats:
    """Server-wide counters (the event loop is single-threaded; stats() copies them out)."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_active = 0
        self.requests = {name: 0 for name in _CMD_NAMES.values()}
        self.requests["invalid"] = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors: dict[str, int] = {}
        self.export_failures = 0     # unexpected exceptions raised by an Export (replied EIO)
        self.protocol_errors = 0     # connections dropped for violating the protocol

    def error(self, err: int) -> None:
        name = _ERROR_NAMES.get(err, str(err))
        self.errors[name] = self.errors.get(name, 0) + 1


class NbdServer:
    """Serves Exports over NBD on unix sockets, TCP, or already-connected sockets.

    ``lookup(name)`` resolves an export name (called at NBD_OPT_GO, NBD_OPT_INFO,
    NBD_OPT_EXPORT_NAME and metadata-context negotiation; None means no such
    export); the connection keeps the returned object.  ``names()`` lists the
    exports for NBD_OPT_LIST.  An empty export name means ``default_export``
    when that is set.
    """

    def __init__(self, lookup: Callable[[str], Export | None], names: Callable[[], list[str]], *,
                 max_request: int = 32 << 20, preferred_block: int = 4096, max_inflight: int = 64,
                 default_export: str | None = None, log: logging.Logger | None = None,
                 handshake_timeout: float | None = 30.0, tls=None, tls_admit=None):
        """``tls`` (an ``ssl.SSLContext`` for the server side): TLS is required
        (NBD_OPT_STARTTLS before anything else; the spec's FORCEDTLS mode);
        ``tls_admit(transport) -> str``: "" to go on with the TLS peer, else
        why not."""
        if preferred_block < 512 or preferred_block & (preferred_block - 1):
            raise ValueError("preferred_block must be a power of two >= 512")
        if not preferred_block <= max_request <= 0xFFFFFFFF - 8:
            raise ValueError("max_request must be >= preferred_block and fit a 32-bit reply length")
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self._lookup = lookup
        self._names = names
        self.tls = tls
        self.tls_admit = tls_admit
        self.max_request = max_request
        self.preferred_block = preferred_block
        self.max_inflight = max_inflight
        self.default_export = default_export
        self.handshake_timeout = handshake_timeout
        self.log = log or logging.getLogger("braid.storaged.nbd")
        self._stats = _Stats()
        self._connections: set[_Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._next_id = 0

    # --- listening ---

    def _new_connection(self) -> _Connection:
        self._next_id += 1
        return _Connection(self, self._next_id)

    async def serve_unix(self, path: str, mode: int = 0o660, group: str | None = None) -> asyncio.AbstractServer:
        """Listen on a unix socket at ``path`` (a stale socket left there is replaced).

        The socket file gets ``mode`` and, if given, ``group`` before the server
        starts listening, so no client can connect through looser permissions.
        """
        loop = asyncio.get_running_loop()
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, mode)
            if group is not None:
                shutil.chown(path, group=group)
            server = await loop.create_unix_server(self._new_connection, sock=sock, backlog=128)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._servers.append(server)
        self.log.info("nbd: listening on unix socket %s", path)
        return server

    async def serve_tcp(self, host: str, port: int) -> asyncio.AbstractServer:
        """Listen on TCP ``host``:``port`` (port 0 picks a free port: read server.sockets)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._new_connection, host, port, reuse_address=True, backlog=128)
        self._servers.append(server)
        self.log.info("nbd: listening on tcp %s", ", ".join(str(s.getsockname()) for s in server.sockets))
        return server

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve one NBD connection on an already-connected stream socket until it closes.

        Used by tests (over a socketpair) and by callers that accept connections
        themselves.  Cancelling this aborts the connection.
        """
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        _, conn = await loop.connect_accepted_socket(self._new_connection, sock)
        try:
            await conn.wait_closed()
        except asyncio.CancelledError:
            conn.abort()
            raise

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop listening and close every connection.

        Connections still negotiating are dropped; connections in transmission
        stop reading requests, get up to ``timeout`` seconds to finish the ones
        in flight, then are aborted (handlers cancelled).
        """
        for server in self._servers:
            server.close()
        conns = list(self._connections)
        if conns:
            await asyncio.gather(*(c.shutdown(timeout) for c in conns))
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def stats(self) -> dict:
        """A snapshot of the counters: connections, requests by command, bytes, errors."""
        s = self._stats
        return {
            "connections_total": s.connections_total,
            "connections_active": s.connections_active,
            "requests": dict(s.requests),
            "bytes_read": s.bytes_read,
            "bytes_written": s.bytes_written,
            "errors": dict(s.errors),
            "errors_total": sum(s.errors.values()),
            "export_failures": s.export_failures,
            "protocol_errors": s.protocol_errors,
        }

    # --- helpers for connections ---

    def _resolve(self, name: str) -> tuple[str, Export | None]:
        """Map a client's export name to (canonical name, Export or None)."""
        if name == "" and self.default_export is not None:
            name = self.default_export
        try:
            return name, self._lookup(name)
        except Exception:
            self.log.exception("nbd: export lookup for %r failed", name)
            return name, None


def _remove_stale_socket(path: str) -> None:
    """Unlink a unix socket nobody listens on any more; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(_errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(_errno.EADDRINUSE, "another server is listening on", path)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: handshake coroutine, then the transmission-phase parser."""

    def __init__(self, server: NbdServer, conn_id: int):
        self._server = server
        self._stats = server._stats
        self._log = server.log
        self._name = f"nbd#{conn_id}"
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._lost = False                  # connection_lost has run
        self._closed = self._loop.create_future()   # connection lost and no handler left
        # Outgoing messages of this loop iteration, written by one writelines() (one writev
        # under uvloop) at the end of it; None where writelines would copy (asyncio 3.11).
        self._out: list | None = None

        # Receive buffer: bytes [_rpos, _wpos) are received but not yet consumed.
        self._buf = bytearray(_SCRATCH_SIZE)
        self._view = memoryview(self._buf)
        self._rpos = 0
        self._wpos = 0
        self._eof = False
        self._reading = True

        # Handshake state.
        self._handshake_task: asyncio.Task | None = None
        self._waiter: asyncio.Future | None = None
        self._need = 0
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None   # export whose base:allocation context was selected
        self._tls = False                   # the session was upgraded by NBD_OPT_STARTTLS

        # Transmission state.
        self._transmitting = False
        self._closing = False               # no more requests will be read
        self._export: Export | None = None
        self._export_name = ""
        self._block_status_ok = False
        self._max_request = server.max_request
        self._max_inflight = server.max_inflight
        self._inflight = 0
        self._tasks: set[asyncio.Task] = set()
        self._write_paused = False
        # A WRITE whose payload is being received straight into its own buffer.
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._payload_pos = 0
        self._payload_req: tuple[int, int, int] = (0, 0, 0)   # flags, cookie, offset
        # Bytes of a refused WRITE payload still to be discarded.
        self._skip = 0

    # --- asyncio protocol callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._server._connections.add(self)
        self._stats.connections_total += 1
        self._stats.connections_active += 1
        peer = transport.get_extra_info("peername")
        if peer:
            self._name += f" {peer}"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_LOW_WATER)
        # uvloop's writelines is a zero-copy writev, so replies are batched per loop
        # iteration; asyncio 3.11's default joins the buffers, so there each reply is
        # written as it is produced (header and large data separately).
        if type(transport).writelines is not asyncio.WriteTransport.writelines:
            self._out = []
        self._log.debug("%s: connected", self._name)
        self._handshake_task = self._loop.create_task(self._handshake())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload_view is not None:
            return self._payload_view[self._payload_pos:]
        self._compact()
        return self._view[self._wpos:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._payload_view is not None:
                self._payload_pos += nbytes
                if self._payload_pos == len(self._payload_view):
                    self._payload_complete()
                    self._process()
            else:
                self._wpos += nbytes
                if self._transmitting:
                    self._process()
                else:
                    self._wake()
            self._update_reading()
        except Exception:
            # Never let an exception escape into the transport (uvloop would abort noisily).
            self._log.exception("%s: internal error while parsing; closing", self._name)
            self.abort()

    def eof_received(self) -> bool:
        self._eof = True
        if self._transmitting:
            self._log.debug("%s: client closed its side", self._name)
            if self._payload_view is not None:
                self._begin_close()     # a write cut short: drop it
            else:
                self._process()         # answer the complete requests still buffered, then close
        else:
            self._wake()
        return True   # keep the transport open until our in-flight replies are written

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._log.debug("%s: connection lost: %s", self._name, exc)
        self._lost = True
        self._closing = True
        self._eof = True
        self._drop_payload()
        self._wake()
        if self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        self._server._connections.discard(self)
        self._stats.connections_active -= 1
        self._maybe_closed()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transmitting:
            self._process()
        self._update_reading()

    # --- lifecycle ---

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def abort(self) -> None:
        """Hard disconnect now; in-flight handlers are cancelled."""
        self._closing = True
        self._drop_payload()
        for task in list(self._tasks):
            task.cancel()
        if self._handshake_task is not None:
            self._handshake_task.cancel()
        if self._transport is not None and not self._lost:
            self._transport.abort()

    async def shutdown(self, timeout: float) -> None:
        if not self._transmitting:
            self.abort()
        else:
            self._begin_close()
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        except asyncio.TimeoutError:
            self._log.warning("%s: not closed %ss into shutdown (%d requests in flight, replies unsent); "
                              "aborting", self._name, timeout, self._inflight)
            self.abort()
            await asyncio.shield(self._closed)

    def _begin_close(self) -> None:
        """Stop reading requests; close once every in-flight request has replied."""
        self._closing = True
        self._drop_payload()
        self._update_reading()
        if self._inflight == 0:
            self._close_transport()

    def _close_transport(self) -> None:
        """Close after writing everything queued (our batch, then the transport's buffer)."""
        if self._transport is not None and not self._lost:
            self._flush()
            self._transport.close()

    def _protocol_error(self, why: str, *args) -> None:
        self._stats.protocol_errors += 1
        self._log.warning("%s: " + why + "; disconnecting", self._name, *args)
        self._begin_close()

    def _maybe_closed(self) -> None:
        if self._lost and self._inflight == 0 and not self._closed.done():
            self._closed.set_result(None)

    # --- receive buffer management ---

    def _compact(self) -> None:
        rpos, wpos = self._rpos, self._wpos
        if rpos == wpos:
            self._rpos = self._wpos = 0
        elif len(self._buf) - wpos < _MIN_RECV and rpos:
            n = wpos - rpos
            self._view[:n] = bytes(self._view[rpos:wpos])   # via a copy: the ranges may overlap
            self._rpos, self._wpos = 0, n

    def _update_reading(self) -> None:
        """Read from the socket only while we have room and the client is within its limits."""
        if self._lost or self._transport is None:
            return
        if self._payload_view is not None:
            want = True    # always finish receiving a payload we've accepted
        else:
            self._compact()
            want = (not self._closing and not self._write_paused
                    and self._wpos < len(self._buf)
                    and (not self._transmitting or self._inflight < self._max_inflight))
        if want != self._reading:
            self._reading = want
            if want:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    # --- handshake ---

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and (self._wpos - self._rpos >= self._need or self._eof):
            w.set_result(None)

    async def _wait_data(self, n: int) -> None:
        """Handshake: wait until ``n`` bytes (n <= scratch size) are buffered; _Closed on EOF."""
        while self._wpos - self._rpos < n:
            if self._eof:
                raise _Closed()
            self._need = n
            self._waiter = self._loop.create_future()
            self._update_reading()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _recv(self, n: int) -> bytes:
        """Handshake read: the next ``n`` bytes."""
        await self._wait_data(n)
        data = bytes(self._view[self._rpos:self._rpos + n])
        self._rpos += n
        self._update_reading()
        return data

    async def _discard(self, n: int) -> None:
        """Handshake: drop the next ``n`` bytes as they arrive, without buffering them."""
        while n:
            await self._wait_data(1)
            take = min(self._wpos - self._rpos, n)
            self._rpos += take
            n -= take
            self._update_reading()

    def _send(self, data: bytes) -> None:
        """Queue one complete message (replies never interleave: each is queued whole)."""
        t = self._transport
        if t is None or self._lost or t.is_closing():
            return
        out = self._out
        if out is None:
            t.write(data)
            return
        if not out:
            self._loop.call_soon(self._flush)
        out.append(data)

    def _flush(self) -> None:
        """Write the messages queued during this loop iteration with one writelines()."""
        out = self._out
        if not out:
            return
        t = self._transport
        if t is not None and not self._lost and not t.is_closing():
            t.writelines(out)
        out.clear()

    def _opt_reply(self, opt: int, rep: int, payload: bytes = b"") -> None:
        self._send(_OPTION_REPLY.pack(_OPT_REPLY_MAGIC, opt, rep, len(payload)) + payload)

    def _opt_error(self, opt: int, rep: int, message: str) -> None:
        self._log.debug("%s: option %d refused (%#x): %s", self._name, opt, rep, message)
        self._opt_reply(opt, rep, _encode_string(message))

    async def _handshake(self) -> None:
        try:
            if self._server.handshake_timeout is None:
                await self._negotiate()
            else:
                async with asyncio.timeout(self._server.handshake_timeout):
                    await self._negotiate()
        except _Closed:
            self._log.debug("%s: client left during the handshake", self._name)
            self._begin_close()
        except TimeoutError:
            self._stats.protocol_errors += 1
            self._log.warning("%s: handshake not finished in %ss; disconnecting",
                              self._name, self._server.handshake_timeout)
            self._begin_close()
        except asyncio.CancelledError:
            self._begin_close()
            raise
        except Exception:
            self._log.exception("%s: handshake failed", self._name)
            self._begin_close()
        finally:
            self._handshake_task = None

    async def _negotiate(self) -> None:
        """Fixed newstyle negotiation; returns once transmission starts (or the session ends)."""
        self._send(_HELLO)
        (cflags,) = _U32.unpack(await self._recv(4))
        if cflags & ~_SERVER_HANDSHAKE_FLAGS:
            self._protocol_error("unknown client flags %#x", cflags)
            return
        self._no_zeroes = bool(cflags & _FLAG_NO_ZEROES)
        for _ in range(_MAX_OPTIONS):
            magic, opt, length = _OPTION_HEADER.unpack(await self._recv(_OPTION_HEADER.size))
            if magic != _IHAVEOPT:
                self._protocol_error("bad option magic %#x", magic)
                return
            if length > _MAX_OPTION_LENGTH:
                if opt == _OPT_EXPORT_NAME:   # no way to reply with an error
                    self._protocol_error("NBD_OPT_EXPORT_NAME of %d bytes", length)
                    return
                await self._discard(length)
                self._opt_error(opt, _REP_ERR_TOO_BIG, f"option data of {length} bytes is too big")
                continue
            data = await self._recv(length) if length else b""
            if opt == _OPT_STARTTLS and self._server.tls is not None and not data and not self._tls:
                if not await self._starttls():
                    return
                continue
            if self._server.tls is not None and not self._tls and opt != _OPT_ABORT:
                if opt == _OPT_EXPORT_NAME:   # cannot be refused politely
                    self._protocol_error("NBD_OPT_EXPORT_NAME before TLS")
                    return
                self._opt_error(opt, _REP_ERR_TLS_REQD, "TLS is required: NBD_OPT_STARTTLS first")
                continue
            if self._option(opt, data):
                return
        self._protocol_error("more than %d options", _MAX_OPTIONS)

    async def _starttls(self) -> bool:
        """NBD_OPT_STARTTLS: ACK, then the TLS handshake on the same socket
        (the client sends nothing else before its ClientHello)."""
        self._opt_reply(_OPT_STARTTLS, _REP_ACK)
        self._flush()
        if self._wpos > self._rpos:
            self._protocol_error("data after NBD_OPT_STARTTLS before the TLS handshake")
            return False
        try:
            transport = await self._loop.start_tls(self._transport, self, self._server.tls, server_side=True,
                                                   ssl_handshake_timeout=10.0)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            self._log.warning("%s: TLS handshake failed: %s", self._name, exc)
            self._tls_failed(exc)
            return False
        if transport is None:
            self._tls_failed(None)
            return False
        self._transport = transport
        self._out = None   # the TLS transport copies anyway: write each message as it comes
        self._tls = True
        why = self._server.tls_admit(transport) if self._server.tls_admit else ""
        if why:
            self._log.warning("%s: refused after TLS: %s", self._name, why)
            self._begin_close()
            return False
        return True

    def _tls_failed(self, exc: BaseException | None) -> None:
        """The TLS layer took the socket and failed: it may never tell us the
        connection is gone, so end it here."""
        if self._transport is not None:
            self._transport.abort()
        if not self._lost:
            self.connection_lost(exc if isinstance(exc, Exception) else None)

    def _option(self, opt: int, data: bytes) -> bool:
        """Handle one option; True when negotiation is over (transmission entered or aborted)."""
        if opt == _OPT_GO or opt == _OPT_INFO:
            return self._opt_info_go(opt, data)
        if opt == _OPT_EXPORT_NAME:
            return self._opt_export_name(data)
        if opt == _OPT_STRUCTURED_REPLY:
            if data:
                self._opt_error(opt, _REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            else:
                self._structured = True
                self._opt_reply(opt, _REP_ACK)
            return False
        if opt == _OPT_LIST_META_CONTEXT or opt == _OPT_SET_META_CONTEXT:
            self._opt_meta_context(opt, data)
            return False
        if opt == _OPT_LIST:
            self._opt_list(data)
            return False
        if opt == _OPT_ABORT:
            # The spec says to ignore any data sent with the abort.
            self._opt_reply(opt, _REP_ACK)
            self._log.debug("%s: client aborted the negotiation", self._name)
            self._begin_close()
            return True
        if opt == _OPT_STARTTLS:
            if data:
                self._opt_error(opt, _REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            else:
                self._opt_error(opt, _REP_ERR_POLICY, "TLS is not enabled on this server")
            return False
        self._opt_error(opt, _REP_ERR_UNSUP, f"option {opt} is not supported")
        return False

    def _opt_list(self, data: bytes) -> None:
        if data:
            self._opt_error(_OPT_LIST, _REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        try:
            names = list(self._server._names())
        except Exception:
            self._log.exception("%s: listing exports failed", self._name)
            self._opt_error(_OPT_LIST, _REP_ERR_POLICY, "cannot list exports right now")
            return
        replies = []
        for name in names:
            raw = _encode_string(name)
            replies.append(_OPTION_REPLY.pack(_OPT_REPLY_MAGIC, _OPT_LIST, _REP_SERVER, 4 + len(raw))
                           + _U32.pack(len(raw)) + raw)
        replies.append(_OPTION_REPLY.pack(_OPT_REPLY_MAGIC, _OPT_LIST, _REP_ACK, 0))
        self._send(b"".join(replies))

    def _transmission_flags(self, export: Export) -> int:
        flags = _TF_BASE
        if export.read_only:
            flags |= _TF_READ_ONLY
        if self._structured:
            flags |= _TF_SEND_DF
        return flags

    def _opt_info_go(self, opt: int, data: bytes) -> bool:
        # u32 name length, name, u16 number of info requests, u16 each.
        if len(data) < 6:
            self._opt_error(opt, _REP_ERR_INVALID, "option data too short")
            return False
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > len(data) - 6:
            self._opt_error(opt, _REP_ERR_INVALID, "export name length exceeds the option data")
            return False
        (nreqs,) = _U16.unpack_from(data, 4 + namelen)
        if len(data) != 6 + namelen + 2 * nreqs:
            self._opt_error(opt, _REP_ERR_INVALID, "option length does not match its information requests")
            return False
        requests = set(struct.unpack_from(f">{nreqs}H", data, 6 + namelen))
        name = _decode_string(data[4:4 + namelen])
        if name is None:
            self._opt_error(opt, _REP_ERR_INVALID, "export name is not a valid string")
            return False
        canonical, export = self._server._resolve(name)
        if export is None:
            self._opt_error(opt, _REP_ERR_UNKNOWN, f"no export named {name!r}")
            return False
        flags = self._transmission_flags(export)
        infos = [_INFO_EXPORT_STRUCT.pack(_INFO_EXPORT, export.size, flags)]
        if _INFO_NAME in requests:
            infos.append(_U16.pack(_INFO_NAME) + _encode_string(canonical))
        if _INFO_DESCRIPTION in requests and export.description:
            infos.append(_U16.pack(_INFO_DESCRIPTION) + _encode_string(export.description))
        # Always advertise our constraints (clients ignore what they did not ask for).
        infos.append(_INFO_BLOCK_SIZE_STRUCT.pack(_INFO_BLOCK_SIZE, 1, self._server.preferred_block,
                                                  self._max_request))
        out = [_OPTION_REPLY.pack(_OPT_REPLY_MAGIC, opt, _REP_INFO, len(i)) + i for i in infos]
        out.append(_OPTION_REPLY.pack(_OPT_REPLY_MAGIC, opt, _REP_ACK, 0))
        self._send(b"".join(out))
        if opt == _OPT_GO:
            self._enter_transmission(canonical, export)
            return True
        return False

    def _opt_export_name(self, data: bytes) -> bool:
        name = _decode_string(data)
        canonical, export = self._server._resolve(name) if name is not None else ("", None)
        if export is None:
            # NBD_OPT_EXPORT_NAME cannot fail politely: the spec says to hang up.
            self._protocol_error("NBD_OPT_EXPORT_NAME for unknown export %r", data[:256])
            return True
        reply = _EXPORT_NAME_REPLY.pack(export.size, self._transmission_flags(export))
        self._send(reply if self._no_zeroes else reply + _ZEROES_124)
        self._enter_transmission(canonical, export)
        return True

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == _OPT_SET_META_CONTEXT
        if setting:
            self._meta_export = None   # SET replaces the selection, even when it fails
            if not self._structured:
                self._opt_error(opt, _REP_ERR_INVALID, "negotiate structured replies first")
                return
        # u32 name length, name, u32 query count, queries (u32 length + string each).
        if len(data) < 8:
            self._opt_error(opt, _REP_ERR_INVALID, "option data too short")
            return
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > len(data) - 8:
            self._opt_error(opt, _REP_ERR_INVALID, "export name length exceeds the option data")
            return
        (nqueries,) = _U32.unpack_from(data, 4 + namelen)
        pos = 8 + namelen
        queries = []
        for _ in range(nqueries):      # each query needs >= 4 bytes, so this ends quickly on garbage
            if pos + 4 > len(data):
                self._opt_error(opt, _REP_ERR_INVALID, "query count exceeds the option data")
                return
            (qlen,) = _U32.unpack_from(data, pos)
            pos += 4
            if qlen > len(data) - pos:
                self._opt_error(opt, _REP_ERR_INVALID, "query length exceeds the option data")
                return
            query = _decode_string(data[pos:pos + qlen])
            if query is None:
                self._opt_error(opt, _REP_ERR_INVALID, "query is not a valid string")
                return
            queries.append(query)
            pos += qlen
        if pos != len(data):
            self._opt_error(opt, _REP_ERR_INVALID, "trailing bytes after the queries")
            return
        name = _decode_string(data[4:4 + namelen])
        if name is None:
            self._opt_error(opt, _REP_ERR_INVALID, "export name is not a valid string")
            return
        canonical, export = self._server._resolve(name)
        if export is None:
            self._opt_error(opt, _REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        # base:allocation is our only context.  LIST with no queries lists everything and
        # "base:" is the namespace wildcard; SET selects only by full name.  Queries for
        # other namespaces (or malformed ones) are ignored, as the spec requires.
        if setting:
            selected = _BASE_ALLOCATION in queries
        else:
            selected = not queries or any(q in ("base:", _BASE_ALLOCATION) for q in queries)
        out = []
        if selected:
            ctx_id = _BASE_ALLOCATION_ID if setting else 0
            payload = _U32.pack(ctx_id) + _BASE_ALLOCATION.encode()
            out.append(_OPTION_REPLY.pack(_OPT_REPLY_MAGIC, opt, _REP_META_CONTEXT, len(payload)) + payload)
            if setting:
                self._meta_export = canonical
        out.append(_OPTION_REPLY.pack(_OPT_REPLY_MAGIC, opt, _REP_ACK, 0))
        self._send(b"".join(out))

    def _enter_transmission(self, name: str, export: Export) -> None:
        self._export = export
        self._export_name = name
        self._block_status_ok = self._structured and self._meta_export == name
        self._transmitting = True
        self._log.debug("%s: transmission on export %r (structured=%s, block status=%s)",
                        self._name, name, self._structured, self._block_status_ok)
        # Anything the client pipelined behind the final option is a request already.
        self._process()
        self._update_reading()

    # --- transmission: parsing ---

    def _process(self) -> None:
        """Parse and dispatch every complete request in the receive buffer (while allowed).

        Stops early while the client is at its in-flight limit or not reading its
        replies (the rest stays buffered until a slot or the socket frees up).  Once
        the client has closed its side, running out of complete requests ends the
        connection (after the ones in flight have replied).
        """
        buf = self._buf
        view = self._view
        stats = self._stats
        while not self._closing:
            if self._skip:
                take = min(self._skip, self._wpos - self._rpos)
                self._rpos += take
                self._skip -= take
                if self._skip:
                    if self._eof:
                        self._begin_close()
                    return
            if self._inflight >= self._max_inflight or self._write_paused:
                return
            if self._wpos - self._rpos < _REQUEST_SIZE:
                if self._eof:
                    self._begin_close()
                return
            magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(buf, self._rpos)
            self._rpos += _REQUEST_SIZE
            if magic != _REQUEST_MAGIC:
                self._protocol_error("bad request magic %#x", magic)
                return
            if cmd == _CMD_WRITE:
                stats.requests["write"] += 1
                if length > self._max_request:
                    # We cannot trust the framing any more; the spec allows hanging up.
                    self._protocol_error("write payload of %d bytes exceeds the maximum %d",
                                         length, self._max_request)
                    return
                refused = self._validate(cmd, flags, offset, length)
                if refused is not None:
                    self._error_reply(cookie, *refused)
                    self._skip = length
                    continue
                self._inflight += 1
                avail = self._wpos - self._rpos
                if avail >= length:
                    data = bytes(view[self._rpos:self._rpos + length])
                    self._rpos += length
                    self._spawn(self._do_write(flags, cookie, offset, data))
                    continue
                # Receive the rest of the payload straight into its own buffer.
                payload = bytearray(length)
                payload[:avail] = view[self._rpos:self._wpos]
                self._rpos = self._wpos = 0
                self._payload = payload
                self._payload_view = memoryview(payload)
                self._payload_pos = avail
                self._payload_req = (flags, cookie, offset)
                return
            if cmd == _CMD_DISC:
                stats.requests["disc"] += 1
                self._log.debug("%s: client disconnected (NBD_CMD_DISC)", self._name)
                self._begin_close()
                return
            name = _CMD_NAMES.get(cmd)
            stats.requests[name if name is not None else "invalid"] += 1
            refused = self._validate(cmd, flags, offset, length)
            if refused is not None:
                self._error_reply(cookie, *refused)
                continue
            self._inflight += 1
            if cmd == _CMD_READ:
                self._spawn(self._do_read(cookie, offset, length))
            else:
                self._spawn(self._do_other(cmd, flags, cookie, offset, length))

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """None if the request may go to the export, else (NBD error, message) to reply with."""
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            # Unknown commands, and NBD_CMD_CACHE, which we do not advertise.
            return EINVAL, f"unsupported command {cmd}"
        if flags & ~allowed:
            return EINVAL, f"flags {flags & ~allowed:#x} are not valid for this command"
        if cmd == _CMD_READ and flags & _CMD_FLAG_DF and not self._structured:
            return EINVAL, "NBD_CMD_FLAG_DF needs structured replies"
        if cmd == _CMD_FLUSH:
            return (EINVAL, "flush offset and length must be zero") if offset or length else None
        if cmd == _CMD_BLOCK_STATUS and not self._block_status_ok:
            return EINVAL, "no metadata context was negotiated for this export"
        export = self._export
        if (cmd == _CMD_WRITE or cmd == _CMD_WRITE_ZEROES or cmd == _CMD_TRIM) and export.read_only:
            return EPERM, "the export is read-only"
        if length == 0:
            return EINVAL, "zero length"
        size = export.size
        if offset + length > size:
            err = ENOSPC if cmd == _CMD_WRITE or cmd == _CMD_WRITE_ZEROES else EINVAL
            return err, f"offset {offset} + length {length} is beyond the export size {size}"
        if cmd == _CMD_READ and length > self._max_request:
            return EINVAL, f"read of {length} bytes exceeds the maximum request of {self._max_request}"
        if cmd == _CMD_WRITE_ZEROES and flags & _CMD_FLAG_FAST_ZERO:
            # The Export interface cannot promise that zeroing is faster than writing,
            # so fail fast zero requests quickly, as the spec asks, without touching data.
            return ENOTSUP, "fast zeroing is not supported"
        return None

    def _payload_complete(self) -> None:
        flags, cookie, offset = self._payload_req
        data = self._payload
        self._payload = self._payload_view = None
        self._spawn(self._do_write(flags, cookie, offset, data))

    def _drop_payload(self) -> None:
        """Forget a half-received WRITE (the client is gone or being disconnected)."""
        if self._payload_view is not None:
            self._payload = self._payload_view = None
            self._inflight -= 1
            self._maybe_closed()

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        if not task.cancelled() and task.exception() is not None:
            # Handlers catch everything; this is a bug in this module, not in the Export.
            self._log.error("%s: request handler crashed", self._name, exc_info=task.exception())
        if self._closing:
            if self._inflight == 0:
                if self._lost:
                    self._maybe_closed()
                else:
                    self._close_transport()
            return
        if self._inflight == self._max_inflight - 1 or self._eof:
            self._process()     # requests may be waiting for a free slot, or EOF for the last reply
        self._update_reading()

    # --- transmission: replies ---

    def _send2(self, header: bytes, data) -> None:
        """Send a reply header followed by its payload, without joining them when possible."""
        t = self._transport
        if t is None or self._lost or t.is_closing():
            return
        out = self._out
        if out is not None:
            if not out:
                self._loop.call_soon(self._flush)
            out.append(header)
            out.append(data)
        elif len(data) <= _SMALL_REPLY:
            t.write(header + bytes(data))
        else:
            t.write(header)
            t.write(data)

    def _ok_reply(self, cookie: int) -> None:
        self._send(_SIMPLE_REPLY.pack(_SIMPLE_REPLY_MAGIC, 0, cookie))

    def _error_reply(self, cookie: int, err: int, message: str, error_offset: int | None = None) -> None:
        """Reply with ``err``: an error chunk with structured replies, else a simple reply."""
        self._stats.error(err)
        if not self._structured:
            self._send(_SIMPLE_REPLY.pack(_SIMPLE_REPLY_MAGIC, err, cookie))
            return
        msg = _encode_string(message)
        if error_offset is None:
            body = _ERROR_PREFIX.pack(err, len(msg)) + msg
            rtype = _REPLY_TYPE_ERROR
        else:
            body = _ERROR_PREFIX.pack(err, len(msg)) + msg + _U64.pack(error_offset)
            rtype = _REPLY_TYPE_ERROR_OFFSET
        self._send(_CHUNK_HEADER.pack(_STRUCTURED_REPLY_MAGIC, _REPLY_FLAG_DONE, rtype, cookie, len(body)) + body)

    def _export_failed(self, cookie: int, cmd: int, offset: int, length: int, exc: BaseException) -> None:
        """Turn an exception from the Export into the error reply (the connection carries on)."""
        if isinstance(exc, NbdError):
            err = exc.errno if 0 < exc.errno <= 0xFFFFFFFF else EIO
            error_offset = exc.offset
            if error_offset is not None and not offset <= error_offset < offset + length:
                error_offset = None
            self._error_reply(cookie, err, exc.message or str(exc), error_offset)
        else:
            self._stats.export_failures += 1
            self._log.error("%s: export %r failed %s(offset=%d, length=%d)", self._name, self._export_name,
                            _CMD_NAMES.get(cmd, cmd), offset, length, exc_info=exc)
            self._error_reply(cookie, EIO, "I/O error")

    async def _do_read(self, cookie: int, offset: int, length: int) -> None:
        try:
            data = await self._export.read(offset, length)
            if len(data) != length:
                raise RuntimeError(f"Export.read returned {len(data)} bytes, not {length}")
        except Exception as exc:
            self._export_failed(cookie, _CMD_READ, offset, length, exc)
            return
        self._stats.bytes_read += length
        if self._structured:
            # One OFFSET_DATA chunk flagged DONE: the data is complete in memory, so no
            # error can follow, and a single chunk also satisfies NBD_CMD_FLAG_DF.
            header = _OFFSET_DATA_HEADER.pack(_STRUCTURED_REPLY_MAGIC, _REPLY_FLAG_DONE, _REPLY_TYPE_OFFSET_DATA,
                                              cookie, 8 + length, offset)
        else:
            header = _SIMPLE_REPLY.pack(_SIMPLE_REPLY_MAGIC, 0, cookie)
        self._send2(header, data)

    async def _do_write(self, flags: int, cookie: int, offset: int, data: bytes | bytearray) -> None:
        try:
            await self._export.write(offset, memoryview(data), bool(flags & _CMD_FLAG_FUA))
        except Exception as exc:
            self._export_failed(cookie, _CMD_WRITE, offset, len(data), exc)
            return
        self._stats.bytes_written += len(data)
        self._ok_reply(cookie)

    async def _do_other(self, cmd: int, flags: int, cookie: int, offset: int, length: int) -> None:
        export = self._export
        fua = bool(flags & _CMD_FLAG_FUA)
        try:
            if cmd == _CMD_FLUSH:
                await export.flush()
            elif cmd == _CMD_TRIM:
                await export.trim(offset, length, fua)
            elif cmd == _CMD_WRITE_ZEROES:
                await export.write_zeroes(offset, length, fua, not flags & _CMD_FLAG_NO_HOLE)
            else:   # _CMD_BLOCK_STATUS (validated)
                extents = await export.block_status(offset, length)
                self._send(self._block_status_chunk(cookie, offset, length, extents,
                                                    bool(flags & _CMD_FLAG_REQ_ONE)))
                return
        except Exception as exc:
            self._export_failed(cookie, cmd, offset, length, exc)
            return
        self._ok_reply(cookie)

    def _block_status_chunk(self, cookie: int, offset: int, length: int, extents, req_one: bool) -> bytes:
        """Build the NBD_REPLY_TYPE_BLOCK_STATUS chunk from the Export's runs.

        Runs are clipped to the request (the spec allows a shorter answer; it
        also allows a longer last extent, but clipping is always valid), zero
        lengths are skipped, adjacent runs with equal flags are merged, and
        flags outside base:allocation's two bits are cleared.
        """
        flat: list[int] = []
        remaining = length
        for run_len, run_flags in extents:
            if remaining <= 0 or len(flat) >= 2 * _MAX_EXTENTS:
                break
            run_len = min(int(run_len), remaining)
            if run_len <= 0:
                continue
            run_flags = int(run_flags) & (NBD_STATE_HOLE | NBD_STATE_ZERO)
            if flat and flat[-1] == run_flags:
                flat[-2] += run_len
            else:
                flat += (run_len, run_flags)
            remaining -= run_len
            if req_one:
                break
        if not flat:
            # An Export that reported nothing: status 0 ("allocated, contents unknown") is always safe.
            flat = [length, 0]
        if req_one:
            flat = flat[:2]
        n = len(flat) // 2
        body = struct.pack(f">I{2 * n}I", _BASE_ALLOCATION_ID, *flat)
        return _CHUNK_HEADER.pack(_STRUCTURED_REPLY_MAGIC, _REPLY_FLAG_DONE, _REPLY_TYPE_BLOCK_STATUS,
                                  cookie, len(body)) + body
