"""Real VMs on a Braid network: two libvirt hosts (tests/integration/libvirt_pair.py),
each with its node agent and its own braid-netd inside the host's network
namespace, joined by an underlay bridge (tests/integration/netlab.py) that
also carries etcd. Two TCG guests with a NIC on one network, one per host:
the API makes their ports, libvirt plugs their taps into the bridges netd
built, each guest gets its address by DHCP from netd, and one pings the
other across the VXLAN overlay."""

from __future__ import annotations

import re
import time

import pytest

from braid.cli.main import wait_network_applied
from braid.cli.manifests import load
from braid.dev import devguest
from braid.v1 import meta_pb2, network_pb2
from tests.conftest import ROOT, DaemonProc, running_controller, wait
from tests.integration.libvirt_pair import CONSOLE_DIR, libvirt_pair  # noqa: F401
from tests.integration.libvirt_pair import read_text as text
from tests.integration.netlab import NetLab
from tests.integration.netlab import missing_requirements as net_missing

pytestmark = pytest.mark.integration


def test_two_vms_on_two_hosts_talk_over_the_overlay(libvirt_pair, tmp_path):  # noqa: F811
    why = net_missing()
    if why:
        pytest.skip(why)
    a, b = libvirt_pair
    guest = devguest.build_guest(devguest.default_guest_dir(), progress=lambda s: None)
    lab = NetLab(tmp_path, nodes=0)
    procs: list[DaemonProc] = []
    try:
        hosts = [(a, lab.attach_node("lva", a.netns)), (b, lab.attach_node("lvb", b.netns))]
        etcd = lab.start_etcd()
        with running_controller(etcd, tmp_path, "vmnet") as ctl:
            api = ctl.api
            for lv, node in hosts:
                (lv.dirs["log"] / "console" / node.name).mkdir(parents=True, exist_ok=True)
                common = ["--etcd", etcd.endpoint, "--prefix", ctl.prefix, "--node", node.name]
                procs.append(DaemonProc("node_agent.main", [
                    *common, "--lease-ttl", "5", "--libvirt-uri", lv.uri, "--migration-uri", lv.tcp_uri,
                    "--console-dir", CONSOLE_DIR], tmp_path, f"agent-{node.name}"))
                procs.append(DaemonProc("net_daemon.main", [*common, "--tunnel-ip", node.ip],
                                        tmp_path, f"netd-{node.name}", wrap=node.nsenter))
            api.create(network_pb2.Network(metadata=meta_pb2.ObjectMeta(name="lan")))
            api.create(network_pb2.Subnet(metadata=meta_pb2.ObjectMeta(name="lan-a"), spec=network_pb2.SubnetSpec(
                network="lan", cidr="10.50.0.0/24", dhcp=True)))
            wait(lambda: api.get("network", "lan").status.vni, 10, "a VNI for lan")

            def vm(name: str, node: str, extra: str = ""):
                v = load(str(ROOT / "examples" / "tiny-vm.yaml"))[0].obj
                v.metadata.name = name
                v.spec.node = node
                v.spec.boot.kernel, v.spec.boot.initrd = str(guest.kernel), str(guest.initrd)
                v.spec.boot.cmdline += extra
                v.spec.nics.add(name="eth0", network="lan")
                return api.create(v)

            t0 = time.monotonic()
            v2 = vm("vm2", "lvb")
            ip2 = api.get("port", v2.spec.nics[0].port).spec.fixed_ips[0].ip
            v1 = vm("vm1", "lva", f" braid.ping={ip2}")
            ip1 = api.get("port", v1.spec.nics[0].port).spec.fixed_ips[0].ip
            wait_network_applied(api, api.get("vm", "vm1").metadata.resource_version, 20)
            log1 = a.dirs["log"] / "console" / "lva" / "vm1.log"
            log2 = b.dirs["log"] / "console" / "lvb" / "vm2.log"
            wait(lambda: f"braid-guest: ip {ip2}" in text(log2), 120, f"vm2 to get {ip2} by DHCP")
            wait(lambda: f"braid-guest: ip {ip1}" in text(log1), 120, f"vm1 to get {ip1} by DHCP")
            wait(lambda: f"braid-guest: ping {ip2} ok" in text(log1), 120,
                 f"vm1 (lva) to reach vm2 (lvb) at {ip2}:\n{text(log1)[-1500:]}")
            print(f"\ntwo guests booted, leased {ip1} / {ip2} and pinged across hosts "
                  f"{time.monotonic() - t0:.1f}s after the VM creates")
            # the taps libvirt made are in the bridges netd built, with the ports' MACs
            for node, v in ((hosts[0][1], v1), (hosts[1][1], v2)):
                tap = f"bt-{v.metadata.name}_eth0"
                assert re.search(rf"{tap}.* master br-lan ", node.exec("bridge", "link").stdout)
                fdb = node.exec("bridge", "fdb", "show", "br", "br-lan").stdout
                assert f"{v.spec.nics[0].mac} dev {tap} " in fdb, fdb
            api.delete("vm", "vm1")
            api.delete("vm", "vm2")
            wait(lambda: api.list("port")[0] == [], 10, "the VMs' ports to go with them")
    finally:
        for p in procs:
            p.stop()
        lab.close()
