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


def stream_console(address: str, vm: str, follow: bool, tail: int, out=None) -> None:
    out = out or sys.stdout.buffer
    with grpc.insecure_channel(address) as ch:
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
