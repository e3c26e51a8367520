"""Shared fixtures: a real etcd server started by the tests."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from braid.localetcd import EtcdProcess  # noqa: E402
from braid.store import Store  # noqa: E402

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """One etcd for the session; tests isolate themselves by key prefix."""
    d = tmp_path_factory.mktemp("etcd")
    etcd = EtcdProcess(d / "data", log_path=d / "etcd.log").start()
    yield etcd
    etcd.stop()


@pytest.fixture
def own_etcd(tmp_path):
    """A private etcd a test may restart, compact or kill."""
    etcd = EtcdProcess(tmp_path / "etcd-data", log_path=tmp_path / "etcd.log").start()
    yield etcd
    etcd.stop()


@pytest.fixture
def store(etcd_server):
    s = Store(etcd_server.endpoint, prefix=f"/braid-test-{os.getpid()}-{next(_prefixes)}/")
    yield s
    s.delete_prefix("")
    s.close()
