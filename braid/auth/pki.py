"""The cluster PKI: a CA, certificates for services and users, TLS material.

Every connection between Braid processes (and from the CLI to them) is
mutual TLS: both ends present a certificate signed by the cluster CA, and
the peer's certificate says who it is. This module makes and reads those
certificates; it is a pure library (files in, files and objects out) that
the daemons, the CLI (``braid pki ...``) and the local cluster use.

Layout of a PKI directory (``/etc/braid/pki`` on real nodes, ``$BRAID_PKI_DIR``
to point elsewhere, ``<data-dir>/pki`` for the one-machine local cluster)::

    ca.crt                       the trust bundle: the current CA certificate
                                 first, then the previous one while a rotation
                                 is in progress
    ca.key                       the current CA's private key (only where
                                 certificates are issued; 0600)
    ca/<generation>.crt          every CA certificate ever made here (history)
    nodes/<node>/<service>.crt   a service's certificate and key, service one of
    nodes/<node>/<service>.key   controller, scheduler, node-agent, storaged,
                                 netd, etcd
    users/<name>.crt|.key        a person's (the CLI's) certificate and key

Keys are 0600, directories 0700. Every file is written to a temporary file
and renamed over the old one, so a reader (a daemon reloading its
certificate) sees either the old or the new file, never half of one; a key
is written before its certificate, and readers check that the two match
before they use them.

Identities are in the subject of the certificate:

    service   CN=<service>.<node>  O=braid:service  OU=<service>
              EKU serverAuth + clientAuth (services call each other);
              DNS SANs: ``<service>.<node>`` (so a client can insist on a
              service with ``grpc.ssl_target_name_override``) plus what the
              issuer passes (host names, addresses the service listens on)
    user      CN=<name>            O=braid:user     OU=<role>
              role one of admin, operator, viewer; EKU clientAuth only

A server learns the identity of its peer with ``identity_from_grpc_context``
(gRPC) or ``identity_from_ssl`` (asyncio / ``ssl`` servers: the storage
replication port, NBD over TCP); authorization decides on ``Identity``.
Keys are EC P-256 (cheap to make, fast handshakes).

Rotating the CA, without an outage:

1. ``rotate_ca``: a new CA key and certificate; ``ca.crt`` becomes the bundle
   (new, old). Distribute ``ca.crt`` to every node: every process then trusts
   certificates of both CAs (servers reload it by themselves, see below).
2. Re-issue every certificate (``renew_certs``, ``braid pki renew``): it is
   signed by the new CA from now on; distribute them.
3. ``finish_rotation``: ``ca.crt`` holds only the new CA. Certificates of the
   old CA are not trusted any more (it refuses while some under this
   directory still are signed by it, unless forced).

Reloading: certificates rotate, so servers never have to restart for it.
``reloading_grpc_server_credentials`` gives gRPC credentials that look at the
files on each new connection and use the new ones once they changed (and
are consistent); ``ReloadingSSLContext`` does the same for ``ssl`` servers
(``server_context()``) and hands clients a fresh context (``get()``).
Connections already open keep the certificate they were made with; a gRPC
client picks up new files by making a new channel.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import re
import secrets
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("braid.auth.pki")

DEFAULT_PKI_DIR = Path("/etc/braid/pki")
PKI_DIR_ENV = "BRAID_PKI_DIR"

SERVICES = ("controller", "scheduler", "node-agent", "storaged", "netd", "etcd")
ROLES = ("admin", "operator", "viewer")

ORG_CA = "braid:ca"
ORG_SERVICE = "braid:service"
ORG_USER = "braid:user"

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_HISTORY = "ca"
NODES = "nodes"
USERS = "users"

# clocks of the nodes differ a little: certificates are valid from a bit before now
BACKDATE = dt.timedelta(minutes=5)
RENEW_WITHIN = dt.timedelta(days=30)
LOCAL_SANS_DNS = ("localhost",)
LOCAL_SANS_IP = ("127.0.0.1", "::1")

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")   # as object names (braid.validation)
DNS_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}"
                    r"[A-Za-z0-9])?)*\.?$")


class PkiError(Exception):
    """The PKI directory is not in a state that allows the operation
    (no CA, a key that does not match, a rotation in progress, ...)."""


def default_pki_dir() -> Path:
    """``$BRAID_PKI_DIR``, else ``/etc/braid/pki``."""
    return Path(os.environ.get(PKI_DIR_ENV) or DEFAULT_PKI_DIR)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- names and paths -------------------------------------------------------------

def _check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"bad {what} name {name!r}: lowercase letters, digits and '-', "
                         "at most 63, starting and ending with a letter or digit")
    return name


def _check_service(service: str) -> str:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r} (one of {', '.join(SERVICES)})")
    return service


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    return role


def service_paths(pki_dir: Path | str, node: str, service: str) -> tuple[Path, Path]:
    """(certificate, key) of ``service`` on ``node``."""
    d = Path(pki_dir) / NODES / _check_name("node", node)
    _check_service(service)
    return d / f"{service}.crt", d / f"{service}.key"


def user_paths(pki_dir: Path | str, name: str) -> tuple[Path, Path]:
    """(certificate, key) of the user ``name``."""
    d = Path(pki_dir) / USERS
    _check_name("user", name)
    return d / f"{name}.crt", d / f"{name}.key"


# -- files -----------------------------------------------------------------------

def _mkdir(path: Path) -> None:
    """Make ``path`` and missing parents, the new ones 0700."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    _mkdir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)   # not narrowed by the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


_held = threading.local()


@contextlib.contextmanager
def _locked(pki_dir: Path) -> Iterator[None]:
    """Serialize changes to one PKI directory (across processes; re-entrant
    within a thread)."""
    _mkdir(pki_dir)
    key = str(pki_dir.resolve())
    held = getattr(_held, "dirs", None)
    if held is None:
        held = _held.dirs = set()
    if key in held:
        yield
        return
    fd = os.open(pki_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)   # releases the lock


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def load_cert(data: bytes | str | x509.Certificate) -> x509.Certificate:
    """A certificate from PEM (text or bytes) or DER."""
    if isinstance(data, x509.Certificate):
        return data
    if isinstance(data, str):
        data = data.encode()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _load_bundle(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise PkiError(f"{path}: not PEM certificates ({exc})") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM private key ({exc})") from None


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


# -- the CA ----------------------------------------------------------------------

@dataclass(frozen=True)
class CA:
    """The CA that signs now, and the bundle ``ca.crt`` holds."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    bundle: tuple[x509.Certificate, ...]

    @property
    def previous(self) -> tuple[x509.Certificate, ...]:
        """CA certificates still trusted besides the current one (a rotation)."""
        return tuple(c for c in self.bundle if c != self.cert)

    @property
    def cluster(self) -> str:
        ou = self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        return str(ou[0].value) if ou else "braid"


def load_ca(pki_dir: Path | str) -> CA:
    """The current CA (the certificate of ``ca.crt`` that belongs to ``ca.key``)."""
    d = Path(pki_dir)
    bundle = _load_bundle(d / CA_CERT)
    if not bundle or not (d / CA_KEY).exists():
        raise PkiError(f"no CA in {d} (make one with `braid pki init --dir {d}`)")
    key = _load_key(d / CA_KEY)
    mine = _spki(key.public_key())
    for cert in bundle:
        if _spki(cert.public_key()) == mine:
            return CA(cert, key, tuple(bundle))
    raise PkiError(f"{d / CA_KEY} belongs to none of the certificates in {d / CA_CERT}")


def _next_generation(d: Path) -> int:
    gens = [int(p.stem) for p in (d / CA_HISTORY).glob("*.crt") if p.stem.isdigit()]
    return max(gens, default=0) + 1


def _make_ca(d: Path, cluster: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if days <= 0:
        raise ValueError(f"days must be positive, not {days}")
    gen = _next_generation(d)
    key = ec.generate_private_key(ec.SECP256R1())
    # a distinct subject per generation: during a rotation two CAs are trusted,
    # and chain building picks the issuer by name first
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Braid CA {cluster} #{gen}"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG_CA),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    _write_atomic(d / CA_HISTORY / f"{gen:04d}.crt", _cert_pem(cert), 0o644)
    return cert, key


def init_ca(pki_dir: Path | str, cluster: str = "braid", days: int = 3650, force: bool = False) -> Path:
    """Make the cluster CA in ``pki_dir`` (``ca.crt``, ``ca.key``); its path.

    Idempotent: an existing CA is kept (``cluster`` and ``days`` are then
    ignored). ``force`` replaces it, which makes every certificate issued so
    far untrusted; to change the CA without that, use ``rotate_ca``."""
    d = Path(pki_dir)
    _check_name("cluster", cluster)
    with _locked(d):
        if not force and (d / CA_CERT).exists() and (d / CA_KEY).exists():
            load_ca(d)   # it must be usable
            return d / CA_CERT
        cert, key = _make_ca(d, cluster, days)
        _write_atomic(d / CA_KEY, _key_pem(key), 0o600)
        _write_atomic(d / CA_CERT, _cert_pem(cert), 0o644)
    return d / CA_CERT


def rotate_ca(pki_dir: Path | str, days: int = 3650) -> Path:
    """Start a CA rotation: a new CA key and certificate sign from now on;
    ``ca.crt`` becomes the bundle (new, old) so certificates of either CA
    verify. Then re-issue every certificate (``renew_certs``) and call
    ``finish_rotation``. Refuses while a rotation is in progress."""
    d = Path(pki_dir)
    with _locked(d):
        ca = load_ca(d)
        if ca.previous:
            raise PkiError(f"a CA rotation is in progress in {d} ({d / CA_CERT} trusts "
                           f"{len(ca.bundle)} CAs): finish it first (`braid pki rotate --finish`)")
        cert, key = _make_ca(d, ca.cluster, days)
        # the bundle first: a reader that sees the new key must find its certificate
        _write_atomic(d / CA_CERT, _cert_pem(cert) + _cert_pem(ca.cert), 0o644)
        _write_atomic(d / CA_KEY, _key_pem(key), 0o600)
    return d / CA_CERT


def stale_certs(pki_dir: Path | str) -> list[Path]:
    """Leaf certificates under ``pki_dir`` not signed by the current CA."""
    ca = load_ca(pki_dir)
    out = []
    for path in _leaf_paths(Path(pki_dir)):
        try:
            cert = load_cert(path.read_bytes())
        except (OSError, ValueError):
            continue
        if not _signed_by(cert, ca.cert):
            out.append(path)
    return out


def finish_rotation(pki_dir: Path | str, force: bool = False) -> Path:
    """End a CA rotation: ``ca.crt`` holds the current CA only, certificates
    of the previous one are not trusted any more. Refuses while certificates
    under ``pki_dir`` are still signed by another CA, unless ``force``."""
    d = Path(pki_dir)
    with _locked(d):
        ca = load_ca(d)
        if not ca.previous:
            raise PkiError(f"no CA rotation in progress in {d}")
        stale = stale_certs(d)
        if stale and not force:
            names = ", ".join(str(p.relative_to(d)) for p in stale[:5]) + (" ..." if len(stale) > 5 else "")
            raise PkiError(f"{len(stale)} certificate(s) are still signed by the previous CA ({names}): "
                           "re-issue them first (`braid pki renew`), or force it (--force)")
        _write_atomic(d / CA_CERT, _cert_pem(ca.cert), 0o644)
    return d / CA_CERT


# -- issuing ---------------------------------------------------------------------

@dataclass(frozen=True)
class TlsFiles:
    """Where one end of a TLS connection finds its certificate, key and the
    CA bundle it trusts."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def for_service(cls, pki_dir: Path | str, node: str, service: str) -> "TlsFiles":
        crt, key = service_paths(pki_dir, node, service)
        return cls(crt, key, Path(pki_dir) / CA_CERT)

    @classmethod
    def for_user(cls, pki_dir: Path | str, name: str) -> "TlsFiles":
        crt, key = user_paths(pki_dir, name)
        return cls(crt, key, Path(pki_dir) / CA_CERT)

    def exists(self) -> bool:
        return self.cert.exists() and self.key.exists() and self.ca.exists()

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate, key, CA bundle) as PEM; ``PkiError`` unless the key
        belongs to the certificate (the files are being replaced, or wrong)."""
        try:
            key, cert, ca = self.key.read_bytes(), self.cert.read_bytes(), self.ca.read_bytes()
        except OSError as exc:
            raise PkiError(f"cannot read TLS files: {exc}") from None
        try:
            c = load_cert(cert)
            k = serialization.load_pem_private_key(key, password=None)
            x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise PkiError(f"bad TLS files {self.cert} / {self.key} / {self.ca}: {exc}") from None
        if _spki(c.public_key()) != _spki(k.public_key()):
            raise PkiError(f"{self.key} does not belong to {self.cert}")
        return cert, key, ca

    def signature(self) -> tuple:
        """Changes when any of the three files is replaced or modified."""
        out = []
        for p in (self.cert, self.key, self.ca):
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)


def _validity(ca: CA, days: int, not_before: dt.datetime | None,
              not_after: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if days <= 0 and not_after is None:
        raise ValueError(f"days must be positive, not {days}")
    now = _now()
    nb = not_before if not_before is not None else now - BACKDATE
    if not_after is None:
        # a certificate is no use after its CA expired
        na = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    else:
        na = not_after
    for t in (nb, na):
        if t.tzinfo is None:
            raise ValueError("not_before / not_after must be timezone-aware")
    if na <= nb:
        raise ValueError(f"not_after ({na}) must be after not_before ({nb})")
    return nb, na


def _issue(pki_dir: Path, ca: CA, subject: x509.Name, sans: list[x509.GeneralName], server: bool,
           crt: Path, keyp: Path, days: int, not_before, not_after) -> x509.Certificate:
    nb, na = _validity(ca, days, not_before, not_after)
    key = ec.generate_private_key(ec.SECP256R1())
    ekus = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    b = (x509.CertificateBuilder()
         .subject_name(subject).issuer_name(ca.cert.subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(nb).not_valid_after(na)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                      content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                        critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca.key, hashes.SHA256())
    # the key first: a reader that sees the new certificate finds its key
    _write_atomic(keyp, _key_pem(key), 0o600)
    _write_atomic(crt, _cert_pem(cert), 0o644)
    return cert


def _sans(dns_names: Iterable[str], ips: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen = set()
    for n in dns_names:
        if not isinstance(n, str) or not DNS_RE.match(n) or len(n) > 253:
            raise ValueError(f"bad DNS name {n!r}")
        if n.lower() not in seen:
            seen.add(n.lower())
            out.append(x509.DNSName(n))
    for a in ips:
        try:
            ip = ipaddress.ip_address(str(a))
        except ValueError:
            raise ValueError(f"bad IP address {a!r}") from None
        if ip not in seen:
            seen.add(ip)
            out.append(x509.IPAddress(ip))
    return out


def issue_service(pki_dir: Path | str, node: str, service: str, dns_names: Iterable[str] = (),
                  ips: Iterable[str] = (), days: int = 365, not_before: dt.datetime | None = None,
                  not_after: dt.datetime | None = None) -> TlsFiles:
    """Issue (or re-issue, with a new key) the certificate of ``service`` on
    ``node``, signed by the current CA: ``nodes/<node>/<service>.crt|.key``.

    SANs: the DNS name ``<service>.<node>``, then ``dns_names`` and ``ips``
    (the names and addresses clients dial; pass localhost / 127.0.0.1 for
    local connections). Valid for ``days`` (not beyond the CA);
    ``not_before`` / ``not_after`` (aware datetimes) override that, e.g. to
    make expired or not yet valid certificates for tests."""
    d = Path(pki_dir)
    crt, keyp = service_paths(d, node, service)
    ident = f"{service}.{node}"
    sans = _sans([ident, *dns_names], ips)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ident),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG_SERVICE),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, service)])
    with _locked(d):
        ca = load_ca(d)
        _issue(d, ca, subject, sans, True, crt, keyp, days, not_before, not_after)
    return TlsFiles(crt, keyp, d / CA_CERT)


def issue_user(pki_dir: Path | str, name: str, role: str, days: int = 365,
               not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> TlsFiles:
    """Issue (or re-issue, with a new key) the client certificate of the user
    ``name`` with ``role`` (admin, operator or viewer): ``users/<name>.crt|.key``.
    ``not_before`` / ``not_after`` as for ``issue_service``."""
    d = Path(pki_dir)
    crt, keyp = user_paths(d, name)
    _check_role(role)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG_USER),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
    with _locked(d):
        ca = load_ca(d)
        _issue(d, ca, subject, [], False, crt, keyp, days, not_before, not_after)
    return TlsFiles(crt, keyp, d / CA_CERT)


# -- identities ------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """Who is at the other end of a connection, from its certificate."""

    name: str          # users: the user name; services: "<service>.<node>"
    kind: str          # "user" | "service"
    role: str = ""     # users: admin, operator or viewer
    service: str = ""  # services: controller, scheduler, node-agent, storaged, netd, etcd
    node: str = ""     # services: the node it runs on
    serial: int = 0    # of the certificate

    def __str__(self) -> str:
        return f"user:{self.name}({self.role})" if self.kind == "user" else f"service:{self.name}"


def _attr(name: x509.Name, oid) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        raise ValueError(f"subject {name.rfc4514_string()!r} has {len(values)} {oid._name} attributes")
    return str(values[0].value)


def identity_from_cert(data: bytes | str | x509.Certificate) -> Identity:
    """The Braid identity in a certificate (PEM or DER). Only parses: the TLS
    handshake has verified it. ``ValueError`` if it is not a Braid identity."""
    cert = load_cert(data)
    subj = cert.subject
    org = _attr(subj, NameOID.ORGANIZATION_NAME)
    cn = _attr(subj, NameOID.COMMON_NAME)
    ou = _attr(subj, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if org == ORG_USER:
        _check_name("user", cn)
        return Identity(cn, "user", role=_check_role(ou), serial=cert.serial_number)
    if org == ORG_SERVICE:
        service, _, node = cn.partition(".")
        if service != _check_service(ou) or not NAME_RE.match(node):
            raise ValueError(f"service certificate with CN {cn!r} and OU {ou!r}: want CN=<service>.<node>")
        return Identity(cn, "service", service=service, node=node, serial=cert.serial_number)
    raise ValueError(f"not a Braid identity: O={org!r}")


def identity_from_grpc_context(context) -> Identity | None:
    """The identity of the peer of a gRPC call (``grpc`` or ``grpc.aio``
    servicer context), or None: no TLS, no client certificate, or not a
    Braid identity.

    It parses the peer's leaf certificate, which gRPC puts in the auth
    context under ``x509_pem_cert`` (the other entries, ``x509_common_name``
    and ``x509_subject``, are strings made for humans)."""
    try:
        auth = context.auth_context() or {}
    except Exception:   # noqa: BLE001 - a context without TLS information
        return None
    if b"ssl" not in auth.get("transport_security_type", ()):
        return None
    pems = auth.get("x509_pem_cert") or ()
    if not pems:
        return None
    try:
        return identity_from_cert(pems[0])
    except ValueError as exc:
        log.warning("peer certificate is not a Braid identity: %s", exc)
        return None


def identity_from_ssl(obj) -> Identity | None:
    """The identity of the peer of an ``ssl`` connection: an ``SSLSocket``,
    ``SSLObject``, or an asyncio ``StreamWriter`` / transport (its
    ``ssl_object``). None if there is no (Braid) peer certificate."""
    if hasattr(obj, "get_extra_info"):
        obj = obj.get_extra_info("ssl_object")
    if obj is None:
        return None
    der = obj.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return identity_from_cert(der)
    except ValueError as exc:
        log.warning("peer certificate is not a Braid identity: %s", exc)
        return None


# -- TLS material ----------------------------------------------------------------

def grpc_server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate signed by a CA in
    ``tls.ca``. Read once; see ``reloading_grpc_server_credentials``."""
    cert, key, ca = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def grpc_channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Channel credentials: present ``tls.cert``, trust servers signed by a CA
    in ``tls.ca``. The server's certificate must name the host dialled (or
    the name given in the channel option ``grpc.ssl_target_name_override``,
    e.g. ``controller.node1``)."""
    cert, key, ca = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class _Reloader:
    """Something built from TLS files, rebuilt when they change and are
    consistent again; the last good one otherwise."""

    def __init__(self, tls: TlsFiles, build):
        self.tls = tls
        self._build = build
        self._lock = threading.Lock()
        self._sig = tls.signature()
        self.current = build(tls.read())   # fails loudly at start

    def poll(self):
        """(changed, current)."""
        sig = self.tls.signature()
        if sig == self._sig:
            return False, self.current
        with self._lock:
            if sig == self._sig:
                return False, self.current
            try:
                self.current = self._build(self.tls.read())
            except Exception as exc:   # noqa: BLE001 - keep serving with what works
                log.warning("TLS files changed but cannot be used (yet): %s", exc)
                return False, self.current
            self._sig = sig
            log.info("reloaded TLS files", extra={"cert": str(self.tls.cert)})
            return True, self.current


def reloading_grpc_server_credentials(tls: TlsFiles, require_client_cert: bool = True) -> grpc.ServerCredentials:
    """Like ``grpc_server_credentials``, but every new connection first checks
    the files (a ``stat`` each) and uses the new certificate, key and CA
    bundle once they changed; an inconsistent state (key of another
    certificate, half a rotation) keeps the previous configuration."""
    def config(material):
        cert, key, ca = material
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    reloader = _Reloader(tls, config)

    def fetch():
        try:
            changed, cfg = reloader.poll()
        except Exception:   # noqa: BLE001 - raising in gRPC's callback breaks the handshake
            log.exception("checking TLS files")
            return None
        return cfg if changed else None

    # without require_client_cert a client may come without a certificate (it must then show a
    # bearer token to the API); one that presents a certificate still has it verified
    return grpc.dynamic_ssl_server_credentials(reloader.current, fetch,
                                               require_client_authentication=require_client_cert)


def _tls12(ctx: ssl.SSLContext, tls_material: tuple[bytes, bytes, bytes], tls: TlsFiles) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    _cert, _key, ca = tls_material
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(cadata=ca.decode())
    return ctx


def server_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """An ``ssl`` server context (asyncio ``start_server(ssl=...)``): TLS 1.2+,
    a client certificate signed by a CA in ``tls.ca`` required."""
    return _tls12(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls.read(), tls)


def client_ssl_context(tls: TlsFiles, check_hostname: bool = True) -> ssl.SSLContext:
    """An ``ssl`` client context: TLS 1.2+, presents ``tls.cert``, requires a
    server certificate signed by a CA in ``tls.ca`` that names the host
    dialled (``server_hostname``: a name or IP address in its SANs, e.g.
    ``storaged.node2``) unless ``check_hostname`` is False."""
    ctx = _tls12(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls.read(), tls)
    ctx.check_hostname = check_hostname
    return ctx


class ReloadingSSLContext:
    """``ssl`` contexts that follow the TLS files.

    ``get()`` is a context made from the files as they are now (the same
    object while they do not change): clients call it per connection.
    ``server_context()`` is one context to give to a server once: every
    connection it accepts switches, at the start of its handshake, to
    ``get()`` (so new connections use the new certificate and CA bundle)."""

    def __init__(self, tls: TlsFiles, server: bool, check_hostname: bool = True):
        self.tls = tls
        self.server = server
        self.check_hostname = check_hostname
        self._reloader = _Reloader(tls, self._build)

    def _build(self, material) -> ssl.SSLContext:
        if self.server:
            return _tls12(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), material, self.tls)
        ctx = _tls12(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), material, self.tls)
        ctx.check_hostname = self.check_hostname
        return ctx

    def get(self) -> ssl.SSLContext:
        return self._reloader.poll()[1]

    def server_context(self) -> ssl.SSLContext:
        if not self.server:
            raise ValueError("server_context() of a client ReloadingSSLContext")
        front = self._build(self.tls.read())

        def switch(ssl_obj, _server_name, ctx):
            # called for every ClientHello (with or without SNI), before the
            # certificate is chosen and before the client's is verified
            try:
                fresh = self.get()
                if fresh is not ctx:
                    ssl_obj.context = fresh
            except Exception:   # noqa: BLE001 - go on with the context we have
                log.exception("switching to reloaded TLS files")
            return None

        front.sni_callback = switch
        return front


# -- listing, renewing, the local cluster ----------------------------------------

@dataclass(frozen=True)
class CertInfo:
    """One certificate of a PKI directory (``braid pki list``)."""

    path: Path
    kind: str                # "ca" | "service" | "user" | "?" (not a Braid identity)
    name: str                # CN
    subject: str             # RFC 4514
    role: str                # users: role; services: service; CAs: "current" / "previous"
    node: str                # services
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    issuer_current: bool     # signed by the current CA (a CA: it is the current one)
    issuer: str = ""         # leaves: "current", "previous" (CA of the bundle) or "unknown" (untrusted)
    sans: tuple[str, ...] = ()

    @property
    def expired(self) -> bool:
        return self.not_after <= _now()


def _leaf_paths(d: Path) -> list[Path]:
    return sorted((d / NODES).glob("*/*.crt")) + sorted((d / USERS).glob("*.crt"))


def _san_strings(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(v) for v in san.get_values_for_type(x509.DNSName)) + \
        tuple(str(v) for v in san.get_values_for_type(x509.IPAddress))


def common_name(cert: x509.Certificate) -> str:
    """The CN of the subject of ``cert`` ("" if none)."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def list_certs(pki_dir: Path | str) -> list[CertInfo]:
    """The CA certificates of the bundle, then every service and user
    certificate under ``pki_dir``. Unreadable files are skipped (logged)."""
    d = Path(pki_dir)
    ca = load_ca(d)
    rows = []
    for c in ca.bundle:
        cur = c == ca.cert
        rows.append(CertInfo(d / CA_CERT, "ca", common_name(c), c.subject.rfc4514_string(),
                             "current" if cur else "previous", "", c.serial_number,
                             c.not_valid_before_utc, c.not_valid_after_utc, cur, "self"))
    for path in _leaf_paths(d):
        try:
            c = load_cert(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        try:
            ident = identity_from_cert(c)
            kind, role, node = ident.kind, ident.role or ident.service, ident.node
        except ValueError:
            kind, role, node = "?", "", ""
        current = _signed_by(c, ca.cert)
        issuer = "current" if current else \
            "previous" if any(_signed_by(c, p) for p in ca.previous) else "unknown"
        rows.append(CertInfo(path, kind, common_name(c), c.subject.rfc4514_string(), role, node, c.serial_number,
                             c.not_valid_before_utc, c.not_valid_after_utc, current, issuer,
                             _san_strings(c)))
    return rows


def _needs_renewal(tls: TlsFiles, ca: CA, within: dt.timedelta, want_sans: Iterable[str] = ()) -> str:
    """Why the certificate of ``tls`` must be re-issued ("" if not)."""
    if not tls.cert.exists() or not tls.key.exists():
        return "missing"
    try:
        cert_pem, _key, _ca = tls.read()
    except PkiError as exc:
        return str(exc)
    cert = load_cert(cert_pem)
    if not _signed_by(cert, ca.cert):
        return "not signed by the current CA"
    if cert.not_valid_after_utc - within <= _now():
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > _now():
        return "not valid yet"
    missing = {str(s) for s in want_sans} - {s.lower() for s in _san_strings(cert)}
    if missing:
        return f"lacks SANs {', '.join(sorted(missing))}"
    return ""


def renew_certs(pki_dir: Path | str, within: dt.timedelta = RENEW_WITHIN, days: int = 365,
                everything: bool = False) -> list[tuple[Path, str]]:
    """Re-issue (same identity and SANs, new key) every service and user
    certificate under ``pki_dir`` that is not signed by the current CA or
    expires within ``within`` (all of them with ``everything``); the
    (path, reason) of each one re-issued."""
    d = Path(pki_dir)
    done = []
    with _locked(d):
        ca = load_ca(d)
        for info in list_certs(d)[len(ca.bundle):]:
            tls = TlsFiles(info.path, info.path.with_suffix(".key"), d / CA_CERT)
            why = "requested" if everything else _needs_renewal(tls, ca, within)
            if not why:
                continue
            if info.kind == "user":
                issue_user(d, info.name, info.role, days=days)
            elif info.kind == "service":
                dns = [s for s in info.sans if not _is_ip(s)]
                ips = [s for s in info.sans if _is_ip(s)]
                issue_service(d, info.node, info.role, dns_names=dns, ips=ips, days=days)
            else:
                log.warning("not renewing %s: not a Braid identity", info.path)
                continue
            done.append((info.path, why))
    return done


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def ensure_local_cluster_pki(pki_dir: Path | str, nodes: list[str], cluster: str = "braid",
                             users: Iterable[tuple[str, str]] = (("admin", "admin"),),
                             services: Iterable[str] = SERVICES,
                             within: dt.timedelta = RENEW_WITHIN) -> list[tuple[Path, str]]:
    """Everything a one-machine cluster needs, idempotently: the CA, a
    certificate for every service on every node (SANs localhost, 127.0.0.1,
    ::1 and the node name) and the users (name, role), by default ``admin``.
    Certificates that are missing, broken, expire within ``within``, are not
    signed by the current CA or lack a SAN are (re-)issued; the (path,
    reason) of each one issued."""
    d = Path(pki_dir)
    done = []
    with _locked(d):
        init_ca(d, cluster=cluster)
        ca = load_ca(d)
        for node in nodes:
            for service in services:
                tls = TlsFiles.for_service(d, node, service)
                dns = [*LOCAL_SANS_DNS, node]
                why = _needs_renewal(tls, ca, within, [f"{service}.{node}", *dns, *LOCAL_SANS_IP])
                if why:
                    issue_service(d, node, service, dns_names=dns, ips=LOCAL_SANS_IP)
                    done.append((tls.cert, why))
        for name, role in users:
            tls = TlsFiles.for_user(d, name)
            why = _needs_renewal(tls, ca, within)
            if not why:
                try:
                    if identity_from_cert(tls.cert.read_bytes()).role != role:
                        why = "role changed"
                except ValueError as exc:
                    why = str(exc)
            if why:
                issue_user(d, name, role)
                done.append((tls.cert, why))
    return done
