"""Pending chunk work of many downloaders: one entry per update, served round robin.

Used by controller.ota.publisher (the fleet-wide queue and each rate-capped rollout's
lane). A ChunkRequest merges into its update's entry (an ordered set of chunk indices), so
a device that re-asks after a stall, or asks for the next window while the last one is
still queued, adds nothing but the indices it did not ask for yet: the queue holds one
entry per downloading device, never one per request, and cannot be flooded by re-asks.
Workers take one chunk per turn from the entry at the head and put it back at the tail,
so with N devices downloading each one gets a chunk every N chunks: every transfer keeps
moving (the agents' stall timer sees progress) however many share the fleet's bandwidth.

:class:`PayloadCache` keeps the bytes of recently served payload files in memory (whole
files up to a size, least recently used out first), so 1,000 devices fetching the same
delta or engine read it from disk once.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ChunkQueue:
    """Round-robin chunk work by update id; ``put`` merges, ``get`` yields one chunk."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, int(max_entries))
        self._work: dict[str, tuple[Any, dict[int, None]]] = {}   # uid -> (info, indices)
        self._turns: deque[str] = deque()      # uids with work, in serving order
        self._ready = asyncio.Event()
        self.merged = 0                        # indices already queued when asked again
        self.peak = 0                          # most entries queued at once

    def __len__(self) -> int:
        """Entries (downloads) with chunks queued."""
        return len(self._work)

    @property
    def chunks(self) -> int:
        return sum(len(ix) for _, ix in self._work.values())

    def empty(self) -> bool:
        return not self._work

    def put(self, uid: str, info: Any, indices: Iterable[int], *,
            capacity: int | None = None) -> bool:
        """Queue ``indices`` of update ``uid``; False when a new entry would exceed the
        capacity (``capacity`` or ``max_entries``). An update already queued always merges."""
        entry = self._work.get(uid)
        if entry is None:
            if len(self._work) >= max(self.max_entries, capacity or 0):
                return False
            entry = self._work[uid] = (info, {})
            self._turns.append(uid)
            self.peak = max(self.peak, len(self._work))
        pending = entry[1]
        for i in indices:
            if i in pending:
                self.merged += 1
            else:
                pending[i] = None
        self._ready.set()
        return True

    async def get(self) -> tuple[Any, int]:
        """The next (offer info, chunk index), round robin over the queued updates."""
        while True:
            while self._turns:
                uid = self._turns.popleft()
                entry = self._work.get(uid)
                if entry is None or not entry[1]:
                    self._work.pop(uid, None)
                    continue
                info, pending = entry
                idx = next(iter(pending))
                del pending[idx]
                if pending:
                    self._turns.append(uid)
                else:
                    del self._work[uid]
                return info, idx
            self._ready.clear()
            await self._ready.wait()

    def drop(self, uids: Iterable[str]) -> int:
        """Forget the queued work of ``uids`` (a deleted rollout); returns entries dropped."""
        gone = {u for u in uids if self._work.pop(u, None) is not None}
        if gone:
            self._turns = deque(u for u in self._turns if u not in gone)
        return len(gone)


class PayloadCache:
    """Payload file bytes in memory: whole files up to ``max_file_bytes``, at most
    ``max_bytes`` in all (least recently used out first); bigger files are read per chunk."""

    def __init__(self, *, max_bytes: int = 256 * 1024 * 1024,
                 max_file_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self._files: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.reads = 0                         # files (or chunks of big files) read from disk

    def chunk(self, path: Path, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the payload file ``path``."""
        key = str(path)
        with self._lock:
            data = self._files.get(key)
            if data is not None:
                self._files.move_to_end(key)
                self.hits += 1
                return data[offset:offset + length]
        size = path.stat().st_size
        with open(path, "rb") as f:
            self.reads += 1
            if size > self.max_file_bytes or size > self.max_bytes:
                f.seek(offset)
                return f.read(length)
            data = f.read()
        with self._lock:
            if key not in self._files:
                self._files[key] = data
                self._size += len(data)
                while self._size > self.max_bytes and len(self._files) > 1:
                    _, old = self._files.popitem(last=False)
                    self._size -= len(old)
        return data[offset:offset + length]
