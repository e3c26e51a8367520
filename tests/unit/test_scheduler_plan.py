"""The scheduler's pure placement planner."""

from __future__ import annotations

import itertools
import random

from scheduler.plan import HYPERVISOR_LABEL, NodeInfo, Policy, VMRequest, place, request_problem

P = Policy()


def nodes(*specs, **kw):
    return [NodeInfo(name, cpus=c, memory_mib=m, **kw) for name, c, m in specs]


def vm(name="v", vcpus=1, mem=1024, **kw):
    return VMRequest(name, vcpus, mem, **kw)


def test_spread_and_pack():
    ns = nodes(("a", 8, 8192), ("b", 8, 8192))
    ns[0].add(vm(vcpus=4, mem=4096))
    assert place(vm(), ns, P).node == "b"
    assert place(vm(), ns, Policy(mode="pack")).node == "a"


def test_filters_with_reasons():
    ns = nodes(("a", 4, 4096), ("b", 4, 4096), ("c", 4, 4096), ("d", 4, 1024), ("e", 4, 4096))
    ns[0].ready = False
    ns[1].maintenance = True
    ns[2].unschedulable = True
    ns[4].labels = {"zone": "x"}
    d = place(vm(mem=2048, node_selector={"zone": "y"}), ns, P)
    assert d.node is None
    assert d.reason.startswith("0/5 nodes can run it:")
    for part in ("1 not Ready", "1 in maintenance", "1 unschedulable", "2 node selector does not match"):
        assert part in d.reason, d.reason
    d = place(vm(mem=2048), ns[3:4], P)
    assert d.reason == "0/1 nodes can run it: 1 insufficient memory (needs 2048 MiB, most free 1024 MiB)"


def test_cpu_overcommit_and_memory_not_overcommitted():
    ns = nodes(("a", 2, 4096))
    for i in range(4):          # 2 cores x 2 = 4 vCPUs
        d = place(vm(f"v{i}", mem=512), ns, P)
        assert d.node == "a"
        ns[0].add(vm(f"v{i}", mem=512))
    assert "insufficient CPU" in place(vm(mem=512), ns, P).reason
    assert place(vm(mem=512), ns, Policy(cpu_overcommit=3)).node == "a"
    ns = nodes(("a", 64, 4096))
    ns[0].add(vm(mem=4000))
    assert "insufficient memory" in place(vm(mem=512), ns, P).reason


def test_affinity_and_anti_affinity():
    ns = nodes(("a", 8, 8192), ("b", 8, 8192), ("c", 8, 8192))
    ns[1].add(vm("db1", anti_affinity_group="db"))
    ns[2].add(vm("web1", affinity_group="web"))
    assert place(vm(anti_affinity_group="db"), ns, P).node in ("a", "c")
    assert place(vm(affinity_group="web"), ns, P).node == "c"      # with its group, even if fuller
    ns[2].add(vm("db2", anti_affinity_group="db"))
    d = place(vm(affinity_group="web", anti_affinity_group="db"), ns, P)
    assert d.node is None and d.reason.endswith("2 anti-affinity, 1 affinity")
    # the first VM of an affinity group goes anywhere
    assert place(vm(affinity_group="new"), ns, P).node is not None


def test_contradicting_rules_are_reported_not_retried():
    v = vm(affinity_group="g", anti_affinity_group="g")
    assert "both 'g'" in request_problem(v)
    assert place(v, nodes(("a", 8, 8192)), P).reason == request_problem(v)


def test_hypervisor_requirement_and_locality_and_numa():
    ns = nodes(("a", 8, 8192), ("b", 8, 8192), ("c", 8, 8192))
    ns[0].hypervisor = "qemu"
    assert place(vm(node_selector={HYPERVISOR_LABEL: "qemu"}), ns, P).node == "a"
    # locality: the node with replicas of the VM's volume wins among equals
    assert place(vm(), ns, P, locality={"c": 1.0}).node == "c"
    # NUMA: a VM that fits one cell of b but not of c (2 cells of 4096)
    ns[2].numa_cells = 4
    assert place(vm(mem=4096), ns[1:], P).node == "b"
    assert place(vm(), ns, P, exclude=frozenset({"a", "b"})).node == "c"


def feasible(v, n, pol):
    return (n.ready and not n.maintenance and not n.unschedulable
            and n.used_memory_mib + v.memory_mib <= n.memory_mib * pol.memory_overcommit
            and n.used_vcpus + v.vcpus <= n.cpus * pol.cpu_overcommit
            and not (v.anti_affinity_group and n.groups.get(v.anti_affinity_group)))


def test_randomised_against_brute_force():
    rng = random.Random(7)
    for trial in range(300):
        ns = [NodeInfo(f"n{i}", ready=rng.random() > 0.2, maintenance=rng.random() < 0.1,
                       cpus=rng.choice([2, 4, 8]), memory_mib=rng.choice([1024, 4096, 8192]))
              for i in range(rng.randint(1, 8))]
        for n in ns:
            for j in range(rng.randint(0, 4)):
                n.add(vm(f"x{j}", vcpus=rng.randint(1, 4), mem=rng.choice([256, 1024, 2048]),
                         anti_affinity_group=rng.choice(["", "g"])))
        v = vm(vcpus=rng.randint(1, 4), mem=rng.choice([256, 1024, 4096]),
               anti_affinity_group=rng.choice(["", "g"]))
        pol = Policy(max_feasible=0)
        d = place(v, ns, pol)
        ok = [n.name for n in ns if feasible(v, n, pol)]
        if ok:
            assert d.node in ok, (trial, d)
        else:
            assert d.node is None and d.reason, (trial, d)


def test_large_cluster_scan_stops_early_and_rotates():
    ns = [NodeInfo(f"n{i:04d}", cpus=64, memory_mib=1 << 20) for i in range(1000)]
    pol = Policy(max_feasible=10)
    picks = {place(vm(), ns, pol, start=s).node for s in range(0, 1000, 100)}
    assert len(picks) == 10   # different windows of the node list


def test_exhaustive_small_anti_affinity_spreads_to_distinct_nodes():
    for n_nodes in range(1, 5):
        ns = nodes(*[(f"n{i}", 8, 8192) for i in range(n_nodes)])
        placed = []
        for i in itertools.count():
            d = place(vm(f"r{i}", anti_affinity_group="rs"), ns, P)
            if d.node is None:
                break
            placed.append(d.node)
            next(n for n in ns if n.name == d.node).add(vm(f"r{i}", anti_affinity_group="rs"))
        assert sorted(placed) == sorted(n.name for n in ns)
