"""A network partition of a replicas=2 volume, for real: two storage daemons,
each in its own network namespace on an underlay bridge that also carries
etcd (tests/integration/netlab.py). Node b's underlay link goes down: b can
reach neither etcd nor a. A client writing through a's NBD socket goes on
(a drops b from the extents by a CAS in etcd first); a client writing
through b's socket gets I/O errors (b cannot drop a without etcd, so it
acknowledges nothing): the two sides never both accept writes. Once the link
is back, b is out of the set and refuses the old generation."""

from __future__ import annotations

import subprocess
import time

import pytest

from braid import extents as X
from braid.v1 import storage_pb2
from tests.conftest import DaemonProc, running_controller, wait
from tests.integration.netlab import NetLab, missing_requirements

pytestmark = pytest.mark.integration
MiB = 1 << 20


def qemu_io(sock, cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, f"nbd+unix:///pvol?socket={sock}"],
                          capture_output=True, text=True, timeout=60)


def test_two_sides_of_a_partition_cannot_both_write(tmp_path):
    why = missing_requirements()
    if why:
        pytest.skip(why)
    if subprocess.run(["which", "qemu-io"], capture_output=True).returncode:
        pytest.skip("qemu-io not installed")
    lab = NetLab(tmp_path, nodes=2)
    procs: list[DaemonProc] = []
    try:
        etcd = lab.start_etcd()
        with running_controller(etcd, tmp_path, "part", ["--rebuild-delay", "600"]) as ctl:
            socks = {}
            for node in lab.nodes:
                socks[node.name] = tmp_path / node.name / "nbd"
                procs.append(DaemonProc("storage_daemon.main", [
                    "--etcd", etcd.endpoint, "--prefix", ctl.prefix, "--node", node.name,
                    "--lease-ttl", "3", "--disks", f"d1={tmp_path / node.name / 'd1'}",
                    "--nbd-socket-dir", str(socks[node.name]), "--nbd-listen", "",
                    "--peer-listen", f"{node.ip}:0", "--peer-timeout", "1", "--report-interval", "1"],
                    tmp_path, f"storaged-{node.name}", wrap=node.nsenter))
            a, b = lab.nodes
            wait(lambda: all(ctl.api.get("diskpool", n.name).status.disks for n in lab.nodes), 30, "pools")
            vol = storage_pb2.Volume()
            vol.metadata.name = "pvol"
            vol.spec.size_bytes, vol.spec.replicas, vol.spec.extent_size_bytes = 32 * MiB, 2, 16 * MiB
            ctl.api.create(vol)
            wait(lambda: ctl.api.get("volume", "pvol").status.phase == "Healthy", 30, "volume Healthy")
            sock_a, sock_b = socks[a.name] / "pvol.sock", socks[b.name] / "pvol.sock"
            wait(lambda: sock_a.exists() and sock_b.exists(), 15, "NBD sockets")
            for sock in (sock_a, sock_b):   # both sides write before the partition
                r = qemu_io(sock, "write -P 0x11 0 64k")
                assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr
            gen0 = X.ExtentRecord.from_json(ctl.store.get(X.extent_key("pvol", 0)).value).generation

            b.exec("ip", "link", "set", "eth0", "down")   # the partition: b alone
            r_a = qemu_io(sock_a, "write -P 0x22 0 64k")
            r_b = qemu_io(sock_b, "write -P 0x33 65536 64k")
            print(f"\nduring the partition: a: {r_a.stdout.strip()[:80]!r}; b: "
                  f"{(r_b.stdout + r_b.stderr).strip()[:160]!r}")
            assert r_a.returncode == 0 and "wrote" in r_a.stdout, r_a.stdout + r_a.stderr
            assert "wrote" not in r_b.stdout and "error" in (r_b.stdout + r_b.stderr).lower(), r_b.stdout
            rec = X.ExtentRecord.from_json(ctl.store.get(X.extent_key("pvol", 0)).value)
            assert rec.holds(b.name) is None and rec.generation > gen0   # a dropped b via etcd
            assert [r.node for r in rec.replicas] == [a.name]

            b.exec("ip", "link", "set", "eth0", "up")     # healed: b is out and stays out
            time.sleep(2)
            r = qemu_io(sock_a, "read -P 0x22 0 64k")
            assert r.returncode == 0 and "read" in r.stdout and "Pattern verification failed" not in r.stdout
            r = qemu_io(sock_b, "read -P 0x22 0 64k")    # b serves a's data now (from a)
            assert "Pattern verification failed" not in r.stdout, r.stdout
            assert all(p.proc.poll() is None for p in procs), "a storage daemon died"
    finally:
        for p in procs:
            p.stop()
        lab.close()
