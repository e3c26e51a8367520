"""Two libvirt daemons isolated from each other, as two hosts would be: for
live-migration tests on one machine.

Each ``LibvirtNode`` is a libvirtd + virtlogd (and the QEMU processes they
start) in
* its own network namespace ``braid-lv-<id>``: loopback plus one end of a veth
  pair ``lv0`` whose other end is in the peer's namespace (10.213.<n>.1/.2/24);
  libvirtd listens there on TCP 16509 (``--listen``, listen_tcp=1,
  listen_tls=0, auth_tcp="none": the address exists only inside the pair);
* its own mount namespace (made by ``ip netns exec``, slave to the host: host
  mounts show up inside, its own never leak out), where tmp dirs are bound over
  /etc/libvirt (a fresh libvirtd.conf with its own host_uuid, and qemu.conf),
  /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, and
  a mode-000 char device over /dev/kvm (see _NO_KVM).
Everything else (/tmp, /var/tmp, /var/lib/braid/guest) is the host's, so a
path outside those five dirs names the same file on both nodes: shared
storage by construction. ``ip netns exec`` also mounts a fresh /sys for the
namespace, so the daemons see no cgroup hierarchy and put QEMU in none (two
daemons would otherwise both create cgroups named qemu-1-<domain>).

From the host a node is reached through the libvirt socket in its tmp run dir
(``node.uri``: qemu+unix:///system?socket=<dir>/run/libvirt-sock); a node
reaches its peer at ``peer.tcp_uri`` (qemu+tcp://10.213.<n>.x/system), and
QEMU's migration stream goes to ``peer.migration_uri`` over the veth.
libvirtd runs under a small subreaper (_REAPER), which reaps the QEMUs it
daemonizes at once: left to PID 1, which here reaps orphans ~1.6 s late,
every QEMU stop (migration's confirm phase, destroy) waited for that.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PREFIX = "braid-lv-"
IFNAME = "lv0"
TCP_PORT = 16509
CONSOLE_DIR = "/var/log/libvirt/console"  # inside each node: HostContext.console_log_dir
_BOUND = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
          "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}
# /dev/kvm is hidden behind a mode-000 copy of /dev/null (char 1:3), not /dev/null
# itself: libvirt calls KVM usable when the QEMU user may open /dev/kvm read-write,
# and then finds its capabilities (probed without KVM) stale: with /dev/null (0666)
# every capabilities lookup re-probes QEMU (2-4 s each, ~20 s for one define).
# It must be a char device: libvirt moves mounts under /dev into each domain's
# private /dev, and fails on a regular file there ("Unable to move ... mount to
# /dev/kvm: Invalid argument").
_NO_KVM = "nokvm"
_REAPER = """
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphaned QEMUs become ours
main = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: main.send_signal(signal.SIGTERM))
while True:
    pid, status = os.wait()
    if pid == main.pid:
        sys.exit(os.waitstatus_to_exitcode(status))
"""
_pairs = itertools.count(1)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _kill_netns(ns: str) -> None:
    """SIGKILL whatever still runs in the namespace, then delete it (and its veth)."""
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in out:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", ns, check=False)


def remove_stale() -> None:
    """Namespaces left by test processes that died without teardown (kill -9):
    their names carry the pid of the process that made them."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        pid = ns[len(PREFIX):].split("-")[0]
        if ns.startswith(PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _kill_netns(ns)


def missing_requirements() -> str | None:
    """Why a pair cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("libvirtd", "virtlogd", "ip", "nsenter", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/setup.sh)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python not installed"
    return None


class LibvirtNode:
    """libvirtd + virtlogd in namespace ``braid-lv-<node_id>``, with state in *root*;
    *name* is the short name tests give the node ("a", "b")."""

    def __init__(self, name: str, node_id: str, address: str, root: Path):
        self.name, self.id, self.address, self.root = name, node_id, address, Path(root)
        self.netns = PREFIX + node_id
        self.host_uuid = str(uuid.uuid4())
        self.dirs = {k: self.root / k for k in _BOUND}  # host paths of the bound dirs
        self.socket = self.dirs["run"] / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.tcp_uri = f"qemu+tcp://{address}/system"
        self.migration_uri = f"tcp://{address}"
        self.console_dir = CONSOLE_DIR
        self.virtlogd: subprocess.Popen | None = None
        self.libvirtd: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"LibvirtNode({self.netns}, {self.address})"

    def console_log(self, vm_name: str) -> Path:
        """Host path of a VM's console log as this node's virtlogd writes it."""
        return self.dirs["log"] / "console" / f"{vm_name}.log"

    def create_netns(self) -> None:
        _ip("netns", "add", self.netns)
        _ip("-n", self.netns, "link", "set", "lo", "up")

    def _write_config(self) -> None:
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        (self.dirs["log"] / "console").mkdir(exist_ok=True)
        (self.dirs["etc"] / "libvirtd.conf").write_text(
            f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{self.address}"\n'
            f'tcp_port = "{TCP_PORT}"\nauth_tcp = "none"\nauth_unix_rw = "none"\n'
            f'auth_unix_ro = "none"\nhost_uuid = "{self.host_uuid}"\n')
        # leave the owner of shared files (the guest kernel, disks) alone: the
        # system libvirtd uses them too. Disks must be writable by libvirt-qemu.
        (self.dirs["etc"] / "qemu.conf").write_text("dynamic_ownership = 0\nremember_owner = 0\n")
        no_kvm = self.root / _NO_KVM
        if not no_kvm.exists():
            os.mknod(no_kvm, 0o000 | stat.S_IFCHR, os.makedev(1, 3))
        no_kvm.chmod(0)

    def start(self) -> None:
        """Start virtlogd (which makes the mount namespace) and then libvirtd in it;
        returns at once: see wait_ready()."""
        self._write_config()
        mounts = "".join(f"mount --bind {self.dirs[k]} {p}\n" for k, p in _BOUND.items())
        if os.path.exists("/dev/kvm"):
            mounts += f"mount --bind {self.root / _NO_KVM} /dev/kvm\n"
        script = f"set -e\n{mounts}exec virtlogd -p {self.root / 'virtlogd.pid'}\n"
        with open(self.root / "virtlogd.log", "ab") as log:
            self.virtlogd = subprocess.Popen(["ip", "netns", "exec", self.netns, "sh", "-c", script],
                                             stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait(lambda: (self.dirs["run"] / "virtlogd-sock").exists(), 10, "virtlogd socket")
        with open(self.root / "libvirtd.log", "ab") as log:
            self.libvirtd = subprocess.Popen(
                ["nsenter", "-t", str(self.virtlogd.pid), "-m", "-n", sys.executable, "-c", _REAPER,
                 "libvirtd", "--listen", "--pid-file", str(self.root / "libvirtd.pid")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def answers() -> bool:
            r = subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True)
            return r.returncode == 0
        self._wait(answers, timeout, "libvirtd")

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            for daemon, p in (("virtlogd", self.virtlogd), ("libvirtd", self.libvirtd)):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"{self}: {daemon} exited with {p.returncode} before "
                                       f"{what} was up: see {self.root}/{daemon}.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self}: no {what} within {timeout:.0f}s (logs in {self.root})")
            time.sleep(0.1)

    def connect(self):
        import libvirt
        return libvirt.open(self.uri)

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """A command in this node's network + mount namespaces (e.g. ss, cat)."""
        if self.virtlogd is None:
            raise RuntimeError(f"{self}: not started")
        return subprocess.run(["nsenter", "-t", str(self.virtlogd.pid), "-m", "-n", *cmd],
                              capture_output=True, text=True, **kw)

    def qemu_pids(self) -> list[int]:
        """QEMU processes running in this node's network namespace."""
        pids = []
        for pid in _ip("netns", "pids", self.netns, check=False).stdout.split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu"):
                    pids.append(int(pid))
        return pids

    def tx_bytes(self) -> int:
        """Bytes sent so far on this node's end of the veth."""
        out = _ip("-n", self.netns, "-s", "-j", "link", "show", IFNAME).stdout
        return json.loads(out)[0]["stats64"]["tx"]["bytes"]

    def destroy_domains(self) -> None:
        import libvirt
        conn = self.connect()
        try:
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isPersistent():
                        dom.undefine()
        finally:
            conn.close()

    def stop(self) -> None:
        """Destroy domains, stop the daemons, delete the namespace; never raises."""
        import libvirt
        if self.libvirtd is not None and self.libvirtd.poll() is None:
            with contextlib.suppress(libvirt.libvirtError):
                self.destroy_domains()
        for p in (self.libvirtd, self.virtlogd):
            if p is None:
                continue
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        _kill_netns(self.netns)  # anything left (a QEMU of a crashed libvirtd)


def link(a: LibvirtNode, b: LibvirtNode, prefix_len: int = 24) -> None:
    """A veth pair lv0 between the two namespaces, addressed and up."""
    _ip("link", "add", IFNAME, "netns", a.netns, "type", "veth", "peer", "name", IFNAME,
        "netns", b.netns)
    for node in (a, b):
        _ip("-n", node.netns, "addr", "add", f"{node.address}/{prefix_len}", "dev", IFNAME)
        _ip("-n", node.netns, "link", "set", IFNAME, "up")


@contextlib.contextmanager
def pair(workdir: Path):
    """Two linked, started LibvirtNodes (a, b); torn down on exit, whatever happened."""
    remove_stale()
    n = next(_pairs)
    tag = f"{os.getpid()}-{n}"
    subnet = f"10.213.{n % 254 + 1}"  # any: the link is private to the pair
    a = LibvirtNode("a", f"{tag}a", f"{subnet}.1", Path(workdir) / "a")
    b = LibvirtNode("b", f"{tag}b", f"{subnet}.2", Path(workdir) / "b")
    try:
        a.create_netns()
        b.create_netns()
        link(a, b)
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        b.stop()
        a.stop()


@pytest.fixture
def libvirt_pair(tmp_path):
    """(a, b): two isolated libvirt hosts linked by a veth (see the module doc)."""
    why = missing_requirements()
    if why:
        pytest.skip(why)
    with pair(tmp_path) as nodes:
        yield nodes


def domain_states(node: LibvirtNode) -> dict[str, bool]:
    """name -> active, of every domain of the node's libvirtd."""
    import libvirt
    conn = libvirt.open(node.uri)
    out = {}
    try:
        for d in conn.listAllDomains():
            try:
                out[d.name()] = bool(d.isActive())
            except libvirt.libvirtError:
                continue  # undefined between the listing and the question
        return out
    finally:
        conn.close()


def read_text(path) -> str:
    """A file's text, or '' while it does not exist yet."""
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
