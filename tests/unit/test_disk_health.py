"""Disk health verdicts from probes (fake clock, fake probes; the probe thread is real)."""

from __future__ import annotations

import threading
import time

from storage_daemon.health import DiskHealth, probe_file


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def settle(h: DiskHealth) -> None:
    for _ in range(200):
        if h._started is None:
            return
        time.sleep(0.005)


def test_healthy_slow_failed_and_recovered():
    c = Clock()
    delay = {"ms": 1.0, "err": None}

    def probe():
        c.t += delay["ms"] / 1000
        if delay["err"]:
            raise OSError(5, delay["err"])
    h = DiskHealth(probe, window=3, clock=c)
    h.tick()
    settle(h)
    assert h.verdict() == ("Healthy", "")
    delay["ms"] = 300.0
    for _ in range(3):
        h.tick()
        settle(h)
    health, why = h.verdict()
    assert health == "Slow" and "300 ms" in why and h.avg_latency_ms > 125
    delay["err"] = "Input/output error"
    h.tick()
    settle(h)
    assert h.verdict()[0] == "Failed"
    delay["err"], delay["ms"] = None, 1.0
    for _ in range(3):
        h.tick()
        settle(h)
    assert h.verdict() == ("Healthy", "")


def test_a_hung_disk_is_isolated_and_probed_once():
    c = Clock()
    release = threading.Event()
    calls = []

    def probe():
        calls.append(1)
        release.wait(5)
    h = DiskHealth(probe, clock=c)
    h.tick()
    c.t += 5
    assert h.verdict()[0] == "Healthy"      # slow to answer, not yet stuck
    c.t += 6
    h.tick()                                 # no second probe while one hangs
    health, why = h.verdict()
    assert health == "Isolated" and "11s" in why and len(calls) == 1
    release.set()
    settle(h)
    assert h._started is None


def test_the_real_probe_writes_and_syncs(tmp_path):
    probe_file(tmp_path)()
    assert (tmp_path / ".probe").stat().st_size == 4096
