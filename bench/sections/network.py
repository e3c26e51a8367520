"""Network: overlay throughput, security group changes going live, a net
daemon converging a node with 1000 ports.

The lab of the data path tests (``tests/integration/netlab.py``): three
nodes as network namespaces on an underlay bridge (MTU 1500), each running
braid-netd, a real etcd and controller; "VMs" are namespaces whose eth0's
peer is the port's tap in the node.

``overlay_tcp_throughput``: iperf3, one TCP stream, endpoint on node 1 ->
endpoint on node 2 of one network (VXLAN, both nodes' bridges, MTU 1450),
the receiver in a security group allowing only the iperf3 port (nftables +
conntrack in the path); ``_no_sg``: to a receiver without group. Baseline:
two namespaces joined by one veth pair (MTU 1450). Quick 3 s, full 10 s.

``sg_change_applied_seconds``: a rule of a group with ports on all 3 nodes
changed through the API, from the update call's return until the 3 netds'
presence keys in etcd (polled every 5 ms) report its revision applied;
median of quick 5 / full 20. ``sg_change_applied_1000_ports_seconds``: the
same later, with the 1000 ports below (a group of 170 of them).

``netd_convergence_1000_ports_seconds``: 1000 ports (10 networks x 100,
bound round-robin to the nodes, fixed IPs/MACs, half in one of 3 groups
whose rule names another group) created through the API; node 1's netd
stopped, its bridges/VXLAN/nft tables removed, a new netd started: from the
process start until it reports the current revision applied (cold).
``netd_restart_1000_ports_seconds``: the same with all in place (warm).
Params: what node 1's kernel holds; the FDB/neighbour entries of Braid
(permanent) and nftables changes seen on nodes 1 and 2 during the warm
restart (``ip monitor neigh``, ``nft monitor``); the netd's own count of
kernel changes, from its log. ``BRAID_BENCH_NETD_PROFILE=<path>``: py-spy
profiles of one more cold and warm start to <path>-cold/-warm.raw.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

from bench.framework import Metric, SectionContext
from braid import keys

MTU = 1450           # the networks' default (1500 underlay - 50 VXLAN)
IPERF_PORT = 5201
POLL = 0.005
WAIT = 120.0


def run(ctx: SectionContext) -> list[Metric]:
    from braid.v1 import network_pb2 as N
    from net_daemon.model import port_tap
    from tests.conftest import DaemonProc, running_controller
    from tests.integration.netlab import NetLab, missing_requirements, sh

    why = missing_requirements()
    if why:
        raise RuntimeError(f"cannot run: {why}")
    secs, changes = (3, 5) if ctx.quick else (10, 20)
    netds: list = []
    monitors: list[subprocess.Popen] = []
    out: list[Metric] = []

    def stop_all() -> None:
        for m in monitors:
            m.kill()
        for d in netds:
            d.stop()

    with contextlib.ExitStack() as cleanup:   # LIFO: daemons, controller (+ its keys), lab
        lab = NetLab(ctx.tmp_dir, nodes=3)
        cleanup.callback(lab.close)
        etcd = lab.start_etcd()
        ctl = cleanup.enter_context(running_controller(etcd, ctx.tmp_dir, "bench-net"))
        cleanup.callback(stop_all)
        api, store, nodes = ctl.api, ctl.store, lab.nodes
        live_keys = [keys.live(n.name, "netd") for n in nodes]

        def netd(i: int, wrap: list[str] = ()):
            n = nodes[i]
            return DaemonProc("net_daemon.main", [
                "--etcd", etcd.endpoint, "--prefix", ctl.prefix, "--node", n.name,
                "--tunnel-ip", n.ip], ctx.tmp_dir, f"netd-{n.name}", wrap=[*n.nsenter, *wrap])

        def applied(rev: int, which=live_keys, timeout: float = WAIT) -> float:
            """Seconds until every ``which`` presence reports ``rev`` applied."""
            t0 = time.perf_counter()
            while True:
                kvs, _ = store.get_many(which)
                if all(kv and int(json.loads(kv.value).get("applied_revision", 0)) >= rev
                       for kv in kvs.values()):
                    return time.perf_counter() - t0
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"revision {rev} not applied in {timeout}s: {kvs}")
                time.sleep(POLL)

        def create(*objs) -> int:
            return max(api.create(o).metadata.resource_version for o in objs)

        def networks(*specs: tuple[str, str]) -> None:   # with their VNIs (the controller's)
            create(*[_obj(N.Network, name) for name, _ in specs])
            create(*[_obj(N.Subnet, f"{name}-a", network=name, cidr=cidr) for name, cidr in specs])
            for name, _ in specs:
                _until(lambda: api.get("network", name).status.vni, "VNI of " + name)

        def port(name, net, ip, node, mac, groups=()):
            p = _obj(N.Port, name, network=net, node=node.name, vm=name, nic="eth0", mac=mac)
            p.spec.fixed_ips.add(subnet=f"{net}-a", ip=ip)
            p.spec.security_groups.extend(groups)
            return p

        netds.extend(netd(i) for i in range(3))

        # -- 1. throughput ---------------------------------------------------
        networks(("tput", "10.77.0.0/24"))
        sg = _obj(N.SecurityGroup, "iperf")
        sg.spec.rules.add(direction=N.INGRESS, protocol="tcp", port_min=IPERF_PORT,
                          port_max=IPERF_PORT, remote_cidr="10.77.0.0/24")
        create(sg)
        eps = {}
        for name, node, ip, groups in (("src", nodes[0], "10.77.0.11", ()),
                                       ("dst", nodes[1], "10.77.0.12", ("iperf",)),
                                       ("open", nodes[1], "10.77.0.13", ())):
            p = port(name, "tput", ip, node, f"02:62:4d:00:00:{ip.rsplit('.', 1)[1]}", groups)
            eps[name] = lab.endpoint(name, node, port_tap(p), p.spec.mac, f"{ip}/24", mtu=MTU)
            rev = create(p)
        applied(rev)
        _until(lambda: eps["src"].ping("10.77.0.13"), "overlay ping")
        sg_gbps = _iperf(eps["src"].netns, eps["dst"].netns, "10.77.0.12", secs)
        open_gbps = _iperf(eps["src"].netns, eps["open"].netns, "10.77.0.13", secs)
        va, vb = f"{lab.tag}va", f"{lab.tag}vb"   # removed by lab.close() with the lab's namespaces
        sh("ip", "netns", "add", va), sh("ip", "netns", "add", vb)
        sh("ip", "link", "add", "veth0", "netns", va, "type", "veth", "peer", "name", "veth0", "netns", vb)
        for ns, ip in ((va, "192.168.77.1/24"), (vb, "192.168.77.2/24")):
            for cmd in (["ip", "addr", "add", ip, "dev", "veth0"], ["ip", "link", "set", "lo", "up"],
                        ["ip", "link", "set", "veth0", "mtu", str(MTU), "up"]):
                sh("ip", "netns", "exec", ns, *cmd)
        veth_gbps = _iperf(va, vb, "192.168.77.2", secs)
        common = {"mtu": MTU, "duration_s": secs, "streams": 1, "tool": "iperf3"}
        out.append(Metric("overlay_tcp_throughput", sg_gbps, "Gbit/s", "veth_tcp_throughput", veth_gbps,
                          params={**common, "receiver_security_group": f"tcp {IPERF_PORT} only",
                                  "path": "veth>bridge+nft>vxlan>underlay>vxlan>bridge+nft>veth"}))
        out.append(Metric("overlay_tcp_throughput_no_sg", open_gbps, "Gbit/s", "veth_tcp_throughput",
                          veth_gbps, params={**common, "receiver_security_group": "none"}))

        # -- 2. a security group rule change, live on 3 nodes ------------------
        sg = _obj(N.SecurityGroup, "chg")
        sg.spec.rules.add(direction=N.INGRESS, protocol="tcp", port_min=1000, port_max=1000)
        create(sg)
        rev = create(*[port(f"chg{i}", "tput", f"10.77.0.{21 + i}", nodes[i], f"02:62:4d:00:01:{i:02x}",
                            ("chg",)) for i in range(3)])
        applied(rev)

        def sg_changes(group: str, n: int, metric: str, **params) -> Metric:
            lat, calls = [], []
            for i in range(n):
                cur = api.get("securitygroup", group)
                cur.spec.rules[0].port_min = cur.spec.rules[0].port_max = 1001 + i
                cur.ClearField("status")
                t0 = time.perf_counter()
                rev = api.update(cur).metadata.resource_version
                calls.append(time.perf_counter() - t0)
                lat.append(applied(rev))
                time.sleep(0.1)
            lat.sort()
            return Metric(metric, statistics.median(lat), "s", higher_is_better=False, params={
                "changes": n, "min_s": lat[0], "max_s": lat[-1], "p90_s": lat[-(-9 * n // 10) - 1],
                "update_call_median_s": statistics.median(calls), "nodes": 3, **params,
                "poll_ms": POLL * 1000})

        out.append(sg_changes("chg", changes, "sg_change_applied_seconds", ports_in_group=3, ports_total=6))

        # -- 3. 1000 ports: cold and warm convergence of node 1 --------------------
        n_nets, per_net = 10, 100
        for g in range(3):
            sg = _obj(N.SecurityGroup, f"g{g}")
            sg.spec.rules.add(direction=N.INGRESS, protocol="tcp", port_min=22, port_max=22,
                              remote_group=f"g{g - 1}" if g else "iperf")
            create(sg)
        networks(*[(f"s{k}", f"10.200.{k}.0/24") for k in range(n_nets)])
        t0 = time.perf_counter()
        for k in range(n_nets):
            for j in range(per_net):
                n = k * per_net + j
                rev = create(port(f"s{k}-{j}", f"s{k}", f"10.200.{k}.{10 + j}", nodes[n % 3],
                                  f"02:62:c8:00:{k:02x}:{j:02x}", [f"g{j % 3}"] if j % 2 == 0 else []))
        create_s = time.perf_counter() - t0
        first_apply_s = applied(rev)

        def restart(wrap: list[str] = ()) -> tuple[float, float, dict]:
            netds[0].stop()
            _until(lambda: store.get(live_keys[0]) is None, "node 1's presence gone")
            netds[0].state_file.unlink(missing_ok=True)   # else DaemonProc returns at once
            rev = store.revision()
            log_at = netds[0].log.stat().st_size
            t0 = time.perf_counter()
            netds[0] = netd(0, wrap)
            ready = time.perf_counter() - t0
            took = ready + applied(rev, live_keys[:1])
            if not wrap:   # its follow-up passes are over too (py-spy never is quiet)
                _quiet(netds[0].proc.pid)
            with open(netds[0].log) as f:   # the netd's own account of its passes, if it logs them
                f.seek(log_at)
                passes = re.findall(r"pass at revision \d+: (\d+) kernel changes, firewall (\w+)", f.read())
            return ready, took, {} if not passes else {
                "first_pass_kernel_changes": int(passes[0][0]), "first_pass_firewall": passes[0][1],
                "later_passes_kernel_changes": sum(int(c) for c, _ in passes[1:])}

        def wipe() -> None:   # node 1's data path, as on a freshly booted host
            netds[0].stop()
            sh(*nodes[0].nsenter, sys.executable, "-c",
               "from net_daemon.kernel import Kernel; from net_daemon import firewall\n"
               f"Kernel('{nodes[0].name}', '{nodes[0].ip}').remove_all(); firewall.remove()")
            left = nodes[0].exec("ip", "-o", "link", "show").stdout
            if "braid:" in left or nodes[0].exec("nft", "list", "tables").stdout.strip():
                raise RuntimeError(f"node 1 not clean after remove_all:\n{left}")

        wipe()
        ready_s, cold_s, cold_pass = restart()
        counts = _counts(nodes[0])
        logs = {}
        for who, node in (("n1", nodes[0]), ("n2", nodes[1])):
            for tool, cmd in (("fdb_neigh", ["ip", "-o", "monitor", "neigh"]), ("nft", ["nft", "monitor"])):
                logs[f"{who}_{tool}"] = path = ctx.tmp_dir / f"monitor-{who}-{tool}.log"
                with open(path, "w") as f:
                    monitors.append(subprocess.Popen([*node.nsenter, *cmd], stdout=f,
                                                     stderr=subprocess.STDOUT))
        time.sleep(0.5)
        warm_ready_s, warm_s, warm_pass = restart()
        applied(store.revision())
        _quiet(netds[1].proc.pid)
        for m in monitors:
            m.terminate()
            m.wait(5)
        events = {f"warm_{k}_events": sum(1 for x in p.read_text().splitlines() if x.strip() and (
            "nft" in k or re.search(r"PERMANENT|NOARP", x) and not re.search(r"lladdr (01:00:5e|33:33)", x)))
            for k, p in logs.items()}   # Braid's FDB/neighbour entries: static, not the kernel's multicast ones
        g0 = sum(1 for k in range(n_nets) for j in range(0, per_net, 6))
        big = sg_changes("g0", 3 if ctx.quick else 5, "sg_change_applied_1000_ports_seconds",
                         ports_in_group=g0, ports_total=n_nets * per_net + 6)
        if prof := os.environ.get("BRAID_BENCH_NETD_PROFILE"):   # py-spy: <prof>-cold/-warm.raw
            wipe()
            for kind in ("cold", "warm"):
                restart([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-r", "200",
                         "--idle", "-f", "raw", "-o", f"{prof}-{kind}.raw", "--"])
                os.killpg(netds[0].proc.pid, signal.SIGINT)   # py-spy writes its file
                netds[0].proc.wait(30)
        params = {"ports": n_nets * per_net, "networks": n_nets, "security_groups": 3,
                  "ports_on_node1": -(-n_nets * per_net // 3), "api_create_s": round(create_s, 2),
                  "api_creates_per_s": round(n_nets * per_net / create_s, 1),
                  "all_nodes_applied_after_last_create_s": round(first_apply_s, 2)}
        out.append(Metric("netd_convergence_1000_ports_seconds", cold_s, "s", higher_is_better=False,
                          params={**params, "process_ready_s": round(ready_s, 2), **counts,
                                  **cold_pass}))
        out.append(Metric("netd_restart_1000_ports_seconds", warm_s, "s", higher_is_better=False,
                          params={"process_ready_s": round(warm_ready_s, 2), **events, **warm_pass}))
        out.append(big)
    return out


def _obj(cls, name: str, **spec):
    o = cls()
    o.metadata.name = name
    for k, v in spec.items():
        setattr(o.spec, k, v)
    return o


def _until(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return v


def _quiet(pid: int, window: float = 0.5, timeout: float = 30.0) -> None:
    """Until process ``pid`` uses (almost) no CPU for ``window`` seconds."""
    def cpu() -> int:   # utime + stime, in clock ticks
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    deadline, last = time.monotonic() + timeout, cpu()
    while time.monotonic() < deadline:
        time.sleep(window)
        if (now := cpu()) - last <= 2:
            return
        last = now


def _iperf(client_ns: str, server_ns: str, ip: str, secs: int) -> float:
    """Gbit/s received by an iperf3 server in ``server_ns`` from one TCP stream."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", str(IPERF_PORT),
                               "--forceflush"], stdout=subprocess.PIPE, text=True)
    try:
        while "listening" not in (line := server.stdout.readline()):
            if not line:
                raise RuntimeError("iperf3 server did not start")
        r = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-c", ip, "-p", str(IPERF_PORT),
                            "-t", str(secs), "-J"], capture_output=True, text=True, timeout=secs + 30)
        res = json.loads(r.stdout)
        if "error" in res:
            raise RuntimeError(f"iperf3 to {ip}: {res['error']}")
        return res["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait(5)


def _counts(node) -> dict[str, int]:
    """What node 1's kernel holds after convergence."""
    def lines(*cmd: str) -> list[str]:
        return [x for x in node.exec(*cmd).stdout.splitlines() if x.strip()]
    fdb = lines("bridge", "fdb", "show")
    nft = lines("nft", "-a", "list", "ruleset")
    return {"bridges": len(lines("ip", "-o", "link", "show", "type", "bridge")),
            "vxlan_devices": len(lines("ip", "-o", "link", "show", "type", "vxlan")),
            "fdb_entries": len(fdb), "fdb_remote_entries": sum(" dst " in x for x in fdb),
            "neigh_entries": len(lines("ip", "neigh", "show", "nud", "permanent")),
            "nft_rules": sum("# handle" in x and "{" not in x for x in nft),
            "nft_chains": sum(x.lstrip().startswith("chain ") for x in nft)}
