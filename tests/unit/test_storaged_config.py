"""braid-storaged's configuration: disks and addresses (clear errors)."""

from __future__ import annotations

import pytest

from braid.service import ConfigError
from storage_daemon.main import _hostport, parse_disks, parse_size


def test_parse_disks():
    disks = parse_disks("d1=/srv/a, d2=/srv/b:20G,d3=/srv/c:512M")
    assert [(d.name, d.path, d.capacity_bytes) for d in disks] == [
        ("d1", "/srv/a", 0), ("d2", "/srv/b", 20 << 30), ("d3", "/srv/c", 512 << 20)]
    assert parse_disks("") == []


@pytest.mark.parametrize("text, why", [
    ("d1", "expected name=/dir"),
    ("d1=relative/path", "not an absolute path"),
    ("d1=/a,d1=/b", "given twice"),
    ("d1=/a:12Q", "bad size"),
    ("=/a", "expected name=/dir"),
])
def test_bad_disks_are_refused(text, why):
    with pytest.raises(ConfigError, match=why):
        parse_disks(text)


def test_sizes_and_addresses():
    assert parse_size("1T") == 1 << 40 and parse_size("100") == 100 and parse_size("2GiB") == 2 << 30
    assert _hostport("127.0.0.1:7410", "x") == ("127.0.0.1", 7410)
    assert _hostport(":0", "x") == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="expected host:port"):
        _hostport("localhost", "peer_listen")
