"""Per-client limits on the API: a token bucket per client for the call
rate, and a cap on the streams (watches) a client holds open at once.

Both keep their per-key state in bounded maps: the rate limiter forgets the
least recently seen client beyond ``max_keys`` (it starts again with a full
bucket: the bound is on memory, not a hole an attacker can use for more
than one burst per key); the stream limiter holds a key only while it has
streams open.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from braid.clock import Clock, RealClock


class RateLimiter:
    """Token buckets: each key may make ``burst`` calls at once and
    ``rate`` calls per second sustained."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10000, clock: Clock | None = None):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock or RealClock()
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()   # key -> [tokens, last refill]

    def allow(self, key: str, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False if it has too few."""
        now = self.clock.now()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = [self.burst, now]
                while len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
                b[1] = now
            if b[0] >= cost:
                b[0] -= cost
                return True
            return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)


class StreamLimiter:
    """At most ``limit`` concurrent streams per key (a watch holds a server
    thread for its whole life: without a cap, one client can take them all)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.limit:
                return False
            self._open[key] = n + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            n = self._open.get(key, 0) - 1
            if n > 0:
                self._open[key] = n
            else:
                self._open.pop(key, None)

    def open_streams(self, key: str) -> int:
        with self._lock:
            return self._open.get(key, 0)
