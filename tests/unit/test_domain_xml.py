"""node_agent.domain_xml: golden files (tests/unit/golden/, compared byte for byte;
``BRAID_UPDATE_GOLDEN=1`` rewrites them: review the diff), libvirt's schema (each
domain defined on test:///default with VIR_DOMAIN_DEFINE_VALIDATE; skipped without
the ``libvirt`` module), names, errors and the metadata round trip."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from braid import naming
from braid.v1 import compute_pb2 as C
from braid.v1 import meta_pb2
from node_agent import domain_xml as D

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("BRAID_UPDATE_GOLDEN") == "1"
UID = "3f0c5a6e-8d1b-4f3a-9a57-2b1c0d9e7f10"

TCG = D.HostContext(domain_type="qemu", console_log_dir="/var/log/braid/console",
                    nbd_socket_for=lambda vol: f"/run/braid/nbd/{vol}.sock")
KVM = D.HostContext(domain_type="kvm", console_log_dir="/var/log/braid/console",
                    nbd_socket_for=lambda vol: f"/run/braid/nbd/{vol}.sock")
NO_NBD = D.HostContext(domain_type="qemu", console_log_dir="/var/log/braid/console")


def vm(name="web", uid=UID, generation=3, **spec) -> C.VM:
    spec.setdefault("vcpus", 2)
    spec.setdefault("memory_mib", 512)
    return C.VM(metadata=meta_pb2.ObjectMeta(name=name, uid=uid, generation=generation),
                spec=C.VMSpec(**spec))


CASES = {
    "tcg-kernel-boot": (vm(
        "tiny", vcpus=1, max_vcpus=2, memory_mib=128, max_memory_mib=256,
        boot=C.VMBoot(kernel="/var/lib/braid/images/vmlinuz", initrd="/var/lib/braid/images/initrd.img",
                      cmdline="console=ttyS0 root=/dev/vda rw quiet", firmware="bios")), TCG),
    "volume-path-two-nics": (vm(
        "db-0", vcpus=2, max_vcpus=4, memory_mib=1024, max_memory_mib=2048,
        disks=[C.VMDisk(name="vda", volume="db-0-root", bus="virtio"),
               C.VMDisk(name="vdb", path="/var/lib/braid/scratch/db-0.img", bus="virtio")],
        nics=[C.VMNic(name="eth0", network="tenant-a", mac="52:54:00:12:34:56", model="virtio"),
              C.VMNic(name="eth1", bridge="br0", mac="52:54:00:ab:cd:ef", model="e1000")]), TCG),
    "kvm-host-model": (vm(
        "app", cpu_model="host-model",
        disks=[C.VMDisk(name="vda", volume="app-root")],
        nics=[C.VMNic(name="eth0", network="a-rather-long-network-name", mac="52:54:00:00:00:01")]),
        KVM),
    "uefi": (vm(
        "efi-guest", boot=C.VMBoot(firmware="uefi"),
        disks=[C.VMDisk(name="vda", path="/var/lib/braid/images/efi-guest.raw")]), TCG),
    "readonly-boot-order": (vm(
        "installer", generation=1,
        disks=[C.VMDisk(name="vda", path="/var/lib/braid/images/disk.raw", boot_order=2),
               C.VMDisk(name="vdb", path="/var/lib/braid/images/install&<media>.raw",
                        read_only=True, boot_order=1)]), TCG),
    "scsi-sata-named-cpu": (vm(
        "legacy-windows-server-2012-r2", uid="not-a-uuid", cpu_model="Skylake-Client",
        disks=[C.VMDisk(name="sda", path="/var/lib/braid/images/legacy.raw", bus="scsi"),
               C.VMDisk(name="sdb", volume="legacy-data", bus="sata")],
        nics=[C.VMNic(network="lan", model="e1000")]), KVM),
}


def _xml(case: str) -> str:
    return D.build_domain(*CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_well_formed_deterministic(case):
    got = _xml(case).encode()
    root = ET.fromstring(got)
    assert root.tag == "domain" and root.findtext("name") == f"braid-{CASES[case][0].metadata.name}"
    assert got == _xml(case).encode()
    path = GOLDEN / f"{case}.xml"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_bytes(got)
    assert path.exists(), f"{path} missing: run with BRAID_UPDATE_GOLDEN=1 to create it"
    assert got == path.read_bytes(), f"{case}: XML differs from {path} (BRAID_UPDATE_GOLDEN=1 rewrites)"


@pytest.fixture(scope="module")
def libvirt_test_conn():
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors arrive as exceptions
    conn = libvirt.open("test:///default")
    yield libvirt, conn
    conn.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_libvirt_accepts(case, libvirt_test_conn):
    libvirt, conn = libvirt_test_conn
    dom = conn.defineXMLFlags(_xml(case), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)  # RNG schema check
    try:
        obj = CASES[case][0]
        assert D.parse_braid_metadata(dom.XMLDesc(0)) == {
            "name": obj.metadata.name, "uid": obj.metadata.uid, "generation": obj.metadata.generation,
            "node": ""}
        if case != "scsi-sata-named-cpu":
            assert dom.UUIDString() == UID
        try:
            element = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, D.XMLNS)
        except libvirt.libvirtError:  # not every driver implements it
            return
        assert D.parse_braid_metadata(element)["name"] == obj.metadata.name
    finally:
        dom.undefine()


def _canon(el: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(el, encoding="unicode"), strip_text=True)


def test_hotplug_fragments_equal_the_domain_elements():
    obj, ctx = CASES["volume-path-two-nics"]
    dom = ET.fromstring(D.build_domain(obj, ctx))
    frags = [ET.fromstring(D.disk_xml(d, ctx)) for d in obj.spec.disks] + [
        ET.fromstring(D.nic_xml(n, ctx, obj.metadata.name)) for n in obj.spec.nics]
    assert [_canon(f) for f in frags] == [
        _canon(el) for el in dom.findall("devices/disk") + dom.findall("devices/interface")]


def test_hotplug_fragments_pass_the_schema(libvirt_test_conn):
    """Spliced into a domain (libvirt 9's test driver has no attachDeviceFlags)."""
    libvirt, conn = libvirt_test_conn
    obj, ctx = CASES["volume-path-two-nics"]
    dom = ET.fromstring(D.build_domain(vm("hotplug", uid=""), ctx))
    dom.find("devices").extend([ET.fromstring(D.disk_xml(d, ctx)) for d in obj.spec.disks] + [
        ET.fromstring(D.nic_xml(n, ctx, "hotplug")) for n in obj.spec.nics])
    defined = conn.defineXMLFlags(ET.tostring(dom, encoding="unicode"), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        back = ET.fromstring(defined.XMLDesc(0)).find("devices")
        assert [d.find("target").get("dev") for d in back.findall("disk")] == ["vda", "vdb"]
        assert [i.find("target").get("dev") for i in back.findall("interface")] == [
            D.tap_name("hotplug", "eth0"), D.tap_name("hotplug", "eth1")]
    finally:
        defined.undefine()


def test_sizes_cpu_and_boot_device():
    dom = ET.fromstring(_xml("volume-path-two-nics"))
    assert (dom.findtext("vcpu"), dom.find("vcpu").get("current")) == ("4", "2")
    assert (dom.findtext("memory"), dom.findtext("currentMemory")) == ("2048", "1024")
    assert dom.find("cpu").attrib == {"mode": "custom", "match": "exact"}
    assert dom.findtext("cpu/model") == "qemu64"
    assert dom.find("os/boot").get("dev") == "hd"
    # max 0 means "= current"; a MAC may end in 00; unnamed NICs are eth<index>
    dom = ET.fromstring(D.build_domain(vm(vcpus=3, memory_mib=300, nics=[
        C.VMNic(network="n", mac="52:54:00:AB:00:00"), C.VMNic(network="n")]), TCG))
    assert (dom.findtext("vcpu"), dom.findtext("memory")) == ("3", "300")
    assert dom.find("devices/interface/mac").get("address") == "52:54:00:ab:00:00"
    assert [el.get("dev") for el in dom.findall("devices/interface/target")] == [
        D.tap_name("web", "eth0"), D.tap_name("web", "eth1")]


@pytest.mark.parametrize("ctx,model,mode,named", [
    (KVM, "", "host-passthrough", None), (KVM, "host-passthrough", "host-passthrough", None),
    (KVM, "host-model", "host-model", None), (KVM, "EPYC-Rome", "custom", "EPYC-Rome"),
    (TCG, "", "custom", "qemu64"), (TCG, "host-passthrough", "custom", "qemu64"),
    (TCG, "host-model", "custom", "qemu64"), (TCG, "Haswell-noTSX", "custom", "Haswell-noTSX"),
])
def test_cpu_modes(ctx, model, mode, named):
    cpu = ET.fromstring(D.build_domain(vm(cpu_model=model), ctx)).find("cpu")
    assert (cpu.get("mode"), cpu.findtext("model")) == (mode, named)


def test_boot_dev_omitted_with_kernel_or_boot_order():
    kernel = ET.fromstring(_xml("tcg-kernel-boot"))
    assert kernel.find("os/boot") is None and kernel.findtext("os/kernel")
    ordered = ET.fromstring(_xml("readonly-boot-order"))
    assert ordered.find("os/boot") is None
    assert [d.find("boot").get("order") for d in ordered.findall("devices/disk")] == ["2", "1"]
    assert ordered.find("devices/disk[2]/readonly") is not None


def test_uuid_only_when_valid_and_escaping_round_trips():
    assert ET.fromstring(_xml("scsi-sata-named-cpu")).find("uuid") is None
    assert ET.fromstring(_xml("uefi")).findtext("uuid") == UID
    dom = ET.fromstring(_xml("readonly-boot-order"))
    assert dom.find("devices/disk[2]/source").get("file") == "/var/lib/braid/images/install&<media>.raw"
    weird = vm(boot=C.VMBoot(kernel="/k", cmdline='a="b c" & <d>'))
    assert ET.fromstring(D.build_domain(weird, TCG)).findtext("os/cmdline") == 'a="b c" & <d>'


IFNAME = re.compile(r"^[A-Za-z0-9._-]{1,15}$")


def test_bridge_names():
    assert D.bridge_name("tenant-a") == "br-tenant-a"
    assert D.bridge_name("abcdefghijkl") == "br-abcdefghijkl"          # exactly 15
    long = D.bridge_name("abcdefghijklm")
    assert len(long) == 15 and long.startswith("br-abc_") and long == D.bridge_name("abcdefghijklm")
    assert long == "br-abc_" + naming.short_hash("bridge", "abcdefghijklm")
    names = {D.bridge_name(f"network-number-{i}") for i in range(2000)}
    assert len(names) == 2000 and all(IFNAME.match(n) for n in names)
    for bad in ("", "Upper", "under_score", "x" * 64):
        with pytest.raises(ValueError, match="network"):
            D.bridge_name(bad)


def test_domain_and_tap_names():
    assert D.domain_name("web") == "braid-web"
    with pytest.raises(ValueError, match="metadata.name"):
        D.domain_name("Bad_Name")
    assert D.tap_name("web1", "eth0") == "bt-web1_eth0"
    long = D.tap_name("postgres-primary-0", "eth0")
    assert long == D.tap_name("postgres-primary-0", "eth0") and len(long) == 15
    assert long.startswith("bt-pos-") and "_" not in long
    assert D.tap_name("a-b", "c") != D.tap_name("a", "b-c")
    assert D.tap_name("web", "weird name/0").startswith("bt-web-")  # not an ifname: hashed
    taps = {D.tap_name(f"vm-{i}", f"eth{j}") for i in range(500) for j in range(4)}
    assert len(taps) == 2000 and all(IFNAME.match(t) and len(t) <= 15 for t in taps)
    with pytest.raises(ValueError, match="nic.name"):
        D.tap_name("web", "")


@pytest.mark.parametrize("obj,field", [
    (vm(vcpus=0), "spec.vcpus"),
    (vm(vcpus=4, max_vcpus=2), "spec.max_vcpus"),
    (vm(memory_mib=1024, max_memory_mib=512), "spec.max_memory_mib"),
    (vm(name="Not_Valid"), "metadata.name"),
    (vm(disks=[C.VMDisk(name="xda", path="/a")]), r"spec.disks\[0\].name"),
    (vm(disks=[C.VMDisk(name="vda", path="/a", bus="ide")]), r"spec.disks\[0\].bus"),
    (vm(disks=[C.VMDisk(name="vda")]), r"spec.disks\[0\]: exactly one"),
    (vm(disks=[C.VMDisk(name="vda", path="/a", volume="v")]), r"spec.disks\[0\]: exactly one"),
    (vm(disks=[C.VMDisk(name="vda", path="relative.img")]), r"spec.disks\[0\].path"),
    (vm(disks=[C.VMDisk(name="sda", path="/a", bus="sata", read_only=True)]), r"\.read_only"),
    (vm(disks=[C.VMDisk(name="vda", path="/a")] * 2), r"spec.disks\[1\]: duplicate device"),
    (vm(disks=[C.VMDisk(name=n, path="/a", boot_order=1) for n in ("vda", "vdb")]),
     r"spec.disks\[1\]: duplicate boot_order"),
    (vm(disks=[C.VMDisk(name="vda", path="/a\nb")]), r"spec.disks\[0\].path: control character"),
    (vm(nics=[C.VMNic(name="eth0")]), r"spec.nics\[0\]: network or bridge"),
    (vm(nics=[C.VMNic(network="n", model="rtl8139")]), r"spec.nics\[0\].model"),
    (vm(nics=[C.VMNic(network="n", mac="01:00:5e:00:00:01")]), r"spec.nics\[0\].mac: not a unicast"),
    (vm(nics=[C.VMNic(network="n", mac="52:54:00:zz:00:01")]), r"spec.nics\[0\].mac"),
    (vm(nics=[C.VMNic(network="n", mac="00:00:00:00:00:00")]), r"spec.nics\[0\].mac"),
    (vm(nics=[C.VMNic(bridge="a-bridge-name-too-long")]), r"spec.nics\[0\].bridge"),
    (vm(nics=[C.VMNic(bridge="br 0")]), r"spec.nics\[0\].bridge"),
    (vm(nics=[C.VMNic(network="Bad")]), r"spec.nics\[0\].network"),
    (vm(nics=[C.VMNic(network="n"), C.VMNic(network="n", name="eth0")]), r"spec.nics\[1\]: duplicate name"),
    (vm(cpu_model="Sky lake"), "spec.cpu_model"),
    (vm(boot=C.VMBoot(firmware="coreboot")), "spec.boot.firmware"),
    (vm(boot=C.VMBoot(initrd="/i")), "spec.boot.kernel: required"),
    (vm(boot=C.VMBoot(kernel="vmlinuz")), "spec.boot.kernel: an absolute path"),
    (vm(boot=C.VMBoot(kernel="/k", cmdline="a\x00b")), "spec.boot.cmdline: control character"),
])
def test_rejects_what_cannot_be_expressed(obj, field):
    with pytest.raises(ValueError, match=field):
        D.build_domain(obj, TCG)


def test_volume_disk_needs_an_nbd_socket():
    obj = vm(disks=[C.VMDisk(name="vda", volume="root")])
    with pytest.raises(ValueError, match=r"spec.disks\[0\].volume: .*nbd_socket_for"):
        D.build_domain(obj, NO_NBD)
    with pytest.raises(ValueError, match=r"disk.volume: .*nbd_socket_for"):
        D.disk_xml(obj.spec.disks[0], NO_NBD)
    relative = D.HostContext(domain_type="qemu", console_log_dir="/l", nbd_socket_for=lambda v: v)
    with pytest.raises(ValueError, match="NBD socket"):
        D.build_domain(obj, relative)


def test_host_context_and_nic_fragment_checks():
    for kwargs, field in [({"domain_type": "xen"}, "domain_type"), ({"emulator": "qemu"}, "emulator"),
                          ({"console_log_dir": "logs"}, "console_log_dir"), ({"machine": "pc q35"}, "machine")]:
        with pytest.raises(ValueError, match=field):
            D.HostContext(**{"domain_type": "qemu", "console_log_dir": "/l", **kwargs})
    with pytest.raises(ValueError, match="nic.name: required"):
        D.nic_xml(C.VMNic(network="n"), TCG, "web")


def test_parse_braid_metadata_round_trip():
    obj, ctx = CASES["volume-path-two-nics"]
    xml = D.build_domain(obj, ctx)
    want = {"name": "db-0", "uid": UID, "generation": 3, "node": ""}
    assert D.parse_braid_metadata(xml) == want
    bare = f'<braid:vm xmlns:braid="{D.XMLNS}" name="db-0" uid="{UID}" generation="3"/>'
    assert D.parse_braid_metadata(bare) == want
    # libvirt's getMetadata(ELEMENT, XMLNS) returns the element without its namespace
    assert D.parse_braid_metadata(f'<vm name="db-0" uid="{UID}" generation="3"/>') == want
    assert D.parse_braid_metadata("<domain type='qemu'><name>other</name></domain>") == {}
    assert D.parse_braid_metadata(
        "<domain><metadata><vm xmlns='urn:someone-else' name='x'/></metadata></domain>") == {}
    on_node = D.HostContext(domain_type="qemu", console_log_dir="/l", node="node-1",
                            nbd_socket_for=lambda v: f"/n/{v}")
    assert D.parse_braid_metadata(D.build_domain(obj, on_node)) == {**want, "node": "node-1"}
    assert on_node.console_log("db-0") == "/l/db-0.log"
    with pytest.raises(ValueError, match="not well-formed"):
        D.parse_braid_metadata("<domain>")
    with pytest.raises(ValueError, match="generation"):
        D.parse_braid_metadata(bare.replace('"3"', '"three"'))
