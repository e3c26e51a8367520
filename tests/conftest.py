"""Shared fixtures: a real etcd server started by the tests."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from braid.dev.localetcd import EtcdProcess  # noqa: E402
from braid.store import Store  # noqa: E402

_prefixes = itertools.count()

# pytest-timeout's signal method cannot interrupt a test blocked in C code (a libvirt
# call that never returns did that once in CI: the run hung until CI's own limit, with
# no word of where). A second, harder limit: faulthandler's C thread prints every
# thread's stack and ends the run 120 s after the test's own timeout.
_HARD_GRACE = 120


def _real_stderr(config) -> int:
    """The terminal's stderr, not pytest's capture file (lost when the process ends)."""
    cm = config.pluginmanager.getplugin("capturemanager")
    err = getattr(getattr(cm, "_global_capturing", None), "err", None)
    return getattr(err, "targetfd_save", None) or sys.__stderr__.fileno()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import faulthandler

    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
    if limit > 0:
        faulthandler.dump_traceback_later(limit + _HARD_GRACE, exit=True, file=_real_stderr(item.config))
    try:
        yield
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()


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


def _wait_file(path: Path, proc, timeout: float = 20.0) -> dict:
    import json
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"{path} not written in {timeout}s")


class DaemonProc:
    """A Braid daemon started as a real process (python -m <module>)."""

    def __init__(self, module: str, args: list[str], tmp: Path, name: str,
                 wrap: list[str] = ()):
        """``wrap``: a command prefix, e.g. nsenter into a network namespace."""
        import subprocess
        self.state_file = tmp / f"{name}.json"
        self.log = tmp / f"{name}.log"
        self.cmd = [*wrap, sys.executable, "-m", module, *args, "--state-file",
                    str(self.state_file), "--log-format", "text"]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT,
                                         cwd=str(ROOT), start_new_session=True)
        self.info = _wait_file(self.state_file, self.proc)
        self.address = self.info["grpc"]

    def stop(self, sig=None):
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
            try:
                self.proc.wait(15)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def prefix():
    return f"/braid-test-{os.getpid()}-{next(_prefixes)}/"


@pytest.fixture
def controller(etcd_server, prefix, tmp_path):
    """A real braid-controller process on its own key prefix."""
    d = DaemonProc("controller.main", ["--etcd", etcd_server.endpoint, "--prefix", prefix],
                   tmp_path, "controller")
    yield d
    d.stop()
    s = Store(etcd_server.endpoint, prefix=prefix)
    s.delete_prefix("")
    s.close()


@pytest.fixture
def api(controller):
    from braid.client import Client
    c = Client(controller.address)
    yield c
    c.close()


@pytest.fixture
def raw_store(etcd_server, prefix):
    """Direct store access on the controller's prefix (to plant garbage etc.)."""
    s = Store(etcd_server.endpoint, prefix=prefix)
    yield s
    s.close()


@contextlib.contextmanager
def running_controller(etcd, tmp: Path, name: str, extra: list[str] = ()):
    """A controller process on its own prefix, with a client and a store;
    for module-scoped fixtures (a controller start + SIGTERM costs ~1 s)."""
    from types import SimpleNamespace

    from braid.client import Client
    prefix = f"/braid-test-{os.getpid()}-{name}/"
    proc = DaemonProc("controller.main", ["--etcd", etcd.endpoint, "--prefix", prefix, *extra], tmp,
                      "controller")
    api = Client(proc.address)
    store = Store(etcd.endpoint, prefix=prefix)
    try:
        yield SimpleNamespace(proc=proc, api=api, store=store, prefix=prefix)
    finally:
        api.close()
        proc.stop()
        store.delete_prefix("")
        store.close()


def wait(pred, timeout: float, what: str, interval: float = 0.2):
    """Poll ``pred`` until it returns something truthy (returned), or fail
    saying what did not happen in time."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
