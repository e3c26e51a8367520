"""DHCPv4 responder of braid-netd: the fixed addresses of this node's ports.

Why an own responder and not a dnsmasq per network: no extra process per
network per node (one thread serves all bridges); no IP needed on the bridge
(raw AF_PACKET sockets; it builds the Ethernet/IPv4/UDP frames itself, with
the lease's ``server_ip`` as source); the host table lives in memory and
``set_hosts()`` replaces it as ports come and go (no files, no SIGHUP).

Scope: only the MACs of ports bound to this node get an answer, and never a
dynamic address. DISCOVERs from other nodes' VMs arrive over VXLAN too and are
ignored (source MAC not in this node's table): their own node answers them.
Replies go to chaddr even with the broadcast flag set (IP destination
255.255.255.255 then, RFC 2131 4.1), so they never flood out over VXLAN.

Subset: DISCOVER -> OFFER; REQUEST -> ACK if it asks for the lease's address
(option 50, else ciaddr), NAK if for another, silence if it names another
server; INFORM -> ACK without yiaddr and lease time; RELEASE, DECLINE (logged)
-> silence. Relayed requests (from the relay's MAC) are not served; option 55
is honoured loosely (all options sent). A unicast RENEW to ``server_ip`` only
reaches us if sent to the bridge's MAC; else the client rebinds at T2.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
ETH_P_IP, PACKET_OUTGOING, _SO_ATTACH_FILTER = 0x0800, 4, 26
SERVER_PORT, CLIENT_PORT = 67, 68
MAGIC = b"\x63\x82\x53\x63"
BROADCAST_FLAG = 0x8000
RETRY_S = 1.0  # how often missing or re-created interfaces are (re)opened
_STAT = {OFFER: "offers", ACK: "acks", NAK: "naks"}
# classic BPF "udp dst port 67, not a fragment" (code, jt, jf, k): ldh [12]; jeq IPv4;
# ldb [23]; jeq UDP; ldh [20]; jset frag offset; ldxb 4*([14]&0xf); ldh [x+16]; jeq 67
_BPF = [(0x28, 0, 0, 12), (0x15, 0, 8, ETH_P_IP), (0x30, 0, 0, 23), (0x15, 0, 6, 17),
        (0x28, 0, 0, 20), (0x45, 4, 0, 0x1FFF), (0xB1, 0, 0, 14), (0x48, 0, 0, 16),
        (0x15, 0, 1, SERVER_PORT), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]  # accept; drop


@dataclass(frozen=True)
class Lease:
    mac: str            # "02:62:aa:bb:cc:dd" lowercase
    ip: str             # "10.0.0.5"
    prefix_len: int     # 24
    gateway: str        # "10.0.0.1" or "" (no router option then)
    server_ip: str      # server identifier + source IP of replies (usually the gateway)
    dns: tuple[str, ...] = ()
    mtu: int = 0        # option 26 when > 0
    lease_seconds: int = 86400
    hostname: str = ""  # option 12 when set


@dataclass(frozen=True)
class Request:
    """A client message as parsed from its Ethernet frame; addresses dotted."""
    src_mac: str        # Ethernet source
    mac: str            # chaddr: the client's hardware address
    chaddr: bytes       # the whole 16-byte field, copied into replies
    xid: int
    flags: int
    ciaddr: str         # "0.0.0.0" when unset
    giaddr: str
    msg_type: int       # option 53
    requested_ip: str = ""  # option 50
    server_id: str = ""     # option 54
    params: bytes = b""     # option 55
    options: dict[int, bytes] = field(default_factory=dict, repr=False)


class Malformed(ValueError):
    """A frame to udp/67 that is not a well-formed DHCP client message."""


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _ip4(s: str) -> bytes:
    return ipaddress.IPv4Address(s).packed


def _csum(data: bytes) -> int:
    """Internet checksum (RFC 1071); 0 over a header that carries a valid one."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s & 0xFFFF) + (s >> 16)
    return ~(s + (s >> 16)) & 0xFFFF


def _parse_options(data: bytes) -> dict[int, bytes]:
    """Options up to the end option (or the end of data); repeats concatenated (RFC 3396)."""
    opts: dict[int, bytes] = {}
    i = 0
    while i < len(data) and data[i] != 255:
        if data[i] == 0:  # pad
            i += 1
            continue
        end = i + 2 + (data[i + 1] if i + 1 < len(data) else 255)
        if end > len(data):
            raise Malformed(f"option {data[i]} runs past the end")
        opts[data[i]] = opts.get(data[i], b"") + data[i + 2:end]
        i = end
    return opts


def _parse(frame: bytes) -> Request | None:
    """None: not a client message to udp/67; raises Malformed: to udp/67, but broken.
    The UDP checksum is not checked (veth/tap offload leaves it partial)."""
    if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if (ip[0] >> 4 != 4 or ip[9] != 17 or ihl < 20 or len(ip) < ihl + 8
            or struct.unpack_from("!H", ip, 6)[0] & 0x3FFF):  # a fragment
        return None
    _, dport, ulen = struct.unpack_from("!HHH", ip, ihl)
    if dport != SERVER_PORT:
        return None
    total = struct.unpack_from("!H", ip, 2)[0]
    if total > len(ip) or _csum(ip[:ihl]) != 0:
        raise Malformed("bad IPv4 length or header checksum")
    if ulen < 8 or ihl + ulen > total:
        raise Malformed("bad UDP length")
    p = ip[ihl + 8:ihl + ulen]
    if len(p) < 240 or p[236:240] != MAGIC:
        raise Malformed("short BOOTP message or no magic cookie")
    if p[0] != 1:
        return None  # BOOTREPLY: another server's answer
    if p[1] != 1 or p[2] != 6:
        raise Malformed("hardware type is not Ethernet")
    opts = _parse_options(p[240:])
    for code, size in ((53, 1), (50, 4), (54, 4)):  # 53 (message type) is mandatory
        if (code == 53 or code in opts) and len(opts.get(code, b"")) != size:
            raise Malformed(f"option {code} missing or of bad length")
    xid, _, flags = struct.unpack_from("!IHH", p, 4)
    ntoa = socket.inet_ntoa
    return Request(
        src_mac=_mac(frame[6:12]), mac=_mac(p[28:34]), chaddr=bytes(p[28:44]), xid=xid,
        flags=flags, ciaddr=ntoa(p[12:16]), giaddr=ntoa(p[24:28]), msg_type=opts[53][0],
        requested_ip=ntoa(opts[50]) if 50 in opts else "",
        server_id=ntoa(opts[54]) if 54 in opts else "", params=opts.get(55, b""), options=opts)


def parse_request(frame: bytes) -> Request | None:
    """Ethernet frame -> DHCP client message to udp/67, or None (never raises)."""
    with contextlib.suppress(Exception):
        return _parse(frame)
    return None


def decide(req: Request, lease: Lease | None) -> int | None:
    """The reply to send (OFFER, ACK, NAK), or None to stay silent."""
    if lease is None or lease.mac.lower() != req.mac:
        return None
    if req.msg_type in (DISCOVER, INFORM):
        return OFFER if req.msg_type == DISCOVER else ACK
    wanted = req.requested_ip or (req.ciaddr if req.ciaddr != "0.0.0.0" else "")
    if req.msg_type != REQUEST or not wanted or req.server_id not in ("", lease.server_ip):
        return None  # RELEASE, DECLINE, unknown types; no address asked; another server chosen
    return ACK if wanted == lease.ip else NAK


def build_reply(req: Request, lease: Lease, msg_type: int, server_mac: bytes) -> bytes:
    """The full Ethernet frame answering *req* with *msg_type* (OFFER, ACK or NAK)."""
    bare = msg_type == NAK or req.msg_type == INFORM  # no address handed out
    yiaddr = "0.0.0.0" if bare else lease.ip
    ciaddr = req.ciaddr if msg_type == ACK else "0.0.0.0"
    opts = {53: bytes([msg_type]), 54: _ip4(lease.server_ip)}
    if msg_type != NAK:  # an empty value leaves its option out
        opts.update({
            51: b"" if bare else struct.pack("!I", max(0, min(lease.lease_seconds, 0xFFFFFFFF))),
            1: ipaddress.IPv4Network(f"0.0.0.0/{lease.prefix_len}").netmask.packed,
            3: _ip4(lease.gateway) if lease.gateway else b"",
            6: b"".join(_ip4(d) for d in lease.dns[:63]),
            26: struct.pack("!H", lease.mtu) if lease.mtu > 0 else b"",
            12: lease.hostname.encode()[:255]})
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s4s", 2, 1, 6, 0, req.xid, 0, req.flags,
                        _ip4(ciaddr), _ip4(yiaddr), bytes(4), _ip4(req.giaddr), req.chaddr,
                        b"", b"", MAGIC)
    bootp += b"".join(bytes([c, len(v)]) + v for c, v in opts.items() if v) + b"\xff"
    bootp = bootp.ljust(300, b"\0")  # the minimum BOOTP size (RFC 1542)
    # RFC 2131 4.1, giaddr being 0: NAK broadcast; ciaddr set: unicast to it;
    # broadcast flag: broadcast; else unicast to yiaddr. Ethernet: always chaddr.
    unset = req.ciaddr == "0.0.0.0"
    dst = ("255.255.255.255" if msg_type == NAK or (unset and (req.flags & BROADCAST_FLAG or bare))
           else yiaddr if unset else req.ciaddr)
    src, dst_b = _ip4(lease.server_ip), _ip4(dst)
    udp = struct.pack("!HHHH", SERVER_PORT, CLIENT_PORT, 8 + len(bootp), 0) + bootp
    udp_sum = _csum(src + dst_b + struct.pack("!BBH", 0, 17, len(udp)) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_sum) + udp[8:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst_b)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return req.chaddr[:6] + bytes(server_mac[:6]) + b"\x08\x00" + hdr + udp


class DhcpResponder:
    """One thread, one AF_PACKET socket per interface (ETH_P_IP, BPF for udp dst 67).

    Only the thread opens and closes sockets, on every wakeup (set_hosts(), a frame,
    RETRY_S): one per interface with a table (a missing one is logged once, retried),
    none for the rest; a deleted and re-created interface (new ifindex) is reopened."""

    def __init__(self, log=None):
        self.log = log or logging.getLogger("braid.netd.dhcp")
        self.stats = dict.fromkeys(("offers", "acks", "naks", "ignored", "malformed", "errors"), 0)
        self._lock = threading.Lock()  # guards _tables
        self._tables: dict[str, dict[str, Lease]] = {}
        self._socks: dict[str, tuple[socket.socket, int]] = {}  # ifname -> (socket, ifindex)
        self._missing: set[str] = set()  # interfaces logged as not openable
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)

    def set_hosts(self, ifname: str, leases: dict[str, Lease]) -> None:
        """Replace the host table (MAC -> Lease) of *ifname*; empty: forget the interface."""
        table = {mac.lower(): lease for mac, lease in leases.items()}
        with self._lock:
            if table:
                self._tables[ifname] = table
            else:
                self._tables.pop(ifname, None)
        self._wake()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dhcp-responder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread, which closes every socket on its way out."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer: a wakeup is pending anyway
            self._wake_w.send(b"!")

    def _reconcile(self) -> None:
        with self._lock:
            wanted = {ifname: len(t) for ifname, t in self._tables.items()}
        for ifname, (sock, index) in list(self._socks.items()):
            try:
                current = socket.if_nametoindex(ifname)
            except OSError:
                current = None
            if ifname not in wanted or current != index:
                del self._socks[ifname]
                sock.close()
        self._missing &= wanted.keys()  # forgotten ones are logged again when re-added
        for ifname in wanted.keys() - self._socks.keys():
            self._open(ifname, wanted[ifname])

    def _open(self, ifname: str, hosts: int) -> None:
        sock = None
        try:  # the index first: binding a missing name fails, a stale index goes unseen
            index = socket.if_nametoindex(ifname)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
            prog = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in _BPF))
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER,
                            struct.pack("HL", len(_BPF), ctypes.addressof(prog)))
            sock.bind((ifname, ETH_P_IP))
            sock.setblocking(False)
        except OSError as e:
            if sock is not None:
                sock.close()
            if ifname not in self._missing:  # log once
                self._missing.add(ifname)
                self.log.warning("dhcp: cannot listen on %s (%s); retrying", ifname, e)
            return
        self._missing.discard(ifname)
        self._socks[ifname] = (sock, index)
        self.log.info("dhcp: serving %d host(s) on %s", hosts, ifname)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._reconcile()
                socks = {s.fileno(): (ifname, s) for ifname, (s, _) in self._socks.items()}
                poller = select.poll()
                for fd in [self._wake_r.fileno(), *socks]:
                    poller.register(fd, select.POLLIN)
                for fd, _ in poller.poll(RETRY_S * 1000):
                    if fd in socks:
                        self._drain(*socks[fd])
                    else:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
            except Exception:  # a bad frame never gets here (_handle); keep serving anyway
                self.log.exception("dhcp: loop error")
                time.sleep(0.1)
        for sock, _ in self._socks.values():
            sock.close()
        self._socks.clear()

    def _drain(self, ifname: str, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                frame, addr = sock.recvfrom(4096)
            except OSError:  # EAGAIN: drained; ENETDOWN: link down (_reconcile sees deletion)
                return
            if addr[2] != PACKET_OUTGOING:
                self._handle(ifname, sock, frame)

    def _handle(self, ifname: str, sock, frame: bytes) -> None:
        try:
            req = _parse(frame)
        except Exception:
            self.stats["malformed"] += 1
            return
        with self._lock:
            lease = self._tables.get(ifname, {}).get(req.src_mac) if req else None
        kind = decide(req, lease) if req else None
        if kind is None:
            self.stats["ignored"] += 1
            if lease and req.msg_type == DECLINE:
                self.log.warning("dhcp: %s declined %s on %s: address in use elsewhere?",
                                 req.mac, lease.ip, ifname)
            return
        try:
            sock.send(build_reply(req, lease, kind, sock.getsockname()[4]))
        except Exception as e:
            self.stats["errors"] += 1
            self.log.warning("dhcp: cannot answer %s on %s: %s", req.mac, ifname, e)
            return
        self.stats[_STAT[kind]] += 1
        self.log.debug("dhcp: %s %s -> %s on %s", _STAT[kind][:-1], lease.ip, req.mac, ifname)
