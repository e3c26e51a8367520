"""Daemon configuration: flags > environment > file > defaults; bad input is
a clear error."""

import pytest

from braid.service import ConfigError, Option, load_config

OPTS = [Option("node", "", "node name"), Option("workers", 4, "workers", int)]


def test_defaults(monkeypatch):
    monkeypatch.delenv("BRAID_ETCD", raising=False)
    cfg = load_config("x", OPTS, [])
    assert cfg["etcd"] == "127.0.0.1:2379" and cfg["workers"] == 4 and cfg["lease_ttl"] == 5


def test_precedence(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("etcd: file:1\nworkers: 7\nnode: from-file\n")
    monkeypatch.setenv("BRAID_WORKERS", "9")
    cfg = load_config("x", OPTS, ["--config", str(f), "--node", "from-flag"])
    assert cfg["etcd"] == "file:1"        # file beats default
    assert cfg["workers"] == 9            # env beats file
    assert cfg["node"] == "from-flag"     # flag beats all


def test_unknown_option_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("etdc: typo:1\n")
    with pytest.raises(ConfigError, match="unknown options.*etdc"):
        load_config("x", OPTS, ["--config", str(f)])


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "mapping"),
    ("etcd: [unclosed\n", "cannot read"),
    ("workers: many\n", "workers"),
    ("lease_ttl: 1\n", "lease_ttl"),
])
def test_bad_files(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config("x", OPTS, ["--config", str(f)])


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("x", OPTS, ["--config", "/nonexistent/braid.yaml"])
