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

from braid import kinds as K
from braid.reconcile import Result
from braid.store import Store
from braid.v1 import compute_pb2
from node_agent import domain_xml
from node_agent.hypervisor import Domain, Hypervisor, HypervisorError

log = logging.getLogger("braid.node_agent.vms")

KIND = K.KINDS["vm"]
RUNNING, STOPPED, PAUSED = compute_pb2.RUNNING, compute_pb2.STOPPED, compute_pb2.PAUSED


@dataclass(frozen=True)
class Action:
    op: str            # define | start | start_paused | shutdown | destroy | undefine
                       # | suspend | resume | set_vcpus | set_memory
    arg: int = 0


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    requeue_after: float | None = None
    phase: str = ""
    message: str = ""


def plan(vm: compute_pb2.VM | None, node: str, dom: Domain | None,
         shutdown_since: float | None, now: float, shutdown_timeout: float,
         fenced: bool = False) -> Plan:
    """What to do for one VM on this node. Pure: no I/O.

    ``shutdown_since`` is when an ACPI shutdown was requested (None if not):
    after ``shutdown_timeout`` seconds the domain is powered off.
    """
    mine = vm is not None and vm.spec.node == node
    if not mine:
        if dom is None:
            return Plan()
        acts = [Action("destroy")] if dom.state != "shutoff" else []
        return Plan(acts + [Action("undefine")], phase="Removed")
    if fenced:
        # self-fenced: etcd is unreachable, another node may run this VM now
        acts = [Action("destroy")] if dom is not None and dom.state != "shutoff" else []
        return Plan(acts, phase="Fenced", message="node lost its etcd lease; VM stopped")
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
    if dom.vcpus != vm.spec.vcpus:
        out.append(Action("set_vcpus", vm.spec.vcpus))
    if abs(dom.memory_mib - vm.spec.memory_mib) > 1:
        out.append(Action("set_memory", vm.spec.memory_mib))
    return out


class VMReconciler:
    def __init__(self, store: Store, hv: Hypervisor, node: str, ctx: domain_xml.HostContext,
                 shutdown_timeout: float = 30.0):
        self.store = store
        self.hv = hv
        self.node = node
        self.ctx = ctx
        self.shutdown_timeout = shutdown_timeout
        self.fenced = False
        self._shutdown_since: dict[str, float] = {}

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
        p = plan(vm, self.node, dom, self._shutdown_since.get(name), time.monotonic(),
                 self.shutdown_timeout, self.fenced)
        error = ""
        for act in p.actions:
            try:
                self._execute(act, name, vm)
            except (HypervisorError, ValueError) as exc:
                error = str(exc)
                log.warning("vm %s: %s failed: %s", name, act.op, exc)
                break
        if vm is None or vm.spec.node != self.node:
            self._shutdown_since.pop(name, None)
            return None
        if (vm.spec.power_state or RUNNING) != STOPPED:
            self._shutdown_since.pop(name, None)
        self._write_status(vm, self.hv.domain(name), p, error)
        if error:
            raise HypervisorError(error)  # retried with backoff; the status shows it
        return Result(requeue_after=p.requeue_after) if p.requeue_after else None

    def _execute(self, act: Action, name: str, vm) -> None:
        hv = self.hv
        if act.op == "define":
            hv.define(domain_xml.build_domain(vm, self.ctx))
        elif act.op == "start":
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

    def _write_status(self, vm, dom: Domain | None, p: Plan, error: str) -> None:
        st = compute_pb2.VMStatus(node=self.node, observed_generation=vm.metadata.generation)
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
            self.store.put(KIND.status_key(vm.metadata.name), K.to_json(st))

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
