"""Smoke test of the controller fixture: create, get, list over real gRPC."""

import pytest

from braid.cli.manifests import load

pytestmark = pytest.mark.integration


def test_create_get_list(api):
    docs = load("examples/volume.yaml")
    created = api.create(docs[0].obj)
    assert created.metadata.resource_version > 0 and created.metadata.uid
    got = api.get("volume", "vol1")
    assert got.spec.size_bytes == 1 << 30 and got.spec.replicas == 2
    items, rev, corrupt = api.list("volume")
    assert [v.metadata.name for v in items] == ["vol1"] and rev >= created.metadata.resource_version
    assert corrupt == []
