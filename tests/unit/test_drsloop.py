"""The scheduler leader's DRS round: measurements -> hot nodes -> recommendations
published -> (automatic mode) moves carried out, one per source node."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from scheduler.drsloop import KEY, DrsLoop
from scheduler.plan import NodeInfo, Policy, VMRequest


class FakeBinder:
    def __init__(self):
        self._lock = threading.Lock()
        self.policy = Policy()
        self.nodes = {n: NodeInfo(n, cpus=8, memory_mib=16384) for n in ("a", "b", "c")}
        self.vms = {}
        for vm in ("v1", "v2", "v3"):
            req = VMRequest(vm, 2, 1024)
            self.vms[vm] = ("a", req, False, 0)
            self.nodes["a"].add(req)
        self.measured = {"a": (0.95, 8, 4096, {"v1": 2.0, "v2": 2.0, "v3": 2.0}),
                         "b": (0.10, 8, 1024, {}), "c": (0.20, 8, 1024, {})}
        self.puts = []
        self.moves = []
        self.store = SimpleNamespace(put=lambda key, value, guards=(): self.puts.append((key, value)))
        self.election = SimpleNamespace(is_leader=True, guard=lambda: "guard")

    def move(self, vm, source, target, why):
        self.moves.append((vm, source, target))
        return True


def test_manual_mode_recommends_only_after_the_window():
    b = FakeBinder()
    loop = DrsLoop(b, "manual", 0.8, "aggressive", interval=1, window_s=10)
    assert not loop.tick(0.0).moves            # hot for 0 s: not yet
    rec = loop.tick(11.0)
    assert list(rec.hot) == ["a"] and rec.moves and all(m.source == "a" for m in rec.moves)
    assert b.puts and b.puts[-1][0] == KEY and b.moves == []   # manual: published, not executed
    n = len(b.puts)
    loop.tick(12.0)
    assert len(b.puts) == n                    # unchanged plan: not rewritten


def test_automatic_mode_moves_one_vm_per_source_per_round():
    b = FakeBinder()
    b.measured["a"] = (1.0, 8, 4096, {"v1": 3.0, "v2": 3.0, "v3": 2.0})
    loop = DrsLoop(b, "automatic", 0.8, "aggressive", interval=1, window_s=1)
    loop.tick(0.0)
    rec = loop.tick(2.0)
    assert len(rec.moves) >= 1
    assert len(b.moves) == 1 and b.moves[0][1] == "a"


def test_bad_settings_are_refused():
    import pytest
    with pytest.raises(ValueError):
        DrsLoop(None, "sometimes")
    with pytest.raises(ValueError):
        DrsLoop(None, "manual", threshold=0.95)
    with pytest.raises(ValueError):
        DrsLoop(None, "manual", window="lazy")
