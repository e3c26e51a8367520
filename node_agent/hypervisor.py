"""The libvirt adapter: the only module of the node agent that calls libvirt.

It owns one connection (``qemu:///system`` on real nodes, ``test:///default``
in unit tests and simulations), re-opens it when libvirtd restarts, and
turns libvirt's domain lifecycle events into ``on_event(vm_name)`` calls so
the reconciler can enqueue the VM. Only domains whose Braid metadata names
this node are seen: several node agents may share one libvirtd (the local
cluster on one machine) without touching each other's VMs.
"""

from __future__ import annotations

import logging
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable

import libvirt

log = logging.getLogger("braid.node_agent.hypervisor")

BRAID_NS = "https://braid.dev/xmlns/vm/1"
PREFIX = "braid-"

STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "other",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",     # shutting down
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}

_event_loop_started = False
_event_loop_lock = threading.Lock()


def _start_event_loop() -> None:
    """libvirt's default event loop, run by one daemon thread per process."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # errors reach us as exceptions; without this libvirt also prints them
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run():
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError:
                    log.exception("libvirt event loop iteration failed")
                    time.sleep(0.5)

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class HypervisorError(Exception):
    """A libvirt operation failed; the message is libvirt's, for status."""


@dataclass(frozen=True)
class Domain:
    """What libvirt says about one of our domains (a frozen snapshot)."""

    vm: str
    state: str            # running | paused | shutoff | crashed | other
    vcpus: int            # current (live when running)
    memory_mib: int       # current balloon target when running
    generation: int       # VM spec generation the definition was built from
    uid: str
    persistent: bool
    xml: str
    disks: tuple[str, ...] = ()   # target devs (vda, ...) of the live definition
    nics: tuple[str, ...] = ()    # tap devices of its interfaces


def _devices(xml: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return (), ()
    disks = tuple(t.get("dev", "") for t in root.iterfind("devices/disk/target"))
    nics = tuple(t.get("dev", "") for t in root.iterfind("devices/interface/target"))
    return disks, nics


def device_xml(xml: str, kind: str, dev: str) -> str | None:
    """The ``<disk>`` (kind "disk") or ``<interface>`` whose target is ``dev``."""
    root = ET.fromstring(xml)
    for el in root.iterfind(f"devices/{kind}"):
        t = el.find("target")
        if t is not None and t.get("dev") == dev:
            return ET.tostring(el, encoding="unicode")
    return None


def _meta(xml: str) -> dict[str, str]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    el = root.find(f"metadata/{{{BRAID_NS}}}vm")
    return dict(el.attrib) if el is not None else {}


class Hypervisor:
    def __init__(self, uri: str, owner: str, on_event: Callable[[str], None] = lambda vm: None):
        """``owner``: the identity written into (and required in) the Braid
        metadata of every domain this adapter manages: node@cluster."""
        self.uri = uri
        self.node = owner
        self.on_event = on_event
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.reconnects = 0

    # -- connection --------------------------------------------------------------

    def open(self) -> "Hypervisor":
        """Connect, or keep trying in the background (libvirtd may start
        after us); operations fail with HypervisorError until connected."""
        _start_event_loop()
        try:
            self._connect()
        except HypervisorError as exc:
            log.warning("%s; will keep trying", exc)
        self._watchdog = threading.Thread(target=self._watch, name="libvirt-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None

    def _connect(self) -> None:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to libvirt at {self.uri}: "
                                  f"{exc.get_error_message()}") from None
        try:
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._lifecycle, None)
        except libvirt.libvirtError as exc:  # some drivers lack events: resync covers it
            log.info("no lifecycle events from %s: %s", self.uri, exc.get_error_message())
        with self._lock:
            self._conn = conn
        log.info("connected to libvirt %s", self.uri)

    def _lifecycle(self, conn, dom, event, detail, opaque) -> None:
        name = dom.name()
        if name.startswith(PREFIX):
            self.on_event(name[len(PREFIX):])

    def _watch(self) -> None:
        """Re-open the connection when libvirtd went away (restart, crash)."""
        backoff = 0.5
        while not self._stop.wait(1.0):
            with self._lock:
                conn = self._conn
            alive = False
            try:
                alive = conn is not None and conn.isAlive() == 1
                if alive:
                    conn.getLibVersion()  # a cheap round trip
            except libvirt.libvirtError:
                alive = False
            if alive:
                backoff = 0.5
                continue
            log.warning("libvirt connection to %s lost; reconnecting", self.uri)
            try:
                self._connect()
                self.reconnects += 1
                for vm in self.list_domains():  # resync after the gap
                    self.on_event(vm)
            except HypervisorError as exc:
                log.warning("%s; retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    @property
    def conn(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is None:
                raise HypervisorError(f"not connected to libvirt at {self.uri}")
            return self._conn

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"{what}: {exc.get_error_message()}") from None

    # -- reading ----------------------------------------------------------------------

    def _lookup(self, vm: str):
        try:
            return self.conn.lookupByName(PREFIX + vm)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"lookup of {vm}: {exc.get_error_message()}") from None

    def _snapshot(self, dom) -> Domain | None:
        xml = dom.XMLDesc(0)  # the live definition (devices as they are now)
        # the generation a definition was built from is in the persistent
        # config: a define updates that one, not the running one's metadata
        meta = _meta(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else xml)
        if meta.get("node") != self.node:
            return None
        state, _reason = dom.state()
        info = dom.info()  # [state, maxMem KiB, memory KiB, nrVirtCpu, cpuTime]
        st = STATES.get(state, "other")
        try:
            vcpus = dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE if st != "shutoff"
                                   else libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError:
            vcpus = info[3]
        disks, nics = _devices(xml)
        return Domain(
            vm=dom.name()[len(PREFIX):], state=st, vcpus=vcpus, memory_mib=info[2] // 1024,
            generation=int(meta.get("generation", "0") or 0), uid=meta.get("uid", ""),
            persistent=bool(dom.isPersistent()), xml=xml, disks=disks, nics=nics,
        )

    def domain(self, vm: str) -> Domain | None:
        """Our domain for ``vm`` on this node, or None."""
        try:
            dom = self._lookup(vm)
            return self._snapshot(dom) if dom is not None else None
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # vanished between lookup and read
            raise HypervisorError(f"reading {vm}: {exc.get_error_message()}") from None

    def list_domains(self) -> dict[str, Domain]:
        """Every domain of this node, from libvirt itself (never a cache)."""
        out = {}
        for dom in self._call("listing domains", self.conn.listAllDomains, 0):
            if not dom.name().startswith(PREFIX):
                continue
            try:
                snap = self._snapshot(dom)
            except libvirt.libvirtError:
                continue  # undefined meanwhile
            if snap is not None:
                out[snap.vm] = snap
        return out

    def cpu_times(self) -> dict[str, int]:
        """CPU time (ns) used so far by each running VM's QEMU, by VM name."""
        out = {}
        for dom in self._call("listing domains", self.conn.listAllDomains,
                              libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            name = dom.name()
            if not name.startswith(PREFIX):
                continue
            try:
                out[name[len(PREFIX):]] = dom.info()[4]
            except libvirt.libvirtError:
                continue  # gone meanwhile
        return out

    # -- acting -----------------------------------------------------------------------------

    def define(self, xml: str) -> None:
        self._call("define", self.conn.defineXML, xml)

    def migratable_xml(self, vm: str) -> str:
        return self._call(f"reading {vm}", self._dom(vm).XMLDesc,
                          libvirt.VIR_DOMAIN_XML_MIGRATABLE)

    def _dom(self, vm: str):
        dom = self._lookup(vm)
        if dom is None:
            raise HypervisorError(f"domain of {vm} is not defined")
        return dom

    def start(self, vm: str, paused: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        self._call(f"start {vm}", self._dom(vm).createWithFlags, flags)

    def shutdown(self, vm: str) -> None:
        """ACPI power button; the guest decides."""
        self._call(f"shutdown {vm}", self._dom(vm).shutdown)

    def destroy(self, vm: str) -> None:
        """Power off now."""
        dom = self._lookup(vm)
        if dom is not None and dom.isActive():
            self._call(f"destroy {vm}", dom.destroy)

    def undefine(self, vm: str) -> None:
        dom = self._lookup(vm)
        if dom is not None:
            flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if "nvram" in dom.XMLDesc(0) else 0
            self._call(f"undefine {vm}", dom.undefineFlags, flags)

    def suspend(self, vm: str) -> None:
        self._call(f"pause {vm}", self._dom(vm).suspend)

    def resume(self, vm: str) -> None:
        self._call(f"resume {vm}", self._dom(vm).resume)

    def set_vcpus(self, vm: str, n: int) -> None:
        """Hot-add (or remove) vCPUs of a running domain, up to its maximum."""
        self._call(f"set vcpus of {vm}", self._dom(vm).setVcpusFlags, n,
                   libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def set_memory(self, vm: str, mib: int) -> None:
        """Change the balloon target of a running domain, up to its maximum."""
        self._call(f"set memory of {vm}", self._dom(vm).setMemoryFlags, mib * 1024,
                   libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def attach_live(self, vm: str, device_xml: str) -> None:
        """Hot-plug a device into the running domain (the persistent
        definition already has it: it was redefined from the spec)."""
        self._call(f"attach device to {vm}", self._dom(vm).attachDeviceFlags, device_xml,
                   libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def detach_live(self, vm: str, device_xml: str) -> None:
        """Hot-unplug a device from the running domain (the guest is asked;
        libvirt waits for it)."""
        self._call(f"detach device from {vm}", self._dom(vm).detachDeviceFlags, device_xml,
                   libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def migrate(self, vm: str, dest_uri: str, dest_xml: str,
                on_progress: Callable[[dict], None] = lambda stats: None,
                should_cancel: Callable[[], bool] = lambda: False, poll: float = 0.5,
                bandwidth_mib: int = 0) -> dict:
        """Live-migrate ``vm`` peer-to-peer to the libvirtd at ``dest_uri``
        (shared storage: only memory and device state move). Calls
        ``on_progress(jobStats)`` while it runs and aborts the job when
        ``should_cancel()`` says so. Returns the last job statistics."""
        dom = self._dom(vm)
        host = dest_uri.split("://", 1)[1].split("/", 1)[0].split("@")[-1]
        params = {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{host}",
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml,
            libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: dest_xml,
        }
        if bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        outcome: dict = {}
        uuid = dom.UUIDString()

        def run():
            # on a connection of its own: with the call waiting on the shared one, an
            # abortJob() (or jobStats()) from this thread sometimes never came back
            # (libvirt's client passes one socket between threads; seen in CI)
            mconn = None
            try:
                mconn = libvirt.open(self.uri)
                mconn.lookupByUUIDString(uuid).migrateToURI3(dest_uri, params, flags)
            except libvirt.libvirtError as exc:
                outcome["error"] = exc.get_error_message()
            finally:
                if mconn is not None:
                    try:
                        mconn.close()
                    except libvirt.libvirtError:
                        pass

        t = threading.Thread(target=run, name=f"migrate-{vm}", daemon=True)
        t.start()
        last: dict = {}
        cancelled = False
        while t.is_alive():
            t.join(poll)
            try:
                stats = dom.jobStats()
                if stats.get("type", 0):
                    last = stats
                    on_progress(stats)
            except libvirt.libvirtError:
                pass
            if not cancelled and t.is_alive() and should_cancel():
                cancelled = True
                try:
                    dom.abortJob()
                except libvirt.libvirtError as exc:
                    log.warning("aborting the migration of %s: %s", vm, exc.get_error_message())
        if "error" in outcome:
            raise HypervisorError(f"migration of {vm} to {dest_uri}: {outcome['error']}")
        return last

    def capacity(self) -> tuple[int, int, int]:
        """(cpus, memory bytes, NUMA cells) as libvirt sees the host."""
        info = self._call("node info", self.conn.getInfo)  # [model, MiB, cpus, MHz, nodes, ...]
        return info[2], info[1] << 20, max(1, info[4])
