"""A passthrough FUSE filesystem that can fail or hang on command: real
kernel I/O errors and hangs under a storage daemon's disk directory, where
this kernel has no device-mapper (dm-flakey, dm-delay).

Run it as its own process (foreground, multithreaded)::

    python -m tests.integration.faultfs BACKING MOUNTPOINT CONTROL_FILE

Everything under MOUNTPOINT is BACKING. The mode is switched at run time by
writing ``<seq> <mode>`` to CONTROL_FILE (replace it atomically); a watcher
thread applies it and acknowledges in ``CONTROL_FILE.ack`` (JSON: ``seq``,
``mode`` and counters). Modes:

* ``ok``: pass everything through;
* ``eio``: every data operation fails with EIO: read, write, fsync/fdatasync,
  truncate, create, open for writing, and the namespace changes a failed
  disk cannot make either (mkdir, unlink, rename, rmdir, fsync of a
  directory);
* ``hang``: the same operations block until the mode changes (then they go
  on as the new mode says). Each FUSE request has its own thread, so a
  blocked one holds up nothing else, least of all the watcher.

Lookups, getattr, readdir, statfs and close pass in every mode (what a
failing disk still answers from the kernel's caches), so the test sees what
the data path does, not a daemon that cannot even list its disk.

Tests use ``fault_mount(backing, mountpoint)``: it starts the process, waits
for the mount, yields a ``FaultMount`` (``.set(mode)``, ``.stats()``) and
always unmounts and stops it again, releasing anything hung first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES = ("ok", "eio", "hang")
ROOT = Path(__file__).resolve().parents[2]
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT | os.O_APPEND


def unavailable() -> str | None:
    """Why a faultfs cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (FUSE mounts and umount)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import fuse  # noqa: F401 - fusepy loads libfuse2 on import
    except ImportError:
        return "fusepy is not installed (pip install -e '.[dev]')"
    except OSError as exc:
        return f"libfuse2 is missing ({exc}; scripts/setup.sh installs it)"
    if shutil.which("umount") is None:
        return "no umount"
    return None


# --- the filesystem (runs in the faultfs process) ------------------------------------------------


def _make_ops():
    from fuse import FuseOSError, Operations

    class FaultFS(Operations):
        use_ns = True

        def __init__(self, backing: str, control: str):
            self.root = os.path.realpath(backing)
            self.control = control
            self.mode = "ok"
            self.seq = 0
            self.counts = {"ops": 0, "eio": 0, "hung": 0, "hanging": 0}
            self._cond = threading.Condition()

        # -- mode control

        def init(self, path):
            threading.Thread(target=self._watch, name="faultfs-control", daemon=True).start()

        def _watch(self) -> None:
            last_ack = None
            while True:
                try:
                    seq, _, mode = Path(self.control).read_text().strip().partition(" ")
                    seq = int(seq)
                except (OSError, ValueError):
                    seq, mode = self.seq, self.mode
                with self._cond:
                    if mode in MODES and seq != self.seq:
                        self.seq, self.mode = seq, mode
                        self._cond.notify_all()
                    ack = {"seq": self.seq, "mode": self.mode, **self.counts}
                if ack != last_ack:
                    tmp = self.control + ".ack.tmp"
                    with open(tmp, "w") as f:
                        json.dump(ack, f)
                    os.replace(tmp, self.control + ".ack")
                    last_ack = ack
                time.sleep(0.02)

        def _gate(self) -> None:
            """Before a data operation: fail it (eio), block it (hang) or let it pass."""
            with self._cond:
                self.counts["ops"] += 1
                if self.mode == "hang":
                    self.counts["hung"] += 1
                    self.counts["hanging"] += 1
                    try:
                        while self.mode == "hang":
                            self._cond.wait()
                    finally:
                        self.counts["hanging"] -= 1
                if self.mode == "eio":
                    self.counts["eio"] += 1
                    raise FuseOSError(errno.EIO)

        def _path(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        # -- metadata that always answers

        def getattr(self, path, fh=None):
            st = os.fstat(fh.fh) if fh is not None else os.lstat(self._path(path))
            out = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                                               "st_blocks", "st_ino", "st_dev", "st_rdev", "st_blksize")}
            out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            return out

        def access(self, path, amode):
            if not os.access(self._path(path), amode):
                raise FuseOSError(errno.EACCES)

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._path(path))]

        def readlink(self, path):
            return os.readlink(self._path(path))

        def statfs(self, path):
            v = os.statvfs(self._path(path))
            return {k: getattr(v, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                               "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

        # -- namespace changes (a failed disk cannot make them)

        def mkdir(self, path, mode):
            self._gate()
            os.mkdir(self._path(path), mode)

        def rmdir(self, path):
            self._gate()
            os.rmdir(self._path(path))

        def unlink(self, path):
            self._gate()
            os.unlink(self._path(path))

        def rename(self, old, new):
            self._gate()
            os.rename(self._path(old), self._path(new))

        def chmod(self, path, mode):
            self._gate()
            os.chmod(self._path(path), mode)

        def chown(self, path, uid, gid):
            self._gate()
            os.lchown(self._path(path), uid, gid)

        def utimens(self, path, times=None):
            self._gate()
            if times:
                os.utime(self._path(path), ns=times)
            else:
                os.utime(self._path(path))

        def fsyncdir(self, path, datasync, fh):
            self._gate()
            fd = os.open(self._path(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        # -- files

        def open(self, path, fi):
            if fi.flags & _WRITE_FLAGS:
                self._gate()
            flags = fi.flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND)  # the kernel gives offsets
            fi.fh = os.open(self._path(path), flags | os.O_CLOEXEC)
            return 0

        def create(self, path, mode, fi):
            self._gate()
            fi.fh = os.open(self._path(path), (fi.flags & ~os.O_APPEND) | os.O_CREAT | os.O_CLOEXEC, mode)
            return 0

        def read(self, path, size, offset, fi):
            self._gate()
            return os.pread(fi.fh, size, offset)

        def write(self, path, data, offset, fi):
            self._gate()
            return os.pwrite(fi.fh, data, offset)

        def truncate(self, path, length, fh=None):
            self._gate()
            if fh is not None:
                os.ftruncate(fh.fh, length)
            else:
                os.truncate(self._path(path), length)

        def fsync(self, path, datasync, fi):
            self._gate()
            (os.fdatasync if datasync else os.fsync)(fi.fh)

        def flush(self, path, fi):
            return 0   # close(2): nothing to write back (writes are passed through at once)

        def release(self, path, fi):
            os.close(fi.fh)
            return 0

    return FaultFS


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print(f"usage: python -m {__spec__.name if __spec__ else 'faultfs'} BACKING MOUNTPOINT CONTROL_FILE",
              file=sys.stderr)
        return 2
    backing, mountpoint, control = args
    from fuse import FUSE
    ops = _make_ops()(backing, control)
    # multithreaded (a hung request holds one thread only); big_writes: whole chunks, not 4 KiB
    FUSE(ops, mountpoint, raw_fi=True, foreground=True, nothreads=False, big_writes=True,
         fsname="faultfs", subtype="faultfs")
    return 0


# --- the test side -------------------------------------------------------------------------------


class FaultMount:
    def __init__(self, backing: Path, mountpoint: Path, control: Path, proc: subprocess.Popen, log: Path):
        self.backing, self.mountpoint, self.control = backing, mountpoint, control
        self.proc, self.log = proc, log
        self._seq = 0
        self.mode = "ok"

    def stats(self) -> dict:
        """The last acknowledgement: seq, mode and counters (ops, eio, hung, hanging)."""
        try:
            return json.loads(Path(f"{self.control}.ack").read_text())
        except (OSError, ValueError):
            return {}

    def set(self, mode: str, timeout: float = 10.0) -> None:
        """Switch the mode; returns once the filesystem applies it."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        self._seq += 1
        tmp = self.control.with_name(self.control.name + ".tmp")
        tmp.write_text(f"{self._seq} {mode}\n")
        os.replace(tmp, self.control)
        deadline = time.monotonic() + timeout
        while self.stats().get("seq") != self._seq:
            if self.proc.poll() is not None:
                raise RuntimeError(f"faultfs exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"faultfs did not switch to {mode} in {timeout}s")
            time.sleep(0.02)
        self.mode = mode

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _unmount(mountpoint: Path) -> None:
    if not os.path.ismount(mountpoint):
        return
    for cmd in (["fusermount", "-u", "-z"], ["umount"], ["umount", "-l"]):
        if shutil.which(cmd[0]) is None:
            continue
        subprocess.run([*cmd, str(mountpoint)], capture_output=True, timeout=30)
        if not os.path.ismount(mountpoint):
            return


@contextlib.contextmanager
def fault_mount(backing: Path | str, mountpoint: Path | str, control: Path | str | None = None,
                timeout: float = 15.0):
    """Mount a faultfs of ``backing`` on ``mountpoint`` (both created if needed);
    yields a FaultMount. On exit, whatever happened: back to ``ok`` (releasing
    hung requests, so nothing stays stuck in the kernel), unmount (lazily if
    still busy), stop the process (killing it if needed: that aborts the FUSE
    connection)."""
    backing, mountpoint = Path(backing), Path(mountpoint)
    backing.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    control = Path(control) if control else mountpoint.with_name(mountpoint.name + ".control")
    control.write_text("0 ok\n")
    log = control.with_name(control.name + ".log")
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tests.integration.faultfs", str(backing),
                                 str(mountpoint), str(control)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=str(ROOT), start_new_session=True)
    fm = FaultMount(backing, mountpoint, control, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                raise RuntimeError(f"faultfs exited ({proc.returncode}) before mounting: {fm.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"faultfs did not mount {mountpoint} in {timeout}s: {fm.tail()}")
            time.sleep(0.05)
        fm.set("ok")
        yield fm
    finally:
        try:
            if proc.poll() is None:
                fm.set("ok", timeout=5)
        except Exception:  # noqa: BLE001 - unmounting matters more
            pass
        _unmount(mountpoint)
        if proc.poll() is None:
            for sig, wait_s in ((None, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        _unmount(mountpoint)  # a process that died left a dead mount ("transport endpoint ...")


if __name__ == "__main__":
    raise SystemExit(main())
