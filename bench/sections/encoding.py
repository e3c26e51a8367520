"""JSON vs protobuf binary encoding of a VM-spec-like object (~500 bytes as JSON).

Data for the "JSON vs protobuf in etcd" choice. JSON is stdlib ``json``
(compact separators, UTF-8 bytes); the baseline is ``google.protobuf.struct_pb2.Struct``:
encode = ``json_format.ParseDict`` + ``SerializeToString``, decode =
``ParseFromString`` + ``MessageToDict``. Struct is protobuf's schemaless form
(numbers become doubles); the ``typed_*`` metrics below measure a typed message.
Throughput is per encode / decode / round trip, from the median sample.

``typed_json.*`` measures what Braid actually stores in etcd: a typed
``braid.v1.VM`` (examples/vm.yaml via ``braid.cli.manifests.load``, with the
controller's defaults, uid, created_at and generation, in the stored form of
``braid.kinds.encode_spec``) in protobuf canonical JSON, encode =
``braid.kinds.to_json``, decode = ``braid.kinds.from_json``. Its baseline
``typed_protobuf`` is binary protobuf of the same message (``SerializeToString``
/ ``VM.FromString``).
"""
from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import json_format, struct_pb2
from google.protobuf.internal import api_implementation

from bench.framework import Metric, SectionContext
from braid import kinds as K
from braid.cli.manifests import load
from controller.resources import apply_defaults

BASELINE = "protobuf_struct"
TYPED_BASELINE = "typed_protobuf"
VM_MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "vm.yaml"


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


def typed_vm():
    """The VM of examples/vm.yaml as the controller stores it (defaults, uid,
    created_at, generation; no revisions, no status)."""
    doc = load(str(VM_MANIFEST))[0]
    obj = doc.obj
    apply_defaults(doc.kind, obj)
    obj.metadata.uid = "3f1c2a9e-8d4b-4c6f-9a7e-1b2c3d4e5f60"
    obj.metadata.created_at = "2026-01-01T00:00:00+00:00"
    obj.metadata.generation = 1
    return K.from_json(K.encode_spec(doc.kind, obj), doc.kind.message)


def typed_metrics(ctx: SectionContext, repeat: int, number: int) -> list[Metric]:
    msg = typed_vm()
    cls = type(msg)
    as_json, as_pb = K.to_json(msg), msg.SerializeToString()
    if K.from_json(as_json, cls) != msg or cls.FromString(as_pb) != msg:
        raise AssertionError("typed VM round trip changed the message")
    cases = {
        ("typed_json", "encode"): lambda: K.to_json(msg),
        ("typed_json", "decode"): lambda: K.from_json(as_json, cls),
        (TYPED_BASELINE, "encode"): msg.SerializeToString,
        (TYPED_BASELINE, "decode"): lambda: cls.FromString(as_pb),
    }
    ops = {}
    for key, fn in cases.items():
        t = ctx.measure(fn, repeat=repeat, number=number)
        ops[key] = (1 / t.median, 1 / t.p95)
    params = {"message": f"braid.v1.{cls.DESCRIPTOR.name}", "source": "examples/vm.yaml",
              "payload_json_bytes": len(as_json), "payload_protobuf_bytes": len(as_pb),
              "samples": repeat, "calls_per_sample": number,
              "protobuf_impl": api_implementation.Type()}
    metrics = [
        Metric(f"typed_json.{op}", ops["typed_json", op][0], "ops/s", f"{TYPED_BASELINE}.{op}",
               ops[TYPED_BASELINE, op][0], True,
               {**params, "p95_ops_s": round(ops["typed_json", op][1]),
                "baseline_p95_ops_s": round(ops[TYPED_BASELINE, op][1])})
        for op in ("encode", "decode")
    ]
    metrics.append(Metric("typed_json.size", len(as_json), "bytes", f"{TYPED_BASELINE}.size",
                          len(as_pb), False,
                          {"message": params["message"], "source": params["source"],
                           "json": "braid.kinds.to_json (canonical, as stored in etcd)"}))
    return metrics


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
    metrics += typed_metrics(ctx, repeat, number)
    return metrics
