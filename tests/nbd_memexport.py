"""An in-memory NBD Export for tests: a bytearray plus per-block allocation state.

The allocation map lets block-status answers be checked exactly: every block
of ``block`` bytes is a hole (never written, or trimmed: reads as zeroes), data,
or allocated zeroes (written with NBD_CMD_WRITE_ZEROES + NO_HOLE).  The class
also records calls, can inject failures, and can hold chosen operations on a
gate so tests can force requests to complete out of order.
"""

from __future__ import annotations

import asyncio

from storage_daemon.nbd import NBD_STATE_HOLE, NBD_STATE_ZERO

HOLE = 0      # unallocated, reads as zeroes
DATA = 1      # allocated, contents unknown to block status
ZEROED = 2    # allocated, known to read as zeroes

_STATE_FLAGS = {HOLE: NBD_STATE_HOLE | NBD_STATE_ZERO, DATA: 0, ZEROED: NBD_STATE_ZERO}


class MemExport:
    """A bytearray-backed Export (see storage_daemon.nbd.Export) that tracks allocation."""

    def __init__(self, size: int, *, read_only: bool = False, description: str = "", block: int = 4096):
        self.size = size
        self.read_only = read_only
        self.description = description
        self.block = block
        self.data = bytearray(size)
        self.alloc = bytearray(-(-size // block))
        self.calls: list[tuple] = []          # (op, offset, length, extra...) per call
        self.flushes = 0
        self.failures: dict[str, BaseException] = {}   # op -> exception raised by its next call
        self.gates: dict[tuple[str, int], asyncio.Event] = {}   # (op, offset) -> must be set first
        self.active = 0                        # calls currently running
        self.max_active = 0

    # --- test controls ---

    def fail_next(self, op: str, exc: BaseException) -> None:
        """The next call of ``op`` ("read", "write", ...) raises ``exc``."""
        self.failures[op] = exc

    def gate(self, op: str, offset: int) -> asyncio.Event:
        """Hold ``op`` at ``offset`` until the returned event is set (from the server's loop)."""
        event = asyncio.Event()
        self.gates[(op, offset)] = event
        return event

    def resize(self, size: int) -> None:
        self.data.extend(bytes(size - len(self.data)))
        self.alloc.extend(bytes(-(-size // self.block) - len(self.alloc)))
        self.size = size

    def state(self, offset: int) -> int:
        return self.alloc[offset // self.block]

    async def _enter(self, op: str, offset: int, *extra) -> None:
        self.calls.append((op, offset, *extra))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            gate = self.gates.get((op, offset))
            if gate is not None:
                await gate.wait()
            exc = self.failures.pop(op, None)
            if exc is not None:
                raise exc
        finally:
            self.active -= 1

    def _set_blocks(self, offset: int, length: int, state: int, *, whole_only: bool) -> None:
        """Set the state of the blocks overlapping (or, if whole_only, fully inside) the range."""
        b = self.block
        if whole_only:
            first, last = -(-offset // b), (offset + length) // b
        else:
            first, last = offset // b, -(-(offset + length) // b)
        if (offset + length) == self.size:
            last = len(self.alloc)   # the short final block counts as whole at the end of the export
        for i in range(first, last):
            self.alloc[i] = state

    # --- the Export interface ---

    async def read(self, offset: int, length: int) -> bytes:
        await self._enter("read", offset, length)
        with memoryview(self.data) as view:   # one copy, not two (slicing the bytearray copies)
            return bytes(view[offset:offset + length])

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._enter("write", offset, len(data), fua)
        self.data[offset:offset + len(data)] = data
        self._set_blocks(offset, len(data), DATA, whole_only=False)

    async def flush(self) -> None:
        await self._enter("flush", 0)
        self.flushes += 1

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._enter("trim", offset, length, fua)
        # Only whole blocks are discarded (the spec lets a server round inwards).
        b = self.block
        start = -(-offset // b) * b
        end = offset + length if offset + length == self.size else (offset + length) // b * b
        if end > start:
            self.data[start:end] = bytes(end - start)
            self._set_blocks(start, end - start, HOLE, whole_only=True)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        await self._enter("write_zeroes", offset, length, fua, may_trim)
        self.data[offset:offset + length] = bytes(length)
        self._set_blocks(offset, length, HOLE if may_trim else ZEROED, whole_only=True)
        # Partly covered blocks that were holes now hold written zeroes; data blocks stay data.
        b = self.block
        for i in (offset // b, (offset + length - 1) // b):
            if self.alloc[i] == HOLE and not may_trim:
                self.alloc[i] = ZEROED

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        await self._enter("block_status", offset, length)
        runs: list[tuple[int, int]] = []
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            i = pos // self.block
            state = self.alloc[i]
            j = i + 1
            while j < len(self.alloc) and self.alloc[j] == state and j * self.block < end:
                j += 1
            run_end = min(j * self.block, end)
            runs.append((run_end - pos, _STATE_FLAGS[state]))
            pos = run_end
        return runs
