"""Pure placement planning: which node should run a VM, or why none can.

Inputs are plain data (``NodeInfo``, ``VMRequest``, ``Policy``); nothing
here does I/O, so every rule is unit-tested exhaustively and the scale
benchmark runs the real code.

Filters (a node must pass all):
  * Ready (its node agent's lease lives), not unschedulable, not in maintenance;
  * ``node_selector`` matches the node's labels, plus the built-in labels
    ``braid.io/node`` and ``braid.io/hypervisor`` (kvm | qemu | test) — how a
    VM requires hardware virtualisation;
  * capacity: vCPUs (the VM's maximum, hot-add included) within allocatable
    CPUs x ``cpu_overcommit`` (default 2), memory (the maximum) within
    allocatable memory x ``memory_overcommit`` (default 1: not overcommitted);
  * anti-affinity: no VM of the same anti-affinity group on the node;
  * affinity: if VMs of its affinity group run somewhere, one of those nodes.

Score (highest wins, ties by name): ``spread`` prefers the emptiest node
after placement, ``pack`` the fullest; plus storage locality (share of the
VM's volume extents with a replica on the node) and NUMA fit (the VM's
memory fits in one NUMA cell of the node).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

NODE_LABEL = "braid.io/node"
HYPERVISOR_LABEL = "braid.io/hypervisor"


@dataclass
class NodeInfo:
    name: str
    ready: bool = True
    unschedulable: bool = False
    maintenance: bool = False
    cpus: int = 0                 # allocatable (after the platform reserve)
    memory_mib: int = 0
    hypervisor: str = "kvm"
    numa_cells: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    used_vcpus: int = 0
    used_memory_mib: int = 0
    groups: Counter = field(default_factory=Counter)   # affinity/anti-affinity group -> VMs here

    def add(self, vm: "VMRequest") -> None:
        self.used_vcpus += vm.vcpus
        self.used_memory_mib += vm.memory_mib
        for g in (vm.affinity_group, vm.anti_affinity_group):
            if g:
                self.groups[g] += 1

    def remove(self, vm: "VMRequest") -> None:
        self.used_vcpus -= vm.vcpus
        self.used_memory_mib -= vm.memory_mib
        for g in (vm.affinity_group, vm.anti_affinity_group):
            if g and self.groups[g] > 0:
                self.groups[g] -= 1


@dataclass
class VMRequest:
    name: str
    vcpus: int                    # the maximum (hot-add ceiling)
    memory_mib: int               # the maximum
    affinity_group: str = ""
    anti_affinity_group: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    priority: int = 0             # HA restart order (higher first)


@dataclass
class Policy:
    cpu_overcommit: float = 2.0
    memory_overcommit: float = 1.0
    mode: str = "spread"          # spread | pack
    locality_weight: float = 0.5
    numa_weight: float = 0.1
    # stop after this many feasible nodes (0: score all). Large clusters need
    # not score every node to find a good one (as Kubernetes'
    # percentageOfNodesToScore); the scan starts at a rotating offset.
    max_feasible: int = 100


@dataclass
class Decision:
    node: str | None
    reason: str = ""              # why no node (or "")
    score: float = 0.0


def request_problem(vm: VMRequest) -> str:
    """A request no cluster could ever satisfy (no point retrying)."""
    if vm.affinity_group and vm.affinity_group == vm.anti_affinity_group:
        return (f"affinity group and anti-affinity group are both {vm.affinity_group!r}: "
                "the VM would have to be with and apart from the same VMs")
    if vm.vcpus <= 0 or vm.memory_mib <= 0:
        return "the VM asks for no vCPUs or no memory"
    return ""


def _labels_match(node: NodeInfo, selector: dict[str, str]) -> bool:
    for k, v in selector.items():
        have = node.name if k == NODE_LABEL else node.hypervisor if k == HYPERVISOR_LABEL \
            else node.labels.get(k)
        if have != v:
            return False
    return True


def place(vm: VMRequest, nodes: list[NodeInfo], policy: Policy,
          locality: dict[str, float] | None = None, exclude: frozenset[str] = frozenset(),
          start: int = 0) -> Decision:
    """Choose a node for ``vm`` (``nodes`` carry what is already placed).
    ``locality``: node -> share (0..1) of the VM's volume extents with a
    replica there. ``exclude``: nodes not to use (e.g. the failed one).
    ``start``: where the scan begins (rotate it between calls)."""
    problem = request_problem(vm)
    if problem:
        return Decision(None, problem)
    rejected: Counter = Counter()
    affinity_nodes = None
    if vm.affinity_group:
        affinity_nodes = {n.name for n in nodes if n.groups.get(vm.affinity_group)}
        affinity_nodes = affinity_nodes or None
    best: NodeInfo | None = None
    best_score = 0.0
    most_free_mem = 0
    feasible = 0
    count = len(nodes)
    start = start % count if count else 0
    # nodes with a replica of the VM's volumes are always scored
    order = nodes[start:] + nodes[:start]
    if locality:
        order = [n for n in order if locality.get(n.name)] + [n for n in order if not locality.get(n.name)]
    for n in order:
        if policy.max_feasible and feasible >= policy.max_feasible:
            break
        if n.name in exclude:
            rejected["excluded"] += 1
            continue
        if not n.ready:
            rejected["not Ready"] += 1
            continue
        if n.maintenance or n.unschedulable:
            rejected["in maintenance" if n.maintenance else "unschedulable"] += 1
            continue
        if vm.node_selector and not _labels_match(n, vm.node_selector):
            rejected["node selector does not match"] += 1
            continue
        cpu_cap = n.cpus * policy.cpu_overcommit
        mem_cap = n.memory_mib * policy.memory_overcommit
        free_mem = mem_cap - n.used_memory_mib
        most_free_mem = max(most_free_mem, int(free_mem))
        if n.used_memory_mib + vm.memory_mib > mem_cap:
            rejected["insufficient memory"] += 1
            continue
        if n.used_vcpus + vm.vcpus > cpu_cap:
            rejected["insufficient CPU"] += 1
            continue
        if vm.anti_affinity_group and n.groups.get(vm.anti_affinity_group):
            rejected["anti-affinity"] += 1
            continue
        if affinity_nodes is not None and n.name not in affinity_nodes:
            rejected["affinity"] += 1
            continue
        feasible += 1
        free = ((cpu_cap - n.used_vcpus - vm.vcpus) / cpu_cap + (free_mem - vm.memory_mib) / mem_cap) / 2
        score = free if policy.mode == "spread" else 1.0 - free
        if locality:
            score += policy.locality_weight * locality.get(n.name, 0.0)
        if vm.memory_mib <= n.memory_mib / max(1, n.numa_cells):
            score += policy.numa_weight
        if best is None or score > best_score or (score == best_score and n.name < best.name):
            best, best_score = n, score
    if best is None:
        parts = ", ".join(f"{c} {why}" for why, c in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])))
        reason = f"0/{len(nodes)} nodes can run it" + (f": {parts}" if parts else " (no nodes)")
        if rejected.get("insufficient memory"):
            reason += f" (needs {vm.memory_mib} MiB, most free {most_free_mem} MiB)"
        return Decision(None, reason)
    return Decision(best.name, "", best_score)
