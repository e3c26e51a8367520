"""The registry of API kinds and how their objects are encoded in etcd (the
keys themselves: braid.keys).

Values are protobuf messages in their canonical JSON encoding (readable in
``etcdctl watch``; see bench section ``encoding`` for the cost).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from braid import keys
from braid.v1 import compute_pb2, meta_pb2, network_pb2, node_pb2, storage_pb2


@dataclass(frozen=True)
class Kind:
    name: str          # key segment and CLI name: "vm"
    title: str         # message name: "VM"
    plural: str        # "vms"
    aliases: tuple[str, ...]
    message: type[Message]
    list_message: type[Message]
    event_message: type[Message]
    service: str       # full gRPC service name
    columns: tuple[tuple[str, str], ...]  # (header, dotted field path) for tables

    @property
    def spec_prefix(self) -> str:
        return keys.spec_prefix(self.name)

    @property
    def status_prefix(self) -> str:
        return keys.status_prefix(self.name)

    def spec_key(self, name: str) -> str:
        return keys.spec(self.name, name)

    def status_key(self, name: str) -> str:
        return keys.status(self.name, name)

    def status_message(self) -> type[Message]:
        return type(self.message().status)


def _kind(name, title, plural, aliases, module, columns) -> Kind:
    return Kind(
        name=name, title=title, plural=plural, aliases=aliases,
        message=getattr(module, title),
        list_message=getattr(module, f"{title}List"),
        event_message=getattr(module, f"{title}Event"),
        service=f"braid.v1.{title}Service",
        columns=columns,
    )


KINDS: dict[str, Kind] = {k.name: k for k in [
    _kind("node", "Node", "nodes", ("no",), node_pb2, (
        ("NAME", "metadata.name"), ("STATUS", "status.phase"),
        ("CPUS", "status.capacity.cpus"), ("MEMORY", "status.capacity.memory_bytes|bytes"),
        ("HYPERVISOR", "status.hypervisor"), ("ADDRESS", "status.addresses"),
        ("DAEMONS", "status.daemons|daemons"))),
    _kind("vm", "VM", "vms", ("vm", "virtualmachine"), compute_pb2, (
        ("NAME", "metadata.name"), ("PHASE", "status.phase"), ("NODE", "status.node"),
        ("VCPUS", "spec.vcpus"), ("MEMORY(MiB)", "spec.memory_mib"),
        ("POWER", "spec.power_state|enum"), ("HA", "spec.ha.enabled"))),
    _kind("diskpool", "DiskPool", "diskpools", ("pool", "pools"), storage_pb2, (
        ("NAME", "metadata.name"), ("NODE", "spec.node"), ("DISKS", "spec.disks|count"),
        ("PHASE", "status.phase"))),
    _kind("volume", "Volume", "volumes", ("vol", "vols"), storage_pb2, (
        ("NAME", "metadata.name"), ("SIZE", "spec.size_bytes|bytes"),
        ("REPLICAS", "spec.replicas"), ("PHASE", "status|volphase"),
        ("ALLOCATED", "status.allocated_bytes|bytes"), ("PHYSICAL", "status.physical_bytes|bytes"))),
    _kind("snapshot", "Snapshot", "snapshots", ("snap", "snaps"), storage_pb2, (
        ("NAME", "metadata.name"), ("VOLUME", "spec.volume"), ("PHASE", "status.phase"),
        ("SIZE", "status.size_bytes|bytes"), ("ALLOCATED", "status.allocated_bytes|bytes"),
        ("CREATED", "status.created_at"))),
    _kind("network", "Network", "networks", ("net", "nets"), network_pb2, (
        ("NAME", "metadata.name"), ("VNI", "status.vni"), ("MTU", "spec.mtu"),
        ("PHASE", "status.phase"), ("NODES", "status.nodes|list"))),
    _kind("subnet", "Subnet", "subnets", ("sn",), network_pb2, (
        ("NAME", "metadata.name"), ("NETWORK", "spec.network"), ("CIDR", "spec.cidr"),
        ("GATEWAY", "spec.gateway"), ("DHCP", "spec.dhcp"), ("ROUTER", "spec.router"))),
    _kind("port", "Port", "ports", (), network_pb2, (
        ("NAME", "metadata.name"), ("NETWORK", "spec.network"), ("MAC", "spec.mac"),
        ("IPS", "spec.fixed_ips|ips"), ("VM", "spec.vm"), ("NODE", "spec.node"))),
    _kind("router", "Router", "routers", ("rt",), network_pb2, (
        ("NAME", "metadata.name"), ("SUBNETS", "spec.subnets"), ("PHASE", "status.phase"))),
    _kind("securitygroup", "SecurityGroup", "securitygroups", ("sg", "sgs", "secgroup"),
          network_pb2, (
        ("NAME", "metadata.name"), ("RULES", "spec.rules|count"),
        ("DESCRIPTION", "spec.description"))),
]}

_LOOKUP: dict[str, Kind] = {}
for _k in KINDS.values():
    for _alias in (_k.name, _k.plural, _k.title.lower(), *_k.aliases):
        _LOOKUP[_alias.lower()] = _k


class UnknownKind(ValueError):
    pass


def lookup(name: str) -> Kind:
    """Find a kind by name, plural, message name or alias (case-insensitive)."""
    try:
        return _LOOKUP[name.lower()]
    except KeyError:
        known = ", ".join(sorted(k.name for k in KINDS.values()))
        raise UnknownKind(f"unknown kind {name!r} (known kinds: {known})") from None


# -- encoding ---------------------------------------------------------------

class CorruptObject(ValueError):
    """A value under our prefix that does not decode as what it should be."""


def to_json(msg: Message) -> bytes:
    """Canonical protobuf JSON, compact (no spaces), keys sorted."""
    return json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True),
                      separators=(",", ":"), sort_keys=True).encode()


def from_json(data: bytes, cls: type[Message], where: str = "") -> Message:
    try:
        if bytes(data).lstrip()[:1] != b"{":  # Parse would take [] or "x" as an empty message
            raise ValueError("not a JSON object")
        return json_format.Parse(data, cls(), ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptObject(f"stored value {where or cls.__name__} is not valid: {exc}") from None


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def encode_spec(kind: Kind, obj: Message) -> bytes:
    """What goes into ``<kind>/spec/<name>``: metadata (without revisions) + spec."""
    stored = kind.message()
    stored.metadata.CopyFrom(obj.metadata)
    stored.metadata.resource_version = 0
    stored.metadata.create_revision = 0
    stored.metadata.status_revision = 0
    stored.spec.CopyFrom(obj.spec)
    return to_json(stored)


def assemble(kind: Kind, name: str, spec_kv, status_kv, live_kvs=()) -> Message:
    """Build the API object from its stored spec and status keys.

    Raises CorruptObject when a stored value does not decode.
    """
    obj = kind.message()
    if spec_kv is not None:
        obj.CopyFrom(from_json(spec_kv.value, kind.message, spec_kv.key))
        obj.ClearField("status")
        obj.metadata.resource_version = spec_kv.mod_revision
        obj.metadata.create_revision = spec_kv.create_revision
    obj.metadata.name = name
    if status_kv is not None:
        obj.status.CopyFrom(from_json(status_kv.value, kind.status_message(), status_kv.key))
        obj.metadata.status_revision = status_kv.mod_revision
    if kind.name == "node":
        _node_liveness(obj, live_kvs)
    return obj


def _node_liveness(node: node_pb2.Node, live_kvs) -> None:
    """A node is Ready iff its node agent's lease-bound key exists; each
    daemon shows as live iff its own key exists."""
    daemons = {}
    for kv in live_kvs:
        try:
            d = from_json(kv.value, node_pb2.DaemonStatus, kv.key)
        except CorruptObject:
            d = node_pb2.DaemonStatus(name=kv.key.rsplit("/", 1)[-1])
        d.live = True
        daemons[d.name] = d
    for d in node.status.daemons:  # daemons seen before, now without a lease
        if d.name not in daemons:
            d.live = False
            daemons[d.name] = d
    del node.status.daemons[:]
    node.status.daemons.extend(sorted(daemons.values(), key=lambda d: d.name))
    ready = "node-agent" in daemons and daemons["node-agent"].live
    node.status.phase = "Ready" if ready else "NotReady"
    del node.status.conditions[:]
    for cond, daemon in (("Ready", "node-agent"), ("StorageReady", "storaged"),
                         ("NetworkReady", "netd")):
        live = daemon in daemons and daemons[daemon].live
        node.status.conditions.append(meta_pb2.Condition(
            type=cond, status=live,
            reason="LeaseAlive" if live else "NoLease",
            message=f"{daemon} {'holds' if live else 'has no'} a live lease"))
