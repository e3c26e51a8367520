"""net_daemon.dhcp: parsing, decisions and reply frames, checked byte by byte
against frames built here by hand (no sockets, no root)."""

from __future__ import annotations

import logging
import random
import socket
import struct
import time

import pytest

from net_daemon import dhcp
from net_daemon.dhcp import ACK, DECLINE, DISCOVER, INFORM, NAK, OFFER, RELEASE, REQUEST, Lease

MAC = "02:62:aa:bb:cc:dd"
SERVER_MAC = bytes.fromhex("0262000000fe")
LEASE = Lease(mac=MAC, ip="10.0.0.5", prefix_len=24, gateway="10.0.0.1", server_ip="10.0.0.1",
              dns=("10.0.0.53", "9.9.9.9"), mtu=1450, lease_seconds=3600, hostname="vm-a")
BARE = Lease(mac=MAC, ip="10.0.0.5", prefix_len=16, gateway="", server_ip="10.0.0.2")


def checksum(data: bytes) -> int:
    """RFC 1071, written independently of the module's."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(msg_type: int | None, mac: str = MAC, *, xid: int = 0x1234ABCD, flags: int = 0,
          ciaddr: str = "0.0.0.0", options=(), src_mac: str | None = None, op: int = 1,
          dport: int = 67, raw_options: bytes | None = None) -> bytes:
    """A client message as udhcpc would send it: Ethernet broadcast, 0.0.0.0 -> 255.255.255.255."""
    chaddr = bytes.fromhex(mac.replace(":", ""))
    opts = raw_options if raw_options is not None else (
        (bytes([53, 1, msg_type]) if msg_type else b"")
        + b"".join(bytes([c, len(v)]) + v for c, v in options) + b"\xff")
    bootp = (struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, xid, 0, flags,
                         socket.inet_aton(ciaddr), bytes(4), bytes(4), bytes(4), chaddr, b"", b"")
             + b"\x63\x82\x53\x63" + opts)
    udp = struct.pack("!HHHH", 68, dport, 8 + len(bootp), 0) + bootp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    src = bytes.fromhex((src_mac or mac).replace(":", ""))
    return b"\xff" * 6 + src + b"\x08\x00" + ip + udp


def ip4(s: str) -> bytes:
    return socket.inet_aton(s)


def dissect(reply: bytes) -> dict:
    """Check the framing of a reply and return its fields."""
    eth_dst, eth_src, ethertype = reply[:6], reply[6:12], reply[12:14]
    assert ethertype == b"\x08\x00"
    ip = reply[14:34]
    assert ip[0] == 0x45 and ip[9] == 17
    assert checksum(ip) == 0, "IPv4 header checksum"
    total = struct.unpack("!H", ip[2:4])[0]
    assert total == len(reply) - 14
    udp = reply[34:]
    sport, dport, ulen, ucsum = struct.unpack("!HHHH", udp[:8])
    assert (sport, dport, ulen) == (67, 68, len(udp))
    if ucsum:
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, ulen)
        assert checksum(pseudo + udp) == 0, "UDP checksum"
    p = udp[8:]
    assert len(p) >= 300
    assert p[236:240] == b"\x63\x82\x53\x63"
    opts, i = {}, 240
    while p[i] != 255:
        if p[i] == 0:
            i += 1
            continue
        opts[p[i]] = p[i + 2:i + 2 + p[i + 1]]
        i += 2 + p[i + 1]
    return {"eth_dst": eth_dst, "eth_src": eth_src, "ip_src": ip[12:16], "ip_dst": ip[16:20],
            "op": p[0], "htype": p[1], "hlen": p[2], "xid": struct.unpack("!I", p[4:8])[0],
            "flags": struct.unpack("!H", p[10:12])[0], "ciaddr": p[12:16], "yiaddr": p[16:20],
            "giaddr": p[24:28], "chaddr": p[28:44], "opts": opts}


def test_parse_discover():
    req = dhcp.parse_request(frame(DISCOVER, options=[(55, bytes([1, 3, 6, 26]))]))
    assert req is not None
    assert (req.msg_type, req.mac, req.src_mac, req.xid, req.flags) == (DISCOVER, MAC, MAC, 0x1234ABCD, 0)
    assert req.ciaddr == "0.0.0.0" and req.requested_ip == "" and req.server_id == ""
    assert req.params == bytes([1, 3, 6, 26])
    assert req.chaddr == bytes.fromhex("0262aabbccdd") + bytes(10)


def test_parse_request_options():
    req = dhcp.parse_request(frame(REQUEST, options=[(50, ip4("10.0.0.5")), (54, ip4("10.0.0.1"))]))
    assert (req.msg_type, req.requested_ip, req.server_id) == (REQUEST, "10.0.0.5", "10.0.0.1")


@pytest.mark.parametrize("f", [
    frame(DISCOVER, dport=53),                          # not the server port
    frame(DISCOVER, op=2),                              # a BOOTREPLY
    frame(DISCOVER)[:12] + b"\x86\xdd" + frame(DISCOVER)[14:],  # not IPv4
    b"", b"\xff" * 13, frame(DISCOVER)[:40],            # truncated
    frame(DISCOVER)[:-20],                              # IP/UDP length past the end
    frame(None),                                        # no message type
    frame(DISCOVER, raw_options=bytes([53, 1, 1, 50, 9, 1])),  # option runs past the end
    frame(DISCOVER, options=[(50, b"\x01\x02")]),       # requested IP of 2 bytes
])
def test_parse_rejects(f):
    assert dhcp.parse_request(f) is None


def test_parse_rejects_bad_ip_checksum():
    f = bytearray(frame(DISCOVER))
    f[24] ^= 0xFF
    assert dhcp.parse_request(bytes(f)) is None


def test_parse_tolerates_padding_and_missing_end():
    assert dhcp.parse_request(frame(None, raw_options=bytes([0, 0, 53, 1, 1]))).msg_type == DISCOVER
    # Ethernet trailer padding after the IP datagram is ignored
    assert dhcp.parse_request(frame(DISCOVER) + bytes(30)).msg_type == DISCOVER


def test_offer_frame():
    req = dhcp.parse_request(frame(DISCOVER, xid=0xDEADBEEF))
    assert dhcp.decide(req, LEASE) == OFFER
    r = dissect(dhcp.build_reply(req, LEASE, OFFER, SERVER_MAC))
    assert r["eth_dst"] == bytes.fromhex("0262aabbccdd") and r["eth_src"] == SERVER_MAC
    assert r["ip_src"] == ip4("10.0.0.1") and r["ip_dst"] == ip4("10.0.0.5")  # unicast to yiaddr
    assert (r["op"], r["htype"], r["hlen"], r["xid"], r["flags"]) == (2, 1, 6, 0xDEADBEEF, 0)
    assert r["yiaddr"] == ip4("10.0.0.5") and r["ciaddr"] == bytes(4) and r["giaddr"] == bytes(4)
    assert r["chaddr"] == req.chaddr
    assert r["opts"] == {
        53: bytes([OFFER]), 54: ip4("10.0.0.1"), 51: struct.pack("!I", 3600),
        1: ip4("255.255.255.0"), 3: ip4("10.0.0.1"), 6: ip4("10.0.0.53") + ip4("9.9.9.9"),
        26: struct.pack("!H", 1450), 12: b"vm-a"}


def test_broadcast_flag_sets_ip_broadcast_but_ethernet_stays_unicast():
    req = dhcp.parse_request(frame(DISCOVER, flags=0x8000))
    r = dissect(dhcp.build_reply(req, LEASE, OFFER, SERVER_MAC))
    assert r["ip_dst"] == b"\xff" * 4 and r["flags"] == 0x8000
    assert r["eth_dst"] == bytes.fromhex("0262aabbccdd")


def test_minimal_lease_options():
    req = dhcp.parse_request(frame(DISCOVER))
    r = dissect(dhcp.build_reply(req, BARE, OFFER, SERVER_MAC))
    assert r["opts"] == {53: bytes([OFFER]), 54: ip4("10.0.0.2"), 51: struct.pack("!I", 86400),
                         1: ip4("255.255.0.0")}
    assert r["ip_src"] == ip4("10.0.0.2")


def test_request_selecting_ack():
    req = dhcp.parse_request(frame(REQUEST, xid=7, options=[(50, ip4("10.0.0.5")),
                                                             (54, ip4("10.0.0.1"))]))
    assert dhcp.decide(req, LEASE) == ACK
    r = dissect(dhcp.build_reply(req, LEASE, ACK, SERVER_MAC))
    assert r["xid"] == 7 and r["yiaddr"] == ip4("10.0.0.5") and r["opts"][53] == bytes([ACK])
    assert r["opts"][51] == struct.pack("!I", 3600)


def test_request_renewing_by_ciaddr():
    req = dhcp.parse_request(frame(REQUEST, ciaddr="10.0.0.5"))
    assert dhcp.decide(req, LEASE) == ACK
    r = dissect(dhcp.build_reply(req, LEASE, ACK, SERVER_MAC))
    assert r["ip_dst"] == ip4("10.0.0.5") and r["ciaddr"] == ip4("10.0.0.5")


def test_request_for_another_address_is_naked():
    req = dhcp.parse_request(frame(REQUEST, options=[(50, ip4("10.0.0.99"))]))  # INIT-REBOOT
    assert dhcp.decide(req, LEASE) == NAK
    r = dissect(dhcp.build_reply(req, LEASE, NAK, SERVER_MAC))
    assert r["opts"] == {53: bytes([NAK]), 54: ip4("10.0.0.1")}
    assert r["yiaddr"] == bytes(4) and r["ip_dst"] == b"\xff" * 4
    assert r["eth_dst"] == bytes.fromhex("0262aabbccdd")
    renew = dhcp.parse_request(frame(REQUEST, ciaddr="10.0.0.77"))
    assert dhcp.decide(renew, LEASE) == NAK


def test_silence():
    discover = dhcp.parse_request(frame(DISCOVER))
    assert dhcp.decide(discover, None) is None  # unknown MAC
    other = Lease(mac="02:62:00:00:00:01", ip="10.0.0.6", prefix_len=24, gateway="", server_ip="10.0.0.1")
    assert dhcp.decide(discover, other) is None  # chaddr is not the lease's MAC
    for t in (RELEASE, DECLINE, 13):
        assert dhcp.decide(dhcp.parse_request(frame(t, ciaddr="10.0.0.5")), LEASE) is None
    # the client picked another server's offer
    picked = dhcp.parse_request(frame(REQUEST, options=[(50, ip4("10.0.0.5")), (54, ip4("10.9.9.9"))]))
    assert dhcp.decide(picked, LEASE) is None
    # REQUEST with neither option 50 nor ciaddr
    assert dhcp.decide(dhcp.parse_request(frame(REQUEST)), LEASE) is None


def test_inform_ack_has_no_address():
    req = dhcp.parse_request(frame(INFORM, ciaddr="10.0.0.5"))
    assert dhcp.decide(req, LEASE) == ACK
    r = dissect(dhcp.build_reply(req, LEASE, ACK, SERVER_MAC))
    assert r["yiaddr"] == bytes(4) and 51 not in r["opts"] and r["opts"][1] == ip4("255.255.255.0")
    assert r["ip_dst"] == ip4("10.0.0.5")


def test_fuzz_parse_never_raises():
    rng = random.Random(1)
    seeds = [frame(DISCOVER), frame(REQUEST, options=[(50, ip4("10.0.0.5")), (54, ip4("10.0.0.1")),
                                                      (55, bytes(range(1, 30))), (12, b"host")])]
    parsed = 0
    for i in range(2000):
        f = bytearray(rng.choice(seeds))
        kind = i % 4
        if kind == 0:
            f = bytearray(rng.randbytes(rng.randrange(0, 600)))
        elif kind == 1:
            f = f[:rng.randrange(0, len(f))]
        elif kind == 2:
            for _ in range(rng.randrange(1, 8)):
                f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
        else:  # garbage options after a valid header; fix lengths and checksum
            f = f[:14 + 28 + 240] + rng.randbytes(rng.randrange(0, 80))
            struct.pack_into("!H", f, 16, len(f) - 14)
            struct.pack_into("!H", f, 38, len(f) - 34)
            struct.pack_into("!H", f, 24, 0)
            struct.pack_into("!H", f, 24, checksum(bytes(f[14:34])))
        req = dhcp.parse_request(bytes(f))
        if req is not None:
            parsed += 1
            dhcp.decide(req, LEASE)
    assert parsed > 0  # the mutations do not all miss the parser


class FakeSocket:
    def __init__(self):
        self.sent = []

    def getsockname(self):
        return ("brd0", 0x0800, 0, 1, SERVER_MAC)

    def send(self, data):
        self.sent.append(data)
        return len(data)


def test_handle_counts_and_answers():
    r = dhcp.DhcpResponder()
    r.set_hosts("brd0", {MAC.upper(): LEASE})  # not started: no socket, the table is kept
    sock = FakeSocket()
    r._handle("brd0", sock, frame(DISCOVER))
    r._handle("brd0", sock, frame(REQUEST, options=[(50, ip4("10.0.0.5"))]))
    r._handle("brd0", sock, frame(REQUEST, options=[(50, ip4("10.0.0.6"))]))
    r._handle("brd0", sock, frame(DISCOVER, mac="02:62:00:00:00:09"))  # unknown MAC
    r._handle("brd0", sock, frame(DISCOVER, src_mac="02:62:00:00:00:09"))  # from another port
    r._handle("brd1", sock, frame(DISCOVER))  # another interface's table
    r._handle("brd0", sock, frame(DISCOVER)[:200])
    r._handle("brd0", sock, frame(DISCOVER, raw_options=bytes([53, 1, 1, 6, 40])))
    assert [dissect(f)["opts"][53][0] for f in sock.sent] == [OFFER, ACK, NAK]
    assert r.stats == {"offers": 1, "acks": 1, "naks": 1, "ignored": 3, "malformed": 2, "errors": 0}
    r.set_hosts("brd0", {})
    r._handle("brd0", sock, frame(DISCOVER))
    assert len(sock.sent) == 3


def test_missing_interface_is_logged_once_and_stop_is_quick(caplog):
    r = dhcp.DhcpResponder()
    r.start()
    with caplog.at_level(logging.WARNING, logger="braid.netd.dhcp"):
        for _ in range(3):
            r.set_hosts("braidnoif0", {MAC: LEASE})
        time.sleep(dhcp.RETRY_S * 1.5)  # a periodic retry happens meanwhile
    assert len([m for m in caplog.messages if "braidnoif0" in m]) == 1
    t0 = time.monotonic()
    r.stop()
    assert time.monotonic() - t0 < 1.0
    assert not r._socks
