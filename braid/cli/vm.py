"""``braid vm ...``: power operations, console and logs of one VM."""

from __future__ import annotations

import sys
import time

import grpc

from braid.client import ApiCallError, Client
from braid.v1 import agent_pb2, compute_pb2

POWER = {"start": compute_pb2.RUNNING, "stop": compute_pb2.STOPPED,
         "pause": compute_pb2.PAUSED, "resume": compute_pb2.RUNNING}
DONE = {compute_pb2.RUNNING: "Running", compute_pb2.STOPPED: "Stopped",
        compute_pb2.PAUSED: "Paused"}


def set_power(c: Client, name: str, state: int) -> compute_pb2.VM:
    """Set spec.power_state with compare-and-set, retrying lost races."""
    for attempt in range(10):
        vm = c.get("vm", name)
        if vm.spec.power_state == state:
            return vm
        vm.spec.power_state = state
        vm.ClearField("status")
        try:
            return c.update(vm)
        except ApiCallError as exc:
            if exc.code != grpc.StatusCode.ABORTED or attempt == 9:
                raise
    raise AssertionError("unreachable")


def wait_phase(c: Client, name: str, phase: str, timeout: float, out=sys.stderr) -> compute_pb2.VM:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        vm = c.get("vm", name)
        st = vm.status
        if st.phase != last:
            print(f"  {name}: {st.phase or 'Pending'}{' - ' + st.message if st.message else ''}",
                  file=out, flush=True)
            last = st.phase
        if st.phase == phase and st.observed_generation >= vm.metadata.generation:
            return vm
        if st.phase == "Failed" and st.observed_generation >= vm.metadata.generation:
            raise ApiCallError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"vm {name} failed: {st.message}")
        if time.monotonic() > deadline:
            raise ApiCallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"vm {name} not {phase} after {timeout:.0f}s (now {st.phase or 'Pending'})")
        time.sleep(0.2)


def agent_address(c: Client, vm_name: str) -> str:
    vm = c.get("vm", vm_name)
    node_name = vm.status.node or vm.spec.node
    if not node_name:
        raise ApiCallError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"vm {vm_name} is not placed on a node yet")
    node = c.get("node", node_name)
    for d in node.status.daemons:
        if d.name == "node-agent" and d.live and d.grpc_address:
            return d.grpc_address
    raise ApiCallError(grpc.StatusCode.UNAVAILABLE,
                       f"the node agent of {node_name} (where {vm_name} runs) is not running")


def stream_console(address: str, vm: str, follow: bool, tail: int, out=None, tls=None) -> None:
    out = out or sys.stdout.buffer
    if tls is not None:
        from braid.auth.pki import grpc_channel_credentials
        channel = grpc.secure_channel(address, grpc_channel_credentials(tls))
    else:
        channel = grpc.insecure_channel(address)
    with channel as ch:
        call = ch.unary_stream("/braid.v1.NodeAgentService/Console",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=agent_pb2.ConsoleChunk.FromString)
        stream = call(agent_pb2.ConsoleRequest(vm=vm, follow=follow, tail_bytes=tail))
        try:
            for chunk in stream:
                out.write(chunk.data)
                out.flush()
        except KeyboardInterrupt:
            stream.cancel()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise ApiCallError.from_rpc(exc) from None


def migrate(c: Client, name: str, to: str | None, cancel: bool, wait: float, out=sys.stderr) -> None:
    """Move a VM to another node (live when both nodes can), or cancel a
    running move by pointing it back at its current node."""
    for attempt in range(10):
        vm = c.get("vm", name)
        if cancel:
            if not vm.status.node or vm.status.node == vm.spec.node:
                raise ApiCallError(grpc.StatusCode.FAILED_PRECONDITION, f"vm {name} is not moving")
            target = vm.status.node
        else:
            target = to
            if vm.spec.node == target:
                raise ApiCallError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"vm {name} is already on {target}")
        vm.spec.node = target
        vm.ClearField("status")
        try:
            c.update(vm)
            break
        except ApiCallError as exc:
            if exc.code != grpc.StatusCode.ABORTED or attempt == 9:
                raise
    print(f"vm/{name}: {'cancel' if cancel else 'move to ' + target} requested", file=out, flush=True)
    if not wait:
        return
    deadline = time.monotonic() + wait
    last = None
    while time.monotonic() < deadline:
        st = c.get("vm", name).status
        m = st.migration
        line = (m.phase, m.data_remaining_bytes >> 20)
        if m.target_node == target and line != last and m.phase:
            print(f"  {name}: migration {m.phase}, {m.data_remaining_bytes >> 20} MiB left"
                  f"{', downtime ' + str(m.downtime_ms) + ' ms' if m.downtime_ms else ''}"
                  f"{' - ' + m.message if m.message else ''}", file=out, flush=True)
            last = line
        if st.node == target and st.phase in ("Running", "Paused", "Stopped"):
            return
        if m.target_node == target and m.phase == "Failed":
            raise ApiCallError(grpc.StatusCode.ABORTED, f"migration of {name} failed: {m.message}")
        time.sleep(0.2)
    raise ApiCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"vm {name} not on {target} after {wait:.0f}s")
