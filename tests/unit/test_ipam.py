"""IPAM planners and the network checks (pure: no etcd)."""

from __future__ import annotations

import ipaddress
import itertools

import grpc
import pytest

from braid.v1 import network_pb2
from controller import ipam
from controller.checks import port_problems, router_violations, subnet_violations
from controller.ipam import (
    PortWorld,
    default_gateway,
    ip_key,
    ip_problem,
    keep_allocations,
    mac_key,
    mac_problem,
    next_free_ip,
    overlapping,
    plan_port,
    random_mac,
    reserved,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
TAKEN = grpc.StatusCode.ALREADY_EXISTS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def net(cidr):
    return ipaddress.ip_network(cidr)


# -- addresses ---------------------------------------------------------------------------

def test_default_gateway_is_the_first_host():
    assert default_gateway("10.0.0.0/24") == "10.0.0.1"
    assert default_gateway("10.0.0.0/30") == "10.0.0.1"
    assert default_gateway("2001:db8::/64") == "2001:db8::1"
    assert default_gateway("not-a-cidr") == ""
    assert default_gateway("10.0.0.1/24") == ""   # host bits set: not a subnet
    assert default_gateway("10.0.0.0/31") == ""   # too small for a subnet


def test_reserved_addresses():
    assert reserved(net("10.0.0.0/24"), "10.0.0.1") == {
        ipaddress.ip_address(a) for a in ("10.0.0.0", "10.0.0.255", "10.0.0.1")}
    # IPv6 has no broadcast address
    assert reserved(net("2001:db8::/120"), "2001:db8::1") == {
        ipaddress.ip_address("2001:db8::"), ipaddress.ip_address("2001:db8::1")}


def test_next_free_ip_skips_network_gateway_and_taken():
    n = net("10.0.0.0/24")
    assert next_free_ip(n, "10.0.0.1", []) == "10.0.0.2"
    assert next_free_ip(n, "10.0.0.1", ["10.0.0.2", "10.0.0.3"]) == "10.0.0.4"
    assert next_free_ip(n, "10.0.0.1", ["10.0.0.3"]) == "10.0.0.2"  # lowest free, gaps first
    assert next_free_ip(n, "10.0.0.9", []) == "10.0.0.1"            # gateway elsewhere
    assert next_free_ip(n, "", []) == "10.0.0.1"


def test_next_free_ip_never_gives_the_broadcast_address():
    n = net("10.0.0.0/30")  # hosts .1 (gateway) and .2
    assert next_free_ip(n, "10.0.0.1", []) == "10.0.0.2"
    assert next_free_ip(n, "10.0.0.1", ["10.0.0.2"]) is None


def test_next_free_ip_full_26():
    n = net("10.0.0.0/26")
    taken: list[str] = []
    while (ip := next_free_ip(n, "10.0.0.1", taken)) is not None:
        taken.append(ip)
    assert len(taken) == 61 and len(set(taken)) == 61  # 62 hosts minus the gateway
    assert taken[0] == "10.0.0.2" and taken[-1] == "10.0.0.62"
    assert "10.0.0.63" not in taken and "10.0.0.0" not in taken


def test_next_free_ip_ipv6_uses_the_last_address_too():
    n = net("2001:db8::/126")  # ::0 network, ::1 gateway, ::2, ::3
    assert next_free_ip(n, "2001:db8::1", ["2001:db8::2"]) == "2001:db8::3"
    assert next_free_ip(n, "2001:db8::1", ["2001:db8::2", "2001:db8::3"]) is None


def test_next_free_ip_ignores_garbage_in_taken():
    assert next_free_ip(net("10.0.0.0/29"), "10.0.0.1", ["junk", "10.0.0.2"]) == "10.0.0.3"


@pytest.mark.parametrize("ip,why", [
    ("10.0.0.5", ""),
    ("10.0.0.254", ""),
    ("10.0.1.5", "10.0.1.5 is outside 10.0.0.0/24"),
    ("2001:db8::5", "2001:db8::5 is outside 10.0.0.0/24"),
    ("10.0.0.0", "10.0.0.0 is the network address of 10.0.0.0/24"),
    ("10.0.0.255", "10.0.0.255 is the broadcast address of 10.0.0.0/24"),
    ("10.0.0.1", "10.0.0.1 is the gateway of 10.0.0.0/24"),
])
def test_ip_problem(ip, why):
    assert ip_problem(net("10.0.0.0/24"), "10.0.0.1", ip) == why


def test_overlapping():
    others = [("a", "10.0.0.0/24"), ("b", "10.0.1.0/24"), ("c", "10.0.0.128/25"),
              ("v6", "2001:db8::/64"), ("junk", "nope")]
    assert overlapping("10.0.0.0/25", others) == [("a", "10.0.0.0/24")]
    assert overlapping("10.0.0.0/16", others) == [("a", "10.0.0.0/24"), ("b", "10.0.1.0/24"),
                                                 ("c", "10.0.0.128/25")]
    assert overlapping("10.0.2.0/24", others) == []
    assert overlapping("2001:db8::/48", others) == [("v6", "2001:db8::/64")]
    assert overlapping("garbage", others) == []


def _bits(mac: str) -> int:
    return int(mac.split(":")[0], 16)


def test_random_mac_format_unicast_locally_administered():
    macs = {random_mac() for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        assert mac.startswith("02:62:") and len(mac) == 17
        assert all(len(p) == 2 and p == p.lower() for p in mac.split(":"))
        assert _bits(mac) & 0x01 == 0   # unicast
        assert _bits(mac) & 0x02 == 2   # locally administered
        assert mac_problem(mac) == ""


def test_random_mac_uses_the_random_bytes():
    assert random_mac(lambda n: bytes([0xde, 0xad, 0xbe, 0xef][:n])) == "02:62:de:ad:be:ef"


def test_mac_problem_refuses_multicast():
    assert mac_problem("01:00:5e:00:00:01") == "01:00:5e:00:00:01 is a multicast address"
    assert mac_problem("52:54:00:12:34:56") == ""


# -- port planning ---------------------------------------------------------------------

def subnet(network="n", cidr="10.0.0.0/24", gateway=""):
    return network_pb2.SubnetSpec(network=network, cidr=cidr, gateway=gateway)


def world(**kw):
    base = dict(exists=False, network=True, subnets={"s": subnet(gateway="10.0.0.1")},
                security_groups=frozenset(), ips={}, macs={})
    base.update(kw)
    return PortWorld(**base)


def port(network="n", mac="", fixed=(), sgs=()):
    return network_pb2.PortSpec(network=network, mac=mac, security_groups=list(sgs),
                                fixed_ips=[network_pb2.FixedIP(subnet=s, ip=i) for s, i in fixed])


def counter_bytes():
    c = itertools.count(1)
    return lambda n: next(c).to_bytes(n, "big")


def codes(plan):
    return [(v.field, v.code) for v in plan.problems]


def test_plan_allocates_mac_and_first_ip():
    plan = plan_port("p", port(fixed=[("s", "")]), world(), counter_bytes())
    assert plan.problems == []
    assert plan.spec.mac == "02:62:00:00:00:01"
    assert [(f.subnet, f.ip) for f in plan.spec.fixed_ips] == [("s", "10.0.0.2")]
    assert plan.claims == {mac_key("02:62:00:00:00:01"): "p", ip_key("s", "10.0.0.2"): "p"}
    assert plan.chosen == set(plan.claims)


def test_plan_without_fixed_ips_uses_the_networks_first_subnet_by_name():
    subnets = {"b": subnet(cidr="10.0.1.0/24"), "a": subnet(cidr="10.0.2.0/24"),
               "other": subnet(network="m", cidr="10.0.0.0/24")}
    plan = plan_port("p", port(), world(subnets=subnets))
    assert [(f.subnet, f.ip) for f in plan.spec.fixed_ips] == [("a", "10.0.2.2")]
    plan = plan_port("p", port(), world(subnets={"other": subnet(network="m")}))
    assert plan.problems == [] and list(plan.spec.fixed_ips) == []  # no subnet: no address


def test_plan_requested_values_are_not_chosen():
    plan = plan_port("p", port(mac="52:54:00:00:00:01", fixed=[("s", "10.0.0.9")]), world())
    assert plan.problems == [] and plan.chosen == frozenset()
    assert plan.spec.mac == "52:54:00:00:00:01"
    assert set(plan.claims) == {mac_key("52:54:00:00:00:01"), ip_key("s", "10.0.0.9")}


def test_plan_two_addresses_in_one_subnet_differ():
    plan = plan_port("p", port(fixed=[("s", ""), ("s", "")]), world())
    assert [f.ip for f in plan.spec.fixed_ips] == ["10.0.0.2", "10.0.0.3"]
    plan = plan_port("p", port(fixed=[("s", "10.0.0.2"), ("s", "")]), world())
    assert [f.ip for f in plan.spec.fixed_ips] == ["10.0.0.2", "10.0.0.3"]
    plan = plan_port("p", port(fixed=[("s", "10.0.0.5"), ("s", "10.0.0.5")]), world())
    assert codes(plan) == [("spec.fixed_ips[1].ip", INVALID)]


def test_plan_skips_taken_and_uses_default_gateway():
    w = world(subnets={"s": subnet()}, ips={"s": {"10.0.0.2": "x", "10.0.0.4": "y"}})
    plan = plan_port("p", port(fixed=[("s", "")]), w)
    assert plan.spec.fixed_ips[0].ip == "10.0.0.3"


def test_plan_missing_network_is_a_precondition():
    plan = plan_port("p", port(fixed=[("s", "")]), world(network=False))
    assert codes(plan) == [("spec.network", PRECONDITION)]
    assert "network 'n' does not exist" in plan.problems[0].description


@pytest.mark.parametrize("fixed,field,code,text", [
    ([("nope", "")], "spec.fixed_ips[0].subnet", INVALID, "subnet 'nope' does not exist"),
    ([("m1", "")], "spec.fixed_ips[0].subnet", INVALID, "belongs to network 'm', not 'n'"),
    ([("s", "10.0.1.5")], "spec.fixed_ips[0].ip", INVALID, "outside"),
    ([("s", "10.0.0.0")], "spec.fixed_ips[0].ip", INVALID, "network address"),
    ([("s", "10.0.0.255")], "spec.fixed_ips[0].ip", INVALID, "broadcast address"),
    ([("s", "10.0.0.1")], "spec.fixed_ips[0].ip", INVALID, "gateway"),
    ([("s", "10.0.0.7")], "spec.fixed_ips[0].ip", TAKEN, "10.0.0.7 is already used by port 'x'"),
    ([("s", ""), ("full", "")], "spec.fixed_ips[1]", EXHAUSTED, "has no free address"),
])
def test_plan_address_errors(fixed, field, code, text):
    full_ips = {"10.0.0.2": "a", "10.0.0.3": "b"}
    w = world(subnets={"s": subnet(gateway="10.0.0.1"), "m1": subnet(network="m"),
                       "full": subnet(cidr="10.0.0.0/29", gateway="10.0.0.1")},
              ips={"s": {"10.0.0.7": "x"},
                   "full": {**full_ips, "10.0.0.4": "c", "10.0.0.5": "d", "10.0.0.6": "e"}})
    plan = plan_port("p", port(fixed=fixed), w)
    assert codes(plan) == [(field, code)]
    assert text in plan.problems[0].description


def test_plan_auto_address_from_a_full_first_subnet():
    w = world(subnets={"s": subnet(cidr="10.0.0.0/30", gateway="10.0.0.1")},
              ips={"s": {"10.0.0.2": "x"}})
    plan = plan_port("p", port(), w)
    assert codes(plan) == [("spec.fixed_ips", EXHAUSTED)]


def test_plan_mac_errors():
    plan = plan_port("p", port(mac="52:54:00:00:00:01"), world(macs={"52:54:00:00:00:01": "q"}))
    assert codes(plan) == [("spec.mac", TAKEN)]
    assert plan.problems[0].description == "52:54:00:00:00:01 is already used by port 'q'"
    plan = plan_port("p", port(mac="03:00:00:00:00:01"), world())
    assert codes(plan) == [("spec.mac", INVALID)]


def test_plan_security_groups_must_exist():
    plan = plan_port("p", port(sgs=["web", "db"]), world(security_groups=frozenset({"web"})))
    assert codes(plan) == [("spec.security_groups[1]", INVALID)]
    assert plan.problems[0].description == "security group 'db' does not exist"


def test_plan_canonicalises_requested_ipv6():
    w = world(subnets={"s6": subnet(cidr="2001:db8::/64")})
    plan = plan_port("p", port(fixed=[("s6", "2001:db8:0::0005")]), w)
    assert plan.problems == [] and plan.spec.fixed_ips[0].ip == "2001:db8::5"
    assert ip_key("s6", "2001:db8::5") in plan.claims


# -- port updates ----------------------------------------------------------------------

OLD = port(mac="02:62:00:00:00:01", fixed=[("s", "10.0.0.2"), ("t", "10.0.1.2")])


@pytest.mark.parametrize("new", [
    port(),
    port(mac="02:62:00:00:00:01"),
    port(fixed=[("s", ""), ("t", "")]),
    port(fixed=[("s", "10.0.0.2"), ("t", "")]),
    port(mac="02:62:00:00:00:01", fixed=[("s", "10.0.0.2"), ("t", "10.0.1.2")]),
])
def test_keep_allocations_on_reapply(new):
    keep_allocations(new, OLD)
    assert new == OLD
    assert port_problems(None, network_pb2.Port(spec=new), network_pb2.Port(spec=OLD)) == []


@pytest.mark.parametrize("new,field", [
    (port(mac="02:62:00:00:00:02"), "spec.mac"),
    (port(fixed=[("s", "10.0.0.3"), ("t", "")]), "spec.fixed_ips"),
    (port(fixed=[("s", "")]), "spec.fixed_ips"),
    (port(fixed=[("t", ""), ("s", "")]), "spec.fixed_ips"),
    (port(network="m"), "spec.network"),
])
def test_changing_allocations_is_refused(new, field):
    keep_allocations(new, OLD)
    errs = port_problems(None, network_pb2.Port(spec=new), network_pb2.Port(spec=OLD))
    assert [(e.field, e.code) for e in errs] == [(field, INVALID)]
    assert "delete and recreate the port" in errs[0].description


# -- subnets and routers -----------------------------------------------------------------

def rt(*subnets):
    return network_pb2.RouterSpec(subnets=list(subnets))


def test_subnet_overlap_in_the_same_network():
    others = {"a": subnet(cidr="10.0.0.0/24"), "other": subnet(network="m", cidr="10.0.0.0/24")}
    errs = subnet_violations("b", subnet(cidr="10.0.0.0/25"), None, True, others, {})
    assert [(e.field, e.code) for e in errs] == [("spec.cidr", INVALID)]
    assert errs[0].description == "10.0.0.0/25 overlaps subnet 'a' (10.0.0.0/24) of network 'n'"
    assert subnet_violations("b", subnet(cidr="10.0.1.0/24"), None, True, others, {}) == []
    # its own stored spec is no overlap
    assert subnet_violations("a", subnet(gateway="10.0.0.1"), subnet(gateway="10.0.0.1"),
                             True, others, {}) == []


def test_subnet_overlap_on_the_same_router():
    others = {"a": subnet(network="m", cidr="10.0.0.0/24"),
              "c": network_pb2.SubnetSpec(network="k", cidr="10.0.0.0/16", router="r")}
    mine = network_pb2.SubnetSpec(network="n", cidr="10.0.0.128/25", router="r")
    errs = subnet_violations("b", mine, None, True, others, {"r": rt("a")})
    assert sorted(e.description for e in errs) == [
        "10.0.0.128/25 overlaps subnet 'a' (10.0.0.0/24) attached to router 'r'",
        "10.0.0.128/25 overlaps subnet 'c' (10.0.0.0/16) attached to router 'r'"]
    # attached the other way (the router lists it)
    mine.router = ""
    errs = subnet_violations("b", mine, None, True, others, {"r": rt("a", "b")})
    assert len(errs) == 2 and all(e.field == "spec.cidr" for e in errs)
    # not attached: no conflict across networks
    assert subnet_violations("b", mine, None, True, others, {"r": rt("a")}) == []


def test_subnet_prerequisites_and_fixed_fields():
    s = network_pb2.SubnetSpec(network="n", cidr="10.0.0.0/24", gateway="10.0.0.1", router="r")
    errs = subnet_violations("b", s, None, False, {}, {})
    assert [(e.field, e.code) for e in errs] == [("spec.network", PRECONDITION),
                                                 ("spec.router", PRECONDITION)]
    old = network_pb2.SubnetSpec(network="n", cidr="10.0.0.0/23", gateway="10.0.0.9")
    errs = subnet_violations("b", s, old, True, {}, {"r": rt()})
    assert [(e.field, e.code) for e in errs] == [("spec.cidr", INVALID), ("spec.gateway", INVALID)]
    # a gateway stored empty (before defaults) means the default one
    old = network_pb2.SubnetSpec(network="n", cidr="10.0.0.0/24")
    assert subnet_violations("b", s, old, True, {}, {"r": rt()}) == []


def test_subnet_with_two_routers():
    s = network_pb2.SubnetSpec(network="n", cidr="10.0.0.0/24", router="r1")
    errs = subnet_violations("b", s, None, True, {}, {"r1": rt(), "r2": rt("b")})
    assert [(e.field, e.code) for e in errs] == [("spec.router", INVALID)]


def test_router_checks():
    subnets = {"a": subnet(cidr="10.0.0.0/24"), "b": subnet(network="m", cidr="10.0.0.0/25"),
               "c": subnet(cidr="10.1.0.0/24"), "d": network_pb2.SubnetSpec(
                   network="k", cidr="10.1.0.0/16", router="r"),
               "e": network_pb2.SubnetSpec(network="k", cidr="10.9.0.0/16", router="other")}
    assert router_violations("r", rt("a"), subnets, {"r": rt("a")}) == []
    errs = router_violations("r", rt("a", "x"), subnets, {})
    assert [(e.field, e.code) for e in errs] == [("spec.subnets[1]", PRECONDITION)]
    errs = router_violations("r", rt("a", "b"), subnets, {})
    assert [(e.field, e.code) for e in errs] == [("spec.subnets[1]", INVALID)]
    assert "overlaps subnet 'a'" in errs[0].description
    errs = router_violations("r", rt("c"), subnets, {})   # c vs d (attached by d.spec.router)
    assert [(e.field, e.code) for e in errs] == [("spec.subnets", INVALID)]
    errs = router_violations("r", rt("e"), subnets, {})
    assert [(e.field, e.code) for e in errs] == [("spec.subnets[0]", INVALID)]
    assert "already attached to router 'other'" in errs[0].description
    errs = router_violations("r", rt("a"), subnets, {"r2": rt("a")})
    assert "already attached to router 'r2'" in errs[0].description


def test_violation_is_a_field_error():
    v = ipam.Violation("spec.mac", "x", TAKEN)
    assert str(v) == "spec.mac: x" and v.code == TAKEN
    assert ipam.Violation("f", "d").code == PRECONDITION
