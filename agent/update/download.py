"""Chunk assembly for one verified update: partial file, per-chunk hash, resumable windows.

:class:`ChunkAssembler` writes each chunk at ``index * chunk_size`` of ``payload.part`` after
checking its sha256 against the signed manifest (a bad chunk is rejected on arrival), and
appends the index to a journal (``chunks.idx``) so a restart knows what is on disk; on open it
re-checks every journaled chunk against its hash. :class:`Transfer` asks for a window of
missing chunks with ``ChunkRequest``, re-asks after a reconnect, and reports a stall when no
chunk arrived for ``stall_timeout_s``. Used by :mod:`agent.update.manager`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from agent.update.verify import VerifiedUpdate
from protos.errors import Rejected
from protos.fsutil import sha256_file

log = logging.getLogger(__name__)

PARTIAL_NAME = "payload.part"
JOURNAL_NAME = "chunks.idx"


class ChunkAssembler:
    """The payload of one update, assembled chunk by chunk in ``work_dir``."""

    def __init__(self, vu: VerifiedUpdate, *, work_dir: Path) -> None:
        self.vu = vu
        self.work_dir = work_dir
        self.partial = work_dir / PARTIAL_NAME
        self.journal = work_dir / JOURNAL_NAME
        self.have: set[int] = set()
        self._fd: int | None = None
        self._jfd: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> set[int]:
        """Open (or create) the partial file; return the chunk indices already on disk."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o600)
        recorded: set[int] = set()
        if self.journal.exists():
            raw = self.journal.read_bytes()
            usable = len(raw) - len(raw) % 4  # a torn last entry is dropped
            recorded = {i for (i,) in struct.iter_unpack("<I", raw[:usable])}
        n = self.vu.chunk_count
        for i in sorted(recorded):
            if i < n and self._on_disk_ok(i):
                self.have.add(i)
        dropped = len(recorded) - len(self.have)
        if dropped:
            log.warning("update %s: %d journaled chunk(s) failed their hash on disk; "
                        "re-requesting them", self.vu.update_id, dropped)
        self._jfd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return set(self.have)

    def close(self) -> None:
        for fd in (self._fd, self._jfd):
            if fd is not None:
                os.close(fd)
        self._fd = self._jfd = None

    def _on_disk_ok(self, index: int) -> bool:
        assert self._fd is not None
        length = self.vu.chunk_length(index)
        data = os.pread(self._fd, length, index * self.vu.manifest.chunk_size)
        return len(data) == length and hashlib.sha256(data).digest() == \
            self.vu.manifest.chunk_sha256[index]

    # -- chunks ----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return len(self.have) == self.vu.chunk_count

    @property
    def bytes_received(self) -> int:
        return sum(self.vu.chunk_length(i) for i in self.have)

    def missing(self) -> list[int]:
        return [i for i in range(self.vu.chunk_count) if i not in self.have]

    def accept(self, index: int, data: bytes) -> bool:
        """Check and write one chunk. Returns False for a duplicate; raises Rejected when the
        index is out of range, the length is wrong or the hash does not match the manifest."""
        assert self._fd is not None and self._jfd is not None
        n = self.vu.chunk_count
        if not 0 <= index < n:
            raise Rejected(f"chunk index {index} outside 0..{n - 1}", reason="bad_chunk")
        if index in self.have:
            return False
        expected_len = self.vu.chunk_length(index)
        if len(data) != expected_len:
            raise Rejected(f"chunk {index} has {len(data)} bytes, manifest says {expected_len}",
                           reason="chunk_hash_mismatch")
        if hashlib.sha256(data).digest() != self.vu.manifest.chunk_sha256[index]:
            raise Rejected(f"chunk {index} sha256 does not match the signed manifest",
                           reason="chunk_hash_mismatch")
        os.pwrite(self._fd, data, index * self.vu.manifest.chunk_size)
        os.fsync(self._fd)
        os.write(self._jfd, struct.pack("<I", index))
        os.fsync(self._jfd)
        self.have.add(index)
        return True

    def finalize(self) -> Path:
        """All chunks in: check size and whole-payload sha256; return the payload path."""
        m = self.vu.manifest
        assert self._fd is not None
        os.ftruncate(self._fd, m.payload_size)
        if sha256_file(self.partial) != m.payload_sha256:
            raise Rejected("payload sha256 does not match the manifest",
                           reason="payload_hash_mismatch")
        return self.partial


class Transfer:
    """Pull-based chunk transfer: windows of ChunkRequests, re-requests, stall detection."""

    def __init__(self, assembler: ChunkAssembler, *, window_chunks: int,
                 request: Callable[[list[int]], bool], stall_timeout_s: float,
                 connection_id: Callable[[], int] = lambda: 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.asm = assembler
        self.window = window_chunks
        self._request = request
        self.stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._connection_id = connection_id
        self.outstanding: set[int] = set()
        self.last_progress = clock()
        self.requested_on = 0  # connection id the outstanding requests were sent on

    def request_more(self) -> None:
        """Ask for missing chunks not yet asked for, up to the window."""
        room = self.window - len(self.outstanding)
        if room <= 0:
            return
        want = [i for i in self.asm.missing() if i not in self.outstanding][:room]
        if want and self._request(want):
            self.outstanding.update(want)

    def restart_requests(self) -> None:
        """After a (re)connect or a stall: forget what was asked, ask again for what is missing.
        While disconnected nothing is sent; the reconnect calls :meth:`on_connected`."""
        self.outstanding.clear()
        self.last_progress = self._clock()
        self.requested_on = self._connection_id()
        if self.requested_on:
            self.request_more()

    def on_connected(self) -> None:
        """A new connection: re-ask unless the requests already went out on this one."""
        if self._connection_id() != self.requested_on:
            self.restart_requests()

    def on_chunk(self, index: int, data: bytes) -> bool:
        """Accept a chunk (Rejected propagates); refill the window when it drained halfway."""
        new = self.asm.accept(index, data)
        self.outstanding.discard(index)
        if new:
            self.last_progress = self._clock()
        if len(self.outstanding) <= self.window // 2:
            self.request_more()
        return new

    def stalled(self) -> bool:
        return not self.asm.complete and \
            self._clock() - self.last_progress > self.stall_timeout_s
