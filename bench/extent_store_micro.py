"""Micro-benchmark of storage_daemon.extent_store: ReplicaFile read/write throughput.

Not a bench section (it measures one module in isolation, in-process):

    .venv/bin/python -m bench.extent_store_micro [--dir /dev/shm --dir /var/tmp] [--extent-mib 64]

For every directory it creates a scratch DiskStore with one extent and measures

* 1 MiB sequential writes and reads over the whole extent,
* 4 KiB random writes (overwrites, and into a fresh thin extent, i.e. into holes) and reads,
* 512 B random writes (read-modify-write of the boundary block),
* the same 4 KiB / 1 MiB patterns with bare os.pwrite/os.preadv (no checksums, no store)
  as the baseline, and the fdatasync of the whole dirty extent.

Writes land in the page cache (the store's contract: durable only after sync()), so
the numbers are CPU/memory bound; on a disk directory the filesystem's allocation
paths show up too.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from storage_daemon.extent_store import BLOCK, DiskStore  # noqa: E402

MiB = 1 << 20


def timed(fn, ops: int, nbytes: int) -> tuple[float, float, float]:
    """Run fn() (which does ``ops`` operations moving ``nbytes``); best of 3:
    (ops/s, MiB/s, microseconds per op)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return ops / best, nbytes / best / MiB, best / ops * 1e6


def bench_dir(base: Path, extent: int, random_ops: int) -> list[tuple[str, float, float, float]]:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="braid-extent-bench-", dir=base))
    try:
        with DiskStore(work / "disk", "bench", max_open_replicas=4) as store:
            rf = store.open_replica("bench", 0, extent, 1, create=True)
            rng = random.Random(42)
            big = memoryview(bytearray(rng.randbytes(MiB)))
            small = memoryview(bytearray(rng.randbytes(BLOCK)))
            offsets = [rng.randrange(extent // BLOCK) * BLOCK for _ in range(random_ops)]
            unaligned = [rng.randrange(extent - 512) for _ in range(random_ops)]
            rbuf = memoryview(bytearray(MiB))
            sbuf = memoryview(bytearray(BLOCK))

            def seq_write():
                for off in range(0, extent, MiB):
                    rf.write(off, big)

            def seq_read():
                for off in range(0, extent, MiB):
                    rf.readinto(off, rbuf)

            def rand_write():
                w = rf.write
                for off in offsets:
                    w(off, small)

            def rand_read():
                r = rf.readinto
                for off in offsets:
                    r(off, sbuf)

            def rand_write_512():
                w = rf.write
                part = small[:512]
                for off in unaligned:
                    w(off, part)

            fresh = store.open_replica("bench", 1, extent, 1, create=True)
            fresh_offsets = offsets[:extent // BLOCK // 2]

            def rand_write_holes():  # every round on a just-trimmed (all holes) extent
                fresh.trim(0, extent)
                for off in fresh_offsets:
                    fresh.write(off, small)

            n_seq = extent // MiB
            rows.append(("write 1 MiB seq", *timed(seq_write, n_seq, extent)))
            rows.append(("read  1 MiB seq", *timed(seq_read, n_seq, extent)))
            rows.append(("write 4 KiB rand (overwrite)", *timed(rand_write, random_ops, random_ops * BLOCK)))
            rows.append(("write 4 KiB rand (into holes)",
                         *timed(rand_write_holes, len(fresh_offsets), len(fresh_offsets) * BLOCK)))
            rows.append(("read  4 KiB rand", *timed(rand_read, random_ops, random_ops * BLOCK)))
            rows.append(("write 512 B rand (RMW)", *timed(rand_write_512, random_ops, random_ops * 512)))

            rf.write(0, big)  # dirty the extent again, then time the flush of everything
            seq_write()
            t0 = time.perf_counter()
            rf.sync()
            dt = time.perf_counter() - t0
            rows.append(("sync (fdatasync) of dirty extent", 1 / dt, extent / dt / MiB, dt * 1e6))

            # Baseline: the same I/O with bare syscalls on a plain sparse file, no checksums.
            fd = os.open(work / "raw", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, extent)

                def raw_seq_write():
                    for off in range(0, extent, MiB):
                        os.pwrite(fd, big, off)

                def raw_seq_read():
                    for off in range(0, extent, MiB):
                        os.preadv(fd, [rbuf], off)

                def raw_rand_write():
                    for off in offsets:
                        os.pwrite(fd, small, off)

                def raw_rand_read():
                    for off in offsets:
                        os.preadv(fd, [sbuf], off)

                rows.append(("baseline pwrite 1 MiB seq", *timed(raw_seq_write, n_seq, extent)))
                rows.append(("baseline preadv 1 MiB seq", *timed(raw_seq_read, n_seq, extent)))
                rows.append(("baseline pwrite 4 KiB rand", *timed(raw_rand_write, random_ops,
                                                                  random_ops * BLOCK)))
                rows.append(("baseline preadv 4 KiB rand", *timed(raw_rand_read, random_ops,
                                                                  random_ops * BLOCK)))
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", action="append", type=Path,
                   help="directory to benchmark in (repeatable; default /dev/shm and /var/tmp)")
    p.add_argument("--extent-mib", type=int, default=64)
    p.add_argument("--random-ops", type=int, default=100_000)
    args = p.parse_args(argv)
    for d in args.dir or [Path("/dev/shm"), Path("/var/tmp")]:
        fs = os.statvfs(d)
        print(f"\n{d}  ({fs.f_bavail * fs.f_frsize / 2**30:.0f} GiB free), extent {args.extent_mib} MiB")
        print(f"  {'':36s} {'ops/s':>10s} {'MiB/s':>9s} {'us/op':>8s}")
        for name, ops, mibs, us in bench_dir(d, args.extent_mib * MiB, args.random_ops):
            print(f"  {name:36s} {ops:10.0f} {mibs:9.0f} {us:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
