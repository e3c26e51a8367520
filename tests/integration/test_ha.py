"""HA end to end with real processes: two nodes, each with its own libvirtd
(isolated namespaces, tests/integration/libvirt_pair.py), node agent and
storage daemon; a controller and a scheduler. A guest boots from a
replicated Braid volume on one node; that node dies (its agent, storage
daemon and QEMU killed with SIGKILL); the scheduler fences it and restarts
the VM on the other node, where the guest reads back what it wrote. When the
dead node comes back, its storage daemon refuses the old generation and its
agent does not restart the VM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from braid import extents as X
from braid.cli.manifests import load
from braid.dev import devguest
from storage_daemon import peer as P
from tests.conftest import ROOT, DaemonProc, wait
from tests.integration.libvirt_pair import CONSOLE_DIR, libvirt_pair  # noqa: F401
from tests.integration.libvirt_pair import domain_states as names
from tests.integration.libvirt_pair import read_text as text

pytestmark = pytest.mark.integration
TTL = 3






class Node:
    def __init__(self, lv, name, etcd, prefix, tmp):
        self.lv, self.name, self.etcd, self.prefix, self.tmp = lv, name, etcd, prefix, tmp
        (lv.dirs["log"] / "console" / name).mkdir(parents=True, exist_ok=True)
        self.agent = self.storaged = None

    def start(self):
        common = ["--etcd", self.etcd.endpoint, "--prefix", self.prefix, "--node", self.name,
                  "--lease-ttl", str(TTL)]
        self.storaged = DaemonProc("storage_daemon.main", common + [
            "--disks", f"d1={self.tmp / self.name / 'd1'}", "--peer-listen", "127.0.0.1:0",
            "--nbd-listen", "", "--peer-timeout", "1", "--report-interval", "1"],
            self.tmp, f"storaged-{self.name}")
        self.agent = DaemonProc("node_agent.main", common + [
            "--libvirt-uri", self.lv.uri, "--migration-uri", self.lv.tcp_uri, "--console-dir", CONSOLE_DIR,
            "--reserved-memory-mib", "0"], self.tmp, f"agent-{self.name}")

    def kill(self):
        """The node dies: its daemons and its QEMU, all at once."""
        for pid in [self.agent.proc.pid, self.storaged.proc.pid, *self.lv.qemu_pids()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.agent.proc.wait(5)
        self.storaged.proc.wait(5)

    def console(self, vm):
        return text(self.lv.dirs["log"] / "console" / self.name / f"{vm}.log")

    def stop(self):
        for p in (self.agent, self.storaged):
            if p:
                p.stop()


def test_ha_restart_after_node_death_with_fencing(libvirt_pair, etcd_server, prefix, controller,  # noqa: F811
                                                 api, raw_store, tmp_path):
    a, b = libvirt_pair
    guest = devguest.build_guest(devguest.default_guest_dir(), progress=lambda s: None)
    nodes = {n.name: n for n in (Node(a, "hxa", etcd_server, prefix, tmp_path),
                                 Node(b, "hxb", etcd_server, prefix, tmp_path))}
    for n in nodes.values():
        n.start()
    sched = DaemonProc("scheduler.main", ["--etcd", etcd_server.endpoint, "--prefix", prefix,
                                          "--lease-ttl", str(TTL)], tmp_path, "scheduler")
    try:
        wait(lambda: sum(n.status.phase == "Ready" for n in api.list("node")[0]) == 2, 30, "2 Ready nodes")
        from braid.v1 import storage_pb2
        vol = storage_pb2.Volume()
        vol.metadata.name = "havol"
        vol.spec.size_bytes, vol.spec.replicas, vol.spec.extent_size_bytes = 32 << 20, 2, 16 << 20
        wait(lambda: len(api.list("diskpool")[0]) == 2 and all(p.status.disks for p in api.list("diskpool")[0]),
             20, "disk pools")
        api.create(vol)
        wait(lambda: api.get("volume", "havol").status.phase == "Healthy", 20, "volume Healthy")

        vm = load(str(ROOT / "examples" / "tiny-vm.yaml"))[0].obj
        vm.metadata.name = "havm"
        vm.spec.node = ""                      # the scheduler places it
        vm.spec.boot.kernel, vm.spec.boot.initrd = str(guest.kernel), str(guest.initrd)
        vm.spec.ha.enabled, vm.spec.ha.priority = True, 10
        vm.spec.disks.add(name="vda", volume="havol")
        api.create(vm)
        first = wait(lambda: api.get("vm", "havm").spec.node, 20, "the scheduler to bind it")
        home, other = nodes[first], next(n for n in nodes.values() if n.name != first)
        wait(lambda: devguest.READY_LINE in home.console("havm"), 90, f"guest ready on {first}")
        assert "braid-guest: disk boot 1" in home.console("havm")
        before = {X.parse_key(kv.key)[1]: X.ExtentRecord.from_json(kv.value)
                  for kv in raw_store.list(X.volume_prefix("havol"))[0]}

        t_kill = time.monotonic()
        home.kill()
        wait(lambda: devguest.READY_LINE in other.console("havm"), 60, f"guest ready on {other.name}")
        restart = time.monotonic() - t_kill
        print(f"\nHA: node {home.name} killed -> guest ready on {other.name} after {restart:.1f}s "
              f"(lease TTL {TTL}s)")
        wait(lambda: "braid-guest: disk boot 2" in other.console("havm"), 30, "disk counter read back")
        wait(lambda: "braid-guest: disk ok" in other.console("havm").split("disk boot 2", 1)[1], 30,
             "the new node's write verified")
        got = api.get("vm", "havm")
        assert got.spec.node == other.name and got.status.node == other.name
        assert got.status.phase == "Running"
        after = {X.parse_key(kv.key)[1]: X.ExtentRecord.from_json(kv.value)
                 for kv in raw_store.list(X.volume_prefix("havol"))[0]}
        for i, rec in after.items():
            assert home.name in rec.fenced and rec.generation > before[i].generation, rec
        # the extent the guest wrote lost the dead replica (dropped by the scheduler when its
        # storage daemon's lease was already gone, else by the first write that timed out)
        assert after[0].holds(home.name) is None, after[0]
        assert api.get("volume", "havol").status.phase == "Degraded"

        # the dead node comes back: it does not run the VM, and refuses the old generation
        home.start()
        wait(lambda: api.get("node", home.name).status.phase == "Ready", 30, "old node Ready again")
        time.sleep(4)
        assert names(home.lv).get("braid-havm") is not True
        assert home.lv.qemu_pids() == []
        kv = raw_store.get(f"node/live/{home.name}/storaged")
        addr = json.loads(kv.value)["peer_address"]
        rec0 = before[0]

        async def stale_write():
            c = P.PeerClient("test", addr)
            try:
                return await c.call(P.OP_WRITE, "havol", rec0.uid, 0, rec0.generation, 0, payload=b"x" * 4096)
            finally:
                await c.close()
        with pytest.raises(P.PeerError) as exc:
            asyncio.run(stale_write())
        assert exc.value.stale
        assert api.get("vm", "havm").status.node == other.name
    finally:
        sched.stop()
        for n in nodes.values():
            n.stop()
        for lv in (a, b):
            lv.destroy_domains()
