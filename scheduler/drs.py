"""DRS (distributed resource scheduling): which live migrations relieve hot nodes.

Pure planning, like ``scheduler.plan``: plain data in, plain data out, times
passed in, no I/O. The caller (the scheduler leader, ``braid drs``) feeds it
measurements and carries out the moves.

**Load.** A node's load is the larger of its measured CPU use (fraction of its
allocatable CPUs) and its measured memory use (fraction of its allocatable
memory). A VM's measured use is in cores and MiB; moving it is modelled as
subtracting its share from the source and adding it to the target (each
share relative to that node's allocatable).

**Hot.** ``Sustained`` turns samples into hot nodes: a node is hot once its
load has stayed above the threshold (default 80 %, settable 50-90 %) for the
mode's window without a break:

  * ``conservative``: 5 minutes, and only "well above": every sample above
    threshold + 5 points;
  * ``aggressive``: 1 minute above the threshold itself.

A node missing from a sample, or a gap of more than ``max_gap_s`` between two
samples, restarts its window (no data is no evidence).

**Plan** (``plan_moves``, greedy, deterministic). Hot nodes are handled hottest
first. For each, VMs are picked one at a time:

  1. if one VM's removal alone brings the node to or under the threshold (CPU
     and memory), the *smallest* such VM (least memory to copy) that has a
     target;
  2. otherwise the VM that removes the largest share of the excess (so one
     big VM is preferred to several small ones), then step 1 again.

Each VM goes to the coolest target (lowest current load, ties by name) that
stays at or under the threshold on CPU and memory after the move and passes
``scheduler.plan``'s filters for the VM's reservation: Ready, schedulable, not
in maintenance, node selector, vCPU and memory capacity with the policy's
overcommit, anti-affinity (checked against the plan's earlier moves too;
``plan.place`` confirms each chosen target). Hot nodes (and any node above
the threshold) are never targets; a node that sheds VMs in this plan receives
none. VMs whose measured use does not reduce the excess are not moved. All moves a hot node needs
are planned in the same plan (the caller may run them one at a time).

A hot node's moves are kept only if together they bring it under the
threshold: partial relief (a node left hot that would trigger again) is not
planned, and the node's reason says why. VMs of an affinity group are never
moved (the group must stay on one node, and moving it whole is not planned).
No move is planned when no node is hot; ``Plan.reasons`` says why nothing (or
not everything) moves.

Greedy is not always the fewest moves (that is a covering problem), but it is
for the common case of one VM sufficing, and it is fast: ~20 ms for 1,000
nodes, 20,000 VMs and 50 hot nodes (bench section ``scheduler``). Every move
has a stable ``id`` (a hash of VM, source and target: the same recommendation
keeps its id from one plan to the next) for ``braid drs apply ID``.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from scheduler.plan import NodeInfo, Policy, VMRequest, _labels_match, place

DEFAULT_THRESHOLD = 0.80
MIN_THRESHOLD = 0.50
MAX_THRESHOLD = 0.90
_EPS = 1e-9


def validate_threshold(threshold: float) -> float:
    """The threshold as a fraction (0.5..0.9); ValueError otherwise."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"DRS threshold must be a number, not {threshold!r}") from None
    if not MIN_THRESHOLD <= t <= MAX_THRESHOLD:
        raise ValueError(f"DRS threshold must be between {MIN_THRESHOLD:.0%} and {MAX_THRESHOLD:.0%} "
                         f"(a fraction {MIN_THRESHOLD}..{MAX_THRESHOLD}), not {threshold!r}")
    return t


# -- inputs ------------------------------------------------------------------------

@dataclass
class NodeLoad:
    """A node: its reservations as the binder tracks them (``NodeInfo``:
    capacity, state, labels, VMs' vCPU/memory maxima, groups) plus what it
    measurably uses."""

    node: NodeInfo
    cpu_used: float               # measured, fraction of allocatable CPUs (0..1)
    memory_used_mib: int = 0      # measured

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def memory_used(self) -> float:
        """Measured memory as a fraction of allocatable memory."""
        return self.memory_used_mib / self.node.memory_mib if self.node.memory_mib > 0 else 0.0

    @property
    def load(self) -> float:
        return max(self.cpu_used, self.memory_used)


@dataclass
class VMLoad:
    """A running VM: its request (reservation, groups, selector), where it
    runs, and what it measurably uses."""

    vm: VMRequest
    node: str
    cpu_cores: float              # measured
    memory_mib: int               # measured (resident)

    @property
    def name(self) -> str:
        return self.vm.name


def loads(nodes: Iterable[NodeLoad]) -> dict[str, float]:
    """node -> load, the sample ``Sustained.observe`` takes."""
    return {n.name: n.load for n in nodes}


# -- sustained load ----------------------------------------------------------------

@dataclass(frozen=True)
class Mode:
    name: str
    window_s: float               # how long a node must stay above
    margin: float                 # "above" = load > threshold + margin


MODES = {
    "conservative": Mode("conservative", 300.0, 0.05),
    "aggressive": Mode("aggressive", 60.0, 0.0),
}


class Sustained:
    """Which nodes have stayed above the threshold for the mode's window.

    Feed it samples with ``observe(loads, now)`` (every node in each sample;
    ``now`` in seconds, never decreasing); ``hot()`` lists the hot nodes."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, mode: str = "conservative",
                 max_gap_s: float = 60.0):
        self.threshold = validate_threshold(threshold)
        if mode not in MODES:
            raise ValueError(f"DRS mode must be one of {', '.join(sorted(MODES))}, not {mode!r}")
        if max_gap_s <= 0:
            raise ValueError("max_gap_s must be > 0")
        self.mode = MODES[mode]
        self.level = self.threshold + self.mode.margin   # a sample counts when its load is above this
        self.max_gap_s = max_gap_s
        self.now: float | None = None
        self._since: dict[str, float] = {}                # node -> start of its unbroken run above
        self._last: dict[str, float] = {}                 # node -> time of its last sample

    def observe(self, loads: Mapping[str, float], now: float) -> list[str]:
        """Record one sample (node -> load fraction) taken at ``now``; returns
        the hot nodes at ``now``."""
        if self.now is not None and now < self.now:
            raise ValueError(f"samples must not go back in time ({now} < {self.now})")
        for node in [n for n in self._since if n not in loads]:
            del self._since[node]
        for node, load in loads.items():
            last = self._last.get(node)
            if load > self.level:
                if node not in self._since or last is None or now - last > self.max_gap_s:
                    self._since[node] = now
            else:
                self._since.pop(node, None)
        self._last = {node: now for node in loads}
        self.now = now
        return self.hot(now)

    def above_for(self, node: str, now: float | None = None) -> float:
        """Seconds ``node`` has stayed above (0 if it is not above)."""
        since = self._since.get(node)
        if since is None:
            return 0.0
        now = self.now if now is None else now
        return max(0.0, now - since) if now is not None else 0.0

    def hot(self, now: float | None = None) -> list[str]:
        """Nodes above for at least the window at ``now`` (default: the last
        sample's time), sorted by name."""
        now = self.now if now is None else now
        if now is None:
            return []
        return sorted(n for n, since in self._since.items() if now - since >= self.mode.window_s)


# -- the plan ----------------------------------------------------------------------

def move_id(vm: str, source: str, target: str) -> str:
    """A short stable id of a move (12 hex digits)."""
    return hashlib.sha256(f"{vm}\0{source}\0{target}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Move:
    id: str
    vm: str
    source: str
    target: str
    reason: str
    # expected fractions (0..1) after this move and the plan's moves before it
    source_cpu: float
    source_memory: float
    target_cpu: float
    target_memory: float

    @property
    def source_load(self) -> float:
        return max(self.source_cpu, self.source_memory)

    @property
    def target_load(self) -> float:
        return max(self.target_cpu, self.target_memory)


@dataclass
class Plan:
    moves: list[Move] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)   # why nothing / not everything moves
    hot: list[str] = field(default_factory=list)       # hot nodes considered, hottest first
    still_hot: list[str] = field(default_factory=list)  # of those, expected above after the moves

    def find(self, ident: str) -> Move | None:
        """The move with this id (or a unique prefix of at least 4 digits)."""
        hits = [m for m in self.moves if m.id == ident]
        if not hits and len(ident) >= 4:
            hits = [m for m in self.moves if m.id.startswith(ident)]
        return hits[0] if len(hits) == 1 else None


class _Node:
    """A node's state while planning (copies: the inputs are not changed)."""

    __slots__ = ("name", "info", "cpus", "memory_mib", "cpu", "mem", "key")

    def __init__(self, n: NodeLoad):
        self.name = n.name
        self.info = dataclasses.replace(n.node, groups=Counter(n.node.groups))
        self.cpus = n.node.cpus
        self.memory_mib = n.node.memory_mib
        self.cpu = float(n.cpu_used)
        self.mem = n.memory_used
        self.key: tuple[float, str] | None = None   # its entry in the target order

    @property
    def load(self) -> float:
        return max(self.cpu, self.mem)

    def shares(self, v: VMLoad) -> tuple[float, float]:
        return v.cpu_cores / self.cpus, v.memory_mib / self.memory_mib


def _pct(x: float) -> str:
    return f"{x * 100:.0f} %"


def _target_problem(vm: VMRequest, n: NodeInfo, policy: Policy) -> str:
    """``scheduler.plan.place``'s filters for one node ("" = passes); affinity
    is not checked (VMs of affinity groups are not moved)."""
    if vm.node_selector and not _labels_match(n, vm.node_selector):
        return "node selector does not match"
    if n.used_memory_mib + vm.memory_mib > n.memory_mib * policy.memory_overcommit:
        return "insufficient memory"
    if n.used_vcpus + vm.vcpus > n.cpus * policy.cpu_overcommit:
        return "insufficient CPU"
    if vm.anti_affinity_group and n.groups.get(vm.anti_affinity_group):
        return "anti-affinity"
    return ""


class _Planner:
    def __init__(self, nodes: Sequence[NodeLoad], vms: Sequence[VMLoad], threshold: float, policy: Policy):
        self.t = threshold
        self.policy = policy
        self.nodes = {n.name: _Node(n) for n in sorted(nodes, key=lambda n: n.name)}
        self.vms: dict[str, list[VMLoad]] = {}
        for v in sorted(vms, key=lambda v: (v.node, v.name)):
            if v.node in self.nodes:
                self.vms.setdefault(v.node, []).append(v)
        self.order: list[tuple[float, str]] = []           # targets, coolest first
        self.not_targets = 0
        for n in self.nodes.values():
            i = n.info
            if i.ready and not i.unschedulable and not i.maintenance and n.cpus > 0 and n.memory_mib > 0:
                n.key = (n.load, n.name)
                self.order.append(n.key)
            else:
                self.not_targets += 1
        self.order.sort()
        self._room: tuple[float, float, int] | None = None  # most cores, MiB any target takes; targets
        self._room_nodes: tuple[str, str] = ("", "")         # where those maxima are
        self.too_hot = f"it would push a node above {_pct(threshold)}"

    def _drop_target(self, n: _Node) -> None:
        if n.key is not None:
            del self.order[bisect.bisect_left(self.order, n.key)]
            n.key = None     # (fewer targets: the room stays an upper bound)

    def _update(self, n: _Node, freed: bool = False) -> None:
        if n.key is not None:
            del self.order[bisect.bisect_left(self.order, n.key)]
            n.key = (n.load, n.name)
            bisect.insort(self.order, n.key)
            # a node that took a VM has less room: the room stays an upper bound,
            # recomputed (tighter) only when that node held a maximum
            if freed or n.name in self._room_nodes:
                self._room = None

    def room(self) -> tuple[float, float, int]:
        """The most CPU cores and memory MiB any target could take under the
        threshold (a bound to skip hopeless scans; on possibly different
        nodes), and how many targets are under it."""
        if self._room is None:
            t, cores, mib, count, at_cores, at_mib = self.t + _EPS, 0.0, 0.0, 0, "", ""
            for load, name in self.order:
                if load >= self.t:
                    break
                n = self.nodes[name]
                if (t - n.cpu) * n.cpus > cores:
                    cores, at_cores = (t - n.cpu) * n.cpus, name
                if (t - n.mem) * n.memory_mib > mib:
                    mib, at_mib = (t - n.mem) * n.memory_mib, name
                count += 1
            self._room = (cores, mib, count)
            self._room_nodes = (at_cores, at_mib)
        return self._room

    def target(self, v: VMLoad, why: Counter) -> _Node | None:
        """The coolest node that takes ``v`` and stays at or under the threshold."""
        t = self.t
        c, m = v.cpu_cores, v.memory_mib
        cores, mib, count = self.room()
        if not count:
            return None            # (why stays empty: no target is under the threshold)
        if c > cores * (1 + 1e-9) + 1e-9 or m > mib * (1 + 1e-9) + 1e-9:
            why[self.too_hot] += 1
            return None
        too_hot = 0
        for load, name in self.order:
            if load >= t:
                break              # sorted: no node from here on has room
            n = self.nodes[name]
            if n.cpu + c / n.cpus > t + _EPS or n.mem + m / n.memory_mib > t + _EPS:
                too_hot += 1
                continue
            problem = _target_problem(v.vm, n.info, self.policy)
            if not problem and place(v.vm, [n.info], self.policy).node is None:
                problem = "rejected by the placement filters"
            if problem:
                why[problem] += 1
                continue
            return n
        if too_hot:
            why[self.too_hot] += too_hot
        return None

    def _apply(self, v: VMLoad, src: _Node, dst: _Node) -> None:
        sc, sm = src.shares(v)
        dc, dm = dst.shares(v)
        src.cpu -= sc
        src.mem -= sm
        dst.cpu += dc
        dst.mem += dm
        src.info.remove(v.vm)
        dst.info.add(v.vm)
        self._update(dst)

    def relieve(self, src: _Node) -> tuple[list[Move], str]:
        """Moves that bring ``src`` under the threshold, or none and why not."""
        t = self.t
        cpu0, mem0 = src.cpu, src.mem
        movable, pinned = [], 0
        for v in self.vms.get(src.name, []):
            if v.vm.affinity_group:
                pinned += 1
            else:
                movable.append(v)
        journal: list[tuple[VMLoad, _Node, float, float, float, float]] = []
        moves: list[Move] = []
        no_target: dict[str, Counter] = {}          # vm -> why no node took it
        while src.cpu > t + _EPS or src.mem > t + _EPS:
            ec, em = src.cpu - t, src.mem - t         # excess (> 0 where over)
            candidates = []
            for v in movable:
                if v.name in no_target:
                    continue
                dc, dm = src.shares(v)
                relief = (min(dc, ec) / ec if ec > _EPS else 0.0) + (min(dm, em) / em if em > _EPS else 0.0)
                if relief <= 0:
                    continue
                fixes = (ec <= _EPS or dc >= ec - _EPS) and (em <= _EPS or dm >= em - _EPS)
                candidates.append((v, fixes, relief))
            fixers = sorted((c for c in candidates if c[1]),
                            key=lambda c: (c[0].memory_mib, c[0].cpu_cores, c[0].name))
            others = sorted((c for c in candidates if not c[1]),
                            key=lambda c: (-c[2], c[0].memory_mib, c[0].name))
            chosen = None
            for v, _fixes, _relief in fixers + others:
                why: Counter = Counter()
                dst = self.target(v, why)
                if dst is not None:
                    chosen = (v, dst)
                    break
                no_target[v.name] = why
            if chosen is None:
                break
            v, dst = chosen
            journal.append((v, dst, dst.cpu, dst.mem, src.cpu, src.mem))
            before = f"{src.name} at CPU {_pct(src.cpu)}, memory {_pct(src.mem)} (above {_pct(t)})"
            tc, tm = dst.cpu, dst.mem
            self._apply(v, src, dst)
            reason = (f"{before}: move {v.name} ({v.cpu_cores:.1f} cores, {v.memory_mib} MiB) to {dst.name}, "
                      f"the coolest node it fits under {_pct(t)} (CPU {_pct(tc)} -> {_pct(dst.cpu)}, "
                      f"memory {_pct(tm)} -> {_pct(dst.mem)})")
            moves.append(Move(move_id(v.name, src.name, dst.name), v.name, src.name, dst.name, reason,
                              src.cpu, src.mem, dst.cpu, dst.mem))
            movable.remove(v)
        if src.cpu <= t + _EPS and src.mem <= t + _EPS:
            return moves, ""
        # not enough: undo (exactly) and explain
        left_cpu, left_mem = src.cpu, src.mem
        for v, dst, dc, dm, sc, sm in reversed(journal):
            dst.info.remove(v.vm)
            src.info.add(v.vm)
            dst.cpu, dst.mem, src.cpu, src.mem = dc, dm, sc, sm
            self._update(dst, freed=True)
        parts = []
        if not self.vms.get(src.name):
            parts.append("no VM of it is known")
        if pinned:
            parts.append(f"{pinned} VM(s) in affinity groups (never moved alone)")
        stuck: Counter = Counter()
        for why in no_target.values():
            stuck[why.most_common(1)[0][0] if why else f"no target node is under {_pct(t)}"] += 1
        for why, c in sorted(stuck.items(), key=lambda kv: (-kv[1], kv[0])):
            parts.append(f"{c} VM(s) fit on no node (mostly: {why})")
        if journal:
            parts.append(f"the {len(journal)} possible move(s) would leave it at CPU {_pct(left_cpu)}, "
                         f"memory {_pct(left_mem)}, so none is planned")
        if self.not_targets:
            parts.append(f"{self.not_targets} node(s) are not targets (not Ready, unschedulable or maintenance)")
        return [], (f"{src.name} stays above {_pct(t)} (CPU {_pct(cpu0)}, memory {_pct(mem0)}): "
                    + "; ".join(parts or ["no move helps"]))


def plan_moves(nodes: Sequence[NodeLoad], vms: Sequence[VMLoad], threshold: float = DEFAULT_THRESHOLD,
               policy: Policy | None = None, hot: Iterable[str] | None = None) -> Plan:
    """Live migrations that bring every hot node to or under ``threshold``
    without pushing a target above it (see the module docstring).

    ``nodes``: every node with its measured load; ``vms``: the running VMs
    with theirs. ``hot``: the nodes to relieve (e.g. ``Sustained.hot()``);
    default every node whose load is above the threshold now. Deterministic:
    the same input (in any order) gives the same plan."""
    t = validate_threshold(threshold)
    p = _Planner(nodes, vms, t, policy or Policy())
    plan = Plan()
    if hot is None:
        sources = [n for n in p.nodes.values() if n.load > t + _EPS]
    else:
        sources = []
        for name in sorted(set(hot)):
            n = p.nodes.get(name)
            if n is None:
                plan.reasons.append(f"{name}: unknown node")
            elif n.load <= t + _EPS:
                plan.reasons.append(f"{name} is no longer above {_pct(t)} (load {_pct(n.load)})")
            else:
                sources.append(n)
    sources.sort(key=lambda n: (-n.load, n.name))
    plan.hot = [n.name for n in sources]
    if not sources:
        plan.reasons.append(f"no node is hot (above {_pct(t)})")
        return plan
    for n in sources:                   # neither hot nodes nor sources receive VMs
        p._drop_target(n)
    for n in sources:
        moves, why = p.relieve(n)
        plan.moves += moves
        if why:
            plan.reasons.append(why)
            plan.still_hot.append(n.name)
    return plan
