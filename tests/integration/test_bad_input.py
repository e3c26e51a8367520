"""Bad input never kills the controller and never loses data.

Every case asserts the exact gRPC status code and that the error names the
field at fault (google.rpc.BadRequest field violations + message); after
every test the controller process is still alive and the objects created
before are intact. Garbage planted directly in etcd is reported (DATA_LOSS,
the List corrupt trailer), skipped by watches and repairable by an Update.
The CLI maps the same failures to its documented exit codes.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from braid import kinds as K
from braid.cli.main import KIND_ORDER
from braid.cli.manifests import load
from braid.client import ApiCallError, Client
from braid.v1 import compute_pb2, meta_pb2, network_pb2, node_pb2
from tests.conftest import ROOT, running_controller

pytestmark = pytest.mark.integration

BRAID = str(Path(sys.executable).with_name("braid"))


# -- helpers -----------------------------------------------------------------------

def example(kind_name: str):
    return load(str(ROOT / "examples" / f"{kind_name}.yaml"))[0].obj


def copy(msg):
    return type(msg).FromString(msg.SerializeToString())


def without_status(msg):
    out = copy(msg)
    out.ClearField("status")
    out.metadata.status_revision = 0
    return out


def call_error(fn, *args, **kwargs) -> ApiCallError:
    with pytest.raises(ApiCallError) as ei:
        fn(*args, **kwargs)
    return ei.value


def assert_invalid(exc: ApiCallError, field: str) -> None:
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, exc
    fields = [f for f, _ in exc.violations]
    assert field in fields, f"{field!r} not among the violations {exc.violations}"
    assert field in exc.message, exc.message
    assert all(desc for _, desc in exc.violations)


def seed(api: Client) -> dict[str, object]:
    """One object of every kind; returns kind -> object as created. The
    router goes first without the subnet it lists: that subnet names it back
    (spec.router), and each must exist before the other refers to it."""
    out = {}
    for name in KIND_ORDER:
        obj = example(name)
        if name == "router":
            del obj.spec.subnets[:]
        out[name] = api.create(obj)
    return out


def assert_intact(proc, api: Client, seeded: dict[str, object]) -> None:
    assert proc.poll() is None, "the controller process died"
    for kind_name, obj in seeded.items():
        got = api.get(kind_name, obj.metadata.name)
        assert without_status(got) == without_status(obj), kind_name
        items, _, corrupt = api.list(kind_name)
        assert obj.metadata.name in [i.metadata.name for i in items] and corrupt == []


# -- one controller for the stateless cases --------------------------------------------

@pytest.fixture(scope="module")
def shared(etcd_server, tmp_path_factory):
    with running_controller(etcd_server, tmp_path_factory.mktemp("bad-input"), "bad-input") as c:
        c.seeded = seed(c.api)
        yield c


@pytest.fixture
def sapi(shared):
    """The shared controller; after the test it must be alive, seeds intact."""
    yield shared.api
    assert_intact(shared.proc.proc, shared.api, shared.seeded)


# -- invalid objects --------------------------------------------------------------------

def _name(value):
    def mutate(obj):
        obj.metadata.name = value
    return mutate


def _vm_nic_mac(obj):
    obj.spec.nics[0].mac = "52:54:00:zz:00:01"


def _vm_disk_no_source(obj):
    obj.spec.disks[0].ClearField("volume")


def _many_labels(obj):
    for i in range(65):
        obj.metadata.labels[f"k{i}"] = "v"


def _long_label_value(obj):
    obj.metadata.labels["app"] = "v" * 300


def _bad_label_key(obj):
    obj.metadata.labels["-bad key"] = "v"


def _icmp_ports(obj):
    del obj.spec.rules[:]
    obj.spec.rules.add(direction=network_pb2.INGRESS, protocol="icmp", port_min=1, port_max=10)


def _too_many_rules(obj):
    for _ in range(257):
        obj.spec.rules.add(direction=network_pb2.EGRESS, protocol="any")


def _set(**fields):
    def mutate(obj):
        for k, v in fields.items():
            setattr(obj.spec, k, v)
    return mutate


# (id, kind, mutate the example, field at fault)
NAME_CASES = [
    ("uppercase-name", "vm", _name("Web1"), "metadata.name"),
    ("name-64-chars", "vm", _name("a" * 64), "metadata.name"),
    ("empty-name", "vm", _name(""), "metadata.name"),
    ("name-with-slash", "vm", _name("web/1"), "metadata.name"),
    ("name-trailing-dash", "volume", _name("vol-"), "metadata.name"),
]
SPEC_CASES = [
    ("vm-vcpus-0", "vm", _set(vcpus=0), "spec.vcpus"),
    ("vm-memory-too-small", "vm", _set(memory_mib=8), "spec.memory_mib"),
    ("vm-bad-mac", "vm", _vm_nic_mac, "spec.nics[0].mac"),
    ("vm-disk-without-source", "vm", _vm_disk_no_source, "spec.disks[0]"),
    ("sg-description-5000", "securitygroup", _set(description="d" * 5000), "spec.description"),
    ("sg-icmp-port-range", "securitygroup", _icmp_ports, "spec.rules[0].port_min"),
    ("sg-too-many-rules", "securitygroup", _too_many_rules, "spec.rules"),
    ("too-many-labels", "volume", _many_labels, "metadata.labels"),
    ("label-value-too-long", "vm", _long_label_value, "metadata.labels[app]"),
    ("bad-label-key", "network", _bad_label_key, "metadata.labels[-bad key]"),
    ("subnet-cidr-prefix-33", "subnet", _set(cidr="10.10.0.0/33"), "spec.cidr"),
    ("subnet-cidr-host-bits", "subnet", _set(cidr="10.10.0.1/24"), "spec.cidr"),
    ("subnet-cidr-garbage", "subnet", _set(cidr="not-a-cidr"), "spec.cidr"),
    ("subnet-gateway-outside", "subnet", _set(gateway="10.20.0.1"), "spec.gateway"),
    ("volume-replicas-4", "volume", _set(replicas=4), "spec.replicas"),
    ("volume-size-not-512-aligned", "volume", _set(size_bytes=(1 << 30) + 100), "spec.size_bytes"),
    ("network-mtu-too-big", "network", _set(mtu=65000), "spec.mtu"),
    ("port-uppercase-mac", "port", _set(mac="52:54:00:AA:BB:CC"), "spec.mac"),
]


@pytest.mark.parametrize("kind_name,mutate,field", [c[1:] for c in NAME_CASES + SPEC_CASES],
                         ids=[c[0] for c in NAME_CASES + SPEC_CASES])
def test_invalid_create_is_rejected_and_stores_nothing(sapi, shared, kind_name, mutate, field):
    kind = K.KINDS[kind_name]
    obj = example(kind_name)
    obj.metadata.name = "bad"
    mutate(obj)
    assert_invalid(call_error(sapi.create, obj), field)
    stored = [kv.key for kv in shared.store.list(f"{kind_name}/spec/")[0]]
    assert stored == [kind.spec_key(shared.seeded[kind_name].metadata.name)]


@pytest.mark.parametrize("kind_name,mutate,field", [c[1:] for c in SPEC_CASES],
                         ids=[c[0] for c in SPEC_CASES])
def test_invalid_update_is_rejected_and_changes_nothing(sapi, shared, kind_name, mutate, field):
    current = sapi.get(kind_name, shared.seeded[kind_name].metadata.name)
    bad = copy(current)
    mutate(bad)
    assert_invalid(call_error(sapi.update, bad), field)
    # the autouse check (sapi) verifies the stored object is unchanged


@pytest.mark.parametrize("bad", ["Web1", "a" * 64, "", "web/1", "../vm/spec/web1"])
def test_invalid_names_in_get_delete_watch(sapi, bad):
    for e in (call_error(sapi.get, "vm", bad), call_error(sapi.delete, "vm", bad)):
        assert_invalid(e, "name")
    obj = example("vm")
    obj.metadata.name = bad
    assert_invalid(call_error(sapi.update, obj), "name")
    if bad:  # an empty name means "every object" in a watch
        stream = sapi.watch("vm", name=bad, timeout=5)
        with pytest.raises(ApiCallError) as ei:
            next(iter(stream))
        assert_invalid(ei.value, "name")


@pytest.mark.parametrize("selector", ["foo", "=v", "a=b,,c", "x" * 1025])
def test_bad_label_selector(sapi, selector):
    assert_invalid(call_error(sapi.list, "vm", selector), "label_selector")
    stream = sapi.watch("vm", label_selector=selector, timeout=5)
    with pytest.raises(ApiCallError) as ei:
        next(iter(stream))
    assert_invalid(ei.value, "label_selector")


def test_good_label_selector_still_works(sapi):
    items, _, _ = sapi.list("vm", "app=web")
    assert [i.metadata.name for i in items] == ["web1"]
    assert sapi.list("vm", " app = web , ")[0] == items
    assert sapi.list("vm", "app=db")[0] == []


# -- transport-level garbage -----------------------------------------------------------------

def _raw(address: str, method: str, **opts):
    ch = grpc.insecure_channel(address, options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
    return ch, ch.unary_unary(method, request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)


def test_huge_message_is_resource_exhausted(sapi, shared):
    sg = example("securitygroup")
    sg.metadata.name = "huge"
    sg.spec.description = "x" * (5 << 20)
    payload = sg.SerializeToString()
    assert len(payload) > 4 << 20
    ch, call = _raw(shared.proc.address, "/braid.v1.SecurityGroupService/Create")
    try:
        with pytest.raises(grpc.RpcError) as ei:
            call(payload, timeout=10)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in ei.value.details()
    finally:
        ch.close()
    # the client library refuses to send it in the first place
    assert call_error(sapi.create, sg).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert call_error(sapi.get, "securitygroup", "huge").code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("method", ["/braid.v1.VMService/Create", "/braid.v1.VMService/Get",
                                    "/braid.v1.VMService/List", "/braid.v1.ClusterService/Info"])
@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f",
                                     b"\x12\x05ab"], ids=["ff", "bad-varint-length", "truncated"])
def test_malformed_bytes_get_an_error_not_a_crash(sapi, shared, method, payload):
    ch, call = _raw(shared.proc.address, method)
    try:
        with pytest.raises(grpc.RpcError) as ei:
            call(payload, timeout=5)
        # grpcio answers a request it cannot deserialize with INTERNAL
        assert ei.value.code() == grpc.StatusCode.INTERNAL
        assert "deserializ" in ei.value.details()
    finally:
        ch.close()


def test_malformed_bytes_to_watch(sapi, shared):
    ch = grpc.insecure_channel(shared.proc.address)
    try:
        call = ch.unary_stream("/braid.v1.VMService/Watch", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as ei:
            list(call(b"\xff\xff\xff", timeout=5))
        assert ei.value.code() == grpc.StatusCode.INTERNAL
    finally:
        ch.close()


@pytest.mark.parametrize("method", ["/braid.v1.VMService/Frobnicate", "/braid.v1.FrobService/Get",
                                    "/braid.v2.VMService/Get", "/nonsense"])
def test_unknown_method_or_service_is_unimplemented(sapi, shared, method):
    ch, call = _raw(shared.proc.address, method)
    try:
        with pytest.raises(grpc.RpcError) as ei:
            call(meta_pb2.GetRequest(name="web1").SerializeToString(), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        ch.close()


def test_wrong_message_type_for_a_method(sapi, shared):
    """A well-formed message of another type: no crash, no stray object."""
    ch, call = _raw(shared.proc.address, "/braid.v1.VolumeService/Create")
    try:
        vm = example("vm")
        vm.metadata.name = "from-a-vm"
        try:
            call(vm.SerializeToString(), timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
        else:
            pytest.fail("a VM's bytes were accepted as a valid Volume")
    finally:
        ch.close()
    assert call_error(sapi.get, "volume", "from-a-vm").code == grpc.StatusCode.NOT_FOUND


# -- garbage in etcd -------------------------------------------------------------------------

class Events:
    def __init__(self, api: Client, kind: str, **kw):
        self.stream = api.watch(kind, **kw)
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for ev in self.stream:
                self.q.put(ev)
        except BaseException as exc:  # noqa: BLE001
            self.q.put(exc)

    def next(self, timeout: float = 5.0):
        try:
            ev = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no watch event within {timeout}s") from None
        if isinstance(ev, BaseException):
            raise AssertionError(f"watch stream failed: {ev!r}")
        return ev

    def cancel(self):
        self.stream.cancel()
        self.thread.join(5)
        assert not self.thread.is_alive()


def _vm(name: str):
    vm = example("vm")
    vm.metadata.name = name
    return vm


def _vm_deps(api) -> None:
    """examples/vm.yaml refers to volume vol1 and network net1."""
    api.create(example("volume"))
    api.create(example("network"))


def test_garbage_in_etcd(api, raw_store, controller):
    _vm_deps(api)
    web1 = api.create(_vm("web1"))
    good = api.create(_vm("good"))
    w = Events(api, "vm")
    try:
        evs = [w.next(), w.next(), w.next()]
        assert [(e.type, e.object.metadata.name) for e in evs] == [
            (meta_pb2.ADDED, "good"), (meta_pb2.ADDED, "web1"), (meta_pb2.SYNCED, "")]

        raw_store.put("vm/spec/junk", b"\x00not json")
        raw_store.put("vm/status/good", b"{{{")

        e = call_error(api.get, "vm", "junk")
        assert e.code == grpc.StatusCode.DATA_LOSS
        assert "vm/spec/junk" in e.message and "not valid" in e.message
        e = call_error(api.get, "vm", "good")
        assert e.code == grpc.StatusCode.DATA_LOSS and "vm/status/good" in e.message

        items, _, corrupt = api.list("vm")
        assert [i.metadata.name for i in items] == ["web1"]
        assert without_status(items[0]) == without_status(web1)
        assert sorted(corrupt) == ["good", "junk"]
        assert api.info().objects["vm"] == 1  # Info survives garbage too

        # the watch skipped both and still delivers later valid events
        later = api.create(_vm("later"))
        ev = w.next()
        assert (ev.type, ev.object.metadata.name) == (meta_pb2.ADDED, "later")
        assert ev.revision == later.metadata.resource_version

        # an Update with a valid object repairs the garbage
        repaired = api.update(_vm("junk"))
        assert repaired.metadata.uid and repaired.metadata.generation == 1
        assert repaired.spec.vcpus == 1 and repaired.metadata.labels["app"] == "web"
        assert without_status(api.get("vm", "junk")) == without_status(repaired)
        ev = w.next()
        assert ev.object.metadata.name == "junk" and ev.type in (meta_pb2.ADDED, meta_pb2.MODIFIED)
        assert ev.object == repaired

        # the owner rewriting a valid status repairs 'good'
        srev = raw_store.put("vm/status/good", K.to_json(compute_pb2.VMStatus(phase="Running")))
        g = api.get("vm", "good")
        assert g.status.phase == "Running" and g.metadata.status_revision == srev
        assert g.metadata.uid == good.metadata.uid and g.spec == good.spec
        ev = w.next()
        assert (ev.type, ev.object.metadata.name) == (meta_pb2.MODIFIED, "good")
        assert ev.object.status.phase == "Running"

        items, _, corrupt = api.list("vm")
        assert [i.metadata.name for i in items] == ["good", "junk", "later", "web1"]
        assert corrupt == []

        # garbage can be deleted through the API
        raw_store.put("vm/spec/junk2", b"\xff\xfe")
        assert api.list("vm")[2] == ["junk2"]
        api.delete("vm", "junk2")
        assert raw_store.get("vm/spec/junk2") is None and api.list("vm")[2] == []
    finally:
        w.cancel()
    assert controller.proc.poll() is None


GARBAGE = {
    "empty": b"", "null": b"null", "number": b"42", "bool": b"true", "string": b'"a string"',
    "empty-list": b"[]", "list": b'["spec"]', "wrong-type": b'{"spec": {"vcpus": "many"}}',
    "wrong-shape": b'{"metadata": 5}', "deep-nesting": b"[" * 100000, "binary": b"\xff\xfe\x00",
    "truncated": b'{"spec": {"vcpus": 1', "nul": b"\x00not json",
}


def test_any_garbage_spec_is_data_loss_and_repairable(api, raw_store, controller):
    _vm_deps(api)
    web1 = api.create(_vm("web1"))
    junk = sorted(f"junk-{gid}" for gid in GARBAGE)
    for gid, garbage in GARBAGE.items():
        raw_store.put(f"vm/spec/junk-{gid}", garbage)
        e = call_error(api.get, "vm", f"junk-{gid}")
        assert e.code == grpc.StatusCode.DATA_LOSS, gid
        assert f"vm/spec/junk-{gid}" in e.message, gid
    items, _, corrupt = api.list("vm")
    assert [without_status(i) for i in items] == [without_status(web1)]
    assert sorted(corrupt) == junk
    assert api.info().objects["vm"] == 1
    for name in junk:
        repaired = api.update(_vm(name))
        assert repaired.metadata.name == name and repaired.metadata.generation == 1
        assert repaired.metadata.uid and repaired.metadata.uid != web1.metadata.uid
    items, _, corrupt = api.list("vm")
    assert [i.metadata.name for i in items] == sorted(junk + ["web1"]) and corrupt == []
    assert controller.proc.poll() is None


def test_garbage_daemon_presence_still_counts_as_live(api, raw_store):
    raw_store.put("node/status/n1", K.to_json(node_pb2.NodeStatus(hypervisor="test")))
    lease = raw_store.grant_lease(30)
    try:
        raw_store.put("node/live/n1/node-agent", b"{{{ not json", lease=lease)
        n = api.get("node", "n1")
        assert n.status.phase == "Ready"
        assert [(d.name, d.live) for d in n.status.daemons] == [("node-agent", True)]
        assert api.list("node")[2] == []
        raw_store.put("node/status/n1", b"garbage")
        assert call_error(api.get, "node", "n1").code == grpc.StatusCode.DATA_LOSS
        assert api.list("node")[2] == ["n1"]
    finally:
        raw_store.revoke_lease(lease)


# -- the CLI ------------------------------------------------------------------------------------

def braid(controller, *args, input=None) -> subprocess.CompletedProcess:
    return subprocess.run([BRAID, "--server", controller.address, *args], capture_output=True,
                          text=True, timeout=30, cwd=str(ROOT), input=input)


def test_cli_exit_codes(api, controller, tmp_path, raw_store):
    r = braid(controller, "get", "frobs")
    assert r.returncode == 2 and "unknown kind" in r.stderr and "frobs" in r.stderr

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("kind: VM\nmetadata: {name: x\nspec: [\n")
    r = braid(controller, "apply", "-f", str(bad_yaml))
    assert r.returncode == 2 and "not valid YAML" in r.stderr

    unknown_field = tmp_path / "unknown.yaml"
    unknown_field.write_text("kind: VM\nmetadata: {name: x}\nspec: {vcpus: 1, memory_mib: 64, "
                             "frobnication: 3}\n")
    r = braid(controller, "apply", "-f", str(unknown_field))
    assert r.returncode == 2 and "frobnication" in r.stderr

    unknown_kind = tmp_path / "kind.yaml"
    unknown_kind.write_text("kind: Frob\nmetadata: {name: x}\n")
    r = braid(controller, "create", "-f", str(unknown_kind))
    assert r.returncode == 2 and "unknown kind" in r.stderr

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("kind: VM\nmetadata: {name: x}\nspec: {vcpus: 0, memory_mib: 64}\n")
    r = braid(controller, "apply", "-f", str(invalid))
    assert r.returncode == 2 and "spec.vcpus" in r.stderr and "INVALID_ARGUMENT" in r.stderr

    r = braid(controller, "get", "vm", "missing")
    assert r.returncode == 3 and "NOT_FOUND" in r.stderr and "missing" in r.stderr
    r = braid(controller, "describe", "vm", "missing")
    assert r.returncode == 3

    # a VM needs its volume and network: FAILED_PRECONDITION (exit 4) naming them
    r = braid(controller, "create", "-f", "examples/vm.yaml")
    assert r.returncode == 4 and "FAILED_PRECONDITION" in r.stderr
    assert "spec.disks[0].volume" in r.stderr and "spec.nics[0].network" in r.stderr
    r = braid(controller, "create", "-f", "examples/vm.yaml", "-f", "examples/volume.yaml",
              "-f", "examples/network.yaml")
    assert r.returncode == 0 and "vm/web1 created" in r.stdout
    r = braid(controller, "create", "-f", "examples/vm.yaml")
    assert r.returncode == 4 and "ALREADY_EXISTS" in r.stderr
    r = braid(controller, "apply", "-f", "examples/vm.yaml")
    assert r.returncode == 0 and "vm/web1 unchanged" in r.stdout

    # garbage shows as a warning, the valid objects are still listed
    raw_store.put("vm/spec/junk", b"\x00not json")
    r = braid(controller, "get", "vms", "-o", "name")
    assert r.returncode == 0 and "web1" in r.stdout and "junk" not in r.stdout
    assert "'junk'" in r.stderr and "unreadable" in r.stderr

    assert controller.proc.poll() is None
    assert api.get("vm", "web1").spec.vcpus == 1


def test_cli_unreachable_server_is_exit_5():
    r = subprocess.run([BRAID, "--server", "127.0.0.1:1", "--timeout", "2", "get", "vms"],
                       capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert r.returncode == 5 and "UNAVAILABLE" in r.stderr
