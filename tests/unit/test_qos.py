"""Per-volume QoS token buckets (fake clock)."""

from __future__ import annotations

from storage_daemon.qos import TokenBucket, VolumeQos


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_bucket_rate_burst_and_debt():
    c = Clock()
    b = TokenBucket(100, c)          # 100/s, starts empty
    assert abs(b.take(1) - 0.01) < 1e-9   # must wait for the token
    c.t += 1.0                       # a second refills at most one second's worth
    assert b.take(99) == 0.0
    c.t += 10.0
    assert b.take(100) == 0.0 and abs(b.take(1) - 0.01) < 1e-9
    c.t += 1.0
    assert abs(b.take(250) - 1.51) < 1e-9  # 99 refilled (1 was owed): debt of 151, 1.51 s


def test_unlimited_and_live_change():
    c = Clock()
    q = VolumeQos(0, 0, c)
    assert not q.limited and q.delay(1 << 20) == 0
    q.set(0, 1 << 20)                # 1 MiB/s
    c.t += 5
    assert q.delay(1 << 20) == 0.0   # one second of burst
    assert abs(q.delay(512 << 10) - 0.5) < 1e-9
    q.set(0, 0)
    assert q.delay(1 << 30) == 0.0


def test_iops_over_a_simulated_second_never_exceed_the_limit():
    c = Clock()
    q = VolumeQos(200, 0, c)
    c.t += 1.0
    done = 0
    start = c.t
    while c.t - start < 10:
        c.t += q.delay(4096)
        done += 1
    assert done <= 200 * 10 + 200    # rate x time + one second of burst
    assert done >= 200 * 10
