"""A network lab on one machine: nodes are network namespaces joined by veth
to an underlay bridge (each with its own underlay IP, running its own
braid-netd inside), and "VM" endpoints are namespaces whose eth0's peer is
the port's tap device inside its node's namespace.

Everything the lab makes is named after the test process (``braid-t-net-<pid>-``,
underlay addresses in 198.18.0.0/15, the benchmarking range) and removed by
``close()``; labs of test processes that died are removed by ``remove_stale()``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from braid.dev.localetcd import EtcdProcess

PREFIX = "braid-t-net-"


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def netns_list() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nsenter", "nft", "busybox", "bridge"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/setup.sh)"
    return None


def remove_stale() -> None:
    """Namespaces and bridges of lab processes that are gone (kill -9)."""
    for ns in netns_list():
        if ns.startswith(PREFIX):
            pid = ns[len(PREFIX):].split("-")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                sh("ip", "netns", "del", ns, check=False)
        elif m := re.match(r"braid-r-t(\d+)n\d+-", ns):   # routers of lab nodes t<pid>n<i>
            if not Path(f"/proc/{m.group(1)}").exists():
                sh("ip", "netns", "del", ns, check=False)


@dataclass
class Node:
    name: str        # Braid node name
    netns: str
    ip: str          # underlay (VTEP) address

    def exec(self, *cmd: str, check: bool = True, timeout: float = 30):
        return sh("ip", "netns", "exec", self.netns, *cmd, check=check, timeout=timeout)

    @property
    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"]


@dataclass
class Endpoint:
    """A "VM": a namespace with eth0; the other end is ``tap`` in its node."""
    name: str
    netns: str
    node: Node
    tap: str

    def exec(self, *cmd: str, check: bool = True, timeout: float = 30):
        return sh("ip", "netns", "exec", self.netns, *cmd, check=check, timeout=timeout)

    def ping(self, ip: str, count: int = 1, wait: int = 1) -> bool:
        return self.exec("busybox", "ping", "-c", str(count), "-W", str(wait), "-q", ip, check=False).returncode == 0

    def serve_tcp(self, port: int) -> subprocess.Popen:
        """A TCP server that answers every connection with its endpoint name."""
        code = ("import socket,sys\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET,"
                "socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',%d)); s.listen(16)\nprint('up',flush=True)\n"
                "while True:\n c,_=s.accept(); c.sendall(b'%s'); c.close()\n") % (port, self.name.encode().decode())
        p = subprocess.Popen(["ip", "netns", "exec", self.netns, "python3", "-c", code],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "up"
        return p

    def tcp(self, ip: str, port: int, timeout: float = 2.0) -> str:
        """What a TCP connection to ip:port reads ('' when refused, dropped or timed out)."""
        code = ("import socket,sys\ntry:\n s=socket.create_connection(('%s',%d),timeout=%s)\n"
                " print(s.recv(100).decode())\nexcept OSError as e:\n print('')\n") % (ip, port, timeout)
        return self.exec("python3", "-c", code, timeout=timeout + 10).stdout.strip()


class NetLab:
    def __init__(self, tmp: Path, nodes: int = 3):
        remove_stale()
        self.pid = os.getpid()
        self.tmp = tmp
        self.tag = f"{PREFIX}{self.pid}-"
        third = self.pid % 250
        self.net = f"198.18.{third}"
        self.underlay = f"bnu{self.pid % 100000}"
        self.nodes: list[Node] = []
        self.endpoints: dict[str, Endpoint] = {}
        self.etcd: EtcdProcess | None = None
        sh("ip", "link", "add", self.underlay, "type", "bridge")
        sh("ip", "addr", "add", f"{self.net}.254/24", "dev", self.underlay)
        sh("ip", "link", "set", self.underlay, "up")
        for i in range(1, nodes + 1):
            self._node(i)

    def _node(self, i: int) -> Node:
        ns = f"{self.tag}n{i}"
        sh("ip", "netns", "add", ns)
        outer = f"bnu{self.pid % 100000}-{i}"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", outer, "master", self.underlay, "up")
        ip = f"{self.net}.{i}"
        for cmd in (["ip", "addr", "add", f"{ip}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                    ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", ns, *cmd)
        node = Node(f"t{self.pid}n{i}", ns, ip)
        self.nodes.append(node)
        return node

    def attach_node(self, name: str, netns: str) -> Node:
        """An existing namespace (e.g. a libvirt pair node) joins the underlay
        as node ``name``: a veth ``bu0`` with the next underlay address."""
        i = len(self.nodes) + 1
        outer = f"bnu{self.pid % 100000}-{i}"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", "bu0", "netns", netns)
        sh("ip", "link", "set", outer, "master", self.underlay, "up")
        ip = f"{self.net}.{i}"
        for cmd in (["ip", "addr", "add", f"{ip}/24", "dev", "bu0"], ["ip", "link", "set", "bu0", "up"],
                    ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", netns, *cmd)
        node = Node(name, netns, ip)
        self.nodes.append(node)
        return node

    def start_etcd(self) -> EtcdProcess:
        self.etcd = EtcdProcess(self.tmp / "etcd-data", log_path=self.tmp / "etcd.log",
                                host=f"{self.net}.254").start()
        return self.etcd

    def endpoint(self, name: str, node: Node, tap: str, mac: str, cidr: str = "",
                 gateway: str = "", mtu: int = 1450) -> Endpoint:
        ns = f"{self.tag}{name}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", tap, "netns", node.netns, "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        ep = Endpoint(name, ns, node, tap)
        ep.exec("ip", "link", "set", "eth0", "address", mac, "mtu", str(mtu), "up")
        ep.exec("ip", "link", "set", "lo", "up")
        if cidr:
            ep.exec("ip", "addr", "add", cidr, "dev", "eth0")
        if gateway:
            ep.exec("ip", "route", "add", "default", "via", gateway)
        self.endpoints[name] = ep
        return ep

    def close(self) -> None:
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop()
        for ns in netns_list():
            if ns.startswith(self.tag) or any(ns.startswith(f"braid-r-{n.name}-") for n in self.nodes):
                sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.underlay, check=False)
        time.sleep(0.1)
