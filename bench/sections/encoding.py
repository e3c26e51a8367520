"""JSON vs protobuf binary encoding of a VM-spec-like object (~500 bytes as JSON).

Data for the "JSON vs protobuf in etcd" choice. JSON is stdlib ``json``
(compact separators, UTF-8 bytes); the baseline is ``google.protobuf.struct_pb2.Struct``:
encode = ``json_format.ParseDict`` + ``SerializeToString``, decode =
``ParseFromString`` + ``MessageToDict``. Struct is protobuf's schemaless form
(numbers become doubles); a typed message would be smaller and faster.
Throughput is per encode / decode / round trip, from the median sample.
"""
from __future__ import annotations

import json

from google.protobuf import json_format, struct_pb2
from google.protobuf.internal import api_implementation

from bench.framework import Metric, SectionContext

BASELINE = "protobuf_struct"


def vm_spec() -> dict:
    return {
        "name": "web-frontend-01",
        "namespace": "production",
        "vcpus": 4,
        "memory_mib": 8192,
        "machine_type": "q35",
        "disks": [
            {"name": "root", "pool": "ssd-replicated", "size_gib": 40, "boot": True, "bus": "virtio"},
            {"name": "data", "pool": "hdd-replicated", "size_gib": 200, "boot": False, "bus": "virtio"},
        ],
        "nics": [
            {"name": "eth0", "network": "frontend", "mac": "52:54:00:1a:2b:3c", "model": "virtio"},
            {"name": "eth1", "network": "storage", "mac": "52:54:00:4d:5e:6f", "model": "virtio"},
        ],
        "labels": {"app": "web", "tier": "frontend", "team": "platform", "env": "prod"},
    }


def json_encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_decode(data: bytes) -> dict:
    return json.loads(data)


def pb_encode(obj: dict) -> bytes:
    return json_format.ParseDict(obj, struct_pb2.Struct()).SerializeToString()


def pb_decode(data: bytes) -> dict:
    msg = struct_pb2.Struct()
    msg.ParseFromString(data)
    return json_format.MessageToDict(msg)


def run(ctx: SectionContext) -> list[Metric]:
    obj = vm_spec()
    codecs = {"json": (json_encode, json_decode), BASELINE: (pb_encode, pb_decode)}
    encoded = {name: enc(obj) for name, (enc, _) in codecs.items()}
    for name, (_, dec) in codecs.items():
        if dec(encoded[name]) != obj:  # 4.0 == 4, so Struct's doubles compare equal
            raise AssertionError(f"{name} round trip changed the object")

    repeat, number = (10, 50) if ctx.quick else (30, 400)
    params = {"payload_json_bytes": len(encoded["json"]), "samples": repeat,
              "calls_per_sample": number, "protobuf_impl": api_implementation.Type()}
    ops: dict[tuple[str, str], tuple[float, float]] = {}
    for name, (enc, dec) in codecs.items():
        data = encoded[name]
        cases = {"encode": lambda: enc(obj), "decode": lambda: dec(data),
                 "roundtrip": lambda: dec(enc(obj))}
        for op, fn in cases.items():
            t = ctx.measure(fn, repeat=repeat, number=number)
            ops[name, op] = (1 / t.median, 1 / t.p95)

    metrics = [
        Metric(f"json.{op}", ops["json", op][0], "ops/s", f"{BASELINE}.{op}",
               ops[BASELINE, op][0], True,
               {**params, "p95_ops_s": round(ops["json", op][1]),
                "baseline_p95_ops_s": round(ops[BASELINE, op][1])})
        for op in ("encode", "decode", "roundtrip")
    ]
    metrics.append(Metric("json.size", len(encoded["json"]), "bytes", f"{BASELINE}.size",
                          len(encoded[BASELINE]), False, {"json": "compact separators"}))
    return metrics
