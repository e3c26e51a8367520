"""Rendering objects for people (tables) and programs (json, yaml)."""

from __future__ import annotations

import json

import yaml
from google.protobuf.message import Message

from braid import kinds as K


def human_bytes(n: int) -> str:
    if not n:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f}{unit}" if unit == "B" or n == int(n) else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _field(obj: Message, path: str) -> str:
    path, _, fmt = path.partition("|")
    value = obj
    for part in path.split("."):
        value = getattr(value, part)
    if fmt == "bytes":
        return human_bytes(int(value))
    if fmt == "volphase":   # a volume's status: "Rebuilding 42%"
        if value.phase == "Rebuilding":
            return f"Rebuilding {value.rebuild_progress:.0%}"
        return value.phase or "-"
    if fmt == "list":
        return ",".join(value) or "-"
    if fmt == "count":
        return str(len(value))
    if fmt == "enum":
        fd = obj.DESCRIPTOR.fields_by_name["spec"].message_type.fields_by_name[path.split(".")[-1]]
        return fd.enum_type.values_by_number[value].name if value else "-"
    if fmt == "daemons":
        return ",".join(f"{d.name}{'' if d.live else '(down)'}" for d in value) or "-"
    if fmt == "ips":
        return ",".join(f.ip or f"{f.subnet}:auto" for f in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "__len__") and not isinstance(value, str):
        return ",".join(str(v) for v in value) or "-"
    return str(value) if value not in ("", 0) else "-"


def table(kind: K.Kind, objs: list[Message], wide: bool = False) -> str:
    cols = list(kind.columns) + ([("REVISION", "metadata.resource_version")] if wide else [])
    rows = [[h for h, _ in cols]] + [[_field(o, p) for _, p in cols] for o in objs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def as_dict(kind: K.Kind, obj: Message) -> dict:
    d = K.to_dict(obj)
    return {"kind": kind.title, "apiVersion": "braid/v1", **d}


def render(kind: K.Kind, objs: list[Message], fmt: str, single: bool = False) -> str:
    if fmt in ("table", "wide"):
        return table(kind, objs, wide=fmt == "wide")
    if fmt == "name":
        return "\n".join(f"{kind.name}/{o.metadata.name}" for o in objs)
    data = [as_dict(kind, o) for o in objs]
    out = data[0] if single and len(data) == 1 else (data if single else
                                                     {"kind": f"{kind.title}List", "items": data})
    if fmt == "json":
        return json.dumps(out, indent=2, sort_keys=False)
    return yaml.safe_dump(out, sort_keys=False).rstrip()


def describe(kind: K.Kind, obj: Message) -> str:
    """A readable, indented view of one object."""
    return yaml.safe_dump(as_dict(kind, obj), sort_keys=False, default_flow_style=False).rstrip()
