"""NBD over TCP with TLS (NBD_OPT_STARTTLS, required) against real clients:
nbdinfo (libnbd, GnuTLS) and qemu-io (QEMU's tls-creds-x509). A client with a
certificate of the cluster's CA reads and writes; a client without TLS, or
with a certificate of another CA, gets nothing. (A storage daemon with
--tls-* serves NBD over TCP this way when --nbd-listen is given.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from braid.auth import pki
from storage_daemon.main import _cluster_peer
from tests.nbd_memexport import MemExport
from tests.nbd_rawclient import ServerThread

pytestmark = pytest.mark.integration
MiB = 1 << 20


def creds_dir(dst: Path, tls: pki.TlsFiles) -> Path:
    """The file names GnuTLS-based clients (libnbd, QEMU) look for."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(tls.ca, dst / "ca-cert.pem")
    shutil.copy(tls.cert, dst / "client-cert.pem")
    shutil.copy(tls.key, dst / "client-key.pem")
    return dst


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    for tool in ("nbdinfo", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    tmp = tmp_path_factory.mktemp("nbd-tls")
    d = tmp / "pki"
    pki.ensure_local_cluster_pki(d, ["n1"], users=(("admin", "admin"),))
    ctx = pki.ReloadingSSLContext(pki.TlsFiles.for_service(d, "n1", "storaged"), server=True).server_context()
    srv = ServerThread({"vol": MemExport(16 * MiB)}, tls=ctx, tls_admit=_cluster_peer)
    port = srv.run(srv.server.serve_tcp("127.0.0.1", 0)).sockets[0].getsockname()[1]
    other = tmp / "other"
    pki.init_ca(other, cluster="intruder")
    try:
        yield {"port": port, "good": creds_dir(tmp / "good", pki.TlsFiles.for_user(d, "admin")),
               "bad": creds_dir(tmp / "bad", pki.issue_user(other, "admin", "admin")), "srv": srv}
    finally:
        srv.stop()


def nbdinfo(uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)


def qemu_io(port: int, creds: Path, *cmds: str) -> subprocess.CompletedProcess:
    args = ["qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=vol,tls-creds=tls0,"
                            "tls-hostname=localhost"]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_clients_with_a_cluster_certificate_read_and_write(tls_server):
    port, good = tls_server["port"], tls_server["good"]
    p = nbdinfo(f"nbds://localhost:{port}/vol?tls-certificates={good}")
    assert p.returncode == 0 and p.stdout.strip() == str(16 * MiB), (p.stdout, p.stderr)
    p = qemu_io(port, good, "write -P 0x5c 1M 2M", "flush", "read -P 0x5c 1M 2M")
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, (p.stdout, p.stderr)
    assert "wrote 2097152/2097152" in p.stdout and "read 2097152/2097152" in p.stdout
    tls_server["srv"].assert_healthy()


def test_clients_without_tls_or_with_another_ca_get_nothing(tls_server):
    port, bad = tls_server["port"], tls_server["bad"]
    plain = nbdinfo(f"nbd://localhost:{port}/vol")
    assert plain.returncode != 0 and str(16 * MiB) not in plain.stdout
    assert "TLS" in plain.stderr, plain.stderr   # the server says why
    stranger = nbdinfo(f"nbds://localhost:{port}/vol?tls-certificates={bad}")
    assert stranger.returncode != 0 and str(16 * MiB) not in stranger.stdout
    p = qemu_io(port, bad, "read 0 4k")
    assert p.returncode != 0 and "read 4096/4096" not in p.stdout
    tls_server["srv"].assert_healthy()
