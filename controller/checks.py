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


def _exists(store: Store, kind: str, name: str) -> bool:
    return store.get(K.KINDS[kind].spec_key(name)) is not None


def vm_problems(store: Store, vm: compute_pb2.VM, old: compute_pb2.VM | None) -> list[FieldError]:
    """What stops ``vm`` from being run as specified (checked on create, and
    on update only for what the update changes)."""
    s = vm.spec
    out: list[FieldError] = []
    changed = old is None or old.spec.node != s.node or old.spec.max_memory_mib != s.max_memory_mib
    if s.node and changed:
        node = store.get(K.KINDS["node"].status_key(s.node))
        if node is None and not _exists(store, "node", s.node):
            out.append(FieldError("spec.node", f"node {s.node!r} does not exist"))
        elif node is not None:
            try:
                status = K.from_json(node.value, K.KINDS["node"].status_message(), node.key)
            except K.CorruptObject:
                return out  # its agent rewrites it; nothing to check against now
            have = status.allocatable.memory_bytes >> 20
            if have and s.max_memory_mib > have:
                out.append(FieldError(
                    "spec.max_memory_mib",
                    f"{s.max_memory_mib} MiB is more than node {s.node!r} can give "
                    f"({have} MiB allocatable)"))
    if s.node and old is not None and old.spec.node and old.spec.node != s.node \
            and store.get(f"node/live/{s.node}/node-agent") is None:
        out.append(FieldError("spec.node", f"cannot move to node {s.node!r}: it is not Ready"))
    old_volumes = {d.volume for d in old.spec.disks} if old else set()
    for i, d in enumerate(s.disks):
        if d.volume and d.volume not in old_volumes and not _exists(store, "volume", d.volume):
            out.append(FieldError(f"spec.disks[{i}].volume", f"volume {d.volume!r} does not exist"))
    old_networks = {n.network for n in old.spec.nics} if old else set()
    for i, n in enumerate(s.nics):
        if n.network and n.network not in old_networks and not _exists(store, "network", n.network):
            out.append(FieldError(f"spec.nics[{i}].network", f"network {n.network!r} does not exist"))
    return out


CHECKS = {"vm": vm_problems}


def problems(store: Store, kind: K.Kind, obj: Message, old: Message | None) -> list[FieldError]:
    check = CHECKS.get(kind.name)
    return check(store, obj, old) if check else []
