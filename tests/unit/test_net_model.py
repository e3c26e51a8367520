"""The net daemon's pure parts: desired node state and the firewall ruleset."""

from __future__ import annotations

import copy

from braid.v1 import compute_pb2
from braid.v1 import network_pb2 as N
from braid.validation import MAC_RE
from net_daemon import firewall as F
from net_daemon import model as M


def _net(name, vni, mtu=0):
    o = N.Network()
    o.metadata.name = name
    o.status.vni = vni
    o.spec.mtu = mtu
    return o


def _subnet(name, net, cidr, gw, router="", dhcp=False, dns=()):
    o = N.Subnet()
    o.metadata.name = name
    o.spec.network, o.spec.cidr, o.spec.gateway, o.spec.router, o.spec.dhcp = net, cidr, gw, router, dhcp
    o.spec.dns_servers.extend(dns)
    return o


def _port(name, net, sn, ip, mac, node="", vm="", groups=()):
    o = N.Port()
    o.metadata.name = name
    o.spec.network, o.spec.mac, o.spec.node, o.spec.vm = net, mac, node, vm
    o.spec.nic = "eth0" if vm else ""
    o.spec.fixed_ips.add(subnet=sn, ip=ip)
    o.spec.security_groups.extend(groups)
    return o


def _router(name, subnets=()):
    o = N.Router()
    o.metadata.name = name
    o.spec.subnets.extend(subnets)
    return o


def snap() -> M.Snapshot:
    s = M.Snapshot()
    s.networks = {"blue": _net("blue", 1001), "green": _net("green", 1002), "red": _net("red", 1003)}
    s.subnets = {"blue-a": _subnet("blue-a", "blue", "10.0.0.0/24", "10.0.0.1", dhcp=True, dns=["9.9.9.9"]),
                 "green-a": _subnet("green-a", "green", "10.1.0.0/24", "10.1.0.1"),
                 "red-a": _subnet("red-a", "red", "10.0.0.0/24", "10.0.0.1")}
    s.routers = {"r1": _router("r1", ["blue-a", "green-a"])}
    s.ports = {"a": _port("a", "blue", "blue-a", "10.0.0.5", "02:62:00:00:00:05", node="n1"),
               "b": _port("b", "blue", "blue-a", "10.0.0.6", "02:62:00:00:00:06", vm="vmb"),
               "c": _port("c", "green", "green-a", "10.1.0.7", "02:62:00:00:00:07", node="n3"),
               "d": _port("d", "red", "red-a", "10.0.0.8", "02:62:00:00:00:08", node="n2")}
    vm = compute_pb2.VM()
    vm.metadata.name = "vmb"
    vm.spec.node = "n2"
    s.vms = {"vmb": vm}
    s.tunnels = {"n1": "192.0.2.1", "n2": "192.0.2.2", "n3": "192.0.2.3"}
    return s


def test_bridges_fdb_flood_and_suppression_entries():
    st = M.desired(snap(), "n1")
    # blue (own port), green (same router as blue): red has no port on n1
    assert set(st.bridges) == {"br-blue", "br-green"}
    blue = st.bridges["br-blue"]
    assert (blue.vni, blue.vxlan, blue.mtu) == (1001, "vx-1001", 1450)
    # b is bound through its VM's node (n2); c's node hosts green, hence blue by the router
    assert blue.fdb == {"02:62:00:00:00:06": "192.0.2.2"}
    assert blue.flood == {"192.0.2.2", "192.0.2.3"}
    assert blue.neigh == {"10.0.0.5": "02:62:00:00:00:05", "10.0.0.6": "02:62:00:00:00:06",
                          "10.0.0.1": M.gateway_mac("r1")}
    assert blue.taps == {M.port_tap(snap().ports["a"])}
    assert set(st.ports) == {"a"}
    assert st.bridges["br-green"].fdb == {"02:62:00:00:00:07": "192.0.2.3"}


def test_dhcp_leases_only_for_local_ports_of_dhcp_subnets():
    st = M.desired(snap(), "n1")
    lease = st.bridges["br-blue"].dhcp["02:62:00:00:00:05"]
    assert (lease.ip, lease.prefix_len, lease.gateway, lease.server_ip, lease.dns, lease.mtu) == \
        ("10.0.0.5", 24, "10.0.0.1", "10.0.0.1", ("9.9.9.9",), 1450)
    assert list(st.bridges["br-blue"].dhcp) == ["02:62:00:00:00:05"]
    assert st.bridges["br-green"].dhcp == {}   # green-a has no DHCP


def test_router_legs_and_anycast_gateway():
    s = snap()
    a, b = M.desired(s, "n1").routers["r1"], M.desired(s, "n3").routers["r1"]
    assert a.mac == b.mac == M.gateway_mac("r1")
    assert MAC_RE.match(a.mac) and a.mac != M.gateway_mac("r2")
    assert int(a.mac[:2], 16) & 2 and not int(a.mac[:2], 16) & 1   # local, unicast
    assert a.legs["blue"].addresses == ("10.0.0.1/24",) and a.legs["green"].addresses == ("10.1.0.1/24",)
    outer, inner = M.leg_names("r1", "green")
    assert a.legs["green"].outer == outer and len(outer) <= 15 and len(inner) <= 15
    assert a.neigh[(inner, "10.1.0.7")] == "02:62:00:00:00:07"
    # n2 hosts blue's port b: it routes too; red (no router) has no router state
    assert set(M.desired(s, "n2").routers) == {"r1"}
    s.subnets["green-a"].spec.router = ""
    s.routers["r1"].spec.subnets.remove("green-a")
    assert set(M.desired(s, "n1").bridges) == {"br-blue"}


def test_subnet_router_field_attaches_too_and_unbound_ports_are_nowhere():
    s = snap()
    s.routers = {"r9": _router("r9")}
    s.subnets["red-a"].spec.router = "r9"
    assert M.subnet_router(s, "red-a") == "r9"
    s.ports["e"] = _port("e", "blue", "blue-a", "10.0.0.9", "02:62:00:00:00:09")   # no node, no VM
    st = M.desired(s, "n1")
    assert "10.0.0.9" in st.bridges["br-blue"].neigh and "02:62:00:00:00:09" not in st.bridges["br-blue"].fdb


def test_missing_vtep_and_vni_are_reported_not_fatal():
    s = snap()
    del s.tunnels["n2"]
    s.networks["green"].status.vni = 0
    st = M.desired(s, "n1")
    assert any("n2" in p for p in st.problems) and any("green" in p for p in st.problems)
    assert "br-blue" in st.bridges and "br-green" not in st.bridges


def _sg(name, *rules):
    o = N.SecurityGroup()
    o.metadata.name = name
    for r in rules:
        o.spec.rules.add(**r)
    return o


def test_firewall_rules_sets_and_default_deny():
    s = snap()
    s.groups = {"admin": _sg("admin"),
                "ssh": _sg("ssh", dict(direction=N.INGRESS, protocol="tcp", port_min=22, port_max=22,
                                       remote_group="admin"),
                           dict(direction=N.EGRESS, protocol="udp", port_min=53, port_max=53,
                                remote_cidr="10.0.0.0/8"))}
    s.ports["a"].spec.security_groups.append("ssh")
    s.ports["c"].spec.security_groups.append("admin")
    st = M.desired(s, "n1")
    rs = F.render(s, st.ports)
    tap = M.port_tap(s.ports["a"])
    assert f'iifname "{tap}" meta mark set 0x00000001' in rs.marks
    assert "ip saddr @sg-admin-v4 meta l4proto tcp tcp dport 22 accept" in rs.chains
    assert "ip daddr 10.0.0.0/8 meta l4proto udp udp dport 53 return" in rs.chains
    assert "ether saddr != 02:62:00:00:00:05 drop" in rs.chains
    assert "ip saddr != { 10.0.0.5 } drop" in rs.chains
    in_chain = rs.chains.split("chain in-a {")[1].split("}")[0]
    assert in_chain.strip().endswith("drop")   # default deny with a group
    assert rs.sets["sg-admin-v4"] == ["10.1.0.7"] and rs.sets["sg-ssh-v4"] == ["10.0.0.5"]
    assert rs.chains.index("ct state established,related accept") < rs.chains.index("@sg-admin-v4")


def test_membership_change_rewrites_a_set_not_the_rules():
    s = snap()
    s.groups = {"admin": _sg("admin"), "ssh": _sg("ssh", dict(direction=N.INGRESS, protocol="tcp",
                                                                port_min=22, remote_group="admin"))}
    s.ports["a"].spec.security_groups.append("ssh")
    old = F.render(s, M.desired(s, "n1").ports)
    s2 = copy.deepcopy(s)
    s2.ports["d"].spec.security_groups.append("admin")   # a port on another node joins admin
    new = F.render(s2, M.desired(s2, "n1").ports)
    batch = new.set_update(old)
    assert batch == ("flush set inet braid sg-admin-v4\n"
                     "add element inet braid sg-admin-v4 { 10.0.0.8 }\n")
    assert new.set_update(new) == ""
    s2.groups["ssh"].spec.rules[0].port_min = 2222     # a rule change: the whole table
    assert F.render(s2, M.desired(s2, "n1").ports).set_update(new) is None
    full = new.full_batch()
    assert full.startswith("table bridge braid\ndelete table bridge braid\ntable inet braid\n")
    assert f'comment "{new.digest}"' in full
    assert new.digest == old.digest            # set contents are not part of it
    assert "flush set inet braid sg-ssh-v4" in new.set_update(None)   # after a restart


def test_port_without_groups_is_open_but_not_spoofable():
    s = snap()
    rs = F.render(s, M.desired(s, "n1").ports)
    in_chain = rs.chains.split("chain in-a {")[1].split("}")[0]
    assert "drop" not in in_chain.replace("ct state invalid drop", "")
    eg = rs.chains.split("chain eg-a {")[1].split("}")[0]
    assert "ether saddr != 02:62:00:00:00:05 drop" in eg


def test_one_machine_cluster_serves_every_node_from_one_daemon():
    s = snap()
    st = M.desired(s, "n1", also=frozenset({"n2", "n3"}))
    assert set(st.ports) == {"a", "b", "c", "d"}
    assert all(not b.fdb and not b.flood for b in st.bridges.values())   # nothing is remote
    assert set(st.bridges) == {"br-blue", "br-green", "br-red"}
    assert s.ports["b"].spec.node == ""   # the caller's snapshot is untouched


def test_snapshot_skips_what_does_not_decode_or_validate():
    from braid.kinds import to_json
    from braid.store import KV
    from net_daemon.main import snapshot

    def kv(key, msg_or_bytes):
        value = msg_or_bytes if isinstance(msg_or_bytes, bytes) else to_json(msg_or_bytes)
        return KV(key=key, value=value, create_revision=1, mod_revision=1, version=1, lease=0)

    good = snap().ports["a"]
    bad_ip = _port("x", "blue", "blue-a", "999.1.1.1", "02:62:00:00:00:99", node="n1")
    s, problems = snapshot([kv("port/spec/a", good), kv("port/spec/x", bad_ip),
                            kv("port/spec/y", b"[1,2"), kv("network/spec/blue", snap().networks["blue"]),
                            kv("net/vtep/n9", b"192.0.2.9"), kv("net/vtep/n8", b"garbage"),
                            kv("port/status/zz", good)])   # a status without spec: nothing
    assert set(s.ports) == {"a"} and set(s.networks) == {"blue"} and s.tunnels == {"n9": "192.0.2.9"}
    assert len(problems) == 3 and any("port x ignored" in p for p in problems)


def test_rule_naming_a_missing_group_allows_nothing():
    s = snap()
    s.groups = {"ssh": _sg("ssh", dict(direction=N.INGRESS, protocol="tcp", port_min=22,
                                       remote_group="gone"))}
    s.ports["a"].spec.security_groups.append("ssh")
    rs = F.render(s, M.desired(s, "n1").ports)
    assert "@sg-gone" not in rs.chains and rs.chains.split("chain in-a {")[1].split("}")[0].strip().endswith("drop")
