"""The node agent's VM reconciler: level-triggered, one VM per key.

``reconcile(name)`` reads the VM from etcd and the domain from libvirt (never
from a cache), asks the pure planner ``plan`` what to do, executes the
actions through the hypervisor adapter and writes the VM's status.

Ownership: a VM belongs to this node when ``spec.node`` names it (the
scheduler issue will bind VMs; until then the spec carries the node). A
domain of this node whose VM is gone or now belongs elsewhere is powered
off and undefined.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from braid import extents, keys
from braid import kinds as K
from braid.reconcile import Result
from braid.store import AlreadyExists, Conflict, Guard, NotFound, Store
from braid.v1 import compute_pb2, node_pb2
from node_agent import domain_xml
from node_agent.hypervisor import Domain, Hypervisor, HypervisorError, device_xml

log = logging.getLogger("braid.node_agent.vms")

KIND = K.KINDS["vm"]
RUNNING, STOPPED, PAUSED = compute_pb2.RUNNING, compute_pb2.STOPPED, compute_pb2.PAUSED


class StatusRace(Exception):
    """Someone else wrote the VM's status since we read it."""


@dataclass(frozen=True)
class Action:
    op: str            # define | start | start_paused | shutdown | destroy | undefine
                       # | suspend | resume | set_vcpus | set_memory | migrate
                       # | attach_disk | detach_disk | attach_nic | detach_nic
    arg: int = 0
    ref: str = ""      # the device (disk target dev, NIC tap) of attach/detach


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    requeue_after: float | None = None
    phase: str = ""
    message: str = ""
    hands_off: bool = False   # another node holds the VM: its status is theirs to write


def plan(vm: compute_pb2.VM | None, node: str, dom: Domain | None,
         shutdown_since: float | None, now: float, shutdown_timeout: float,
         fenced: bool = False, can_migrate: bool = False, held_by: str = "") -> Plan:
    """What to do for one VM on this node. Pure: no I/O.

    ``shutdown_since`` is when an ACPI shutdown was requested (None if not):
    after ``shutdown_timeout`` seconds the domain is powered off.
    ``can_migrate``: the node the VM now belongs to takes live migrations.
    ``held_by``: another live node that still holds the VM (status.node):
    nothing may start it here until that node released it or migrated it
    here, so a VM never runs on two nodes at once.
    """
    mine = vm is not None and vm.spec.node == node
    if not mine:
        if dom is None:
            return Plan()
        if vm is not None and vm.status.node not in ("", node) and vm.status.migration.phase == "Running" \
                and vm.status.migration.target_node == node:
            # an incoming migration that is being cancelled: libvirt removes its domain here
            return Plan(phase="Migrating", message="incoming migration cancelled", hands_off=True)
        if vm is not None and can_migrate and dom.state in ("running", "paused") and not fenced \
                and vm.status.node in ("", node):
            # a move requested while it runs here: live-migrate. (When another node
            # already runs it, e.g. HA restarted it there, this copy is stale: destroy.)
            return Plan([Action("migrate")], phase="Migrating")
        acts = [Action("destroy")] if dom.state != "shutoff" else []
        return Plan(acts + [Action("undefine")], phase="Removed")
    if fenced:
        # self-fenced: etcd is unreachable, another node may run this VM now
        acts = [Action("destroy")] if dom is not None and dom.state != "shutoff" else []
        return Plan(acts, phase="Fenced", message="node lost its etcd lease; VM stopped")
    if held_by and vm.status.migration.phase == "Running" and vm.status.migration.target_node == node:
        # incoming live migration: the domain here is libvirt's, not ours yet
        return Plan(phase="Migrating", message=f"arriving from node {held_by}", hands_off=True)
    if dom is None and held_by:
        return Plan(phase="Pending", message=f"waiting for node {held_by} to release it",
                    hands_off=True)
    want = vm.spec.power_state or RUNNING
    p = Plan()
    if dom is None or dom.generation != vm.metadata.generation:
        p.actions.append(Action("define"))  # new or changed spec: (re)define config
    state = dom.state if dom is not None else "shutoff"
    if want == RUNNING:
        if state in ("shutoff", "crashed"):
            p.actions.append(Action("start"))
        elif state == "paused":
            p.actions.append(Action("resume"))
        if state in ("running", "paused"):
            p.actions += _live_changes(vm, dom)
        p.phase = "Running"
    elif want == PAUSED:
        if state in ("shutoff", "crashed"):
            p.actions.append(Action("start_paused"))
        elif state == "running":
            p.actions.append(Action("suspend"))
        p.phase = "Paused"
    else:  # STOPPED
        if state in ("running", "paused"):
            if shutdown_since is None:
                p.actions.append(Action("shutdown"))
                p.requeue_after = min(2.0, shutdown_timeout)
                p.phase = "Stopping"
            elif now - shutdown_since >= shutdown_timeout:
                p.actions.append(Action("destroy"))
                p.phase = "Stopped"
                p.message = f"guest ignored ACPI shutdown for {shutdown_timeout:.0f}s; powered off"
            else:
                p.requeue_after = min(2.0, shutdown_timeout - (now - shutdown_since))
                p.phase = "Stopping"
        else:
            p.phase = "Stopped"
    return p


def _live_changes(vm: compute_pb2.VM, dom: Domain) -> list[Action]:
    out = []
    want_disks = [d.name for d in vm.spec.disks]
    out += [Action("detach_disk", ref=d) for d in dom.disks if d not in want_disks]
    out += [Action("attach_disk", ref=d) for d in want_disks if d not in dom.disks]
    want_nics = [domain_xml.tap_name(vm.metadata.name, n.name or f"eth{i}")
                 for i, n in enumerate(vm.spec.nics)]
    out += [Action("detach_nic", ref=t) for t in dom.nics if t not in want_nics]
    out += [Action("attach_nic", ref=t) for t in want_nics if t not in dom.nics]
    if dom.vcpus != vm.spec.vcpus:
        out.append(Action("set_vcpus", vm.spec.vcpus))
    if abs(dom.memory_mib - vm.spec.memory_mib) > 1:
        out.append(Action("set_memory", vm.spec.memory_mib))
    return out


class VMReconciler:
    def __init__(self, store: Store, hv: Hypervisor, node: str, ctx: domain_xml.HostContext,
                 shutdown_timeout: float = 30.0, migration_bandwidth: int = 0):
        self.store = store
        self.hv = hv
        self.node = node
        self.ctx = ctx
        self.shutdown_timeout = shutdown_timeout
        self.fenced = False
        self._shutdown_since: dict[str, float] = {}
        self._last_migration: dict[str, dict] = {}
        self.migration_bandwidth = migration_bandwidth

    def reconcile(self, name: str) -> Result | None:
        spec_kv, status_kv = (self.store.get_many([KIND.spec_key(name), KIND.status_key(name)])[0]
                              .values())
        vm = None
        if spec_kv is not None:
            try:
                vm = K.assemble(KIND, name, spec_kv, status_kv)
            except K.CorruptObject as exc:
                log.warning("vm %s: %s", name, exc)
                return None
        dom = self.hv.domain(name)
        target = None
        if vm is not None and vm.spec.node and vm.spec.node != self.node and dom is not None:
            target = self._migration_target(vm.spec.node)
        held_by = ""
        if vm is not None and vm.status.node not in ("", self.node) and self.store.get(
                keys.live(vm.status.node, "node-agent")) is not None:
            held_by = vm.status.node
        p = plan(vm, self.node, dom, self._shutdown_since.get(name), time.monotonic(),
                 self.shutdown_timeout, self.fenced, can_migrate=target is not None,
                 held_by=held_by)
        error = ""
        if p.actions:
            log.info("vm %s: %s", name, " ".join(a.op for a in p.actions))
        for act in p.actions:
            try:
                self._execute(act, name, vm)
            except (HypervisorError, ValueError) as exc:
                error = str(exc)
                log.warning("vm %s: %s failed: %s", name, act.op, exc)
                break
        if vm is not None and p.actions and p.actions[0].op == "migrate":
            phase = "Completed"
            if error:
                phase = "Cancelled" if "cancel" in error.lower() else "Failed"
            self._migration_status(vm, target, phase, error)
        if vm is None or vm.spec.node != self.node:
            self._shutdown_since.pop(name, None)
            if error:
                raise HypervisorError(error)
            if vm is not None and any(a.op == "undefine" for a in p.actions) \
                    and vm.status.node == self.node:
                # cold move: tell the new node it may start the VM now
                st = compute_pb2.VMStatus()
                st.CopyFrom(vm.status)
                st.node, st.phase, st.power_state = "", "Pending", STOPPED
                st.message = f"released by node {self.node}"
                self.store.put(KIND.status_key(name), K.to_json(st))
            return None
        if (vm.spec.power_state or RUNNING) != STOPPED:
            self._shutdown_since.pop(name, None)
        if p.hands_off:
            return Result(requeue_after=2.0)  # also woken by the holder's status writes
        try:
            self._write_status(vm, self.hv.domain(name), p, error)
        except StatusRace:
            return Result(requeue_after=0.05)  # read it again and converge
        if error:
            raise HypervisorError(error)  # retried with backoff; the status shows it
        return Result(requeue_after=p.requeue_after) if p.requeue_after else None

    def _execute(self, act: Action, name: str, vm) -> None:
        hv = self.hv
        if act.op == "define":
            hv.define(domain_xml.build_domain(vm, self.ctx))
        elif act.op == "start":
            # the node a VM is bound to may have been fenced from its volumes by an
            # earlier HA failover (or a move): lift that before the VM writes
            volumes = [d.volume for d in vm.spec.disks if d.volume]
            if volumes and extents.unfence(self.store, volumes, self.node):
                log.info("vm %s: lifted this node's fence on %s", name, ", ".join(volumes))
            hv.start(name)
        elif act.op == "start_paused":
            hv.start(name, paused=True)
        elif act.op == "shutdown":
            hv.shutdown(name)
            self._shutdown_since[name] = time.monotonic()
        elif act.op == "destroy":
            hv.destroy(name)
            self._shutdown_since.pop(name, None)
        elif act.op == "undefine":
            hv.undefine(name)
        elif act.op == "migrate":
            self._migrate(name, vm)
        elif act.op in ("attach_disk", "attach_nic"):
            hv.attach_live(name, self._device_from_spec(vm, act))
        elif act.op in ("detach_disk", "detach_nic"):
            dom = hv.domain(name)
            kind = "disk" if act.op == "detach_disk" else "interface"
            xml = device_xml(dom.xml, kind, act.ref) if dom is not None else None
            if xml is not None:
                hv.detach_live(name, xml)
        elif act.op == "suspend":
            hv.suspend(name)
        elif act.op == "resume":
            hv.resume(name)
        elif act.op == "set_vcpus":
            hv.set_vcpus(name, act.arg)
        elif act.op == "set_memory":
            hv.set_memory(name, act.arg)
        else:
            raise ValueError(f"unknown action {act.op}")

    def _device_from_spec(self, vm, act: Action) -> str:
        if act.op == "attach_disk":
            disk = next(d for d in vm.spec.disks if d.name == act.ref)
            return domain_xml.disk_xml(disk, self.ctx)
        for i, nic in enumerate(vm.spec.nics):
            n = compute_pb2.VMNic()
            n.CopyFrom(nic)
            n.name = n.name or f"eth{i}"
            if domain_xml.tap_name(vm.metadata.name, n.name) == act.ref:
                return domain_xml.nic_xml(n, self.ctx, vm.metadata.name)
        raise ValueError(f"no NIC of {vm.metadata.name} has tap {act.ref}")

    # -- live migration ------------------------------------------------------------

    def _migration_target(self, node: str) -> node_pb2.DaemonStatus | None:
        """The target's node agent, if it is alive and takes migrations."""
        kv = self.store.get(keys.live(node, "node-agent"))
        if kv is None:
            return None
        try:
            info = K.from_json(kv.value, node_pb2.DaemonStatus, kv.key)
        except K.CorruptObject:
            return None
        return info if info.migration_uri and info.owner else None

    def _migrate(self, name: str, vm: compute_pb2.VM) -> None:
        target = self._migration_target(vm.spec.node)
        if target is None:
            raise HypervisorError(f"node {vm.spec.node} does not take live migrations")
        dest_xml = domain_xml.retarget(self.hv.migratable_xml(name), target.owner,
                                       self.node, vm.spec.node)
        started = time.monotonic()
        self._migration_status(vm, target, "Running", "")

        def progress(stats: dict) -> None:
            self._migration_status(vm, target, "Running", "", stats)

        def cancelled() -> bool:
            cur = self.store.get(KIND.spec_key(name))
            if cur is None:
                return True
            try:
                return K.from_json(cur.value, KIND.message, cur.key).spec.node != vm.spec.node
            except K.CorruptObject:
                return False

        stats = self.hv.migrate(name, target.migration_uri, dest_xml, progress, cancelled,
                                bandwidth_mib=self.migration_bandwidth)
        log.info("vm %s migrated to %s in %.2fs", name, vm.spec.node, time.monotonic() - started)
        self._last_migration[name] = stats

    def _migration_status(self, vm, target, phase: str, message: str, stats: dict | None = None):
        """Record migration progress in the VM's status: read-modify-write
        with compare-and-set, since the target node writes that status too."""
        stats = stats or self._last_migration.pop(vm.metadata.name, None) or {}
        key = KIND.status_key(vm.metadata.name)
        for _ in range(10):
            kv = self.store.get(key)
            st = compute_pb2.VMStatus()
            if kv is not None:
                try:
                    st = K.from_json(kv.value, compute_pb2.VMStatus, key)
                except K.CorruptObject:
                    pass
            m = st.migration
            if m.target_node != vm.spec.node:
                m.Clear()
            m.target_node = vm.spec.node
            m.phase = phase
            m.message = message
            if "data_remaining" in stats:
                m.data_remaining_bytes = stats["data_remaining"]
                m.data_total_bytes = stats.get("data_total", 0)
            if "downtime" in stats:
                m.downtime_ms = stats["downtime"]
            if phase == "Running" and st.node == self.node:
                st.phase = "Migrating"
            try:
                if kv is None:
                    self.store.create(key, K.to_json(st))
                else:
                    self.store.update(key, K.to_json(st), kv.mod_revision)
                return
            except (Conflict, AlreadyExists):
                continue
        log.warning("vm %s: could not record migration %s (status kept changing)",
                    vm.metadata.name, phase)

    def _write_status(self, vm, dom: Domain | None, p: Plan, error: str) -> None:
        st = compute_pb2.VMStatus(node=self.node, observed_generation=vm.metadata.generation)
        st.migration.CopyFrom(vm.status.migration)  # the last migration stays visible
        if dom is not None:
            st.power_state = {"running": RUNNING, "paused": PAUSED}.get(dom.state, STOPPED)
            st.console_path = self.ctx.console_log(vm.metadata.name)
        else:
            st.power_state = STOPPED
        st.phase = "Failed" if error else (p.phase or "Pending")
        st.message = error or p.message
        if dom is not None and p.phase == "Running" and dom.state != "running" and not error:
            st.phase = "Starting"
        if st != vm.status:
            # compare-and-set: during a migration the other node writes it too
            # and only while the VM still exists (no orphan status after a delete)
            key = KIND.status_key(vm.metadata.name)
            alive = [Guard(KIND.spec_key(vm.metadata.name), vm.metadata.create_revision)]
            try:
                if vm.metadata.status_revision:
                    self.store.update(key, K.to_json(st), vm.metadata.status_revision, guards=alive)
                else:
                    self.store.create(key, K.to_json(st), guards=alive)
            except (Conflict, AlreadyExists, NotFound):
                raise StatusRace(f"status of {vm.metadata.name} changed meanwhile") from None

    def fence(self) -> None:
        """Lease lost: power off every VM of this node at once (self-fencing)."""
        self.fenced = True
        for name, dom in self.hv.list_domains().items():
            if dom.state != "shutoff":
                try:
                    self.hv.destroy(name)
                    log.warning("self-fencing: powered off %s", name)
                except HypervisorError as exc:
                    log.error("self-fencing: could not power off %s: %s", name, exc)

    def unfence(self) -> None:
        self.fenced = False
