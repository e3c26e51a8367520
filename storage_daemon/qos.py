"""Per-volume QoS: IOPS and bandwidth limits with token buckets.

Each served volume has two buckets (operations and bytes), refilled at the
limit's rate and holding at most one second of it. A request takes its
tokens and may leave a bucket in debt (so a 1 MiB write under a 512 KiB/s
limit passes, and the next request waits until the debt is paid); it waits
as long as the emptier bucket needs. Limits come from ``spec.qos`` of the
volume and change live (``braid apply`` / Update): a new limit applies to
the next request. 0 means unlimited. The limits are per node that serves the
volume (normally one: the node running its VM).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable


class TokenBucket:
    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.rate = 0.0
        self.tokens = 0.0
        self.stamp = clock()
        self.set_rate(rate)

    def set_rate(self, rate: float) -> None:
        self._refill()
        self.rate = max(0.0, float(rate))
        self.tokens = min(self.tokens, self.rate) if self.rate else 0.0

    def _refill(self) -> None:
        now = self.clock()
        if self.rate:
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float) -> float:
        """Take ``amount`` tokens; returns the seconds to wait before the
        request may go (0: at once). Unlimited buckets never wait."""
        if not self.rate:
            return 0.0
        self._refill()
        self.tokens -= amount
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class VolumeQos:
    def __init__(self, iops: int = 0, bytes_per_second: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.ops = TokenBucket(iops, clock)
        self.bytes = TokenBucket(bytes_per_second, clock)
        self.throttled = 0       # requests that had to wait
        self.waited = 0.0        # seconds waited in total

    def set(self, iops: int, bytes_per_second: int) -> None:
        if iops != self.ops.rate:
            self.ops.set_rate(iops)
        if bytes_per_second != self.bytes.rate:
            self.bytes.set_rate(bytes_per_second)

    @property
    def limited(self) -> bool:
        return bool(self.ops.rate or self.bytes.rate)

    def delay(self, nbytes: int) -> float:
        return max(self.ops.take(1), self.bytes.take(nbytes))

    async def admit(self, nbytes: int) -> None:
        """Wait until a request of ``nbytes`` may go."""
        if not self.limited:
            return
        wait = self.delay(nbytes)
        if wait > 0:
            self.throttled += 1
            self.waited += wait
            await asyncio.sleep(wait)
