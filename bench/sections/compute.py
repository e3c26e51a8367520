"""Compute: VM boot latency through a real local cluster (QEMU TCG), and VM
lifecycle throughput of one node agent against libvirt's test driver.

* ``apply_to_guest_ready_s`` (median and max over R runs after one unmeasured
  warm-up): a 1-node ``LocalCluster`` on ``qemu:///system``; from the start of
  ``Client.create`` of the tiny dev guest (examples/tiny-vm.yaml, kernel boot,
  a new name per run, ``spec.node=node1``) until ``braid-guest: ready`` arrives
  on the VM's console, read through the node agent's Console RPC with
  ``follow`` (the agent re-reads the virtlogd log every 0.1 s) by a thread that
  opens the stream right after the create. After each run the VM is deleted
  and the bench waits until libvirt no longer has its domain. Baseline
  ``qemu_direct_boot_s``: the same kernel + initrd booted by a plain
  ``qemu-system-x86_64 -accel tcg -m 128 -nodefaults -nographic -serial stdio``
  from process start to the ready line on its stdout, runs interleaved with the
  Braid runs. The ratio is Braid's control-plane + libvirt overhead (the Braid
  domain also differs: 128 MiB of max 256 MiB, 1 of max 2 vCPUs, libvirt's
  default devices). Params split it: ``to_phase_running_median_s`` (create until
  the agent reports phase Running, seen on a watch of the VM) and
  ``ready_in_log_median_s`` (create until the console log's mtime: the ready
  line is the guest's last output, so this excludes the agent's 0.1 s polling).
* ``vm_*_per_second``: a 1-node ``LocalCluster`` on ``test:///default`` (the
  test driver runs no QEMU: this is the control plane, the node agent's
  reconcile loop and libvirt API calls). N VMs (dummy kernel paths) are created
  through the API by ``client_threads`` threads; one ``Client.watch("vm")``
  stream observes status. create: first Create call until every VM has
  ``status.phase == Running``; stop: first Update (``spec.power_state =
  STOPPED``, compare-and-set on the resource_version last seen on the watch)
  until every VM is ``Stopped``; delete: first Delete until every VM had its
  DELETED event AND the node agent no longer knows a domain for it (its
  Console RPC answers NOT_FOUND: the test driver writes no console log, so
  that answer means "no domain"), checked by probes after the last DELETED
  event. The node agent runs with ``--shutdown-timeout 1`` (passed as
  ``BRAID_SHUTDOWN_TIMEOUT``); libvirt's test driver powers a domain off at
  once on ACPI shutdown, so the stop is the ACPI path, not the timeout.
  No baseline exists for these.
"""
from __future__ import annotations

import os
import secrets
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench.framework import Metric, SectionContext
from braid.cli.manifests import load
from braid.cli.vm import agent_address
from braid.client import ApiCallError, Client
from braid.dev.devguest import READY_LINE, build_guest, default_guest_dir, guest_cmdline
from braid.dev.localcluster import LocalCluster
from braid.store import Store
from braid.v1 import agent_pb2, compute_pb2, meta_pb2

ROOT = Path(__file__).resolve().parents[2]
TINY_MANIFEST = ROOT / "examples" / "tiny-vm.yaml"
NODE = "node1"
READY = READY_LINE.encode()
BOOT_TIMEOUT_S = 60.0      # create -> ready line, per run
DOMAIN_GONE_TIMEOUT_S = 30.0
OPS_TIMEOUT_S = 120.0      # per phase of the test-driver run
SHUTDOWN_TIMEOUT = "1"     # the test-driver node agent's --shutdown-timeout
CLIENT_THREADS = 4


def _log(msg: str) -> None:
    print(f"[bench] compute: {msg}", file=sys.stderr, flush=True)


_TEMPLATE: list[compute_pb2.VM] = []


def _tiny(name: str, kernel: str, initrd: str) -> compute_pb2.VM:
    if not _TEMPLATE:
        _TEMPLATE.append(load(str(TINY_MANIFEST))[0].obj)
    vm = compute_pb2.VM()
    vm.CopyFrom(_TEMPLATE[0])
    vm.metadata.name = name
    vm.spec.node = NODE
    vm.spec.boot.kernel = kernel
    vm.spec.boot.initrd = initrd
    vm.spec.boot.cmdline = guest_cmdline()
    return vm


def _console_call(channel: grpc.Channel):
    return channel.unary_stream("/braid.v1.NodeAgentService/Console",
                                request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=agent_pb2.ConsoleChunk.FromString)


# -- 1. boot latency -------------------------------------------------------------

class _ConsoleWaiter:
    """Follows one VM's console through the agent's Console RPC in a thread and
    stamps (perf_counter) the chunk that completes the ready line."""

    def __init__(self, channel: grpc.Channel, vm: str, deadline: float):
        self.vm = vm
        self.call = _console_call(channel)
        self.deadline = deadline
        self.ready_at: float | None = None
        self.not_found_retries = 0
        self.buf = b""
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stream = None
        self._cancelled = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"bench-console-{vm}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._cancelled and time.monotonic() < self.deadline:
                with self._lock:
                    if self._cancelled:
                        return
                    self._stream = self.call(agent_pb2.ConsoleRequest(vm=self.vm, follow=True))
                try:
                    for chunk in self._stream:
                        self.buf += chunk.data
                        if READY in self.buf[-(len(chunk.data) + len(READY)):]:
                            self.ready_at = time.perf_counter()
                            return
                    return  # ended without the line (cancelled)
                except grpc.RpcError as exc:
                    # the agent has not defined the domain yet: ask again
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    self.not_found_retries += 1
                    time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported to the waiter
            if not (isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.CANCELLED):
                self.error = exc
        finally:
            self.done.set()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._stream is not None:
                self._stream.cancel()
        self.thread.join(10)


class _Libvirt:
    """The bench's own qemu:///system connection, re-opened when libvirtd restarts
    (braid.dev.libvirtd may restart it; domains survive that)."""

    def __init__(self, uri: str = "qemu:///system"):
        self.uri = uri
        self.conn = None

    def _open(self):
        import libvirt

        if self.conn is None:
            self.conn = libvirt.open(self.uri)
        return self.conn

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a dead connection
                pass

    def domains(self, timeout: float = 20.0) -> set[str]:
        import libvirt

        deadline = time.monotonic() + timeout
        while True:
            try:
                return {d.name() for d in self._open().listAllDomains(0)}
            except libvirt.libvirtError:
                self._drop()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def remove(self, name: str) -> None:
        """Last resort: destroy + undefine a domain the bench created."""
        import libvirt

        try:
            dom = self._open().lookupByName(name)
        except libvirt.libvirtError:
            self._drop()
            dom = self._open().lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()

    def close(self) -> None:
        self._drop()


def _wait_domain_gone(lv: _Libvirt, vm: str, timeout: float = DOMAIN_GONE_TIMEOUT_S) -> float:
    start = time.perf_counter()
    while f"braid-{vm}" in lv.domains():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"domain braid-{vm} still defined {timeout:.0f}s after the delete")
        time.sleep(0.05)
    return time.perf_counter() - start


class _PhaseStamps:
    """Watch of one VM by name: when (perf_counter) each status.phase first showed."""

    def __init__(self, c: Client, name: str):
        self.first: dict[str, float] = {}
        self.synced = threading.Event()
        self.stream = c.watch("vm", name=name)
        self.thread = threading.Thread(target=self._read, name=f"bench-phases-{name}",
                                       daemon=True)
        self.thread.start()
        if not self.synced.wait(10):
            self.close()
            raise TimeoutError(f"watch of vm {name} not SYNCED in 10s")

    def _read(self) -> None:
        try:
            for ev in self.stream:
                now = time.perf_counter()
                if ev.type == meta_pb2.SYNCED:
                    self.synced.set()
                elif ev.type in (meta_pb2.ADDED, meta_pb2.MODIFIED):
                    self.first.setdefault(ev.object.status.phase or "Pending", now)
        except ApiCallError:
            pass  # only a detail of the run; the console decides
        finally:
            self.synced.set()

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(10)


def _braid_boot(c: Client, channel_for: Callable[[str], grpc.Channel], name: str,
                kernel: str, initrd: str) -> tuple[float, dict]:
    """One create -> ready run; returns (seconds, details). The VM is left behind."""
    vm = _tiny(name, kernel, initrd)
    phases = _PhaseStamps(c, name)
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    waiter: _ConsoleWaiter | None = None
    try:
        t0 = time.perf_counter()
        wall0 = time.time()
        c.create(vm)
        create_s = time.perf_counter() - t0
        waiter = _ConsoleWaiter(channel_for(name), name, deadline)
        while not waiter.done.wait(1.0) and time.monotonic() < deadline:
            st = c.get("vm", name).status
            if st.phase == "Failed":
                raise RuntimeError(f"vm {name} failed: {st.message}")
        if waiter.error is not None:
            raise RuntimeError(f"console of {name}: {waiter.error!r}")
        if waiter.ready_at is None:
            vm_now = c.get("vm", name)
            raise TimeoutError(f"{READY_LINE!r} not on the console of {name} within "
                               f"{BOOT_TIMEOUT_S:.0f}s (phase {vm_now.status.phase!r}, "
                               f"{vm_now.status.message!r}); console tail: {waiter.buf[-300:]!r}")
        took = waiter.ready_at - t0
        details = {"create_call_s": create_s, "not_found_retries": waiter.not_found_retries}
        if "Running" in phases.first:
            details["to_phase_running_s"] = phases.first["Running"] - t0
        # the guest prints nothing after the ready line: the log's mtime is when
        # virtlogd wrote it (without the agent's 0.1 s console polling)
        path = c.get("vm", name).status.console_path
        try:
            details["ready_in_log_s"] = os.stat(path).st_mtime - wall0
        except OSError:
            pass
        return took, details
    finally:
        if waiter is not None:
            waiter.cancel()
        phases.close()


def _direct_boot(kernel: str, initrd: str) -> float:
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "128", "-nodefaults", "-nographic",
           "-serial", "stdio", "-kernel", kernel, "-initrd", initrd, "-append", guest_cmdline()]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    buf = b""
    try:
        fd = proc.stdout.fileno()
        while True:
            left = BOOT_TIMEOUT_S - (time.perf_counter() - t0)
            if left <= 0:
                raise TimeoutError(f"direct QEMU: no ready line in {BOOT_TIMEOUT_S:.0f}s: "
                                   f"{buf[-300:]!r}")
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 65536)
                if not data:
                    raise RuntimeError(f"direct QEMU exited ({proc.wait()}): {buf[-300:]!r}")
                buf += data
                if READY in buf[-(len(data) + len(READY)):]:
                    return time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()


def _boot_metrics(ctx: SectionContext) -> list[Metric]:
    runs = 2 if ctx.quick else 5
    guest = build_guest(default_guest_dir(), progress=lambda s: _log(f"guest: {s}"))
    kernel, initrd = str(guest.kernel), str(guest.initrd)
    tag = secrets.token_hex(3)
    cluster = LocalCluster(ctx.tmp_dir / "cluster-qemu")
    client: Client | None = None
    lv = _Libvirt()
    channels: dict[str, grpc.Channel] = {}
    live: list[str] = []  # VMs created and not yet confirmed gone
    try:
        state = cluster.up(nodes=1, libvirt_uri="qemu:///system", progress=_log)
        client = Client(state["api"], tls=cluster.user_tls())
        lv.domains()  # connects

        def channel_for(vm: str) -> grpc.Channel:
            if "agent" not in channels:  # same node every run: resolve once
                channels["agent"] = _agent_channel(agent_address(client, vm), cluster)
            return channels["agent"]

        braid_s, direct_s, gone_s, details = [], [], [], []
        warm: dict[str, float] = {}
        for i in range(runs + 1):  # run 0 is the unmeasured warm-up
            name = f"bench-boot-{tag}-{i}"
            # alternate which goes first, so slow drift hits both alike
            order = ("braid", "direct") if i % 2 == 0 else ("direct", "braid")
            for which in order:
                if which == "direct":
                    d = _direct_boot(kernel, initrd)
                    if i == 0:
                        warm["direct"] = d
                    else:
                        direct_s.append(d)
                    continue
                live.append(name)
                b, det = _braid_boot(client, channel_for, name, kernel, initrd)
                client.delete("vm", name)
                g = _wait_domain_gone(lv, name)
                live.remove(name)
                if i == 0:
                    warm["braid"] = b
                else:
                    braid_s.append(b)
                    gone_s.append(g)
                    details.append(det)
            _log(f"boot run {i}{' (warm-up)' if i == 0 else ''}: braid "
                 f"{warm['braid'] if i == 0 else braid_s[-1]:.2f}s, direct "
                 f"{warm['direct'] if i == 0 else direct_s[-1]:.2f}s")

        params = {
            "R": runs, "warmup_runs": 1, "nodes": 1, "libvirt_uri": "qemu:///system",
            "accel": "tcg", "guest": "tiny-vm.yaml (1/2 vcpus, 128/256 MiB)",
            "console": "agent Console RPC, follow",
            "braid_runs_s": [round(x, 3) for x in braid_s],
            "direct_runs_s": [round(x, 3) for x in direct_s],
            "warmup_braid_s": round(warm["braid"], 3), "warmup_direct_s": round(warm["direct"], 3),
            "create_call_median_s": round(statistics.median(d["create_call_s"] for d in details), 4),
            "delete_to_domain_gone_median_s": round(statistics.median(gone_s), 3),
        }
        for key in ("to_phase_running_s", "ready_in_log_s"):
            got = [d[key] for d in details if key in d]
            if got:
                params[key.removesuffix("_s") + "_median_s"] = round(statistics.median(got), 3)
        return [
            Metric("apply_to_guest_ready_s.median", statistics.median(braid_s), "s",
                   "qemu_direct_boot_s.median", statistics.median(direct_s), False,
                   {**params, "stat": "median"}),
            Metric("apply_to_guest_ready_s.max", max(braid_s), "s",
                   "qemu_direct_boot_s.max", max(direct_s), False,
                   {**params, "stat": "max"}),
        ]
    finally:
        errors = []
        for name in list(live):  # never leave a QEMU guest running behind the cluster
            try:
                if client is not None:
                    try:
                        client.delete("vm", name)
                    except ApiCallError as exc:
                        if exc.code != grpc.StatusCode.NOT_FOUND:
                            raise
                _wait_domain_gone(lv, name)
            except Exception as exc:  # noqa: BLE001 - last resort: remove the domain ourselves
                errors.append(exc)
                try:
                    lv.remove(f"braid-{name}")
                except Exception as exc2:  # noqa: BLE001
                    errors.append(exc2)
        for ch in channels.values():
            ch.close()
        if client is not None:
            client.close()
        lv.close()
        cluster.down()
        if errors:
            _log(f"boot cleanup errors: {errors!r}")


# -- 2. lifecycle throughput on the test driver ------------------------------------

class _PhaseWatch:
    """One Client.watch("vm") read by a thread: the last phase, resource_version
    and message of every VM, a count per phase and the DELETED names."""

    def __init__(self, client: Client):
        self.phase: dict[str, str] = {}
        self.rv: dict[str, int] = {}
        self.message: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.deleted: set[str] = set()
        self.events: Counter[str] = Counter()
        self.cond = threading.Condition()
        self.synced = False
        self.ended = False
        self.error: BaseException | None = None
        self.stream = client.watch("vm")
        self.thread = threading.Thread(target=self._read, name="bench-vm-watch", daemon=True)
        self.thread.start()

    def _set_phase(self, name: str, phase: str | None) -> None:
        old = self.phase.pop(name, None)
        if old is not None:
            self.counts[old] -= 1
        if phase is not None:
            self.phase[name] = phase
            self.counts[phase] += 1

    def _read(self) -> None:
        err = None
        try:
            for ev in self.stream:
                with self.cond:
                    self.events[meta_pb2.EventType.Name(ev.type)] += 1
                    if ev.type == meta_pb2.SYNCED:
                        self.synced = True
                    elif ev.type == meta_pb2.DELETED:
                        self.deleted.add(ev.object.metadata.name)
                        self._set_phase(ev.object.metadata.name, None)
                    elif ev.type in (meta_pb2.ADDED, meta_pb2.MODIFIED):
                        o = ev.object
                        self._set_phase(o.metadata.name, o.status.phase or "Pending")
                        self.rv[o.metadata.name] = o.metadata.resource_version
                        self.message[o.metadata.name] = o.status.message
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported through wait
            err = exc
        finally:
            with self.cond:
                self.error, self.ended = err, True
                self.cond.notify_all()

    def wait(self, done: Callable[[], bool], what: str, timeout: float = OPS_TIMEOUT_S) -> float:
        """Block until ``done()`` (called with the lock held); returns perf_counter."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not done():
                if self.ended:
                    raise RuntimeError(f"vm watch ended while waiting for {what}: {self.error!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what}: not reached in {timeout:.0f}s; phases "
                                       f"{dict(+self.counts)}, {len(self.deleted)} deleted")
                self.cond.wait(min(left, 1.0))
            return time.perf_counter()

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(10)


def _parallel(threads: int, items: list, make_worker: Callable[[], Callable]) -> float:
    """Each thread (own Client) handles items[i::threads]; returns perf_counter at
    the start (all workers made before it)."""
    workers = [make_worker() for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def work(w, chunk):
        barrier.wait()
        for item in chunk:
            w(item)

    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="bench-ops") as pool:
            futs = [pool.submit(work, w, items[i::threads]) for i, w in enumerate(workers)]
            barrier.wait()
            start = time.perf_counter()
            for f in futs:
                f.result()
            return start
    finally:
        for w in workers:
            w.client.close()


def _agent_channel(address: str, cluster: LocalCluster) -> grpc.Channel:
    """A channel to a node agent of the (secure by default) local cluster."""
    tls = cluster.user_tls()
    if tls is None:
        return grpc.insecure_channel(address)
    from braid.auth.pki import grpc_channel_credentials
    return grpc.secure_channel(address, grpc_channel_credentials(tls))


class _Creator:
    def __init__(self, address: str, tls=None):
        self.client = Client(address, tls=tls)

    def __call__(self, vm) -> None:
        self.client.create(vm)


class _Stopper:
    """Update spec.power_state = STOPPED with CAS on the last watched resource_version."""

    def __init__(self, address: str, watch: _PhaseWatch, template: compute_pb2.VM):
        self.client = Client(address)
        self.watch = watch
        self.template = template
        self.retries = 0

    def __call__(self, name: str) -> None:
        with self.watch.cond:
            rv = self.watch.rv[name]
        vm = compute_pb2.VM()
        vm.CopyFrom(self.template)
        vm.metadata.name = name
        vm.metadata.resource_version = rv
        vm.spec.power_state = compute_pb2.STOPPED
        for attempt in range(10):
            try:
                self.client.update(vm)
                return
            except ApiCallError as exc:
                if exc.code != grpc.StatusCode.ABORTED or attempt == 9:
                    raise
                self.retries += 1
                vm.metadata.resource_version = self.client.get("vm", name).metadata.resource_version


class _Deleter:
    def __init__(self, address: str):
        self.client = Client(address)

    def __call__(self, name: str) -> None:
        self.client.delete("vm", name)


def _agent_knows(channel: grpc.Channel, vm: str) -> bool:
    """Whether the node agent still has a domain (or a console log) for ``vm``."""
    try:
        for _ in _console_call(channel)(agent_pb2.ConsoleRequest(vm=vm, follow=False),
                                        timeout=10):
            pass
        return True
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise


def _ops_metrics(ctx: SectionContext) -> list[Metric]:
    n = 200 if ctx.quick else 1000
    threads = CLIENT_THREADS
    data_dir = ctx.tmp_dir / "cluster-test"
    cluster = LocalCluster(data_dir)
    closers: list[Callable[[], None]] = []
    env_key = "BRAID_SHUTDOWN_TIMEOUT"
    env_old = os.environ.get(env_key)
    try:
        # LocalCluster.up has no option for it; its daemons inherit our environment
        os.environ[env_key] = SHUTDOWN_TIMEOUT
        try:
            state = cluster.up(nodes=1, libvirt_uri="test:///default", progress=_log)
        finally:
            if env_old is None:
                os.environ.pop(env_key, None)
            else:
                os.environ[env_key] = env_old
        agent = next(p for p in state["processes"] if p["name"] == f"node-agent@{NODE}")
        environ = Path(f"/proc/{agent['pid']}/environ").read_bytes().split(b"\0")
        if f"{env_key}={SHUTDOWN_TIMEOUT}".encode() not in environ:
            raise RuntimeError(f"the node agent did not get {env_key}={SHUTDOWN_TIMEOUT}")
        from node_agent.main import OPTIONS as AGENT_OPTIONS
        agent_workers = next(o.default for o in AGENT_OPTIONS if o.name == "workers")

        api = state["api"]
        client = Client(api, tls=cluster.user_tls())
        closers.append(client.close)
        watch = _PhaseWatch(client)
        closers.append(watch.close)
        watch.wait(lambda: watch.synced, "watch SYNCED", 30)

        kernel, initrd = "/nonexistent/braid-bench/vmlinuz", "/nonexistent/braid-bench/initrd.img"
        template = _tiny("x", kernel, initrd)
        names = [f"ops-{i:04d}" for i in range(n)]
        vms = [_tiny(name, kernel, initrd) for name in names]

        # (a) create -> all Running
        t0 = _parallel(threads, vms, lambda: _Creator(api, cluster.user_tls()))
        issued_create = time.perf_counter() - t0
        t1 = watch.wait(lambda: watch.counts["Running"] == n, f"all {n} VMs Running")
        create_s = t1 - t0
        _log(f"{n} VMs created -> Running in {create_s:.2f}s")

        # (b) stop -> all Stopped
        stoppers: list[_Stopper] = []

        def make_stopper():
            s = _Stopper(api, watch, template)
            stoppers.append(s)
            return s

        t0 = _parallel(threads, names, make_stopper)
        issued_stop = time.perf_counter() - t0
        t1 = watch.wait(lambda: watch.counts["Stopped"] == n, f"all {n} VMs Stopped")
        stop_s = t1 - t0
        with watch.cond:
            by_timeout = sum("ignored ACPI shutdown" in watch.message.get(x, "") for x in names)
        _log(f"{n} VMs stopped in {stop_s:.2f}s ({by_timeout} powered off after the timeout)")

        # (c) delete -> all DELETED and no domain left on the agent
        channel = _agent_channel(agent_address(client, names[0]), cluster)
        closers.append(channel.close)
        console_dir = data_dir / "console" / NODE
        logs = sorted(p.name for p in console_dir.glob("*.log")) if console_dir.exists() else []
        if logs:  # then NOT_FOUND from Console would not mean "no domain"
            raise RuntimeError(f"the test driver left console logs ({logs[:3]}...): "
                               "the agent-side removal check does not apply")
        if not all(_agent_knows(channel, x) for x in names[:3]):
            raise RuntimeError("the node agent does not report domains of stopped VMs")
        t0 = _parallel(threads, names, lambda: _Deleter(api))
        issued_delete = time.perf_counter() - t0
        t_events = watch.wait(lambda: len(watch.deleted) >= n, f"DELETED for all {n} VMs")
        pending = set(names)
        rounds = 0
        with ThreadPoolExecutor(threads, thread_name_prefix="bench-probe") as pool:
            while pending:
                rounds += 1
                if time.perf_counter() - t_events > OPS_TIMEOUT_S:
                    raise TimeoutError(f"{len(pending)} domains still on the agent "
                                       f"{OPS_TIMEOUT_S:.0f}s after their DELETED events")
                ordered = sorted(pending)
                known = pool.map(lambda x: _agent_knows(channel, x), ordered)
                pending = {x for x, k in zip(ordered, known) if k}
                if pending:
                    time.sleep(0.05)
        t1 = time.perf_counter()
        delete_s = t1 - t0
        left, _, _ = client.list("vm")
        if left:
            raise RuntimeError(f"{len(left)} VMs still listed after the delete")
        store = Store(state["etcd"], tls=cluster.user_tls("root"))
        try:  # the API hides a status key without its spec: look at etcd itself
            leftover = [kv.key for kv in store.list("vm/")[0]]
        finally:
            store.close()
        if leftover:
            _log(f"WARNING: {len(leftover)} vm keys left in etcd after the delete: "
                 f"{leftover[:5]}")
        _log(f"{n} VMs deleted in {delete_s:.2f}s (events after {t_events - t0:.2f}s, "
             f"{rounds} probe rounds)")

        common = {"N": n, "client_threads": threads, "agent_workers": agent_workers,
                  "nodes": 1, "libvirt_uri": "test:///default", "watch_streams": 1}
        return [
            Metric("vm_create_to_running_per_second", n / create_s, "VMs/s", None, None, True,
                   {**common, "wall_s": round(create_s, 3),
                    "api_calls_s": round(issued_create, 3)}),
            Metric("vm_stop_per_second", n / stop_s, "VMs/s", None, None, True,
                   {**common, "wall_s": round(stop_s, 3), "api_calls_s": round(issued_stop, 3),
                    "agent_shutdown_timeout_s": float(SHUTDOWN_TIMEOUT),
                    "stop_path": ("ACPI shutdown (test driver powers off at once)"
                                  if by_timeout == 0 else
                                  f"{by_timeout} of {n} destroyed after the shutdown timeout"),
                    "cas_retries": sum(s.retries for s in stoppers)}),
            Metric("vm_delete_per_second", n / delete_s, "VMs/s", None, None, True,
                   {**common, "wall_s": round(delete_s, 3),
                    "api_calls_s": round(issued_delete, 3),
                    "all_deleted_events_s": round(t_events - t0, 3),
                    "agent_removed_check": "Console RPC NOT_FOUND for every VM",
                    "probe_rounds": rounds, "etcd_vm_keys_left": len(leftover)}),
        ]
    finally:
        errors = []
        for close in reversed(closers):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                errors.append(exc)
        cluster.down()
        if errors:
            _log(f"ops cleanup errors: {errors!r}")


def run(ctx: SectionContext) -> list[Metric]:
    return _boot_metrics(ctx) + _ops_metrics(ctx)
