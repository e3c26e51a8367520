"""Security of a running local cluster (``braid cluster up``, secure by default).

* every TCP port the cluster's processes listen on refuses a client without
  a valid certificate (plain TCP, a certificate of another CA, an expired
  one), while the same port takes a valid one (so the check can fail);
  the controller's token port refuses calls without a valid token;
* roles: a viewer cannot create or delete, an operator cannot delete a
  volume; every denial is in the audit log;
* etcd: a daemon's certificate reads and writes only its own keys;
* certificate rotation (new CA, every certificate re-issued, old CA dropped)
  while a VM runs and a client writes to a volume: no interruption, new
  connections get the new certificates, the old CA's certificates are refused
  once the rotation is finished.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.auth import pki
from braid.client import ApiCallError, Client
from tests.conftest import wait

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def braid(data: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([str(REPO / ".venv" / "bin" / "braid"), "--data-dir", str(data), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"braid {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    data = tmp_path_factory.mktemp("secure") / "cluster"
    braid(data, "cluster", "up", "--nodes", "2", "--libvirt-uri", "test:///default")
    try:
        state = json.loads((data / "cluster.json").read_text())
        yield data, state, Path(state["pki"])
    finally:
        braid(data, "cluster", "down", check=False)


def listening_ports(pids: set[int]) -> dict[int, str]:
    """TCP ports the given processes listen on -> the process's name."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ports = {}
    for line in out.splitlines():
        m = re.search(r":(\d+)\s.*users:\(\(\"([^\"]+)\",pid=(\d+)", line)
        if m and int(m.group(3)) in pids:
            ports[int(m.group(1))] = f"{m.group(2)}[{m.group(3)}]"
    return ports


def tls_attempt(port: int, tls: pki.TlsFiles | None, ca: Path) -> str:
    """'accepted' when the server keeps a TLS connection with this client
    certificate (it answers a request: HTTP/2 settings or an HTTP/1 reply,
    or waits for one), else why it refused. HTTP/2 first (gRPC), then
    HTTP/1.1 (metrics, etcd's peer port)."""
    got = _tls_attempt(port, tls, ca, h2=True)
    return got if got != "closed" else _tls_attempt(port, tls, ca, h2=False)


def _tls_attempt(port: int, tls: pki.TlsFiles | None, ca: Path, h2: bool) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca))
    if h2:
        ctx.set_alpn_protocols(["h2"])
    if tls is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.settimeout(1.5)
                try:
                    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if s.selected_alpn_protocol() == "h2"
                              else b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    data = s.recv(64)
                except TimeoutError:
                    return "accepted"
                return "accepted" if data else "closed"
        except ssl.SSLError as exc:
            return f"tls error: {exc.reason or exc}"
        except (ConnectionResetError, BrokenPipeError) as exc:
            return f"reset: {exc}"


def plain_attempt(port: int) -> bytes:
    """What a server says to a plaintext HTTP request."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.settimeout(2)
        try:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            return s.recv(64)
        except (TimeoutError, ConnectionResetError):
            return b""


def test_every_port_refuses_clients_without_a_valid_certificate(lc, tmp_path):
    data, state, pkid = lc
    ca = pkid / "ca.crt"
    pids = {p["pid"] for p in state["processes"]}
    ports = listening_ports(pids)
    token_port = int(state["token_api"].rsplit(":", 1)[1])
    assert len(ports) >= 1 + 2 * 2 + 2 * (3 * 2 + 1), ports   # etcd 2, every daemon gRPC + metrics, peers
    other = tmp_path / "other-ca"
    pki.init_ca(other, cluster="intruder")
    stranger = pki.issue_user(other, "admin", "admin")
    expired = pki.issue_user(pkid, "expired-admin", "admin",
                             not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10),
                             not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1))
    good = pki.TlsFiles.for_user(pkid, "admin")
    report = []
    for port, who in sorted(ports.items()):
        plain = plain_attempt(port)
        assert not plain.startswith(b"HTTP/") and b"braid" not in plain, (port, who, plain)
        if port == token_port:   # certificate optional there; the token is checked per call
            continue
        results = {name: tls_attempt(port, t, ca) for name, t in
                   (("none", None), ("other CA", stranger), ("expired", expired), ("valid", good))}
        for service in ("storaged", "etcd"):   # replication ports: storage daemons; etcd's peer port: etcd
            if results["valid"] != "accepted":
                results["valid"] = tls_attempt(port, pki.TlsFiles.for_service(pkid, "node1", service), ca)
                results["valid as"] = service
        report.append(f"{port} {who}: {results}")
        assert results["valid"] == "accepted", (port, who, results)
        for name in ("none", "other CA", "expired"):
            assert results[name] != "accepted", (port, who, name, results)
    print("\n" + "\n".join(report))
    # the token port: TLS without a client certificate, but nothing without a token
    with open(ca, "rb") as f:
        ch = grpc.secure_channel(state["token_api"], grpc.ssl_channel_credentials(root_certificates=f.read()))
    with ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(state["token_api"], token="braid_not-a-real-token", ca=str(ca)) as c:
        with pytest.raises(ApiCallError) as e:
            c.list("volume")
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_roles_are_enforced_and_every_denial_is_audited(lc):
    data, state, pkid = lc
    braid(data, "pki", "issue-user", "vera", "--role", "viewer", "--dir", str(pkid))
    braid(data, "pki", "issue-user", "otto", "--role", "operator", "--dir", str(pkid))
    audit = data / "logs" / "audit.log"
    before = len(audit.read_text().splitlines()) if audit.exists() else 0

    def as_user(user, *args, expect=0):
        p = braid(data, "--user", user, *args, check=False)
        assert p.returncode == expect, (user, args, p.stdout, p.stderr)
        return p

    braid(data, "volume", "create", "rolevol", "--size", "64M")            # admin
    as_user("vera", "get", "volumes")                                      # a viewer reads
    p = as_user("vera", "volume", "create", "vv", "--size", "64M", expect=6)
    assert "PERMISSION_DENIED" in p.stderr and "vera (viewer) may not create volume vv" in p.stderr
    as_user("vera", "delete", "volume", "rolevol", expect=6)
    as_user("vera", "apply", "-f", str(REPO / "examples" / "tiny-vm.yaml"), expect=6)
    as_user("otto", "apply", "-f", str(REPO / "examples" / "tiny-vm.yaml"))   # an operator runs VMs
    hostdisk = (REPO / "examples" / "tiny-vm.yaml").read_text().replace("name: tiny", "name: sneaky", 1) + \
        "  disks:\n  - name: vda\n    path: /dev/sda\n"
    p = subprocess.run([str(REPO / ".venv" / "bin" / "braid"), "--data-dir", str(data), "--user", "otto",
                        "apply", "-f", "-"], input=hostdisk, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 6 and "spec.disks[0].path" in p.stderr, (p.stdout, p.stderr)   # no host devices
    p = as_user("vera", "vm", "logs", "tiny", expect=6)   # the node agent checks roles too
    assert "may not console vm tiny" in p.stderr, p.stderr
    as_user("otto", "vm", "stop", "tiny", "--wait", "30")
    as_user("otto", "delete", "volume", "rolevol", expect=6)               # ... but deletes no volume
    as_user("otto", "volume", "resize", "rolevol", "--size", "128M", "--wait", "0")
    # tokens: only an admin issues them; an operator's token acts as the operator
    as_user("otto", "token", "create", "eve", "--role", "admin", expect=6)
    token = braid(data, "token", "create", "tom", "--role", "operator").stdout.strip()
    with Client(state["token_api"], token=token, ca=str(pkid / "ca.crt")) as c:
        assert c.get("volume", "rolevol").spec.size_bytes == 128 << 20
        with pytest.raises(ApiCallError) as e:
            c.delete("volume", "rolevol")
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert braid(data, "get", "volume", "rolevol").returncode == 0     # nothing was deleted
    lines = [json.loads(x) for x in audit.read_text().splitlines()[before:]]
    denied = [(x["user"], x["verb"], x["kind"], x["name"]) for x in lines if x["code"] == "PERMISSION_DENIED"]
    assert ("vera", "create", "volume", "vv") in denied and ("vera", "delete", "volume", "rolevol") in denied
    assert ("vera", "create", "vm", "tiny") in denied and ("otto", "delete", "volume", "rolevol") in denied
    assert ("otto", "create", "token", "eve") in denied and ("tom", "delete", "volume", "rolevol") in denied
    allowed = {(x["user"], x["verb"], x["kind"], x["name"]) for x in lines if x["code"] == "OK"}
    assert ("otto", "create", "vm", "tiny") in allowed and ("admin", "create", "volume", "rolevol") in allowed
    assert all("braid_" not in json.dumps(x) for x in lines)   # no token in the log
    print(f"\n{len(denied)} denials, {len(lines)} audit records")


def etcdctl(state: dict, tls: pki.TlsFiles, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["etcdctl", f"--endpoints=https://{state['etcd']}", f"--cacert={tls.ca}",
                           f"--cert={tls.cert}", f"--key={tls.key}", "--command-timeout=5s", *args],
                          capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=20)


def test_etcd_gives_each_daemon_only_its_keys(lc):
    _, state, pkid = lc
    storaged = pki.TlsFiles.for_service(pkid, "node1", "storaged")
    netd = pki.TlsFiles.for_service(pkid, "node1", "netd")
    agent = pki.TlsFiles.for_service(pkid, "node2", "node-agent")
    ok = etcdctl(state, storaged, "get", "--prefix", "--keys-only", "/braid/extent/")
    assert ok.returncode == 0, ok.stderr
    denied = [
        (storaged, "get", "--prefix", "/braid/net/"),
        (storaged, "get", "--prefix", "/braid/ipam/"),
        (storaged, "put", "/braid/vm/spec/evil", "{}"),
        (netd, "put", "/braid/extent/evil/000000", "{}"),
        (netd, "put", "/braid/net/vtep/node2", "10.0.0.66"),   # another node's tunnel
        (agent, "get", "--prefix", "/braid/storage/"),
        (agent, "put", "/braid/node/status/node1", "{}"),       # another node's status
        (agent, "put", "/braid/volume/spec/evil", "{}"),
    ]
    for tls, *args in denied:
        p = etcdctl(state, tls, *args)
        assert p.returncode != 0 and "permission denied" in p.stderr, (tls.cert.name, args, p.stdout, p.stderr)
    mine = etcdctl(state, netd, "get", "/braid/net/vtep/node1")
    assert mine.returncode == 0, mine.stderr


def _writer(sock_path: str, stop: threading.Event, errors: list, count: list) -> None:
    from tests.nbd_rawclient import CMD_FLUSH, CMD_WRITE, RawClient
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    c = RawClient(s)
    c.connect("")
    k = 0
    while not stop.is_set():
        r = c.call(CMD_WRITE, (k % 256) * 4096, 4096, payload=bytes([k % 251]) * 4096)
        if r.error:
            errors.append(f"write {k}: {r.error}")
        if k % 50 == 0 and c.call(CMD_FLUSH).error:
            errors.append(f"flush at {k}")
        k += 1
        count[0] = k
        time.sleep(0.002)
    c.close()


def test_rotation_on_a_running_cluster_interrupts_nothing(lc):
    data, state, pkid = lc
    ca = pkid / "ca.crt"
    braid(data, "volume", "create", "rot", "--size", "64M", "--replicas", "2")
    braid(data, "apply", "-f", str(REPO / "examples" / "tiny-vm.yaml"))
    with Client(state["api"], tls=pki.TlsFiles.for_user(pkid, "admin")) as c:
        wait(lambda: c.get("vm", "tiny").status.phase == "Running", 30, "vm tiny Running")
        vm_before = c.get("vm", "tiny").status
    admin = pki.TlsFiles.for_user(pkid, "admin")
    old_dir = pkid.parent / "old-admin"
    old_dir.mkdir(exist_ok=True)
    (old_dir / "admin.crt").write_bytes(admin.cert.read_bytes())
    (old_dir / "admin.key").write_bytes(admin.key.read_bytes())
    old = pki.TlsFiles(old_dir / "admin.crt", old_dir / "admin.key", ca)
    sock = Path("/run/braid/node1/nbd/rot.sock")
    wait(sock.exists, 15, "the volume's socket")
    stop, errors, count = threading.Event(), [], [0]
    w = threading.Thread(target=_writer, args=(str(sock), stop, errors, count), daemon=True)
    w.start()
    try:
        wait(lambda: count[0] > 50, 15, "writes under way")
        serial_before = _server_serial(state["api"], ca)
        braid(data, "pki", "rotate", "--dir", str(pkid))
        braid(data, "pki", "renew", "--all", "--dir", str(pkid))
        # new connections get the re-issued certificate; old and new client certificates both work
        wait(lambda: _server_serial(state["api"], ca) != serial_before, 10, "the API's new certificate")
        for tls in (old, pki.TlsFiles.for_user(pkid, "admin")):
            with Client(state["api"], tls=tls) as c:
                assert c.get("volume", "rot").status.phase in ("Healthy", "Pending")
        braid(data, "pki", "rotate", "--finish", "--dir", str(pkid))
        time.sleep(1.0)
        n = count[0]
        wait(lambda: count[0] > n + 50, 15, "writes going on after the rotation")
    finally:
        stop.set()
        w.join(10)
    assert errors == []
    with Client(state["api"], tls=old, timeout=5) as c:   # the old CA is not trusted any more
        with pytest.raises(ApiCallError):
            c.get("volume", "rot")
    with Client(state["api"], tls=pki.TlsFiles.for_user(pkid, "admin")) as c:
        assert c.get("volume", "rot").status.phase == "Healthy"
        nodes, _, _ = c.list("node")
        assert all(n.status.phase == "Ready" for n in nodes)
        vm = c.get("vm", "tiny").status   # the VM ran on, on the same node
        assert (vm.phase, vm.node) == ("Running", vm_before.node), vm
    print(f"\n{count[0]} writes (flushed every 50) through the rotation, none failed")


def _server_serial(address: str, ca: Path) -> int:
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=3) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                der = s.getpeercert(binary_form=True)
        except ssl.SSLError:
            return 0
    return pki.load_cert(der).serial_number
