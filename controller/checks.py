"""Prerequisite checks of the API (no side effects): does what an object
refers to exist, and can the node it names hold it? Failures are
FAILED_PRECONDITION with the field at fault: the request is well-formed but
the cluster cannot take it as it is. Network objects also get semantic
checks that make the request itself wrong (overlapping CIDRs, a changed
fixed field): those are ``Violation``s carrying INVALID_ARGUMENT.

``delete_blockers`` says why an object cannot be deleted yet (objects still
use it). Those checks read then delete, so they are best effort: a
concurrent create may slip in between. Address uniqueness is not checked
here but enforced by etcd transactions (controller/ipam.py).
"""

from __future__ import annotations

import logging

from google.protobuf.message import Message

from braid import keys
from braid import kinds as K
from braid.store import KV, Store
from braid.v1 import compute_pb2, network_pb2
from braid.validation import FieldError
from controller.ipam import (
    INVALID,
    PRECONDITION,
    Violation,
    default_gateway,
    ip_prefix,
    overlapping,
)

log = logging.getLogger("braid.controller.checks")

NETWORK, SUBNET, ROUTER = K.KINDS["network"], K.KINDS["subnet"], K.KINDS["router"]
PORT, SECURITYGROUP = K.KINDS["port"], K.KINDS["securitygroup"]
MAX_NAMES = 10  # names listed in a message


def vm_problems(store: Store, vm: compute_pb2.VM, old: compute_pb2.VM | None) -> list[FieldError]:
    """What stops ``vm`` from being run as specified (checked on create, and
    on update only for what the update changes). One atomic etcd read."""
    s = vm.spec
    node_kind = K.KINDS["node"]
    changed = old is None or old.spec.node != s.node or old.spec.max_memory_mib != s.max_memory_mib
    moved = bool(s.node and old is not None and old.spec.node and old.spec.node != s.node)
    old_volumes = {d.volume for d in old.spec.disks} if old else set()
    old_networks = {n.network for n in old.spec.nics} if old else set()
    volumes = [(i, d.volume) for i, d in enumerate(s.disks)
               if d.volume and d.volume not in old_volumes]
    networks = [(i, n.network) for i, n in enumerate(s.nics)
                if n.network and n.network not in old_networks]
    wanted = [K.KINDS["volume"].spec_key(v) for _, v in volumes]
    wanted += [K.KINDS["network"].spec_key(n) for _, n in networks]
    if s.node:
        wanted += [node_kind.status_key(s.node), node_kind.spec_key(s.node),
                 keys.live(s.node, "node-agent")]
    if not wanted:
        return []
    got, _ = store.get_many(wanted)
    out: list[FieldError] = []
    if s.node and changed:
        status_kv = got[node_kind.status_key(s.node)]
        if status_kv is None and got[node_kind.spec_key(s.node)] is None:
            out.append(FieldError("spec.node", f"node {s.node!r} does not exist"))
        elif status_kv is not None:
            try:
                status = K.from_json(status_kv.value, node_kind.status_message(), status_kv.key)
                have = status.allocatable.memory_bytes >> 20
            except K.CorruptObject:
                have = 0  # its agent rewrites it; nothing to check against now
            if have and s.max_memory_mib > have:
                out.append(FieldError(
                    "spec.max_memory_mib",
                    f"{s.max_memory_mib} MiB is more than node {s.node!r} can give "
                    f"({have} MiB allocatable)"))
    if moved and got[keys.live(s.node, "node-agent")] is None:
        out.append(FieldError("spec.node", f"cannot move to node {s.node!r}: it is not Ready"))
    for i, v in volumes:
        if got[K.KINDS["volume"].spec_key(v)] is None:
            out.append(FieldError(f"spec.disks[{i}].volume", f"volume {v!r} does not exist"))
    for i, n in networks:
        if got[K.KINDS["network"].spec_key(n)] is None:
            out.append(FieldError(f"spec.nics[{i}].network", f"network {n!r} does not exist"))
    return out


def volume_problems(store: Store, vol: Message, old: Message | None) -> list[FieldError]:
    """A volume grows but never shrinks (the guest's data would be cut off);
    its replica count and extent size are fixed at creation (changing them
    means moving data: rebuilds, a later storage issue)."""
    if old is None:
        return clone_problems(store, vol) if vol.spec.source_snapshot else []
    out = []
    if (vol.spec.source_snapshot, vol.spec.full_clone) != (old.spec.source_snapshot, old.spec.full_clone):
        out.append(FieldError("spec.source_snapshot", "the clone source is fixed at creation"))
    if vol.spec.size_bytes < old.spec.size_bytes:
        out.append(FieldError("spec.size_bytes", f"a volume cannot shrink ({old.spec.size_bytes} -> "
                                                 f"{vol.spec.size_bytes} bytes)"))
    if vol.spec.replicas != old.spec.replicas:
        out.append(FieldError("spec.replicas", "cannot be changed after creation"))
    if vol.spec.extent_size_bytes != old.spec.extent_size_bytes:
        out.append(FieldError("spec.extent_size_bytes", "cannot be changed after creation"))
    return out


def clone_problems(store: Store, vol: Message) -> list[FieldError]:
    """A clone needs a Ready snapshot; it is at least the snapshot's size and
    has its extent size (extents are shared one to one)."""
    snap_kind = K.KINDS["snapshot"]
    name = vol.spec.source_snapshot
    kv, st = store.get(snap_kind.spec_key(name)), store.get(snap_kind.status_key(name))
    if kv is None:
        return [FieldError("spec.source_snapshot", f"snapshot {name!r} not found")]
    try:
        snap = K.assemble(snap_kind, name, kv, st)
    except K.CorruptObject as exc:
        return [FieldError("spec.source_snapshot", str(exc))]
    if snap.status.phase != "Ready":
        return [FieldError("spec.source_snapshot", f"snapshot {name!r} is not Ready "
                                                   f"({snap.status.phase or 'Pending'})")]
    out = []
    if vol.spec.size_bytes < snap.status.size_bytes:
        out.append(FieldError("spec.size_bytes", f"a clone cannot be smaller than its snapshot "
                                                 f"({snap.status.size_bytes} bytes)"))
    if vol.spec.extent_size_bytes != snap.status.extent_size_bytes:
        out.append(FieldError("spec.extent_size_bytes", f"a clone has its snapshot's extent size "
                                                        f"({snap.status.extent_size_bytes})"))
    return out


def snapshot_problems(store: Store, snap: Message, old: Message | None) -> list[FieldError]:
    if old is not None:
        return [FieldError("spec.volume", "cannot be changed")] if snap.spec.volume != old.spec.volume else []
    if store.get(K.KINDS["volume"].spec_key(snap.spec.volume)) is None:
        return [FieldError("spec.volume", f"volume {snap.spec.volume!r} not found")]
    return []


# -- network objects ------------------------------------------------------------------

def _specs(kind: K.Kind, kvs: list[KV]) -> dict[str, Message]:
    """Specs by name; garbage is skipped (the API reports it elsewhere)."""
    out = {}
    for kv in kvs:
        if not kv.key.startswith(kind.spec_prefix):
            continue
        try:
            out[kv.key[len(kind.spec_prefix):]] = K.from_json(kv.value, kind.message, kv.key).spec
        except K.CorruptObject as exc:
            log.warning("check skips %s", exc)
    return out


def _names(names) -> str:
    names = sorted(set(names))
    more = f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
    return ", ".join(names[:MAX_NAMES]) + more


def router_members(router: str, routers: dict[str, network_pb2.RouterSpec],
                   subnets: dict[str, network_pb2.SubnetSpec]) -> set[str]:
    """The subnets attached to ``router``: those in its spec.subnets that
    exist, and those whose spec.router names it."""
    listed = set(routers[router].subnets) if router in routers else set()
    return {n for n, s in subnets.items() if n in listed or s.router == router}


def routers_of(subnet: str, spec: network_pb2.SubnetSpec,
               routers: dict[str, network_pb2.RouterSpec]) -> list[str]:
    """The routers ``subnet`` is attached to, either way (at most one is allowed)."""
    return sorted({r for r, rs in routers.items() if subnet in rs.subnets}
                  | ({spec.router} if spec.router else set()))


def _fixed(field: str, new: str, old: str, what: str) -> list[Violation]:
    if new == old:
        return []
    return [Violation(field, f"cannot be changed ({old!r} -> {new!r}); delete and recreate the {what}",
                      INVALID)]


def subnet_violations(name: str, s: network_pb2.SubnetSpec, old: network_pb2.SubnetSpec | None,
                      network_exists: bool, subnets: dict[str, network_pb2.SubnetSpec],
                      routers: dict[str, network_pb2.RouterSpec]) -> list[FieldError]:
    """Pure: what is wrong with subnet ``name`` given the other subnets and
    the routers (``subnets`` may hold the subnet itself; it is ignored)."""
    out: list[FieldError] = []
    if old is not None:
        out += _fixed("spec.network", s.network, old.network, "subnet")
        out += _fixed("spec.cidr", s.cidr, old.cidr, "subnet")
        out += _fixed("spec.gateway", s.gateway, old.gateway or default_gateway(old.cidr), "subnet")
    if not network_exists:
        out.append(Violation("spec.network", f"network {s.network!r} does not exist", PRECONDITION))
    if s.router and s.router not in routers:
        out.append(Violation("spec.router", f"router {s.router!r} does not exist", PRECONDITION))
    others = {n: o for n, o in subnets.items() if n != name}
    reported = set()
    same_net = sorted((n, o.cidr) for n, o in others.items() if o.network == s.network)
    for n, cidr in overlapping(s.cidr, same_net):
        reported.add(n)
        out.append(Violation("spec.cidr", f"{s.cidr} overlaps subnet {n!r} ({cidr}) of network "
                                          f"{s.network!r}", INVALID))
    attached = routers_of(name, s, routers)
    if len(attached) > 1:
        out.append(Violation("spec.router", f"subnet {name!r} would be attached to routers "
                                            f"{_names(attached)}; a subnet has one router at most",
                             INVALID))
    for r in attached:
        members = sorted((n, others[n].cidr) for n in router_members(r, routers, others))
        for n, cidr in overlapping(s.cidr, members):
            if n not in reported:
                reported.add(n)
                out.append(Violation("spec.cidr", f"{s.cidr} overlaps subnet {n!r} ({cidr}) "
                                                  f"attached to router {r!r}", INVALID))
    return out


def subnet_problems(store: Store, subnet: Message, old: Message | None) -> list[FieldError]:
    s = subnet.spec
    net_key = NETWORK.spec_key(s.network)
    lists, _ = store.list_many([SUBNET.spec_prefix, ROUTER.spec_prefix, net_key])
    return subnet_violations(
        subnet.metadata.name, s, old.spec if old is not None else None,
        any(kv.key == net_key for kv in lists[net_key]),
        _specs(SUBNET, lists[SUBNET.spec_prefix]), _specs(ROUTER, lists[ROUTER.spec_prefix]))


def router_violations(name: str, s: network_pb2.RouterSpec,
                      subnets: dict[str, network_pb2.SubnetSpec],
                      routers: dict[str, network_pb2.RouterSpec]) -> list[FieldError]:
    """Pure: what is wrong with router ``name`` (``routers`` may hold itself)."""
    out: list[FieldError] = []
    others = {r: rs for r, rs in routers.items() if r != name}
    members: list[tuple[str, str]] = []  # (field, subnet)
    for i, sn in enumerate(s.subnets):
        where = f"spec.subnets[{i}]"
        sub = subnets.get(sn)
        if sub is None:
            out.append(Violation(where, f"subnet {sn!r} does not exist", PRECONDITION))
            continue
        members.append((where, sn))
        elsewhere = sorted({r for r, rs in others.items() if sn in rs.subnets}
                           | ({sub.router} if sub.router and sub.router != name else set()))
        if elsewhere:
            out.append(Violation(where, f"subnet {sn!r} is already attached to router "
                                        f"{elsewhere[0]!r}", INVALID))
    members += [("spec.subnets", n) for n, sub in sorted(subnets.items())
                if sub.router == name and n not in s.subnets]
    for j, (where, sn) in enumerate(members):
        earlier = [(n, subnets[n].cidr) for _, n in members[:j]]
        for n, cidr in overlapping(subnets[sn].cidr, earlier):
            out.append(Violation(where, f"subnet {sn!r} ({subnets[sn].cidr}) overlaps subnet "
                                        f"{n!r} ({cidr}) on router {name!r}", INVALID))
    return out


def router_problems(store: Store, router: Message, old: Message | None) -> list[FieldError]:
    lists, _ = store.list_many([SUBNET.spec_prefix, ROUTER.spec_prefix])
    return router_violations(router.metadata.name, router.spec,
                             _specs(SUBNET, lists[SUBNET.spec_prefix]),
                             _specs(ROUTER, lists[ROUTER.spec_prefix]))


def port_problems(store: Store, port: Message, old: Message | None) -> list[FieldError]:
    """On update only: the network, MAC and addresses are fixed (a new port
    is checked and allocated in one go by ipam.create_port); the security
    groups must exist."""
    if old is None:
        return []
    s, o = port.spec, old.spec
    out: list[FieldError] = []
    out += _fixed("spec.network", s.network, o.network, "port")
    out += _fixed("spec.mac", s.mac, o.mac, "port")
    if list(s.fixed_ips) != list(o.fixed_ips):
        now = ", ".join(f"{f.subnet}={f.ip or '?'}" for f in s.fixed_ips) or "none"
        was = ", ".join(f"{f.subnet}={f.ip}" for f in o.fixed_ips) or "none"
        out.append(Violation("spec.fixed_ips", f"cannot be changed ({was} -> {now}); delete and "
                                               "recreate the port", INVALID))
    if s.security_groups:
        keys = [SECURITYGROUP.spec_key(g) for g in s.security_groups]
        got, _ = store.get_many(keys)
        for i, (g, k) in enumerate(zip(s.security_groups, keys)):
            if got[k] is None:
                out.append(Violation(f"spec.security_groups[{i}]",
                                     f"security group {g!r} does not exist", INVALID))
    return out


def securitygroup_problems(store: Store, sg: Message, old: Message | None) -> list[FieldError]:
    """Every remote_group must exist or be the group itself."""
    name = sg.metadata.name
    refs = [(i, r.remote_group) for i, r in enumerate(sg.spec.rules)
            if r.remote_group and r.remote_group != name]
    if not refs:
        return []
    got, _ = store.get_many({SECURITYGROUP.spec_key(g) for _, g in refs})
    return [Violation(f"spec.rules[{i}].remote_group", f"security group {g!r} does not exist",
                      INVALID)
            for i, g in refs if got[SECURITYGROUP.spec_key(g)] is None]


CHECKS = {"vm": vm_problems, "volume": volume_problems, "subnet": subnet_problems,
          "router": router_problems, "port": port_problems,
          "securitygroup": securitygroup_problems, "snapshot": snapshot_problems}


def problems(store: Store, kind: K.Kind, obj: Message, old: Message | None) -> list[FieldError]:
    """What stops ``obj`` from being stored; a plain FieldError means
    FAILED_PRECONDITION, a Violation carries its own code."""
    check = CHECKS.get(kind.name)
    return check(store, obj, old) if check else []


# -- deletes ----------------------------------------------------------------------------

def _network_users(store: Store, name: str) -> str:
    lists, _ = store.list_many([SUBNET.spec_prefix, PORT.spec_prefix])
    subnets = [n for n, s in _specs(SUBNET, lists[SUBNET.spec_prefix]).items() if s.network == name]
    ports = [n for n, s in _specs(PORT, lists[PORT.spec_prefix]).items() if s.network == name]
    used = ([f"subnets: {_names(subnets)}"] if subnets else []) + \
        ([f"ports: {_names(ports)}"] if ports else [])
    return f"it is still used by {'; '.join(used)}" if used else ""


def _subnet_users(store: Store, name: str) -> str:
    kvs, _ = store.list(ip_prefix(name))
    ports = [kv.value.decode(errors="replace") for kv in kvs]
    return f"it is still used by ports: {_names(ports)}" if ports else ""


def _securitygroup_users(store: Store, name: str) -> str:
    kvs, _ = store.list(PORT.spec_prefix)
    ports = [n for n, s in _specs(PORT, kvs).items() if name in s.security_groups]
    return f"it is still used by ports: {_names(ports)}" if ports else ""


DELETE_CHECKS = {"network": _network_users, "subnet": _subnet_users,
                 "securitygroup": _securitygroup_users}


def delete_blockers(store: Store, kind: K.Kind, name: str) -> str:
    """Why ``name`` cannot be deleted now ("" if it can, or does not exist):
    objects still use it. Best effort (read, then delete)."""
    check = DELETE_CHECKS.get(kind.name)
    if check is None or store.get(kind.spec_key(name)) is None:
        return ""
    return check(store, name)
