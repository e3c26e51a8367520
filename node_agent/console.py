"""NodeAgentService.Console: a VM's serial console output over gRPC.

libvirt (virtlogd) appends everything the guest writes to its serial port to
``<console_log_dir>/<vm>.log``; this streams that file and, with ``follow``,
keeps streaming what is appended until the client cancels.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import grpc

from braid.v1 import agent_pb2
from braid.validation import NAME_RE

log = logging.getLogger("braid.node_agent.console")

CHUNK = 64 * 1024


def console_handler(log_path: Callable[[str], str], known: Callable[[str], bool]) -> grpc.GenericRpcHandler:
    def console(req: agent_pb2.ConsoleRequest, context: grpc.ServicerContext):
        if not NAME_RE.match(req.vm):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"vm: {req.vm[:80]!r} is not a valid name")
        if req.tail_bytes < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "tail_bytes: must not be negative")
        path = log_path(req.vm)
        if not os.path.exists(path):
            try:
                here = known(req.vm)
            except Exception as exc:  # libvirt unreachable (restarting): retryable
                context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot ask libvirt about {req.vm}: {exc}")
            if not here:
                context.abort(grpc.StatusCode.NOT_FOUND, f"vm {req.vm!r} has no console on this node")
            if not req.follow:
                return
        stop = threading.Event()
        context.add_callback(stop.set)
        pos = 0
        if req.tail_bytes and os.path.exists(path):
            pos = max(0, os.path.getsize(path) - req.tail_bytes)
        while not stop.is_set():
            try:
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size < pos:
                        pos = 0  # truncated / replaced: start over
                    f.seek(pos)
                    while data := f.read(CHUNK):
                        pos += len(data)
                        yield agent_pb2.ConsoleChunk(data=data)
            except FileNotFoundError:
                pass
            if not req.follow:
                return
            stop.wait(0.1)

    return grpc.method_handlers_generic_handler("braid.v1.NodeAgentService", {
        "Console": grpc.unary_stream_rpc_method_handler(
            console, agent_pb2.ConsoleRequest.FromString, lambda m: m.SerializeToString()),
    })
