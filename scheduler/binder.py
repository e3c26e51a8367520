"""The scheduler's acting part (leader only): binding and HA.

* **Binding.** A VM without ``spec.node`` is placed by ``scheduler.plan.place``
  and bound by writing ``spec.node`` (a compare-and-set on the VM's spec key,
  with the election guard: a deposed leader cannot bind, two replicas can
  never bind one VM twice). A VM that cannot be placed shows the reason in
  its status (phase Pending) and is retried with backoff, and at once when a
  node changes.
* **HA.** When a node's agent presence (lease) is gone, its VMs with
  ``spec.ha.enabled`` are moved, highest ``ha.priority`` first: the node is
  first *fenced* from their volumes (every extent record gets a generation
  bump with the node in ``fenced``; if the node's storage daemon is gone too,
  its replicas leave the sets), then each VM is rebound to a healthy node
  (excluding the dead one). The node agent there starts it. VMs that do not
  fit wait and are retried.

Usage (vCPUs, memory, groups per node) is tracked from the VM specs the
informer sees, plus the bindings this leader just wrote.
"""

from __future__ import annotations

import logging
import threading
import time

from braid import extents as X
from braid import keys
from braid import kinds as K
from braid.reconcile import Controller, Result
from braid.store import KV, Conflict, Election, GuardFailed, Informer, Store
from braid.v1 import compute_pb2
from scheduler.plan import NodeInfo, Policy, VMRequest, place, request_problem

log = logging.getLogger("braid.scheduler.binder")

VM = K.KINDS["vm"]
NODE = K.KINDS["node"]
RUNNING, STOPPED = compute_pb2.RUNNING, compute_pb2.STOPPED


def vm_request(vm: compute_pb2.VM) -> VMRequest:
    s = vm.spec
    return VMRequest(vm.metadata.name, max(s.max_vcpus, s.vcpus), max(s.max_memory_mib, s.memory_mib),
                     s.affinity_group, s.anti_affinity_group, dict(s.node_selector), s.ha.priority)


class Binder:
    def __init__(self, store: Store, election: Election, policy: Policy | None = None):
        self.store = store
        self.election = election
        self.policy = policy or Policy()
        self._lock = threading.Lock()
        self.vms: dict[str, tuple[str, VMRequest, bool, int]] = {}  # name -> (node, req, ha, priority)
        self.nodes: dict[str, NodeInfo] = {}
        self.live: dict[str, set[str]] = {}       # node -> live daemons
        # node -> (host CPU busy share, host CPUs, memory used MiB, {vm: cores}): DRS input
        self.measured: dict[str, tuple[float, int, int, dict[str, float]]] = {}
        self._rr = 0
        self.binds = 0
        self.failovers = 0
        self.controller = Controller("scheduler", self.reconcile, workers=1, resync_period=30.0,
                                     list_keys=self._keys)
        self.vm_informer = Informer(store, keys.spec_prefix("vm"), self._on_vm, name="scheduler-vms")
        self.node_informer = Informer(store, "node/", self._on_node, name="scheduler-nodes")

    # -- cache --------------------------------------------------------------------

    def _keys(self):
        with self._lock:
            unbound = [f"vm:{n}" for n, (node, *_rest) in self.vms.items() if not node]
            dead = [f"node:{n}" for n in self._dead_nodes()]
            used = {node for node, *_ in self.vms.values() if node}
            drain = [f"drain:{n}" for n in sorted(used) if self.nodes.get(n) and self.nodes[n].maintenance]
        return unbound + dead + drain

    def _dead_nodes(self) -> list[str]:
        used = {node for node, *_ in self.vms.values() if node}
        return sorted(n for n in used if "node-agent" not in self.live.get(n, set()))

    def _node(self, name: str) -> NodeInfo:
        n = self.nodes.get(name)
        if n is None:
            n = self.nodes[name] = NodeInfo(name, ready=False)
        return n

    def _on_vm(self, key: str, kv: KV | None) -> None:
        name = key[len(VM.spec_prefix):]
        with self._lock:
            old = self.vms.pop(name, None)
            if old and old[0]:
                self._node(old[0]).remove(old[1])
            if kv is not None:
                try:
                    vm = K.from_json(kv.value, VM.message, key)
                except K.CorruptObject as exc:
                    log.warning("ignoring %s", exc)
                    return
                req = vm_request(vm)
                self.vms[name] = (vm.spec.node, req, vm.spec.ha.enabled, vm.spec.ha.priority)
                if vm.spec.node:
                    self._node(vm.spec.node).add(req)
        if kv is not None and not self.vms.get(name, ("x",))[0]:
            self.controller.enqueue(f"vm:{name}")

    def _on_node(self, key: str, kv: KV | None) -> None:
        parsed = keys.parse_live(key)
        if parsed:
            node, daemon = parsed
            with self._lock:
                daemons = self.live.setdefault(node, set())
                was_ready = "node-agent" in daemons
                (daemons.add if kv is not None else daemons.discard)(daemon)
                self._node(node).ready = "node-agent" in daemons
                now_ready = self._node(node).ready
            if was_ready and not now_ready:
                log.warning("node %s: node agent lease gone", node)
                self.controller.enqueue(f"node:{node}")
            elif now_ready and not was_ready:
                self._wake_pending()
            return
        obj = keys.parse_object(key)
        if obj is None:
            return
        node = obj[2]
        try:
            if obj[1] == "spec":
                spec = K.from_json(kv.value, NODE.message, key).spec if kv else None
                with self._lock:
                    n = self._node(node)
                    n.unschedulable = bool(spec and spec.unschedulable)
                    n.maintenance = bool(spec and spec.maintenance)
                if n.maintenance:
                    self.controller.enqueue(f"drain:{node}")
            elif kv is not None:
                st = K.from_json(kv.value, NODE.status_message(), key)
                with self._lock:
                    n = self._node(node)
                    before = (n.cpus, n.memory_mib, n.hypervisor, n.numa_cells)
                    n.cpus = st.allocatable.cpus
                    n.memory_mib = st.allocatable.memory_bytes >> 20
                    n.hypervisor = st.hypervisor or n.hypervisor
                    n.numa_cells = st.numa_cells or 1
                    self.measured[node] = (st.cpu_used_fraction, st.capacity.cpus,
                                           st.memory_used_bytes >> 20, dict(st.vm_cpu_cores))
                    if before == (n.cpus, n.memory_mib, n.hypervisor, n.numa_cells):
                        return  # only measurements changed (every few seconds): nothing to re-plan
        except K.CorruptObject as exc:
            log.warning("ignoring %s", exc)
            return
        self._wake_pending()

    def _wake_pending(self) -> None:
        for key in self._keys():
            self.controller.enqueue(key)

    def start(self) -> None:
        self.controller.start()
        self.node_informer.start()
        self.vm_informer.start()

    def stop(self) -> None:
        self.vm_informer.request_stop()
        self.node_informer.request_stop()
        self.vm_informer.stop()
        self.node_informer.stop()
        self.controller.stop()

    # -- reconcile ------------------------------------------------------------------

    def reconcile(self, key: str) -> Result | None:
        if not self.election.is_leader:
            return None
        if not (self.node_informer.synced.is_set() and self.vm_informer.synced.is_set()):
            return Result(requeue_after=0.2)  # plan with the whole picture only
        kind, _, name = key.partition(":")
        try:
            if kind == "vm":
                return self._schedule(name)
            if kind == "node":
                return self._failover(name)
            if kind == "drain":
                return self._drain(name)
        except GuardFailed:
            log.warning("no longer the leader; %s left to the next one", key)
        return None

    def _load(self, name: str) -> tuple[compute_pb2.VM, KV, KV | None] | None:
        got, _ = self.store.get_many([VM.spec_key(name), VM.status_key(name)])
        spec_kv, status_kv = got[VM.spec_key(name)], got[VM.status_key(name)]
        if spec_kv is None:
            return None
        try:
            return K.assemble(VM, name, spec_kv, status_kv), spec_kv, status_kv
        except K.CorruptObject as exc:
            log.warning("vm %s: %s", name, exc)
            return None

    def _plan(self, vm: compute_pb2.VM, exclude: frozenset[str] = frozenset()):
        req = vm_request(vm)
        with self._lock:
            nodes = list(self.nodes.values())
            self._rr += 1
            return req, place(req, nodes, self.policy, self._locality(vm), exclude=exclude, start=self._rr)

    def _locality(self, vm: compute_pb2.VM) -> dict[str, float] | None:
        """Share of the VM's volume extents with a replica on each node."""
        volumes = [d.volume for d in vm.spec.disks if d.volume]
        if not volumes:
            return None
        count: dict[str, int] = {}
        total = 0
        for vol in volumes:
            kvs, _ = self.store.list(X.volume_prefix(vol))
            for kv in kvs:
                try:
                    rec = X.ExtentRecord.from_json(kv.value)
                except X.BadRecord:
                    continue
                total += 1
                for r in rec.replicas:
                    count[r.node] = count.get(r.node, 0) + 1
        return {n: c / total for n, c in count.items()} if total else None

    def _bind(self, vm: compute_pb2.VM, spec_kv: KV, node: str, req: VMRequest, why: str) -> bool:
        guard = self.election.guard()
        self._set_fence(vm, node, fenced=False)  # fenced by an earlier failover: may write again
        new = compute_pb2.VM()
        new.CopyFrom(vm)
        new.ClearField("status")
        new.spec.node = node
        new.metadata.generation += 1
        try:
            self.store.update(VM.spec_key(vm.metadata.name), K.encode_spec(VM, new), spec_kv.mod_revision,
                              guards=[guard])
        except GuardFailed:
            raise
        except Conflict:
            return False  # changed meanwhile: the informer re-enqueues it
        with self._lock:  # count it now; the informer's event replaces this entry
            old = self.vms.get(vm.metadata.name)
            if old and old[0]:
                self._node(old[0]).remove(old[1])
            self.vms[vm.metadata.name] = (node, req, vm.spec.ha.enabled, vm.spec.ha.priority)
            self._node(node).add(req)
        self.binds += 1
        log.info("vm %s -> node %s (%s)", vm.metadata.name, node, why)
        return True

    def _pending_status(self, vm: compute_pb2.VM, status_kv: KV | None, message: str) -> None:
        if vm.status.phase == "Pending" and vm.status.message == message:
            return
        st = compute_pb2.VMStatus()
        st.CopyFrom(vm.status)
        st.phase, st.message = "Pending", message
        st.observed_generation = vm.metadata.generation
        guard = self.election.guard()
        try:
            if status_kv is None:
                self.store.create(VM.status_key(vm.metadata.name), K.to_json(st), guards=[guard])
            else:
                self.store.update(VM.status_key(vm.metadata.name), K.to_json(st), status_kv.mod_revision,
                                  guards=[guard])
        except Conflict:
            pass  # someone (a node agent) wrote it: theirs wins

    def _schedule(self, name: str) -> Result | None:
        got = self._load(name)
        if got is None:
            return None
        vm, spec_kv, status_kv = got
        if vm.spec.node:
            return None
        req, d = self._plan(vm)
        if d.node is None:
            self._pending_status(vm, status_kv, f"cannot be placed: {d.reason}")
            # a request no cluster can satisfy waits for a spec change, not a timer
            return None if request_problem(req) else Result(requeue_after=30.0)
        if not self._bind(vm, spec_kv, d.node, req, "placed"):
            return Result(requeue_after=0.05)
        return None

    def move(self, name: str, source: str, target: str, why: str) -> bool:
        """Rebind a VM from ``source`` to ``target`` (a DRS move); False if
        it is not on ``source`` any more or ``target`` cannot take it now."""
        got = self._load(name)
        if got is None or got[0].spec.node != source:
            return False
        vm, spec_kv, _ = got
        req, d = self._plan(vm, exclude=frozenset(n for n in self.nodes if n != target))
        if d.node != target:
            log.info("DRS move of %s to %s skipped: %s", name, target, d.reason or "not the best fit")
            return False
        return self._bind(vm, spec_kv, target, req, why)

    # -- maintenance ------------------------------------------------------------------

    def _drain(self, node: str) -> Result | None:
        """Move every VM off a node in maintenance (highest HA priority
        first): rebinding makes the node agents live-migrate a running VM
        (or hand a stopped one over). VMs that fit nowhere wait, with the
        reason in their status, and are retried."""
        with self._lock:
            n = self.nodes.get(node)
            if n is None or not n.maintenance:
                return None
            mine = sorted(((prio, name) for name, (nd, _r, _ha, prio) in self.vms.items() if nd == node),
                          key=lambda t: (-t[0], t[1]))
        stuck = False
        for _prio, name in mine:
            got = self._load(name)
            if got is None:
                continue
            vm, spec_kv, status_kv = got
            if vm.spec.node != node:
                continue
            req, d = self._plan(vm, exclude=frozenset({node}))
            if d.node is None:
                self._pending_status_keep_phase(vm, status_kv, f"drain of {node}: cannot move: {d.reason}")
                stuck = True
            elif not self._bind(vm, spec_kv, d.node, req, f"drain of node {node}"):
                stuck = True
        return Result(requeue_after=10.0 if stuck else 2.0) if mine else None

    def _pending_status_keep_phase(self, vm: compute_pb2.VM, status_kv: KV | None, message: str) -> None:
        """Say why a drain is stuck, without touching what its agent reports."""
        if vm.status.message == message or status_kv is None:
            return
        st = compute_pb2.VMStatus()
        st.CopyFrom(vm.status)
        st.message = message
        try:
            self.store.update(VM.status_key(vm.metadata.name), K.to_json(st), status_kv.mod_revision,
                              guards=[self.election.guard()])
        except Conflict:
            pass

    # -- HA -------------------------------------------------------------------------

    def _failover(self, node: str) -> Result | None:
        with self._lock:
            if "node-agent" in self.live.get(node, set()):
                return None  # it came back
            victims = sorted(((prio, name) for name, (n, _req, ha, prio) in self.vms.items()
                              if n == node and ha), key=lambda t: (-t[0], t[1]))
            storaged_live = "storaged" in self.live.get(node, set())
        waiting = []
        for _prio, name in victims:
            got = self._load(name)
            if got is None:
                continue
            vm, spec_kv, status_kv = got
            if vm.spec.node != node or not vm.spec.ha.enabled or vm.spec.power_state == STOPPED:
                continue
            t0 = time.monotonic()
            self._set_fence(vm, node, fenced=True, drop_replicas=not storaged_live)
            req, d = self._plan(vm, exclude=frozenset({node}))
            if d.node is None:
                self._pending_status(vm, status_kv, f"HA: node {node} is down; cannot restart: {d.reason}")
                waiting.append(name)
                continue
            if self._bind(vm, spec_kv, d.node, req, f"HA: node {node} is down"):
                self.failovers += 1
                log.warning("HA: vm %s moved from dead node %s to %s (fence + bind %.0f ms)", name, node,
                            d.node, (time.monotonic() - t0) * 1000)
            else:
                waiting.append(name)
        return Result(requeue_after=5.0) if waiting else None

    def _set_fence(self, vm: compute_pb2.VM, node: str, fenced: bool, drop_replicas: bool = False) -> None:
        """Fence ``node`` from the VM's volumes (or lift that): generation bump
        with the node in (out of) ``fenced``, and out of the replica sets if
        its storage daemon is gone too; one CAS per extent."""
        guard = self.election.guard()
        for vol in sorted({d.volume for d in vm.spec.disks if d.volume}):
            kvs, _ = self.store.list(X.volume_prefix(vol))
            for kv in kvs:
                for _attempt in range(5):
                    try:
                        rec = X.ExtentRecord.from_json(kv.value)
                    except X.BadRecord as exc:
                        log.error("cannot fence %s: %s", kv.key, exc)
                        break
                    if fenced:
                        new = rec if node in rec.fenced else rec.fence(node)
                    else:
                        new = rec.unfence(node) if node in rec.fenced else rec
                    lost = rec.holds(node)
                    if drop_replicas and lost is not None and len(new.replicas) > 1:
                        new = new.without([lost], f"node {node} is down (HA fencing)")
                    if new == rec:
                        break
                    try:
                        self.store.update(kv.key, new.to_json(), kv.mod_revision, guards=[guard])
                        break
                    except Conflict:
                        kv = self.store.get(kv.key)
                        if kv is None:
                            break
