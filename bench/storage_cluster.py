"""A local storage cluster for benchmarks: one etcd, a braid-controller and N
braid-storaged processes (one directory disk each), all on loopback.

Like tests/integration/storage_cluster.py, without pytest: every process is a
real ``python -m ...`` child in its own session, ready once it has written its
``--state-file``. Volumes are created through ``braid.client.Client`` and are
ready when the controller reports them Healthy and the serving node has opened
their NBD unix socket. ``stop()`` (also on ``with`` exit) ends every process;
the caller owns and removes the directories.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from braid import extents as X
from braid.client import Client
from braid.dev.localetcd import EtcdProcess
from braid.store import Store
from braid.v1 import storage_pb2

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/braid-bench/"


class DaemonProcess:
    """``python -m <module> <args> --state-file F``; ready when F exists."""

    def __init__(self, module: str, args: list[str], work: Path, name: str, timeout: float = 30.0):
        self.name = name
        self.state_file = work / f"{name}.json"
        self.log = work / f"{name}.log"
        self.cmd = [sys.executable, "-m", module, *args, "--state-file", str(self.state_file),
                    "--log-format", "text"]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT,
                                         cwd=str(ROOT), start_new_session=True)
        try:
            self.info = self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if self.state_file.exists():
                return json.loads(self.state_file.read_text())
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready in {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def restart(self, timeout: float = 30.0) -> None:
        """Start the same command again (after a kill or stop); ready as before."""
        if self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is still running")
        self.state_file.unlink(missing_ok=True)
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT,
                                         cwd=str(ROOT), start_new_session=True)
        self.info = self._wait_ready(timeout)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} died with {self.proc.returncode}: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class StorageNode:
    """One braid-storaged: its disk directory, NBD socket directory and process."""

    def __init__(self, name: str, disk: Path, socket_dir: Path, proc: DaemonProcess):
        self.name = name
        self.disk = disk
        self.socket_dir = socket_dir
        self.proc = proc
        self.killed = False  # kill() was called: StorageCluster.check_alive skips it

    def kill(self) -> None:
        """SIGKILL the daemon (a node crash) and reap it."""
        self.killed = True
        if self.proc.proc.poll() is None:
            self.proc.proc.kill()
        self.proc.proc.wait(10)

    def restart(self) -> None:
        """Start the killed daemon again, with its disk as the kill left it."""
        self.proc.restart()
        self.killed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def socket(self, volume: str) -> Path:
        return self.socket_dir / f"{volume}.sock"

    def uri(self, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.socket(volume)}"


class StorageCluster:
    """``work``: etcd data, logs, state files and NBD sockets; ``disk_root``:
    the nodes' disk directories (put it on the disk you mean to measure).
    ``controller_args`` / ``daemon_args``: extra options of the controller and of
    every storage daemon (e.g. ``--rebuild-delay 1``, ``--rebuild-rate 2000``)."""

    def __init__(self, work: Path, disk_root: Path, nodes: int = 3, peer_timeout: float = 10.0,
                 progress: Callable[[str], None] | None = None,
                 controller_args: Sequence[str] = (), daemon_args: Sequence[str] = ()):
        self.work = Path(work)
        self.disk_root = Path(disk_root)
        self.n_nodes = nodes
        self.peer_timeout = peer_timeout
        self.progress = progress or (lambda _msg: None)
        self.controller_args = list(controller_args)
        self.daemon_args = list(daemon_args)
        self.etcd: EtcdProcess | None = None
        self.controller: DaemonProcess | None = None
        self.nodes: list[StorageNode] = []
        self.api: Client | None = None
        self.store: Store | None = None

    def __enter__(self) -> "StorageCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "StorageCluster":
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            self.etcd = EtcdProcess(self.work / "etcd-data", log_path=self.work / "etcd.log")
            self.etcd.start()
            self.progress(f"etcd on {self.etcd.endpoint}")
            common = ["--etcd", self.etcd.endpoint, "--prefix", PREFIX, "--metrics", ""]
            self.controller = DaemonProcess("controller.main", common + self.controller_args, self.work,
                                            "controller")
            self.api = Client(self.controller.info["grpc"])
            self.store = Store(self.etcd.endpoint, prefix=PREFIX)
            for i in range(1, self.n_nodes + 1):
                name = f"bench-s{i}"
                disk = self.disk_root / name / "d1"
                sockets = self.work / name / "nbd"
                args = [*common, "--node", name, "--disks", f"d1={disk}",
                        "--nbd-socket-dir", str(sockets), "--nbd-socket-group", "",
                        "--peer-listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0",
                        "--peer-timeout", str(self.peer_timeout), *self.daemon_args]
                proc = DaemonProcess("storage_daemon.main", args, self.work, f"storaged-{name}")
                self.nodes.append(StorageNode(name, disk, sockets, proc))
            self._wait(lambda: all(self._pool_ready(n.name) for n in self.nodes), 30,
                       "every disk pool reported")
            self.progress(f"controller and {self.n_nodes} storage daemons up")
            return self
        except BaseException:
            self.stop()
            raise

    def _pool_ready(self, node: str) -> bool:
        try:
            return bool(self.api.get("diskpool", node).status.disks)
        except Exception:  # noqa: BLE001 - not there yet
            return False

    def _wait(self, pred: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            v = pred()
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def create_volume(self, name: str, size: int, replicas: int,
                      extent_size: int = X.DEFAULT_EXTENT_SIZE, timeout: float = 60.0):
        """Create a volume; returns it once Healthy with an NBD socket on every node."""
        vol = storage_pb2.Volume()
        vol.metadata.name = name
        vol.spec.size_bytes, vol.spec.replicas, vol.spec.extent_size_bytes = size, replicas, extent_size
        self.api.create(vol)

        def healthy():
            v = self.api.get("volume", name)
            return v if v.status.phase == "Healthy" else None

        vol = self._wait(healthy, timeout, f"volume {name} Healthy")
        self._wait(lambda: all(n.socket(name).exists() for n in self.nodes), 15,
                   f"the NBD sockets of {name}")
        return vol

    def extent_records(self, volume: str) -> list[X.ExtentRecord]:
        kvs, _ = self.store.list(X.volume_prefix(volume))
        return sorted((X.ExtentRecord.from_json(kv.value) for kv in kvs), key=lambda r: r.index)

    def check_alive(self) -> None:
        if self.controller is not None:
            self.controller.check_alive()
        for n in self.nodes:
            if not n.killed:
                n.proc.check_alive()

    def stop(self) -> None:
        errors = []
        for closer in (self.api, self.store):
            if closer is not None:
                try:
                    closer.close()
                except Exception as exc:  # noqa: BLE001 - keep stopping
                    errors.append(exc)
        self.api = self.store = None
        for proc in [n.proc for n in self.nodes] + [self.controller]:
            if proc is not None:
                try:
                    proc.stop()
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
        self.nodes, self.controller = [], None
        if self.etcd is not None:
            try:
                self.etcd.stop()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            self.etcd = None
        if errors:
            print(f"[bench] storage cluster: errors while stopping: {errors!r}", file=sys.stderr)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat (idle + iowait = not busy)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    total = sum(vals[:8])  # guest time is already in user/nice
    return total - vals[3] - vals[4], total
