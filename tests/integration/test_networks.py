"""The controller's network reconciler, in a real controller process."""

from __future__ import annotations

import time

import pytest

from braid.v1 import meta_pb2, network_pb2

pytestmark = pytest.mark.integration


def _net(name, vni=0):
    return network_pb2.Network(metadata=meta_pb2.ObjectMeta(name=name),
                               spec=network_pb2.NetworkSpec(vni=vni))


def _wait_status(api, name, pred, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        net = api.get("network", name)
        if pred(net.status):
            return net
        time.sleep(0.05)
    raise AssertionError(f"network {name}: status not reached: {net.status}")


def test_vnis_allocated_unique_and_released(api, raw_store):
    for i in range(5):
        api.create(_net(f"n{i}"))
    vnis = [_wait_status(api, f"n{i}", lambda s: s.vni).status.vni for i in range(5)]
    assert len(set(vnis)) == 5 and all(v >= 1000 for v in vnis)
    assert all(api.get("network", f"n{i}").status.phase == "Ready" for i in range(5))
    # a requested VNI taken by another network is an error, visible in status
    api.create(_net("dup", vni=vnis[0]))
    st = _wait_status(api, "dup", lambda s: s.phase == "Error").status
    assert "already used by network 'n0'" in st.message
    # deleting a network frees its VNI for the next one
    api.delete("network", "n0")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kv = raw_store.get(f"ipam/vni/{vnis[0]}")  # one read: it may vanish between two
        if kv is None or kv.value != b"n0":
            break
        time.sleep(0.05)
    # 'dup' asked for exactly that VNI: it gets it now
    assert _wait_status(api, "dup", lambda s: s.phase == "Ready").status.vni == vnis[0]
    owners = {kv.key: kv.value for kv in raw_store.list("ipam/vni/")[0]}
    assert sorted(owners.values()) == sorted([b"dup", b"n1", b"n2", b"n3", b"n4"])
