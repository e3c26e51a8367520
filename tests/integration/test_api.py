"""The braid.v1 resource API end to end: a real controller process over real
gRPC on a real etcd (CRUD of every kind, compare-and-set, concurrency,
watches, status written by owners, node liveness, cluster info)."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest

from braid import __version__
from braid import kinds as K
from braid.cli.main import KIND_ORDER
from braid.cli.manifests import load
from braid.client import ApiCallError, Client
from braid.v1 import compute_pb2, meta_pb2, node_pb2
from tests.conftest import ROOT, running_controller

pytestmark = pytest.mark.integration

ADDED, MODIFIED, DELETED, SYNCED = meta_pb2.ADDED, meta_pb2.MODIFIED, meta_pb2.DELETED, meta_pb2.SYNCED


# -- helpers ---------------------------------------------------------------------

def example(kind_name: str):
    docs = load(str(ROOT / "examples" / f"{kind_name}.yaml"))
    assert len(docs) == 1 and docs[0].kind is K.KINDS[kind_name]
    return docs[0].obj


def copy(msg):
    return type(msg).FromString(msg.SerializeToString())


def without_status(msg):
    """The object as the API owns it: owners (e.g. the controller's network
    reconciler) may fill in status at any time."""
    out = copy(msg)
    out.ClearField("status")
    out.metadata.status_revision = 0
    return out


def assert_contains(actual, expected, path="spec"):
    """Every field set in ``expected`` has that value in ``actual`` (which may
    hold more: server-side defaults)."""
    for fd, value in expected.ListFields():
        here = f"{path}.{fd.name}"
        got = getattr(actual, fd.name)
        if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            if fd.is_repeated:
                assert len(got) == len(value), here
                for i, (g, v) in enumerate(zip(got, value)):
                    assert_contains(g, v, f"{here}[{i}]")
            else:
                assert_contains(got, value, here)
        elif fd.is_repeated:
            assert list(got) == list(value), here
        else:
            assert got == value, here


def call_error(fn, *args, **kwargs) -> ApiCallError:
    with pytest.raises(ApiCallError) as ei:
        fn(*args, **kwargs)
    return ei.value


def _set_capacity(s):
    s.disks[0].capacity_bytes = 20 << 30


# one spec change per kind: (mutate the spec, read the changed field back, value)
SPEC_CHANGE = {
    "node": (lambda s: setattr(s, "unschedulable", True), lambda s: s.unschedulable, True),
    "vm": (lambda s: setattr(s, "vcpus", 2), lambda s: s.vcpus, 2),
    "diskpool": (_set_capacity, lambda s: s.disks[0].capacity_bytes, 20 << 30),
    "volume": (lambda s: setattr(s, "size_bytes", 2 << 30), lambda s: s.size_bytes, 2 << 30),
    "network": (lambda s: setattr(s, "mtu", 1400), lambda s: s.mtu, 1400),
    "subnet": (lambda s: setattr(s, "dhcp", False), lambda s: s.dhcp, False),
    "port": (lambda s: setattr(s, "nic", "eth1"), lambda s: s.nic, "eth1"),  # mac/ips are fixed
    "router": (lambda s: setattr(s, "description", "changed"), lambda s: s.description, "changed"),
    "securitygroup": (lambda s: setattr(s, "description", "changed"), lambda s: s.description,
                      "changed"),
    "snapshot": (lambda s: setattr(s, "description", "changed"), lambda s: s.description, "changed"),
}

ALL_KINDS = sorted(K.KINDS)


def test_every_kind_has_an_example_and_a_spec_change():
    assert set(SPEC_CHANGE) == set(K.KINDS)
    for name in K.KINDS:
        example(name)


class Events:
    """Collects a watch stream in a thread; cancel() ends it."""

    def __init__(self, api: Client, kind: str, **kw):
        self.stream = api.watch(kind, **kw)
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for ev in self.stream:
                self.q.put(ev)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        finally:
            self.q.put(None)

    def next(self, timeout: float = 5.0):
        try:
            ev = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no watch event within {timeout}s") from None
        if ev is None:
            raise AssertionError(f"watch stream ended (error: {self.error!r})")
        return ev

    def take(self, n: int, timeout: float = 5.0) -> list:
        return [self.next(timeout) for _ in range(n)]

    def until_synced(self, timeout: float = 5.0) -> list:
        out = []
        while True:
            ev = self.next(timeout)
            out.append(ev)
            if ev.type == SYNCED:
                return out

    def cancel(self):
        self.stream.cancel()
        self.thread.join(5)
        assert not self.thread.is_alive(), "watch thread did not end after cancel()"


def summary(events) -> list[tuple[str, str]]:
    return [(meta_pb2.EventType.Name(e.type), e.object.metadata.name) for e in events]


# -- CRUD of every kind --------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(etcd_server, tmp_path_factory):
    """One controller for the per-kind tests (a controller start + SIGTERM
    costs ~1 s); each of them uses only its own kind's keys."""
    with running_controller(etcd_server, tmp_path_factory.mktemp("shared-controller"), "api-shared") as c:
        yield c


# what each example refers to
DEPS = {"vm": ["volume", "network"], "subnet": ["network", "router"],
        "router": ["network", "subnet"], "port": ["network", "subnet", "securitygroup"],
        "snapshot": ["volume"]}


def dependency(kind_name: str):
    """The example as a dependency: examples/router.yaml lists the example
    subnet, which names the router back; the dependency drops that reference
    (each must exist before the other refers to it)."""
    obj = example(kind_name)
    if kind_name == "router":
        del obj.spec.subnets[:]
    elif kind_name == "subnet":
        obj.spec.router = ""
    return obj


@pytest.fixture
def kind_api(shared, kind_name):
    deps = DEPS.get(kind_name, [])
    for dep in deps:
        shared.api.create(dependency(dep))
    yield shared.api
    for prefix in [kind_name] + deps + ["ipam/ip", "ipam/mac"]:
        shared.store.delete_prefix(f"{prefix}/")  # leave nothing behind, even on failure
    assert shared.proc.proc.poll() is None, "the controller died"


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_crud_lifecycle(kind_api, kind_name):
    api = kind_api
    kind = K.KINDS[kind_name]
    obj = example(kind_name)
    name = obj.metadata.name

    created = api.create(obj)
    md = created.metadata
    assert md.name == name and md.uid and md.created_at
    assert md.generation == 1
    assert md.resource_version > 0 and md.create_revision == md.resource_version
    assert dict(md.labels) == dict(obj.metadata.labels)
    assert_contains(created.spec, obj.spec)  # every field of the manifest is kept
    if kind_name not in ("node", "network"):  # no owner writes a status here
        assert created.status == kind.status_message()() and md.status_revision == 0

    got = api.get(kind_name, name)
    assert without_status(got) == without_status(created)

    items, rev, corrupt = api.list(kind.plural)
    assert [i.metadata.name for i in items] == [name]
    assert without_status(items[0]) == without_status(created)
    assert rev >= md.resource_version and corrupt == []

    # update: one label and one spec field, at the current resource_version
    mutate, read, value = SPEC_CHANGE[kind_name]
    assert read(got.spec) != value
    new = copy(got)
    new.metadata.labels["tier"] = "gold"
    mutate(new.spec)
    updated = api.update(new)
    umd = updated.metadata
    assert read(updated.spec) == value and umd.labels["tier"] == "gold"
    assert umd.generation == 2
    assert umd.resource_version > md.resource_version
    assert (umd.uid, umd.created_at, umd.create_revision) == (md.uid, md.created_at,
                                                               md.create_revision)
    assert without_status(api.get(kind_name, name)) == without_status(updated)

    # a labels-only change does not bump the generation
    relabel = copy(updated)
    relabel.metadata.labels["tier"] = "silver"
    relabeled = api.update(relabel)
    assert relabeled.metadata.generation == 2 and relabeled.metadata.labels["tier"] == "silver"
    assert relabeled.metadata.resource_version > umd.resource_version

    resp = api.delete(kind_name, name, relabeled.metadata.resource_version)
    assert resp.name == name and resp.revision > relabeled.metadata.resource_version
    e = call_error(api.get, kind_name, name)
    assert e.code == grpc.StatusCode.NOT_FOUND and name in e.message
    assert api.list(kind_name)[0] == []
    assert call_error(api.delete, kind_name, name).code == grpc.StatusCode.NOT_FOUND
    assert call_error(api.update, relabeled).code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("kind_name", ALL_KINDS)
def test_conflicts(kind_api, shared, kind_name):
    api, raw_store = kind_api, shared.store
    kind = K.KINDS[kind_name]
    obj = example(kind_name)
    name = obj.metadata.name
    created = api.create(obj)

    e = call_error(api.create, obj)
    assert e.code == grpc.StatusCode.ALREADY_EXISTS and name in e.message
    # the failed create changed nothing
    assert without_status(api.get(kind_name, name)) == without_status(created)

    # someone else updates first: our resource_version is now stale
    theirs = copy(created)
    theirs.metadata.labels["owner"] = "them"
    theirs = api.update(theirs)
    stale = copy(created)
    stale.metadata.labels["owner"] = "us"
    SPEC_CHANGE[kind_name][0](stale.spec)
    e = call_error(api.update, stale)
    assert e.code == grpc.StatusCode.ABORTED and str(created.metadata.resource_version) in e.message
    assert without_status(api.get(kind_name, name)) == without_status(theirs)

    e = call_error(api.delete, kind_name, name, created.metadata.resource_version)
    assert e.code == grpc.StatusCode.ABORTED
    assert without_status(api.get(kind_name, name)) == without_status(theirs)
    assert raw_store.get(kind.spec_key(name)) is not None

    api.delete(kind_name, name, theirs.metadata.resource_version)
    assert raw_store.get(kind.spec_key(name)) is None


def with_vm_deps(api):
    """examples/vm.yaml refers to volume vol1 and network net1: create them."""
    for dep in ("volume", "network"):
        api.create(example(dep))
    return example("vm")


def test_concurrent_updates_exactly_one_wins(api, controller):
    vm = api.create(with_vm_deps(api))
    clients = [Client(controller.address) for _ in range(8)]
    try:
        for rnd in range(3):
            base = api.get("vm", "web1")
            barrier = threading.Barrier(8)
            results: dict[int, object] = {}

            def writer(i):
                mine = copy(base)
                mine.metadata.labels["writer"] = f"w{i}"
                mine.spec.memory_mib = 260 + 4 * (8 * rnd + i)  # unique per round and writer
                barrier.wait()
                try:
                    results[i] = clients[i].update(mine)
                except ApiCallError as exc:
                    results[i] = exc

            threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(15)
            assert len(results) == 8
            winners = [i for i, r in results.items() if not isinstance(r, ApiCallError)]
            losers = [r for r in results.values() if isinstance(r, ApiCallError)]
            assert len(winners) == 1, f"round {rnd}: {results}"
            assert [r.code for r in losers] == [grpc.StatusCode.ABORTED] * 7
            w = winners[0]
            stored = api.get("vm", "web1")
            assert stored.metadata.labels["writer"] == f"w{w}"
            assert stored.spec.memory_mib == 260 + 4 * (8 * rnd + w)
            assert stored == results[w]
            assert stored.metadata.generation == base.metadata.generation + 1
    finally:
        for c in clients:
            c.close()
    assert vm.metadata.uid == api.get("vm", "web1").metadata.uid


# -- watch ---------------------------------------------------------------------------

def _volume(name: str, gib: int = 1):
    v = example("volume")
    v.metadata.name = name
    v.spec.size_bytes = gib << 30
    return v


def _watched(name: str):
    """An object of a kind that no daemon writes status for (volumes get a
    status from the volume reconciler): the watch tests count every event."""
    sg = example("securitygroup")
    sg.metadata.name = name
    for rule in sg.spec.rules:  # the example's rule refers to its own group
        if rule.remote_group == "web":
            rule.remote_group = name
    return sg


def test_watch_lists_then_streams_changes_in_order(api):
    a = api.create(_watched("a"))
    b = api.create(_watched("b"))
    w = Events(api, "securitygroup")
    try:
        initial = w.until_synced()
        assert summary(initial) == [("ADDED", "a"), ("ADDED", "b"), ("SYNCED", "")]
        assert initial[0].object == a and initial[1].object == b
        synced_rev = initial[-1].revision
        assert synced_rev >= b.metadata.resource_version
        assert not initial[-1].HasField("object")

        c = api.create(_watched("c"))
        a2 = copy(a)
        a2.spec.description = "changed"
        a2 = api.update(a2)
        d = api.delete("securitygroup", "b")
        evs = w.take(3)
        assert summary(evs) == [("ADDED", "c"), ("MODIFIED", "a"), ("DELETED", "b")]
        assert [e.revision for e in evs] == [c.metadata.resource_version,
                                             a2.metadata.resource_version, d.revision]
        assert synced_rev < evs[0].revision
        assert evs[0].object == c and evs[1].object == a2
        assert evs[1].object.spec.description == "changed" and evs[1].object.metadata.generation == 2
    finally:
        w.cancel()
    assert w.error is None


def test_watch_from_resource_version_replays_later_changes(api):
    x = api.create(_watched("x"))
    since = x.metadata.resource_version
    x2 = copy(x)
    x2.metadata.labels["k"] = "v"
    x2 = api.update(x2)
    y = api.create(_watched("y"))
    dx = api.delete("securitygroup", "x")

    w = Events(api, "securitygroup", resource_version=since)
    try:
        evs = w.take(3)
        assert summary(evs) == [("MODIFIED", "x"), ("ADDED", "y"), ("DELETED", "x")]
        assert [e.revision for e in evs] == [x2.metadata.resource_version,
                                             y.metadata.resource_version, dx.revision]
        assert evs[0].object.metadata.labels["k"] == "v"
        # nothing more was queued: the next event is a change made now
        z = api.create(_watched("z"))
        ev = w.next()
        assert summary([ev]) == [("ADDED", "z")] and ev.revision == z.metadata.resource_version
    finally:
        w.cancel()


def test_watch_name_and_label_selector(api):
    a = _watched("a")
    a.metadata.labels["team"] = "red"
    api.create(a)
    api.create(_watched("b"))
    by_name = Events(api, "securitygroup", name="b")
    by_label = Events(api, "securitygroup", label_selector="team=red")
    try:
        assert summary(by_name.until_synced()) == [("ADDED", "b"), ("SYNCED", "")]
        assert summary(by_label.until_synced()) == [("ADDED", "a"), ("SYNCED", "")]
        api.create(_watched("c"))
        c2 = _watched("c2")
        c2.metadata.labels["team"] = "red"
        api.create(c2)
        api.delete("securitygroup", "b")
        assert summary([by_name.next()]) == [("DELETED", "b")]
        assert summary([by_label.next()]) == [("ADDED", "c2")]
    finally:
        by_name.cancel()
        by_label.cancel()


def test_watch_compacted_revision_is_out_of_range(api, raw_store):
    v = api.create(_volume("v"))
    old = v.metadata.resource_version
    for gib in (2, 3, 4):
        cur = api.get("volume", "v")
        cur.spec.size_bytes = gib << 30
        api.update(cur)
    raw_store.compact(raw_store.revision())

    stream = api.watch("volume", resource_version=old)
    with pytest.raises(ApiCallError) as ei:
        for _ in stream:
            pytest.fail("an event from compacted history")
    assert ei.value.code == grpc.StatusCode.OUT_OF_RANGE
    assert str(old) in ei.value.message and "list again" in ei.value.message

    # a fresh list+watch still works after the compaction
    w = Events(api, "volume")
    try:
        evs = w.until_synced()
        assert summary(evs) == [("ADDED", "v"), ("SYNCED", "")]
        assert evs[0].object.spec.size_bytes == 4 << 30
    finally:
        w.cancel()


# -- status written by owners -----------------------------------------------------------

def test_status_shows_in_get_and_watch(api, raw_store):
    vm = api.create(with_vm_deps(api))
    w = Events(api, "vm")
    try:
        assert summary(w.until_synced()) == [("ADDED", "web1"), ("SYNCED", "")]
        status = compute_pb2.VMStatus(phase="Running", node="n1", power_state=compute_pb2.RUNNING,
                                      observed_generation=1, addresses=["10.10.0.10"])
        srev = raw_store.put("vm/status/web1", K.to_json(status))

        got = api.get("vm", "web1")
        assert got.status == status
        assert got.metadata.status_revision == srev
        assert got.metadata.resource_version == vm.metadata.resource_version  # spec unchanged
        assert got.spec == vm.spec
        items, _, _ = api.list("vm")
        assert items == [got]

        ev = w.next()
        assert ev.type == MODIFIED and ev.revision == srev and ev.object == got

        # a status for an object that has no spec: no object, no event
        raw_store.put("vm/status/ghost", K.to_json(compute_pb2.VMStatus(phase="Running")))
        assert call_error(api.get, "vm", "ghost").code == grpc.StatusCode.NOT_FOUND
        assert [i.metadata.name for i in api.list("vm")[0]] == ["web1"]
        assert api.info().objects["vm"] == 1
        marker = copy(got)
        marker.metadata.labels["marker"] = "1"
        marker = api.update(marker)
        ev = w.next()
        assert summary([ev]) == [("MODIFIED", "web1")]
        assert ev.revision == marker.metadata.resource_version

        # deleting the object deletes its status too
        d = api.delete("vm", "web1")
        assert raw_store.get("vm/status/web1") is None
        ev = w.next()
        assert summary([ev]) == [("DELETED", "web1")] and ev.revision == d.revision
    finally:
        w.cancel()


def test_status_without_spec_is_no_object_for_non_node_kinds(api, raw_store):
    for kind in K.KINDS.values():
        if kind.name == "node":
            continue
        status = kind.status_message()(phase="Ready")
        raw_store.put(kind.status_key("ghost"), K.to_json(status))
        e = call_error(api.get, kind.name, "ghost")
        assert e.code == grpc.StatusCode.NOT_FOUND, kind.name
        items, _, corrupt = api.list(kind.name)
        assert (items, corrupt) == ([], []), kind.name
        # ... and an Update does not resurrect it from its status
        obj = example(kind.name)
        obj.metadata.name = "ghost"
        assert call_error(api.update, obj).code == grpc.StatusCode.NOT_FOUND, kind.name
    info = api.info()
    assert all(info.objects[k] == 0 for k in K.KINDS if k != "node")


# -- nodes --------------------------------------------------------------------------------

def _conditions(node) -> dict[str, bool]:
    return {c.type: c.status for c in node.status.conditions}


def test_node_readiness_follows_the_node_agent_lease(api, raw_store):
    w = Events(api, "node")
    lease = 0
    try:
        assert summary(w.until_synced()) == [("SYNCED", "")]
        status = node_pb2.NodeStatus(hypervisor="test", addresses=["192.0.2.1"],
                                     capacity=node_pb2.Resources(cpus=8, memory_bytes=16 << 30))
        raw_store.put("node/status/n1", K.to_json(status))

        n = api.get("node", "n1")  # a node exists while it reports, even without a spec
        assert n.status.phase == "NotReady" and n.status.hypervisor == "test"
        assert n.status.capacity.cpus == 8 and n.metadata.resource_version == 0
        assert _conditions(n) == {"Ready": False, "StorageReady": False, "NetworkReady": False}
        assert [i.metadata.name for i in api.list("node")[0]] == ["n1"]
        ev = w.next()
        assert summary([ev]) == [("ADDED", "n1")] and ev.object.status.phase == "NotReady"

        lease = raw_store.grant_lease(30)
        agent = node_pb2.DaemonStatus(name="node-agent", version="0.1.0", pid=4242, lease_id=lease)
        raw_store.put("node/live/n1/node-agent", K.to_json(agent), lease=lease)
        n = api.get("node", "n1")
        assert n.status.phase == "Ready"
        assert [(d.name, d.live, d.pid) for d in n.status.daemons] == [("node-agent", True, 4242)]
        assert _conditions(n) == {"Ready": True, "StorageReady": False, "NetworkReady": False}
        ev = w.next()
        assert summary([ev]) == [("MODIFIED", "n1")] and ev.object.status.phase == "Ready"
        info = api.info()
        assert (info.nodes_total, info.nodes_ready, info.objects["node"]) == (1, 1, 1)

        e = call_error(api.delete, "node", "n1")
        assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "n1" in e.message
        assert api.get("node", "n1").status.phase == "Ready"

        raw_store.revoke_lease(lease)
        lease = 0
        assert raw_store.get("node/live/n1/node-agent") is None
        n = api.get("node", "n1")
        assert n.status.phase == "NotReady" and not any(d.live for d in n.status.daemons)
        assert _conditions(n)["Ready"] is False
        ev = w.next()
        assert summary([ev]) == [("MODIFIED", "n1")] and ev.object.status.phase == "NotReady"
        assert api.info().nodes_ready == 0

        d = api.delete("node", "n1")  # no live daemons any more
        assert call_error(api.get, "node", "n1").code == grpc.StatusCode.NOT_FOUND
        assert raw_store.get("node/status/n1") is None
        ev = w.next()
        assert summary([ev]) == [("DELETED", "n1")] and ev.revision == d.revision
    finally:
        if lease:
            raw_store.revoke_lease(lease)
        w.cancel()


def test_node_daemons_seen_before_show_as_not_live(api, raw_store):
    status = node_pb2.NodeStatus(daemons=[node_pb2.DaemonStatus(name="node-agent", pid=1),
                                          node_pb2.DaemonStatus(name="storaged", pid=2)])
    raw_store.put("node/status/n2", K.to_json(status))
    lease = raw_store.grant_lease(30)
    try:
        raw_store.put("node/live/n2/storaged",
                      K.to_json(node_pb2.DaemonStatus(name="storaged", pid=3)), lease=lease)
        n = api.get("node", "n2")
        assert [(d.name, d.live) for d in n.status.daemons] == [("node-agent", False),
                                                                 ("storaged", True)]
        assert n.status.phase == "NotReady"
        assert _conditions(n) == {"Ready": False, "StorageReady": True, "NetworkReady": False}
    finally:
        raw_store.revoke_lease(lease)
    assert not any(d.live for d in api.get("node", "n2").status.daemons)


# -- cluster info ---------------------------------------------------------------------------

def test_cluster_info_counts_objects_per_kind(api):
    info = api.info()
    assert info.cluster_name == "braid" and info.version == __version__
    assert set(info.objects) == set(K.KINDS) and not any(info.objects.values())
    last = 0
    for name in KIND_ORDER:  # the router before the subnet that names it
        last = api.create(dependency(name) if name == "router" else example(name)).metadata.resource_version
    api.create(_volume("vol2"))
    info = api.info()
    expected = {name: 1 for name in K.KINDS}
    expected["volume"] = 2
    assert dict(info.objects) == expected
    assert info.etcd_revision >= last
    assert (info.nodes_total, info.nodes_ready) == (1, 0)  # node1 has a spec, no agent
    deadline = time.monotonic() + 5
    while "controller" not in info.leaders and time.monotonic() < deadline:
        time.sleep(0.1)
        info = api.info()
    assert info.leaders["controller"]
    api.delete("volume", "vol2")
    assert api.info().objects["volume"] == 1
