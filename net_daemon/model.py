"""What one node's network data path should look like: a pure function of
the network objects in etcd (no kernel, no etcd here; unit-tested).

Per network hosted on the node: a bridge (``br-<network>``, the name the node
agent gives libvirt for the VM's tap) and a VXLAN device ``vx-<vni>`` without
learning, with a static FDB entry per remote port's MAC (toward the node that
hosts it) and a flood list of the other nodes hosting the network
(head-end replication). Every port's IP -> MAC is a static neighbour entry
on the bridge, so ARP requests are answered on the node (suppression).

A network is *hosted* on a node when a port of it is bound there, or when a
port of another network on the same router is (asymmetric routing: the node
that sends routes, so it needs every network of the router).

Per router with a hosted network: a namespace ``braid-r-<router>`` holding
one veth leg per network, with the subnets' gateway IPs and one anycast
gateway MAC, identical on every node; static neighbours for every port of
its subnets (the reply of a remote port would go to its own node's
gateway, never back: so routers never ARP).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from braid.naming import (  # noqa: F401
    IFNAMSIZ,
    ROUTER_NS_PREFIX,
    bridge_name,
    gateway_mac,
    leg_names,
    router_netns,
    short_hash,
    tap_name,
    vxlan_name,
)
from braid.v1 import compute_pb2, network_pb2

DEFAULT_MTU = 1450
OWNER = "braid:"                 # prefix of the ifalias of every link we own


def port_tap(port: network_pb2.Port) -> str:
    """The device that carries the port on its node: the VM NIC's tap, or
    for a port without a VM ``bp-<hash>``."""
    s = port.spec
    if s.vm:
        return tap_name(s.vm, s.nic or "eth0")
    name = f"bp-{short_hash('port', port.metadata.name)}"
    assert len(name) <= IFNAMSIZ
    return name


@dataclass
class Snapshot:
    """The decoded objects one reconcile works from (one etcd revision)."""
    networks: dict[str, network_pb2.Network] = field(default_factory=dict)
    subnets: dict[str, network_pb2.Subnet] = field(default_factory=dict)
    ports: dict[str, network_pb2.Port] = field(default_factory=dict)
    routers: dict[str, network_pb2.Router] = field(default_factory=dict)
    groups: dict[str, network_pb2.SecurityGroup] = field(default_factory=dict)
    vms: dict[str, compute_pb2.VM] = field(default_factory=dict)
    tunnels: dict[str, str] = field(default_factory=dict)   # node -> tunnel (VTEP) IP


@dataclass(frozen=True)
class Lease:
    """A DHCP host entry (the DHCP responder's input)."""
    mac: str
    ip: str
    prefix_len: int
    gateway: str
    server_ip: str
    dns: tuple[str, ...] = ()
    mtu: int = 0
    hostname: str = ""


@dataclass
class LocalPort:
    name: str
    network: str
    tap: str
    mac: str
    ips: tuple[str, ...]
    groups: tuple[str, ...]


@dataclass
class BridgeState:
    network: str
    bridge: str
    vni: int
    mtu: int
    vxlan: str
    flood: set[str] = field(default_factory=set)          # remote VTEP IPs
    fdb: dict[str, str] = field(default_factory=dict)     # remote port MAC -> VTEP IP
    neigh: dict[str, str] = field(default_factory=dict)   # IP -> MAC (suppression)
    taps: set[str] = field(default_factory=set)           # local devices to enslave
    dhcp: dict[str, Lease] = field(default_factory=dict)  # MAC -> lease (local ports)


@dataclass
class Leg:
    network: str
    bridge: str
    outer: str
    inner: str
    addresses: tuple[str, ...]   # gateway/prefix per subnet of the router on this network
    mtu: int = DEFAULT_MTU


@dataclass
class RouterState:
    name: str
    netns: str
    mac: str
    legs: dict[str, Leg] = field(default_factory=dict)              # network -> leg
    neigh: dict[tuple[str, str], str] = field(default_factory=dict)  # (inner leg, ip) -> mac


@dataclass
class NodeState:
    bridges: dict[str, BridgeState] = field(default_factory=dict)   # bridge name -> state
    routers: dict[str, RouterState] = field(default_factory=dict)
    ports: dict[str, LocalPort] = field(default_factory=dict)       # local ports by name
    problems: list[str] = field(default_factory=list)               # what could not be built


def port_node(snap: Snapshot, port: network_pb2.Port) -> str:
    """Where a port lives: its explicit binding, else its VM's node."""
    if port.spec.node:
        return port.spec.node
    vm = snap.vms.get(port.spec.vm) if port.spec.vm else None
    return vm.spec.node if vm is not None else ""


def port_ips(port: network_pb2.Port) -> tuple[str, ...]:
    return tuple(f.ip for f in port.spec.fixed_ips if f.ip)


def subnet_router(snap: Snapshot, name: str) -> str:
    sn = snap.subnets.get(name)
    if sn is not None and sn.spec.router and sn.spec.router in snap.routers:
        return sn.spec.router
    for r in sorted(snap.routers):
        if name in snap.routers[r].spec.subnets:
            return r
    return ""


def network_vni(net: network_pb2.Network) -> int:
    return net.status.vni or net.spec.vni


def _merged(snap: Snapshot, node: str, also: frozenset[str]) -> Snapshot:
    """The snapshot as if every port of ``also`` were bound to ``node``."""
    merged = Snapshot(**{f: dict(getattr(snap, f)) for f in Snapshot.__dataclass_fields__})
    for name, port in snap.ports.items():
        if port_node(snap, port) in also:
            p = network_pb2.Port()
            p.CopyFrom(port)
            p.spec.node = node
            merged.ports[name] = p
    return merged


def desired(snap: Snapshot, node: str, also: frozenset[str] = frozenset()) -> NodeState:
    """``also``: nodes whose ports live in this node's kernel too (a cluster on
    one machine, where one net daemon serves every node)."""
    out = NodeState()
    if also:
        snap = _merged(snap, node, also)
    subnets_of: dict[str, list[str]] = {}
    for sn_name in sorted(snap.subnets):
        subnets_of.setdefault(snap.subnets[sn_name].spec.network, []).append(sn_name)
    routers_of: dict[str, set[str]] = {}    # network -> routers
    networks_of: dict[str, set[str]] = {}   # router -> networks
    for sn_name, sn in snap.subnets.items():
        r = subnet_router(snap, sn_name)
        if r:
            routers_of.setdefault(sn.spec.network, set()).add(r)
            networks_of.setdefault(r, set()).add(sn.spec.network)
    nodes_of: dict[str, set[str]] = {}      # network -> nodes with ports
    bound: dict[str, str] = {}
    for name, port in snap.ports.items():
        n = port_node(snap, port)
        bound[name] = n
        if n:
            nodes_of.setdefault(port.spec.network, set()).add(n)

    def hosting(network: str) -> set[str]:
        nodes = set(nodes_of.get(network, ()))
        for r in routers_of.get(network, ()):
            for other in networks_of.get(r, ()):
                nodes |= nodes_of.get(other, set())
        return nodes

    hosted = sorted(net for net in snap.networks if node in hosting(net))
    for net_name in hosted:
        net = snap.networks[net_name]
        vni = network_vni(net)
        if not vni:
            out.problems.append(f"network {net_name}: no VNI allocated yet")
            continue
        br = BridgeState(network=net_name, bridge=bridge_name(net_name), vni=vni,
                         mtu=net.spec.mtu or DEFAULT_MTU, vxlan=vxlan_name(vni))
        for other in hosting(net_name) - {node}:
            ip = snap.tunnels.get(other)
            if ip:
                br.flood.add(ip)
        for sn_name in subnets_of.get(net_name, ()):  # the gateways answer ARP locally too
            r = subnet_router(snap, sn_name)
            if r and snap.subnets[sn_name].spec.gateway:
                br.neigh[snap.subnets[sn_name].spec.gateway] = gateway_mac(r)
        out.bridges[br.bridge] = br
    by_network = {b.network: b for b in out.bridges.values()}

    for name in sorted(snap.ports):
        port = snap.ports[name]
        br = by_network.get(port.spec.network)
        if br is None or not port.spec.mac:
            continue
        where = bound[name]
        for ip in port_ips(port):
            br.neigh[ip] = port.spec.mac
        if where == node:
            tap = port_tap(port)
            br.taps.add(tap)
            out.ports[name] = LocalPort(name, port.spec.network, tap, port.spec.mac,
                                        port_ips(port), tuple(port.spec.security_groups))
            for f in port.spec.fixed_ips:
                sn = snap.subnets.get(f.subnet)
                if sn is None or not f.ip or not sn.spec.dhcp:
                    continue
                if port.spec.mac in br.dhcp:
                    continue  # one lease per MAC: the first subnet with DHCP
                cidr = ipaddress.ip_network(sn.spec.cidr, strict=False)
                if cidr.version != 4:
                    continue
                routed = bool(subnet_router(snap, f.subnet))
                br.dhcp[port.spec.mac] = Lease(
                    mac=port.spec.mac, ip=f.ip, prefix_len=cidr.prefixlen,
                    gateway=sn.spec.gateway if routed else "",
                    server_ip=sn.spec.gateway or str(next(cidr.hosts())),
                    dns=tuple(sn.spec.dns_servers), mtu=br.mtu,
                    hostname=port.spec.vm or name)
        elif where:
            vtep = snap.tunnels.get(where)
            if vtep:
                br.fdb[port.spec.mac] = vtep
            else:
                out.problems.append(f"port {name}: node {where} has no live net daemon")

    for r_name in sorted(networks_of):
        nets = [n for n in sorted(networks_of[r_name]) if n in by_network]
        if not nets:
            continue
        rs = RouterState(name=r_name, netns=router_netns(r_name), mac=gateway_mac(r_name))
        for net_name in nets:
            outer, inner = leg_names(r_name, net_name)
            addrs = []
            for sn_name in subnets_of.get(net_name, ()):
                sn = snap.subnets[sn_name]
                if subnet_router(snap, sn_name) != r_name or not sn.spec.gateway:
                    continue
                cidr = ipaddress.ip_network(sn.spec.cidr, strict=False)
                addrs.append(f"{sn.spec.gateway}/{cidr.prefixlen}")
            rs.legs[net_name] = Leg(net_name, by_network[net_name].bridge, outer, inner,
                                    tuple(addrs), by_network[net_name].mtu)
            for port in snap.ports.values():
                if port.spec.network == net_name and port.spec.mac:
                    for ip in port_ips(port):
                        rs.neigh[(inner, ip)] = port.spec.mac
        out.routers[r_name] = rs
    return out
