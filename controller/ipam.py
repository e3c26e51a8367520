"""IP and MAC address management of ports, done by the API on port create.

Allocations are etcd keys next to the objects::

    ipam/ip/<subnet>/<ip>     -> name of the port holding the address
    ipam/mac/<mac>            -> name of the port holding the MAC

They are created in the same etcd transaction as the port's spec key
(``Store.create_many``: all keys or none, none may exist before) and deleted
in the same transaction as it, so no IP of a subnet and no MAC can ever be
held by two ports, whatever the number of concurrent requests or controller
replicas. A create that loses a race for an address it picked itself plans
again (bounded); one that loses a requested address fails ALREADY_EXISTS.

Pure planners decide (``plan_port``, ``next_free_ip``, ``ip_problem``,
``overlapping``, ``random_mac``); ``read_port_world`` and ``create_port``
are the only functions here that touch the store.
"""

from __future__ import annotations

import ipaddress
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable

import grpc

from braid import keys
from braid import kinds as K
from braid.store import AlreadyExists, Conflict, Guard, Store
from braid.v1 import network_pb2
from braid.validation import FieldError

MAC_PREFIX = (0x02, 0x62)   # 0x02: locally administered, unicast
MAX_TRIES = 20              # plans per port create before giving up (ABORTED)

PORT = K.KINDS["port"]
SUBNET = K.KINDS["subnet"]
NETWORK = K.KINDS["network"]
SECURITYGROUP = K.KINDS["securitygroup"]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
TAKEN = grpc.StatusCode.ALREADY_EXISTS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Violation(FieldError):
    """A field error with the status code it calls for (a plain FieldError
    from a check means FAILED_PRECONDITION)."""

    code: grpc.StatusCode = PRECONDITION


class Rejected(Exception):
    """The request cannot be done as it is; the API reports the violations."""

    def __init__(self, violations: Iterable[FieldError]):
        self.violations = list(violations)
        super().__init__("; ".join(str(v) for v in self.violations))


# -- keys --------------------------------------------------------------------------

def ip_prefix(subnet: str) -> str:
    return keys.ip_prefix(subnet)


def ip_key(subnet: str, ip: str) -> str:
    return keys.ip(subnet, ip)


def mac_key(mac: str) -> str:
    return keys.mac(mac)


def port_keys(spec: network_pb2.PortSpec) -> list[str]:
    """The allocation keys a port with this spec holds."""
    keys = [mac_key(spec.mac)] if spec.mac else []
    return keys + [ip_key(f.subnet, canonical_ip(f.ip)) for f in spec.fixed_ips if f.subnet and f.ip]


# -- addresses (pure) ----------------------------------------------------------------

def parse_cidr(cidr: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError:
        return None


def canonical_ip(ip: str) -> str:
    """The one spelling of an address used in keys and stored specs."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def default_gateway(cidr: str) -> str:
    """The first host address of ``cidr`` ("" if it is not a valid subnet)."""
    net = parse_cidr(cidr)
    if net is None or net.num_addresses < 4:
        return ""
    return str(net.network_address + 1)


def reserved(net: IPNetwork, gateway: str) -> set[IPAddress]:
    """Addresses of ``net`` no port may hold: the network address, the IPv4
    broadcast address and the gateway."""
    out: set[IPAddress] = {net.network_address}
    if net.version == 4:
        out.add(net.broadcast_address)
    if gateway:
        try:
            out.add(ipaddress.ip_address(gateway))
        except ValueError:
            pass
    return out


def ip_problem(net: IPNetwork, gateway: str, ip: str) -> str:
    """Why ``ip`` cannot be given to a port in ``net`` ("" if it can)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError as exc:
        return str(exc)
    if addr.version != net.version or addr not in net:
        return f"{addr} is outside {net}"
    if addr == net.network_address:
        return f"{addr} is the network address of {net}"
    if net.version == 4 and addr == net.broadcast_address:
        return f"{addr} is the broadcast address of {net}"
    if gateway and canonical_ip(gateway) == str(addr):
        return f"{addr} is the gateway of {net}"
    return ""


def next_free_ip(net: IPNetwork, gateway: str, taken: Collection[str]) -> str | None:
    """The lowest address of ``net`` that is neither reserved nor taken
    (None: the subnet is full). Iterates at most len(taken) + 4 times."""
    skip = reserved(net, gateway)
    for t in taken:
        try:
            skip.add(ipaddress.ip_address(t))
        except ValueError:
            pass
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    cls = type(net.network_address)
    for n in range(first, last + 1):
        addr = cls(n)
        if addr not in skip:
            return str(addr)
    return None


def overlapping(cidr: str, others: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (name, cidr) pairs of ``others`` whose network overlaps ``cidr``
    (networks of different IP versions never overlap; invalid ones neither)."""
    net = parse_cidr(cidr)
    if net is None:
        return []
    out = []
    for name, other in others:
        o = parse_cidr(other)
        if o is not None and o.version == net.version and net.overlaps(o):
            out.append((name, other))
    return out


def random_mac(randbytes: Callable[[int], bytes] = os.urandom) -> str:
    """``02:62:`` + 4 random bytes: a locally administered unicast MAC."""
    return ":".join(f"{b:02x}" for b in (*MAC_PREFIX, *randbytes(4)))


def mac_problem(mac: str) -> str:
    """Why ``mac`` (syntactically valid) cannot be a port's MAC ("" if it can)."""
    if int(mac[:2], 16) & 1:
        return f"{mac} is a multicast address"
    return ""


# -- planning a port ----------------------------------------------------------------------

@dataclass(frozen=True)
class PortWorld:
    """What a new port's allocation depends on, as read from the store."""

    exists: bool                                     # the port itself
    network: bool                                    # its network exists
    subnets: dict[str, network_pb2.SubnetSpec]       # those it names, or its network's
    security_groups: frozenset[str]                  # those of its groups that exist
    ips: dict[str, dict[str, str]] = field(default_factory=dict)  # subnet -> ip -> port
    macs: dict[str, str] = field(default_factory=dict)            # mac -> port
    revisions: dict[str, int] = field(default_factory=dict)       # key -> create_revision


@dataclass(frozen=True)
class PortPlan:
    spec: network_pb2.PortSpec        # the spec to store, mac and ips filled in
    claims: dict[str, str]            # allocation key -> port name
    chosen: frozenset[str]            # claims picked here (a lost race re-plans)
    problems: list[Violation]


def network_subnets(network: str, subnets: dict[str, network_pb2.SubnetSpec]) -> list[str]:
    return sorted(n for n, s in subnets.items() if s.network == network)


def plan_port(name: str, spec: network_pb2.PortSpec, world: PortWorld,
              randbytes: Callable[[int], bytes] = os.urandom) -> PortPlan:
    """Decide the MAC and IPs of a new port (pure). Requested values are
    checked; empty ones are allocated: the lowest free host address of the
    subnet, a random MAC. Without fixed_ips a port gets one address of its
    network's first subnet (by name), if it has any."""
    out = network_pb2.PortSpec()
    out.CopyFrom(spec)
    if not world.network:
        return PortPlan(out, {}, frozenset(), [Violation(
            "spec.network", f"network {spec.network!r} does not exist", PRECONDITION)])
    problems: list[Violation] = []
    claims: dict[str, str] = {}
    chosen: set[str] = set()
    for i, sg in enumerate(spec.security_groups):
        if sg not in world.security_groups:
            problems.append(Violation(f"spec.security_groups[{i}]",
                                      f"security group {sg!r} does not exist", INVALID))
    if spec.mac:
        why = mac_problem(spec.mac)
        owner = world.macs.get(spec.mac)
        if why:
            problems.append(Violation("spec.mac", why, INVALID))
        elif owner is not None:
            problems.append(Violation("spec.mac", f"{spec.mac} is already used by port {owner!r}",
                                      TAKEN))
        claims[mac_key(spec.mac)] = name
    else:
        out.mac = random_mac(randbytes)
        claims[mac_key(out.mac)] = name
        chosen.add(mac_key(out.mac))

    wanted = [(f"spec.fixed_ips[{i}]", f.subnet, f.ip) for i, f in enumerate(spec.fixed_ips)]
    if not wanted:
        first = network_subnets(spec.network, world.subnets)[:1]
        wanted = [("spec.fixed_ips", sn, "") for sn in first]
    del out.fixed_ips[:]
    mine: dict[str, set[str]] = {}   # subnet -> addresses this plan holds
    for where, sn, requested in wanted:
        subnet = world.subnets.get(sn)
        if subnet is None:
            problems.append(Violation(f"{where}.subnet", f"subnet {sn!r} does not exist", INVALID))
            continue
        if subnet.network != spec.network:
            problems.append(Violation(
                f"{where}.subnet",
                f"subnet {sn!r} belongs to network {subnet.network!r}, not {spec.network!r}",
                INVALID))
            continue
        net = parse_cidr(subnet.cidr)
        if net is None:
            problems.append(Violation(f"{where}.subnet",
                                      f"subnet {sn!r} has no valid cidr ({subnet.cidr!r})",
                                      PRECONDITION))
            continue
        gateway = subnet.gateway or default_gateway(subnet.cidr)
        taken = world.ips.get(sn, {})
        held = mine.setdefault(sn, set())
        if requested:
            ip = canonical_ip(requested)
            why = ip_problem(net, gateway, ip)
            if why:
                problems.append(Violation(f"{where}.ip", why, INVALID))
            elif ip in held:
                problems.append(Violation(f"{where}.ip", f"{ip} is listed twice", INVALID))
            elif ip in taken:
                problems.append(Violation(f"{where}.ip",
                                          f"{ip} is already used by port {taken[ip]!r}", TAKEN))
            claims[ip_key(sn, ip)] = name
        else:
            ip = next_free_ip(net, gateway, taken.keys() | held)
            if ip is None:
                problems.append(Violation(
                    where, f"subnet {sn!r} ({net}) has no free address", EXHAUSTED))
                continue
            claims[ip_key(sn, ip)] = name
            chosen.add(ip_key(sn, ip))
        held.add(ip)
        out.fixed_ips.add(subnet=sn, ip=ip)
    return PortPlan(out, claims, frozenset(chosen), problems)


# -- port updates (pure) ------------------------------------------------------------

def keep_allocations(new: network_pb2.PortSpec, old: network_pb2.PortSpec) -> None:
    """Fill an updated spec with what the port holds, so re-applying its
    manifest works: an empty mac keeps the current one; no fixed_ips, or the
    same subnets in the same order with empty or equal ips, keep the current
    addresses. Anything else is left for the checks to refuse."""
    if not new.mac:
        new.mac = old.mac
    if not new.fixed_ips:
        new.fixed_ips.extend(old.fixed_ips)
        return
    if len(new.fixed_ips) != len(old.fixed_ips):
        return
    for n, o in zip(new.fixed_ips, old.fixed_ips):
        if n.subnet != o.subnet or (n.ip and canonical_ip(n.ip) != canonical_ip(o.ip)):
            return
    del new.fixed_ips[:]
    new.fixed_ips.extend(old.fixed_ips)


# -- store adapter ------------------------------------------------------------------

def _decode_subnets(kvs) -> dict[str, network_pb2.SubnetSpec]:
    """Subnet specs by name (raises K.CorruptObject on garbage)."""
    out = {}
    for kv in kvs:
        out[kv.key[len(SUBNET.spec_prefix):]] = K.from_json(kv.value, SUBNET.message, kv.key).spec
    return out


def read_port_world(store: Store, name: str, spec: network_pb2.PortSpec) -> PortWorld:
    """Everything ``plan_port`` needs, in at most three reads."""
    net_key = NETWORK.spec_key(spec.network)
    sg_keys = {sg: SECURITYGROUP.spec_key(sg) for sg in spec.security_groups}
    sn_keys = {f.subnet: SUBNET.spec_key(f.subnet) for f in spec.fixed_ips}
    keys = [PORT.spec_key(name), net_key, *sg_keys.values(), *sn_keys.values()]
    if spec.mac:
        keys.append(mac_key(spec.mac))
    got, _ = store.get_many(keys)
    if spec.fixed_ips:
        subnet_kvs = [kv for kv in (got[k] for k in sn_keys.values()) if kv is not None]
    else:
        subnet_kvs, _ = store.list(SUBNET.spec_prefix)
    subnets = _decode_subnets(subnet_kvs)
    if spec.fixed_ips:
        used = [sn for sn in sn_keys if sn in subnets]
    else:
        subnets = {n: subnets[n] for n in network_subnets(spec.network, subnets)}
        used = sorted(subnets)[:1]
    ips: dict[str, dict[str, str]] = {}
    if used:
        lists, _ = store.list_many(ip_prefix(sn) for sn in used)
        for sn in used:
            ips[sn] = {kv.key[len(ip_prefix(sn)):]: kv.value.decode(errors="replace")
                       for kv in lists[ip_prefix(sn)]}
    revisions = {kv.key: kv.create_revision for kv in subnet_kvs if kv.key[len(SUBNET.spec_prefix):] in used}
    if got[net_key] is not None:
        revisions[net_key] = got[net_key].create_revision
    mac_kv = got.get(mac_key(spec.mac)) if spec.mac else None
    return PortWorld(
        exists=got[PORT.spec_key(name)] is not None,
        network=got[net_key] is not None,
        subnets=subnets,
        security_groups=frozenset(sg for sg, k in sg_keys.items() if got[k] is not None),
        ips=ips,
        macs={spec.mac: mac_kv.value.decode(errors="replace")} if mac_kv is not None else {},
        revisions=revisions,
    )


def create_port(store: Store, port: network_pb2.Port, encode: Callable[[network_pb2.Port], bytes],
                randbytes: Callable[[int], bytes] = os.urandom, tries: int = MAX_TRIES) -> int:
    """Allocate the addresses of ``port`` and create it with them, in one
    transaction. Fills ``port.spec`` with what was allocated; returns the
    revision. Raises Rejected (the violations), or AlreadyExists if the
    port exists. Guards on the network's and subnets' create revisions make
    a create whose network or subnet vanished meanwhile plan again."""
    name = port.metadata.name
    spec_key = PORT.spec_key(name)
    requested = network_pb2.PortSpec()
    requested.CopyFrom(port.spec)
    for attempt in range(tries):
        if attempt:
            time.sleep(random.uniform(0, 0.002 * attempt))  # de-synchronise racing creators
        world = read_port_world(store, name, requested)
        if world.exists:
            raise AlreadyExists(f"{spec_key} already exists", keys=[spec_key])
        plan = plan_port(name, requested, world, randbytes)
        if plan.problems:
            raise Rejected(plan.problems)
        port.spec.CopyFrom(plan.spec)
        items = {spec_key: encode(port)}
        items.update((k, v.encode()) for k, v in plan.claims.items())
        guards = [Guard(k, rev) for k, rev in world.revisions.items()]
        try:
            return store.create_many(items, guards)
        except AlreadyExists as exc:
            if spec_key in exc.keys:
                raise
            # lost a race: a picked value is re-planned; a requested one is
            # reported by the next plan (with its owner)
        except Conflict:
            pass  # the network or a subnet was deleted or re-created meanwhile
    port.spec.CopyFrom(requested)
    raise Rejected([Violation("spec", f"could not allocate addresses in {tries} tries "
                                      "(too many concurrent creates); retry",
                              grpc.StatusCode.ABORTED)])


def owned_keys(store: Store, name: str) -> list[str]:
    """The allocation keys port ``name`` holds (to delete with it); only
    keys whose value names it, so a delete never frees another port's."""
    kv = store.get(PORT.spec_key(name))
    if kv is None:
        return []
    try:
        spec = K.from_json(kv.value, PORT.message, kv.key).spec
    except K.CorruptObject:
        return []
    keys = port_keys(spec)
    if not keys:
        return []
    got, _ = store.get_many(keys)
    return [k for k in keys if got[k] is not None and got[k].value == name.encode()]
