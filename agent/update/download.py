"""Chunk assembly for one verified update: partial file, per-chunk hash, resumable windows.

:class:`ChunkAssembler` writes each chunk at ``index * chunk_size`` of ``payload.part`` after
checking its sha256 against the signed manifest (a bad chunk is rejected on arrival), and
appends the index to a journal (``chunks.idx``) so a restart knows what is on disk; on open it
re-checks every journaled chunk against its hash. :class:`Transfer` asks for a window of
missing chunks with ``ChunkRequest``, re-asks after a reconnect, and reports a stall when no
chunk arrived for ``stall_timeout_s`` (doubled after each stall in a row, up to
:data:`MAX_STALL_BACKOFF` times: a controller busy serving a big fleet is re-asked less
often, not given up on). An update fails after ``max_retries`` stalls *in a row*: a chunk
that arrives resets the count, so a slow but moving transfer (many devices sharing the
controller's bandwidth) completes, while a sender that never answers (slow retrieval) is
still refused. :class:`Fetcher` runs the transfers of every update
being downloaded (one per model key at most): it routes incoming ``UpdateChunk`` messages,
publishes the ``ChunkRequest``s, re-asks after reconnects and stalls, and hands a complete
payload back to the update manager. Used by :mod:`agent.update.manager`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig
from agent.update.state import ModelUpdateState, UpdateRecord, crash_point
from agent.update.verify import VerifiedUpdate, model_key
from protos import topics
from protos.edgefleet.v1 import update_pb2
from protos.errors import EdgefleetError, GiveUp, Rejected
from protos.fsutil import sha256_file

log = logging.getLogger(__name__)

PARTIAL_NAME = "payload.part"
JOURNAL_NAME = "chunks.idx"
CHUNK_OVERHEAD_BYTES = 1024
MAX_STALL_BACKOFF = 4          # the stall timeout grows to at most this multiple


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
        self.backoff = 0       # stalls in a row: the stall timeout is doubled this often

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

    @property
    def timeout_s(self) -> float:
        """The current stall timeout (backed off after stalls in a row)."""
        return self.stall_timeout_s * min(2 ** self.backoff, MAX_STALL_BACKOFF)

    def stalled(self) -> bool:
        return not self.asm.complete and \
            self._clock() - self.last_progress > self.timeout_s


OnComplete = Callable[[ModelUpdateState, VerifiedUpdate], None]
OnFailed = Callable[[ModelUpdateState, EdgefleetError], None]


class Fetcher:
    """The chunk transfers of the updates being downloaded, by update id (worker thread)."""

    def __init__(self, cfg: AgentConfig, *, publish: Callable[..., bool],
                 connection_id: Callable[[], int], on_complete: OnComplete,
                 on_failed: OnFailed) -> None:
        self.cfg = cfg
        self._publish = publish
        self._connection_id = connection_id
        self._on_complete = on_complete
        self._on_failed = on_failed
        self.work_root = cfg.data_path / "transfers"
        self.transfers: dict[str, tuple[ModelUpdateState, VerifiedUpdate, Transfer]] = {}

    def work_dir(self, rec: UpdateRecord) -> Path:
        return self.work_root / model_key(rec.model_name, rec.variant) / rec.update_id

    def start(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        """Open (or resume) the payload of ``ms.current`` and ask for what is missing."""
        rec = ms.current
        assert rec is not None
        asm = ChunkAssembler(vu, work_dir=self.work_dir(rec))
        have = asm.open()
        rec.bytes_received = asm.bytes_received
        if have:
            log.info("update %s: resuming with %d/%d chunks on disk", vu.update_id, len(have),
                     vu.chunk_count)
        tr = Transfer(asm, window_chunks=self.cfg.update.request_window_chunks,
                      request=lambda idx: self._request(vu.update_id, idx),
                      stall_timeout_s=self.cfg.update.stall_timeout_s,
                      connection_id=self._connection_id)
        tr.backoff = rec.stalls
        self.transfers[vu.update_id] = (ms, vu, tr)
        if asm.complete:
            self._done(ms, vu, tr)
        else:
            tr.restart_requests()

    def _request(self, update_id: str, indices: list[int]) -> bool:
        req = update_pb2.ChunkRequest(device_id=self.cfg.device_id, update_id=update_id,
                                      indices=indices)
        return self._publish(topics.device_topic(self.cfg.device_id, topics.CHUNK_REQUEST),
                             req.SerializeToString(), qos=1)

    def handle_chunk(self, data: bytes) -> None:
        """One ``UpdateChunk`` message (untrusted bytes, size-capped)."""
        limit = self.cfg.limits.max_chunk_bytes + CHUNK_OVERHEAD_BYTES
        if len(data) > limit:
            log.warning("device %s: chunk message of %d bytes over %d; ignored",
                        self.cfg.device_id, len(data), limit)
            return
        chunk = update_pb2.UpdateChunk()
        try:
            chunk.ParseFromString(data)
        except Exception as e:  # protobuf DecodeError on untrusted bytes
            log.warning("device %s: malformed chunk ignored: %s", self.cfg.device_id, e)
            return
        entry = self.transfers.get(chunk.update_id)
        if entry is None:
            log.debug("chunk %d of unknown/finished update %r ignored", chunk.index,
                      chunk.update_id)
            return
        ms, vu, tr = entry
        rec = ms.current
        assert rec is not None
        try:
            new = tr.on_chunk(chunk.index, chunk.data)
        except Rejected as e:
            self._on_failed(ms, e)
            return
        if not new:
            return
        rec.stalls = tr.backoff = 0         # progress: stalls count only in a row
        rec.bytes_received = tr.asm.bytes_received
        crash_point(f"chunk:{len(tr.asm.have)}")
        if tr.asm.complete:
            self._done(ms, vu, tr)

    def _done(self, ms: ModelUpdateState, vu: VerifiedUpdate, tr: Transfer) -> None:
        self.transfers.pop(vu.update_id, None)
        try:
            self._on_complete(ms, vu)
        finally:
            tr.asm.close()

    def payload(self, rec: UpdateRecord, vu: VerifiedUpdate) -> Path:
        """The complete, hash-checked payload of ``rec`` on disk (GiveUp when incomplete)."""
        asm = ChunkAssembler(vu, work_dir=self.work_dir(rec))
        try:
            asm.open()
            if not asm.complete:
                raise GiveUp("payload on disk is incomplete after a restart", reason="lost")
            return asm.finalize()
        finally:
            asm.close()

    def drop(self, rec: UpdateRecord) -> None:
        """Forget the transfer of a finished update and delete its files."""
        entry = self.transfers.pop(rec.update_id, None)
        if entry is not None:
            entry[2].asm.close()
        shutil.rmtree(self.work_dir(rec), ignore_errors=True)

    def close(self) -> None:
        for _, _, tr in self.transfers.values():
            tr.asm.close()

    def on_connected(self) -> None:
        for _, _, tr in list(self.transfers.values()):
            tr.on_connected()

    def check_stalls(self) -> None:
        """Re-ask stalled transfers (backing off); fail one after ``update.max_retries``
        stalls in a row."""
        if not self._connection_id():
            return  # broker unreachable is not a stall: the reconnect re-requests
        up = self.cfg.update
        for uid, (ms, _vu, tr) in list(self.transfers.items()):
            if not tr.stalled():
                continue
            rec = ms.current
            assert rec is not None
            rec.stalls += 1
            waited = tr.timeout_s
            if rec.stalls > up.max_retries:
                self._on_failed(ms, Rejected(
                    f"transfer stalled {rec.stalls} times in a row (from "
                    f"{up.stall_timeout_s}s to {waited:g}s each without a chunk); slow "
                    "retrieval", reason="stalled"))
                continue
            tr.backoff = rec.stalls
            log.warning("update %s: no chunk for %.1fs; re-requesting (%d/%d), next wait "
                        "%.1fs", uid, waited, rec.stalls, up.max_retries, tr.timeout_s)
            tr.restart_requests()
