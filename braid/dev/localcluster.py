"""The embedded local cluster behind ``braid cluster up``: one etcd, a
controller, a scheduler and N nodes (node agent + storage daemon + network
daemon each), all real processes on this machine.

Everything lives in one data directory::

    <data-dir>/cluster.json     what runs: endpoints, pids, command lines
    <data-dir>/etcd/            etcd's data
    <data-dir>/logs/*.log       one log per process
    <data-dir>/run/*.json       each daemon's bound addresses once ready
    <data-dir>/pki/             the cluster CA and every certificate (braid pki)

Secure by default: every gRPC port, the metrics endpoints, the storage
replication ports and etcd require a certificate of the cluster's CA; etcd
gives each daemon only its keys (braid/etcdauth.py); the API checks roles and
audits every change (``<data-dir>/logs/audit.log``). The CLI uses the
``admin`` user's certificate (``<data-dir>/pki/users/admin.crt``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.dev.libvirtd import LibvirtdError, ensure_libvirtd
from braid.dev.localetcd import EtcdProcess, free_port

NODE_DAEMONS = ("node-agent", "storaged", "netd")
ENTRYPOINTS = {
    "controller": "controller.main",
    "scheduler": "scheduler.main",
    "node-agent": "node_agent.main",
    "storaged": "storage_daemon.main",
    "netd": "net_daemon.main",
}


class ClusterError(RuntimeError):
    pass


def default_data_dir() -> Path:
    return Path(os.environ.get("BRAID_DATA_DIR") or Path.home() / ".braid")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Proc:
    name: str
    pid: int
    cmd: list[str]
    log: str

    def alive(self) -> bool:
        return pid_alive(self.pid)


class LocalCluster:
    def __init__(self, data_dir: Path | str | None = None):
        self.data_dir = Path(data_dir or default_data_dir()).resolve()
        self.state_path = self.data_dir / "cluster.json"

    # -- state --------------------------------------------------------------

    def state(self) -> dict | None:
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ClusterError(f"{self.state_path} is unreadable ({exc}); "
                               "remove it if no cluster runs") from None

    def _save(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_path)

    def procs(self) -> list[Proc]:
        st = self.state() or {}
        return [Proc(**p) for p in st.get("processes", [])]

    def running(self) -> bool:
        return any(p.alive() for p in self.procs())

    @property
    def api_address(self) -> str | None:
        st = self.state()
        return st.get("api") if st else None

    def user_tls(self, user: str = "admin"):
        """The TLS files of a user of this cluster (None: a cluster without TLS)."""
        st = self.state() or {}
        if not st.get("pki"):
            return None
        from braid.auth.pki import TlsFiles
        return TlsFiles.for_user(st["pki"], user)

    def _service_tls(self, state: dict, service: str, node: str):
        from braid.auth.pki import TlsFiles
        return TlsFiles.for_service(state["pki"], node, service)

    def _tls_args(self, state: dict, service: str, node: str) -> list[str]:
        t = self._service_tls(state, service, node)
        return ["--tls-cert", str(t.cert), "--tls-key", str(t.key), "--tls-ca", str(t.ca)]

    # -- up -----------------------------------------------------------------

    def up(self, nodes: int = 3, lease_ttl: int = 5, timeout: float = 60.0,
           libvirt_uri: str = "qemu:///system",
           progress: Callable[[str], None] = lambda s: None) -> dict:
        if nodes < 1 or nodes > 64:
            raise ClusterError("--nodes must be between 1 and 64")
        if self.running():
            raise ClusterError(f"a cluster already runs from {self.data_dir} "
                               "(braid cluster status; braid cluster down)")
        for d in ("logs", "run", "etcd"):
            (self.data_dir / d).mkdir(parents=True, exist_ok=True)
        state: dict = {"data_dir": str(self.data_dir), "nodes": [f"node{i}" for i in range(1, nodes + 1)],
                       "processes": [], "started_at": time.time(), "lease_ttl": lease_ttl,
                       "libvirt_uri": libvirt_uri}
        if libvirt_uri.startswith("qemu"):
            progress("making sure libvirtd and virtlogd run")
            try:
                ensure_libvirtd()
            except LibvirtdError as exc:
                raise ClusterError(str(exc)) from None
        from braid.auth import etcdauth, pki
        pki_dir = self.data_dir / "pki"
        issued = pki.ensure_local_cluster_pki(pki_dir, state["nodes"], cluster="braid-local",
                                              users=(("admin", "admin"), (etcdauth.ROOT, "admin")))
        progress(f"certificates in {pki_dir} ({len(issued)} issued)" if issued else
                 f"certificates in {pki_dir}")
        state["pki"] = str(pki_dir)
        first = state["nodes"][0]   # the controller and scheduler run "on" the first node
        try:
            etcd = EtcdProcess(self.data_dir / "etcd", log_path=self.data_dir / "logs" / "etcd.log",
                               tls=self._service_tls(state, "etcd", first),
                               client_tls=pki.TlsFiles.for_user(pki_dir, etcdauth.ROOT))
            progress(f"starting etcd on {etcd.endpoint}")
            etcd.start()
            state["etcd"] = etcd.endpoint
            state["processes"].append(Proc("etcd", etcd.proc.pid, etcd.command(),
                                           str(etcd.log_path)).__dict__)
            self._save(state)
            progress("etcd: a user and role per daemon, auth on")
            etcdauth.setup(etcd.etcdctl, "/braid/",
                           [("controller", first), ("scheduler", first)]
                           + [(d, n) for n in state["nodes"] for d in NODE_DAEMONS])
            api_port = free_port()
            state["api"] = f"127.0.0.1:{api_port}"
            state["token_api"] = f"127.0.0.1:{free_port()}"
            common = ["--etcd", etcd.endpoint, "--lease-ttl", str(lease_ttl)]
            self._spawn(state, "controller", common + self._tls_args(state, "controller", first) + [
                "--listen", state["api"], "--token-listen", state["token_api"],
                "--audit-log", str(self.data_dir / "logs" / "audit.log")])
            self._spawn(state, "scheduler", common + self._tls_args(state, "scheduler", first))
            for node in state["nodes"]:
                for daemon in NODE_DAEMONS:
                    extra = []
                    if daemon == "node-agent":
                        extra = ["--libvirt-uri", libvirt_uri, "--console-dir", str(self.data_dir / "console")]
                    elif daemon == "netd":  # one kernel: the first node's netd serves them all
                        extra = (["--tunnel-ip", "127.0.0.1", "--serve-nodes", ",".join(state["nodes"]),
                                  "--cleanup-on-stop", "true"]
                                 if node == state["nodes"][0] else ["--dataplane", "off"])
                    elif daemon == "storaged":  # one directory "disk" per node; ports chosen by the kernel
                        extra = ["--disks", f"d1={self.data_dir / 'disks' / node / 'd1'}",
                                 "--peer-listen", "127.0.0.1:0", "--nbd-listen", ""]
                    self._spawn(state, daemon, common + self._tls_args(state, daemon, node)
                                + ["--node", node] + extra, node=node)
            self._save(state)
            progress(f"started {len(state['processes'])} processes; waiting for readiness")
            self._wait_ready(state, timeout, progress)
        except BaseException:
            self.down()
            raise
        return state

    def _spawn(self, state: dict, daemon: str, args: list[str], node: str | None = None) -> None:
        name = f"{daemon}@{node}" if node else daemon
        log = self.data_dir / "logs" / f"{name}.log"
        run = self.data_dir / "run" / f"{name}.json"
        run.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", ENTRYPOINTS[daemon], *args, "--state-file", str(run)]
        with open(log, "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=str(self.data_dir))
        state["processes"].append(Proc(name, p.pid, cmd, str(log)).__dict__)

    def _wait_ready(self, state: dict, timeout: float, progress) -> None:
        from braid.client import ApiCallError, Client

        deadline = time.monotonic() + timeout
        procs = [Proc(**p) for p in state["processes"]]
        pending = {p.name for p in procs if p.name != "etcd"}
        tls = self._tls_of(state)
        while pending:
            for p in procs:
                if not p.alive():
                    tail = _tail(p.log)
                    raise ClusterError(f"{p.name} exited during start-up; last log lines:\n{tail}")
            for name in list(pending):
                run = self.data_dir / "run" / f"{name}.json"
                if run.exists() and _serving(json.loads(run.read_text())["grpc"], tls):
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise ClusterError(f"not ready after {timeout:.0f}s: {', '.join(sorted(pending))}")
            time.sleep(0.1)
        with Client(state["api"], tls=tls) as c:
            while True:
                try:
                    nodes, _, _ = c.list("node")
                    ready = [n.metadata.name for n in nodes if n.status.phase == "Ready"]
                    if len(ready) >= len(state["nodes"]):
                        progress(f"{len(ready)} nodes Ready")
                        return
                except ApiCallError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"nodes not Ready after {timeout:.0f}s")
                time.sleep(0.1)

    # -- down ---------------------------------------------------------------

    def down(self, timeout: float = 15.0, progress: Callable[[str], None] = lambda s: None) -> list[str]:
        """Stop every process (daemons first, etcd last). Returns the names of
        processes that had to be killed."""
        procs = self.procs()
        killed = []
        st = self.state() or {}
        if st.get("libvirt_uri", "").startswith("qemu") and any(p.alive() for p in procs):
            n = self._remove_domains(st)
            if n:
                progress(f"removed {n} VM(s) of this cluster from libvirt")
        daemons = [p for p in procs if p.name != "etcd"]
        for group in (daemons, [p for p in procs if p.name == "etcd"]):
            for p in group:
                if p.alive():
                    _signal(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while any(p.alive() for p in group) and time.monotonic() < deadline:
                time.sleep(0.05)
            for p in group:
                if p.alive():
                    _signal(p.pid, signal.SIGKILL)
                    killed.append(p.name)
            for p in group:
                _reap(p.pid)
        if procs:
            progress(f"stopped {len(procs)} processes")
        still = [p.name for p in procs if p.alive()]
        if still:
            raise ClusterError(f"processes still running: {', '.join(still)}")
        if self.state_path.exists():
            self.state_path.unlink()
        for run in (self.data_dir / "run").glob("*.json") if (self.data_dir / "run").exists() else ():
            run.unlink()
        return killed


    @staticmethod
    def _tls_of(st: dict, user: str = "admin"):
        if not st.get("pki"):
            return None
        from braid.auth.pki import TlsFiles
        return TlsFiles.for_user(st["pki"], user)

    def _remove_domains(self, st: dict) -> int:
        """Power off and undefine the domains of this cluster's nodes (the VMs
        are processes of the cluster too). Best effort: etcd tells the owner
        identity the agents wrote into their domains."""
        import libvirt

        from braid.store import Store, StoreError
        try:
            store = Store(st["etcd"], retry_budget=2, tls=self._tls_of(st, "root"))
            cid = store.cluster_id()
            store.close()
        except (StoreError, KeyError, ValueError):
            return 0
        owners = {f"{n}@{cid}" for n in st.get("nodes", [])}
        removed = 0
        try:
            conn = libvirt.open(st["libvirt_uri"])
        except libvirt.libvirtError:
            return 0
        try:
            for dom in conn.listAllDomains():
                if not dom.name().startswith("braid-"):
                    continue
                try:
                    if _owner(dom.XMLDesc(0)) not in owners:
                        continue
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
                    removed += 1
                except libvirt.libvirtError:
                    continue
        finally:
            conn.close()
        return removed


def _owner(xml: str) -> str:
    from braid.naming import parse_braid_metadata
    try:
        return parse_braid_metadata(xml).get("node", "")
    except ValueError:
        return ""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _serving(address: str, tls=None) -> bool:
    from braid.auth.pki import grpc_channel_credentials
    try:
        with (grpc.secure_channel(address, grpc_channel_credentials(tls)) if tls
              else grpc.insecure_channel(address)) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
