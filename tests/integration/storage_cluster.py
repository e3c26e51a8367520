"""A storage test cluster: a controller and N real braid-storaged processes
(each with a directory disk, its NBD unix sockets in a temp dir, NBD TCP and
replication ports on loopback chosen by the kernel), on one etcd prefix."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from braid import extents as X
from tests.conftest import DaemonProc, running_controller, wait

NBD_TOOLS = ("nbdinfo", "nbdcopy", "qemu-img", "fio")


def need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup.sh installs them)")


class StorageNodeProc:
    def __init__(self, cl, name: str, tmp: Path, etcd, prefix: str, peer_timeout: float,
                 disk: Path | None = None, extra: list[str] = ()):
        """``disk``: the directory of its disk d1 (default ``<tmp>/<name>/d1``)."""
        self.name = name
        self.disk = Path(disk) if disk else tmp / name / "d1"
        self.socket_dir = tmp / name / "nbd"
        self.tmp = tmp
        self.args = ["--etcd", etcd.endpoint, "--prefix", prefix, "--node", name, "--lease-ttl", "3",
                     "--disks", f"d1={self.disk}", "--nbd-socket-dir", str(self.socket_dir),
                     "--peer-listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0",
                     "--peer-timeout", str(peer_timeout), "--report-interval", "1", *extra]
        self.proc: DaemonProc | None = None

    def start(self) -> "StorageNodeProc":
        self.proc = DaemonProc("storage_daemon.main", self.args, self.tmp, f"storaged-{self.name}")
        return self

    def kill(self) -> None:
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(10)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def socket(self, volume: str) -> Path:
        return self.socket_dir / f"{volume}.sock"

    def unix_uri(self, volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={self.socket(volume)}"

    def replica_files(self) -> list[Path]:
        return sorted(self.disk.glob("replicas/*/*.data"))


@contextlib.contextmanager
def storage_cluster(etcd, tmp: Path, name: str, nodes: int = 3, peer_timeout: float = 1.0,
                    rebuild_delay: float = 5.0, disks: dict[int, Path] | None = None,
                    storaged_args: list[str] = ()):
    """``disks``: disk directories of some nodes by their number (1-based), e.g.
    ``{2: <a FUSE mount>/d1}``; the others get one in ``tmp``. ``storaged_args``:
    more options of every storage daemon."""
    disks = disks or {}
    with running_controller(etcd, tmp, name, ["--rebuild-delay", str(rebuild_delay)]) as ctl:
        members = [StorageNodeProc(ctl, f"{name}-s{i}", tmp, etcd, ctl.prefix, peer_timeout, disks.get(i),
                                   storaged_args) for i in range(1, nodes + 1)]
        try:
            for m in members:
                m.start()
            cl = SimpleNamespace(ctl=ctl, api=ctl.api, store=ctl.store, nodes=members)
            wait(lambda: all(_pool_ready(cl, m.name) for m in members), 30, "disk pools reported")
            yield cl
        finally:
            for m in members:
                m.stop()


def _pool_ready(cl, node: str) -> bool:
    try:
        pool = cl.api.get("diskpool", node)
    except Exception:
        return False
    return bool(pool.status.disks)


def create_volume(cl, name: str, size: int, replicas: int = 2, extent_size: int = 64 << 20,
                  timeout: float = 30):
    from braid.v1 import storage_pb2
    vol = storage_pb2.Volume()
    vol.metadata.name = name
    vol.spec.size_bytes, vol.spec.replicas, vol.spec.extent_size_bytes = size, replicas, extent_size
    cl.api.create(vol)
    vol = wait(lambda: _phase(cl, name, "Healthy"), timeout, f"volume {name} Healthy")
    # every node's daemon has opened its socket for it
    wait(lambda: all(m.socket(name).exists() for m in cl.nodes if m.proc.proc.poll() is None), 15,
         f"NBD sockets of {name}")
    return vol


def _phase(cl, name: str, phase: str):
    v = cl.api.get("volume", name)
    return v if v.status.phase == phase else None


def records(cl, volume: str) -> dict[int, X.ExtentRecord]:
    kvs, _ = cl.store.list(X.volume_prefix(volume))
    return {X.parse_key(kv.key)[1]: X.ExtentRecord.from_json(kv.value) for kv in kvs}


def run(cmd: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> Path:
    run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={size >> 20}", "status=none"])
    return path


def fio_verify(uri: str, size: str = "64M", rw: str = "randwrite", bs: str = "4k", iodepth: int = 16,
               extra: list[str] = (), timeout: float = 600) -> dict:
    """fio's nbd engine writing with crc32c verification; returns fio's JSON."""
    cmd = ["fio", "--name=braid", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", f"--size={size}", "--verify=crc32c", "--verify_fatal=1",
           "--do_verify=1", "--verify_state_save=0", "--output-format=json", *extra]
    p = run(cmd, timeout=timeout, check=False)
    assert p.returncode == 0, f"fio failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "verify" not in p.stderr.lower() or "bad" not in p.stderr.lower(), p.stderr
    out = json.loads(p.stdout[p.stdout.index("{"):])
    job = out["jobs"][0]
    assert job["error"] == 0, job
    return out


def wait_gone(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
