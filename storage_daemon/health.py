"""Disk health: a periodic probe per disk (write 4 KiB + fdatasync).

Verdicts, reported in the DiskPool status (``health``, ``avg_latency_ms``):

* ``Healthy``;
* ``Slow``: the average probe latency over the last ``window`` probes is
  above ``slow_ms`` (reference: 125 ms);
* ``Isolated``: a probe has not answered for ``stuck_s`` seconds (reference:
  10 s) — the disk hangs;
* ``Failed``: the probe got an I/O error.

The controller places new extents only on Healthy disks. (Moving I/O and
rebuilding the extents of a non-Healthy disk elsewhere is the rebuild work
of the storage-resilience issue.) The probe runs in its own thread, so a
hung disk blocks the probe, never the caller.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

SLOW_MS = 125.0
STUCK_S = 10.0


def probe_file(root: Path) -> Callable[[], None]:
    """The real probe: rewrite and fdatasync ``<root>/.probe``."""
    path = Path(root) / ".probe"
    block = b"braid-probe\n".ljust(4096, b"\0")

    def probe() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    return probe


class DiskHealth:
    def __init__(self, probe: Callable[[], None], window: int = 5, slow_ms: float = SLOW_MS,
                 stuck_s: float = STUCK_S, clock: Callable[[], float] = time.monotonic):
        self.probe = probe
        self.slow_ms = slow_ms
        self.stuck_s = stuck_s
        self.clock = clock
        self.latencies: deque[float] = deque(maxlen=window)
        self.error = ""
        self._started: float | None = None   # a probe in flight since
        self._lock = threading.Lock()

    def _run(self) -> None:
        t0 = self.clock()
        try:
            self.probe()
            err = ""
        except OSError as exc:
            err = str(exc) or type(exc).__name__
        with self._lock:
            self.latencies.append((self.clock() - t0) * 1000)
            self.error = err
            self._started = None

    def tick(self) -> None:
        """Start a probe unless one is still in flight (a hung disk keeps one)."""
        with self._lock:
            if self._started is not None:
                return
            self._started = self.clock()
        threading.Thread(target=self._run, name="disk-probe", daemon=True).start()

    @property
    def avg_latency_ms(self) -> float:
        with self._lock:
            return sum(self.latencies) / len(self.latencies) if self.latencies else 0.0

    def verdict(self) -> tuple[str, str]:
        """(health, why)."""
        with self._lock:
            started, err = self._started, self.error
            lat = list(self.latencies)
        if started is not None and self.clock() - started >= self.stuck_s:
            return "Isolated", f"no answer from the disk for {self.clock() - started:.0f}s"
        if err:
            return "Failed", f"I/O error: {err}"
        avg = sum(lat) / len(lat) if lat else 0.0
        if lat and avg > self.slow_ms:
            return "Slow", f"average latency {avg:.0f} ms over {len(lat)} probes (limit {self.slow_ms:.0f} ms)"
        return "Healthy", ""
