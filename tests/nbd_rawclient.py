"""Test plumbing for the NBD server: a raw blocking-socket client and a server thread.

The client packs every message by hand (struct) so tests can send exactly
the malformed bytes they want; the server runs in its own event loop thread
(uvloop or plain asyncio) and serves each test connection over a socketpair
through NbdServer.serve_socket.  The thread records anything reaching the
loop's exception handler (e.g. "Task exception was never retrieved"), so a
test can assert the loop stayed healthy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import socket
import struct
import threading
from dataclasses import dataclass, field

import uvloop

from storage_daemon.nbd import NbdServer

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK_EXPORT, OPT_STARTTLS = 1, 2, 3, 4, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 6, 7, 8, 9, 10
OPT_EXTENDED_HEADERS = 11

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = (1 << 31) + 1, (1 << 31) + 2, (1 << 31) + 3
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = (1 << 31) + 6, (1 << 31) + 9

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_DF, TF_CAN_MULTI_CONN = 32, 64, 128, 256
TF_SEND_CACHE, TF_SEND_FAST_ZERO = 1024, 2048

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_BLOCK_STATUS = 0, 1, 2, 5
REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2

EPERM, EIO, EINVAL, ENOSPC, ENOTSUP = 1, 5, 22, 28, 95


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    """The payload of NBD_OPT_GO / NBD_OPT_INFO."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_data(name: str, queries: list[str]) -> bytes:
    """The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


@dataclass
class Reply:
    """One reply (simple, or all chunks of a structured reply) as the client saw it."""
    cookie: int
    error: int = 0
    structured: bool = False
    data: bytes = b""                                   # read data (simple or OFFSET_DATA chunks)
    data_offset: int | None = None                      # offset of the (first) OFFSET_DATA chunk
    message: str = ""
    error_offset: int | None = None
    chunks: list[tuple[int, int]] = field(default_factory=list)   # (flags, type) per chunk
    context_id: int | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)


class RawClient:
    """A blocking NBD client over one socket, with every message packed by hand."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0):
        self.sock = sock
        sock.settimeout(timeout)
        self.structured = False
        self.pending: dict[int, tuple[int, int]] = {}   # cookie -> (command, length)
        self._cookie = 0

    def close(self) -> None:
        self.sock.close()

    # --- bytes ---

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"server closed the connection after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def at_eof(self) -> bool:
        """True when the server has closed (any bytes still queued are drained first)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    # --- handshake ---

    def greeting(self) -> int:
        magic, version, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and version == IHAVEOPT, (hex(magic), hex(version))
        return flags

    def handshake(self, cflags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> int:
        flags = self.greeting()
        self.send(struct.pack(">I", cflags))
        return flags

    def send_option(self, opt: int, data: bytes = b"", *, length: int | None = None) -> None:
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return opt, rep, self.recv_exact(length)

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option and collect its replies up to the final one (ACK or an error)."""
        self.send_option(opt, data)
        replies = []
        while True:
            ropt, rep, payload = self.option_reply()
            assert ropt == opt, (ropt, opt)
            replies.append((rep, payload))
            if rep == REP_ACK or rep & (1 << 31):
                return replies

    def structured_reply(self) -> None:
        assert self.option(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        self.structured = True

    def set_meta_context(self, name: str, queries: list[str]) -> dict[str, int]:
        replies = self.option(OPT_SET_META_CONTEXT, meta_data(name, queries))
        assert replies[-1][0] == REP_ACK, replies
        return {p[4:].decode(): struct.unpack(">I", p[:4])[0] for r, p in replies if r == REP_META_CONTEXT}

    def go(self, name: str = "", infos: tuple[int, ...] = ()) -> dict:
        """NBD_OPT_GO; returns the decoded NBD_REP_INFO items."""
        replies = self.option(OPT_GO, go_data(name, infos))
        assert replies[-1][0] == REP_ACK, replies
        return decode_infos(replies)

    def connect(self, name: str = "", *, structured: bool = True, meta: bool = False) -> dict:
        """The usual sequence: handshake, [structured replies, [base:allocation]], GO."""
        self.handshake()
        if structured:
            self.structured_reply()
        if meta:
            assert self.set_meta_context(name, ["base:allocation"]) == {"base:allocation": 1}
        return self.go(name, (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE))

    # --- transmission ---

    def encode_request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                       payload: bytes = b"") -> tuple[int, bytes]:
        """Pack a request (registering its cookie as pending) without sending it."""
        self._cookie += 1
        self.pending[self._cookie] = (cmd, length)
        return self._cookie, struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._cookie, offset, length) + payload

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> int:
        cookie, message = self.encode_request(cmd, offset, length, flags, payload)
        self.send(message)
        return cookie

    def reply(self) -> Reply:
        """Read the next complete reply (whichever request it belongs to)."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            cmd, length = self.pending.pop(cookie)
            r = Reply(cookie, error)
            if cmd == CMD_READ and error == 0:
                assert not self.structured, "simple reply to a read after structured replies"
                r.data = self.recv_exact(length)
            return r
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        r = None
        while True:
            if r is not None:
                magic = struct.unpack(">I", self.recv_exact(4))[0]
                assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            if r is None:
                r = Reply(cookie, structured=True)
            assert cookie == r.cookie, "chunks of different replies interleaved"
            r.chunks.append((flags, rtype))
            if rtype == REPLY_TYPE_OFFSET_DATA:
                offset = struct.unpack(">Q", payload[:8])[0]
                if r.data_offset is None:
                    r.data_offset = offset
                r.data += payload[8:]
            elif rtype == REPLY_TYPE_BLOCK_STATUS:
                assert (length - 4) % 8 == 0 and length > 4, length
                r.context_id = struct.unpack(">I", payload[:4])[0]
                words = struct.unpack(f">{(length - 4) // 4}I", payload[4:])
                r.extents = list(zip(words[::2], words[1::2]))
            elif rtype in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET):
                r.error, mlen = struct.unpack(">IH", payload[:6])
                r.message = payload[6:6 + mlen].decode()
                if rtype == REPLY_TYPE_ERROR_OFFSET:
                    assert length == 6 + mlen + 8
                    r.error_offset = struct.unpack(">Q", payload[6 + mlen:])[0]
                else:
                    assert length == 6 + mlen
            else:
                assert rtype == REPLY_TYPE_NONE and length == 0, rtype
            if flags & REPLY_FLAG_DONE:
                self.pending.pop(cookie)
                return r

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> Reply:
        """One request and its reply (nothing else may be in flight)."""
        cookie = self.request(cmd, offset, length, flags, payload)
        r = self.reply()
        assert r.cookie == cookie
        return r

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        r = self.call(CMD_READ, offset, length, flags)
        assert r.error == 0, r
        return r.data

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        r = self.call(CMD_WRITE, offset, len(data), flags, data)
        assert r.error == 0, r

    def disconnect(self) -> None:
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))


def decode_infos(replies: list[tuple[int, bytes]]) -> dict:
    out: dict = {}
    for rep, payload in replies:
        if rep != REP_INFO:
            continue
        (kind,) = struct.unpack(">H", payload[:2])
        if kind == INFO_EXPORT:
            assert len(payload) == 12
            out["size"], out["flags"] = struct.unpack(">QH", payload[2:])
        elif kind == INFO_NAME:
            out["name"] = payload[2:].decode()
        elif kind == INFO_DESCRIPTION:
            out["description"] = payload[2:].decode()
        elif kind == INFO_BLOCK_SIZE:
            assert len(payload) == 14
            out["block_size"] = struct.unpack(">III", payload[2:])
    return out


class ServerThread:
    """An NbdServer on its own event loop thread, serving test connections over socketpairs."""

    def __init__(self, exports: dict, *, use_uvloop: bool = True, **kwargs):
        self.exports = exports
        self.loop = uvloop.new_event_loop() if use_uvloop else asyncio.new_event_loop()
        self.loop_errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.server = NbdServer(exports.get, lambda: list(exports), **kwargs)
        self.sessions: list[concurrent.futures.Future] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="nbd-test-server", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 10.0):
        """Run a coroutine on the server loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        """Run a plain function on the server loop (to touch loop-bound objects safely)."""
        async def wrapper():
            return fn(*args)
        return self.run(wrapper())

    def connect(self, timeout: float = 10.0) -> RawClient:
        ours, theirs = socket.socketpair()
        self.sessions.append(asyncio.run_coroutine_threadsafe(self.server.serve_socket(theirs), self.loop))
        return RawClient(ours, timeout)

    def wait_session(self, index: int = -1, timeout: float = 10.0) -> None:
        """Wait until a connection is fully finished; serve_socket must not have raised."""
        assert self.sessions[index].result(timeout) is None

    def assert_healthy(self) -> None:
        """Nothing reached the loop's exception handler and the loop still runs callbacks."""
        gc.collect()   # unreferenced failed tasks report "exception was never retrieved" when collected
        assert self.run(asyncio.sleep(0, result="alive")) == "alive"
        assert not self.loop_errors, self.loop_errors
        for fut in self.sessions:
            if fut.done():
                assert fut.exception() is None, fut.exception()

    def stop(self) -> None:
        try:
            self.run(self.server.shutdown(timeout=5), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
