"""The NBD server (storage_daemon.nbd) against a raw, hand-packed client.

Every test runs under both uvloop (production) and the stock asyncio loop; the
server lives on its own loop thread and each test connection is a socketpair.
Teardown asserts that nothing reached the loop's exception handler and that no
serve_socket() call raised.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import time

import pytest

from storage_daemon.nbd import NbdError, NbdServer
from tests.nbd_memexport import HOLE, ZEROED, MemExport
from tests.nbd_rawclient import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    EIO,
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
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_NAME,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_EXTENDED_HEADERS,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_PEEK_EXPORT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_OFFSET_DATA,
    TF_CAN_MULTI_CONN,
    TF_HAS_FLAGS,
    TF_READ_ONLY,
    TF_SEND_CACHE,
    TF_SEND_DF,
    TF_SEND_FAST_ZERO,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
    RawClient,
    ServerThread,
    decode_infos,
    go_data,
    meta_data,
)

MiB = 1 << 20
VOL_SIZE = 1 * MiB
MAX_REQUEST = 1 * MiB
MAX_INFLIGHT = 8


def make_exports() -> dict[str, MemExport]:
    return {
        "vol": MemExport(VOL_SIZE, description="unit test volume"),
        "ro": MemExport(64 * 1024, read_only=True),
        "big": MemExport(4 * MiB),
    }


@pytest.fixture(params=["uvloop", "asyncio"])
def harness(request):
    st = ServerThread(make_exports(), use_uvloop=request.param == "uvloop", default_export="vol",
                      max_request=MAX_REQUEST, max_inflight=MAX_INFLIGHT)
    yield st
    try:
        st.assert_healthy()
    finally:
        st.stop()


@pytest.fixture
def vol(harness) -> MemExport:
    return harness.exports["vol"]


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def assert_still_serves(harness: ServerThread) -> None:
    """A fresh, well-behaved client gets full service (the server survived the last one)."""
    c = harness.connect()
    c.connect("vol")
    c.write(0, b"alive")
    assert c.read(0, 5) == b"alive"
    c.disconnect()
    assert c.at_eof()
    harness.wait_session()


def assert_dropped(harness: ServerThread, c: RawClient) -> None:
    """The server hung up on this client, cleanly, and keeps serving others."""
    assert c.at_eof()
    harness.wait_session()
    assert_still_serves(harness)


# --------------------------------------------------------------------------------------------
# Handshake
# --------------------------------------------------------------------------------------------


def test_greeting_advertises_fixed_newstyle_and_no_zeroes(harness):
    c = harness.connect()
    assert c.greeting() == FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES


@pytest.mark.parametrize("cflags", [4, 1 << 31, FLAG_FIXED_NEWSTYLE | 8])
def test_unknown_client_flags_disconnect(harness, cflags):
    c = harness.connect()
    c.handshake(cflags)
    assert_dropped(harness, c)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_enters_transmission(harness, vol, no_zeroes):
    vol.data[:4] = b"abcd"
    c = harness.connect()
    c.handshake(FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0))
    c.send_option(OPT_EXPORT_NAME, b"vol")
    size, flags = struct.unpack(">QH", c.recv_exact(10))
    assert size == VOL_SIZE
    assert flags & TF_HAS_FLAGS and not flags & TF_READ_ONLY
    assert not flags & TF_SEND_DF           # no structured replies were negotiated
    if not no_zeroes:
        assert c.recv_exact(124) == bytes(124)
    # The very next bytes on the wire must be the reply to our first request.
    assert c.read(0, 4) == b"abcd"


def test_export_name_empty_means_default_export(harness):
    c = harness.connect()
    c.handshake()
    c.send_option(OPT_EXPORT_NAME, b"")
    assert struct.unpack(">QH", c.recv_exact(10))[0] == VOL_SIZE


def test_export_name_unknown_disconnects(harness):
    c = harness.connect()
    c.handshake()
    c.send_option(OPT_EXPORT_NAME, b"nope")
    assert_dropped(harness, c)


def test_export_name_oversized_disconnects(harness):
    c = harness.connect()
    c.handshake()
    c.send_option(OPT_EXPORT_NAME, b"", length=100_000)
    assert_dropped(harness, c)


def test_list_names_every_export(harness):
    c = harness.connect()
    c.handshake()
    replies = c.option(OPT_LIST)
    assert replies[-1] == (REP_ACK, b"")
    names = []
    for rep, payload in replies[:-1]:
        assert rep == REP_SERVER
        (n,) = struct.unpack(">I", payload[:4])
        names.append(payload[4:4 + n].decode())
    assert names == ["vol", "ro", "big"]


def test_list_with_data_is_invalid_and_negotiation_continues(harness):
    c = harness.connect()
    c.handshake()
    rep, message = c.option(OPT_LIST, b"junk")[0]
    assert rep == REP_ERR_INVALID and message
    assert c.option(OPT_LIST)[-1][0] == REP_ACK


def test_abort_is_acknowledged_then_closed(harness):
    c = harness.connect()
    c.handshake()
    assert c.option(OPT_ABORT) == [(REP_ACK, b"")]
    assert c.at_eof()
    harness.wait_session()


def test_info_reports_export_without_entering_transmission(harness):
    c = harness.connect()
    c.handshake()
    infos = decode_infos(c.option(OPT_INFO, go_data("vol", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE))))
    assert infos["size"] == VOL_SIZE
    assert infos["name"] == "vol"
    assert infos["description"] == "unit test volume"
    assert infos["block_size"] == (1, 4096, MAX_REQUEST)
    # Still negotiating: another option gets an option reply, and GO works afterwards.
    assert c.option(OPT_LIST)[-1][0] == REP_ACK
    infos = c.go("ro")
    assert infos["size"] == 64 * 1024 and infos["flags"] & TF_READ_ONLY
    assert "name" not in infos and "description" not in infos   # not requested
    assert infos["block_size"] == (1, 4096, MAX_REQUEST)         # always advertised


def test_go_empty_name_resolves_to_default_and_reports_canonical_name(harness):
    c = harness.connect()
    c.handshake()
    assert c.go("", (INFO_NAME,))["name"] == "vol"


def test_go_unknown_export_errors_and_negotiation_continues(harness):
    c = harness.connect()
    c.handshake()
    [(rep, message)] = c.option(OPT_GO, go_data("missing"))
    assert rep == REP_ERR_UNKNOWN and b"missing" in message
    assert c.go("vol")["size"] == VOL_SIZE


@pytest.mark.parametrize("payload", [
    b"",                                                   # shorter than the fixed fields
    b"\0\0\0",
    struct.pack(">I", 10) + b"vol" + b"\0\0",              # name length past the end
    go_data("vol") + b"x",                                  # trailing byte
    go_data("vol", (INFO_NAME,))[:-1],                      # truncated info request
    struct.pack(">I", 3) + b"vol" + struct.pack(">H", 5),  # claims 5 requests, has none
    struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0",          # name is not UTF-8
    struct.pack(">I", 2) + b"a\0" + b"\0\0",               # NUL in name
], ids=["empty", "short", "namelen", "trailing", "truncated", "nreqs", "utf8", "nul"])
@pytest.mark.parametrize("opt", [OPT_INFO, OPT_GO])
def test_info_go_malformed_is_invalid(harness, opt, payload):
    c = harness.connect()
    c.handshake()
    [(rep, _)] = c.option(opt, payload)
    assert rep == REP_ERR_INVALID
    assert c.go("vol")["size"] == VOL_SIZE


def test_structured_reply_with_data_is_invalid(harness):
    c = harness.connect()
    c.handshake()
    assert c.option(OPT_STRUCTURED_REPLY, b"x")[0][0] == REP_ERR_INVALID
    assert not c.go("vol")["flags"] & TF_SEND_DF   # the invalid request negotiated nothing


def test_starttls_refused_by_policy(harness):
    c = harness.connect()
    c.handshake()
    assert c.option(OPT_STARTTLS)[0][0] == REP_ERR_POLICY
    assert c.option(OPT_STARTTLS, b"x")[0][0] == REP_ERR_INVALID
    assert c.go("vol")["size"] == VOL_SIZE


@pytest.mark.parametrize("opt", [OPT_EXTENDED_HEADERS, OPT_PEEK_EXPORT, 0, 12345, 0xFFFFFFFF])
def test_unsupported_options_are_skipped(harness, opt):
    c = harness.connect()
    c.handshake()
    # Payload bytes that would parse as an option header must be skipped, not parsed.
    trap = struct.pack(">QII", IHAVEOPT, OPT_ABORT, 0)
    assert c.option(opt, trap)[0][0] == REP_ERR_UNSUP
    assert c.go("vol")["size"] == VOL_SIZE


@pytest.mark.parametrize("opt", [9999, OPT_GO, OPT_SET_META_CONTEXT])
def test_oversized_option_is_discarded_with_too_big(harness, opt):
    c = harness.connect()
    c.handshake()
    big = struct.pack(">QII", IHAVEOPT, OPT_ABORT, 0) * (80 * 1024 // 16)
    assert c.option(opt, big)[0][0] == REP_ERR_TOO_BIG
    assert c.go("vol")["size"] == VOL_SIZE


def test_bad_option_magic_disconnects(harness):
    c = harness.connect()
    c.handshake()
    c.send(struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
    assert_dropped(harness, c)


def test_endless_options_are_cut_off(harness):
    c = harness.connect()
    c.handshake()
    c.send(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0) * 300)
    seen = 0
    with pytest.raises(EOFError):
        while True:
            c.option_reply()
            seen += 1
    assert seen == 256 * 4    # 3 exports + ACK for each of the first 256 options, then the hang-up
    harness.wait_session()


def test_client_leaving_mid_option_is_clean(harness):
    c = harness.connect()
    c.handshake()
    c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"partial")
    c.close()
    harness.wait_session()
    assert_still_serves(harness)


def test_handshake_timeout_drops_idle_clients():
    st = ServerThread(make_exports(), handshake_timeout=0.3)
    try:
        c = st.connect()
        c.handshake()
        t0 = time.monotonic()
        assert c.at_eof()
        assert time.monotonic() - t0 < 5
        st.wait_session()
        assert st.server.stats()["protocol_errors"] == 1
        st.assert_healthy()
    finally:
        st.stop()


def _meta_contexts(replies):
    assert replies[-1][0] == REP_ACK, replies
    out = []
    for rep, payload in replies[:-1]:
        assert rep == REP_META_CONTEXT
        out.append((struct.unpack(">I", payload[:4])[0], payload[4:].decode()))
    return out


@pytest.mark.parametrize("queries,expected", [
    ([], [(0, "base:allocation")]),
    (["base:"], [(0, "base:allocation")]),
    (["base:allocation"], [(0, "base:allocation")]),
    (["base:", "base:allocation"], [(0, "base:allocation")]),
    (["qemu:dirty-bitmap:x", "x-foo:", "nocolon", "base:other"], []),
])
def test_list_meta_context(harness, queries, expected):
    c = harness.connect()
    c.handshake()
    c.structured_reply()
    assert _meta_contexts(c.option(OPT_LIST_META_CONTEXT, meta_data("vol", queries))) == expected


@pytest.mark.parametrize("opt", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_meta_context_unknown_export(harness, opt):
    c = harness.connect()
    c.handshake()
    c.structured_reply()
    assert c.option(opt, meta_data("missing", ["base:allocation"]))[0][0] == REP_ERR_UNKNOWN


@pytest.mark.parametrize("payload", [
    b"\0\0\0\0",                                                          # too short
    struct.pack(">I", 50) + b"vol" + struct.pack(">I", 0),                # name length past the end
    meta_data("vol", ["base:allocation"])[:-1],                           # truncated query
    meta_data("vol", []) + b"\0",                                          # trailing bytes
    struct.pack(">I", 3) + b"vol" + struct.pack(">I", 3) + struct.pack(">I", 0),   # 3 queries, 1 sent
    struct.pack(">I", 3) + b"vol" + struct.pack(">I", 1) + struct.pack(">I", 2) + b"\xc3\x28",  # bad UTF-8
], ids=["short", "namelen", "truncated", "trailing", "count", "utf8"])
@pytest.mark.parametrize("opt", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_meta_context_malformed_is_invalid(harness, opt, payload):
    c = harness.connect()
    c.handshake()
    c.structured_reply()
    assert c.option(opt, payload)[0][0] == REP_ERR_INVALID
    assert c.go("vol")["size"] == VOL_SIZE


def test_set_meta_context_requires_structured_replies(harness):
    c = harness.connect()
    c.handshake()
    assert c.option(OPT_SET_META_CONTEXT, meta_data("vol", ["base:allocation"]))[0][0] == REP_ERR_INVALID


def test_set_meta_context_selects_base_allocation_only_by_full_name(harness):
    c = harness.connect()
    c.handshake()
    c.structured_reply()
    assert c.set_meta_context("vol", ["base:", "x-foo:bar"]) == {}
    assert c.set_meta_context("vol", ["base:allocation", "x-foo:bar"]) == {"base:allocation": 1}


def test_block_status_needs_context_for_the_same_export(harness):
    c = harness.connect()
    c.handshake()
    c.structured_reply()
    c.set_meta_context("big", ["base:allocation"])
    c.go("vol")                   # a different export: the context does not carry over
    r = c.call(CMD_BLOCK_STATUS, 0, 4096)
    assert r.error == EINVAL and r.chunks == [(REPLY_FLAG_DONE, REPLY_TYPE_ERROR)]


def test_failed_set_meta_context_clears_the_selection(harness):
    c = harness.connect()
    c.handshake()
    c.structured_reply()
    c.set_meta_context("vol", ["base:allocation"])
    assert c.option(OPT_SET_META_CONTEXT, b"bad")[0][0] == REP_ERR_INVALID
    c.go("vol")
    assert c.call(CMD_BLOCK_STATUS, 0, 4096).error == EINVAL


def test_block_status_with_context_selected_for_default_name(harness):
    c = harness.connect()
    c.connect("", meta=True)      # SET_META_CONTEXT and GO both name the default export
    r = c.call(CMD_BLOCK_STATUS, 0, VOL_SIZE)
    assert r.error == 0 and r.context_id == 1


# --------------------------------------------------------------------------------------------
# Transmission: the commands
# --------------------------------------------------------------------------------------------


def test_transmission_flags(harness):
    c = harness.connect()
    flags = c.connect("vol")["flags"]
    expected = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_DF
                | TF_CAN_MULTI_CONN | TF_SEND_FAST_ZERO)
    assert flags == expected
    assert not flags & TF_SEND_CACHE


@pytest.mark.parametrize("structured", [False, True])
def test_write_then_read_back(harness, vol, structured):
    c = harness.connect()
    c.connect("vol", structured=structured)
    data = pattern(12345)
    c.write(1000, data)
    assert vol.data[1000:1000 + len(data)] == data
    r = c.call(CMD_READ, 1000, len(data))
    assert r.error == 0 and r.data == data
    if structured:
        # One OFFSET_DATA chunk carrying the absolute offset, flagged as the last chunk.
        assert r.chunks == [(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)] and r.data_offset == 1000
    else:
        assert not r.structured


def test_unaligned_and_single_byte_io(harness, vol):
    c = harness.connect()
    c.connect("vol")
    c.write(VOL_SIZE - 1, b"Z")
    assert c.read(VOL_SIZE - 1, 1) == b"Z"
    c.write(3, b"abc")
    assert c.read(0, 8) == b"\0\0\0abc\0\0"


def test_write_fua_flush_and_fua_on_other_commands(harness, vol):
    c = harness.connect()
    c.connect("vol", meta=True)
    c.write(0, b"x" * 512, FLAG_FUA)
    c.write(512, b"y" * 512)
    assert [call for call in vol.calls if call[0] == "write"] == [("write", 0, 512, True), ("write", 512, 512, False)]
    assert c.call(CMD_FLUSH).error == 0
    assert vol.flushes == 1
    # FUA is valid on every command once NBD_FLAG_SEND_FUA is advertised.
    assert c.call(CMD_FLUSH, flags=FLAG_FUA).error == 0
    assert c.call(CMD_READ, 0, 4, FLAG_FUA).data == b"xxxx"
    assert c.call(CMD_BLOCK_STATUS, 0, 4096, FLAG_FUA).error == 0
    assert c.call(CMD_TRIM, 0, 4096, FLAG_FUA).error == 0
    assert vol.calls[-1] == ("trim", 0, 4096, True)


def test_write_payload_arriving_in_pieces(harness, vol):
    c = harness.connect()
    c.connect("vol")
    data = pattern(MAX_REQUEST, seed=3)
    cookie = c.request(CMD_WRITE, 0, len(data))
    for i in range(0, len(data), 300_000):   # trickle the payload in
        c.send(data[i:i + 300_000])
        time.sleep(0.02)
    r = c.reply()
    assert r.cookie == cookie and r.error == 0
    assert vol.data == data


def test_pipelined_writes_in_one_send(harness, vol):
    c = harness.connect()
    c.connect("vol")
    msgs = b""
    chunks = {}
    cookies = []
    for i in range(40):
        off = i * 5000
        chunks[off] = pattern(5000, seed=i)
        cookie, message = c.encode_request(CMD_WRITE, off, 5000, payload=chunks[off])
        cookies.append(cookie)
        msgs += message
    c.send(msgs)      # 40 headers and payloads back to back, split across recv()s at random points
    replies = [c.reply() for _ in range(40)]
    assert sorted(r.cookie for r in replies) == cookies
    assert all(r.error == 0 for r in replies)
    for off, data in chunks.items():
        assert vol.data[off:off + 5000] == data


def test_trim_makes_holes_and_block_status_reports_them(harness, vol):
    c = harness.connect()
    c.connect("vol", meta=True)
    c.write(0, b"\xff" * VOL_SIZE)
    assert c.call(CMD_BLOCK_STATUS, 0, VOL_SIZE).extents == [(VOL_SIZE, 0)]
    assert c.call(CMD_TRIM, 8192, 3 * 4096).error == 0
    assert vol.calls[-1] == ("trim", 8192, 3 * 4096, False)
    r = c.call(CMD_BLOCK_STATUS, 0, VOL_SIZE)
    assert r.error == 0 and r.context_id == 1
    assert r.chunks == [(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS)]
    assert r.extents == [(8192, 0), (3 * 4096, 3), (VOL_SIZE - 5 * 4096, 0)]
    assert c.read(8192, 4) == b"\0\0\0\0"


@pytest.mark.parametrize("flags,may_trim,state,status", [
    (0, True, HOLE, 3),               # may punch a hole: hole + zero
    (FLAG_NO_HOLE, False, ZEROED, 2), # must stay allocated: zero only
])
def test_write_zeroes(harness, vol, flags, may_trim, state, status):
    c = harness.connect()
    c.connect("vol", meta=True)
    c.write(0, b"\xff" * 65536)
    assert c.call(CMD_WRITE_ZEROES, 4096, 8192, flags).error == 0
    assert vol.calls[-1] == ("write_zeroes", 4096, 8192, False, may_trim)
    assert vol.data[4096:12288] == bytes(8192) and vol.data[12288] == 0xFF
    assert vol.state(4096) == state
    assert c.call(CMD_BLOCK_STATUS, 0, 65536).extents == [(4096, 0), (8192, status), (65536 - 12288, 0)]


def test_fast_zero_fails_quickly_without_touching_data(harness, vol):
    c = harness.connect()
    c.connect("vol")
    c.write(0, b"\xff" * 8192)
    calls = len(vol.calls)
    assert c.call(CMD_WRITE_ZEROES, 0, 8192, FLAG_FAST_ZERO).error == ENOTSUP
    assert c.call(CMD_WRITE_ZEROES, 0, 8192, FLAG_FAST_ZERO | FLAG_NO_HOLE).error == ENOTSUP
    assert len(vol.calls) == calls and vol.data[:8192] == b"\xff" * 8192


def test_block_status_req_one_returns_one_clipped_extent(harness, vol):
    c = harness.connect()
    c.connect("vol", meta=True)
    c.write(4096, b"d" * 4096)
    assert c.call(CMD_BLOCK_STATUS, 0, VOL_SIZE, FLAG_REQ_ONE).extents == [(4096, 3)]
    assert c.call(CMD_BLOCK_STATUS, 4096, 100, FLAG_REQ_ONE).extents == [(100, 0)]
    assert c.call(CMD_BLOCK_STATUS, 100, VOL_SIZE - 100).extents == [(3996, 3), (4096, 0),
                                                                      (VOL_SIZE - 8192, 3)]


def test_block_status_reply_is_sanitised(harness):
    class Sloppy(MemExport):
        async def block_status(self, offset, length):
            # Zero-length runs, runs past the request, foreign flag bits, mergeable neighbours.
            return [(0, 1), (100, 0xF0 | 1), (50, 1), (10 ** 12, 2), (5, 0)]

    harness.exports["sloppy"] = Sloppy(VOL_SIZE)
    c = harness.connect()
    c.connect("sloppy", meta=True)
    assert c.call(CMD_BLOCK_STATUS, 0, 1000).extents == [(150, 1), (850, 2)]
    assert c.call(CMD_BLOCK_STATUS, 0, 1000, FLAG_REQ_ONE).extents == [(100, 1)]


def test_block_status_empty_answer_falls_back_to_allocated(harness):
    class Silent(MemExport):
        async def block_status(self, offset, length):
            return []

    harness.exports["silent"] = Silent(VOL_SIZE)
    c = harness.connect()
    c.connect("silent", meta=True)
    assert c.call(CMD_BLOCK_STATUS, 0, 1000).extents == [(1000, 0)]


def test_block_status_without_structured_replies_is_einval(harness):
    c = harness.connect()
    c.connect("vol", structured=False)
    r = c.call(CMD_BLOCK_STATUS, 0, 4096)
    assert r.error == EINVAL and not r.structured


def test_block_status_without_context_is_einval(harness):
    c = harness.connect()
    c.connect("vol", structured=True, meta=False)
    r = c.call(CMD_BLOCK_STATUS, 0, 4096)
    assert r.error == EINVAL and r.chunks == [(REPLY_FLAG_DONE, REPLY_TYPE_ERROR)] and r.message


# --------------------------------------------------------------------------------------------
# Transmission: refused requests
# --------------------------------------------------------------------------------------------


PAST_THE_END = [
    (CMD_READ, VOL_SIZE - 10, 11, EINVAL),
    (CMD_READ, VOL_SIZE, 1, EINVAL),
    (CMD_READ, 2 ** 64 - 1, 1, EINVAL),
    (CMD_WRITE, VOL_SIZE - 10, 11, ENOSPC),
    (CMD_WRITE, 2 ** 63, 512, ENOSPC),
    (CMD_TRIM, VOL_SIZE, 4096, EINVAL),
    (CMD_WRITE_ZEROES, VOL_SIZE - 1, 2, ENOSPC),
]


@pytest.mark.parametrize("structured,cmd,offset,length,err",
                         [(False, *case) for case in PAST_THE_END]
                         + [(True, *case) for case in PAST_THE_END + [(CMD_BLOCK_STATUS, VOL_SIZE - 1, 2, EINVAL)]])
def test_past_the_end(harness, vol, structured, cmd, offset, length, err):
    c = harness.connect()
    c.connect("vol", structured=structured, meta=structured)
    payload = b"\xaa" * length if cmd == CMD_WRITE else b""
    r = c.call(cmd, offset, length, payload=payload)
    assert r.error == err
    if structured:
        assert r.chunks == [(REPLY_FLAG_DONE, REPLY_TYPE_ERROR)] and "beyond" in r.message
    assert not r.data
    assert vol.calls == [] and vol.data == bytes(VOL_SIZE)
    # The refused write's payload was consumed: the stream is still in sync.
    assert c.read(0, 4) == bytes(4)


@pytest.mark.parametrize("cmd", [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS])
def test_zero_length_is_einval(harness, vol, cmd):
    c = harness.connect()
    c.connect("vol", meta=True)
    assert c.call(cmd, 0, 0).error == EINVAL
    assert vol.calls == []


@pytest.mark.parametrize("cmd,flags", [
    (CMD_READ, FLAG_NO_HOLE),
    (CMD_READ, FLAG_REQ_ONE),
    (CMD_WRITE, FLAG_DF),
    (CMD_WRITE, FLAG_NO_HOLE),
    (CMD_FLUSH, FLAG_REQ_ONE),
    (CMD_TRIM, FLAG_NO_HOLE),
    (CMD_WRITE_ZEROES, FLAG_DF),
    (CMD_BLOCK_STATUS, FLAG_NO_HOLE),
    (CMD_READ, 1 << 5),
    (CMD_READ, 0x8000),
])
def test_invalid_flags_are_einval(harness, vol, cmd, flags):
    c = harness.connect()
    c.connect("vol", meta=True)
    payload = b"w" * 512 if cmd == CMD_WRITE else b""
    length = 0 if cmd == CMD_FLUSH else 512
    assert c.call(cmd, 0, length, flags, payload).error == EINVAL
    assert vol.calls == [] and vol.data[:512] == bytes(512)
    assert c.read(0, 4) == bytes(4)


def test_df_flag_needs_structured_replies(harness, vol):
    vol.data[:4] = b"dfok"
    simple = harness.connect()
    simple.connect("vol", structured=False)
    assert simple.call(CMD_READ, 0, 4, FLAG_DF).error == EINVAL
    structured = harness.connect()
    structured.connect("vol", structured=True)
    r = structured.call(CMD_READ, 0, 4, FLAG_DF)
    assert r.data == b"dfok" and len(r.chunks) == 1   # at most one content chunk


@pytest.mark.parametrize("cmd", [CMD_CACHE, 8, 9, 200, 0xFFFF])
def test_unknown_commands_are_einval(harness, cmd):
    c = harness.connect()
    c.connect("vol")
    r = c.call(cmd, 0, 4096)
    assert r.error == EINVAL
    assert c.read(0, 1) == b"\0"
    assert harness.server.stats()["requests"]["invalid"] >= 1


def test_flush_with_offset_or_length_is_einval(harness, vol):
    c = harness.connect()
    c.connect("vol")
    assert c.call(CMD_FLUSH, 4096, 0).error == EINVAL
    assert c.call(CMD_FLUSH, 0, 1).error == EINVAL
    assert vol.flushes == 0


def test_read_larger_than_max_request_is_einval(harness):
    c = harness.connect()
    c.connect("big")
    assert c.call(CMD_READ, 0, MAX_REQUEST + 1).error == EINVAL
    assert len(c.read(0, MAX_REQUEST)) == MAX_REQUEST


def test_large_trim_and_zero_are_not_limited_by_max_request(harness):
    big = harness.exports["big"]
    c = harness.connect()
    c.connect("big")
    assert c.call(CMD_WRITE_ZEROES, 0, 4 * MiB).error == 0
    assert c.call(CMD_TRIM, 0, 4 * MiB).error == 0
    assert [call[0] for call in big.calls] == ["write_zeroes", "trim"]


def test_write_larger_than_max_request_disconnects(harness, vol):
    c = harness.connect()
    c.connect("vol")
    c.request(CMD_WRITE, 0, MAX_REQUEST + 1)   # the server hangs up before any payload
    assert_dropped(harness, c)
    assert [call[0] for call in vol.calls] == ["write", "read"]   # only assert_still_serves' I/O
    assert harness.server.stats()["protocol_errors"] == 1


def test_read_only_export_refuses_writes_with_eperm(harness):
    ro = harness.exports["ro"]
    ro.data[:4] = b"keep"
    c = harness.connect()
    c.connect("ro", meta=True)
    r = c.call(CMD_WRITE, 0, 4096, payload=b"w" * 4096)   # payload consumed, not applied
    assert r.error == EPERM and "read-only" in r.message
    assert c.call(CMD_TRIM, 0, 4096).error == EPERM
    assert c.call(CMD_WRITE_ZEROES, 0, 4096).error == EPERM
    assert c.call(CMD_WRITE_ZEROES, 0, 4096, FLAG_FAST_ZERO).error == EPERM
    assert ro.data[:4] == b"keep" and [call[0] for call in ro.calls] == []
    assert c.read(0, 4) == b"keep"
    assert c.call(CMD_FLUSH).error == 0
    assert c.call(CMD_BLOCK_STATUS, 0, 4096).error == 0


# --------------------------------------------------------------------------------------------
# Export failures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("op,cmd", [("read", CMD_READ), ("write", CMD_WRITE), ("flush", CMD_FLUSH),
                                    ("trim", CMD_TRIM), ("write_zeroes", CMD_WRITE_ZEROES)])
def test_export_nbd_error_is_passed_through(harness, vol, structured, op, cmd):
    c = harness.connect()
    c.connect("vol", structured=structured)
    vol.fail_next(op, NbdError(ENOSPC, "volume is full"))
    length = 0 if cmd == CMD_FLUSH else 4096
    r = c.call(cmd, 0, length, payload=b"w" * 4096 if cmd == CMD_WRITE else b"")
    assert r.error == ENOSPC and not r.data
    if structured:
        assert r.message == "volume is full" and r.chunks == [(REPLY_FLAG_DONE, REPLY_TYPE_ERROR)]
    assert c.read(0, 4) == bytes(4)   # the connection carries on


def test_export_nbd_error_with_offset_uses_error_offset_chunk(harness, vol):
    c = harness.connect()
    c.connect("vol")
    vol.fail_next("read", NbdError(EIO, "bad sector", offset=5000))
    r = c.call(CMD_READ, 4096, 4096)
    assert r.error == EIO and r.error_offset == 5000 and not r.data
    assert r.chunks == [(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET)]
    # An offset outside the request cannot be reported as such: plain error chunk.
    vol.fail_next("read", NbdError(EIO, "elsewhere", offset=0))
    r = c.call(CMD_READ, 4096, 4096)
    assert r.error == EIO and r.error_offset is None and r.chunks == [(REPLY_FLAG_DONE, REPLY_TYPE_ERROR)]


@pytest.mark.parametrize("structured", [False, True])
def test_export_crash_is_eio_logged_and_survived(harness, vol, caplog, structured):
    c = harness.connect()
    c.connect("vol", structured=structured, meta=structured)
    vol.fail_next("read", RuntimeError("disk on fire"))
    with caplog.at_level(logging.ERROR, logger="braid.storaged.nbd"):
        r = c.call(CMD_READ, 0, 4096)
    assert r.error == EIO and not r.data
    records = [rec for rec in caplog.records if rec.exc_info and "disk on fire" in str(rec.exc_info[1])]
    assert records, caplog.text
    assert c.read(0, 4) == bytes(4)
    vol.fail_next("block_status", ValueError("boom"))
    if structured:
        assert c.call(CMD_BLOCK_STATUS, 0, 4096).error == EIO
    assert harness.server.stats()["export_failures"] >= 1


def test_export_short_read_is_eio(harness):
    class Short(MemExport):
        async def read(self, offset, length):
            return b"x" * (length - 1)

    harness.exports["short"] = Short(VOL_SIZE)
    c = harness.connect()
    c.connect("short", structured=False)
    assert c.call(CMD_READ, 0, 100).error == EIO
    c.write(0, b"ok")   # the stream is still in sync (no stray payload was sent)


def test_export_may_grow_while_connected(harness, vol):
    c = harness.connect()
    c.connect("vol")
    assert c.call(CMD_READ, VOL_SIZE, 4096).error == EINVAL
    harness.call(vol.resize, VOL_SIZE + 4096)
    c.write(VOL_SIZE, b"grown")
    assert c.read(VOL_SIZE, 5) == b"grown"


# --------------------------------------------------------------------------------------------
# Concurrency, flow control, disconnects
# --------------------------------------------------------------------------------------------


def test_replies_come_back_out_of_order(harness, vol):
    vol.data[:8] = b"slowfast"
    gate = harness.call(vol.gate, "read", 0)
    c = harness.connect()
    c.connect("vol")
    slow = c.request(CMD_READ, 0, 4)
    fast = c.request(CMD_READ, 4, 4)
    write = c.request(CMD_WRITE, 8192, 3, payload=b"abc")
    first, second = c.reply(), c.reply()
    assert {first.cookie, second.cookie} == {fast, write}
    assert (first if first.cookie == fast else second).data == b"fast"
    harness.call(gate.set)
    last = c.reply()
    assert last.cookie == slow and last.data == b"slow"


def test_at_most_max_inflight_requests_run_at_once(harness, vol):
    gates = [harness.call(vol.gate, "read", i * 512) for i in range(3 * MAX_INFLIGHT)]
    c = harness.connect()
    c.connect("vol")
    cookies = [c.request(CMD_READ, i * 512, 512) for i in range(3 * MAX_INFLIGHT)]
    deadline = time.monotonic() + 5
    while vol.active < MAX_INFLIGHT and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert vol.active == MAX_INFLIGHT and len(vol.calls) == MAX_INFLIGHT
    for gate in reversed(gates):
        harness.call(gate.set)
    assert sorted(c.reply().cookie for _ in cookies) == sorted(cookies)
    assert vol.max_active == MAX_INFLIGHT


def test_server_stops_reading_when_client_does_not_read_replies(harness):
    big = harness.exports["big"]
    c = harness.connect()
    c.connect("big")
    n = 200
    # 200 x 1 MiB reads (200 MiB of replies) in one 5.6 KB send; we read no reply yet.
    c.send(b"".join(c.encode_request(CMD_READ, (i % 4) * MiB, MiB)[1] for i in range(n)))
    time.sleep(0.5)
    served = len(big.calls)
    # Write-buffer high water (4 MiB) + in-flight limit + what the kernel socket buffers hold.
    assert served <= 4 + MAX_INFLIGHT + 8, served
    replies = [c.reply() for _ in range(n)]
    assert all(r.error == 0 and len(r.data) == MiB for r in replies)
    assert len(big.calls) == n


def test_disconnect_waits_for_inflight_requests(harness, vol):
    gate = harness.call(vol.gate, "write", 0)
    c = harness.connect()
    c.connect("vol")
    cookie = c.request(CMD_WRITE, 0, 4, payload=b"last")
    c.disconnect()
    time.sleep(0.1)
    assert not harness.sessions[-1].done()    # the write has not replied yet
    harness.call(gate.set)
    r = c.reply()
    assert r.cookie == cookie and r.error == 0
    assert c.at_eof()
    harness.wait_session()
    assert vol.data[:4] == b"last"


def test_half_close_answers_every_buffered_request(harness, vol):
    vol.data[:4096] = pattern(4096)
    # The first MAX_INFLIGHT reads hold every slot until released, so the rest are still
    # queued behind them when the client half-closes; every one must still be answered.
    gates = [harness.call(vol.gate, "read", i) for i in range(MAX_INFLIGHT)]
    c = harness.connect()
    c.connect("vol")
    messages = [c.encode_request(CMD_READ, i, 8) for i in range(5 * MAX_INFLIGHT)]
    c.send(b"".join(m for _, m in messages))
    c.sock.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
    for gate in gates:
        harness.call(gate.set)
    replies = {r.cookie: r for r in (c.reply() for _ in messages)}
    assert sorted(replies) == [cookie for cookie, _ in messages]
    for i, (cookie, _) in enumerate(messages):
        assert replies[cookie].data == vol.data[i:i + 8]
    assert c.at_eof()
    harness.wait_session()


def test_client_vanishing_with_requests_in_flight(harness, vol):
    gate = harness.call(vol.gate, "read", 0)
    c = harness.connect()
    c.connect("vol")
    c.request(CMD_READ, 0, 4096)
    c.request(CMD_WRITE, 8192, 4, payload=b"done")
    time.sleep(0.1)
    c.close()
    time.sleep(0.1)
    assert not harness.sessions[-1].done()    # the gated read still runs
    harness.call(gate.set)
    harness.wait_session()
    assert vol.data[8192:8196] == b"done"
    assert_still_serves(harness)


def test_eof_in_the_middle_of_a_write_payload(harness, vol):
    c = harness.connect()
    c.connect("vol")
    c.request(CMD_WRITE, 0, 65536)
    c.send(b"p" * 30000)
    c.sock.shutdown(socket.SHUT_WR)
    assert c.at_eof()
    harness.wait_session()
    assert vol.calls == [] and vol.data == bytes(VOL_SIZE)


def test_bad_request_magic_disconnects_after_earlier_replies(harness, vol):
    vol.data[:2] = b"ok"
    c = harness.connect()
    c.connect("vol")
    cookie = c.request(CMD_READ, 0, 2)
    c.send(struct.pack(">IHHQQI", 0x12345678, 0, CMD_READ, 99, 0, 2))
    r = c.reply()
    assert r.cookie == cookie and r.data == b"ok"
    assert_dropped(harness, c)


def test_stats_count_requests_bytes_and_errors(harness, vol):
    c = harness.connect()
    c.connect("vol", meta=True)
    c.write(0, b"x" * 1000)
    c.read(0, 600)
    c.call(CMD_FLUSH)
    c.call(CMD_BLOCK_STATUS, 0, 4096)
    c.call(CMD_READ, VOL_SIZE, 1)
    c.call(77, 0, 0)
    stats = harness.server.stats()
    assert stats["connections_total"] == 1 and stats["connections_active"] == 1
    assert stats["requests"]["write"] == 1 and stats["requests"]["read"] == 2
    assert stats["requests"]["flush"] == 1 and stats["requests"]["block_status"] == 1
    assert stats["requests"]["invalid"] == 1
    assert stats["bytes_written"] == 1000 and stats["bytes_read"] == 600
    assert stats["errors"] == {"EINVAL": 2} and stats["errors_total"] == 2
    c.disconnect()
    assert c.at_eof()
    harness.wait_session()
    assert harness.server.stats()["connections_active"] == 0
    assert harness.server.stats()["requests"]["disc"] == 1


# --------------------------------------------------------------------------------------------
# Listeners and shutdown
# --------------------------------------------------------------------------------------------


def _connect_raw(family, address) -> RawClient:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address)
    return RawClient(sock)


def test_serve_unix_sets_mode_and_replaces_stale_socket(harness, vol, tmp_path):
    path = str(tmp_path / "nbd.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)      # a socket file nobody listens on, as left by a crashed daemon
    stale.close()
    harness.run(harness.server.serve_unix(path, mode=0o600))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    c = _connect_raw(socket.AF_UNIX, path)
    c.connect("vol")
    c.write(0, b"unix")
    assert c.read(0, 4) == b"unix"
    # A second server must not steal a live socket.
    with pytest.raises(OSError, match="listening"):
        harness.run(harness.server.serve_unix(path))
    c.close()


def test_serve_unix_refuses_to_replace_a_regular_file(harness, tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        harness.run(harness.server.serve_unix(str(path)))
    assert path.read_text() == "precious"


def test_serve_tcp_on_an_ephemeral_port(harness, vol):
    server = harness.run(harness.server.serve_tcp("127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    c = _connect_raw(socket.AF_INET, ("127.0.0.1", port))
    c.connect("vol")
    c.write(100, b"tcp")
    assert c.read(100, 3) == b"tcp"
    c.close()


def test_shutdown_finishes_or_cancels_inflight_and_closes(harness, vol):
    harness.call(vol.gate, "read", 0)             # never released
    negotiating = harness.connect()
    negotiating.handshake()
    busy = harness.connect()
    busy.connect("vol")
    busy.request(CMD_READ, 0, 4)
    done = harness.connect()
    done.connect("vol")
    cookie = done.request(CMD_WRITE, 0, 4, payload=b"fine")
    assert done.reply().cookie == cookie
    t0 = time.monotonic()
    harness.run(harness.server.shutdown(timeout=0.3))
    assert time.monotonic() - t0 < 5
    for c in (negotiating, busy, done):
        assert c.at_eof()
    for i in range(3):
        harness.wait_session(i)
    assert harness.server.stats()["connections_active"] == 0


def test_constructor_validates_limits():
    with pytest.raises(ValueError):
        NbdServer(dict().get, list, preferred_block=1000)
    with pytest.raises(ValueError):
        NbdServer(dict().get, list, max_request=1024, preferred_block=4096)
    with pytest.raises(ValueError):
        NbdServer(dict().get, list, max_request=1 << 32)
    with pytest.raises(ValueError):
        NbdServer(dict().get, list, max_inflight=0)
