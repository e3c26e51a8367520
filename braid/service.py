"""What every Braid daemon shares: config, structured logs, metrics, a gRPC
server with health checking and reflection, and a clean SIGTERM shutdown.

Config precedence: command-line flag > environment (``BRAID_<NAME>``) >
config file (``--config FILE``, YAML or JSON mapping of the same names) >
default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, start_http_server

from braid import __version__
from braid.store import StoreError

log = logging.getLogger("braid.service")

MAX_MESSAGE_BYTES = 4 << 20

DAEMON_UP = Gauge("braid_daemon_up", "1 while the daemon serves", ["daemon"])
LEASE_LOST = Counter("braid_lease_lost_total", "Leases lost (not refreshed in time)", ["daemon"])


# -- logging -----------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus extra fields."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def __init__(self, daemon: str):
        super().__init__()
        self.daemon = daemon

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "daemon": self.daemon,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in self._skip:
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(daemon: str, level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(daemon))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {daemon} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- config ------------------------------------------------------------------

@dataclass
class Option:
    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str


COMMON_OPTIONS = [
    Option("etcd", "127.0.0.1:2379", "etcd endpoints, comma-separated host:port"),
    Option("prefix", "/braid/", "etcd key prefix of this cluster"),
    Option("listen", "127.0.0.1:0", "gRPC listen address host:port (port 0: any free port)"),
    Option("metrics", "127.0.0.1:0", "Prometheus metrics listen address host:port ('' disables)"),
    Option("log_level", "info", "debug | info | warning | error"),
    Option("log_format", "json", "json | text"),
    Option("lease_ttl", 5, "seconds a lease lives without refresh", int),
    Option("state_file", "", "write the bound addresses here as JSON once ready"),
    # mutual TLS (braid pki): this daemon's certificate and key, and the cluster CA bundle.
    # With them, the gRPC server, the metrics endpoint and the storage ports require a client
    # certificate of the cluster, and etcd is reached over TLS with the certificate.
    Option("tls_cert", "", "certificate of this daemon (PEM; '' with tls_key/tls_ca: plaintext)"),
    Option("tls_key", "", "its private key (PEM)"),
    Option("tls_ca", "", "the cluster CA bundle (PEM)"),
]


class ConfigError(ValueError):
    pass


def load_config(daemon: str, options: Iterable[Option], argv: list[str] | None = None) -> dict[str, Any]:
    options = list(COMMON_OPTIONS) + list(options)
    parser = argparse.ArgumentParser(prog=f"braid-{daemon}", description=f"Braid {daemon} daemon")
    parser.add_argument("--config", help="YAML/JSON file with option values")
    for opt in options:
        parser.add_argument(f"--{opt.name.replace('_', '-')}", dest=opt.name, default=None,
                            help=f"{opt.help} (env BRAID_{opt.name.upper()}; default {opt.default!r})")
    args = parser.parse_args(argv)
    from_file: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config) as f:
                from_file = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {args.config}: {exc}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"config file {args.config} must hold a mapping of option: value")
        unknown = set(from_file) - {o.name for o in options}
        if unknown:
            raise ConfigError(f"config file {args.config}: unknown options {sorted(unknown)}")
    cfg = {}
    for opt in options:
        raw = getattr(args, opt.name)
        if raw is None:
            raw = os.environ.get(f"BRAID_{opt.name.upper()}")
        if raw is None:
            raw = from_file.get(opt.name, opt.default)
        try:
            cfg[opt.name] = opt.type(raw) if raw is not None and not isinstance(raw, bool) else raw
        except (TypeError, ValueError):
            raise ConfigError(f"option {opt.name}: {raw!r} is not a valid {opt.type.__name__}") from None
    if cfg["lease_ttl"] < 2:
        raise ConfigError("option lease_ttl: at least 2 seconds")
    return cfg


def tls_files(cfg: dict[str, Any]):
    """The daemon's TLS material (braid.auth.pki.TlsFiles), or None for plaintext.
    All three options or none: a half-configured daemon is a config error."""
    given = [cfg.get("tls_cert"), cfg.get("tls_key"), cfg.get("tls_ca")]
    if not any(given):
        return None
    if not all(given):
        raise ConfigError("tls_cert, tls_key and tls_ca go together (all three, or none for plaintext)")
    from braid.auth.pki import TlsFiles
    tls = TlsFiles(cert=Path(given[0]), key=Path(given[1]), ca=Path(given[2]))
    for path in given:
        if not os.path.exists(path):
            raise ConfigError(f"TLS file {path} does not exist (braid pki issue-service makes them)")
    return tls


def split_hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"bad address {addr!r}: expected host:port")
    return host, int(port)


# -- the daemon ----------------------------------------------------------------

@dataclass
class Daemon:
    """A running daemon: gRPC server with health + reflection, metrics, stop."""

    name: str
    cfg: dict[str, Any]
    server: grpc.Server = field(init=False)
    health: health.HealthServicer = field(init=False)
    grpc_address: str = ""
    metrics_address: str = ""
    stopping: threading.Event = field(default_factory=threading.Event)
    _services: list[str] = field(default_factory=list)
    interceptors: list = field(default_factory=list)

    def __post_init__(self):
        self.tls = tls_files(self.cfg)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix=f"{self.name}-rpc"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
            maximum_concurrent_rpcs=1000,
            interceptors=self.interceptors,
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def add_service(self, full_name: str) -> None:
        """Record a service for reflection and health reporting."""
        self._services.append(full_name)

    def start(self) -> None:
        host, port = split_hostport(self.cfg["listen"])
        if self.tls is not None:
            from braid.auth.pki import reloading_grpc_server_credentials
            bound = self.server.add_secure_port(f"{host}:{port}", reloading_grpc_server_credentials(self.tls))
        else:
            log.warning("plaintext gRPC on %s: no tls_cert/tls_key/tls_ca (braid pki)", self.cfg["listen"])
            bound = self.server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise ConfigError(f"cannot listen on {self.cfg['listen']}")
        self.grpc_address = f"{host}:{bound}"
        names = list(self._services) + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                        reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.server.start()
        if self.cfg.get("metrics"):
            mhost, mport = split_hostport(self.cfg["metrics"])
            if mport == 0:
                with socket.socket() as s:
                    s.bind((mhost, 0))
                    mport = s.getsockname()[1]
            if self.tls is not None:   # scrapers present a certificate of the cluster too
                start_http_server(mport, addr=mhost, certfile=self.tls.cert, keyfile=self.tls.key,
                                  client_cafile=self.tls.ca, client_auth_required=True)
            else:
                start_http_server(mport, addr=mhost)
            self.metrics_address = f"{mhost}:{mport}"
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info("serving", extra={"grpc": self.grpc_address, "metrics": self.metrics_address,
                                   "version": __version__})

    def set_ready(self, ready: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set("", status)
        for svc in self._services:
            self.health.set(svc, status)
        DAEMON_UP.labels(self.name).set(1 if ready else 0)
        if ready and self.cfg.get("state_file"):
            tmp = self.cfg["state_file"] + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"daemon": self.name, "pid": os.getpid(), "grpc": self.grpc_address,
                           "metrics": self.metrics_address}, f)
            os.replace(tmp, self.cfg["state_file"])

    def wait(self) -> None:
        while not self.stopping.wait(0.5):
            pass

    def stop(self, grace: float = 5.0) -> None:
        self.set_ready(False)
        self.server.stop(grace).wait(grace + 1)
        log.info("stopped")


def run_main(daemon: str, options: Iterable[Option], body: Callable[[Daemon], None],
             argv: list[str] | None = None,
             interceptors: Callable[[dict[str, Any]], list] | None = None) -> int:
    """Parse config, set up logging, run ``body(daemon)`` until SIGTERM.

    ``body`` registers services, starts its loops and returns a stop
    callable (or None); the runner waits for SIGTERM/SIGINT, then calls it
    and stops the gRPC server.
    """
    try:
        cfg = load_config(daemon, options, argv)
    except ConfigError as exc:
        print(f"braid-{daemon}: {exc}", file=sys.stderr)
        return 2
    setup_logging(daemon, cfg["log_level"], cfg["log_format"])
    try:
        d = Daemon(daemon, cfg, interceptors=interceptors(cfg) if interceptors else [])
        stop = body(d)
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        return 2
    except StoreError as exc:
        log.error("cannot start: etcd at %s: %s", cfg["etcd"], exc)
        return 1
    d.wait()
    log.info("shutting down")
    try:
        if stop:
            stop()
    finally:
        d.stop()
    return 0
