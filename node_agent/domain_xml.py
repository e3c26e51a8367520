"""libvirt domain XML for Braid VMs: pure functions, no libvirt, no I/O. Like Nova's
``nova/virt/libvirt/config.py``: a ``braid.v1.VM`` plus facts about the host
(``HostContext``) in, XML out; policy stays with the caller. What cannot be expressed
faithfully raises ``ValueError("<field>: <why>")``. ``<memory>`` = max_memory_mib,
``<currentMemory>`` = memory_mib: the balloon moves between them (a guest sees the
maximum until its balloon driver runs: placement must count it); ``current`` of
``max_vcpus`` vCPUs are online, the rest can be hot-added."""

from __future__ import annotations

import posixpath
import re
import unicodedata
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable

from braid.naming import (  # noqa: F401  (re-exported for the node agent)
    IFNAMSIZ,
    XMLNS,
    bridge_name,
    domain_name,
    parse_braid_metadata,
    tap_name,
)
from braid.v1 import compute_pb2
from braid.validation import NAME_RE

DISK_BUSES = ("virtio", "scsi", "sata")
NIC_MODELS = ("virtio", "e1000")
DEVICE_RE = re.compile(r"^(vd|sd|hd)[a-z]{1,2}$")
CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class HostContext:  # what the XML needs to know about the node it will run on
    domain_type: str                      # "kvm" | "qemu" (TCG)
    emulator: str = "/usr/bin/qemu-system-x86_64"
    console_log_dir: str
    machine: str = "pc"
    nbd_socket_for: Callable[[str], str] | None = None  # volume -> its NBD unix socket here
    node: str = ""                        # written into the metadata when set

    def __post_init__(self) -> None:
        if self.domain_type not in ("kvm", "qemu"):
            raise ValueError(f"domain_type: must be kvm or qemu (got {self.domain_type!r})")
        _abs_path(self.emulator, "emulator")
        _abs_path(self.console_log_dir, "console_log_dir")
        if not CPU_MODEL_RE.match(self.machine):
            raise ValueError(f"machine: not a machine type: {self.machine!r}")
        _text(self.node, "node")

    def console_log(self, vm_name: str) -> str:
        """Where the serial console of a VM is logged on this host."""
        return posixpath.join(self.console_log_dir, f"{vm_name}.log")


def _text(value: str, field: str) -> str:  # must survive the XML round trip
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in "\ufffe\uffff":
            raise ValueError(f"{field}: control character {ch!r} cannot be expressed in XML")
    return value


def _abs_path(value: str, field: str) -> str:
    if not _text(value, field).startswith("/"):
        raise ValueError(f"{field}: an absolute path is required (got {value!r})")
    return value


def _ifname(value: str, field: str) -> str:  # what the kernel's dev_valid_name() accepts
    if (not value or len(value) > IFNAMSIZ or value in (".", "..")
            or any(c in "/:" or c.isspace() for c in value)):
        raise ValueError(f"{field}: not a valid interface name (max {IFNAMSIZ} chars): {value!r}")
    return _text(value, field)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    el.text = text
    return el


def _serialize(el: ET.Element) -> str:
    ET.indent(el, space="  ")
    return ET.tostring(el, encoding="unicode") + "\n"


def _disk(disk: compute_pb2.VMDisk, ctx: HostContext, f: str) -> ET.Element:
    if not DEVICE_RE.match(disk.name):
        raise ValueError(f"{f}.name: device name like vda/sdb required (got {disk.name!r})")
    bus = disk.bus or "virtio"
    if bus not in DISK_BUSES:
        raise ValueError(f"{f}.bus: must be one of {', '.join(DISK_BUSES)} (got {bus!r})")
    if bool(disk.volume) == bool(disk.path):
        raise ValueError(f"{f}: exactly one of volume or path is required")
    if disk.read_only and bus == "sata":  # libvirt: "readonly sata disks are not supported"
        raise ValueError(f"{f}.read_only: read-only disks are not supported on the sata bus")
    if disk.boot_order < 0:
        raise ValueError(f"{f}.boot_order: must not be negative")
    if disk.volume:
        if not NAME_RE.match(disk.volume):
            raise ValueError(f"{f}.volume: not a valid volume name: {disk.volume!r}")
        if ctx.nbd_socket_for is None:
            raise ValueError(f"{f}.volume: volume disks need HostContext.nbd_socket_for (NBD exports)")
        sock = _abs_path(ctx.nbd_socket_for(disk.volume), f"{f}.volume (NBD socket)")
        el = ET.Element("disk", type="network", device="disk")
        _sub(el, "driver", name="qemu", type="raw", cache="none", io="native", discard="unmap")
        _sub(_sub(el, "source", protocol="nbd", name=disk.volume), "host", transport="unix", socket=sock)
    else:
        el = ET.Element("disk", type="file", device="disk")
        _sub(el, "driver", name="qemu", type="raw")
        _sub(el, "source", file=_abs_path(disk.path, f"{f}.path"))
    _sub(el, "target", dev=disk.name, bus=bus)
    if disk.read_only:
        _sub(el, "readonly")
    if disk.boot_order > 0:
        _sub(el, "boot", order=str(disk.boot_order))
    return el


def _nic(nic: compute_pb2.VMNic, vm_name: str, nic_name: str, f: str) -> ET.Element:
    if not nic.bridge and not nic.network:
        raise ValueError(f"{f}: network or bridge is required")
    try:
        bridge = _ifname(nic.bridge, "bridge") if nic.bridge else bridge_name(nic.network)
    except ValueError as exc:
        raise ValueError(f"{f}.{exc}") from None
    model = nic.model or "virtio"
    if model not in NIC_MODELS:
        raise ValueError(f"{f}.model: must be one of {', '.join(NIC_MODELS)} (got {model!r})")
    el = ET.Element("interface", type="bridge")
    _sub(el, "source", bridge=bridge)
    if nic.mac:  # else libvirt assigns one: read it back from the live XML
        if not MAC_RE.match(nic.mac) or int(nic.mac[:2], 16) & 1 or not nic.mac.strip("0:"):
            raise ValueError(f"{f}.mac: not a unicast MAC address: {nic.mac!r}")
        _sub(el, "mac", address=nic.mac.lower())
    _sub(el, "model", type=model)
    _sub(el, "target", dev=tap_name(vm_name, _text(nic_name, f"{f}.name")))
    return el


def disk_xml(disk: compute_pb2.VMDisk, ctx: HostContext) -> str:
    """One ``<disk>`` for attachDeviceFlags/detachDeviceFlags."""
    return _serialize(_disk(disk, ctx, "disk"))


def nic_xml(nic: compute_pb2.VMNic, ctx: HostContext, vm_name: str) -> str:
    """One ``<interface>`` for hot attach/detach. The VM name is part of the
    tap device name, so it is needed here; the NIC must be named."""
    if not nic.name:
        raise ValueError("nic.name: required (it names the tap device)")
    return _serialize(_nic(nic, vm_name, nic.name, "nic"))


def _cpu(model: str, ctx: HostContext) -> ET.Element:
    if model in ("", "host-passthrough", "host-model"):
        if ctx.domain_type == "kvm":
            return ET.Element("cpu", mode=model or "host-passthrough")
        model, fallback = "qemu64", "allow"  # TCG has no host CPU to pass through
    elif not CPU_MODEL_RE.match(model):
        raise ValueError(f"spec.cpu_model: not a CPU model name: {model!r}")
    else:
        fallback = "forbid"  # an explicitly requested model is not silently replaced
    el = ET.Element("cpu", mode="custom", match="exact")
    _sub(el, "model", model, fallback=fallback)
    return el


def _os(boot: compute_pb2.VMBoot, ctx: HostContext, boot_orders: bool) -> ET.Element:
    firmware = boot.firmware or "bios"
    if firmware not in ("bios", "uefi"):
        raise ValueError(f"spec.boot.firmware: must be bios or uefi (got {firmware!r})")
    el = ET.Element("os", firmware="efi") if firmware == "uefi" else ET.Element("os")
    _sub(el, "type", "hvm", arch="x86_64", machine=ctx.machine)
    if boot.kernel:
        _sub(el, "kernel", _abs_path(boot.kernel, "spec.boot.kernel"))
        if boot.initrd:
            _sub(el, "initrd", _abs_path(boot.initrd, "spec.boot.initrd"))
        if boot.cmdline:
            _sub(el, "cmdline", _text(boot.cmdline, "spec.boot.cmdline"))
    elif boot.initrd or boot.cmdline:
        raise ValueError("spec.boot.kernel: required when initrd or cmdline is set")
    elif not boot_orders:  # libvirt rejects <boot dev> next to per-device boot order
        _sub(el, "boot", dev="hd")
    return el


def _sizes(spec: compute_pb2.VMSpec) -> tuple[int, int, int, int]:
    vcpus, mem = spec.vcpus, spec.memory_mib
    max_vcpus, max_mem = spec.max_vcpus or vcpus, spec.max_memory_mib or mem
    for field, value, low in (("vcpus", vcpus, 1), ("max_vcpus", max_vcpus, max(vcpus, 1)),
                              ("memory_mib", mem, 1), ("max_memory_mib", max_mem, max(mem, 1))):
        if value < low:
            raise ValueError(f"spec.{field}: must be at least {low} (got {value})")
    return vcpus, max_vcpus, mem, max_mem


def _unique(values: list, f: str, what: str) -> None:
    for i, v in enumerate(values):
        if v is not None and v in values[:i]:
            raise ValueError(f"spec.{f}[{i}]: duplicate {what} {v}")


def build_domain(vm: compute_pb2.VM, ctx: HostContext) -> str:
    """The full domain XML of a VM on a host (pretty, deterministic)."""
    md, spec = vm.metadata, vm.spec
    vcpus, max_vcpus, mem, max_mem = _sizes(spec)
    disks = spec.disks
    _unique([d.name for d in disks], "disks", "device")
    _unique([d.boot_order or None for d in disks], "disks", "boot_order")
    nic_names = [n.name or f"eth{i}" for i, n in enumerate(spec.nics)]
    _unique(nic_names, "nics", "name")
    _unique([n.mac.lower() or None for n in spec.nics], "nics", "mac")
    dom = ET.Element("domain", type=ctx.domain_type)
    _sub(dom, "name", domain_name(md.name))
    try:
        _sub(dom, "uuid", str(uuid.UUID(md.uid)))
    except ValueError:
        pass  # no valid uid: libvirt picks one
    braid = _sub(_sub(dom, "metadata"), "braid:vm", **{
        "xmlns:braid": XMLNS, "name": md.name, "uid": _text(md.uid, "metadata.uid"),
        "generation": str(md.generation)})
    if ctx.node:
        braid.set("node", ctx.node)
    _sub(dom, "memory", str(max_mem), unit="MiB")
    _sub(dom, "currentMemory", str(mem), unit="MiB")
    _sub(dom, "vcpu", str(max_vcpus), placement="static", current=str(vcpus))
    dom.append(_os(spec.boot, ctx, any(d.boot_order > 0 for d in disks)))
    features = _sub(dom, "features")
    for feature in ("acpi", "apic"):
        _sub(features, feature)
    dom.append(_cpu(spec.cpu_model, ctx))
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        _sub(dom, event, action)
    dev = _sub(dom, "devices")  # no graphics: the serial console is the console
    _sub(dev, "emulator", ctx.emulator)
    for i, d in enumerate(disks):
        dev.append(_disk(d, ctx, f"spec.disks[{i}]"))
    if any(d.bus == "scsi" for d in disks):
        _sub(dev, "controller", type="scsi", index="0", model="virtio-scsi")
    for i, n in enumerate(spec.nics):
        dev.append(_nic(n, md.name, nic_names[i], f"spec.nics[{i}]"))
    serial = _sub(dev, "serial", type="pty")
    _sub(serial, "log", file=ctx.console_log(md.name), append="on")
    _sub(serial, "target", port="0")
    _sub(_sub(dev, "console", type="pty"), "target", type="serial", port="0")
    _sub(dev, "memballoon", model="virtio")
    _sub(_sub(dev, "rng", model="virtio"), "backend", "/dev/urandom", model="random")
    return _serialize(dom)


def retarget(xml: str, owner: str, src_node: str, dst_node: str) -> str:
    """The XML a domain should have on another node after live migration:
    the same machine, with that node's owner identity in the metadata and
    its own NBD sockets and console log directory (paths that name the
    source node name the destination instead)."""
    root = ET.fromstring(xml)
    el = root.find(f"metadata/{{{XMLNS}}}vm")
    if el is None:
        raise ValueError("domain has no Braid metadata")
    el.set("node", _text(owner, "owner"))

    def move(path: str) -> str:
        parts = path.split("/")
        return "/".join(dst_node if p == src_node else p for p in parts)

    for host in root.iterfind("devices/disk/source/host"):
        if host.get("socket"):
            host.set("socket", move(host.get("socket")))
    for log in root.iterfind("devices/serial/log"):
        if log.get("file"):
            log.set("file", move(log.get("file")))
    ET.register_namespace("braid", XMLNS)
    return ET.tostring(root, encoding="unicode")
