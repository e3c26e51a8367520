"""Run a single-member etcd server from Debian's etcd-server package.

Used by ``braid cluster up`` (the embedded local cluster) and by the tests,
which start their own etcd on free ports with a temporary data directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def etcd_binary() -> str:
    path = shutil.which("etcd") or "/usr/bin/etcd"
    if not os.path.exists(path):
        raise FileNotFoundError(
            "etcd not found: install Debian's etcd-server package (make setup does)"
        )
    return path


class EtcdProcess:
    """One etcd member on loopback. ``start()`` waits until it serves."""

    def __init__(self, data_dir: str | Path, client_port: int = 0, peer_port: int = 0,
                 name: str = "braid", log_path: str | Path | None = None,
                 host: str = "127.0.0.1", tls=None, client_tls=None):
        """``tls`` (braid.auth.pki.TlsFiles of the etcd service): clients and the peer
        port over TLS, client certificates required (etcd then knows a client
        by its certificate's CN); ``client_tls``: what the readiness check
        presents (a certificate of the cluster)."""
        self.data_dir = Path(data_dir)
        self.host = host  # the client address (peers stay on loopback)
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port()
        self.name = name
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{name}-etcd.log"
        self.proc: subprocess.Popen | None = None
        self.tls = tls
        self.client_tls = client_tls

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def command(self) -> list[str]:
        scheme = "https" if self.tls else "http"
        client = f"{scheme}://{self.host}:{self.client_port}"
        peer = f"{scheme}://127.0.0.1:{self.peer_port}"
        tls = []
        if self.tls:
            t = self.tls
            tls = ["--cert-file", str(t.cert), "--key-file", str(t.key), "--trusted-ca-file", str(t.ca),
                   "--client-cert-auth",
                   "--peer-cert-file", str(t.cert), "--peer-key-file", str(t.key),
                   "--peer-trusted-ca-file", str(t.ca), "--peer-client-cert-auth"]
        return [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
            # keep history for watch resume; we compact ourselves in tests
            "--auto-compaction-retention", "0",
            *tls,
        ]

    def etcdctl(self, *args: str, tls=None, timeout: float = 10) -> subprocess.CompletedProcess:
        """Run etcdctl against this member (with ``tls`` or the readiness
        client's certificate when TLS is on)."""
        t = tls or self.client_tls
        cmd = ["etcdctl", f"--endpoints={'https' if self.tls else 'http'}://{self.endpoint}"]
        if self.tls and t is not None:
            cmd += [f"--cacert={t.ca}", f"--cert={t.cert}", f"--key={t.key}"]
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "ETCDCTL_API": "3"})

    def start(self, timeout: float = 20.0) -> "EtcdProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                with socket.create_connection((self.host, self.client_port), timeout=0.5):
                    pass
                # the port answers; check it serves requests
                out = self.etcdctl("endpoint", "health", timeout=5)
                if out.returncode == 0:
                    return
            except (OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"etcd did not become ready in {timeout}s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
