"""Manifests for ``braid apply|create|delete -f``: YAML (or JSON) documents
``{kind, metadata, spec}``, several per file separated by ``---``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from braid import kinds as K

MAX_MANIFEST_BYTES = 4 << 20


class ManifestError(ValueError):
    pass


@dataclass
class Doc:
    kind: K.Kind
    obj: Message
    where: str


def read_text(path: str) -> str:
    try:
        if path == "-":
            data = sys.stdin.read(MAX_MANIFEST_BYTES + 1)
        else:
            with open(path, encoding="utf-8") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    return data


def parse(text: str, source: str = "<input>") -> list[Doc]:
    try:
        raw_docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {exc}") from None
    docs = []
    for i, raw in enumerate(raw_docs, 1):
        where = f"{source} document {i}"
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: expected a mapping with kind, metadata, spec")
        unknown = set(raw) - {"kind", "apiVersion", "metadata", "spec", "status"}
        if unknown:
            raise ManifestError(f"{where}: unknown top-level fields {sorted(unknown)}")
        if "kind" not in raw:
            raise ManifestError(f"{where}: 'kind' is missing")
        if raw.get("apiVersion", "braid/v1") != "braid/v1":
            raise ManifestError(f"{where}: apiVersion must be braid/v1")
        try:
            kind = K.lookup(str(raw["kind"]))
        except K.UnknownKind as exc:
            raise ManifestError(f"{where}: {exc}") from None
        body = {"metadata": raw.get("metadata") or {}, "spec": raw.get("spec") or {}}
        try:
            obj = json_format.ParseDict(body, kind.message())
        except json_format.ParseError as exc:
            raise ManifestError(f"{where} ({kind.title}): {exc}") from None
        if not obj.metadata.name:
            raise ManifestError(f"{where}: metadata.name is required")
        docs.append(Doc(kind, obj, where))
    if not docs:
        raise ManifestError(f"{source}: no documents")
    return docs


def load(path: str) -> list[Doc]:
    """Documents of a file, or of every .yaml/.yml/.json file in a directory."""
    if path != "-" and os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith((".yaml", ".yml", ".json")))
        if not files:
            raise ManifestError(f"{path}: no .yaml, .yml or .json files")
        return [d for f in files for d in parse(read_text(os.path.join(path, f)), os.path.join(path, f))]
    return parse(read_text(path), path)
