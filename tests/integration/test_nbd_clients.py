"""The NBD server against real clients: nbdinfo, nbdcopy (libnbd), qemu-img (QEMU's NBD
client) and fio's nbd engine, over a unix socket and over loopback TCP.

The server runs under uvloop on a background thread (as in braid-storaged) with
in-memory exports; every transfer is checked byte for byte against the export.
A test whose client binary is missing is skipped, naming the package to install.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from tests.nbd_memexport import MemExport
from tests.nbd_rawclient import ServerThread

pytestmark = pytest.mark.integration

MiB = 1 << 20
VOL_SIZE = 64 * MiB
RO_SIZE = 4 * MiB
TIMEOUT = 180


def need(binary: str, package: str):
    return pytest.mark.skipif(shutil.which(binary) is None,
                              reason=f"{binary} not installed (Debian package {package})")


needs_nbdinfo = need("nbdinfo", "libnbd-bin")
needs_nbdcopy = need("nbdcopy", "libnbd-bin")
needs_qemu_img = need("qemu-img", "qemu-utils")
needs_fio = need("fio", "fio")


def run(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


class Served:
    """The server thread plus the addresses it listens on."""

    def __init__(self, tmp):
        self.exports = {"vol": MemExport(VOL_SIZE, description="integration volume"),
                        "ro": MemExport(RO_SIZE, read_only=True)}
        ro = self.exports["ro"]
        ro.data[:] = os.urandom(RO_SIZE)
        ro.alloc[:] = b"\1" * len(ro.alloc)      # all data (block status must not claim zeroes)
        self.thread = ServerThread(self.exports)     # uvloop, default limits (32 MiB requests)
        self.socket = str(tmp / "nbd.sock")
        self.thread.run(self.thread.server.serve_unix(self.socket, mode=0o600))
        tcp = self.thread.run(self.thread.server.serve_tcp("127.0.0.1", 0))
        self.port = tcp.sockets[0].getsockname()[1]

    def unix(self, name: str = "vol") -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"

    def tcp(self, name: str = "vol") -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def reset(self) -> None:
        def do():
            vol = self.exports["vol"]
            vol.data[:] = bytes(VOL_SIZE)
            vol.alloc[:] = bytes(len(vol.alloc))
        self.thread.call(do)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("nbd"))
    yield s
    try:
        s.thread.assert_healthy()
        stats = s.thread.server.stats()
        assert stats["export_failures"] == 0 and stats["protocol_errors"] == 0, stats
    finally:
        s.thread.stop()


@pytest.fixture
def vol(served) -> MemExport:
    served.reset()
    return served.exports["vol"]


@pytest.fixture
def image(tmp_path) -> bytes:
    """A 64 MiB raw image with data, holes and an unaligned tail run, written to disk."""
    data = bytearray(VOL_SIZE)
    data[:20 * MiB] = os.urandom(20 * MiB)
    data[40 * MiB:41 * MiB + 4321] = os.urandom(MiB + 4321)
    data[VOL_SIZE - 512:] = b"\x5a" * 512
    path = tmp_path / "src.img"
    path.write_bytes(data)
    return bytes(data)


@needs_nbdinfo
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nbdinfo_describes_the_export(served, transport):
    uri = served.unix() if transport == "unix" else served.tcp()
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    [export] = info["exports"]
    assert export["export-name"] == "vol" and export["export-size"] == VOL_SIZE
    assert export["description"] == "integration volume"
    assert export["contexts"] == ["base:allocation"]
    assert export["is_read_only"] is False
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_df"):
        assert export[cap] is True, cap
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) == \
        (1, 4096, 32 * MiB)
    ro = json.loads(run("nbdinfo", "--json", served.unix("ro")).stdout)["exports"][0]
    assert ro["is_read_only"] is True and ro["export-size"] == RO_SIZE


@needs_nbdinfo
def test_nbdinfo_lists_exports(served):
    info = json.loads(run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={served.socket}").stdout)
    assert {e["export-name"]: e["export-size"] for e in info["exports"]} == {"vol": VOL_SIZE, "ro": RO_SIZE}


@needs_nbdinfo
def test_nbdinfo_map_follows_allocation(served, vol):
    def shape():
        vol.data[4 * MiB:6 * MiB] = b"\1" * (2 * MiB)
        vol.alloc[(4 * MiB) // 4096:(6 * MiB) // 4096] = b"\1" * (512)     # data
        vol.alloc[(8 * MiB) // 4096:(9 * MiB) // 4096] = b"\2" * (256)     # allocated zeroes
    served.thread.call(shape)
    extents = json.loads(run("nbdinfo", "--map", "--json", served.unix()).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
        (0, 4 * MiB, 3), (4 * MiB, 2 * MiB, 0), (6 * MiB, 2 * MiB, 3), (8 * MiB, MiB, 2),
        (9 * MiB, VOL_SIZE - 9 * MiB, 3)]


@needs_qemu_img
def test_qemu_img_info(served):
    info = json.loads(run("qemu-img", "info", "--output=json", served.unix()).stdout)
    assert info["virtual-size"] == VOL_SIZE and info["format"] == "raw"


@needs_qemu_img
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_qemu_img_convert_in_and_out(served, vol, image, tmp_path, transport):
    uri = served.unix() if transport == "unix" else served.tcp()
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(tmp_path / "src.img"), uri)
    assert sha256(vol.data) == sha256(image)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(tmp_path / "out.img"))
    assert sha256((tmp_path / "out.img").read_bytes()) == sha256(image)


@needs_qemu_img
def test_qemu_img_cannot_write_a_read_only_export(served, tmp_path):
    before = sha256(served.exports["ro"].data)
    (tmp_path / "small.img").write_bytes(os.urandom(RO_SIZE))
    proc = subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(tmp_path / "small.img"),
                           served.unix("ro")], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert sha256(served.exports["ro"].data) == before
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.unix("ro"), str(tmp_path / "ro.img"))
    assert sha256((tmp_path / "ro.img").read_bytes()) == before


@needs_nbdcopy
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nbdcopy_in_and_out(served, vol, image, tmp_path, transport):
    uri = served.unix() if transport == "unix" else served.tcp()
    # nbdcopy uses several connections (we advertise multi-conn) and many requests in flight.
    run("nbdcopy", "--flush", str(tmp_path / "src.img"), uri)
    assert sha256(vol.data) == sha256(image)
    assert vol.flushes >= 1
    out = tmp_path / "out.img"
    out.touch()
    run("nbdcopy", uri, str(out))
    assert sha256(out.read_bytes()) == sha256(image)


@needs_fio
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_fio_randwrite_with_verify(served, vol, transport, tmp_path):
    uri = served.unix() if transport == "unix" else served.tcp()
    # (cwd and verify_state_save: fio would otherwise leave a verify state file behind)
    proc = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
               "--iodepth=16", "--verify=crc32c", "--size=32M", "--verify_state_save=0",
               "--output-format=json", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert not re.search(r"verify.*(bad|fail)|bad magic|crc32c.*(bad|fail)", output, re.IGNORECASE), output
    result = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert result["error"] == 0
    assert result["write"]["io_bytes"] == 32 * MiB and result["read"]["io_bytes"] == 32 * MiB   # verify pass
    assert vol.data[:32 * MiB] != bytes(32 * MiB)
