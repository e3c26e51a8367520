"""Makes the node's kernel match a ``NodeState`` (net_daemon/model.py), through
netlink (pyroute2); the only module of Braid that changes links, FDB and
neighbour entries.

Idempotent and diff-based: every pass reads what is there and changes only
what differs, so a restarted daemon converges without touching what is
already right (traffic keeps flowing). What Braid creates carries an
ifalias starting with ``braid:``; only such links (and router namespaces
named ``braid-r-<node>-...``) are ever deleted.

Router namespaces are named netns (bind mounts in /run/netns): run the
daemon in the node's network namespace with ``nsenter --net=...``, not
``ip netns exec`` (whose private mount namespace would hide them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from dataclasses import dataclass, field

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from net_daemon.model import OWNER, BridgeState, NodeState, RouterState

log = logging.getLogger("braid.netd.kernel")

NTF_SELF, NTF_MASTER = 0x02, 0x04
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
ZERO_MAC = "00:00:00:00:00:00"


@dataclass
class Link:
    index: int
    name: str
    kind: str
    alias: str
    master: int
    mtu: int
    up: bool
    mac: str
    info: dict = field(default_factory=dict)


def _links(ipr) -> dict[str, Link]:
    out = {}
    for m in ipr.get_links():
        info = m.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else ""
        data = {}
        if kind == "vxlan" and info.get_attr("IFLA_INFO_DATA"):
            d = info.get_attr("IFLA_INFO_DATA")
            data = {"id": d.get_attr("IFLA_VXLAN_ID"), "local": d.get_attr("IFLA_VXLAN_LOCAL"),
                    "port": d.get_attr("IFLA_VXLAN_PORT")}
        name = m.get_attr("IFLA_IFNAME")
        out[name] = Link(m["index"], name, kind or "", m.get_attr("IFLA_IFALIAS") or "",
                         m.get_attr("IFLA_MASTER") or 0, m.get_attr("IFLA_MTU") or 0,
                         bool(m["flags"] & 1), m.get_attr("IFLA_ADDRESS") or "", data)
    return out


def _by_ifindex(msgs) -> dict[int, list]:
    out: dict[int, list] = {}
    for m in msgs:
        out.setdefault(m["ifindex"], []).append(m)
    return out


def bridge_mac(node: str, network: str) -> str:
    """A fixed, locally administered MAC per node and network (0a:...)."""
    h = hashlib.sha256(f"bridge-mac\0{node}\0{network}".encode()).hexdigest()
    return "0a:" + ":".join(h[i:i + 2] for i in range(0, 10, 2))


def _sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        log.warning("sysctl %s=%s: %s", path, value, exc)


class Kernel:
    def __init__(self, node: str, tunnel_ip: str, tunnel_port: int = 4789):
        self.node = node
        self.tunnel_ip = tunnel_ip
        self.tunnel_port = tunnel_port
        self.ipr = IPRoute()
        self.changes = 0   # netlink changes made (tests and metrics)
        # bridged IP traffic through the inet hooks: the firewall's conntrack
        _sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables", "1")
        _sysctl("/proc/sys/net/bridge/bridge-nf-call-ip6tables", "1")

    def close(self) -> None:
        self.ipr.close()

    @property
    def router_prefix(self) -> str:
        return f"braid-r-{self.node}-"

    def router_netns(self, router: str) -> str:
        return self.router_prefix + router

    # -- the whole pass ------------------------------------------------------

    def apply(self, state: NodeState) -> list[str]:
        """Converge; returns problems (one bad object does not stop the rest)."""
        problems: list[str] = []
        links = _links(self.ipr)
        # one dump of each table per pass (a per-device dump decodes them whole anyway)
        self._fdb_dump = _by_ifindex(self.ipr.fdb("dump"))
        self._neigh_dump = _by_ifindex(self.ipr.get_neighbours())
        for br in state.bridges.values():
            try:
                self._bridge(br, links)
            except Exception as exc:  # one network's trouble must not stop the others
                log.exception("network %s", br.network)
                problems.append(f"network {br.network}: {exc}")
        links = _links(self.ipr)
        wanted_legs = set()
        for rs in state.routers.values():
            wanted_legs |= {leg.outer for leg in rs.legs.values()}
            try:
                self._router(rs, links)
            except Exception as exc:
                log.exception("router %s", rs.name)
                problems.append(f"router {rs.name}: {exc}")
        self._remove_unwanted(state, wanted_legs)
        return problems

    # -- bridges and VXLAN -----------------------------------------------------

    def _change(self) -> None:
        self.changes += 1

    def _bridge(self, br: BridgeState, links: dict[str, Link]) -> None:
        alias = f"{OWNER}br:{br.network}"
        cur = links.get(br.bridge)
        if cur is not None and cur.kind != "bridge":
            raise OSError(f"{br.bridge} exists and is a {cur.kind or 'device'}, not a bridge")
        if cur is None:
            self.ipr.link("add", ifname=br.bridge, kind="bridge")
            self._change()
            _sysctl(f"/proc/sys/net/ipv6/conf/{br.bridge}/disable_ipv6", "1")
            cur = _links(self.ipr)[br.bridge]
        # a MAC set by us sticks: otherwise the bridge takes its lowest port's MAC
        # as ports come and go, and each change flushes its neighbour entries
        mac = bridge_mac(self.node, br.network)
        if cur.alias != alias or cur.mtu != br.mtu or not cur.up or cur.mac != mac:
            self.ipr.link("set", index=cur.index, ifalias=alias, mtu=br.mtu, state="up", address=mac)
            self._change()
        bidx = cur.index
        vx = links.get(br.vxlan)
        want = {"id": br.vni, "local": self.tunnel_ip, "port": self.tunnel_port}
        if vx is not None and (vx.kind != "vxlan" or vx.info != want):
            if not vx.alias.startswith(OWNER):
                raise OSError(f"{br.vxlan} exists and is not Braid's")
            self.ipr.link("del", index=vx.index)
            self._change()
            vx = None
        if vx is None:
            self.ipr.link("add", ifname=br.vxlan, kind="vxlan", vxlan_id=br.vni,
                          vxlan_local=self.tunnel_ip, vxlan_port=self.tunnel_port,
                          vxlan_learning=0)
            self._change()
            vx = _links(self.ipr)[br.vxlan]
            vx.master = 0
        if vx.master != bidx or vx.mtu != br.mtu or not vx.up or vx.alias != f"{OWNER}vx:{br.network}":
            self.ipr.link("set", index=vx.index, master=bidx, mtu=br.mtu, state="up",
                          ifalias=f"{OWNER}vx:{br.network}")
            self.ipr.brport("set", index=vx.index, neigh_suppress=1, learning=0)
            self._change()
        for tap in sorted(br.taps):
            t = links.get(tap)
            if t is not None and (t.master != bidx or not t.up):
                self.ipr.link("set", index=t.index, master=bidx, state="up")
                self._change()
        self._fdb(vx.index, br)
        self._neigh(self.ipr, bidx, br.neigh, self._neigh_dump.get(bidx, []))

    def _fdb(self, vx_index: int, br: BridgeState) -> None:
        have_self, have_master = set(), set()
        for e in self._fdb_dump.get(vx_index, []):
            mac, dst = e.get_attr("NDA_LLADDR"), e.get_attr("NDA_DST")
            if e.get_attr("NDA_MASTER"):
                if e["state"] & NUD_NOARP and not e["state"] & NUD_PERMANENT:
                    have_master.add(mac)
            elif dst:
                have_self.add((mac, dst))
        want_self = {(ZERO_MAC, ip) for ip in br.flood} | set(br.fdb.items())
        want_master = set(br.fdb)
        for mac, dst in have_self - want_self:
            self.ipr.fdb("del", ifindex=vx_index, lladdr=mac, dst=dst, flags=NTF_SELF)
            self._change()
        for mac in have_master - want_master:
            self.ipr.fdb("del", ifindex=vx_index, lladdr=mac, flags=NTF_MASTER)
            self._change()
        for mac, dst in sorted(want_self - have_self):
            # flood entries accumulate (append); a port's entry has one VTEP (replace)
            op = "append" if mac == ZERO_MAC else "replace"
            self.ipr.fdb(op, ifindex=vx_index, lladdr=mac, dst=dst, flags=NTF_SELF,
                         state=NUD_PERMANENT)
            self._change()
        for mac in sorted(want_master - have_master):
            self.ipr.fdb("replace", ifindex=vx_index, lladdr=mac, flags=NTF_MASTER, state=NUD_NOARP)
            self._change()

    def _neigh(self, ipr, index: int, want: dict[str, str], dump=None) -> None:
        have = {}
        for n in (dump if dump is not None else ipr.get_neighbours(ifindex=index)):
            if n["state"] & NUD_PERMANENT and n.get_attr("NDA_LLADDR"):
                have[n.get_attr("NDA_DST")] = n.get_attr("NDA_LLADDR")
        for ip in have.keys() - want.keys():
            ipr.neigh("del", dst=ip, ifindex=index)
            self._change()
        for ip, mac in sorted(want.items()):
            if have.get(ip) != mac:
                ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=index, state=NUD_PERMANENT)
                self._change()

    # -- routers ----------------------------------------------------------------

    def _router(self, rs: RouterState, links: dict[str, Link]) -> None:
        ns = self.router_netns(rs.name)
        if ns not in netns.listnetns():
            netns.create(ns)
            self._change()
            subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw",
                            "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                            "net.ipv4.conf.default.send_redirects=0"], check=True,
                           capture_output=True, timeout=30)
        with IPRoute(netns=ns) as rip:
            inner_links = _links(rip)
            lo = inner_links.get("lo")
            if lo is not None and not lo.up:
                rip.link("set", index=lo.index, state="up")
            for leg in rs.legs.values():
                alias = f"{OWNER}leg:{rs.name}/{leg.network}"
                outer = links.get(leg.outer)
                if outer is not None and leg.inner not in inner_links:
                    self.ipr.link("del", index=outer.index)  # half a pair: start over
                    outer = None
                if outer is None:
                    self.ipr.link("add", ifname=leg.outer, kind="veth",
                                  peer={"ifname": leg.inner, "net_ns_fd": ns})
                    self._change()
                    outer = _links(self.ipr)[leg.outer]
                    outer.master = 0
                    inner_links = _links(rip)
                bidx = links[leg.bridge].index if leg.bridge in links else _links(self.ipr)[leg.bridge].index
                if (outer.master != bidx or not outer.up or outer.alias != alias
                        or outer.mtu != leg.mtu):
                    self.ipr.link("set", index=outer.index, master=bidx, state="up", ifalias=alias,
                                  mtu=leg.mtu)
                    self._change()
                inner = inner_links[leg.inner]
                if inner.mac != rs.mac or not inner.up or inner.mtu != leg.mtu:
                    rip.link("set", index=inner.index, address=rs.mac, state="up", mtu=leg.mtu)
                    self._change()
                have = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                        for a in rip.get_addr(index=inner.index, family=2)}
                for a in have - set(leg.addresses):
                    ip, plen = a.split("/")
                    rip.addr("del", index=inner.index, address=ip, prefixlen=int(plen))
                    self._change()
                for a in sorted(set(leg.addresses) - have):
                    ip, plen = a.split("/")
                    rip.addr("add", index=inner.index, address=ip, prefixlen=int(plen))
                    self._change()
                self._neigh(rip, inner.index, {ip: mac for (leg_name, ip), mac in rs.neigh.items()
                                               if leg_name == leg.inner})
            wanted_inner = {leg.inner for leg in rs.legs.values()}
            for name, link in inner_links.items():
                if link.kind == "veth" and name not in wanted_inner:
                    rip.link("del", index=link.index)
                    self._change()

    # -- removal ------------------------------------------------------------------

    def _remove_unwanted(self, state: NodeState, wanted_legs: set[str]) -> None:
        links = _links(self.ipr)
        wanted = set(state.bridges) | {b.vxlan for b in state.bridges.values()} | wanted_legs
        for kind_order in ("vx:", "leg:", "br:"):
            for name, link in links.items():
                if link.alias.startswith(OWNER + kind_order) and name not in wanted:
                    log.info("removing %s (%s)", name, link.alias)
                    try:
                        self.ipr.link("del", index=link.index)
                        self._change()
                    except NetlinkError as exc:
                        log.warning("removing %s: %s", name, exc)
        for ns in netns.listnetns():
            if ns.startswith(self.router_prefix) and ns[len(self.router_prefix):] not in state.routers:
                log.info("removing router namespace %s", ns)
                netns.remove(ns)
                self._change()

    def remove_all(self) -> None:
        """Everything Braid made on this node (``braid-netd --cleanup``)."""
        self._remove_unwanted(NodeState(), set())


def in_netns_hint() -> str:
    """For log lines: which network namespace this process runs in."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return "?"
