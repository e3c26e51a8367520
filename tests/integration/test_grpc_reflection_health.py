"""gRPC reflection and health of real daemon processes, seen from a client
that knows nothing but the address (grpcio-reflection's client side), plus a
node daemon's metrics endpoint and its clean SIGTERM shutdown."""

from __future__ import annotations

import signal
import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from braid import kinds as K
from braid.client import ApiCallError
from braid.v1 import node_pb2
from tests.conftest import DaemonProc

pytestmark = pytest.mark.integration

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
KIND_SERVICES = {f"braid.v1.{t}Service" for t in
                 ("VM", "Node", "DiskPool", "Volume", "Network", "Subnet", "Port", "Router",
                  "SecurityGroup", "Snapshot")}
METHODS = ("Create", "Get", "List", "Update", "Delete", "Watch")


@pytest.fixture
def channel(controller):
    ch = grpc.insecure_channel(controller.address)
    yield ch
    ch.close()


def reflect(ch: grpc.Channel):
    db = ProtoReflectionDescriptorDatabase(ch)
    return db, descriptor_pool.DescriptorPool(db)


def find_method(pool, full_name: str):
    """pool.FindMethodByName does not consult the reflection database (upb
    pool); resolving the service first fetches its file."""
    service_name, _, method_name = full_name.rpartition(".")
    service = pool.FindServiceByName(service_name)
    method = pool.FindMethodByName(full_name)
    assert method.full_name == full_name and method.containing_service.full_name == service_name
    assert method.input_type.full_name == service.methods_by_name[method_name].input_type.full_name
    return method


def health_check(ch: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5).status


# -- controller -----------------------------------------------------------------------------

def test_controller_lists_every_service(channel):
    db, _ = reflect(channel)
    services = set(db.get_services())
    assert {s.service for s in K.KINDS.values()} == KIND_SERVICES  # the registry agrees
    assert KIND_SERVICES | {"braid.v1.ClusterService", HEALTH, REFLECTION} == services


def test_controller_method_descriptors_resolve(channel):
    _, pool = reflect(channel)
    create = find_method(pool, "braid.v1.VMService.Create")
    assert create.input_type.full_name == "braid.v1.VM"
    assert create.output_type.full_name == "braid.v1.VM"
    assert not create.server_streaming and not create.client_streaming

    for kind in K.KINDS.values():
        svc = pool.FindServiceByName(kind.service)
        assert sorted(m.name for m in svc.methods) == sorted(METHODS), kind.name
        title = f"braid.v1.{kind.title}"
        ins = {m.name: m.input_type.full_name for m in svc.methods}
        outs = {m.name: m.output_type.full_name for m in svc.methods}
        assert ins == {"Create": title, "Get": "braid.v1.GetRequest",
                       "List": "braid.v1.ListRequest", "Update": title,
                       "Delete": "braid.v1.DeleteRequest", "Watch": "braid.v1.WatchRequest"}
        assert outs == {"Create": title, "Get": title, "List": f"{title}List", "Update": title,
                        "Delete": "braid.v1.DeleteResponse", "Watch": f"{title}Event"}
        assert svc.methods_by_name["Watch"].server_streaming
        # the reflected message matches the one compiled into the client
        assert pool.FindMessageTypeByName(title).fields_by_name.keys() == \
            kind.message.DESCRIPTOR.fields_by_name.keys()

    vmspec = pool.FindMessageTypeByName("braid.v1.VMSpec")
    assert vmspec.fields_by_name["vcpus"].number == 1
    assert vmspec.fields_by_name["disks"].message_type.full_name == "braid.v1.VMDisk"
    info = find_method(pool, "braid.v1.ClusterService.Info")
    assert info.output_type.full_name == "braid.v1.ClusterInfo"


def test_a_client_built_from_reflection_alone_can_call_the_api(api, channel):
    """Only descriptors fetched over the wire: create and get a volume."""
    _, pool = reflect(channel)
    method = find_method(pool, "braid.v1.VolumeService.Create")
    Volume = message_factory.GetMessageClass(method.input_type)
    GetRequest = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("braid.v1.GetRequest"))
    vol = Volume()
    vol.metadata.name = "reflected"
    vol.spec.size_bytes = 1 << 30
    create = channel.unary_unary("/braid.v1.VolumeService/Create",
                                 request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=Volume.FromString)
    created = create(vol, timeout=5)
    assert created.metadata.uid and created.spec.replicas == 2  # server-side default
    get = channel.unary_unary("/braid.v1.VolumeService/Get",
                              request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=Volume.FromString)
    got = get(GetRequest(name="reflected"), timeout=5)
    assert got.metadata.uid == created.metadata.uid
    assert api.get("volume", "reflected").metadata.uid == created.metadata.uid


def test_controller_health(channel):
    SERVING = health_pb2.HealthCheckResponse.SERVING
    assert health_check(channel, "") == SERVING
    assert health_check(channel, "braid.v1.VMService") == SERVING
    for svc in KIND_SERVICES | {"braid.v1.ClusterService"}:
        assert health_check(channel, svc) == SERVING, svc
    with pytest.raises(grpc.RpcError) as ei:
        health_check(channel, "braid.v1.NoSuchService")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    # the streaming Watch of the health protocol answers at once too
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="braid.v1.VMService"), timeout=5)
    assert next(stream).status == SERVING
    stream.cancel()


def test_controller_sigterm_exits_cleanly_and_resigns(controller, raw_store):
    deadline = time.monotonic() + 5
    while raw_store.get("election/controller") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raw_store.get("election/controller") is not None
    t0 = time.monotonic()
    controller.proc.send_signal(signal.SIGTERM)
    assert controller.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5, "controller took too long to stop"
    assert raw_store.get("election/controller") is None  # lease revoked, not expired


# -- a node daemon ---------------------------------------------------------------------------

@pytest.fixture
def storaged(etcd_server, prefix, tmp_path):
    d = DaemonProc("storage_daemon.main",
                   ["--etcd", etcd_server.endpoint, "--prefix", prefix, "--node", "n1",
                    "--lease-ttl", "30"],  # long: a key gone at once was revoked, not expired
                   tmp_path, "storaged")
    yield d
    d.stop()


def test_node_daemon_health_reflection_metrics_and_sigterm(storaged, raw_store, api):
    ch = grpc.insecure_channel(storaged.address)
    try:
        assert health_check(ch, "") == health_pb2.HealthCheckResponse.SERVING
        db, pool = reflect(ch)
        assert set(db.get_services()) == {HEALTH, REFLECTION}
        check = find_method(pool, "grpc.health.v1.Health.Check")
        assert check.input_type.full_name == "grpc.health.v1.HealthCheckRequest"
    finally:
        ch.close()

    with urllib.request.urlopen(f"http://{storaged.info['metrics']}/metrics", timeout=5) as resp:
        assert resp.status == 200
        metrics = resp.read().decode()
    up = [line for line in metrics.splitlines() if line.startswith("braid_daemon_up{")]
    assert up == ['braid_daemon_up{daemon="storaged"} 1.0']

    # its presence: a lease-bound key describing it, visible through the API
    kv = raw_store.get("node/live/n1/storaged")
    assert kv is not None and kv.lease
    me = K.from_json(kv.value, node_pb2.DaemonStatus)
    assert (me.name, me.pid, me.grpc_address, me.lease_id) == (
        "storaged", storaged.proc.pid, storaged.address, kv.lease)
    assert me.metrics_address == storaged.info["metrics"]
    node = api.get("node", "n1")
    assert [(d.name, d.live) for d in node.status.daemons] == [("storaged", True)]
    assert node.status.phase == "NotReady"  # no node agent
    assert {c.type: c.status for c in node.status.conditions}["StorageReady"] is True

    t0 = time.monotonic()
    storaged.proc.send_signal(signal.SIGTERM)
    assert storaged.proc.wait(10) == 0
    assert time.monotonic() - t0 < 10
    assert raw_store.get("node/live/n1/storaged") is None  # at once: the lease was revoked
    assert raw_store.keepalive_once(kv.lease) == 0
    assert "storaged" in storaged.log.read_text()
    # the node is gone too: it had neither spec nor status, only the live key
    with pytest.raises(ApiCallError) as ei:
        api.get("node", "n1")
    assert ei.value.code == grpc.StatusCode.NOT_FOUND
