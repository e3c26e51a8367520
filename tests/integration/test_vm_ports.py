"""A VM NIC on a network gets its port: made by the API with an allocated MAC
and IP (the NIC carries the MAC), kept when the manifest is applied again,
deleted with the NIC or the VM; a NIC naming a port takes that port."""

from __future__ import annotations

import grpc
import pytest

from braid.cli.manifests import load
from braid.client import ApiCallError
from braid.v1 import meta_pb2, network_pb2
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def _vm(name: str, *nics: dict):
    vm = load(str(ROOT / "examples" / "tiny-vm.yaml"))[0].obj
    vm.metadata.name = name
    vm.spec.node = ""
    for n in nics:
        vm.spec.nics.add(**n)
    return vm


@pytest.fixture
def net(api):
    api.create(network_pb2.Network(metadata=meta_pb2.ObjectMeta(name="lan")))
    api.create(network_pb2.Subnet(metadata=meta_pb2.ObjectMeta(name="lan-a"),
                                  spec=network_pb2.SubnetSpec(network="lan", cidr="10.5.0.0/24")))
    api.create(network_pb2.SecurityGroup(metadata=meta_pb2.ObjectMeta(name="web")))
    return "lan"


def test_nic_gets_a_port_with_mac_and_ip(api, net):
    vm = api.create(_vm("app", dict(name="eth0", network="lan", security_groups=["web"])))
    nic = vm.spec.nics[0]
    assert nic.port == "app-eth0" and nic.mac.startswith("02:62:")
    port = api.get("port", "app-eth0")
    assert (port.spec.vm, port.spec.nic, port.spec.mac) == ("app", "eth0", nic.mac)
    assert port.spec.fixed_ips[0].subnet == "lan-a" and port.spec.fixed_ips[0].ip == "10.5.0.2"
    assert list(port.spec.security_groups) == ["web"]
    assert port.metadata.labels["braid.io/vm"] == "app"

    # applying the same manifest again keeps the port (no new MAC or IP)
    again = _vm("app", dict(name="eth0", network="lan", security_groups=["web"]))
    again.spec.node = vm.spec.node
    updated = api.update(again)
    assert updated.spec.nics[0].port == "app-eth0" and updated.spec.nics[0].mac == nic.mac
    assert [p.metadata.name for p in api.list("port")[0]] == ["app-eth0"]

    # a second NIC gets its own port; removing it deletes that port
    two = api.get("vm", "app")
    two.spec.nics.add(name="eth1", network="lan")
    two.ClearField("status")
    two = api.update(two)
    assert two.spec.nics[1].port == "app-eth1"
    assert api.get("port", "app-eth1").spec.fixed_ips[0].ip == "10.5.0.3"
    del two.spec.nics[1]
    two.ClearField("status")
    api.update(two)
    assert [p.metadata.name for p in api.list("port")[0]] == ["app-eth0"]

    # deleting the VM deletes its port and frees the address
    api.delete("vm", "app")
    assert api.list("port")[0] == []
    api.create(_vm("next", dict(name="eth0", network="lan")))
    assert api.get("port", "next-eth0").spec.fixed_ips[0].ip == "10.5.0.2"


def test_nic_naming_a_port(api, net):
    api.create(network_pb2.Port(metadata=meta_pb2.ObjectMeta(name="fixed"),
                                spec=network_pb2.PortSpec(network="lan", fixed_ips=[
                                    network_pb2.FixedIP(subnet="lan-a", ip="10.5.0.50")])))
    vm = api.create(_vm("db", dict(name="eth0", network="lan", port="fixed")))
    port = api.get("port", "fixed")
    assert vm.spec.nics[0].mac == port.spec.mac and (port.spec.vm, port.spec.nic) == ("db", "eth0")
    # another VM cannot take it; a port of another network cannot be used
    with pytest.raises(ApiCallError) as e:
        api.create(_vm("thief", dict(name="eth0", network="lan", port="fixed")))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "belongs to vm 'db'" in str(e.value)
    api.create(network_pb2.Network(metadata=meta_pb2.ObjectMeta(name="other")))
    with pytest.raises(ApiCallError) as e:
        api.create(_vm("wrong", dict(name="eth0", network="other", port="fixed")))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "is on network 'lan'" in str(e.value)
    with pytest.raises(ApiCallError) as e:
        api.create(_vm("none", dict(name="eth0", network="lan", port="nosuch")))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    # the VM deleted: a port it did not make stays (only its own are removed)
    api.delete("vm", "db")
    assert api.get("port", "fixed").spec.fixed_ips[0].ip == "10.5.0.50"
    assert {p.metadata.name for p in api.list("port")[0]} == {"fixed"}


def test_failed_vm_create_leaves_no_port(api, net):
    api.create(_vm("dup", dict(name="eth0", network="lan")))
    with pytest.raises(ApiCallError) as e:
        api.create(_vm("dup", dict(name="eth0", network="lan")))
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    # a NIC whose security group does not exist: refused, nothing allocated
    with pytest.raises(ApiCallError) as e:
        api.create(_vm("bad", dict(name="eth0", network="lan", security_groups=["nosuch"])))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {p.metadata.name for p in api.list("port")[0]} == {"dup-eth0"}


def test_port_declared_for_the_nic_is_adopted(api, net):
    declared = api.create(network_pb2.Port(metadata=meta_pb2.ObjectMeta(name="web1-eth0"),
                                           spec=network_pb2.PortSpec(network="lan", vm="web1", nic="eth0")))
    vm = api.create(_vm("web1", dict(name="eth0", network="lan")))
    assert vm.spec.nics[0].port == "web1-eth0" and vm.spec.nics[0].mac == declared.spec.mac
    api.delete("vm", "web1")   # not made for the VM: it stays
    assert api.get("port", "web1-eth0").spec.mac == declared.spec.mac
