"""Property-based fuzzing of the NBD server's option parser and request stream.

Three generators drive one long-lived server (uvloop, on its own thread):

* random bytes straight after the greeting;
* structure-aware option sequences (valid, malformed and unknown options,
  lying lengths inside the payloads, oversized payloads), whose replies are
  checked for framing and for the outcomes we can predict;
* after a valid handshake, a pipelined stream of random requests (valid and
  invalid commands, flags, offsets, lengths) checked against an independent
  oracle of the spec's validation rules.

After every example: the server's serve_socket() returned without raising,
nothing reached the event loop's exception handler, the export holds exactly
what the accepted requests may have written (a rejected request never changes
it), and a well-behaved client is still served.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.nbd_memexport import MemExport
from tests.nbd_rawclient import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    ENOTSUP,
    EPERM,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FIXED_NEWSTYLE,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_NO_ZEROES,
    FLAG_REQ_ONE,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_EXTENDED_HEADERS,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REQUEST_MAGIC,
    RawClient,
    ServerThread,
    go_data,
    meta_data,
)

SIZE = 64 * 1024
MAX_REQUEST = 16 * 1024
MAX_INFLIGHT = 4
BLOCK = 4096

ORIG = bytes((x * 7 + 3) & 0xFF for x in range(SIZE))            # every example starts from this
POS = bytes((x * 13 + 101) & 0xFF for x in range(SIZE))          # what an accepted write puts at x
REJECTED_BYTE = b"\xee"                                           # payload of writes we expect refused

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)


class GenerousExport(MemExport):
    """Reports block status to the end of the export whatever length was asked for (the spec
    lets an export say more), so the server's clipping to the request is exercised."""

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await super().block_status(offset, self.size - offset)


@pytest.fixture(scope="module")
def harness():
    exports = {"vol": GenerousExport(SIZE, description="fuzzed"), "ro": GenerousExport(SIZE, read_only=True)}
    st_ = ServerThread(exports, default_export="vol", max_request=MAX_REQUEST, max_inflight=MAX_INFLIGHT)
    yield st_
    try:
        st_.assert_healthy()
    finally:
        st_.stop()


def reset(harness: ServerThread) -> None:
    def do():
        for export in harness.exports.values():
            export.data[:] = ORIG
            # A varied allocation map, so block status answers have several extents.
            export.alloc[:] = bytes(i % 3 for i in range(len(export.alloc)))
            export.calls.clear()
            export.failures.clear()
    harness.call(do)


def exchange(harness: ServerThread, client: RawClient, payload: bytes, consume) -> None:
    """Send ``payload`` then half-close (from a thread, so a server that answers while we
    are still sending can't deadlock us) while ``consume(client)`` reads the replies; then
    require the server to close and its serve_socket() to return cleanly."""
    def sender():
        try:
            client.sock.sendall(payload)
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the server may legitimately hang up before taking everything
    thread = threading.Thread(target=sender)
    thread.start()
    try:
        consume(client)
        assert client.at_eof(), "server did not close the connection"
    finally:
        thread.join(10)
        client.close()
    harness.wait_session()


def read_to_eof(client: RawClient) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = client.sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def assert_export_untouched(harness: ServerThread) -> None:
    for name, export in harness.exports.items():
        assert export.data == ORIG, f"export {name} was modified"
        assert not [c for c in export.calls if c[0] in ("write", "trim", "write_zeroes")], export.calls


def assert_healthy_and_serving(harness: ServerThread) -> None:
    assert not harness.loop_errors, harness.loop_errors
    c = harness.connect()
    c.connect("vol", meta=True)
    expected = bytes(harness.exports["vol"].data[:64])
    assert c.read(0, 64) == expected
    assert c.call(CMD_BLOCK_STATUS, 0, SIZE).error == 0
    c.disconnect()
    assert c.at_eof()
    harness.wait_session()


# --------------------------------------------------------------------------------------------
# Negotiation
# --------------------------------------------------------------------------------------------


@FUZZ
@given(junk=st.binary(max_size=2048))
def test_random_bytes_during_negotiation(harness, junk):
    reset(harness)
    c = harness.connect()
    c.greeting()
    exchange(harness, c, junk, read_to_eof)
    assert_export_untouched(harness)
    assert_healthy_and_serving(harness)


@FUZZ
@given(junk=st.binary(max_size=2048))
def test_random_bytes_after_a_valid_option_prefix(harness, junk):
    # Get past the client flags so the bytes land in the option parser proper.
    reset(harness)
    c = harness.connect()
    c.greeting()
    prefix = struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) + struct.pack(">Q", 0x49484156454F5054)
    exchange(harness, c, prefix + junk, read_to_eof)
    assert_export_untouched(harness)
    assert_healthy_and_serving(harness)


@dataclass
class Opt:
    code: int
    data: bytes
    expect: int | None = None      # the final reply we can predict from the payload alone, if any
    meta: tuple[str, list[str]] | None = None    # (export name, queries) of a well-formed meta option


EXPORTS = {"vol": SIZE, "ro": SIZE, "": SIZE}          # "" is the default export, vol
names = st.sampled_from(["vol", "ro", "", "nope", "vol\0", "é", "x" * 300])
info_requests = st.lists(st.sampled_from([INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 4, 0xFFFF]),
                         max_size=5)
queries = st.lists(st.sampled_from(["base:allocation", "base:", "base:x", "qemu:dirty-bitmap:a", "nocolon", ""])
                   | st.text(max_size=12), max_size=4)
KNOWN_OPTIONS = [OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, 4, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY,
                 OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS]


@st.composite
def go_option(draw):
    name, reqs = draw(names), draw(info_requests)
    valid = "\0" not in name and len(name.encode()) <= 4096
    expect = (REP_ACK if name in EXPORTS else REP_ERR_UNKNOWN) if valid else REP_ERR_INVALID
    # Mostly INFO: a successful GO ends the negotiation, and with it what we can check.
    return Opt(draw(st.sampled_from([OPT_INFO, OPT_INFO, OPT_GO])), go_data(name, tuple(reqs)), expect)


@st.composite
def meta_option(draw):
    name, qs = draw(names), draw(queries)
    return Opt(draw(st.sampled_from([OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])), meta_data(name, qs),
               meta=(name, qs))


@st.composite
def mangled(draw, inner):
    """A well-formed option with bytes cut off or appended (so its inner lengths lie: always
    NBD_REP_ERR_INVALID, except SET_META_CONTEXT before structured replies, also INVALID), or
    with one byte overwritten (outcome unpredictable)."""
    opt = draw(inner)
    data = bytearray(opt.data)
    how = draw(st.sampled_from(["append", "cut", "flip"]))
    if how == "cut":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=8))
    else:
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return Opt(opt.code, bytes(data), REP_ERR_INVALID if how != "flip" else None)


simple_option = st.one_of(
    st.builds(Opt, st.sampled_from(KNOWN_OPTIONS), st.binary(max_size=32)),
    st.builds(Opt, st.integers(0, 2 ** 32 - 1), st.binary(max_size=32)),
    st.builds(lambda c: Opt(c, b"", {OPT_LIST: REP_ACK, OPT_STRUCTURED_REPLY: REP_ACK,
                                     OPT_STARTTLS: REP_ERR_POLICY, OPT_EXTENDED_HEADERS: REP_ERR_UNSUP}[c]),
              st.sampled_from([OPT_LIST, OPT_STRUCTURED_REPLY, OPT_STARTTLS, OPT_EXTENDED_HEADERS])),
    st.builds(lambda c: Opt(c, bytes(64 * 1024 + 1), REP_ERR_TOO_BIG), st.sampled_from([OPT_GO, OPT_LIST, 77])),
)
option = st.one_of(simple_option, go_option(), meta_option(), mangled(go_option()), mangled(meta_option()))


def valid_string(text: str) -> bool:
    return "\0" not in text and len(text.encode()) <= 4096


def predict(opt: Opt, structured: bool) -> int | None:
    """The final reply the spec calls for, when the payload makes it predictable."""
    if len(opt.data) > 64 * 1024:
        return REP_ERR_TOO_BIG
    if opt.expect is not None:
        return opt.expect
    if opt.code in (OPT_LIST, OPT_STRUCTURED_REPLY):
        return REP_ERR_INVALID if opt.data else REP_ACK
    if opt.code == OPT_STARTTLS:
        return REP_ERR_INVALID if opt.data else REP_ERR_POLICY
    if opt.code == OPT_ABORT:
        return REP_ACK
    if opt.code not in KNOWN_OPTIONS or opt.code in (4, OPT_EXTENDED_HEADERS):
        return REP_ERR_UNSUP
    if opt.meta is not None:
        name, qs = opt.meta
        if opt.code == OPT_SET_META_CONTEXT and not structured:
            return REP_ERR_INVALID
        if not valid_string(name) or not all(valid_string(q) for q in qs):
            return REP_ERR_INVALID
        return REP_ACK if name in EXPORTS else REP_ERR_UNKNOWN
    return None


def expected_contexts(opt: Opt) -> list[bytes]:
    _, qs = opt.meta
    if opt.code == OPT_SET_META_CONTEXT:
        selected = "base:allocation" in qs
        return [struct.pack(">I", 1) + b"base:allocation"] if selected else []
    selected = not qs or any(q in ("base:", "base:allocation") for q in qs)
    return [struct.pack(">I", 0) + b"base:allocation"] if selected else []


def check_negotiation(output: bytes, cflags: int, options: list[Opt]) -> None:
    """Walk the server's replies to the options it was sent, in order, predicting outcomes."""
    pos = 0
    structured = False

    def take(n: int) -> bytes:
        nonlocal pos
        assert pos + n <= len(output), f"reply truncated at byte {pos}"
        pos += n
        return output[pos - n:pos]

    if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        assert output == b"", "server answered a client with unknown flags"
        return
    for opt in options:
        if opt.code == OPT_EXPORT_NAME:
            try:
                known = opt.data.decode() in EXPORTS
            except UnicodeDecodeError:
                known = False
            if known:
                size, _flags = struct.unpack(">QH", take(10))
                assert size == SIZE
                if not cflags & FLAG_NO_ZEROES:
                    assert take(124) == bytes(124)
            # Unknown export: hang-up.  Known: transmission, where our remaining option
            # bytes are garbage requests, so the server hangs up without replying.
            assert pos == len(output), "bytes after NBD_OPT_EXPORT_NAME"
            return
        contexts = []
        while True:
            magic, ropt, rep, length = struct.unpack(">QIII", take(20))
            assert magic == OPT_REPLY_MAGIC and ropt == opt.code
            payload = take(length)
            if rep == REP_INFO and payload[:2] == b"\0\0":
                assert struct.unpack(">Q", payload[2:10])[0] == SIZE
            if rep == REP_META_CONTEXT:
                contexts.append(payload)
            if rep == REP_ACK or rep & (1 << 31):
                break
        expect = predict(opt, structured)
        if expect is not None:
            assert rep == expect, (opt, hex(rep), structured)
        if opt.meta is not None and rep == REP_ACK:
            assert contexts == expected_contexts(opt), (opt, contexts)
        if opt.code == OPT_STRUCTURED_REPLY and rep == REP_ACK:
            structured = True
        if opt.code == OPT_ABORT:
            break
        if opt.code == OPT_GO and rep == REP_ACK:
            break     # transmission: the rest is garbage requests, answered by a hang-up
        if opt.code in (OPT_GO, OPT_INFO) and rep not in (REP_ACK, REP_ERR_TOO_BIG):
            assert rep in (REP_ERR_INVALID, REP_ERR_UNKNOWN)
    assert pos == len(output), f"{len(output) - pos} unexpected bytes after the last reply"


@FUZZ
@given(cflags=st.sampled_from([3, 3, 3, 3, 3, 3, 1, 0, 2, 4, 7, 1 << 31]),
       options=st.lists(option, min_size=1, max_size=12))
def test_option_sequences(harness, cflags, options):
    reset(harness)
    c = harness.connect()
    c.greeting()
    stream = struct.pack(">I", cflags) + b"".join(
        struct.pack(">QII", 0x49484156454F5054, o.code, len(o.data)) + o.data for o in options)
    output = {}
    exchange(harness, c, stream, lambda client: output.setdefault("bytes", read_to_eof(client)))
    check_negotiation(output["bytes"], cflags, options)
    assert_export_untouched(harness)
    assert_healthy_and_serving(harness)


# --------------------------------------------------------------------------------------------
# Transmission
# --------------------------------------------------------------------------------------------


ALLOWED_FLAGS = {CMD_READ: FLAG_FUA | FLAG_DF, CMD_WRITE: FLAG_FUA, CMD_FLUSH: FLAG_FUA, CMD_TRIM: FLAG_FUA,
                 CMD_WRITE_ZEROES: FLAG_FUA | FLAG_NO_HOLE | FLAG_FAST_ZERO, CMD_BLOCK_STATUS: FLAG_FUA | FLAG_REQ_ONE}
WRITES = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)


def oracle(cmd: int, flags: int, offset: int, length: int, *, structured: bool, meta: bool, read_only: bool) -> int:
    """The NBD error the spec (and our documented choices) call for; 0 if the request is valid."""
    if cmd not in ALLOWED_FLAGS or flags & ~ALLOWED_FLAGS[cmd]:
        return EINVAL                                   # unknown command (incl. CACHE) or flag
    if cmd == CMD_READ and flags & FLAG_DF and not structured:
        return EINVAL                                   # DF is only advertised with structured replies
    if cmd == CMD_FLUSH:
        return EINVAL if offset or length else 0
    if cmd == CMD_BLOCK_STATUS and not meta:
        return EINVAL                                   # no metadata context negotiated
    if cmd in WRITES and read_only:
        return EPERM
    if length == 0:
        return EINVAL
    if offset + length > SIZE:
        return ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    if cmd == CMD_READ and length > MAX_REQUEST:
        return EINVAL
    if cmd == CMD_WRITE_ZEROES and flags & FLAG_FAST_ZERO:
        return ENOTSUP                                  # we never promise fast zeroing
    return 0


@dataclass
class Req:
    cmd: int
    flags: int
    offset: int
    length: int


def subsets(mask: int) -> list[int]:
    bits = [1 << i for i in range(16) if mask & (1 << i)]
    out = [0]
    for b in bits:
        out += [s | b for s in out]
    return out


@st.composite
def requests(draw):
    cmd = draw(st.sampled_from([CMD_READ, CMD_READ, CMD_WRITE, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES,
                                CMD_BLOCK_STATUS, CMD_BLOCK_STATUS, CMD_CACHE, 8, 0xFFFF]))
    # Mostly flags this command accepts (every combination), sometimes any single bit or any word.
    flags = draw(st.one_of(st.sampled_from(subsets(ALLOWED_FLAGS.get(cmd, 0))),
                           st.sampled_from([1 << i for i in range(16)]),
                           st.integers(0, 0xFFFF)))
    offset = draw(st.sampled_from([0, 1, 511, BLOCK, SIZE - BLOCK, SIZE - 1, SIZE, SIZE + 1, 2 ** 63, 2 ** 64 - 1])
                  | st.integers(0, SIZE))
    length = draw(st.sampled_from([0, 1, 512, BLOCK, MAX_REQUEST, MAX_REQUEST + 1, SIZE, 2 ** 32 - 1])
                  | st.integers(0, MAX_REQUEST))
    if cmd == CMD_FLUSH and draw(st.booleans()):
        offset = length = 0     # the only valid flush
    return Req(cmd, flags, offset, length)


class Model:
    """Which bytes accepted requests may have changed, and to what."""

    def __init__(self):
        self.written = bytearray(SIZE)    # 1 where an accepted WRITE covered the byte
        self.zeroed = bytearray(SIZE)     # 1 where an accepted TRIM / WRITE_ZEROES covered it

    def apply(self, r: Req) -> None:
        if r.cmd == CMD_WRITE:
            self.written[r.offset:r.offset + r.length] = b"\1" * r.length
        elif r.cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
            self.zeroed[r.offset:r.offset + r.length] = b"\1" * r.length

    def check(self, data: bytes, offset: int) -> None:
        """``data`` (read at ``offset``, or the whole export) holds only allowed bytes."""
        end = offset + len(data)
        if not any(self.written[offset:end]) and not any(self.zeroed[offset:end]):
            assert data == ORIG[offset:end], "bytes changed that no accepted request touched"
            return
        for i, b in enumerate(data):
            x = offset + i
            allowed = {ORIG[x]}
            if self.written[x]:
                allowed.add(POS[x])
            if self.zeroed[x]:
                allowed.add(0)
            assert b in allowed, f"byte {x} is {b:#x}, allowed {allowed}"


@FUZZ
@given(structured=st.booleans(), meta=st.booleans(), export=st.sampled_from(["vol", "vol", "ro"]),
       reqs=st.lists(requests(), max_size=24),
       ending=st.sampled_from(["eof", "disc", "bad magic", "oversized write"]))
def test_request_streams(harness, structured, meta, export, reqs, ending):
    reset(harness)
    meta = meta and structured
    read_only = export == "ro"
    c = harness.connect()
    c.connect(export, structured=structured, meta=meta)

    model = Model()
    expected: dict[int, tuple[Req, int]] = {}
    messages = []
    for r in reqs:
        if r.cmd == CMD_WRITE and r.length > MAX_REQUEST:
            r.length %= MAX_REQUEST + 1      # oversized writes end the stream: only as its ending
        err = oracle(r.cmd, r.flags, r.offset, r.length, structured=structured, meta=meta, read_only=read_only)
        payload = b""
        if r.cmd == CMD_WRITE:
            payload = POS[r.offset:r.offset + r.length] if err == 0 else REJECTED_BYTE * r.length
        cookie, message = c.encode_request(r.cmd, r.offset, r.length, r.flags, payload)
        messages.append(message)
        expected[cookie] = (r, err)
        if err == 0:
            model.apply(r)
    if ending == "disc":
        messages.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
    elif ending == "bad magic":
        messages.append(struct.pack(">IHHQQI", 0x25609514, 0, CMD_READ, 1 << 40, 0, 512))
    elif ending == "oversized write":
        messages.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1 << 41, 0, MAX_REQUEST + 1))

    def consume(client: RawClient) -> None:
        seen = set()
        for _ in expected:
            reply = client.reply()
            assert reply.cookie in expected and reply.cookie not in seen
            seen.add(reply.cookie)
            r, err = expected[reply.cookie]
            assert reply.error == err, (r, reply)
            if structured and err:
                assert reply.structured and reply.message, reply   # errors carry a message
            if err:
                assert not reply.data and not reply.extents
            elif r.cmd == CMD_READ:
                assert len(reply.data) == r.length
                if structured:
                    assert reply.data_offset == r.offset
                model.check(reply.data, r.offset)
            elif r.cmd == CMD_BLOCK_STATUS:
                assert reply.context_id == 1 and reply.extents
                assert all(n > 0 and flags & ~3 == 0 for n, flags in reply.extents)
                assert sum(n for n, _ in reply.extents) <= r.length
                if r.flags & FLAG_REQ_ONE:
                    assert len(reply.extents) == 1

    exchange(harness, c, b"".join(messages), consume)
    for name, exp in harness.exports.items():
        if name == export:
            model.check(bytes(exp.data), 0)
        else:
            assert exp.data == ORIG
    assert_healthy_and_serving(harness)
