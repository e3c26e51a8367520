"""Control plane: create-to-watch latency, API create throughput and watch fan-out
through one real braid-controller process on its own local etcd.

Objects are realistic VMs (examples/vm.yaml with distinct names). Clients run in
the bench process with the Python ``braid.client.Client``; every watch stream is
read by its own thread that stamps each ADDED event with time.perf_counter on
arrival. Latencies are measured from the start of ``Client.create`` to that
stamp. Baselines skip the API (gRPC, validation, JSON assembly, per-watcher
reads): the same operation done directly on etcd with ``braid.store.Store``
(put/create + ``Store.watch``) under a separate key prefix, with payloads of the
size the controller actually stores. etcd, the controller and the clients share
the machine's cores, so the numbers include their CPU contention.

* ``create_to_watch_latency_ms``: N sequential creates, one watch open; baseline
  ``raw_etcd_put_to_watch`` = Store.put of the stored value + Store.watch.
* ``api_creates_per_second``: N objects in total per run, split over ``threads``
  client threads (one connection each); baseline ``raw_etcd_creates_per_second``
  = Store.create (CAS) of the values the API stored, same threads.
* ``watch_fanout_delay_ms``: ``watchers`` streams open, N sequential creates; the
  delay until the last watcher has the ADDED event; baseline ``single_watcher``.
"""
from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.framework import Metric, SectionContext
from braid import keys
from braid import kinds as K
from braid.cli.manifests import load
from braid.client import Client
from braid.dev.localetcd import EtcdProcess
from braid.store import Store
from braid.v1 import meta_pb2

ROOT = Path(__file__).resolve().parents[2]
VM_MANIFEST = ROOT / "examples" / "vm.yaml"
PREFIX = "/braid/"
RAW_PREFIX = "/bench-raw/"
VM = K.lookup("vm")
WAIT_S = 30.0  # give up on an event after this long
# After SYNCED the server only then opens its etcd watch (from the list's revision,
# so nothing is lost); an object created in that window arrives with the catch-up,
# tens of ms late. Measurements start after this pause.
SETTLE_S = 0.2


# -- helpers -------------------------------------------------------------------

def _percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


class _Controller:
    """braid-controller as a real process (like tests/conftest.py DaemonProc)."""

    def __init__(self, etcd_endpoint: str, tmp: Path):
        self.state_file = tmp / "controller.json"
        self.log = tmp / "controller.log"
        cmd = [sys.executable, "-m", "controller.main", "--etcd", etcd_endpoint,
               "--prefix", PREFIX, "--state-file", str(self.state_file),
               "--log-format", "text", "--metrics", ""]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         cwd=str(ROOT), start_new_session=True)
        try:
            self.address = self._wait_ready()["grpc"]
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            if self.state_file.exists():
                return json.loads(self.state_file.read_text())
            time.sleep(0.05)
        raise TimeoutError(f"controller not ready in {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"controller died with {self.proc.returncode}: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class _Arrivals:
    """Arrival stamps by name, shared between a reader thread and the bench."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.revisions: dict[str, int] = {}  # resource_version seen in the event
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.ended = False

    def record(self, name: str, t: float, revision: int = 0) -> None:
        with self.cond:
            self.times.setdefault(name, t)
            self.revisions.setdefault(name, revision)
            self.cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.error = self.error or error
            self.ended = True
            self.cond.notify_all()

    def wait_for(self, name: str, timeout: float = WAIT_S) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while name not in self.times:
                if self.ended:
                    raise RuntimeError(f"watch ended before {name!r} arrived: {self.error!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{name!r} did not arrive within {timeout}s")
                self.cond.wait(left)
            return self.times[name]


class _ApiWatcher(_Arrivals):
    """One Client.watch("vm") stream read by its own thread."""

    def __init__(self, client: Client, tag: str):
        super().__init__()
        self.synced = threading.Event()
        self.stream = client.watch("vm")
        self.thread = threading.Thread(target=self._read, name=f"bench-watch-{tag}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        err = None
        try:
            for ev in self.stream:
                now = time.perf_counter()
                if ev.type == meta_pb2.SYNCED:
                    self.synced.set()
                elif ev.type == meta_pb2.ADDED:
                    self.record(ev.object.metadata.name, now,
                                ev.object.metadata.resource_version)
        except BaseException as exc:  # noqa: BLE001 - reported through wait_for
            err = exc
        finally:
            self.finish(err)
            self.synced.set()

    def wait_synced(self, timeout: float = WAIT_S) -> None:
        if not self.synced.wait(timeout):
            raise TimeoutError(f"watch not SYNCED within {timeout}s")
        if self.ended:
            raise RuntimeError(f"watch ended before SYNCED: {self.error!r}")

    def close(self) -> None:
        try:
            self.stream.cancel()
        finally:
            self.thread.join(10)


class _RawWatcher(_Arrivals):
    """braid.store.Store.watch on a raw prefix, read by its own thread."""

    def __init__(self, store: Store, prefix: str):
        super().__init__()
        self.stop = threading.Event()
        start = store.revision() + 1
        self.thread = threading.Thread(target=self._read, args=(store, prefix, start),
                                       name="bench-raw-watch", daemon=True)
        self.thread.start()

    def _read(self, store: Store, prefix: str, start: int) -> None:
        err = None
        try:
            for batch in store.watch(prefix, start, self.stop):
                now = time.perf_counter()
                for ev in batch:
                    if ev.type == "put":
                        self.record(ev.kv.key.rsplit("/", 1)[-1], now)
        except BaseException as exc:  # noqa: BLE001
            err = exc
        finally:
            self.finish(err)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def _vms(template, prefix: str, count: int) -> list:
    out = []
    for i in range(count):
        vm = type(template)()
        vm.CopyFrom(template)
        vm.metadata.name = f"{prefix}-{i:04d}"
        out.append(vm)
    return out


def _timed_parallel(threads: int, items: list, make_worker: Callable[[], Callable]) -> float:
    """Split ``items`` over ``threads`` workers; returns wall seconds. Each thread
    gets its own worker (own connection) from ``make_worker``; workers are made
    before the clock starts."""
    chunks = [items[i::threads] for i in range(threads)]
    workers: list = []
    barrier = threading.Barrier(threads + 1)

    def work(w, chunk):
        barrier.wait()
        for item in chunk:
            w(item)

    try:
        for _ in range(threads):
            workers.append(make_worker())
        with ThreadPoolExecutor(threads, thread_name_prefix="bench-create") as pool:
            futs = [pool.submit(work, w, c) for w, c in zip(workers, chunks)]
            barrier.wait()
            start = time.perf_counter()
            for f in futs:
                f.result()
            return time.perf_counter() - start
    finally:
        for w in workers:
            closer = getattr(w, "close", None)
            if closer:
                closer()


class _ApiCreator:
    def __init__(self, address: str):
        self.client = Client(address)

    def __call__(self, vm) -> None:
        self.client.create(vm)

    def close(self) -> None:
        self.client.close()


class _RawCreator:
    def __init__(self, endpoint: str, prefix: str):
        self.store = Store(endpoint, prefix=prefix)

    def __call__(self, kv: tuple[str, bytes]) -> None:
        self.store.create(*kv)

    def close(self) -> None:
        self.store.close()


# -- the section -----------------------------------------------------------------

def run(ctx: SectionContext) -> list[Metric]:
    quick = ctx.quick
    n_latency = 50 if quick else 300
    n_creates = 60 if quick else 300
    thread_counts = (1, 8)
    n_watchers = 20 if quick else 100
    n_fanout = 5 if quick else 20
    template = load(str(VM_MANIFEST))[0].obj

    etcd: EtcdProcess | None = None
    ctrl: _Controller | None = None
    closers: list[Callable[[], None]] = []  # run in reverse order in finally
    metrics: list[Metric] = []
    try:
        etcd = EtcdProcess(ctx.tmp_dir / "etcd-data", log_path=ctx.tmp_dir / "etcd.log")
        etcd.start()  # assigned first: a failed start is still stopped in finally
        ctrl = _Controller(etcd.endpoint, ctx.tmp_dir)
        admin = Store(etcd.endpoint, prefix=PREFIX)  # to wipe vm/ between phases
        closers.append(admin.close)
        raw = Store(etcd.endpoint, prefix=RAW_PREFIX)
        closers.append(raw.close)
        api = Client(ctrl.address)
        closers.append(api.close)
        common = {"etcd": "1 member, local", "controller": "1 process", "object": "VM"}
        # the VM manifest refers to volume vol1 and network net1: they must exist
        for dep in ("volume", "network"):
            api.create(load(str(ROOT / "examples" / f"{dep}.yaml"))[0].obj)

        # warm up both paths (first RPCs open connections, import lazily, ...)
        for vm in _vms(template, "warm", 5):
            api.create(vm)
        for i in range(5):
            raw.put(f"warm/{i}", b"x" * 500)

        # 1. create -> ADDED on an open watch ------------------------------------
        watcher = _ApiWatcher(api, "latency")
        closers.append(watcher.close)
        watcher.wait_synced()
        time.sleep(SETTLE_S)
        api_lat = []
        for vm in _vms(template, "lat", n_latency):
            t0 = time.perf_counter()
            created = api.create(vm)
            api_lat.append(watcher.wait_for(vm.metadata.name) - t0)
            seen = watcher.revisions[vm.metadata.name]
            if seen != created.metadata.resource_version:
                raise AssertionError(f"watch saw {vm.metadata.name} at revision {seen}, create "
                                     f"returned {created.metadata.resource_version}")
        watcher.close()

        stored = admin.get(VM.spec_key("lat-0000"))
        payload_bytes = len(stored.value)
        raw_watcher = _RawWatcher(raw, "lat/")
        closers.append(raw_watcher.close)
        time.sleep(SETTLE_S)
        raw_lat = []
        for i in range(n_latency):
            name = f"r{i:04d}"
            t0 = time.perf_counter()
            raw.put(f"lat/{name}", stored.value)
            raw_lat.append(raw_watcher.wait_for(name) - t0)
        raw_watcher.close()

        p_lat = {**common, "N": n_latency, "threads": 1, "watchers": 1,
                 "payload_bytes": payload_bytes, "sequential": True}
        for pct in (50, 99):
            metrics.append(Metric(
                f"create_to_watch_latency_ms.p{pct}", _percentile(api_lat, pct) * 1e3, "ms",
                f"raw_etcd_put_to_watch.p{pct}", _percentile(raw_lat, pct) * 1e3, False,
                {**p_lat, "percentile": pct}))
        ctrl.check_alive()

        # 2. create throughput at 1 and 8 client threads ------------------------
        admin.delete_prefix("vm/")
        for threads in thread_counts:
            vms = _vms(template, f"tp{threads}", n_creates)
            api_s = _timed_parallel(threads, vms, lambda: _ApiCreator(ctrl.address))
            got, _ = admin.list(keys.spec("vm", f"tp{threads}-"))
            if len(got) != n_creates:
                raise AssertionError(f"expected {n_creates} stored VMs, found {len(got)}")
            kvs = [(f"tp{threads}/{kv.key.rsplit('/', 1)[-1]}", kv.value) for kv in got]
            raw_s = _timed_parallel(threads, kvs, lambda: _RawCreator(etcd.endpoint, RAW_PREFIX))
            metrics.append(Metric(
                f"api_creates_per_second.threads{threads}", n_creates / api_s, "objects/s",
                f"raw_etcd_creates_per_second.threads{threads}", n_creates / raw_s, True,
                {**common, "N": n_creates, "threads": threads, "watchers": 0,
                 "payload_bytes": round(statistics.mean(len(v) for _, v in kvs)),
                 "api_wall_s": round(api_s, 3), "raw_wall_s": round(raw_s, 3)}))
            admin.delete_prefix("vm/")  # keep the initial list of later watches small
        ctrl.check_alive()

        # 3. watch fan-out -------------------------------------------------------
        def fanout(watchers: list[_ApiWatcher], tag: str) -> tuple[list[float], list[float]]:
            last, first = [], []
            for vm in _vms(template, tag, n_fanout):
                t0 = time.perf_counter()
                api.create(vm)
                arrivals = [w.wait_for(vm.metadata.name) for w in watchers]
                last.append(max(arrivals) - t0)
                first.append(min(arrivals) - t0)
                time.sleep(0.02)  # the next create starts on a quiet system
            return last, first

        single = _ApiWatcher(api, "single")
        closers.append(single.close)
        single.wait_synced()
        time.sleep(SETTLE_S)
        single_delay, _ = fanout([single], "fan1")
        single.close()

        # the watchers share one channel (grpc-core would share the subchannel
        # across identical Client channels anyway); one reader thread each
        watch_client = Client(ctrl.address)
        closers.append(watch_client.close)
        many: list[_ApiWatcher] = []
        for i in range(n_watchers):
            w = _ApiWatcher(watch_client, f"fan{i}")
            closers.append(w.close)
            many.append(w)
        t_open = time.perf_counter()
        for w in many:
            w.wait_synced()
        open_s = time.perf_counter() - t_open
        time.sleep(SETTLE_S)
        many_delay, many_first = fanout(many, f"fan{n_watchers}")
        for w in many:
            w.close()
        ctrl.check_alive()

        p_fan = {**common, "N": n_fanout, "threads": 1, "watchers": n_watchers,
                 "watch_channels": 1, "all_synced_s": round(open_s, 3),
                 "first_watcher_p50_ms": round(statistics.median(many_first) * 1e3, 2)}
        metrics.append(Metric(
            "watch_fanout_delay_ms.p50", statistics.median(many_delay) * 1e3, "ms",
            "single_watcher.p50", statistics.median(single_delay) * 1e3, False,
            {**p_fan, "stat": "p50 over creates of the last watcher's delay"}))
        metrics.append(Metric(
            "watch_fanout_delay_ms.max", max(many_delay) * 1e3, "ms",
            "single_watcher.max", max(single_delay) * 1e3, False,
            {**p_fan, "stat": "max over creates of the last watcher's delay"}))
        return metrics
    finally:
        errors = []
        for close in reversed(closers):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                errors.append(exc)
        if ctrl is not None:
            ctrl.stop()
        if etcd is not None:
            etcd.stop()
        if errors:
            print(f"[bench] control: cleanup errors: {errors!r}", file=sys.stderr)
