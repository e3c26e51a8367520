"""The network data path for real: three nodes (network namespaces on an
underlay bridge, each running its own braid-netd), "VM" endpoints as
namespaces, a real etcd and controller. Pings and TCP connections between
endpoints prove the overlay (VXLAN), isolation, the distributed router,
the firewall and DHCP; the end checks that nothing is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from braid.cli.main import wait_network_applied
from braid.v1 import network_pb2 as N
from net_daemon.model import gateway_mac, leg_names, port_tap
from tests.conftest import DaemonProc, running_controller, wait
from tests.integration.netlab import NetLab, missing_requirements

pytestmark = pytest.mark.integration

WAIT = 20.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    why = missing_requirements()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("netlab")
    lab = NetLab(tmp)
    netds: list[DaemonProc] = []
    servers: list[subprocess.Popen] = []
    try:
        etcd = lab.start_etcd()
        with running_controller(etcd, tmp, "net") as ctl:
            for node in lab.nodes:
                netds.append(DaemonProc("net_daemon.main", [
                    "--etcd", etcd.endpoint, "--prefix", ctl.prefix, "--node", node.name,
                    "--tunnel-ip", node.ip], tmp, f"netd-{node.name}", wrap=node.nsenter))
            yield SimpleNamespace(lab=lab, api=ctl.api, prefix=ctl.prefix, etcd=etcd, netds=netds,
                                  servers=servers, tmp=tmp, n1=lab.nodes[0], n2=lab.nodes[1],
                                  n3=lab.nodes[2])
    finally:
        for s in servers:
            s.kill()
        if os.environ.get("BRAID_KEEP_NETLAB"):  # debugging: leave it all up
            print(f"\nnetlab kept: namespaces {lab.tag}*, logs in {tmp}")
            return
        for d in netds:
            d.stop()
        lab.close()


def network(name: str) -> N.Network:
    o = N.Network()
    o.metadata.name = name
    return o


def subnet(name: str, net: str, cidr: str, dhcp: bool = False) -> N.Subnet:
    o = N.Subnet()
    o.metadata.name = name
    o.spec.network, o.spec.cidr, o.spec.dhcp = net, cidr, dhcp
    return o


def port(name: str, net: str, sn: str, ip: str, node: str, groups=()) -> N.Port:
    o = N.Port()
    o.metadata.name = name
    o.spec.network, o.spec.node, o.spec.vm, o.spec.nic = net, node, name, "eth0"
    o.spec.fixed_ips.add(subnet=sn, ip=ip)
    o.spec.security_groups.extend(groups)
    return o


def router(name: str, subnets: list[str]) -> N.Router:
    o = N.Router()
    o.metadata.name = name
    o.spec.subnets.extend(subnets)
    return o


def create(env, *objs) -> int:
    rev = 0
    for o in objs:
        rev = max(rev, env.api.create(o).metadata.resource_version)
    wait_network_applied(env.api, rev, WAIT)
    return rev


def attach(env, name: str, node, net: str, sn: str, ip: str, prefix: int, gw: str = "",
           groups=()):
    """A port and its endpoint (the endpoint first: the daemon enslaves its tap
    when the port appears)."""
    p = port(name, net, sn, ip, node.name, groups)
    p.spec.mac = "02:62:00:00:%02x:%02x" % (len(env.lab.endpoints), int(ip.rsplit(".", 1)[1]))
    ep = env.lab.endpoint(name, node, port_tap(p), p.spec.mac, f"{ip}/{prefix}", gw)
    ep.port = env.api.create(p)   # its tap exists already: the daemon enslaves it at once
    return ep


def settle(env, ep) -> None:
    """Wait until every net daemon has applied the latest change (touches the port)."""
    cur = env.api.get("port", ep.name)
    cur.metadata.labels["touched"] = str(time.monotonic_ns())
    cur.ClearField("status")
    rev = env.api.update(cur).metadata.resource_version
    wait_network_applied(env.api, rev, WAIT)


def dump(env) -> str:
    """The nodes' data path, for failure messages."""
    out = []
    for node in env.lab.nodes:
        for cmd in (["ip", "-d", "-br", "link"], ["bridge", "fdb", "show"], ["bridge", "link"],
                    ["ip", "neigh"], ["nft", "list", "ruleset"]):
            r = node.exec(*cmd, check=False)
            out.append(f"--- {node.name}: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return "\n".join(out)


def links(node) -> str:
    return node.exec("ip", "-d", "-o", "link", "show").stdout


def test_same_network_across_nodes(env):
    create(env, network("blue"), subnet("blue-a", "blue", "10.10.0.0/24", dhcp=True))
    ep1 = attach(env, "ep1", env.n1, "blue", "blue-a", "10.10.0.11", 24, "10.10.0.1")
    ep2 = attach(env, "ep2", env.n2, "blue", "blue-a", "10.10.0.12", 24, "10.10.0.1")
    settle(env, ep2)
    vni = env.api.get("network", "blue").status.vni
    for node in (env.n1, env.n2):
        ls = links(node)
        assert "br-blue" in ls and f"vx-{vni}" in ls and "vxlan id" in ls, ls
    assert "br-blue" not in links(env.n3)  # no port of blue there (yet)
    wait(lambda: list(env.api.get("network", "blue").status.nodes) == sorted([env.n1.name, env.n2.name]),
         WAIT, "blue's status to list the nodes of its ports")
    assert ep1.ping("10.10.0.12", count=3), f"ep1 (n1) cannot ping ep2 (n2) over VXLAN\n{dump(env)}"
    env.servers.append(ep2.serve_tcp(5000))
    assert ep1.tcp("10.10.0.12", 5000) == "ep2"
    # static FDB toward n2's VTEP, flood list, no learning on the VXLAN port
    fdb = env.n1.exec("bridge", "fdb", "show", "dev", f"vx-{vni}").stdout
    assert f"{ep2.port.spec.mac} dst {env.n2.ip}" in fdb and f"00:00:00:00:00:00 dst {env.n2.ip}" in fdb, fdb
    # ARP answered on n1: with n2 cut off the underlay, ep1 still resolves ep2's MAC
    env.n2.exec("ip", "link", "set", "eth0", "down")
    try:
        ep1.exec("ip", "neigh", "flush", "dev", "eth0")
        out = ep1.exec("busybox", "arping", "-c", "1", "-w", "2", "-I", "eth0", "10.10.0.12",
                       check=False).stdout
        assert ep2.port.spec.mac.upper() in out.upper(), out
    finally:
        env.n2.exec("ip", "link", "set", "eth0", "up")


def test_networks_are_isolated(env):
    # red reuses blue's addresses: only the L2 segment separates them
    create(env, network("red"), subnet("red-a", "red", "10.10.0.0/24"))
    ep3 = attach(env, "ep3", env.n3, "red", "red-a", "10.10.0.13", 24)
    ep3b = attach(env, "ep3b", env.n1, "red", "red-a", "10.10.0.14", 24)
    settle(env, ep3b)
    assert ep3b.ping("10.10.0.13", count=2), "red's own ports cannot talk"
    ep1, ep2 = env.lab.endpoints["ep1"], env.lab.endpoints["ep2"]
    assert not ep1.ping("10.10.0.13"), "blue reached red"
    assert not ep3.ping("10.10.0.12"), "red reached blue"
    assert ep2.ping("10.10.0.11")


def test_distributed_router_and_isolation_between_routers(env):
    create(env, network("green"), subnet("green-a", "green", "10.30.0.0/24"),
           network("pink"), subnet("pink-a", "pink", "10.40.0.0/24"))
    ep4 = attach(env, "ep4", env.n3, "green", "green-a", "10.30.0.14", 24, "10.30.0.1")
    ep5 = attach(env, "ep5", env.n2, "pink", "pink-a", "10.40.0.15", 24, "10.40.0.1")
    create(env, router("r1", ["blue-a", "green-a"]), router("r2", ["pink-a"]))
    ep1 = env.lab.endpoints["ep1"]
    settle(env, ep5)
    r1_n1 = f"braid-r-{env.n1.name}-r1"
    _, inner_green = leg_names("r1", "green")
    before = _tx(r1_n1, inner_green)
    assert ep1.ping("10.30.0.14", count=3), "blue (n1) cannot reach green (n3) through r1"
    env.servers.append(ep4.serve_tcp(5001))
    assert ep1.tcp("10.30.0.14", 5001) == "ep4"
    # routed on the sender's node: n1's router sent the packets into green
    assert _tx(r1_n1, inner_green) - before >= 3
    # the gateway answers with the anycast MAC, the same on every node
    neigh = ep1.exec("ip", "neigh", "show", "10.10.0.1").stdout
    assert gateway_mac("r1") in neigh, neigh
    assert ep5.ping("10.40.0.1"), "pink cannot reach its own gateway"
    assert not ep5.ping("10.10.0.11"), "r2's subnet reached r1's"
    assert not ep1.ping("10.40.0.15"), "r1's subnet reached r2's"


def _tx(netns: str, dev: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", netns, "cat", f"/sys/class/net/{dev}/statistics/tx_packets"],
                         capture_output=True, text=True).stdout.strip()
    return int(out or 0)


def _cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "braid.cli.main", "--server", env.api.address, *args],
                          capture_output=True, text=True, timeout=60)


def test_security_group_allows_ssh_from_one_group_only(env, tmp_path):
    ep1, ep2, ep4 = (env.lab.endpoints[n] for n in ("ep1", "ep2", "ep4"))
    admin = N.SecurityGroup()
    admin.metadata.name = "admin"
    ssh = N.SecurityGroup()
    ssh.metadata.name = "ssh"
    ssh.spec.rules.add(direction=N.INGRESS, protocol="tcp", port_min=22, port_max=22,
                       remote_group="admin")
    create(env, admin, ssh)
    for name, groups in (("ep1", ["admin"]), ("ep2", ["ssh"])):
        cur = env.api.get("port", name)
        cur.spec.security_groups[:] = groups
        cur.ClearField("status")
        rev = env.api.update(cur).metadata.resource_version
    wait_network_applied(env.api, rev, WAIT)
    env.servers.append(ep2.serve_tcp(22))
    assert ep1.tcp("10.10.0.12", 22) == "ep2", "admin member denied"
    assert ep4.tcp("10.10.0.12", 22, timeout=1.5) == "", "non-member allowed"
    assert not ep1.ping("10.10.0.12"), "ICMP allowed without a rule (default deny)"
    assert ep1.tcp("10.10.0.12", 5000, timeout=1.5) == "", "port 5000 allowed without a rule"
    # stateful: ep2's ingress allows only ssh, yet the answers to what it sends come back
    assert ep2.ping("10.30.0.14"), "the reply to ep2's own ping was dropped"

    # membership: ep4 joins admin -> the set changes on every node; --wait returns after
    manifest = tmp_path / "ep4.yaml"
    cur = env.api.get("port", "ep4")
    manifest.write_text(
        "kind: Port\nmetadata:\n  name: ep4\nspec:\n  network: green\n"
        f"  node: {cur.spec.node}\n  vm: ep4\n  nic: eth0\n  mac: '{cur.spec.mac}'\n"
        "  fixed_ips:\n  - subnet: green-a\n    ip: 10.30.0.14\n  security_groups: [admin]\n")
    t0 = time.monotonic()
    r = _cli(env, "apply", "-f", str(manifest), "--wait", str(WAIT))
    assert r.returncode == 0, r.stderr
    assert "live on every node" in r.stdout, r.stdout
    assert ep4.tcp("10.10.0.12", 22) == "ep2", f"not live when --wait returned: {r.stdout}"
    print(f"\nsecurity group membership change live on 3 nodes in {time.monotonic() - t0:.2f}s "
          f"(CLI incl. start-up): {r.stdout.strip()}")

    # a rule change: ICMP from blue's subnet
    manifest = tmp_path / "ssh.yaml"
    manifest.write_text(
        "kind: SecurityGroup\nmetadata:\n  name: ssh\nspec:\n  rules:\n"
        "  - {direction: INGRESS, protocol: tcp, port_min: 22, port_max: 22, remote_group: admin}\n"
        "  - {direction: INGRESS, protocol: icmp, remote_cidr: 10.10.0.0/24}\n")
    r = _cli(env, "apply", "-f", str(manifest), "--wait", str(WAIT))
    assert r.returncode == 0, r.stderr
    assert ep1.ping("10.10.0.12"), "rule not live when --wait returned"
    assert not ep4.ping("10.10.0.12"), "ICMP from green allowed (rule says blue only)"


def test_dhcp_gives_the_port_its_address(env, tmp_path):
    p = N.Port()
    p.metadata.name = "ep6"
    p.spec.network, p.spec.node, p.spec.vm, p.spec.nic = "blue", env.n3.name, "ep6", "eth0"
    p.spec.fixed_ips.add(subnet="blue-a", ip="10.10.0.66")
    tap = port_tap(p)
    ep6 = env.lab.endpoint("ep6", env.n3, tap, "02:62:00:00:06:06")
    p.spec.mac = "02:62:00:00:06:06"
    rev = env.api.create(p).metadata.resource_version
    wait_network_applied(env.api, rev, WAIT)
    script = tmp_path / "udhcpc.sh"
    out = tmp_path / "lease.env"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = bound ] && env > {out}\nexit 0\n")
    script.chmod(0o755)
    t0 = time.monotonic()
    r = ep6.exec("busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1",
                 "-s", str(script), check=False, timeout=30)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    lease = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert lease["ip"] == "10.10.0.66"
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"].split()[0] == "10.10.0.1"   # blue-a is on router r1
    assert lease.get("mtu") == "1450"
    print(f"\nDHCP lease through braid-netd on {env.n3.name} in {took:.2f}s")


def test_restarted_daemon_changes_nothing_that_is_right(env):
    """netd on n2 is stopped and started again: it reads the kernel's state and
    its first pass makes no netlink change and keeps the firewall's rules;
    the flows keep working across the restart."""
    ep1 = env.lab.endpoints["ep1"]
    i = env.lab.nodes.index(env.n2)
    old = env.netds[i]
    old.stop()
    assert ep1.tcp("10.10.0.12", 22) == "ep2", "the data path went away with the daemon"
    mark = old.log.stat().st_size
    old.state_file.unlink()   # DaemonProc waits for the new one
    env.netds[i] = DaemonProc("net_daemon.main", old.cmd[old.cmd.index("-m") + 2:old.cmd.index("--state-file")],
                              env.tmp, f"netd-{env.n2.name}", wrap=env.n2.nsenter)
    new = env.netds[i]
    wait(lambda: any(d.name == "netd" and d.live and d.pid == new.proc.pid
                     for d in env.api.get("node", env.n2.name).status.daemons), WAIT, "netd back on n2")
    rev = env.api.get("port", "ep2").metadata.resource_version
    wait_network_applied(env.api, rev, WAIT)
    new_lines = old.log.read_bytes()[mark:].decode(errors="replace").splitlines()
    first = next(line for line in new_lines if "pass at revision" in line)
    assert " 0 kernel changes" in first and "firewall full" not in first, first
    assert ep1.tcp("10.10.0.12", 22) == "ep2"


def test_delete_leaves_nothing_behind(env):
    api = env.api
    rev = 0
    for kind in ("port", "router", "subnet", "securitygroup", "network"):
        for obj in api.list(kind)[0]:
            rev = max(rev, api.delete(kind, obj.metadata.name).revision)
    wait_network_applied(api, rev, WAIT)
    for node in env.lab.nodes:
        ls = links(node)
        assert "braid:" not in ls and "vxlan" not in ls and "br-" not in ls, ls
        tables = node.exec("nft", "list", "tables").stdout
        assert "braid" not in tables, tables
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in left.splitlines()
                if any(line.startswith(f"braid-r-{n.name}-") for n in env.lab.nodes)], left
    assert all(d.proc.poll() is None for d in env.netds), "a net daemon died"
