"""IPAM and the semantic checks of network objects, through a real
controller on a real etcd: every refusal with its gRPC code and field,
addresses filled in on create, released on delete, and no duplicate IP or
MAC under concurrent creates on two controller replicas."""

from __future__ import annotations

import threading

import grpc
import pytest

from braid.client import ApiCallError, Client
from braid.store import AlreadyExists, Guard, GuardFailed
from braid.v1 import meta_pb2, network_pb2
from tests.conftest import DaemonProc, running_controller

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
TAKEN = grpc.StatusCode.ALREADY_EXISTS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
KIND_PREFIXES = ("network/", "subnet/", "port/", "router/", "securitygroup/",
                 "ipam/ip/", "ipam/mac/")


# -- helpers -----------------------------------------------------------------------------

def md(name):
    return meta_pb2.ObjectMeta(name=name)


def network(name="n"):
    return network_pb2.Network(metadata=md(name))


def subnet(name="s", net="n", cidr="10.0.0.0/24", gateway="", router=""):
    return network_pb2.Subnet(metadata=md(name), spec=network_pb2.SubnetSpec(
        network=net, cidr=cidr, gateway=gateway, router=router))


def port(name="p", net="n", mac="", fixed=(), sgs=(), vm=""):
    return network_pb2.Port(metadata=md(name), spec=network_pb2.PortSpec(
        network=net, mac=mac, security_groups=list(sgs), vm=vm,
        fixed_ips=[network_pb2.FixedIP(subnet=s, ip=i) for s, i in fixed]))


def router(name="r", *subnets):
    return network_pb2.Router(metadata=md(name), spec=network_pb2.RouterSpec(subnets=list(subnets)))


def sg(name="web", *remote_groups):
    rules = [network_pb2.SecurityGroupRule(direction=network_pb2.INGRESS, remote_group=g)
             for g in remote_groups]
    return network_pb2.SecurityGroup(metadata=md(name), spec=network_pb2.SecurityGroupSpec(
        rules=rules))


def copy(msg):
    return type(msg).FromString(msg.SerializeToString())


def refused(fn, *args, code, field=None, text=None) -> ApiCallError:
    with pytest.raises(ApiCallError) as ei:
        fn(*args)
    exc = ei.value
    assert exc.code == code, exc
    if field is not None:
        assert field in [f for f, _ in exc.violations], exc.violations
        assert field in exc.message, exc.message
    if text is not None:
        assert text in exc.message, exc.message
    return exc


def allocations(store) -> dict[str, str]:
    kvs, _ = store.list("ipam/")
    return {kv.key: kv.value.decode() for kv in kvs if not kv.key.startswith("ipam/vni/")}


def port_keys(p) -> dict[str, str]:
    out = {f"ipam/mac/{p.spec.mac}": p.metadata.name}
    out.update({f"ipam/ip/{f.subnet}/{f.ip}": p.metadata.name for f in p.spec.fixed_ips})
    return out


@pytest.fixture(scope="module")
def shared(etcd_server, tmp_path_factory):
    with running_controller(etcd_server, tmp_path_factory.mktemp("ipam"), "ipam") as c:
        yield c


@pytest.fixture
def c(shared):
    """The shared controller, emptied of network objects after each test."""
    yield shared
    for p in KIND_PREFIXES:
        shared.store.delete_prefix(p)
    assert shared.proc.proc.poll() is None, "the controller died"


@pytest.fixture
def net(c):
    """Network n with subnet s (10.0.0.0/24) and security group web."""
    c.api.create(network())
    c.api.create(subnet())
    c.api.create(sg())
    return c


# -- Store.create_many ---------------------------------------------------------------------

def test_create_many_all_or_nothing(store):
    rev = store.create_many({"a": b"1", "b": b"2"})
    got, _ = store.get_many(["a", "b"])
    assert got["a"].value == b"1" and got["a"].mod_revision == rev == got["b"].mod_revision
    with pytest.raises(AlreadyExists) as ei:
        store.create_many({"c": b"3", "b": b"x", "a": b"y"})
    assert ei.value.keys == ["b", "a"] and "b already exists" in str(ei.value)
    assert store.get("c") is None and store.get("b").value == b"2"
    # a guard that fails: nothing written
    with pytest.raises(GuardFailed):
        store.create_many({"d": b"4"}, guards=[Guard("a", rev + 1000)])
    assert store.get("d") is None
    store.create_many({"d": b"4"}, guards=[Guard("a", rev)])
    assert store.get("d").value == b"4"
    assert AlreadyExists("old style").keys == []  # still raisable without keys


# -- port create -----------------------------------------------------------------------------

def test_port_create_fills_mac_and_ip(net):
    api, store = net.api, net.store
    s = api.get("subnet", "s")
    assert s.spec.gateway == "10.0.0.1"  # the default gateway is stored
    p = api.create(port("p1", sgs=["web"]))
    assert p.spec.mac.startswith("02:62:") and len(p.spec.mac) == 17
    assert [(f.subnet, f.ip) for f in p.spec.fixed_ips] == [("s", "10.0.0.2")]
    got = api.get("port", "p1")
    assert got.spec == p.spec and got.metadata.resource_version == p.metadata.resource_version
    p2 = api.create(port("p2", fixed=[("s", "")]))
    assert p2.spec.fixed_ips[0].ip == "10.0.0.3" and p2.spec.mac != p.spec.mac
    p3 = api.create(port("p3", mac="52:54:00:00:00:03", fixed=[("s", "10.0.0.200")]))
    assert (p3.spec.mac, p3.spec.fixed_ips[0].ip) == ("52:54:00:00:00:03", "10.0.0.200")
    assert allocations(store) == {**port_keys(p), **port_keys(p2), **port_keys(p3)}
    # the allocation keys were written in the port's own transaction
    assert all(kv.create_revision == p3.metadata.create_revision
               for kv in store.list("ipam/mac/52:54:00:00:00:03")[0])


def test_port_in_a_network_without_subnets_gets_no_address(c):
    c.api.create(network())
    p = c.api.create(port())
    assert list(p.spec.fixed_ips) == [] and p.spec.mac
    assert allocations(c.store) == port_keys(p)


def test_port_create_refusals(net):
    api, store = net.api, net.store
    api.create(network("m"))
    api.create(subnet("other", net="m", cidr="10.9.0.0/24"))
    api.create(port("x", mac="52:54:00:00:00:05", fixed=[("s", "10.0.0.5")]))
    before = allocations(store)
    cases = [
        (port("a", net="nope"), PRECONDITION, "spec.network", "network 'nope' does not exist"),
        (port("a", fixed=[("nope", "")]), INVALID, "spec.fixed_ips[0].subnet",
         "subnet 'nope' does not exist"),
        (port("a", fixed=[("other", "")]), INVALID, "spec.fixed_ips[0].subnet",
         "subnet 'other' belongs to network 'm', not 'n'"),
        (port("a", fixed=[("s", "10.0.1.9")]), INVALID, "spec.fixed_ips[0].ip",
         "10.0.1.9 is outside 10.0.0.0/24"),
        (port("a", fixed=[("s", "10.0.0.0")]), INVALID, "spec.fixed_ips[0].ip", "network address"),
        (port("a", fixed=[("s", "10.0.0.255")]), INVALID, "spec.fixed_ips[0].ip",
         "broadcast address"),
        (port("a", fixed=[("s", "10.0.0.1")]), INVALID, "spec.fixed_ips[0].ip",
         "10.0.0.1 is the gateway"),
        (port("a", fixed=[("s", "10.0.0.5")]), TAKEN, "spec.fixed_ips[0].ip",
         "10.0.0.5 is already used by port 'x'"),
        (port("a", mac="52:54:00:00:00:05"), TAKEN, "spec.mac",
         "52:54:00:00:00:05 is already used by port 'x'"),
        (port("a", mac="01:00:5e:00:00:01"), INVALID, "spec.mac", "multicast"),
        (port("a", sgs=["web", "db"]), INVALID, "spec.security_groups[1]",
         "security group 'db' does not exist"),
    ]
    for obj, code, field, text in cases:
        refused(api.create, obj, code=code, field=field, text=text)
        assert refused(api.get, "port", "a", code=grpc.StatusCode.NOT_FOUND)
        assert allocations(store) == before, obj  # a refused create claims nothing
    refused(api.create, port("x"), code=TAKEN, text="port 'x' already exists")


def test_full_subnet_is_resource_exhausted(c):
    c.api.create(network())
    c.api.create(subnet(cidr="10.0.0.0/30"))  # .1 gateway, .2 the only host
    assert c.api.create(port("a")).spec.fixed_ips[0].ip == "10.0.0.2"
    refused(c.api.create, port("b"), code=EXHAUSTED, field="spec.fixed_ips",
            text="subnet 's' (10.0.0.0/30) has no free address")
    refused(c.api.create, port("b", fixed=[("s", "")]), code=EXHAUSTED, field="spec.fixed_ips[0]")


def test_delete_frees_the_address_and_mac(net):
    api, store = net.api, net.store
    a = api.create(port("a", mac="52:54:00:00:00:0a"))
    b = api.create(port("b"))
    assert [a.spec.fixed_ips[0].ip, b.spec.fixed_ips[0].ip] == ["10.0.0.2", "10.0.0.3"]
    api.delete("port", "a")
    assert allocations(store) == port_keys(b)
    c = api.create(port("c", mac="52:54:00:00:00:0a"))  # the MAC is free again
    assert c.spec.fixed_ips[0].ip == "10.0.0.2"          # the lowest free address again
    assert allocations(store) == {**port_keys(b), **port_keys(c)}


# -- port update -------------------------------------------------------------------------------

def test_reapplying_a_port_manifest_keeps_its_allocations(net):
    api = net.api
    manifest = port("p", sgs=["web"], vm="web1")
    created = api.create(manifest)
    again = copy(manifest)
    again.metadata.resource_version = created.metadata.resource_version
    same = api.update(again)
    assert same.spec == created.spec and same.metadata.generation == 1
    # the same subnet with an empty ip, or the allocated values spelled out
    for fixed, mac in (([("s", "")], ""), ([("s", "10.0.0.2")], created.spec.mac)):
        same = api.update(port("p", mac=mac, fixed=fixed, sgs=["web"], vm="web1"))
        assert same.spec == created.spec and same.metadata.generation == 1


def test_port_update_what_may_change(net):
    api = net.api
    api.create(sg("db"))
    created = api.create(port("p", sgs=["web"]))
    new = copy(created)
    new.spec.security_groups.append("db")
    new.spec.vm, new.spec.nic, new.spec.node = "web1", "eth0", "node1"
    updated = api.update(new)
    assert list(updated.spec.security_groups) == ["web", "db"] and updated.spec.node == "node1"
    assert updated.metadata.generation == 2
    assert updated.spec.mac == created.spec.mac
    assert updated.spec.fixed_ips == created.spec.fixed_ips

    bad = copy(updated)
    bad.spec.security_groups.append("nope")
    refused(api.update, bad, code=INVALID, field="spec.security_groups[2]",
            text="security group 'nope' does not exist")
    bad = copy(updated)
    bad.spec.mac = "52:54:00:00:00:99"
    refused(api.update, bad, code=INVALID, field="spec.mac",
            text="cannot be changed")
    bad = copy(updated)
    bad.spec.fixed_ips[0].ip = "10.0.0.50"
    refused(api.update, bad, code=INVALID, field="spec.fixed_ips",
            text="delete and recreate the port")
    bad = copy(updated)
    bad.spec.fixed_ips.add(subnet="s")
    refused(api.update, bad, code=INVALID, field="spec.fixed_ips")
    api.create(network("m"))
    bad = copy(updated)
    bad.spec.network = "m"
    refused(api.update, bad, code=INVALID, field="spec.network")
    assert api.get("port", "p").spec == updated.spec
    assert allocations(net.store) == port_keys(updated)


# -- subnets ---------------------------------------------------------------------------------

def test_subnet_checks(c):
    api = c.api
    refused(api.create, subnet(), code=PRECONDITION, field="spec.network",
            text="network 'n' does not exist")
    api.create(network())
    api.create(network("m"))
    refused(api.create, subnet(router="r"), code=PRECONDITION, field="spec.router",
            text="router 'r' does not exist")
    a = api.create(subnet("a", cidr="10.0.0.0/24", gateway="10.0.0.254"))
    assert a.spec.gateway == "10.0.0.254"
    refused(api.create, subnet("b", cidr="10.0.0.0/25"), code=INVALID, field="spec.cidr",
            text="10.0.0.0/25 overlaps subnet 'a' (10.0.0.0/24) of network 'n'")
    assert api.create(subnet("b", net="m", cidr="10.0.0.0/25")).spec.gateway == "10.0.0.1"

    # subnets on one router must not overlap, whatever their networks
    api.create(router("r"))
    api.create(subnet("c", cidr="10.1.0.0/24", router="r"))
    refused(api.create, subnet("d", net="m", cidr="10.1.0.0/16", router="r"), code=INVALID,
            field="spec.cidr", text="overlaps subnet 'c' (10.1.0.0/24) attached to router 'r'")
    api.create(subnet("d", net="m", cidr="10.1.0.0/16"))  # not on the router: fine

    # cidr and gateway are fixed; other fields may change
    for field, value in (("cidr", "10.0.0.0/23"), ("gateway", "10.0.0.2")):
        bad = copy(a)
        setattr(bad.spec, field, value)
        refused(api.update, bad, code=INVALID, field=f"spec.{field}", text="cannot be changed")
    ok = copy(a)
    ok.spec.dhcp = True
    ok.spec.gateway = ""   # an empty gateway means the default one, not the stored one
    refused(api.update, ok, code=INVALID, field="spec.gateway")
    ok.spec.gateway = "10.0.0.254"
    assert api.update(ok).spec.dhcp is True


def test_subnet_delete_refused_while_ports_use_it(net):
    api = net.api
    api.create(port("p1"))
    api.create(port("p2"))
    refused(api.delete, "subnet", "s", code=PRECONDITION,
            text="cannot delete subnet 's': it is still used by ports: p1, p2")
    api.delete("port", "p1")
    api.delete("port", "p2")
    api.delete("subnet", "s")
    refused(api.get, "subnet", "s", code=grpc.StatusCode.NOT_FOUND)


# -- routers -----------------------------------------------------------------------------------

def test_router_checks(c):
    api = c.api
    api.create(network())
    api.create(network("m"))
    api.create(subnet("a", cidr="10.0.0.0/24"))
    api.create(subnet("b", net="m", cidr="10.0.0.0/25"))
    api.create(subnet("c", net="m", cidr="10.2.0.0/24"))
    refused(api.create, router("r", "a", "x"), code=PRECONDITION, field="spec.subnets[1]",
            text="subnet 'x' does not exist")
    refused(api.create, router("r", "a", "b"), code=INVALID, field="spec.subnets[1]",
            text="subnet 'b' (10.0.0.0/25) overlaps subnet 'a' (10.0.0.0/24) on router 'r'")
    r = api.create(router("r", "a"))
    refused(api.create, router("r2", "a"), code=INVALID, field="spec.subnets[0]",
            text="subnet 'a' is already attached to router 'r'")
    # attached the other way: by the subnet's spec.router
    api.create(router("r3"))
    api.create(subnet("d", cidr="10.3.0.0/24", router="r3"))
    refused(api.create, router("r4", "d"), code=INVALID, field="spec.subnets[0]",
            text="already attached to router 'r3'")
    bad = copy(api.get("subnet", "c"))
    bad.spec.router = "r3"
    api.update(bad)  # c (10.2.0.0/24) now on r3 with d: no overlap
    bad = copy(api.get("subnet", "b"))
    bad.spec.router = "r"
    refused(api.update, bad, code=INVALID, field="spec.cidr",
            text="overlaps subnet 'a' (10.0.0.0/24) attached to router 'r'")
    # a subnet listed by one router cannot name another
    bad = copy(api.get("subnet", "a"))
    bad.spec.router = "r3"
    refused(api.update, bad, code=INVALID, field="spec.router")
    # the router's own subnets plus those naming it must not overlap
    api.create(subnet("e", net="m", cidr="10.5.0.0/24", router="r"))
    upd = copy(r)
    upd.spec.subnets.append("c")
    refused(api.update, upd, code=INVALID, field="spec.subnets[1]",
            text="already attached to router 'r3'")


# -- networks and security groups --------------------------------------------------------------

def test_network_delete_refused_while_used(net):
    api = net.api
    api.create(port("p"))
    refused(api.delete, "network", "n", code=PRECONDITION,
            text="cannot delete network 'n': it is still used by subnets: s; ports: p")
    api.delete("port", "p")
    refused(api.delete, "network", "n", code=PRECONDITION, text="still used by subnets: s")
    api.delete("subnet", "s")
    api.delete("network", "n")


def test_security_group_checks(net):
    api = net.api
    refused(api.create, sg("db", "web", "nope"), code=INVALID,
            field="spec.rules[1].remote_group", text="security group 'nope' does not exist")
    api.create(sg("db", "web", "db"))  # itself and an existing group
    api.create(port("p", sgs=["db"]))
    refused(api.delete, "securitygroup", "db", code=PRECONDITION,
            text="cannot delete securitygroup 'db': it is still used by ports: p")
    api.delete("port", "p")
    api.delete("securitygroup", "db")


# -- concurrency ---------------------------------------------------------------------------

def test_concurrent_creates_on_two_replicas_never_duplicate(c, etcd_server, tmp_path):
    """2 threads x 40 ports into one /26 (61 free addresses), each thread
    talking to its own controller replica: 61 ports, 19 RESOURCE_EXHAUSTED,
    no address or MAC twice."""
    c.api.create(network())
    c.api.create(subnet(cidr="10.0.0.0/26"))
    second = DaemonProc("controller.main", ["--etcd", etcd_server.endpoint, "--prefix", c.prefix],
                        tmp_path, "controller-2")
    clients = [Client(c.proc.address), Client(second.address)]
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def creator(t: int) -> None:
        barrier.wait()
        for i in range(40):
            name = f"t{t}-{i}"
            obj = port(name, fixed=[("s", "")] if i % 2 else ())
            try:
                results[name] = clients[t].create(obj)
            except ApiCallError as exc:
                results[name] = exc

    try:
        threads = [threading.Thread(target=creator, args=(t,)) for t in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
    finally:
        for cl in clients:
            cl.close()
        second.stop()
    assert len(results) == 80
    made = [r for r in results.values() if not isinstance(r, ApiCallError)]
    failed = [r for r in results.values() if isinstance(r, ApiCallError)]
    assert {f.code for f in failed} <= {EXHAUSTED}, failed[:3]
    assert len(made) == 61 and len(failed) == 19
    ips = [p.spec.fixed_ips[0].ip for p in made]
    macs = [p.spec.mac for p in made]
    assert len(set(ips)) == 61 and len(set(macs)) == 61
    assert sorted(ips) == sorted(f"10.0.0.{i}" for i in range(2, 63))
    stored = {p.metadata.name: p for p in c.api.list("port")[0]}
    assert set(stored) == {p.metadata.name for p in made}
    expected = {}
    for p in stored.values():
        expected.update(port_keys(p))
    assert allocations(c.store) == expected  # one key per address and MAC, no leftovers
