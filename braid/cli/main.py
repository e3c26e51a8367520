"""``braid``: the command-line client and the local-cluster launcher.

Exit codes: 0 success, 1 error, 2 bad usage or invalid input, 3 not found,
4 conflict (exists / modified concurrently), 5 cluster unreachable, 6 not
allowed (unauthenticated, or the role may not).

The API address comes from ``--server``, else ``$BRAID_SERVER``, else the
local cluster's state (``<data-dir>/cluster.json``, data dir from
``--data-dir`` / ``$BRAID_DATA_DIR`` / ``~/.braid``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc

from braid import kinds as K
from braid.cli import manifests, output
from braid.cli import pki as pki_cli
from braid.cli import vm as vm_cli
from braid.client import ApiCallError, Client
from braid.dev.localcluster import ClusterError, LocalCluster, default_data_dir
from braid.v1 import compute_pb2, meta_pb2

EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.OUT_OF_RANGE: 2,
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.ALREADY_EXISTS: 4,
    grpc.StatusCode.ABORTED: 4,
    grpc.StatusCode.FAILED_PRECONDITION: 4,
    grpc.StatusCode.UNAVAILABLE: 5,
    grpc.StatusCode.DEADLINE_EXCEEDED: 5,
    grpc.StatusCode.UNAUTHENTICATED: 6,
    grpc.StatusCode.PERMISSION_DENIED: 6,
}


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def err(msg: str) -> None:
    print(f"braid: {msg}", file=sys.stderr)


# -- connection ----------------------------------------------------------------

def server_address(args) -> str:
    if args.server:
        return args.server
    if os.environ.get("BRAID_SERVER"):
        return os.environ["BRAID_SERVER"]
    cluster = LocalCluster(args.data_dir)
    addr = cluster.api_address
    if not addr or not cluster.running():
        raise CliError(f"no cluster to talk to: none runs from {cluster.data_dir} "
                       "(start one with `braid cluster up`, or pass --server / set BRAID_SERVER)", 5)
    return addr


def credentials(args) -> dict:
    """How the CLI proves who it is (first found wins):
    ``--cert/--key/--ca`` (env BRAID_CERT, BRAID_KEY, BRAID_CA): a client certificate;
    ``--token`` (env BRAID_TOKEN) with ``--ca``: a bearer token (the controller's token port);
    else, for the local cluster, its ``--user`` (default admin) certificate in <data-dir>/pki."""
    from braid.auth.pki import TlsFiles
    pick = lambda flag, env: getattr(args, flag, None) or os.environ.get(env, "")  # noqa: E731
    cert, key, ca, token = (pick("cert", "BRAID_CERT"), pick("key", "BRAID_KEY"), pick("ca", "BRAID_CA"),
                            pick("token", "BRAID_TOKEN"))
    if cert or key:
        if not (cert and key and ca):
            raise CliError("a client certificate needs --cert, --key and --ca (or BRAID_CERT, BRAID_KEY, "
                           "BRAID_CA)", 2)
        return {"tls": TlsFiles(Path(cert), Path(key), Path(ca))}
    if token:
        if not ca:
            raise CliError("a token needs the cluster CA to check the server: --ca or BRAID_CA", 2)
        return {"token": token, "ca": ca}
    if args.server or os.environ.get("BRAID_SERVER"):
        return {}
    tls = LocalCluster(args.data_dir).user_tls(getattr(args, "user", None) or "admin")
    if tls is not None and not tls.exists():
        raise CliError(f"no certificate for user {args.user or 'admin'} in the local cluster "
                       f"(braid pki issue-user NAME --role viewer --dir {tls.ca.parent})", 2)
    return {"tls": tls} if tls else {}


def client(args) -> Client:
    return Client(server_address(args), timeout=args.timeout, **credentials(args))


def kind_arg(name: str) -> K.Kind:
    try:
        return K.lookup(name)
    except K.UnknownKind as exc:
        raise CliError(str(exc), 2) from None


# -- resource commands ---------------------------------------------------------

def cmd_get(args) -> int:
    kind = kind_arg(args.kind)
    with client(args) as c:
        if args.names:
            objs = [c.get(kind, n) for n in args.names]
        else:
            objs, _, corrupt = c.list(kind, args.selector or "")
            for name in corrupt:
                err(f"warning: {kind.name} {name!r} is stored in an unreadable form and was skipped")
    if not objs and args.output in ("table", "wide"):
        print(f"No {kind.plural} found.", file=sys.stderr)
        return 0
    print(output.render(kind, objs, args.output, single=bool(args.names)))
    return 0


def cmd_describe(args) -> int:
    kind = kind_arg(args.kind)
    with client(args) as c:
        obj = c.get(kind, args.name)
    if args.output in ("json", "yaml"):
        print(output.render(kind, [obj], args.output, single=True))
    else:
        print(output.describe(kind, obj))
    return 0


# objects referred to by others come first (a VM needs its volume and network)
KIND_ORDER = ["node", "diskpool", "network", "router", "subnet", "securitygroup", "port",
              "volume", "snapshot", "vm"]


def _docs(args) -> list[manifests.Doc]:
    try:
        docs = []
        for f in args.filename:
            docs += manifests.load(f)
        return sorted(docs, key=lambda d: KIND_ORDER.index(d.kind.name)
                      if d.kind.name in KIND_ORDER else len(KIND_ORDER))
    except manifests.ManifestError as exc:
        raise CliError(str(exc), 2) from None


def cmd_create(args) -> int:
    docs = _docs(args)
    with client(args) as c:
        last_rev = 0
        for d in docs:
            obj = c.create(d.obj)
            last_rev = max(last_rev, obj.metadata.resource_version)
            print(f"{d.kind.name}/{obj.metadata.name} created", flush=True)
        _maybe_wait(c, args, {d.kind.name for d in docs}, last_rev)
    return 0


NETWORK_KINDS = {"network", "subnet", "port", "router", "securitygroup"}


def wait_network_applied(c, revision: int, timeout: float) -> None:
    """Until every live net daemon reports that the cluster state of etcd
    revision ``revision`` (or later) is live on its node."""
    deadline = time.monotonic() + timeout
    while True:
        lagging = []
        for node in c.list("node")[0]:
            for d in node.status.daemons:
                if d.name == "netd" and d.live and d.tunnel_address and d.applied_revision < revision:
                    why = f": {d.message}" if d.message else ""
                    lagging.append(f"{node.metadata.name} (at revision {d.applied_revision}{why})")
        if not lagging:
            return
        if time.monotonic() > deadline:
            raise CliError(f"not live after {timeout:g}s on: {', '.join(lagging)} "
                           f"(waiting for revision {revision})", 1)
        time.sleep(0.05)


def _maybe_wait(c, args, kinds: set[str], revision: int) -> None:
    if getattr(args, "wait", 0) and kinds & NETWORK_KINDS and revision:
        t0 = time.monotonic()
        wait_network_applied(c, revision, args.wait)
        print(f"live on every node after {time.monotonic() - t0:.2f}s (revision {revision})", flush=True)


def cmd_apply(args) -> int:
    """Create what is missing, update what exists (retrying a lost CAS race)."""
    docs = _docs(args)
    last_rev = 0
    with client(args) as c:
        for d in docs:
            for attempt in range(5):
                try:
                    current = c.get(d.kind, d.obj.metadata.name)
                except ApiCallError as exc:
                    if exc.code != grpc.StatusCode.NOT_FOUND:
                        raise
                    try:
                        created = c.create(d.obj)
                        last_rev = max(last_rev, created.metadata.resource_version)
                        print(f"{d.kind.name}/{d.obj.metadata.name} created", flush=True)
                        break
                    except ApiCallError as exc2:
                        if exc2.code == grpc.StatusCode.ALREADY_EXISTS:
                            continue
                        raise
                new = type(d.obj)()
                new.CopyFrom(d.obj)
                new.metadata.resource_version = current.metadata.resource_version
                try:
                    updated = c.update(new)
                except ApiCallError as exc:
                    if exc.code == grpc.StatusCode.ABORTED and attempt < 4:
                        continue
                    raise
                changed = updated.metadata.generation != current.metadata.generation or \
                    dict(updated.metadata.labels) != dict(current.metadata.labels)
                print(f"{d.kind.name}/{d.obj.metadata.name} {'configured' if changed else 'unchanged'}")
                last_rev = max(last_rev, updated.metadata.resource_version)
                break
        _maybe_wait(c, args, {d.kind.name for d in docs}, last_rev)
    return 0


def cmd_delete(args) -> int:
    targets: list[tuple[K.Kind, str]] = []
    if args.filename:
        targets = [(d.kind, d.obj.metadata.name) for d in _docs(args)]
    else:
        if not args.kind or not args.names:
            raise CliError("usage: braid delete KIND NAME... | braid delete -f FILE", 2)
        kind = kind_arg(args.kind)
        targets = [(kind, n) for n in args.names]
    rc = 0
    last_rev = 0
    with client(args) as c:
        for kind, name in targets:
            try:
                last_rev = max(last_rev, c.delete(kind, name, args.resource_version).revision)
                print(f"{kind.name}/{name} deleted")
            except ApiCallError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND and args.ignore_not_found:
                    continue
                err(str(exc))
                rc = max(rc, EXIT_CODES.get(exc.code, 1))
        _maybe_wait(c, args, {k.name for k, _ in targets}, last_rev)
    return rc


def cmd_watch(args) -> int:
    kind = kind_arg(args.kind)
    c = client(args)
    stream = c.watch(kind, resource_version=args.resource_version, name=args.name or "",
                     label_selector=args.selector or "")
    if args.timeout_watch:
        threading.Timer(args.timeout_watch, stream.cancel).start()
    signal.signal(signal.SIGTERM, lambda *_: stream.cancel())
    try:
        for ev in stream:
            typ = meta_pb2.EventType.Name(ev.type)
            if args.output == "json":
                out = {"type": typ, "revision": ev.revision}
                if ev.type != meta_pb2.SYNCED:
                    out["object"] = output.as_dict(kind, ev.object)
                print(json.dumps(out), flush=True)
            elif ev.type == meta_pb2.SYNCED:
                print(f"-- synced at revision {ev.revision}", flush=True)
            else:
                phase = getattr(ev.object.status, "phase", "") or "-"
                print(f"{typ:<9} {kind.name}/{ev.object.metadata.name}  phase={phase} "
                      f"revision={ev.revision}", flush=True)
    except KeyboardInterrupt:
        stream.cancel()
    finally:
        c.close()
    return 0


# -- vm commands -------------------------------------------------------------------

def cmd_vm_power(args) -> int:
    with client(args) as c:
        if args.action == "restart":
            vm_cli.set_power(c, args.name, compute_pb2.STOPPED)
            vm_cli.wait_phase(c, args.name, "Stopped", args.wait or 120)
            vm_cli.set_power(c, args.name, compute_pb2.RUNNING)
            target = compute_pb2.RUNNING
        else:
            target = vm_cli.POWER[args.action]
            vm_cli.set_power(c, args.name, target)
        print(f"vm/{args.name}: {args.action} requested", flush=True)
        if args.wait:
            vm_cli.wait_phase(c, args.name, vm_cli.DONE[target], args.wait)
            print(f"vm/{args.name}: {vm_cli.DONE[target]}")
    return 0


def cmd_vm_migrate(args) -> int:
    if bool(args.to) == bool(args.cancel):
        raise CliError("give --to NODE or --cancel", 2)
    with client(args) as c:
        vm_cli.migrate(c, args.name, args.to, args.cancel, args.wait)
    return 0


def cmd_vm_console(args) -> int:
    with client(args) as c:
        address = vm_cli.agent_address(c, args.name)
    if args.follow:
        print(f"-- console of {args.name} (Ctrl-C to leave) --", file=sys.stderr, flush=True)
    vm_cli.stream_console(address, args.name, follow=args.follow, tail=args.tail,
                          tls=credentials(args).get("tls"))
    return 0


# -- node commands -----------------------------------------------------------------

def _set_maintenance(c: Client, name: str, on: bool) -> None:
    from braid.v1 import node_pb2
    for attempt in range(10):
        node = c.get("node", name)
        if node.spec.maintenance == on:
            return
        new = node_pb2.Node()
        new.metadata.CopyFrom(node.metadata)
        new.spec.CopyFrom(node.spec)
        new.spec.maintenance = on
        try:
            c.update(new)
            return
        except ApiCallError as exc:
            if exc.code != grpc.StatusCode.ABORTED or attempt == 9:
                raise


def cmd_node_drain(args) -> int:
    with client(args) as c:
        _set_maintenance(c, args.name, True)
        print(f"node/{args.name}: maintenance; moving its VMs away", flush=True)
        if not args.wait:
            return 0
        deadline = time.monotonic() + args.wait
        last = None
        while True:
            left = sorted(v.metadata.name for v in c.list("vm")[0]
                          if args.name in (v.spec.node, v.status.node))
            if left != last:
                print(f"  {len(left)} VM(s) left on {args.name}{': ' + ', '.join(left[:8]) if left else ''}",
                      file=sys.stderr, flush=True)
                last = left
            if not left:
                print(f"node/{args.name}: drained")
                return 0
            if time.monotonic() > deadline:
                raise ApiCallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"node {args.name} not drained after {args.wait:.0f}s ({len(left)} VMs left)")
            time.sleep(0.5)


def cmd_node_undrain(args) -> int:
    with client(args) as c:
        _set_maintenance(c, args.name, False)
    print(f"node/{args.name}: back in service")
    return 0


# -- DRS commands ------------------------------------------------------------------

def cmd_drs_recommendations(args) -> int:
    with client(args) as c:
        rec = c.drs_recommendations()
    if args.output == "json":
        print(json.dumps(K.to_dict(rec), indent=2))
        return 0
    print(f"mode {rec.mode or '-'}, threshold {rec.threshold:.0%}, at {rec.generated_at or '-'}")
    if rec.loads:
        print("loads: " + ", ".join(f"{n} {v:.0%}" for n, v in sorted(rec.loads.items())))
    print(f"hot: {', '.join(rec.hot) or 'none'}")
    if rec.moves:
        print(f"{'ID':<14}{'VM':<20}{'FROM':<12}{'TO':<12}{'AFTER':<14}REASON")
        for m in rec.moves:
            print(f"{m.id:<14}{m.vm:<20}{m.source:<12}{m.target:<12}"
                  f"{f'{m.source_load:.0%}/{m.target_load:.0%}':<14}{m.reason}")
    else:
        print("no moves recommended")
    for r in rec.reasons:
        print(f"  note: {r}")
    return 0


def cmd_drs_apply(args) -> int:
    with client(args) as c:
        m = c.drs_apply(args.id)
    print(f"vm/{m.vm}: moving {m.source} -> {m.target} (DRS {m.id}); follow with braid get vms -o wide")
    return 0


# -- volume commands ---------------------------------------------------------------

def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1T``, ``1073741824`` -> bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if mult > 1 else t)
    except ValueError:
        raise CliError(f"bad size {text!r} (examples: 512M, 20G, 1T)", 2) from None
    return n * mult


def cmd_volume_create(args) -> int:
    from braid.v1 import storage_pb2
    vol = storage_pb2.Volume()
    vol.metadata.name = args.name
    vol.spec.size_bytes = parse_size(args.size)
    vol.spec.replicas = args.replicas
    if args.extent_size:
        vol.spec.extent_size_bytes = parse_size(args.extent_size)
    with client(args) as c:
        c.create(vol)
        print(f"volume/{args.name} created ({args.size}, {args.replicas} replicas)", flush=True)
        if args.wait:
            _wait_volume(c, args.name, args.wait)
    return 0


def cmd_volume_resize(args) -> int:
    with client(args) as c:
        for attempt in range(10):
            vol = c.get("volume", args.name)
            vol.spec.size_bytes = parse_size(args.size)
            vol.ClearField("status")
            try:
                c.update(vol)
                break
            except ApiCallError as exc:
                if exc.code != grpc.StatusCode.ABORTED or attempt == 9:
                    raise
        print(f"volume/{args.name} resized to {args.size}", flush=True)
        if args.wait:
            _wait_volume(c, args.name, args.wait)
    return 0


def cmd_volume_snapshot(args) -> int:
    from braid.v1 import storage_pb2
    snap = storage_pb2.Snapshot()
    snap.metadata.name = args.snapshot
    snap.spec.volume = args.name
    with client(args) as c:
        c.create(snap)
        print(f"snapshot/{args.snapshot} of volume {args.name} requested", flush=True)
        if not args.wait:
            return 0
        deadline = time.monotonic() + args.wait
        while True:
            st = c.get("snapshot", args.snapshot).status
            if st.phase == "Ready":
                print(f"snapshot/{args.snapshot} ready: {st.extents} extents, "
                      f"writes held {st.pause_seconds * 1000:.0f} ms")
                return 0
            if st.phase == "Failed":
                raise ApiCallError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"snapshot {args.snapshot} failed: {st.message}")
            if time.monotonic() > deadline:
                raise ApiCallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"snapshot {args.snapshot} not ready after {args.wait:.0f}s "
                                   f"({st.phase or 'Pending'}: {st.message})")
            time.sleep(0.1)


def cmd_token_create(args) -> int:
    with client(args) as c:
        r = c.issue_token(args.user_name, args.role, int(args.ttl))
    print(r.token)
    print(f"token for {args.user_name} ({args.role}), valid until {r.expires_at}; shown only now. Use it "
          f"with --token (or BRAID_TOKEN) and --ca on the controller's token port.", file=sys.stderr)
    return 0


def cmd_volume_revert(args) -> int:
    with client(args) as c:
        r = c.revert_volume(args.name, args.to)
    print(f"volume/{args.name} reverted to snapshot {args.to} ({r.extents} extents, "
          f"writes held {r.pause_seconds * 1000:.0f} ms)")
    return 0


def cmd_volume_clone(args) -> int:
    from braid.v1 import storage_pb2
    vol = storage_pb2.Volume()
    vol.metadata.name = args.name
    vol.spec.source_snapshot = args.snapshot
    vol.spec.full_clone = args.full
    if args.size:
        vol.spec.size_bytes = parse_size(args.size)
    with client(args) as c:
        c.create(vol)
        print(f"volume/{args.name} created as a {'full' if args.full else 'linked'} clone of "
              f"snapshot {args.snapshot}", flush=True)
        if args.wait:
            _wait_volume(c, args.name, args.wait)
    return 0


def _wait_volume(c: Client, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        vol = c.get("volume", name)
        st = vol.status
        line = f"  {name}: {st.phase or 'Pending'} ({st.healthy_extents}/{st.extents} extents healthy)" + \
            (f" - {st.message}" if st.message else "")
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        if st.phase in ("Healthy", "Degraded", "Cloning") and st.observed_generation >= vol.metadata.generation:
            for e in st.exports:
                print(f"  {e.node}: {e.uri}")
            return
        if time.monotonic() > deadline:
            raise ApiCallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"volume {name} not placed after {timeout:.0f}s ({st.phase or 'Pending'})")
        time.sleep(0.2)


# -- cluster commands --------------------------------------------------------------

def cmd_cluster_up(args) -> int:
    cluster = LocalCluster(args.data_dir)
    say = (lambda s: print(f"  {s}", flush=True))
    print(f"Starting a local Braid cluster with {args.nodes} node(s) in {cluster.data_dir}")
    t0 = time.monotonic()
    try:
        state = cluster.up(nodes=args.nodes, lease_ttl=args.lease_ttl, timeout=args.wait,
                           libvirt_uri=args.libvirt_uri, progress=say)
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    print(f"Cluster ready in {time.monotonic() - t0:.1f}s.")
    print(f"  API (gRPC):  {state['api']}")
    print(f"  etcd:        {state['etcd']}  (prefix /braid/)")
    print(f"  logs:        {cluster.data_dir / 'logs'}")
    print("Try: braid get nodes; braid apply -f examples/; braid cluster down")
    if not args.foreground:
        return 0
    print("Running in the foreground; Ctrl-C stops the cluster.", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            dead = [p.name for p in cluster.procs() if not p.alive()]
            if dead:
                err(f"processes exited: {', '.join(dead)} (see {cluster.data_dir / 'logs'})")
                break
    except KeyboardInterrupt:
        pass
    print("\nStopping the cluster ...", flush=True)
    cluster.down(progress=say)
    return 0


def cmd_cluster_down(args) -> int:
    cluster = LocalCluster(args.data_dir)
    if cluster.state() is None:
        print(f"No cluster runs from {cluster.data_dir}.")
        return 0
    try:
        killed = cluster.down(progress=lambda s: print(f"  {s}"))
    except ClusterError as exc:
        raise CliError(str(exc)) from None
    if killed:
        err(f"had to kill: {', '.join(killed)}")
    print("Cluster stopped.")
    return 0


def cmd_cluster_status(args) -> int:
    cluster = LocalCluster(args.data_dir)
    procs = cluster.procs()
    if not procs and not args.server and not os.environ.get("BRAID_SERVER"):
        print(f"No cluster runs from {cluster.data_dir}.")
        return 3
    info = None
    try:
        with client(args) as c:
            info = c.info()
            nodes, _, _ = c.list("node")
    except (ApiCallError, CliError) as exc:
        err(f"API unreachable: {exc}")
        nodes = []
    if args.output == "json":
        out = {"data_dir": str(cluster.data_dir),
               "processes": [{"name": p.name, "pid": p.pid, "alive": p.alive()} for p in procs]}
        if info is not None:
            out["info"] = output.K.to_dict(info)
            out["nodes"] = [output.as_dict(K.lookup("node"), n) for n in nodes]
        print(json.dumps(out, indent=2))
        return 0 if info is not None else 5
    if procs:
        alive = sum(p.alive() for p in procs)
        print(f"Local cluster in {cluster.data_dir}: {alive}/{len(procs)} processes running")
        for p in procs:
            print(f"  {p.name:<24} pid {p.pid:<8} {'running' if p.alive() else 'STOPPED'}")
    if info is not None:
        print(f"Cluster {info.cluster_name!r} (braid {info.version}), etcd revision {info.etcd_revision}")
        print(f"Nodes: {info.nodes_ready}/{info.nodes_total} Ready")
        for name, holder in sorted(info.leaders.items()):
            print(f"Leader of {name}: {holder}")
        counts = ", ".join(f"{k}={v}" for k, v in sorted(info.objects.items()) if v)
        print(f"Objects: {counts or 'none'}")
        if nodes:
            print()
            print(output.table(K.lookup("node"), nodes))
    return 0 if info is not None else 5


# -- dev commands ------------------------------------------------------------------

def cmd_dev_guest(args) -> int:
    from pathlib import Path

    from braid.dev import devguest
    out = Path(args.out) if args.out else devguest.default_guest_dir()
    try:
        paths = devguest.build_guest(out, force=args.force, progress=lambda s: print(f"  {s}", flush=True))
    except devguest.GuestBuildError as exc:
        raise CliError(str(exc)) from None
    print(f"Guest ready in {out}:")
    print(f"  kernel:  {paths.kernel}")
    print(f"  initrd:  {paths.initrd}")
    print(f"  cmdline: {devguest.guest_cmdline()}")
    print(f"It prints '{devguest.READY_LINE}' on its serial console once booted.")
    if out != devguest.DEFAULT_GUEST_DIR:
        print(f"Note: examples/tiny-vm.yaml refers to {devguest.DEFAULT_GUEST_DIR}; edit its boot paths.")
    print("Boot it: braid cluster up; braid apply -f examples/tiny-vm.yaml; braid vm console tiny")
    return 0


# -- argument parsing -------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="braid", description="Braid: hyperconverged infrastructure "
                                "(VMs, replicated volumes, overlay networks) on etcd.")
    p.add_argument("--server", help="controller API address host:port (env BRAID_SERVER)")
    p.add_argument("--data-dir", default=None,
                   help=f"local cluster directory (env BRAID_DATA_DIR; default {default_data_dir()})")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout in seconds")
    p.add_argument("--cert", help="client certificate (env BRAID_CERT)")
    p.add_argument("--key", help="its private key (env BRAID_KEY)")
    p.add_argument("--ca", help="the cluster CA bundle (env BRAID_CA)")
    p.add_argument("--token", help="a bearer token instead of a certificate (env BRAID_TOKEN)")
    p.add_argument("--user", help="local cluster: act as this user (its certificate in <data-dir>/pki; "
                                  "default admin)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    kinds_help = ", ".join(k.plural for k in K.KINDS.values())

    def outputs(sp, choices=("table", "wide", "json", "yaml", "name"), default="table"):
        sp.add_argument("-o", "--output", choices=choices, default=default)

    sp = sub.add_parser("get", help=f"list or show objects ({kinds_help})")
    sp.add_argument("kind")
    sp.add_argument("names", nargs="*")
    sp.add_argument("-l", "--selector", help="label selector k=v,k2=v2")
    outputs(sp)
    sp.set_defaults(fn=cmd_get)

    sp = sub.add_parser("describe", help="show one object in full")
    sp.add_argument("kind")
    sp.add_argument("name")
    outputs(sp, ("text", "json", "yaml"), "text")
    sp.set_defaults(fn=cmd_describe)

    for name, fn, text in (("create", cmd_create, "create objects from manifests (fails if they exist)"),
                           ("apply", cmd_apply, "create or update objects from manifests")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("-f", "--filename", action="append", required=True,
                        help="manifest file (YAML/JSON; '-' for stdin); repeatable")
        sp.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="network objects: return when the change is live on every node")
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("delete", help="delete objects by name or from manifests")
    sp.add_argument("kind", nargs="?")
    sp.add_argument("names", nargs="*")
    sp.add_argument("-f", "--filename", action="append")
    sp.add_argument("--resource-version", type=int, default=0,
                    help="only delete if the object is still at this revision")
    sp.add_argument("--ignore-not-found", action="store_true")
    sp.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                    help="network objects: return when the deletion is live on every node")
    sp.set_defaults(fn=cmd_delete)

    sp = sub.add_parser("watch", help="stream changes of a kind")
    sp.add_argument("kind")
    sp.add_argument("name", nargs="?")
    sp.add_argument("-l", "--selector")
    sp.add_argument("--resource-version", type=int, default=0,
                    help="changes after this revision (default: list first, then changes)")
    sp.add_argument("--for", dest="timeout_watch", type=float, default=0,
                    help="stop after this many seconds")
    outputs(sp, ("text", "json"), "text")
    sp.set_defaults(fn=cmd_watch)

    vmp = sub.add_parser("vm", help="power, console and logs of a VM")
    vsub = vmp.add_subparsers(dest="vm_command", metavar="ACTION")
    for action in ("start", "stop", "pause", "resume", "restart"):
        sp = vsub.add_parser(action, help=f"{action} a VM")
        sp.add_argument("name")
        sp.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="wait until the VM got there (0: return at once)")
        sp.set_defaults(fn=cmd_vm_power, action=action)
    sp = vsub.add_parser("migrate", help="move a VM to another node (live when it runs)")
    sp.add_argument("name")
    sp.add_argument("--to", help="target node")
    sp.add_argument("--cancel", action="store_true", help="cancel a running migration")
    sp.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                    help="wait until the VM runs on the target, showing progress")
    sp.set_defaults(fn=cmd_vm_migrate)
    sp = vsub.add_parser("console", help="stream the serial console (Ctrl-C to leave)")
    sp.add_argument("name")
    sp.add_argument("--tail", type=int, default=4096, help="bytes of history first")
    sp.set_defaults(fn=cmd_vm_console, follow=True)
    sp = vsub.add_parser("logs", help="print the console log")
    sp.add_argument("name")
    sp.add_argument("--tail", type=int, default=0, help="only the last N bytes")
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    sp.set_defaults(fn=cmd_vm_console)
    vmp.set_defaults(fn=lambda a: (vmp.print_help(), 2)[1])

    nop = sub.add_parser("node", help="maintenance of nodes")
    nsub = nop.add_subparsers(dest="node_command", metavar="ACTION")
    sp = nsub.add_parser("drain", help="maintenance mode: the scheduler moves every VM away (live if running)")
    sp.add_argument("name")
    sp.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                    help="wait until no VM is left on the node (0: return at once)")
    sp.set_defaults(fn=cmd_node_drain)
    sp = nsub.add_parser("undrain", help="leave maintenance mode: VMs may be placed there again")
    sp.add_argument("name")
    sp.set_defaults(fn=cmd_node_undrain)
    nop.set_defaults(fn=lambda a: (nop.print_help(), 2)[1])

    dp = sub.add_parser("drs", help="load balancing: recommendations of the scheduler")
    dsub_ = dp.add_subparsers(dest="drs_command", metavar="ACTION")
    sp = dsub_.add_parser("recommendations", help="live migrations DRS recommends now")
    outputs(sp, ("text", "json"), "text")
    sp.set_defaults(fn=cmd_drs_recommendations)
    sp = dsub_.add_parser("apply", help="carry out one recommendation (a live migration)")
    sp.add_argument("id")
    sp.set_defaults(fn=cmd_drs_apply)
    dp.set_defaults(fn=lambda a: (dp.print_help(), 2)[1])

    vop = sub.add_parser("volume", help="create, resize, snapshot, revert and clone replicated volumes")
    vosub = vop.add_subparsers(dest="volume_command", metavar="ACTION")
    sp = vosub.add_parser("create", help="create a volume (its extents are placed on the nodes' disks)")
    sp.add_argument("name")
    sp.add_argument("--size", required=True, help="size, e.g. 512M, 20G")
    sp.add_argument("--replicas", type=int, default=2, choices=(1, 2, 3),
                    help="copies of every extent on distinct nodes (default 2)")
    sp.add_argument("--extent-size", help="extent size (default 64M; a power of two, 1M..1G)")
    sp.add_argument("--wait", type=float, default=30, metavar="SECONDS",
                    help="wait until placed and print the NBD URIs (0: return at once)")
    sp.set_defaults(fn=cmd_volume_create)
    sp = vosub.add_parser("resize", help="grow a volume (volumes never shrink)")
    sp.add_argument("name")
    sp.add_argument("--size", required=True, help="new size, e.g. 40G")
    sp.add_argument("--wait", type=float, default=30, metavar="SECONDS",
                    help="wait until the new extents are placed (0: return at once)")
    sp.set_defaults(fn=cmd_volume_resize)
    sp = vosub.add_parser("snapshot", help="take a crash-consistent snapshot (copies no data)")
    sp.add_argument("name", help="the volume")
    sp.add_argument("snapshot", help="name of the new snapshot")
    sp.add_argument("--wait", type=float, default=30, metavar="SECONDS",
                    help="wait until it is Ready (0: return at once)")
    sp.set_defaults(fn=cmd_volume_snapshot)
    sp = vosub.add_parser("revert", help="make a volume's data that of one of its snapshots "
                                         "(stop the VMs using it first)")
    sp.add_argument("name")
    sp.add_argument("--to", required=True, metavar="SNAPSHOT")
    sp.set_defaults(fn=cmd_volume_revert)
    sp = vosub.add_parser("clone", help="a new volume from a snapshot: linked (shares its data until "
                                        "written) or --full (copies it)")
    sp.add_argument("snapshot")
    sp.add_argument("name", help="name of the new volume")
    sp.add_argument("--full", action="store_true", help="copy every extent (no sharing left)")
    sp.add_argument("--size", help="larger than the snapshot (default: its size)")
    sp.add_argument("--wait", type=float, default=30, metavar="SECONDS",
                    help="wait until placed and print the NBD URIs (0: return at once)")
    sp.set_defaults(fn=cmd_volume_clone)
    sp = vosub.add_parser("describe", help="a volume in full: phase, extents, allocation, NBD URIs")
    sp.add_argument("name")
    outputs(sp, ("text", "json", "yaml"), "text")
    sp.set_defaults(fn=cmd_describe, kind="volume")
    vop.set_defaults(fn=lambda a: (vop.print_help(), 2)[1])

    tp = sub.add_parser("token", help="bearer tokens for clients without a certificate (admin)")
    tsub = tp.add_subparsers(dest="token_command", metavar="ACTION")
    sp = tsub.add_parser("create", help="issue a token (printed once; only its hash is kept)")
    sp.add_argument("user_name", metavar="USER")
    sp.add_argument("--role", required=True, choices=("admin", "operator", "viewer"))
    sp.add_argument("--ttl", type=float, default=86400, help="seconds it stays valid (default one day)")
    sp.set_defaults(fn=cmd_token_create)
    tp.set_defaults(fn=lambda a: (tp.print_help(), 2)[1])

    cl = sub.add_parser("cluster", help="run a local cluster on this machine")
    csub = cl.add_subparsers(dest="cluster_command", metavar="ACTION")
    sp = csub.add_parser("up", help="start etcd, controller, scheduler and N nodes")
    sp.add_argument("--nodes", type=int, default=3)
    sp.add_argument("--lease-ttl", type=int, default=5, help="node lease TTL in seconds")
    sp.add_argument("--wait", type=float, default=90.0, help="seconds to wait for readiness")
    sp.add_argument("--foreground", action="store_true", help="stay until Ctrl-C, then stop it")
    sp.add_argument("--libvirt-uri", default="qemu:///system",
                    help="libvirt of the node agents (test:///default: simulated hypervisor)")
    sp.set_defaults(fn=cmd_cluster_up)
    sp = csub.add_parser("down", help="stop every process of the local cluster")
    sp.set_defaults(fn=cmd_cluster_down)
    sp = csub.add_parser("status", help="processes, leaders, nodes")
    outputs(sp, ("text", "json"), "text")
    sp.set_defaults(fn=cmd_cluster_status)
    cl.set_defaults(fn=lambda a: (cl.print_help(), 2)[1])

    pki_cli.add_parser(sub)

    dv = sub.add_parser("dev", help="developer tools")
    dsub = dv.add_subparsers(dest="dev_command", metavar="ACTION")
    sp = dsub.add_parser("guest", help="build the tiny test guest (Debian cloud kernel + busybox initramfs)")
    sp.add_argument("--out", metavar="DIR", default=None,
                    help="output directory (env BRAID_GUEST_DIR; default /var/lib/braid/guest)")
    sp.add_argument("--force", action="store_true", help="rebuild even if a valid guest is there")
    sp.set_defaults(fn=cmd_dev_guest)
    dv.set_defaults(fn=lambda a: (dv.print_help(), 2)[1])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except CliError as exc:
        err(str(exc))
        return exc.code
    except ApiCallError as exc:
        err(str(exc))
        for field, desc in exc.violations:
            print(f"  - {field}: {desc}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
