"""The scheduler with real processes: a controller, two scheduler replicas and
three node agents on libvirt's test driver (no QEMU: placement is the point)."""

from __future__ import annotations

import signal
import threading

import pytest

from braid.v1 import compute_pb2
from tests.conftest import DaemonProc, wait

pytestmark = pytest.mark.integration


def agent(etcd, prefix, tmp, node, memory_mib=16384):
    return DaemonProc("node_agent.main", [
        "--etcd", etcd.endpoint, "--prefix", prefix, "--node", node, "--lease-ttl", "3",
        "--libvirt-uri", "test:///default", "--console-dir", str(tmp / "console"),
        "--capacity-cpus", "16", "--capacity-memory-mib", str(memory_mib), "--reserved-cpus", "0",
        "--reserved-memory-mib", "0"], tmp, f"agent-{node}")


def scheduler(etcd, prefix, tmp, i):
    return DaemonProc("scheduler.main", ["--etcd", etcd.endpoint, "--prefix", prefix, "--lease-ttl", "2",
                                         "--id", f"sched-{i}"], tmp, f"scheduler-{i}")


def new_vm(name, mem=512, **spec):
    vm = compute_pb2.VM()
    vm.metadata.name = name
    vm.spec.vcpus, vm.spec.memory_mib = 1, mem
    vm.spec.boot.kernel, vm.spec.boot.initrd = "/nonexistent/vmlinuz", "/nonexistent/initrd"
    for k, v in spec.items():
        setattr(vm.spec, k, v)
    return vm


def test_binding_burst_with_leader_kill_and_unplaceable_vms(etcd_server, prefix, controller, api,
                                                            raw_store, tmp_path):
    agents = [agent(etcd_server, prefix, tmp_path, f"sn{i}") for i in range(3)]
    scheds = [scheduler(etcd_server, prefix, tmp_path, i) for i in range(2)]
    bindings: dict[str, list[str]] = {}
    stop = threading.Event()

    def watch():  # every spec change of every VM: a VM must be bound exactly once
        for batch in raw_store.watch("vm/spec/", raw_store.revision() + 1, stop):
            for ev in batch:
                if ev.type == "put":
                    vm = compute_pb2.VM()
                    from braid import kinds as K
                    vm.CopyFrom(K.from_json(ev.kv.value, compute_pb2.VM, ev.kv.key))
                    seen = bindings.setdefault(vm.metadata.name, [])
                    if vm.spec.node and (not seen or seen[-1] != vm.spec.node):
                        seen.append(vm.spec.node)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        wait(lambda: sum(n.status.phase == "Ready" for n in api.list("node")[0]) == 3, 20, "3 Ready nodes")
        for i in range(20):
            api.create(new_vm(f"b{i:02d}"))
        leader = raw_store.get("election/scheduler").value.decode()
        victim = next(s for i, s in enumerate(scheds) if f"sched-{i}" in leader)
        victim.stop(signal.SIGKILL)          # mid-burst
        for i in range(20, 40):
            api.create(new_vm(f"b{i:02d}"))
        wait(lambda: all(v.spec.node for v in api.list("vm")[0]), 30, "every VM bound")
        vms = api.list("vm")[0]
        per_node = {}
        for v in vms:
            per_node[v.spec.node] = per_node.get(v.spec.node, 0) + 1
        assert sorted(per_node) == ["sn0", "sn1", "sn2"] and max(per_node.values()) <= 14, per_node
        wait(lambda: len(bindings) == 40, 10, "watch saw all")
        assert all(len(nodes) == 1 for nodes in bindings.values()), \
            {n: b for n, b in bindings.items() if len(b) != 1}
        wait(lambda: all(v.status.phase == "Running" for v in api.list("vm")[0]), 30, "all Running")

        # bad input: bigger than any node, contradicting rules -> reasons in status, no binding
        api.create(new_vm("huge", mem=64 << 10))
        api.create(new_vm("torn", affinity_group="g", anti_affinity_group="g"))
        wait(lambda: "cannot be placed" in api.get("vm", "huge").status.message, 10, "reason for huge")
        msg = api.get("vm", "huge").status.message
        assert "insufficient memory" in msg and "needs 65536 MiB" in msg, msg
        wait(lambda: "both 'g'" in api.get("vm", "torn").status.message, 10, "reason for torn")
        assert not api.get("vm", "huge").spec.node and not api.get("vm", "torn").spec.node
        rev = raw_store.get("vm/status/torn").mod_revision
        import time
        time.sleep(3)  # no retry storm: an impossible request is not rewritten
        assert raw_store.get("vm/status/torn").mod_revision == rev

        # anti-affinity across the 3 nodes
        for i in range(3):
            api.create(new_vm(f"aa{i}", anti_affinity_group="ha-pair"))
        wait(lambda: all(api.get("vm", f"aa{i}").spec.node for i in range(3)), 10, "aa bound")
        assert len({api.get("vm", f"aa{i}").spec.node for i in range(3)}) == 3
        api.create(new_vm("aa3", anti_affinity_group="ha-pair"))
        wait(lambda: "anti-affinity" in api.get("vm", "aa3").status.message, 10, "aa3 reason")

        # drain: every VM leaves sn0 (test driver: cold moves), nothing new lands there
        import subprocess
        import sys
        on_sn0 = [v.metadata.name for v in api.list("vm")[0] if v.spec.node == "sn0"]
        assert on_sn0
        api.delete("vm", "aa0"), api.delete("vm", "aa1"), api.delete("vm", "aa2"), api.delete("vm", "aa3")
        p = subprocess.run([sys.executable, "-m", "braid.cli.main", "--server", controller.address,
                            "node", "drain", "sn0", "--wait", "120"], capture_output=True, text=True,
                           timeout=150)
        assert p.returncode == 0, p.stderr
        assert "drained" in p.stdout
        vms = api.list("vm")[0]
        assert not [v.metadata.name for v in vms if "sn0" in (v.spec.node, v.status.node)]
        moved = [v for v in vms if v.metadata.name in on_sn0 and v.metadata.name.startswith("b")]
        wait(lambda: all(api.get("vm", v.metadata.name).status.phase == "Running" for v in moved), 60,
             "moved VMs running elsewhere")
        api.create(new_vm("after-drain"))
        assert wait(lambda: api.get("vm", "after-drain").spec.node, 10, "bound") != "sn0"
        p = subprocess.run([sys.executable, "-m", "braid.cli.main", "--server", controller.address,
                            "node", "undrain", "sn0"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and not api.get("node", "sn0").spec.maintenance
    finally:
        stop.set()
        for p in scheds + agents:
            p.stop()


def test_drs_recommends_a_move_and_applies_it(etcd_server, prefix, controller, api, raw_store, tmp_path):
    """DRS from measurements to a move: node statuses as node agents would
    report them (d1 busy with two VMs, d2/d3 idle) are planted in etcd; the
    scheduler's DRS loop (manual mode, 1 s window) recommends moving one of
    d1's VMs; ``braid drs apply`` rebinds it."""
    import subprocess
    import sys

    from braid import kinds as K
    from braid.v1 import node_pb2

    def braid(*args):
        return subprocess.run([sys.executable, "-m", "braid.cli.main", "--server", controller.address, *args],
                              capture_output=True, text=True, timeout=60)

    for name, busy, cores in (("d1", 0.95, {"hot1": 4.0, "hot2": 3.5}), ("d2", 0.1, {}), ("d3", 0.15, {})):
        st = node_pb2.NodeStatus(capacity=node_pb2.Resources(cpus=8, memory_bytes=16 << 30),
                                 allocatable=node_pb2.Resources(cpus=8, memory_bytes=16 << 30),
                                 hypervisor="test", cpu_used_fraction=busy, memory_used_bytes=2 << 30)
        for vm, c in cores.items():
            st.vm_cpu_cores[vm] = c
        raw_store.put(f"node/status/{name}", K.to_json(st))
        raw_store.put(f"node/live/{name}/node-agent", K.to_json(node_pb2.DaemonStatus(name="node-agent")))
    for vm in ("hot1", "hot2"):
        v = new_vm(vm, mem=1024)
        v.spec.vcpus = 4
        v.spec.node = "d1"
        api.create(v)
    sched = DaemonProc("scheduler.main", [
        "--etcd", etcd_server.endpoint, "--prefix", prefix, "--lease-ttl", "2", "--drs-mode", "manual",
        "--drs-interval", "0.5", "--drs-window", "aggressive", "--drs-window-seconds", "1"], tmp_path, "sched")
    try:
        wait(lambda: api.drs_recommendations().moves, 20, "a DRS recommendation")
        rec = api.drs_recommendations()
        assert rec.mode == "manual" and list(rec.hot) == ["d1"] and rec.loads["d1"] >= 0.9
        move = rec.moves[0]
        assert move.source == "d1" and move.target in ("d2", "d3") and move.vm in ("hot1", "hot2")
        assert move.source_load < 0.8 and move.target_load < 0.8
        out = braid("drs", "recommendations")
        assert out.returncode == 0 and move.id in out.stdout and "hot: d1" in out.stdout, out.stdout
        out = braid("drs", "apply", move.id[:6])
        assert out.returncode == 0, out.stderr
        assert api.get("vm", move.vm).spec.node == move.target
        out = braid("drs", "apply", move.id)      # the VM is not on d1 any more
        assert out.returncode != 0 and ("not d1" in out.stderr or "no current" in out.stderr), out.stderr
        assert braid("drs", "apply", "zz").returncode == 2
    finally:
        sched.stop()
