"""Storage: NBD volume I/O against qemu-nbd, and the replication protocol against gRPC.

**fio through NBD** (``*_r1``, ``*_r2``, ``*_r3``). One etcd, a
braid-controller and 3 braid-storaged processes (``bench.storage_cluster``),
each with one directory disk; the disk directories and the baseline file sit
in one directory under /var/tmp (same filesystem, not tmpfs). Three volumes
of the same size (quick 256 MiB, full 1 GiB) with 1, 2 and 3 replicas, the
default extent size (64 MiB), placed by the controller over the 3 nodes (so
with 1 or 2 replicas some extents have no replica on node 1: param
``local_extents``). fio (``--ioengine=nbd``, one job, libnbd's defaults:
writes are not flushed, the daemon's replica writes and qemu-nbd's writes
both end in the page cache) opens ``nbd+unix:///<vol>?socket=<sock>`` of
node 1's storage daemon. Each target is first filled by one sequential 1 MiB
write pass (its rate is the ``prefill_MiBps`` param of ``write_1m``), then
runs, each ``--time_based`` (quick 5 s, full 15 s, after a 1 s
``--ramp_time``) over the whole volume: ``randwrite_4k_qd16`` and
``randread_4k_qd16`` (IOPS), ``write_1m`` and ``read_1m`` (sequential 1 MiB,
iodepth 4, MiB/s). Baseline ``qemu_nbd_<job>``: ``qemu-nbd -f raw
--cache=writeback --aio=threads --shared=8 --persistent`` serving a raw file
of the same size in the same directory, prefilled the same way; for every job
it runs right before the three Braid volumes. Params: the serving daemon's
CPU (``daemon_cpu_pct``, utime + stime from /proc over fio's wall time; the
data path is one uvloop thread, so ~100 % means CPU-bound), the two other
daemons' (``peers_cpu_pct``), qemu-nbd's (``qemu_nbd_cpu_pct``), the whole
machine's busy share (``machine_busy_pct``: fio, every daemon, etcd and the
controller share its cores), fio's p50/p99 completion latency. After every
job the volumes' extent records are checked: a replica dropped during the run
(generation bump) fails the section instead of reporting a degraded volume.

Goals (storage issue): 2 replicas at >= 50 % of qemu-nbd's 4k randwrite IOPS
(``randwrite_4k_qd16_r2`` ratio >= 0.5) and >= 60 % of its 1 MiB write
bandwidth (``write_1m_r2`` ratio >= 0.6); those two rows carry ``goal`` and
``goal_met`` params with the ratio actually reached.

**peer_protocol**: the replication protocol choice, measured. A server process
runs a real ``storage_daemon.datapath.StorageNode`` (no etcd: its extent map
holds one 64 MiB extent record naming it, its disk is a real ``DiskStore``
under the same /var/tmp directory) behind two listeners on loopback TCP:
``StorageNode.serve_peers`` (Braid's framing, ``storage_daemon/peer.py``) and
a grpc.aio server with one bidirectional stream method (generic handler, bytes
in and out, no protoc) whose messages are the same frames (56-byte header +
volume name + payload; replies: the 28-byte header). The gRPC handler reads
requests with ``context.read``, runs each as a task of the same
``StorageNode._serve`` (so both do the same replica write: pwrite of data and
crc) and writes replies in completion order from one sender task. The client
(the bench process) sends 4 KiB writes at consecutive 4 KiB offsets of the
extent, with ``storage_daemon.peer.PeerClient`` or a pipelined grpc.aio stream
(``call.write`` under a lock, since grpc.aio allows one write in flight per
call; one reader task matches replies by request id: in a trial this beat
request/reply async iterators on both sides, ~5k -> ~8k writes/s at qd16).
Both processes run uvloop. ``peer_write_4k_qd16_per_s``: writes per second
with 16 in flight (16 worker coroutines); ``peer_write_4k_qd1_us``: median
round trip with 1 in flight (params: p99). Several rounds alternate which
protocol goes first; the value is the median over rounds (per-round values in
params). Params: client and server CPU microseconds per write (client: the
bench process's CPU time, including gRPC's threads).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench.framework import Metric, SectionContext
from bench.storage_cluster import ROOT, StorageCluster, cpu_seconds, machine_cpu
from braid import extents as X

MiB = 1 << 20
DISK_PARENT = Path("/var/tmp")


def _log(msg: str) -> None:
    print(f"[bench] storage: {msg}", file=sys.stderr, flush=True)


# -- fio through NBD -------------------------------------------------------------

# (name, fio rw, bs, iodepth, direction in fio's JSON, unit)
JOBS = [
    ("randwrite_4k_qd16", "randwrite", "4k", 16, "write", "IOPS"),
    ("randread_4k_qd16", "randread", "4k", 16, "read", "IOPS"),
    ("write_1m", "write", "1m", 4, "write", "MiB/s"),
    ("read_1m", "read", "1m", 4, "read", "MiB/s"),
]
GOALS = {("randwrite_4k_qd16", 2): 0.5, ("write_1m", 2): 0.6}
REPLICAS = (1, 2, 3)


def fio_version() -> str:
    return subprocess.run(["fio", "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def run_fio(uri: str, name: str, rw: str, bs: str, iodepth: int, size: int,
            runtime: float | None = None, timeout: float = 900.0) -> dict:
    """One fio job on the nbd engine; returns the job's JSON. A failure raises
    with fio's stderr."""
    cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", f"--size={size}", "--numjobs=1", "--output-format=json"]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime:g}", "--ramp_time=1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"fio {name} on {uri} exited {p.returncode}:\n"
                           f"{p.stderr[-3000:] or p.stdout[-2000:]}")
    try:
        job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        raise RuntimeError(f"fio {name}: unreadable output ({exc}):\n{p.stdout[-2000:]}\n"
                           f"{p.stderr[-2000:]}") from None
    if job.get("error"):
        raise RuntimeError(f"fio {name} on {uri}: job error {job['error']}:\n{p.stderr[-3000:]}")
    return job


def _pct(job: dict, direction: str, q: str) -> float:
    clat = job[direction].get("clat_ns", {}).get("percentile", {})
    return clat.get(q, 0.0) / 1e3


class _Meter:
    """CPU seconds of some processes and the machine's busy share over a span."""

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids

    def __enter__(self) -> "_Meter":
        self.cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in self.pids.items()}
        self.m0 = machine_cpu()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        busy, total = (a - b for a, b in zip(machine_cpu(), self.m0))
        self.result = {f"{k}_cpu_pct": round(100 * (sum(cpu_seconds(p) for p in v) - self.cpu0[k]) / wall, 1)
                       for k, v in self.pids.items()}
        self.result["machine_busy_pct"] = round(100 * busy / max(1, total), 1)


class QemuNbd:
    """qemu-nbd serving one raw file on a unix socket, until stop()."""

    def __init__(self, image: Path, sock: Path, log: Path):
        self.sock = sock
        self.log = log
        cmd = ["qemu-nbd", "-f", "raw", "--cache=writeback", "--aio=threads", "--shared=8",
               "--persistent", f"--socket={sock}", "-x", "vol", str(image)]
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 15
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"qemu-nbd exited with {self.proc.returncode}: "
                                       f"{log.read_text(errors='replace')[-1000:]}")
                if sock.exists():
                    try:
                        with socket.socket(socket.AF_UNIX) as s:
                            s.connect(str(sock))
                        break
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError("qemu-nbd did not open its socket in 15 s")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    @property
    def uri(self) -> str:
        return f"nbd+unix:///vol?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _nbd_metrics(ctx: SectionContext, base: Path) -> list[Metric]:
    quick = ctx.quick
    size = (256 if quick else 1024) * MiB
    runtime = 5 if quick else 15
    version = fio_version()
    cluster = StorageCluster(ctx.tmp_dir / "cluster", base / "disks", nodes=3, progress=_log)
    qemu: QemuNbd | None = None
    try:
        cluster.start()
        serving = cluster.nodes[0]
        peers = [n.pid for n in cluster.nodes[1:]]
        vols = {r: f"bench-r{r}" for r in REPLICAS}
        for r, name in vols.items():
            cluster.create_volume(name, size, r)
        records = {r: cluster.extent_records(name) for r, name in vols.items()}
        extent_size = records[1][0].size
        local = {r: sum(1 for rec in recs if rec.holds(serving.name)) for r, recs in records.items()}
        image = base / "qemu-nbd.raw"
        with open(image, "wb") as f:
            f.truncate(size)
        qemu = QemuNbd(image, ctx.tmp_dir / "qemu-nbd.sock", ctx.tmp_dir / "qemu-nbd.log")

        targets: list[tuple[Any, str, dict[str, list[int]]]] = [
            (None, qemu.uri, {"qemu_nbd": [qemu.proc.pid]})]
        targets += [(r, serving.uri(vols[r]), {"daemon": [serving.pid], "peers": peers})
                    for r in REPLICAS]

        def check_records(what: str) -> None:
            cluster.check_alive()
            for r, name in vols.items():
                now = cluster.extent_records(name)
                if now != records[r]:
                    changed = [f"{a.index}: gen {a.generation}->{b.generation} {[x.node for x in b.replicas]}"
                               for a, b in zip(records[r], now) if a != b]
                    raise RuntimeError(f"volume {name} changed during {what} (replica dropped?): "
                                       f"{changed}")

        prefill: dict[Any, float] = {}
        for r, uri, _pids in targets:
            t0 = time.perf_counter()
            run_fio(uri, "prefill", "write", "1m", 4, size)
            prefill[r] = size / MiB / (time.perf_counter() - t0)
            _log(f"prefill {'qemu-nbd' if r is None else f'r{r}'}: {prefill[r]:.0f} MiB/s")
        check_records("the prefill")

        common = {"fio": version, "volume_MiB": size // MiB, "runtime_s": runtime, "ramp_s": 1,
                  "extent_MiB": extent_size // MiB, "nodes": 3, "cores": os.cpu_count()}
        metrics = []
        for job, rw, bs, depth, direction, unit in JOBS:
            base_value = None
            base_params: dict[str, Any] = {}
            for r, uri, pids in targets:
                with _Meter(pids) as meter:
                    out = run_fio(uri, job, rw, bs, depth, size, runtime)
                d = out[direction]
                value = d["iops"] if unit == "IOPS" else d["bw_bytes"] / MiB
                lat = {"p50_us": round(_pct(out, direction, "50.000000"), 1),
                       "p99_us": round(_pct(out, direction, "99.000000"), 1)}
                _log(f"{job} {'qemu-nbd' if r is None else f'r{r}'}: {value:,.1f} {unit} "
                     f"{meter.result} {lat}")
                if r is None:
                    base_value = value
                    base_params = {"qemu_nbd_cpu_pct": meter.result["qemu_nbd_cpu_pct"],
                                   "qemu_nbd_p50_us": lat["p50_us"],
                                   "qemu_nbd_machine_busy_pct": meter.result["machine_busy_pct"]}
                    continue
                params: dict[str, Any] = {
                    "replicas": r, "bs": bs, "iodepth": depth, **meter.result, **lat, **base_params,
                    "local_extents": f"{local[r]}/{len(records[r])}", **common}
                if job == "write_1m":
                    params["prefill_MiBps"] = round(prefill[r], 1)
                    params["qemu_nbd_prefill_MiBps"] = round(prefill[None], 1)
                if (job, r) in GOALS:
                    goal = GOALS[(job, r)]
                    params["goal"] = f">= {goal:.2f} of qemu-nbd"
                    params["goal_met"] = bool(base_value and value / base_value >= goal)
                metrics.append(Metric(f"{job}_r{r}", value, unit, f"qemu_nbd_{job}", base_value, True,
                                      params))
            check_records(job)
        return metrics
    finally:
        if qemu is not None:
            qemu.stop()
        cluster.stop()


# -- peer protocol: Braid framing vs a gRPC stream ----------------------------------

PEER_NODE = "peer-bench"
PEER_VOLUME = "peerbench"
PEER_UID = "5f0b8c1e-2a3d-4e5f-8a9b-0c1d2e3f4a5b"
PEER_EXTENT = 64 * MiB
PEER_GRPC_METHOD = "/braid.bench.PeerBench/Stream"
BLOCK = 4096


def _peer_record() -> X.ExtentRecord:
    return X.ExtentRecord(PEER_VOLUME, PEER_UID, 0, PEER_EXTENT, 1, (X.Replica(PEER_NODE, "d1"),))


class _QueueWriter:
    """What StorageNode._serve replies into, for the gRPC stream (one reply per item)."""

    def __init__(self, queue: asyncio.Queue):
        self.queue = queue

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.queue.put_nowait(bytes(data))

    def writelines(self, parts) -> None:
        self.queue.put_nowait(b"".join(parts))


def _grpc_peer_handler(sn):
    """The gRPC side of the peer server: one bidirectional stream per client;
    requests read with ``context.read`` (each served by its own task, as in
    StorageNode.dispatch), replies written in completion order by one sender task
    (grpc.aio allows one write in flight per call)."""
    from storage_daemon import peer as P

    async def stream(request_iterator, context):
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue = asyncio.Queue()
        writer = _QueueWriter(replies)
        tasks: set[asyncio.Task] = set()

        async def send() -> None:
            while (item := await replies.get()) is not None:
                await context.write(item)

        sender = loop.create_task(send())
        try:
            while (msg := await context.read()) is not grpc.aio.EOF:
                op, flags, nlen, req_id, gen, uid, index, length, offset = \
                    P.decode_request_head(msg[:P.REQ.size])
                name = msg[P.REQ.size:P.REQ.size + nlen].decode()
                payload = memoryview(msg)[P.REQ.size + nlen:] if op == P.OP_WRITE else b""
                t = loop.create_task(sn._serve(writer, op, flags, req_id, gen, name, uid, index,
                                               length, offset, payload))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(list(tasks))
            replies.put_nowait(None)
            await sender
        finally:
            sender.cancel()
            for t in list(tasks):
                t.cancel()

    return grpc.method_handlers_generic_handler("braid.bench.PeerBench", {
        "Stream": grpc.stream_stream_rpc_method_handler(stream, request_deserializer=None,
                                                        response_serializer=None)})


async def _peer_serve(root: Path) -> None:
    from storage_daemon.datapath import ExtentView, StorageNode
    from storage_daemon.extent_store import DiskStore

    rec = _peer_record()
    disk = DiskStore(root / "d1", "d1")
    view = ExtentView()
    view.put(rec, 1)
    sn = StorageNode(PEER_NODE, {"d1": disk}, view, lambda node: None,
                     lambda v, i: (rec, 1) if (v, i) == (rec.volume, rec.index) else (None, 0),
                     lambda old, new: False)
    tcp = await sn.serve_peers("127.0.0.1", 0)
    gsrv = grpc.aio.server()
    gsrv.add_generic_rpc_handlers((_grpc_peer_handler(sn),))
    gport = gsrv.add_insecure_port("127.0.0.1:0")
    await gsrv.start()
    print(json.dumps({"braid": f"127.0.0.1:{tcp.sockets[0].getsockname()[1]}",
                      "grpc": f"127.0.0.1:{gport}"}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes it
    await gsrv.stop(0)
    tcp.close()
    disk.close()


def peer_server_main(root: str) -> None:
    """The server process of peer_protocol: prints its two addresses as JSON,
    serves until its stdin closes."""
    import uvloop

    uvloop.run(_peer_serve(Path(root)))


class _GrpcPeer:
    """A pipelined client on one gRPC bidirectional stream, like PeerClient:
    ``call.write`` under a lock (grpc.aio allows one write in flight per
    call), one reader task resolving futures by request id."""

    def __init__(self, address: str):
        from storage_daemon import peer as P

        self.P = P
        self.channel = grpc.aio.insecure_channel(address)
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.lock = asyncio.Lock()
        method = self.channel.stream_stream(PEER_GRPC_METHOD, request_serializer=None,
                                            response_deserializer=None)
        self.call = method()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        P = self.P
        err: Exception = ConnectionError("gRPC stream ended")
        try:
            while (rep := await self.call.read()) is not grpc.aio.EOF:
                magic, status, req_id, gen, length = P.REP.unpack_from(rep)
                fut = self.pending.pop(req_id, None)
                if fut is None or fut.done():
                    continue
                if status:
                    fut.set_exception(P.PeerError(status, gen, bytes(rep[P.REP.size:]).decode()))
                else:
                    fut.set_result((gen, rep[P.REP.size:]))
        except grpc.aio.AioRpcError as exc:
            err = ConnectionError(f"gRPC stream failed: {exc.code()} {exc.details()}")
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(err)

    async def call_write(self, offset: int, payload: bytes) -> tuple[int, bytes]:
        P = self.P
        req_id = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[req_id] = fut
        msg = b"".join(P.encode_request(P.Request(P.OP_WRITE, 0, req_id, 1, PEER_VOLUME, PEER_UID, 0,
                                                  len(payload), offset, payload)))
        async with self.lock:
            await self.call.write(msg)
        return await fut

    async def close(self) -> None:
        try:
            async with self.lock:
                await self.call.done_writing()
            await asyncio.wait_for(self.reader, 10)
        finally:
            self.reader.cancel()
            await self.channel.close()


async def _pipelined(call: Callable[[int], Any], n: int, depth: int) -> float:
    """n calls with ``depth`` in flight; returns seconds."""
    counter = itertools.count()

    async def worker() -> None:
        while (i := next(counter)) < n:
            await call(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(depth)))
    return time.perf_counter() - t0


async def _one_by_one(call: Callable[[int], Any], n: int) -> list[float]:
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        lat.append(time.perf_counter() - t0)
    return lat


async def _peer_client(addresses: dict[str, str], server_pid: int, rounds: int, n_qd16: int,
                       n_qd1: int) -> dict[str, dict[str, list[float]]]:
    from storage_daemon import peer as P

    payload = os.urandom(BLOCK)
    blocks = PEER_EXTENT // BLOCK
    braid = P.PeerClient(PEER_NODE, addresses["braid"])
    grpc_peer = _GrpcPeer(addresses["grpc"])

    async def braid_call(i: int):
        return await braid.call(P.OP_WRITE, PEER_VOLUME, PEER_UID, 0, 1, (i % blocks) * BLOCK,
                                payload=payload)

    async def grpc_call(i: int):
        return await grpc_peer.call_write((i % blocks) * BLOCK, payload)

    calls = {"braid": braid_call, "grpc": grpc_call}
    out: dict[str, dict[str, list[float]]] = {k: {"qd16_per_s": [], "qd1_median_us": [],
                                                  "qd1_p99_us": [], "client_cpu_us": [],
                                                  "server_cpu_us": []} for k in calls}
    try:
        for call in calls.values():  # warm-up: connections, replica file open, code paths
            await _pipelined(call, 2000, 16)
            await _one_by_one(call, 200)
        for rnd in range(rounds):
            order = list(calls) if rnd % 2 == 0 else list(reversed(calls))
            for kind in order:
                call, res = calls[kind], out[kind]
                c0, s0 = time.process_time(), cpu_seconds(server_pid)
                secs = await _pipelined(call, n_qd16, 16)
                res["client_cpu_us"].append((time.process_time() - c0) / n_qd16 * 1e6)
                res["server_cpu_us"].append((cpu_seconds(server_pid) - s0) / n_qd16 * 1e6)
                res["qd16_per_s"].append(n_qd16 / secs)
                lat = sorted(await _one_by_one(call, n_qd1))
                res["qd1_median_us"].append(statistics.median(lat) * 1e6)
                res["qd1_p99_us"].append(lat[max(0, -(-99 * len(lat) // 100) - 1)] * 1e6)
                _log(f"peer round {rnd} {kind}: {res['qd16_per_s'][-1]:,.0f} writes/s at qd16, "
                     f"{res['qd1_median_us'][-1]:.0f} us at qd1")
    finally:
        await braid.close()
        await grpc_peer.close()
    return out


def _peer_metrics(ctx: SectionContext, base: Path) -> list[Metric]:
    import uvloop

    rounds = 3 if ctx.quick else 5
    n_qd16 = 5000 if ctx.quick else 20000
    n_qd1 = 1000 if ctx.quick else 3000
    root = base / "peer-server"
    root.mkdir()
    cmd = [sys.executable, "-c",
           f"from bench.sections.storage import peer_server_main; peer_server_main({str(root)!r})"]
    log = ctx.tmp_dir / "peer-server.log"
    with open(log, "ab") as f:
        server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f,
                                  cwd=str(ROOT), start_new_session=True)
    try:
        if not select.select([server.stdout], [], [], 60)[0]:
            raise TimeoutError(f"peer server silent for 60 s: {log.read_text(errors='replace')[-2000:]}")
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"peer server exited ({server.wait(5)}): "
                               f"{log.read_text(errors='replace')[-2000:]}")
        addresses = json.loads(line)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            res = runner.run(_peer_client(addresses, server.pid, rounds, n_qd16, n_qd1))
    finally:
        try:
            server.stdin.close()  # the server's signal to stop
            server.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            server.kill()
            server.wait(5)
        server.stdout.close()

    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in res.items()}
    b, g = med["braid"], med["grpc"]
    common = {"rounds": rounds, "payload_bytes": BLOCK, "loop": f"uvloop {uvloop.__version__}",
              "grpc": grpc.__version__, "transport": "loopback TCP, 2 processes",
              "server": "StorageNode._serve (replica pwrite + crc)"}
    return [
        Metric("peer_write_4k_qd16_per_s", b["qd16_per_s"], "writes/s",
               "grpc_stream_write_4k_qd16_per_s", g["qd16_per_s"], True,
               {**common, "writes_per_round": n_qd16, "in_flight": 16,
                "client_cpu_us_per_write": round(b["client_cpu_us"], 1),
                "server_cpu_us_per_write": round(b["server_cpu_us"], 1),
                "grpc_client_cpu_us_per_write": round(g["client_cpu_us"], 1),
                "grpc_server_cpu_us_per_write": round(g["server_cpu_us"], 1),
                "rounds_per_s": "/".join(f"{v:.0f}" for v in res["braid"]["qd16_per_s"]),
                "grpc_rounds_per_s": "/".join(f"{v:.0f}" for v in res["grpc"]["qd16_per_s"])}),
        Metric("peer_write_4k_qd1_us", b["qd1_median_us"], "us",
               "grpc_stream_write_4k_qd1_us", g["qd1_median_us"], False,
               {**common, "writes_per_round": n_qd1, "in_flight": 1,
                "p99_us": round(b["qd1_p99_us"], 1), "grpc_p99_us": round(g["qd1_p99_us"], 1)}),
    ]


# -- the section -----------------------------------------------------------------

def run(ctx: SectionContext) -> list[Metric]:
    missing = [t for t in ("fio", "qemu-nbd") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"not installed: {', '.join(missing)} (scripts/setup.sh installs them)")
    base = Path(tempfile.mkdtemp(prefix="braid-bench-storage-", dir=DISK_PARENT))
    try:
        metrics = _peer_metrics(ctx, base)
        return _nbd_metrics(ctx, base) + metrics
    finally:
        shutil.rmtree(base, ignore_errors=True)
