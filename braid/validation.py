"""Validation of API objects: pure functions, one per kind.

Each validator returns a list of ``FieldError(field, description)``; the API
turns them into INVALID_ARGUMENT with google.rpc.BadRequest field violations
so clients can point at the field at fault.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

from google.protobuf.message import Message

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
LABEL_KEY_RE = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_STRING = 4096          # any free-text field
MAX_LIST = 256             # disks, nics, rules, subnets ...
MAX_VCPUS = 512
MAX_MEMORY_MIB = 16 * 1024 * 1024        # 16 TiB
MAX_VOLUME_BYTES = 1 << 50               # 1 PiB
MIN_EXTENT = 1 << 20                     # 1 MiB
MAX_EXTENT = 1 << 30                     # 1 GiB


@dataclass(frozen=True)
class FieldError:
    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class Errors(list):
    def add(self, field: str, description: str) -> None:
        self.append(FieldError(field, description))

    def name(self, field: str, value: str, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "required")
            return
        if not NAME_RE.match(value):
            self.add(field, f"{value[:80]!r} is not a valid name (lowercase letters, digits "
                            "and '-', 1-63 chars, starting and ending alphanumeric)")

    def range(self, field: str, value: int, lo: int, hi: int) -> None:
        if not lo <= value <= hi:
            self.add(field, f"must be between {lo} and {hi} (got {value})")

    def choice(self, field: str, value: str, choices: tuple[str, ...]) -> None:
        if value and value not in choices:
            self.add(field, f"must be one of {', '.join(choices)} (got {value[:80]!r})")

    def length(self, field: str, items, limit: int = MAX_LIST) -> None:
        if len(items) > limit:
            self.add(field, f"at most {limit} entries (got {len(items)})")


def _strings(msg: Message, path: str, errs: Errors) -> None:
    """Cap every string field anywhere in the message (oversize input)."""
    for fd, value in msg.ListFields():
        here = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                continue  # labels and maps are checked on their own
            items = value if fd.is_repeated else [value]
            for i, item in enumerate(items):
                _strings(item, f"{here}[{i}]" if fd.is_repeated else here, errs)
        elif fd.type == fd.TYPE_STRING:
            items = value if fd.is_repeated else [value]
            if fd.is_repeated:
                errs.length(here, items)
            for item in items:
                if len(item) > MAX_STRING:
                    errs.add(here, f"longer than {MAX_STRING} characters")


def validate_metadata(obj: Message, errs: Errors) -> None:
    errs.name("metadata.name", obj.metadata.name)
    labels = obj.metadata.labels
    if len(labels) > MAX_LABELS:
        errs.add("metadata.labels", f"at most {MAX_LABELS} labels")
    for k, v in labels.items():
        if not LABEL_KEY_RE.match(k):
            errs.add(f"metadata.labels[{k[:80]}]", "invalid label key")
        if len(v) > MAX_LABEL_VALUE:
            errs.add(f"metadata.labels[{k[:80]}]", f"value longer than {MAX_LABEL_VALUE}")


def _node(obj, errs: Errors) -> None:
    pass  # spec holds two booleans only


def _vm(obj, errs: Errors) -> None:
    s = obj.spec
    errs.range("spec.vcpus", s.vcpus, 1, MAX_VCPUS)
    if s.max_vcpus:
        errs.range("spec.max_vcpus", s.max_vcpus, max(s.vcpus, 1), MAX_VCPUS)
    errs.range("spec.memory_mib", s.memory_mib, 16, MAX_MEMORY_MIB)
    if s.max_memory_mib:
        errs.range("spec.max_memory_mib", s.max_memory_mib, max(s.memory_mib, 16), MAX_MEMORY_MIB)
    errs.length("spec.disks", s.disks)
    errs.length("spec.nics", s.nics)
    seen = set()
    for i, d in enumerate(s.disks):
        f = f"spec.disks[{i}]"
        if not re.match(r"^(vd|sd|hd)[a-z]{1,2}$", d.name):
            errs.add(f"{f}.name", f"device name like vda/sdb required (got {d.name[:40]!r})")
        if d.name in seen:
            errs.add(f"{f}.name", f"duplicate device {d.name}")
        seen.add(d.name)
        if bool(d.volume) == bool(d.path):
            errs.add(f, "exactly one of volume or path is required")
        if d.volume:
            errs.name(f"{f}.volume", d.volume)
        if d.path and not d.path.startswith("/"):
            errs.add(f"{f}.path", "must be an absolute path")
        errs.choice(f"{f}.bus", d.bus, ("virtio", "scsi", "sata"))
        errs.range(f"{f}.boot_order", d.boot_order, 0, 64)
    for i, n in enumerate(s.nics):
        f = f"spec.nics[{i}]"
        if not n.network and not n.bridge:
            errs.add(f, "network (or bridge) is required")
        errs.name(f"{f}.network", n.network, required=False)
        errs.name(f"{f}.port", n.port, required=False)
        if n.mac and not MAC_RE.match(n.mac):
            errs.add(f"{f}.mac", f"not a MAC address: {n.mac[:40]!r}")
        errs.choice(f"{f}.model", n.model, ("virtio", "e1000"))
        for j, sg in enumerate(n.security_groups):
            errs.name(f"{f}.security_groups[{j}]", sg)
    errs.choice("spec.boot.firmware", s.boot.firmware, ("bios", "uefi"))
    if (s.boot.initrd or s.boot.cmdline) and not s.boot.kernel:
        errs.add("spec.boot.kernel", "required when initrd or cmdline is set")
    errs.range("spec.ha.priority", s.ha.priority, 0, 1000)
    errs.name("spec.node", s.node, required=False)
    errs.name("spec.affinity_group", s.affinity_group, required=False)
    errs.name("spec.anti_affinity_group", s.anti_affinity_group, required=False)


def _diskpool(obj, errs: Errors) -> None:
    s = obj.spec
    errs.name("spec.node", s.node)
    if not s.disks:
        errs.add("spec.disks", "at least one disk is required")
    errs.length("spec.disks", s.disks)
    names = set()
    for i, d in enumerate(s.disks):
        errs.name(f"spec.disks[{i}].name", d.name)
        if d.name in names:
            errs.add(f"spec.disks[{i}].name", f"duplicate disk {d.name}")
        names.add(d.name)
        if not d.path.startswith("/"):
            errs.add(f"spec.disks[{i}].path", "an absolute path is required")
        if d.capacity_bytes < 0:
            errs.add(f"spec.disks[{i}].capacity_bytes", "must not be negative")


def _volume(obj, errs: Errors) -> None:
    s = obj.spec
    errs.range("spec.size_bytes", s.size_bytes, 1 << 20, MAX_VOLUME_BYTES)
    if s.size_bytes % 512:
        errs.add("spec.size_bytes", "must be a multiple of 512")
    if s.replicas not in (0, 1, 2, 3):  # 1: unreplicated (scratch data, benchmarks)
        errs.add("spec.replicas", f"must be 1, 2 or 3 (got {s.replicas})")
    if s.extent_size_bytes:
        errs.range("spec.extent_size_bytes", s.extent_size_bytes, MIN_EXTENT, MAX_EXTENT)
        if s.extent_size_bytes & (s.extent_size_bytes - 1):
            errs.add("spec.extent_size_bytes", "must be a power of two")
    if s.qos.iops < 0:
        errs.add("spec.qos.iops", "must not be negative")
    if s.qos.bytes_per_second < 0:
        errs.add("spec.qos.bytes_per_second", "must not be negative")
    errs.name("spec.source_snapshot", s.source_snapshot, required=False)
    if s.full_clone and not s.source_snapshot:
        errs.add("spec.full_clone", "only with spec.source_snapshot")


def _snapshot(obj, errs: Errors) -> None:
    errs.name("spec.volume", obj.spec.volume)


def _network(obj, errs: Errors) -> None:
    s = obj.spec
    if s.vni:
        errs.range("spec.vni", s.vni, 1, (1 << 24) - 1)
    if s.mtu:
        errs.range("spec.mtu", s.mtu, 576, 9000)


def _subnet(obj, errs: Errors) -> None:
    s = obj.spec
    errs.name("spec.network", s.network)
    errs.name("spec.router", s.router, required=False)
    try:
        net = ipaddress.ip_network(s.cidr, strict=True)
    except ValueError as exc:
        errs.add("spec.cidr", f"not a network in CIDR form: {exc}")
        net = None
    if net is not None and net.num_addresses < 4:
        errs.add("spec.cidr", "prefix too long: fewer than 4 addresses")
    if s.gateway:
        try:
            gw = ipaddress.ip_address(s.gateway)
            if net is not None and gw not in net:
                errs.add("spec.gateway", f"{gw} is outside {net}")
        except ValueError as exc:
            errs.add("spec.gateway", str(exc))
    for i, dns in enumerate(s.dns_servers):
        try:
            ipaddress.ip_address(dns)
        except ValueError as exc:
            errs.add(f"spec.dns_servers[{i}]", str(exc))


def _port(obj, errs: Errors) -> None:
    s = obj.spec
    errs.name("spec.network", s.network)
    if s.mac and not MAC_RE.match(s.mac):
        errs.add("spec.mac", f"not a lowercase MAC address: {s.mac[:40]!r}")
    errs.length("spec.fixed_ips", s.fixed_ips)
    for i, fip in enumerate(s.fixed_ips):
        errs.name(f"spec.fixed_ips[{i}].subnet", fip.subnet)
        if fip.ip:
            try:
                ipaddress.ip_address(fip.ip)
            except ValueError as exc:
                errs.add(f"spec.fixed_ips[{i}].ip", str(exc))
    for i, sg in enumerate(s.security_groups):
        errs.name(f"spec.security_groups[{i}]", sg)
    errs.name("spec.vm", s.vm, required=False)
    errs.name("spec.node", s.node, required=False)


def _router(obj, errs: Errors) -> None:
    for i, sn in enumerate(obj.spec.subnets):
        errs.name(f"spec.subnets[{i}]", sn)
    if len(set(obj.spec.subnets)) != len(obj.spec.subnets):
        errs.add("spec.subnets", "duplicate subnet")


def _securitygroup(obj, errs: Errors) -> None:
    errs.length("spec.rules", obj.spec.rules)
    for i, r in enumerate(obj.spec.rules):
        f = f"spec.rules[{i}]"
        if r.direction == 0:
            errs.add(f"{f}.direction", "INGRESS or EGRESS is required")
        errs.choice(f"{f}.protocol", r.protocol, ("tcp", "udp", "icmp", "any"))
        errs.choice(f"{f}.ethertype", r.ethertype, ("IPv4", "IPv6"))
        if r.port_min or r.port_max:
            if r.protocol not in ("tcp", "udp"):
                errs.add(f"{f}.port_min", "ports apply to tcp or udp only")
            errs.range(f"{f}.port_min", r.port_min, 1, 65535)
            errs.range(f"{f}.port_max", r.port_max, max(r.port_min, 1), 65535)
        if r.remote_cidr and r.remote_group:
            errs.add(f, "remote_cidr and remote_group are exclusive")
        if r.remote_cidr:
            try:
                ipaddress.ip_network(r.remote_cidr, strict=False)
            except ValueError as exc:
                errs.add(f"{f}.remote_cidr", str(exc))
        errs.name(f"{f}.remote_group", r.remote_group, required=False)


VALIDATORS: dict[str, Callable[[Message, Errors], None]] = {
    "node": _node, "vm": _vm, "diskpool": _diskpool, "volume": _volume,
    "snapshot": _snapshot,
    "network": _network, "subnet": _subnet, "port": _port, "router": _router,
    "securitygroup": _securitygroup,
}


def validate(kind_name: str, obj: Message) -> list[FieldError]:
    """All problems of ``obj`` as an object of ``kind_name`` (empty: valid)."""
    errs = Errors()
    validate_metadata(obj, errs)
    _strings(obj.spec, "spec", errs)
    VALIDATORS[kind_name](obj, errs)
    return list(errs)
