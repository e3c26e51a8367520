"""The cluster PKI (braid.auth.pki): certificates and real mutual-TLS handshakes on
loopback, gRPC and asyncio/ssl, CA rotation and reloading without restarts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import socket
import ssl
import stat
import warnings
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from braid.auth import pki
from braid.cli import main as cli

NOW = dt.datetime.now(dt.timezone.utc)
LOCAL = {"dns_names": ["localhost"], "ips": ["127.0.0.1"]}


@pytest.fixture
def d(tmp_path):
    """A PKI with a CA, the controller of n1 and the admin alice."""
    p = tmp_path / "pki"
    pki.init_ca(p, cluster="test")
    pki.issue_service(p, "n1", "controller", **LOCAL)
    pki.issue_user(p, "alice", "admin")
    return p


def cert_of(tls: pki.TlsFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(tls.cert.read_bytes())


# -- files and certificates ------------------------------------------------------

def test_layout_permissions_and_idempotent_init(d):
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(d / "ca.key") == 0o600
    assert mode(d / "nodes") == mode(d / "nodes" / "n1") == mode(d / "users") == mode(d / "ca") == 0o700
    assert mode(d / "nodes" / "n1" / "controller.key") == mode(d / "users" / "alice.key") == 0o600
    assert (d / "ca" / "0001.crt").read_bytes() == (d / "ca.crt").read_bytes()
    assert not [p for p in d.rglob("*.tmp")]
    before = (d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes()
    assert pki.init_ca(d, cluster="other") == d / "ca.crt"
    assert ((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes()) == before
    pki.init_ca(d, force=True)
    assert (d / "ca.crt").read_bytes() != before[0]
    assert pki.list_certs(d)[1].issuer == "unknown"   # leaves of the replaced CA are not trusted


def test_certificate_contents_and_identities(d):
    svc = cert_of(pki.TlsFiles.for_service(d, "n1", "controller"))
    assert svc.subject.rfc4514_string() == "OU=controller,O=braid:service,CN=controller.n1"
    san = svc.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["controller.n1", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = svc.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert svc.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert pki.identity_from_cert(svc.public_bytes(pki.serialization.Encoding.DER)) == pki.Identity(
        "controller.n1", "service", service="controller", node="n1", serial=svc.serial_number)

    user = cert_of(pki.TlsFiles.for_user(d, "alice"))
    assert list(user.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    ident = pki.identity_from_cert((d / "users" / "alice.crt").read_text())
    assert (ident.name, ident.kind, ident.role, str(ident)) == ("alice", "user", "admin", "user:alice(admin)")
    ca = pki.load_ca(d).cert
    assert ca.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "test"
    with pytest.raises(ValueError, match="not a Braid identity"):
        pki.identity_from_cert(ca)

    with pytest.raises(ValueError, match="role"):
        pki.issue_user(d, "bob", "root")
    with pytest.raises(ValueError, match="service"):
        pki.issue_service(d, "n1", "webserver")
    with pytest.raises(ValueError, match="node name"):
        pki.issue_service(d, "../etc", "netd")
    with pytest.raises(ValueError, match="IP"):
        pki.issue_service(d, "n1", "netd", ips=["300.1.1.1"])
    with pytest.raises(pki.PkiError, match="no CA"):
        pki.issue_user(d.parent / "empty", "bob", "viewer")
    # validity: capped by the CA, overridable for tests
    far = pki.issue_user(d, "carol", "viewer", days=100_000)
    assert cert_of(far).not_valid_after_utc == ca.not_valid_after_utc
    old = pki.issue_user(d, "dave", "viewer", not_before=NOW - dt.timedelta(days=9),
                         not_after=NOW - dt.timedelta(days=1))
    assert cert_of(old).not_valid_after_utc < NOW


# -- gRPC ------------------------------------------------------------------------

def _who(request, context):
    ident = pki.identity_from_grpc_context(context)
    return json.dumps(dataclasses.asdict(ident) if ident else None).encode()


@contextlib.contextmanager
def grpc_server(creds):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "braid.test.Whoami", {"Who": grpc.unary_unary_rpc_method_handler(_who)})])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def ask(port, creds, target="127.0.0.1", override=None) -> dict | None:
    """Who the server says we are, over a new connection (never a shared one)."""
    opts = [("grpc.use_local_subchannel_pool", 1)]
    if override:
        opts.append(("grpc.ssl_target_name_override", override))
    with grpc.secure_channel(f"{target}:{port}", creds, options=opts) as ch:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return json.loads(ch.unary_unary("/braid.test.Whoami/Who")(b"", timeout=5))


def refused(port, creds, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        ask(port, creds, **kw)
    return exc.value.code()


def foreign_user(tmp_path) -> pki.TlsFiles:
    """A user of another cluster's CA (which trusts ours, so only the server can refuse)."""
    other = tmp_path / "other"
    pki.init_ca(other)
    tls = pki.issue_user(other, "mallory", "admin")
    return dataclasses.replace(tls, ca=tmp_path / "pki" / "ca.crt")


def test_grpc_mutual_tls(d, tmp_path):
    alice = pki.TlsFiles.for_user(d, "alice")
    bob = pki.issue_user(d, "bob", "viewer", not_before=NOW - dt.timedelta(days=30),
                         not_after=NOW - dt.timedelta(minutes=1))
    eve = pki.issue_user(d, "eve", "operator", not_before=NOW + dt.timedelta(days=1),
                         not_after=NOW + dt.timedelta(days=30))
    sched = pki.issue_service(d, "n2", "scheduler")
    with grpc_server(pki.grpc_server_credentials(pki.TlsFiles.for_service(d, "n1", "controller"))) as port:
        who = ask(port, pki.grpc_channel_credentials(alice))
        assert (who["name"], who["kind"], who["role"]) == ("alice", "user", "admin")
        assert who["serial"] == cert_of(alice).serial_number
        # a service as a client; it insists on talking to controller.n1
        who = ask(port, pki.grpc_channel_credentials(sched), override="controller.n1")
        assert (who["kind"], who["service"], who["node"]) == ("service", "scheduler", "n2")
        assert ask(port, pki.grpc_channel_credentials(alice), target="localhost")["name"] == "alice"

        ca_only = grpc.ssl_channel_credentials(root_certificates=(d / "ca.crt").read_bytes())
        assert refused(port, ca_only) == grpc.StatusCode.UNAVAILABLE                       # no certificate
        assert refused(port, pki.grpc_channel_credentials(foreign_user(tmp_path))) == \
            grpc.StatusCode.UNAVAILABLE                                                    # another CA
        assert refused(port, pki.grpc_channel_credentials(bob)) == grpc.StatusCode.UNAVAILABLE   # expired
        assert refused(port, pki.grpc_channel_credentials(eve)) == grpc.StatusCode.UNAVAILABLE   # not yet
        # the client checks the server too: not the service it asked for
        assert refused(port, pki.grpc_channel_credentials(alice), override="netd.n1") == \
            grpc.StatusCode.UNAVAILABLE
    with grpc_server(grpc.ssl_server_credentials(
            [((d / "users/alice.key").read_bytes(), (d / "users/alice.crt").read_bytes())])) as port:
        # a user certificate is no server certificate (clientAuth only)
        assert refused(port, pki.grpc_channel_credentials(alice), override="alice") == \
            grpc.StatusCode.UNAVAILABLE


# -- asyncio / ssl -----------------------------------------------------------------

async def _serve_who(reader, writer):
    ident = pki.identity_from_ssl(writer)
    writer.write(json.dumps(dataclasses.asdict(ident) if ident else None).encode() + b"\n")
    with contextlib.suppress(Exception):
        await writer.drain()
        writer.close()
        await writer.wait_closed()


async def _ask_ssl(port, ctx, hostname="127.0.0.1"):
    """(identity the server saw, serial of the server's certificate); raises if refused."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=hostname), 5)
    try:
        serial = x509.load_der_x509_certificate(
            writer.get_extra_info("ssl_object").getpeercert(binary_form=True)).serial_number
        line = await asyncio.wait_for(reader.readline(), 5)
        if not line:
            raise ConnectionResetError("closed by the server")
        return json.loads(line), serial
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _refused_ssl(port, ctx, **kw) -> bool:
    try:
        await _ask_ssl(port, ctx, **kw)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True
    return False


def _quiet(loop):
    loop.set_exception_handler(lambda loop, ctx: None)   # the server logs every refused handshake


def test_ssl_contexts_mutual_tls(d, tmp_path):
    alice = pki.TlsFiles.for_user(d, "alice")
    bob = pki.issue_user(d, "bob", "viewer", not_before=NOW - dt.timedelta(days=30),
                         not_after=NOW - dt.timedelta(minutes=1))
    server_tls = pki.TlsFiles.for_service(d, "n1", "controller")

    async def run():
        _quiet(asyncio.get_running_loop())
        server = await asyncio.start_server(_serve_who, "127.0.0.1", 0, ssl=pki.server_ssl_context(server_tls))
        port = server.sockets[0].getsockname()[1]
        async with server:
            who, serial = await _ask_ssl(port, pki.client_ssl_context(alice))
            assert (who["name"], who["role"]) == ("alice", "admin")
            assert serial == cert_of(server_tls).serial_number
            who, _ = await _ask_ssl(port, pki.client_ssl_context(alice), hostname="controller.n1")
            assert who["name"] == "alice"

            no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            no_cert.load_verify_locations(d / "ca.crt")
            assert await _refused_ssl(port, no_cert)
            assert await _refused_ssl(port, pki.client_ssl_context(foreign_user(tmp_path)))
            assert await _refused_ssl(port, pki.client_ssl_context(bob))
            assert await _refused_ssl(port, pki.client_ssl_context(alice), hostname="storaged.n1")
            old12 = pki.client_ssl_context(alice)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                old12.maximum_version = ssl.TLSVersion.TLSv1_1
            assert await _refused_ssl(port, old12)

    asyncio.run(run())


# -- rotation and reloading --------------------------------------------------------

def grpc_server_serial(port, tls: pki.TlsFiles) -> int:
    """The serial of the certificate a gRPC server presents on a new connection."""
    ctx = pki.client_ssl_context(tls)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls_sock:
        return x509.load_der_x509_certificate(tls_sock.getpeercert(binary_form=True)).serial_number


def test_ca_rotation_with_reloading_grpc_server(d):
    server_tls = pki.TlsFiles.for_service(d, "n1", "controller")
    alice = pki.TlsFiles.for_user(d, "alice")          # signed by CA #1
    first_ca = pki.load_ca(d).cert
    with grpc_server(pki.reloading_grpc_server_credentials(server_tls)) as port:
        assert ask(port, pki.grpc_channel_credentials(alice))["name"] == "alice"
        s1 = grpc_server_serial(port, alice)
        assert s1 == cert_of(server_tls).serial_number

        pki.rotate_ca(d)
        ca = pki.load_ca(d)
        assert ca.cert != first_ca and ca.previous == (first_ca,)
        assert [c.subject for c in x509.load_pem_x509_certificates((d / "ca.crt").read_bytes())] == \
            [ca.cert.subject, first_ca.subject]
        with pytest.raises(pki.PkiError, match="in progress"):
            pki.rotate_ca(d)
        with pytest.raises(pki.PkiError, match="still signed by the previous CA"):
            pki.finish_rotation(d)
        bob = pki.issue_user(d, "bob", "operator")        # signed by CA #2
        assert pki.load_ca(d).cert.subject == cert_of(bob).issuer

        # the server trusts the new bundle without a restart; its certificate is re-issued
        pki.issue_service(d, "n1", "controller", **LOCAL)
        s2 = grpc_server_serial(port, alice)
        assert s2 == cert_of(server_tls).serial_number != s1
        assert cert_of(server_tls).issuer == ca.cert.subject
        assert ask(port, pki.grpc_channel_credentials(alice))["name"] == "alice"   # old CA's leaf
        assert ask(port, pki.grpc_channel_credentials(bob))["name"] == "bob"       # new CA's leaf

        # a half-written update (a key that is not the certificate's) is not used
        good_key = server_tls.key.read_bytes()
        pki._write_atomic(server_tls.key, (d / "users" / "bob.key").read_bytes(), 0o600)
        with pytest.raises(pki.PkiError, match="does not belong"):
            server_tls.read()
        assert grpc_server_serial(port, bob) == s2
        pki._write_atomic(server_tls.key, good_key, 0o600)

        rows = {r.name: r for r in pki.list_certs(d)}
        assert rows["alice"].issuer == "previous" and not rows["alice"].issuer_current
        assert rows["bob"].issuer == "current" and rows["controller.n1"].issuer_current
        assert pki.stale_certs(d) == [alice.cert]
        assert pki.renew_certs(d) == [(alice.cert, "not signed by the current CA")]
        pki.finish_rotation(d)
        with pytest.raises(pki.PkiError, match="no CA rotation"):
            pki.finish_rotation(d)
        assert x509.load_pem_x509_certificates((d / "ca.crt").read_bytes()) == [ca.cert]
        assert ask(port, pki.grpc_channel_credentials(alice))["name"] == "alice"   # renewed


def test_finish_rotation_stops_trusting_the_old_ca(d, tmp_path):
    server_tls = pki.TlsFiles.for_service(d, "n1", "controller")
    old_alice = pki.TlsFiles(tmp_path / "a.crt", tmp_path / "a.key", d / "ca.crt")
    old_alice.cert.write_bytes((d / "users/alice.crt").read_bytes())
    old_alice.key.write_bytes((d / "users/alice.key").read_bytes())
    pki.rotate_ca(d)
    pki.renew_certs(d)      # the server's and alice's certificates, not the copy outside the directory
    reloading = pki.ReloadingSSLContext(server_tls, server=True)

    async def run():
        _quiet(asyncio.get_running_loop())
        server = await asyncio.start_server(_serve_who, "127.0.0.1", 0, ssl=reloading.server_context())
        port = server.sockets[0].getsockname()[1]
        async with server:
            assert (await _ask_ssl(port, pki.client_ssl_context(old_alice)))[0]["name"] == "alice"
            serial = cert_of(server_tls).serial_number
            pki.finish_rotation(d)
            assert await _refused_ssl(port, pki.client_ssl_context(old_alice))
            who, seen = await _ask_ssl(port, pki.client_ssl_context(pki.TlsFiles.for_user(d, "alice")))
            assert who["name"] == "alice" and seen == serial
            pki.issue_service(d, "n1", "controller", **LOCAL)
            _, seen = await _ask_ssl(port, pki.client_ssl_context(pki.TlsFiles.for_user(d, "alice")))
            assert seen == cert_of(server_tls).serial_number != serial

    asyncio.run(run())
    client = pki.ReloadingSSLContext(pki.TlsFiles.for_user(d, "alice"), server=False)
    first = client.get()
    assert client.get() is first
    pki.issue_user(d, "alice", "admin")
    assert client.get() is not first


def test_grpc_server_refuses_old_ca_after_finish(d, tmp_path):
    server_tls = pki.TlsFiles.for_service(d, "n1", "controller")
    mallory = pki.TlsFiles(tmp_path / "m.crt", tmp_path / "m.key", d / "ca.crt")
    pki.issue_user(d, "mallory", "admin")
    mallory.cert.write_bytes((d / "users/mallory.crt").read_bytes())
    mallory.key.write_bytes((d / "users/mallory.key").read_bytes())
    with grpc_server(pki.reloading_grpc_server_credentials(server_tls)) as port:
        pki.rotate_ca(d)
        pki.renew_certs(d)
        assert ask(port, pki.grpc_channel_credentials(mallory))["name"] == "mallory"
        pki.finish_rotation(d)
        assert refused(port, pki.grpc_channel_credentials(mallory)) == grpc.StatusCode.UNAVAILABLE
        assert ask(port, pki.grpc_channel_credentials(pki.TlsFiles.for_user(d, "mallory")))["name"] == "mallory"


# -- the local cluster and the CLI -----------------------------------------------------

def test_ensure_local_cluster_pki(tmp_path):
    d = tmp_path / "pki"
    done = pki.ensure_local_cluster_pki(d, ["node1", "node2"], cluster="local")
    assert len(done) == 2 * len(pki.SERVICES) + 1 and {why for _, why in done} == {"missing"}
    assert pki.ensure_local_cluster_pki(d, ["node1", "node2"], cluster="local") == []
    rows = pki.list_certs(d)
    assert [r.kind for r in rows].count("service") == 12 and rows[-1].name == "admin"
    netd = next(r for r in rows if r.name == "netd.node2")
    assert set(netd.sans) == {"netd.node2", "localhost", "node2", "127.0.0.1", "::1"}

    pki.issue_service(d, "node1", "etcd", dns_names=["localhost", "node1"], ips=pki.LOCAL_SANS_IP,
                      not_after=NOW + dt.timedelta(days=3))
    pki.issue_service(d, "node2", "etcd")    # SANs missing
    pki.issue_user(d, "admin", "viewer")
    done = dict(pki.ensure_local_cluster_pki(d, ["node1", "node2"]))
    assert set(done) == {d / "nodes/node1/etcd.crt", d / "nodes/node2/etcd.crt", d / "users/admin.crt"}
    assert done[d / "nodes/node1/etcd.crt"].startswith("expires")
    assert done[d / "nodes/node2/etcd.crt"].startswith("lacks SANs")
    assert done[d / "users/admin.crt"] == "role changed"

    pki.rotate_ca(d)
    done = pki.ensure_local_cluster_pki(d, ["node1", "node2"])
    assert len(done) == 13 and {why for _, why in done} == {"not signed by the current CA"}
    assert pki.stale_certs(d) == []
    pki.finish_rotation(d)


def test_cli(tmp_path, capsys, monkeypatch):
    d = tmp_path / "pki"
    monkeypatch.setenv("BRAID_PKI_DIR", str(d))
    assert cli.main(["pki", "init", "--cluster", "prod"]) == 0
    out = capsys.readouterr().out
    assert "Created the CA of cluster 'prod'" in out and str(d / "ca.key") in out
    assert cli.main(["pki", "init", "--dir", str(d)]) == 0
    assert "already exists" in capsys.readouterr().out
    assert cli.main(["pki", "issue-service", "n1", "storaged", "--dns", "n1.example", "--ip", "10.0.0.1"]) == 0
    out = capsys.readouterr().out
    assert "service:storaged.n1" in out and "n1.example" in out and "10.0.0.1" in out
    assert cli.main(["pki", "issue-user", "ann", "--role", "operator"]) == 0
    assert "user:ann with role operator" in capsys.readouterr().out
    assert cli.main(["pki", "issue-service", "N_1", "netd"]) == 2
    assert "bad node name" in capsys.readouterr().err

    assert cli.main(["pki", "rotate"]) == 0
    assert "braid pki rotate --finish" in capsys.readouterr().out
    assert cli.main(["pki", "rotate", "--finish"]) == 1
    assert "still signed by the previous CA" in capsys.readouterr().err
    assert cli.main(["pki", "list"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "ROLE", "NODE", "EXPIRES", "ISSUER", "PATH"]
    assert [ln.split()[0] for ln in lines[1:]] == ["ca", "ca", "service", "user"]
    assert "previous" in lines[3] and "users/ann.crt" in lines[4] and "braid pki renew" in captured.err
    assert cli.main(["pki", "renew"]) == 0
    assert "Re-issued 2 certificate(s)" in capsys.readouterr().out
    assert cli.main(["pki", "rotate", "--finish"]) == 0
    assert "trusts only" in capsys.readouterr().out
    assert cli.main(["pki", "list", "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in rows] == ["ca", "service", "user"]
    assert all(r["issuer_current"] and not r["expired"] for r in rows)
    assert cli.main(["pki", "list", "--dir", str(tmp_path / "none")]) == 1
    assert "no CA" in capsys.readouterr().err
