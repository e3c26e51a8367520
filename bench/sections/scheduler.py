"""Scheduler at scale, in process: the real placement planner (``scheduler.plan``)
and DRS planner (``scheduler.drs``) on a simulated cluster of 1,000 nodes and
20,000 VMs. No etcd, no processes: this is the planning cost only, the part of
the scheduler leader's work that grows with the cluster.

The cluster (seeded, the same every run, in quick mode too): nodes of 32 to 128
allocatable CPUs and 128 to 512 GiB of memory (varied independently), 2 NUMA
cells, labels ``zone`` (4 zones) and ``gpu=true`` on 10 % of them. VMs of 1 to 16
vCPUs (mean 4) with 1, 2 or 4 GiB per vCPU; 10 % are in anti-affinity groups of
3 (3 VMs of one shape created one after the other in every 30), about 5 % select
a zone and 1 % ``gpu=true``. Overcommit is the default (2 vCPUs per CPU, memory
none).

* ``placements_per_second``: the 20,000 VMs bound one after the other, as the
  binder does: ``place(vm, list(nodes), Policy(), start=i)`` (the default
  policy scores at most ``max_feasible`` = 100 feasible nodes, the scan
  starting at a rotating offset) and ``NodeInfo.add`` on the chosen node.
  Value: VMs / wall seconds of the whole loop, median over R runs, each on a
  fresh cluster. Params: VMs left unplaced, and the placement quality at the
  end, the population standard deviation over nodes of memory use (reserved
  MiB / allocatable MiB, in %) with its mean.
* ``placements_per_second.first_2000``: the first 2,000 of those placements
  (timed inside the same runs); baseline ``exhaustive_scoring.first_2000``: the
  same 2,000 VMs on a fresh cluster with ``max_feasible=0`` (every node
  scored), to show what bounded scoring saves. Params: the memory-use standard
  deviation after these 2,000 placements for both policies. The full mode also
  binds all 20,000 VMs once with ``max_feasible=0``: its rate and end-of-run
  memory-use deviation are params of ``placements_per_second``
  (``exhaustive_all_*``), to compare the final balance.
* ``drs_plan_seconds``: one ``plan_moves`` (threshold 80 %, default policy)
  over the final state of the last placement run, timed with
  ``SectionContext.measure`` (one warm-up call, median of R calls; the planner
  copies its inputs, so every call plans the same thing). Measured loads are
  simulated: every VM uses 5-45 % of its vCPUs and 50-90 % of its memory, each
  node 1-4 % CPU for the host; then 5 % of the nodes (50, random) are made hot
  by raising their VMs' CPU use to put the node at 85-100 % CPU (capped at
  the VMs' vCPUs: a lightly booked node may stay under 80 %). Hot means above the threshold now (``plan_moves`` without
  ``hot=``: ``Sustained``'s window is about time, not planning cost).
  Params: moves planned, hot nodes before, and hot nodes after
  (the moves applied to the simulated loads and every node's load recomputed
  from its VMs), targets above the threshold after (must be 0).

Goals: at least 1,000 placements/s; a DRS plan within 1 s. Quick mode runs
R = 1 (placements) and 3 (DRS plan) at the same scale; the full mode R = 3 and 10.
"""
from __future__ import annotations

import random
import statistics
import time

from bench.framework import Metric, SectionContext
from scheduler.drs import NodeLoad, VMLoad, plan_moves
from scheduler.plan import NodeInfo, Policy, VMRequest, place

N_NODES = 1000
N_VMS = 20_000
SUBSET = 2000
HOT_SHARE = 0.05
THRESHOLD = 0.80
SEED = 20240611
ZONES = ["z0", "z1", "z2", "z3"]


def make_nodes(seed: int = SEED) -> list[NodeInfo]:
    rng = random.Random(seed)
    nodes = []
    for i in range(N_NODES):
        labels = {"zone": ZONES[i % len(ZONES)]}
        if rng.random() < 0.10:
            labels["gpu"] = "true"
        nodes.append(NodeInfo(f"node-{i:04d}", cpus=rng.choice([32, 48, 64, 64, 64, 96, 128]),
                              memory_mib=rng.choice([128, 192, 256, 256, 384, 512]) * 1024,
                              numa_cells=2, labels=labels))
    return nodes


def make_vms(seed: int = SEED + 1) -> list[VMRequest]:
    rng = random.Random(seed)
    vms: list[VMRequest] = []
    for i in range(N_VMS):
        if i % 30 in (1, 2):        # the rest of an anti-affinity group: same shape
            prev = vms[-1]
            vms.append(VMRequest(f"vm-{i:05d}", prev.vcpus, prev.memory_mib,
                                 anti_affinity_group=prev.anti_affinity_group,
                                 node_selector=dict(prev.node_selector)))
            continue
        vcpus = rng.choices([1, 2, 4, 8, 16], weights=[20, 30, 30, 15, 5])[0]
        memory = vcpus * rng.choice([1, 2, 4]) * 1024
        r = rng.random()
        selector = {"zone": rng.choice(ZONES)} if r < 0.05 else {"gpu": "true"} if r < 0.06 else {}
        anti = f"aa-{i // 30:04d}" if i % 30 == 0 else ""      # 3 VMs in 30: 10 %
        vms.append(VMRequest(f"vm-{i:05d}", vcpus, memory, anti_affinity_group=anti, node_selector=selector))
    return vms


def mem_spread(nodes: list[NodeInfo]) -> tuple[float, float]:
    """(population stddev, mean) over nodes of reserved memory in % of allocatable."""
    use = [100.0 * n.used_memory_mib / n.memory_mib for n in nodes]
    return statistics.pstdev(use), statistics.fmean(use)


def bind(vms: list[VMRequest], policy: Policy, checkpoint: int = 0):
    """Bind ``vms`` one after the other on a fresh cluster, as the Binder does.
    Returns (nodes, vm -> node, seconds, seconds at ``checkpoint``, memory
    spread at ``checkpoint``, unplaced)."""
    nodes = make_nodes()
    by_name = {n.name: n for n in nodes}
    where: dict[str, str] = {}
    unplaced = 0
    at_checkpoint, spread_at = 0.0, (0.0, 0.0)
    t0 = time.perf_counter()
    for i, vm in enumerate(vms, 1):
        d = place(vm, list(by_name.values()), policy, start=i)
        if d.node is None:
            unplaced += 1
        else:
            by_name[d.node].add(vm)
            where[vm.name] = d.node
        if i == checkpoint:
            pause = time.perf_counter()
            at_checkpoint = pause - t0
            spread_at = mem_spread(nodes)
            t0 += time.perf_counter() - pause      # the spread computation is not timed
    return nodes, where, time.perf_counter() - t0, at_checkpoint, spread_at, unplaced


def simulate_loads(nodes: list[NodeInfo], vms: list[VMRequest], where: dict[str, str], seed: int = SEED + 2):
    """Measured loads for DRS: (NodeLoads, VMLoads, host base CPU per node, hot node names)."""
    rng = random.Random(seed)
    req = {v.name: v for v in vms}
    base = {n.name: rng.uniform(0.01, 0.04) for n in nodes}
    cores: dict[str, float] = {}
    mem: dict[str, int] = {}
    on: dict[str, list[str]] = {n.name: [] for n in nodes}
    for name in sorted(where):
        v = req[name]
        cores[name] = v.vcpus * rng.uniform(0.05, 0.45)
        mem[name] = int(v.memory_mib * rng.uniform(0.5, 0.9))
        on[where[name]].append(name)
    cpus = {n.name: n.cpus for n in nodes}
    made_hot = rng.sample(sorted(on), int(N_NODES * HOT_SHARE))
    for node in made_hot:
        want = (rng.uniform(0.85, 1.00) - base[node]) * cpus[node]
        for _ in range(3):      # capped VMs leave a rest: spread it over the others
            have = sum(cores[v] for v in on[node])
            if have <= 0 or have >= want - 1e-6:
                break
            scale = want / have
            for v in on[node]:
                cores[v] = min(req[v].vcpus, cores[v] * scale)
    node_loads = [NodeLoad(n, base[n.name] + sum(cores[v] for v in on[n.name]) / n.cpus,
                           sum(mem[v] for v in on[n.name])) for n in nodes]
    vm_loads = [VMLoad(req[name], where[name], cores[name], mem[name]) for name in sorted(where)]
    return node_loads, vm_loads, base, made_hot


def hot_after(node_loads: list[NodeLoad], vm_loads: list[VMLoad], base: dict[str, float], moves) -> tuple[int, int]:
    """Apply ``moves`` and recompute every node's load from its VMs: (nodes above
    the threshold, move targets above the threshold)."""
    where = {v.name: v.node for v in vm_loads}
    for m in moves:
        where[m.vm] = m.target
    info = {n.name: n.node for n in node_loads}
    cpu = dict(base)
    mem = dict.fromkeys(info, 0)
    for v in vm_loads:
        n = where[v.name]
        cpu[n] += v.cpu_cores / info[n].cpus
        mem[n] += v.memory_mib
    load = {n: max(cpu[n], mem[n] / info[n].memory_mib) for n in info}
    hot = sum(1 for x in load.values() if x > THRESHOLD)
    targets = sum(1 for t in {m.target for m in moves} if load[t] > THRESHOLD)
    return hot, targets


def run(ctx: SectionContext) -> list[Metric]:
    runs = 1 if ctx.quick else 3
    plan_repeat = 3 if ctx.quick else 10
    vms = make_vms()

    def common(subset: list[VMRequest]) -> dict:
        return {"nodes": N_NODES, "vms": len(subset), "runs": runs,
                "anti_affinity_vms": sum(1 for v in subset if v.anti_affinity_group),
                "selector_vms": sum(1 for v in subset if v.node_selector)}

    default = Policy()
    rates, first_rates = [], []
    for _ in range(runs):
        nodes, where, secs, first_secs, first_spread, unplaced = bind(vms, default, checkpoint=SUBSET)
        rates.append(N_VMS / secs)
        first_rates.append(SUBSET / first_secs)
    end_std, end_mean = mem_spread(nodes)

    exh_rates = []
    for _ in range(runs):
        exh_nodes, _w, exh_secs, _c, _s, exh_unplaced = bind(vms[:SUBSET], Policy(max_feasible=0))
        exh_rates.append(SUBSET / exh_secs)
    exh_std, exh_mean = mem_spread(exh_nodes)

    full_params = {}
    if not ctx.quick:
        all_nodes, _w, all_secs, _c, _s, all_unplaced = bind(vms, Policy(max_feasible=0))
        full_params = {"exhaustive_all_per_s": round(N_VMS / all_secs),
                       "exhaustive_all_mem_use_stddev_pct": round(mem_spread(all_nodes)[0], 2),
                       "exhaustive_all_unplaced": all_unplaced}

    metrics = [
        Metric("placements_per_second", statistics.median(rates), "VMs/s", higher_is_better=True,
               params={**common(vms), "max_feasible": default.max_feasible, "goal": ">= 1000/s",
                       "unplaced": unplaced, "wall_s": round(N_VMS / statistics.median(rates), 2),
                       "mem_use_stddev_pct": round(end_std, 2), "mem_use_mean_pct": round(end_mean, 1),
                       **full_params}),
        Metric("placements_per_second.first_2000", statistics.median(first_rates), "VMs/s",
               "exhaustive_scoring.first_2000", statistics.median(exh_rates), True,
               {**common(vms[:SUBSET]), "max_feasible": default.max_feasible, "baseline_max_feasible": 0,
                "mem_use_stddev_pct": round(first_spread[0], 3),
                "baseline_mem_use_stddev_pct": round(exh_std, 3),
                "mem_use_mean_pct": round(first_spread[1], 2), "baseline_unplaced": exh_unplaced}),
    ]

    node_loads, vm_loads, base, made_hot = simulate_loads(nodes, vms, where)
    hot_before = sum(1 for n in node_loads if n.load > THRESHOLD)
    timing = ctx.measure(lambda: plan_moves(node_loads, vm_loads, THRESHOLD, default), repeat=plan_repeat)
    plan = plan_moves(node_loads, vm_loads, THRESHOLD, default)
    after, targets_over = hot_after(node_loads, vm_loads, base, plan.moves)
    metrics.append(Metric(
        "drs_plan_seconds", timing.median, "s", higher_is_better=False,
        params={"nodes": N_NODES, "vms": len(vm_loads), "threshold": THRESHOLD, "made_hot": len(made_hot),
                "hot_before": hot_before, "moves": len(plan.moves),
                "sources": len({m.source for m in plan.moves}), "hot_after": after,
                "targets_over_threshold": targets_over, "still_hot_reasons": len(plan.still_hot),
                "p95_s": round(timing.p95, 4), "repeat": timing.samples, "goal": "<= 1 s"}))
    return metrics
