"""Network reconciler of the controller: allocates each Network's VXLAN VNI.

Runs only on the controller replica that leads the ``controller`` election;
every write carries the election guard. Allocations live in etcd as
``ipam/vni/<vni>`` -> network name, claimed with create-if-absent, so two
networks can never get one VNI, even across controller failovers.

Level-triggered: ``reconcile(name)`` re-reads the spec, the status and the
allocations and converges; the informer only enqueues names.
"""

from __future__ import annotations

import logging

from braid import keys
from braid import kinds as K
from braid.reconcile import Controller, Result
from braid.store import KV, AlreadyExists, Election, Informer, Store
from braid.v1 import network_pb2

log = logging.getLogger("braid.controller.networks")

VNI_MIN = 1000          # below: left for operators' static VNIs
VNI_MAX = (1 << 24) - 1
KIND = K.KINDS["network"]


def port_nodes(ports: dict[str, network_pb2.Port], vm_nodes: dict[str, str]) -> dict[str, set[str]]:
    """Pure: network -> the nodes its ports are bound to (a port's own node, or
    its VM's)."""
    out: dict[str, set[str]] = {}
    for p in ports.values():
        node = p.spec.node or vm_nodes.get(p.spec.vm, "")
        if node:
            out.setdefault(p.spec.network, set()).add(node)
    return out


def choose_vni(requested: int, current: int, taken: dict[int, str], name: str) -> tuple[int, str]:
    """Pure planner: which VNI ``name`` should hold. Returns (vni, error);
    vni 0 with an error when the requested one belongs to another network."""
    if requested:
        owner = taken.get(requested)
        if owner not in (None, name):
            return 0, f"VNI {requested} is already used by network {owner!r}"
        return requested, ""
    if current and taken.get(current) == name:
        return current, ""
    mine = sorted(v for v, owner in taken.items() if owner == name)
    if mine:
        return mine[0], ""
    vni = VNI_MIN
    while vni in taken:
        vni += 1
    if vni > VNI_MAX:
        return 0, "no free VNI left"
    return vni, ""


class NetworkReconciler:
    def __init__(self, store: Store, election: Election):
        self.store = store
        self.election = election
        self.controller = Controller("networks", self.reconcile, workers=1, resync_period=30.0,
                                     list_keys=self._names)
        self.informer = Informer(store, "network/", self._on_change, name="networks")
        # where a network's ports are (status.nodes): ports and the VMs they belong to
        self.ports = Informer(store, keys.spec_prefix("port"), self._on_port, name="networks-ports")
        self.vms = Informer(store, keys.spec_prefix("vm"), self._on_port, name="networks-vms")

    def _names(self):
        return sorted({k.split("/", 2)[2] for k in self.informer.keys() if k.count("/") == 2})

    def _on_change(self, key: str, kv: KV | None) -> None:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[1] in ("spec", "status"):
            self.controller.enqueue(parts[2])

    def _on_port(self, key: str, kv: KV | None) -> None:
        for name in self._names():
            self.controller.enqueue(name)

    def _nodes(self) -> dict[str, set[str]]:
        ports, vm_nodes = {}, {}
        for inf, kind in ((self.ports, "port"), (self.vms, "vm")):
            for key in inf.keys():
                kv = inf.get(key)
                if kv is None:
                    continue
                try:
                    obj = K.from_json(kv.value, K.KINDS[kind].message, key)
                except K.CorruptObject:
                    continue
                if kind == "port":
                    ports[key] = obj
                else:
                    vm_nodes[key.rsplit("/", 1)[1]] = obj.spec.node
        return port_nodes(ports, vm_nodes)

    def start(self) -> None:
        self.controller.start()
        for inf in (self.informer, self.ports, self.vms):
            inf.start()

    def stop(self) -> None:
        for inf in (self.informer, self.ports, self.vms):
            inf.request_stop()
        for inf in (self.informer, self.ports, self.vms):
            inf.stop()
        self.controller.stop()

    def _taken(self) -> dict[int, str]:
        kvs, _ = self.store.list(keys.VNI)
        out = {}
        for kv in kvs:
            try:
                out[int(kv.key.rsplit("/", 1)[1])] = kv.value.decode()
            except (ValueError, UnicodeDecodeError):
                log.warning("ignoring malformed VNI allocation %s", kv.key)
        return out

    def reconcile(self, name: str) -> Result | None:
        if not self.election.is_leader:
            return None
        guard = self.election.guard()
        spec_kv = self.store.get(KIND.spec_key(name))
        status_kv = self.store.get(KIND.status_key(name))
        taken = self._taken()
        if spec_kv is None:
            released = False
            for vni, owner in taken.items():  # network deleted: release its VNIs
                if owner == name:
                    self.store.delete(keys.vni(vni), guards=[guard])
                    released = True
            if status_kv is not None:
                self.store.delete(KIND.status_key(name), guards=[guard])
            if released:  # a network waiting for that VNI may proceed now
                for other in self._names():
                    self.controller.enqueue(other)
            return None
        try:
            net = K.assemble(KIND, name, spec_kv, status_kv)
        except K.CorruptObject as exc:
            log.warning("network %s: %s", name, exc)
            return None
        vni, error = choose_vni(net.spec.vni, net.status.vni, taken, name)
        if vni and taken.get(vni) != name:
            try:
                self.store.create(keys.vni(vni), name.encode(), guards=[guard])
            except AlreadyExists:
                return Result(requeue_after=0.05)  # lost a race: plan again
        for old, owner in taken.items():  # release VNIs no longer wanted
            if owner == name and old != vni:
                self.store.delete(keys.vni(old), guards=[guard])
        status = network_pb2.NetworkStatus()
        status.CopyFrom(net.status)
        status.vni = vni
        status.phase = "Ready" if vni else "Error"
        status.message = error
        del status.nodes[:]
        status.nodes.extend(sorted(self._nodes().get(name, ())))
        status.observed_generation = net.metadata.generation
        if status != net.status or status_kv is None:
            self.store.put(KIND.status_key(name), K.to_json(status), guards=[guard])
            if error:
                log.warning("network %s: %s", name, error)
        return None
