"""The extent map: record validation, keys, the placement planner and the
volume status it implies (pure functions)."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from braid import extents as X
from braid.v1 import node_pb2, storage_pb2
from controller.volumes import export_uris, volume_status

MiB, GiB = 1 << 20, 1 << 30
UID = "0b9c4a5e-6f1d-4e2a-9b3c-1d2e3f4a5b6c"


def rec(index=0, gen=1, nodes=("n1", "n2"), dropped=()):
    return X.ExtentRecord("vol1", UID, index, 64 * MiB, gen, tuple(X.Replica(n, "d1") for n in nodes),
                          tuple(dropped))


def test_record_round_trip_and_key():
    r = rec(index=7, gen=3, dropped=(X.Dropped("n3", "d2", 2, "timeout"),))
    assert X.ExtentRecord.from_json(r.to_json()) == r
    assert r.key == "extent/vol1/000007"
    assert X.parse_key(r.key) == ("vol1", 7)
    assert X.parse_key("extent/vol1") is None and X.parse_key("volume/spec/x") is None


@pytest.mark.parametrize("raw, why", [
    (b"{", "not JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"volume": "v", "uid": "u", "index": 0, "size": 4096, "generation": 1,
                 "replicas": "n1"}).encode(), "replicas"),
    (json.dumps({"volume": "v", "uid": "u", "index": 0, "size": 4095, "generation": 1,
                 "replicas": []}).encode(), "size"),
    (json.dumps({"volume": "v", "uid": "u", "index": 0, "size": 4096, "generation": 0,
                 "replicas": []}).encode(), "generation"),
    (json.dumps({"volume": "v", "uid": "u", "index": 0, "size": 4096, "generation": True,
                 "replicas": []}).encode(), "generation"),
    (json.dumps({"volume": "v", "uid": "u", "index": 0, "size": 4096, "generation": 1,
                 "replicas": [{"node": "a", "disk": "d"}, {"node": "a", "disk": "e"}]}).encode(), "two"),
    (json.dumps({"volume": "", "uid": "u", "index": 0, "size": 4096, "generation": 1,
                 "replicas": []}).encode(), "volume"),
])
def test_bad_records_are_refused_with_the_reason(raw, why):
    with pytest.raises(X.BadRecord, match=why):
        X.ExtentRecord.from_json(raw)


def test_without_bumps_generation_and_remembers_the_dropped():
    r = rec(gen=4, nodes=("n1", "n2", "n3"))
    d = r.without([X.Replica("n2", "d1")], "no answer")
    assert d.generation == 5
    assert [x.node for x in d.replicas] == ["n1", "n3"]
    assert d.dropped == (X.Dropped("n2", "d1", 4, "no answer", d.dropped[0].at),)
    assert abs(d.dropped[0].at - time.time()) < 60
    assert d.holds("n2") is None and d.holds("n1") == X.Replica("n1", "d1")
    # dropping it again later replaces the old entry (one per replica)
    assert len(d.without([X.Replica("n3", "d1")], "x").dropped) == 2


def test_extent_arithmetic():
    assert X.extent_count(GiB, 64 * MiB) == 16
    assert X.extent_count(GiB + 1, 64 * MiB) == 17
    assert X.extent_length(100 * MiB, 64 * MiB, 1) == 36 * MiB
    assert X.extent_length(100 * MiB, 64 * MiB, 2) == 0


def disks(free_by_node: dict[str, list[int]], spare=()):
    return [X.DiskCandidate(n, f"d{i}", f, (n, f"d{i}") in spare)
            for n, frees in free_by_node.items() for i, f in enumerate(frees, 1)]


def test_place_uses_distinct_nodes_and_balances():
    plan = X.place(list(range(30)), 2, 64 * MiB, disks({"a": [10 * GiB], "b": [10 * GiB], "c": [10 * GiB]}))
    assert len(plan) == 30
    for reps in plan.values():
        assert len({r.node for r in reps}) == 2
    per_node = {n: sum(1 for reps in plan.values() for r in reps if r.node == n) for n in "abc"}
    assert max(per_node.values()) - min(per_node.values()) <= 1, per_node


def test_place_prefers_free_space_and_picks_the_emptiest_disk_of_a_node():
    plan = X.place([0], 2, 64 * MiB, disks({"a": [1 * GiB, 5 * GiB], "b": [2 * GiB], "c": [9 * GiB]}))
    assert set(plan[0]) == {X.Replica("c", "d1"), X.Replica("a", "d2")}


def test_place_keeps_hot_spares_out():
    d = disks({"a": [GiB], "b": [GiB], "c": [100 * GiB]}, spare={("c", "d1")})
    plan = X.place(list(range(4)), 2, 64 * MiB, d)
    assert all(r.node != "c" for reps in plan.values() for r in reps)


def test_place_refuses_too_few_nodes_or_space():
    with pytest.raises(X.PlacementError, match="3 replicas need 3 nodes"):
        X.place([0], 3, 64 * MiB, disks({"a": [GiB], "b": [GiB, GiB]}))
    with pytest.raises(X.PlacementError, match="not enough free space"):
        X.place(list(range(20)), 2, 64 * MiB, disks({"a": [GiB], "b": [GiB]}))


def test_place_is_exhaustively_valid_for_small_clusters():
    for n_nodes, replicas in itertools.product(range(1, 6), range(1, 4)):
        d = disks({f"n{i}": [4 * GiB, 2 * GiB] for i in range(n_nodes)})
        if n_nodes < replicas:
            with pytest.raises(X.PlacementError):
                X.place([0], replicas, 64 * MiB, d)
            continue
        plan = X.place(list(range(16)), replicas, 64 * MiB, d, seed="s")
        for reps in plan.values():
            assert len(reps) == replicas and len({r.node for r in reps}) == replicas


def vol(size=4 * 64 * MiB, replicas=2):
    v = storage_pb2.Volume()
    v.metadata.name, v.metadata.uid, v.metadata.generation = "vol1", UID, 3
    v.spec.size_bytes, v.spec.replicas, v.spec.extent_size_bytes = size, replicas, 64 * MiB
    return v


def test_status_healthy_degraded_failed_pending():
    records = {i: rec(i) for i in range(4)}
    st = volume_status(vol(), records, {}, "", [])
    assert (st.phase, st.extents, st.healthy_extents, st.observed_generation) == ("Healthy", 4, 4, 3)

    records[2] = rec(2, gen=2, nodes=("n1",), dropped=(X.Dropped("n2", "d1", 1, "timeout"),))
    st = volume_status(vol(), records, {}, "", [])
    assert st.phase == "Degraded" and st.healthy_extents == 3 and "n2" in st.message

    records[3] = rec(3, gen=3, nodes=())
    assert volume_status(vol(), records, {}, "", []).phase == "Failed"

    st = volume_status(vol(size=5 * 64 * MiB), {i: rec(i) for i in range(4)}, {}, "cannot place: x", [])
    assert st.phase == "Pending" and st.message == "cannot place: x"


def test_status_allocated_counts_each_extent_once():
    records = {i: rec(i) for i in range(2)}
    usage = {"n1": {f"{UID}/0": 4096, f"{UID}/1": 8192}, "n2": {f"{UID}/0": 4096}}
    assert volume_status(vol(size=128 * MiB), records, usage, "", []).allocated_bytes == 4096 + 8192


def test_export_uris_from_presence():
    live = {"n1": node_pb2.DaemonStatus(nbd_socket_dir="/run/braid/n1/nbd", nbd_address="127.0.0.1:10809"),
            "n2": node_pb2.DaemonStatus(nbd_socket_dir="/run/braid/n2/nbd")}
    uris = [(e.node, e.uri) for e in export_uris("vol1", live)]
    assert uris == [("n1", "nbd+unix:///vol1?socket=/run/braid/n1/nbd/vol1.sock"),
                    ("n1", "nbd://127.0.0.1:10809/vol1"),
                    ("n2", "nbd+unix:///vol1?socket=/run/braid/n2/nbd/vol1.sock")]


def test_unfence_lifts_only_that_node_with_cas():
    from braid.store import KV, Conflict

    class Store:
        def __init__(self):
            self.kvs = {}
            self.conflicts = 1

        def put(self, rec):
            old = self.kvs.get(rec.key)
            self.kvs[rec.key] = KV(rec.key, rec.to_json(), 1, (old.mod_revision + 1) if old else 1, 1)

        def list(self, prefix):
            return [kv for k, kv in sorted(self.kvs.items()) if k.startswith(prefix)], 9

        def get(self, key):
            return self.kvs.get(key)

        def update(self, key, value, mod_revision):
            if self.conflicts:  # someone else wrote meanwhile: re-read and retry
                self.conflicts -= 1
                self.kvs[key] = KV(key, self.kvs[key].value, 1, self.kvs[key].mod_revision + 1, 1)
                raise Conflict("changed")
            assert self.kvs[key].mod_revision == mod_revision
            self.kvs[key] = KV(key, value, 1, mod_revision + 1, 1)

    s = Store()
    s.put(rec(0).fence("n3").fence("n1"))
    s.put(rec(1))
    assert X.unfence(s, ["vol1"], "n1") == 1
    r0 = X.ExtentRecord.from_json(s.kvs[X.extent_key("vol1", 0)].value)
    assert r0.fenced == ("n3",) and r0.generation == 4
    assert X.unfence(s, ["vol1"], "n1") == 0      # nothing left to lift
