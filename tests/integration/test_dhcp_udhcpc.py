"""net_daemon.dhcp against a real client: busybox udhcpc.

Two network namespaces joined by a veth pair: in the "server" one the veth
is a port of bridge brd0 (no IP on it), and the responder runs there in its
own process (this module run with ``python -m``, driven by JSON lines on its
stdin, answering each with its stats); in the "client" one udhcpc runs on the
other end, whose MAC is set to the lease's (or to an unknown one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "braid-t-dhcp-"
MAC_A, MAC_B, MAC_C = "02:62:00:d0:00:0a", "02:62:00:d0:00:0b", "02:62:00:d0:00:0c"
LEASE_A = {"mac": MAC_A, "ip": "10.77.0.5", "prefix_len": 24, "gateway": "10.77.0.1",
           "server_ip": "10.77.0.1", "dns": ["10.77.0.53", "9.9.9.9"], "mtu": 1450,
           "hostname": "vm-a"}
LEASE_B = {"mac": MAC_B, "ip": "10.77.0.6", "prefix_len": 24, "gateway": "", "server_ip": "10.77.0.1"}
LEASE_C = {"mac": MAC_C, "ip": "10.78.0.9", "prefix_len": 16, "gateway": "10.78.0.1",
           "server_ip": "10.78.0.1", "dns": ["10.78.0.1"]}
SCRIPT = """#!/bin/sh
[ "$1" = bound ] || exit 0
for v in ip subnet mask router dns mtu hostname lease serverid; do
  eval "echo $v=\\$$v"
done > "{out}"
"""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, AF_PACKET)"
    for tool in ("ip", "busybox"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    applets = subprocess.run(["busybox", "--list"], capture_output=True, text=True).stdout.split()
    return None if "udhcpc" in applets else "busybox has no udhcpc applet"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _kill_netns(ns: str) -> None:
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", ns, check=False)


def _remove_stale() -> None:
    """Namespaces of test processes killed before their teardown (name carries the pid)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        pid = ns[len(PREFIX):].split("-")[0]
        if ns.startswith(PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _kill_netns(ns)


class Net:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.srv = f"{PREFIX}{os.getpid()}-s"
        self.cli = f"{PREFIX}{os.getpid()}-c"
        self.server: subprocess.Popen | None = None

    def setup(self) -> None:
        for ns in (self.srv, self.cli):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        self.add_port("brd0", "vs0", "vc0")
        with open(self.tmp / "responder.log", "ab") as log:
            self.server = subprocess.Popen(
                ["ip", "netns", "exec", self.srv, sys.executable, "-m", "tests.integration.test_dhcp_udhcpc"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(ROOT))

    def add_port(self, bridge: str, srv_if: str, cli_if: str) -> None:
        _ip("-n", self.srv, "link", "add", srv_if, "type", "veth", "peer", "name", cli_if, "netns", self.cli)
        _ip("-n", self.srv, "link", "add", bridge, "type", "bridge")
        _ip("-n", self.srv, "link", "set", srv_if, "master", bridge)
        for ns, dev in ((self.srv, bridge), (self.srv, srv_if), (self.cli, cli_if)):
            _ip("-n", ns, "link", "set", dev, "up")

    def call(self, **cmd) -> dict:
        """Send a command to the responder; its stats afterwards."""
        self.server.stdin.write(json.dumps(cmd) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"responder died: {(self.tmp / 'responder.log').read_text()}")
        return json.loads(line)

    def set_hosts(self, ifname: str, *leases: dict) -> dict:
        return self.call(op="set", ifname=ifname, leases={le["mac"]: le for le in leases})

    def udhcpc(self, ifname: str, mac: str, tries: int = 5) -> tuple[int, dict | None, float]:
        """(exit code, the "bound" environment or None, seconds from start to exit)."""
        _ip("-n", self.cli, "link", "set", ifname, "down")
        _ip("-n", self.cli, "link", "set", ifname, "address", mac)
        _ip("-n", self.cli, "link", "set", ifname, "up")
        out = self.tmp / f"bound-{ifname}-{mac.replace(':', '')}.env"
        out.unlink(missing_ok=True)
        script = self.tmp / "udhcpc.sh"
        script.write_text(SCRIPT.format(out=out))
        script.chmod(0o755)
        t0 = time.monotonic()
        p = subprocess.run(["ip", "netns", "exec", self.cli, "busybox", "udhcpc", "-i", ifname, "-n", "-q",
                            "-f", "-t", str(tries), "-T", "1", "-s", str(script)],
                           capture_output=True, text=True, timeout=30)
        took = time.monotonic() - t0
        env = None
        if out.exists():
            env = dict(line.split("=", 1) for line in out.read_text().splitlines())
        return p.returncode, env, took

    def teardown(self) -> None:
        if self.server is not None:
            with contextlib.suppress(OSError):
                self.server.stdin.close()
            try:
                self.server.wait(5)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(5)
        for ns in (self.srv, self.cli):
            _kill_netns(ns)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    why = _missing()
    if why:
        pytest.skip(why)
    _remove_stale()
    n = Net(tmp_path_factory.mktemp("dhcp"))
    try:
        n.setup()
        yield n
    finally:
        n.teardown()


def test_udhcpc_gets_the_leased_address(net):
    net.set_hosts("brd0", LEASE_A)
    rc, env, took = net.udhcpc("vc0", MAC_A)
    print(f"\nudhcpc: lease in {took * 1000:.0f} ms (start to exit, incl. ip netns exec)")
    assert rc == 0, env
    assert env["ip"] == "10.77.0.5"
    assert env["subnet"] == "255.255.255.0"
    assert env["mask"] in ("24", "")  # busybox >= 1.24 also exports the prefix length
    assert env["router"] == "10.77.0.1"
    assert env["dns"].split() == ["10.77.0.53", "9.9.9.9"]
    assert env["mtu"] == "1450" and env["hostname"] == "vm-a"
    assert env["serverid"] == "10.77.0.1" and env["lease"] == "86400"
    assert took < 3.0
    stats = net.call(op="stats")
    assert stats["offers"] >= 1 and stats["acks"] >= 1 and stats["naks"] == 0


def test_unknown_mac_gets_no_lease(net):
    before = net.call(op="stats")
    rc, env, _ = net.udhcpc("vc0", MAC_B, tries=2)
    assert rc != 0 and env is None
    after = net.call(op="stats")
    assert after["offers"] == before["offers"] and after["ignored"] > before["ignored"]


def test_host_table_update_takes_effect_at_once(net):
    net.set_hosts("brd0", LEASE_A, LEASE_B)
    rc, env, _ = net.udhcpc("vc0", MAC_B)
    assert rc == 0 and env["ip"] == "10.77.0.6" and env["router"] == "" and env["dns"] == ""
    net.set_hosts("brd0", LEASE_B)  # A's port went away
    rc, env, _ = net.udhcpc("vc0", MAC_A, tries=2)
    assert rc != 0 and env is None


def test_interface_created_after_its_table(net):
    net.set_hosts("brd1", LEASE_C)  # no such bridge yet: kept, retried
    net.add_port("brd1", "vs1", "vc1")
    rc, env, took = net.udhcpc("vc1", MAC_C)
    print(f"\nudhcpc on a bridge created after set_hosts: lease in {took * 1000:.0f} ms")
    assert rc == 0 and env["ip"] == "10.78.0.9" and env["subnet"] == "255.255.0.0"


def _serve() -> None:
    """The responder process: one JSON command per stdin line, stats as the answer."""
    import logging

    from net_daemon.dhcp import DhcpResponder, Lease
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    responder = DhcpResponder()
    responder.start()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "set":
            responder.set_hosts(cmd["ifname"], {mac: Lease(**{**le, "dns": tuple(le.get("dns", ()))})
                                                for mac, le in cmd["leases"].items()})
        print(json.dumps(responder.stats), flush=True)
    responder.stop()


if __name__ == "__main__":
    _serve()
