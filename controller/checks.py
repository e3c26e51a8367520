"""Prerequisite checks of the API (no side effects): does what an object
refers to exist, and can the node it names hold it? Failures are
FAILED_PRECONDITION with the field at fault: the request is well-formed but
the cluster cannot take it as it is."""

from __future__ import annotations

from google.protobuf.message import Message

from braid import kinds as K
from braid.store import Store
from braid.v1 import compute_pb2
from braid.validation import FieldError


def vm_problems(store: Store, vm: compute_pb2.VM, old: compute_pb2.VM | None) -> list[FieldError]:
    """What stops ``vm`` from being run as specified (checked on create, and
    on update only for what the update changes). One atomic etcd read."""
    s = vm.spec
    node_kind = K.KINDS["node"]
    changed = old is None or old.spec.node != s.node or old.spec.max_memory_mib != s.max_memory_mib
    moved = bool(s.node and old is not None and old.spec.node and old.spec.node != s.node)
    old_volumes = {d.volume for d in old.spec.disks} if old else set()
    old_networks = {n.network for n in old.spec.nics} if old else set()
    volumes = [(i, d.volume) for i, d in enumerate(s.disks)
               if d.volume and d.volume not in old_volumes]
    networks = [(i, n.network) for i, n in enumerate(s.nics)
                if n.network and n.network not in old_networks]
    keys = [K.KINDS["volume"].spec_key(v) for _, v in volumes]
    keys += [K.KINDS["network"].spec_key(n) for _, n in networks]
    if s.node:
        keys += [node_kind.status_key(s.node), node_kind.spec_key(s.node),
                 f"node/live/{s.node}/node-agent"]
    if not keys:
        return []
    got, _ = store.get_many(keys)
    out: list[FieldError] = []
    if s.node and changed:
        status_kv = got[node_kind.status_key(s.node)]
        if status_kv is None and got[node_kind.spec_key(s.node)] is None:
            out.append(FieldError("spec.node", f"node {s.node!r} does not exist"))
        elif status_kv is not None:
            try:
                status = K.from_json(status_kv.value, node_kind.status_message(), status_kv.key)
                have = status.allocatable.memory_bytes >> 20
            except K.CorruptObject:
                have = 0  # its agent rewrites it; nothing to check against now
            if have and s.max_memory_mib > have:
                out.append(FieldError(
                    "spec.max_memory_mib",
                    f"{s.max_memory_mib} MiB is more than node {s.node!r} can give "
                    f"({have} MiB allocatable)"))
    if moved and got[f"node/live/{s.node}/node-agent"] is None:
        out.append(FieldError("spec.node", f"cannot move to node {s.node!r}: it is not Ready"))
    for i, v in volumes:
        if got[K.KINDS["volume"].spec_key(v)] is None:
            out.append(FieldError(f"spec.disks[{i}].volume", f"volume {v!r} does not exist"))
    for i, n in networks:
        if got[K.KINDS["network"].spec_key(n)] is None:
            out.append(FieldError(f"spec.nics[{i}].network", f"network {n!r} does not exist"))
    return out


def volume_problems(store: Store, vol: Message, old: Message | None) -> list[FieldError]:
    """A volume grows but never shrinks (the guest's data would be cut off);
    its replica count and extent size are fixed at creation (changing them
    means moving data: rebuilds, a later storage issue)."""
    if old is None:
        return []
    out = []
    if vol.spec.size_bytes < old.spec.size_bytes:
        out.append(FieldError("spec.size_bytes", f"a volume cannot shrink ({old.spec.size_bytes} -> "
                                                 f"{vol.spec.size_bytes} bytes)"))
    if vol.spec.replicas != old.spec.replicas:
        out.append(FieldError("spec.replicas", "cannot be changed after creation"))
    if vol.spec.extent_size_bytes != old.spec.extent_size_bytes:
        out.append(FieldError("spec.extent_size_bytes", "cannot be changed after creation"))
    return out


CHECKS = {"vm": vm_problems, "volume": volume_problems}


def problems(store: Store, kind: K.Kind, obj: Message, old: Message | None) -> list[FieldError]:
    check = CHECKS.get(kind.name)
    return check(store, obj, old) if check else []
