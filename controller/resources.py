"""The resource API's domain logic: validate, default, read and write objects.

One generic implementation serves every kind (CRUD + watch); the gRPC layer
(controller/api.py) only decodes, calls one function here and encodes.
Errors are ``ApiError`` with a gRPC status code.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import grpc
from google.protobuf.message import Message

from braid import keys, validation
from braid import kinds as K
from braid.store import (
    KV,
    AlreadyExists,
    Compacted,
    Conflict,
    NotFound,
    Store,
    StoreError,
    Unavailable,
)
from braid.v1 import meta_pb2
from controller import checks, ipam
from controller.watchhub import KindHub, Overflow

log = logging.getLogger("braid.controller.resources")

MAX_SELECTOR = 1024
VM_LABEL = "braid.io/vm"   # on ports made for a VM's NICs

# which code a request gets when its problems call for several (the first)
_PRECEDENCE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED,
               grpc.StatusCode.ABORTED)


@dataclass
class ApiError(Exception):
    code: grpc.StatusCode
    message: str
    violations: list[validation.FieldError] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def parse_selector(sel: str) -> dict[str, str]:
    if len(sel) > MAX_SELECTOR:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "label_selector: too long",
                       [validation.FieldError("label_selector", "too long")])
    out = {}
    for part in filter(None, (p.strip() for p in sel.split(","))):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"label_selector: {part!r} is not key=value",
                           [validation.FieldError("label_selector", f"{part!r} is not key=value")])
        out[k.strip()] = v.strip()
    return out


def _matches(obj: Message, selector: dict[str, str]) -> bool:
    return all(obj.metadata.labels.get(k) == v for k, v in selector.items())


def _exists(kind: K.Kind, st: dict) -> bool:
    """An object exists while its spec does; a node also while it reports."""
    if kind.name == "node":
        return st["spec"] is not None or st["status"] is not None or bool(st["live"])
    return st["spec"] is not None


def apply_defaults(kind: K.Kind, obj: Message) -> None:
    """Sane defaults, filled in on create and update."""
    s = obj.spec
    if kind.name == "vm":
        if not s.max_vcpus:
            s.max_vcpus = s.vcpus
        if not s.max_memory_mib:
            s.max_memory_mib = s.memory_mib
        if not s.power_state:
            s.power_state = 1  # RUNNING
        for d in s.disks:
            d.bus = d.bus or "virtio"
        for n in s.nics:
            n.model = n.model or "virtio"
        s.boot.firmware = s.boot.firmware or "bios"
    elif kind.name == "volume":
        s.replicas = s.replicas or 2
        s.extent_size_bytes = s.extent_size_bytes or 64 << 20
    elif kind.name == "network":
        s.mtu = s.mtu or 1450
    elif kind.name == "subnet":
        s.gateway = s.gateway or ipam.default_gateway(s.cidr)
    elif kind.name == "securitygroup":
        for r in s.rules:
            r.protocol = r.protocol or "any"
            r.ethertype = r.ethertype or "IPv4"


def _rejected(errs: list[validation.FieldError]) -> ApiError:
    """One ApiError for a request's problems: the code the most basic of them
    calls for (a plain FieldError: FAILED_PRECONDITION), with the problems
    of that code."""
    def code(e):
        return getattr(e, "code", grpc.StatusCode.FAILED_PRECONDITION)

    first = min((code(e) for e in errs),
                key=lambda c: _PRECEDENCE.index(c) if c in _PRECEDENCE else len(_PRECEDENCE))
    mine = [validation.FieldError(e.field, e.description) for e in errs if code(e) == first]
    return ApiError(first, "; ".join(str(e) for e in mine[:10]), mine)


def _store_errors(fn):
    """Map state-layer errors to API errors (one place)."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Unavailable as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except StoreError as exc:
            if isinstance(exc, (AlreadyExists, Conflict, NotFound)):
                raise
            raise ApiError(grpc.StatusCode.INTERNAL, str(exc)) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class Resources:
    """CRUD + watch of every kind over the store."""

    def __init__(self, store: Store, use_hub: bool = True):
        self.store = store
        self.use_hub = use_hub
        self._hubs: dict[str, KindHub] = {}
        self._hubs_lock = threading.Lock()

    # -- helpers -----------------------------------------------------------

    def _validate(self, kind: K.Kind, obj: Message) -> None:
        errs = validation.validate(kind.name, obj)
        if errs:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           "; ".join(str(e) for e in errs[:10]), errs)

    def _prerequisites(self, kind: K.Kind, obj: Message, old: Message | None) -> None:
        errs = checks.problems(self.store, kind, obj, old)
        if errs:
            raise _rejected(errs)

    def _name(self, name: str) -> None:
        errs = validation.Errors()
        errs.name("name", name)
        if errs:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(errs[0]), list(errs))

    def _live(self, name: str) -> list[KV]:
        kvs, _ = self.store.list(keys.live_prefix(name))
        return kvs

    def _read(self, kind: K.Kind, name: str) -> Message | None:
        kvs, rev = self.store.get_many([kind.spec_key(name), kind.status_key(name)])
        spec, status = kvs[kind.spec_key(name)], kvs[kind.status_key(name)]
        live = self._live(name) if kind.name == "node" else ()
        if not _exists(kind, {"spec": spec, "status": status, "live": live}):
            return None
        try:
            return K.assemble(kind, name, spec, status, live)
        except K.CorruptObject as exc:
            raise ApiError(grpc.StatusCode.DATA_LOSS, str(exc)) from None

    def _host_resources(self, vm: Message, old: Message | None) -> None:
        from braid.auth.authz import CURRENT, host_resource_problems
        ident = CURRENT.get()
        bad = host_resource_problems(ident, vm, old)
        if bad:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                           f"{ident} may not give a VM host resources ({', '.join(bad)}): "
                           "use Braid volumes and networks, or ask an admin",
                           [validation.FieldError(f, "host resources need the admin role") for f in bad])

    def _clone_defaults(self, vol: Message) -> None:
        """A clone without a size or extent size takes its snapshot's (and its replicas)."""
        snap_kind = K.KINDS["snapshot"]
        st = self.store.get(snap_kind.status_key(vol.spec.source_snapshot))
        if st is None:
            return   # the prerequisite check says what is wrong
        try:
            status = K.from_json(st.value, snap_kind.status_message(), st.key)
        except K.CorruptObject:
            return
        vol.spec.size_bytes = vol.spec.size_bytes or status.size_bytes
        vol.spec.extent_size_bytes = vol.spec.extent_size_bytes or status.extent_size_bytes
        vol.spec.replicas = vol.spec.replicas or status.replicas

    # -- CRUD ----------------------------------------------------------------

    @_store_errors
    def create(self, kind: K.Kind, obj: Message) -> Message:
        obj = type(obj).FromString(obj.SerializeToString())
        obj.ClearField("status")
        if kind.name == "volume" and obj.spec.source_snapshot:
            self._clone_defaults(obj)
        apply_defaults(kind, obj)
        self._validate(kind, obj)
        self._prerequisites(kind, obj, None)
        if kind.name == "vm":
            self._host_resources(obj, None)
        md = obj.metadata
        md.uid = str(uuid.uuid4())
        md.created_at = _now()
        md.generation = 1
        if kind.name == "vm" and self.store.get(kind.spec_key(md.name)) is not None:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS, f"vm {md.name!r} already exists")
        made = self._nic_ports(obj, None) if kind.name == "vm" else []
        stored = False
        try:
            if kind.name == "port":  # checked, allocated and created in one transaction
                rev = ipam.create_port(self.store, obj, lambda o: K.encode_spec(kind, o))
            else:
                rev = self.store.create(kind.spec_key(md.name), K.encode_spec(kind, obj))
            stored = True
        except AlreadyExists:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{kind.name} {md.name!r} already exists") from None
        except ipam.Rejected as exc:
            raise _rejected(exc.violations) from None
        except K.CorruptObject as exc:
            raise ApiError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        finally:
            if not stored:
                self._drop_ports(made)
        if kind.name == "node":
            return self.get(kind, md.name)  # a node may already report status
        md.resource_version = md.create_revision = rev
        return obj

    @_store_errors
    def get(self, kind: K.Kind, name: str) -> Message:
        self._name(name)
        obj = self._read(kind, name)
        if obj is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"{kind.name} {name!r} not found")
        return obj

    @_store_errors
    def list(self, kind: K.Kind, label_selector: str = "") -> tuple[list[Message], int, list[str]]:
        """Objects of a kind at one revision, plus the keys that did not decode."""
        selector = parse_selector(label_selector)
        kvs, rev = self.store.list(f"{kind.name}/")
        specs, statuses, live = {}, {}, {}
        for kv in kvs:
            part, _, rest = kv.key[len(kind.name) + 1:].partition("/")
            if part == "spec":
                specs[rest] = kv
            elif part == "status":
                statuses[rest] = kv
            elif part == "live" and kind.name == "node":
                live.setdefault(rest.split("/", 1)[0], []).append(kv)
        items, corrupt = [], []
        names = specs.keys() | statuses.keys() | live.keys() if kind.name == "node" else specs.keys()
        for name in sorted(names):
            try:
                obj = K.assemble(kind, name, specs.get(name), statuses.get(name), live.get(name, ()))
            except K.CorruptObject as exc:
                log.warning("skipping corrupt object: %s", exc)
                corrupt.append(name)
                continue
            if _matches(obj, selector):
                items.append(obj)
        return items, rev, corrupt

    @_store_errors
    def update(self, kind: K.Kind, obj: Message) -> Message:
        """Replace labels and spec. With metadata.resource_version set, only
        if the object is still at that revision (ABORTED otherwise)."""
        self._name(obj.metadata.name)
        name = obj.metadata.name
        key = kind.spec_key(name)
        current_kv = self.store.get(key)
        if current_kv is None:
            if kind.name == "node" and self._read(kind, name) is not None:
                # a registered node without an operator spec yet: the first
                # update creates it
                return self.create(kind, obj)
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"{kind.name} {name!r} not found")
        expected = obj.metadata.resource_version or current_kv.mod_revision
        try:
            current = K.from_json(current_kv.value, kind.message, key)
        except K.CorruptObject:
            current = kind.message()  # overwrite garbage with a valid object
            current.metadata.uid = str(uuid.uuid4())
            current.metadata.created_at = _now()
        new = kind.message()
        new.metadata.CopyFrom(current.metadata)
        new.metadata.name = name  # the key's: a repaired (garbage) value has none
        new.metadata.ClearField("labels")
        new.metadata.labels.update(obj.metadata.labels)
        new.spec.CopyFrom(obj.spec)
        if kind.name == "vm" and not new.spec.node and current.spec.node:
            # an update without a node (e.g. re-applying a manifest) keeps the
            # scheduler's binding; moving a VM names the new node
            new.spec.node = current.spec.node
        if kind.name == "port":
            # re-applying a manifest without (or with the same) MAC and
            # addresses keeps those allocated; changing them is refused
            ipam.keep_allocations(new.spec, current.spec)
        apply_defaults(kind, new)
        self._validate(kind, new)
        self._prerequisites(kind, new, current)
        if kind.name == "vm":
            self._host_resources(new, current)
        made = self._nic_ports(new, current) if kind.name == "vm" else []
        if new.spec != current.spec:
            new.metadata.generation = current.metadata.generation + 1
        try:
            self.store.update(key, K.encode_spec(kind, new), expected)
        except Conflict:
            self._drop_ports(made)
            raise ApiError(grpc.StatusCode.ABORTED,
                           f"{kind.name} {name!r} was modified concurrently "
                           f"(resource_version {expected} is stale): read it again and retry") from None
        except NotFound:
            self._drop_ports(made)
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"{kind.name} {name!r} not found") from None
        except BaseException:
            self._drop_ports(made)
            raise
        if kind.name == "vm":  # ports made for NICs that are gone
            kept = {n.port for n in new.spec.nics}
            self._drop_ports([n.port for n in current.spec.nics if n.port and n.port not in kept],
                             owner=name)
        return self.get(kind, name)

    # -- ports of VM NICs ------------------------------------------------------

    def _nic_ports(self, vm: Message, old: Message | None) -> list[str]:
        """Give every NIC on a network its port: the one it names (which must
        be on that network and not another NIC's), the one it had, or a new
        port ``<vm>-<nic>`` with allocated MAC and IP (labelled as the VM's,
        deleted with it). The NIC carries the port's MAC. Returns the ports
        made here (the caller removes them if the VM write fails)."""
        port_kind = K.KINDS["port"]
        had = {n.name or f"eth{i}": n for i, n in enumerate(old.spec.nics)} if old else {}
        vm_name = vm.metadata.name
        made: list[str] = []
        try:
            for i, nic in enumerate(vm.spec.nics):
                if not nic.network:
                    continue
                nic_name, f = nic.name or f"eth{i}", f"spec.nics[{i}]"
                prev = had.get(nic_name)
                if not nic.port and prev is not None and prev.network == nic.network and prev.port:
                    nic.port = prev.port   # re-applied manifest: keep the NIC's port
                if not nic.port:           # a port declared for this VM's NIC is its port
                    nic.port = self._port_of(vm_name, nic_name)
                if nic.port:
                    port = self._read(port_kind, nic.port)
                    if port is None:
                        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"{f}.port: port {nic.port!r} does not exist",
                                       [validation.FieldError(f"{f}.port", f"port {nic.port!r} does not exist")])
                    owner = (port.spec.vm, port.spec.nic or "eth0")
                    if port.spec.network != nic.network or (port.spec.vm and owner != (vm_name, nic_name)):
                        why = (f"is on network {port.spec.network!r}" if port.spec.network != nic.network
                               else f"belongs to vm {port.spec.vm!r} nic {port.spec.nic!r}")
                        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"{f}.port: port {nic.port!r} {why}",
                                       [validation.FieldError(f"{f}.port", f"port {nic.port!r} {why}")])
                    if not port.spec.vm:   # a free port: it is this NIC's now
                        port.spec.vm, port.spec.nic = vm_name, nic_name
                        port.ClearField("status")
                        port = self.update(port_kind, port)
                    nic.mac = port.spec.mac
                    continue
                port = port_kind.message()
                base = f"{vm_name}-{nic_name}"
                port.metadata.name = base if validation.NAME_RE.match(base) else f"{vm_name}-nic{i}"
                port.metadata.labels[VM_LABEL] = vm_name
                port.spec.network, port.spec.vm, port.spec.nic = nic.network, vm_name, nic_name
                port.spec.mac = nic.mac
                port.spec.security_groups.extend(nic.security_groups)
                created = self.create(port_kind, port)
                made.append(created.metadata.name)
                nic.port, nic.mac = created.metadata.name, created.spec.mac
        except BaseException:
            self._drop_ports(made)
            raise
        return made

    def _port_of(self, vm: str, nic: str) -> str:
        ports, _, _ = self.list(K.KINDS["port"])
        for p in ports:
            if p.spec.vm == vm and (p.spec.nic or "eth0") == nic:
                return p.metadata.name
        return ""

    def _drop_ports(self, names: list[str], owner: str = "") -> None:
        """Delete ports made for NICs (only those labelled as ``owner``'s when given)."""
        for name in names:
            try:
                if owner:
                    port = self._read(K.KINDS["port"], name)
                    if port is None or port.metadata.labels.get(VM_LABEL) != owner:
                        continue
                self.delete(K.KINDS["port"], name)
            except ApiError as exc:
                log.warning("port %s of a VM NIC: %s", name, exc)

    @_store_errors
    def delete(self, kind: K.Kind, name: str, resource_version: int = 0) -> int:
        self._name(name)
        if kind.name == "node" and self._live(name):
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"node {name!r} is running daemons; stop them before deleting it")
        blocker = checks.delete_blockers(self.store, kind, name)
        if blocker:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"cannot delete {kind.name} {name!r}: {blocker}")
        # a port's addresses are released in the same transaction
        release = ipam.owned_keys(self.store, name) if kind.name == "port" else []
        vm = None
        if kind.name == "vm":
            try:
                vm = self._read(kind, name)
            except ApiError:
                vm = None  # garbage in etcd: delete it all the same
        try:
            if kind.name == "node" and self.store.get(kind.spec_key(name)) is None:
                return self.store.delete(kind.status_key(name))
            rev = self.store.delete(kind.spec_key(name), resource_version,
                                    also=[kind.status_key(name), *release])
            if vm is not None:  # the ports made for its NICs go with it
                self._drop_ports([n.port for n in vm.spec.nics if n.port], owner=name)
            return rev
        except NotFound:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"{kind.name} {name!r} not found") from None
        except Conflict:
            raise ApiError(grpc.StatusCode.ABORTED,
                           f"{kind.name} {name!r} changed since resource_version "
                           f"{resource_version}: read it again and retry") from None

    # -- watch ---------------------------------------------------------------

    def _hub(self, kind: K.Kind) -> KindHub:
        with self._hubs_lock:
            hub = self._hubs.get(kind.name)
            if hub is None:
                hub = self._hubs[kind.name] = KindHub(self, kind)
        if not hub.synced.wait(10):
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"cannot list {kind.plural} from etcd")
        return hub

    def close(self) -> None:
        with self._hubs_lock:
            for hub in self._hubs.values():
                hub.stop()
            self._hubs.clear()

    def watch(self, kind: K.Kind, request: meta_pb2.WatchRequest,
              stop: threading.Event) -> Iterator[tuple[int, Message | None, int]]:
        """Yield (event type, object, revision); (SYNCED, None, rev) after the
        initial list; (0, None, 0) as a heartbeat so the caller can notice a
        cancelled client. Served by the kind's shared hub; a resume from a
        revision the hub no longer remembers watches etcd directly."""
        selector = parse_selector(request.label_selector)
        if request.name:
            self._name(request.name)

        def wanted(ev) -> bool:
            typ, obj, _ = ev
            if obj is None:
                return True
            return (not request.name or obj.metadata.name == request.name) and _matches(obj, selector)

        if not self.use_hub:
            yield from self._watch_etcd(kind, request, stop, selector)
            return
        sub = self._hub(kind).subscribe(request.resource_version)
        if sub is None:
            yield from self._watch_etcd(kind, request, stop, selector)
            return
        initial, subscriber = sub
        try:
            for ev in initial:
                if wanted(ev):
                    yield ev
            while not stop.is_set():
                try:
                    ev = subscriber.next(1.0)
                except Overflow:
                    raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   "this watch fell too far behind and was dropped: "
                                   "list again and watch from the list's revision") from None
                if ev is None:
                    yield 0, None, 0
                elif wanted(ev):
                    yield ev
        finally:
            self._hubs[kind.name].unsubscribe(subscriber)

    def _watch_etcd(self, kind, request, stop, selector):
        """A dedicated etcd watch for one client (resume from an old revision)."""
        state: dict[str, dict] = {}  # name -> {"spec": kv, "status": kv, "live": {key: kv}}
        complete = request.resource_version <= 0
        try:
            if request.resource_version <= 0:
                items, rev, _ = self.list(kind)
                kvs, _ = self.store.list(f"{kind.name}/", revision=rev)
                self._absorb(kind, state, kvs)
                for obj in items:
                    if (not request.name or obj.metadata.name == request.name) and _matches(obj, selector):
                        yield meta_pb2.ADDED, obj, rev
                yield meta_pb2.SYNCED, None, rev
                start = rev + 1
            else:
                start = request.resource_version + 1
            for batch in self.store.watch(f"{kind.name}/", start, stop):
                if not batch:
                    yield 0, None, 0
                    continue
                for ev in batch:
                    out = self._event(kind, state, ev, request.name, selector, complete)
                    if out is not None:
                        yield out
        except Compacted as exc:
            raise ApiError(grpc.StatusCode.OUT_OF_RANGE,
                           f"resource_version {request.resource_version} is too old ({exc}): "
                           "list again and watch from the list's revision") from None
        except Unavailable as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

    def _assemble_state(self, kind: K.Kind, name: str, st: dict) -> Message | None:
        if not _exists(kind, st):
            return None
        return K.assemble(kind, name, st["spec"], st["status"], st["live"].values())

    def _split(self, kind: K.Kind, key: str) -> tuple[str, str]:
        part, _, rest = key[len(kind.name) + 1:].partition("/")
        return part, rest.split("/", 1)[0] if part == "live" else rest

    def _absorb(self, kind: K.Kind, state: dict, kvs: list[KV]) -> None:
        for kv in kvs:
            part, name = self._split(kind, kv.key)
            st = state.setdefault(name, {"spec": None, "status": None, "live": {}})
            if part == "live":
                st["live"][kv.key] = kv
            elif part in ("spec", "status"):
                st[part] = kv

    def _event(self, kind, state, ev, only_name, selector, complete):
        """Apply one etcd event to the watch's state; return the API event.
        ``complete``: the state began from a full list, so a name missing
        from it did not exist before this event (no read needed)."""
        part, name = self._split(kind, ev.kv.key)
        if part not in ("spec", "status", "live") or (only_name and name != only_name):
            return None
        if name not in state and not complete:
            # first time we hear of it since the watch began: read it as it was just before
            wanted = [kind.spec_key(name), kind.status_key(name)]
            got, _ = self.store.get_many(wanted, revision=ev.revision - 1)
            st = state[name] = {"spec": got[wanted[0]], "status": got[wanted[1]], "live": {}}
            if kind.name == "node":
                live, _ = self.store.list(keys.live_prefix(name), revision=ev.revision - 1)
                st["live"] = {kv.key: kv for kv in live}
        st = state.setdefault(name, {"spec": None, "status": None, "live": {}})
        existed = _exists(kind, st)
        if ev.type == "delete":
            if part == "live":
                st["live"].pop(ev.kv.key, None)
            else:
                st[part] = None
        elif part == "live":
            st["live"][ev.kv.key] = ev.kv
        else:
            st[part] = ev.kv
        if not _exists(kind, st):
            state.pop(name, None)
            if not existed:
                return None
            obj = kind.message()
            obj.metadata.name = name
            obj.metadata.resource_version = ev.revision
            return meta_pb2.DELETED, obj, ev.revision
        try:
            obj = K.assemble(kind, name, st["spec"], st["status"], st["live"].values())
        except K.CorruptObject as exc:
            log.warning("watch: skipping corrupt object: %s", exc)
            return None
        if not _matches(obj, selector):
            return None
        if not existed or (part == "spec" and ev.kv.create_revision == ev.kv.mod_revision
                             and st["status"] is None):
            typ = meta_pb2.ADDED
        else:
            typ = meta_pb2.MODIFIED
        return typ, obj, ev.revision
