"""``make`` of the ``bsdiff4`` block codec: alignment, probing and the bsdiff worker.

The target is cut into ``BLOCK_BYTES`` blocks; each block is aligned to the base by voting
(16-byte anchors sampled from the base are indexed, 8 probes per block look them up, the most
common displacement wins), then written as a COPY record when it equals the aligned base range,
else as the smaller of its ZSTD/COPY pieces (made here, in the calling process, with bounded
zstd tables) and one BSDIFF record. bsdiff can go quadratic, so it runs in ONE worker process
(``python -m protos.codecs.blockworker``, killed at the deadline: GiveUp reason ``timeout``)
while this process makes the ZSTD pieces of the same block: two cores busy, and memory bounded
by one bsdiff window (~17 B per window byte) instead of one per core. bsdiff is skipped on
repetitive blocks and switched off for the whole file when a probe (bsdiff on 256 KiB slices
of two blocks) does not beat ZSTD; blocks of at most ``INPROCESS_BYTES`` are bsdiffed here.
Records are written in target order as they are made. Called by :mod:`protos.codecs.core`.
"""

from __future__ import annotations

import json
import mmap
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import BinaryIO

from protos.codecs.blocks import (
    BLOCK_BYTES,
    BSDIFF,
    COPY,
    MARGIN_BYTES,
    REC,
    _mapped,
    encode_bsdiff,
    pread,
    repetitive,
    zc,
    zstd_records,
)
from protos.codecs.container import Header, file_sha256
from protos.errors import GiveUp

INPROCESS_BYTES = 64 << 10       # blocks this small are cheap even for quadratic bsdiff
ANCHOR_BYTES = 16
PROBE_BYTES = 256 << 10
PROBE_MARGIN_BYTES = 64 << 10

# new_off, new_len, old_off, old_len (bsdiff window), is_copy, centre (expected base offset)
Entry = tuple[int, int, int, int, bool, int]


class _Aligner:
    """Finds, for a region of the target, the displacement of the matching base region."""

    def __init__(self, old: bytes | mmap.mmap, *, stride: int) -> None:
        self.old = old
        self.stride = stride
        self.index: dict[bytes, int] = {}
        for p in range(0, max(0, len(old) - ANCHOR_BYTES), stride):
            key = bytes(old[p:p + ANCHOR_BYTES])
            if len(set(key)) >= 6:
                self.index.setdefault(key, p)

    def displacement(self, new: bytes | mmap.mmap, off: int, length: int) -> int | None:
        votes: Counter[int] = Counter()
        probes = 8
        for j in range(probes):
            q0 = off + j * max(1, length // probes)
            for q in range(q0, min(q0 + self.stride, off + length - ANCHOR_BYTES)):
                p = self.index.get(bytes(new[q:q + ANCHOR_BYTES]))
                if p is not None:
                    votes[p - q] += 1
                    break
        return votes.most_common(1)[0][0] if votes else None


def plan_blocks(old_m: bytes | mmap.mmap, new_m: bytes | mmap.mmap, *,
                block_bytes: int) -> list[Entry]:
    """One entry per block of the target (see ``Entry``)."""
    stride = max(256, len(old_m) // (1 << 18))
    aligner = _Aligner(old_m, stride=stride) if len(old_m) else None
    plan = []
    for off in range(0, len(new_m), block_bytes):
        n = min(block_bytes, len(new_m) - off)
        if aligner is None:
            plan.append((off, n, 0, 0, False, 0))
            continue
        disp = aligner.displacement(new_m, off, n)
        centre = off + (disp if disp is not None else 0)
        if 0 <= centre and centre + n <= len(old_m) \
                and old_m[centre:centre + n] == new_m[off:off + n]:
            plan.append((off, n, centre, n, True, centre))
            continue
        lo = max(0, min(centre - MARGIN_BYTES, len(old_m)))
        hi = max(lo, min(centre + n + MARGIN_BYTES, len(old_m)))
        plan.append((off, n, lo, hi - lo, False, centre))
    return plan


def make_blocks(old: Path | None, new: Path, out_f: BinaryIO, *, time_limit_s: float = 60.0,
                block_bytes: int = BLOCK_BYTES, stats: dict[str, object] | None = None) -> Header:
    """Write the block delta of ``new`` against ``old``; GiveUp(reason='timeout') past the limit."""
    deadline = time.monotonic() + time_limit_s
    new_size = new.stat().st_size
    old_size = old.stat().st_size if old is not None else 0
    base_sha = file_sha256(old, memo=True) if old is not None and old_size else None
    header = Header(codec="bsdiff4", target_size=new_size,
                    target_sha256=file_sha256(new, memo=True), base_size=old_size,
                    base_sha256=base_sha)
    out_f.write(header.pack())
    with _mapped(new) as new_m, _mapped(old) as old_m:
        plan = plan_blocks(old_m, new_m, block_bytes=block_bytes)
    methods: Counter[str] = Counter()
    with _Encoder(old if old_size else None, new, deadline=deadline) as enc:
        todo = [e for e in plan if not e[4]]
        if todo and old_size:
            enc.use_bsdiff = enc.probe([todo[i] for i in sorted({len(todo) // 3,
                                                                2 * len(todo) // 3})])
            methods["bsdiff_probe_won" if enc.use_bsdiff else "bsdiff_probe_lost"] += 1
        for entry in plan:
            if entry[4]:
                out_f.write(REC.pack(COPY, entry[1], entry[2], entry[3], 0))
                methods["copy"] += 1
                continue
            for rec, name in enc.encode(entry):
                out_f.write(rec)
                methods[name] += 1
    if stats is not None:
        stats["blocks"] = dict(methods)
    return header


class _Encoder:
    """Encodes non-COPY blocks; owns the input files and (lazily) the one bsdiff worker."""

    def __init__(self, old: Path | None, new: Path, *, deadline: float) -> None:
        self.old, self.new, self.deadline = old, new, deadline
        self.use_bsdiff = False
        self._new_f = open(new, "rb")
        self._old_f = open(old, "rb") if old is not None else None
        self.old_size = old.stat().st_size if old is not None else 0
        self._worker: _Worker | None = None

    def _check_deadline(self) -> None:
        if time.monotonic() >= self.deadline:
            raise GiveUp("bsdiff4 block delta ran past its time limit", reason="timeout")

    def _bsdiff_start(self, new_off: int, new_len: int, old_off: int,
                      old_len: int) -> bytes | None:
        """Small ranges are bsdiffed here (returns the payload); larger ones go to the worker
        (returns None: collect with ``_bsdiff_finish``)."""
        if new_len <= INPROCESS_BYTES:
            assert self._old_f is not None
            return encode_bsdiff(pread(self._old_f.fileno(), old_off, old_len),
                                 pread(self._new_f.fileno(), new_off, new_len))
        if self._worker is None:
            self._worker = _Worker(deadline=self.deadline)
        self._worker.submit({"old": str(self.old), "new": str(self.new), "new_off": new_off,
                             "new_len": new_len, "old_off": old_off, "old_len": old_len})
        return None

    def _bsdiff_finish(self) -> bytes:
        assert self._worker is not None
        return self._worker.result()

    def probe(self, entries: list[Entry]) -> bool:
        """bsdiff on a PROBE_BYTES slice from the middle of each entry, against the matching
        part of its window: True when it beats ZSTD on any of them."""
        assert self._old_f is not None
        for o, n, oo, ol, _copy, centre in entries:
            self._check_deadline()
            p = min(n, PROBE_BYTES)
            mid = o + (n - p) // 2
            disp = centre - o
            lo = max(oo, min(mid + disp - PROBE_MARGIN_BYTES, oo + ol))
            hi = max(lo, min(mid + disp + p + PROBE_MARGIN_BYTES, oo + ol))
            new_b = pread(self._new_f.fileno(), mid, p)
            window = pread(self._old_f.fileno(), lo, hi - lo)
            if not window or repetitive(new_b) or repetitive(window):
                continue
            ready = self._bsdiff_start(mid, p, lo, hi - lo)
            z = len(zc(new_b, window))
            payload = ready if ready is not None else self._bsdiff_finish()
            if len(payload) < z:
                return True
        return False

    def encode(self, entry: Entry) -> list[tuple[bytes, str]]:
        """Records for one non-COPY block: its ZSTD/COPY pieces, or one BSDIFF record when
        that is smaller. bsdiff (worker) and the pieces (here) run at the same time."""
        self._check_deadline()
        o, n, oo, ol, _copy, centre = entry
        new_b = pread(self._new_f.fileno(), o, n)
        pending, ready = False, None
        if self.use_bsdiff and ol and self._old_f is not None and not repetitive(new_b) \
                and not repetitive(pread(self._old_f.fileno(), oo, ol)):
            ready = self._bsdiff_start(o, n, oo, ol)
            pending = ready is None
        old_fd = self._old_f.fileno() if self._old_f is not None else None
        pieces = zstd_records(old_fd, self.old_size, new_b, centre)
        del new_b
        payload = self._bsdiff_finish() if pending else ready
        if payload is not None and \
                REC.size + len(payload) < sum(len(rec) for rec, _ in pieces):
            return [(REC.pack(BSDIFF, n, oo, ol, len(payload)) + payload, "bsdiff")]
        return pieces

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._worker is not None:
            self._worker.close(kill=exc_type is not None)
        self._new_f.close()
        if self._old_f is not None:
            self._old_f.close()


class _Worker:
    """One ``protos.codecs.blockworker`` process, killed when the deadline passes."""

    def __init__(self, *, deadline: float) -> None:
        self.deadline = deadline
        self.proc = subprocess.Popen([sys.executable, "-m", "protos.codecs.blockworker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.timed_out = False
        self.timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._kill)
        self.timer.daemon = True
        self.timer.start()

    def _kill(self) -> None:
        self.timed_out = True
        self.proc.kill()

    def _failed(self, e: BaseException | None) -> GiveUp:
        if self.timed_out or time.monotonic() >= self.deadline:
            return GiveUp("bsdiff4 block delta ran past its time limit", reason="timeout")
        return GiveUp(f"bsdiff4 block worker failed: {e or 'died'}", reason="worker_failed")

    def submit(self, task: dict[str, object]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(task).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise self._failed(e) from e

    def result(self) -> bytes:
        assert self.proc.stdout is not None
        try:
            head = self.proc.stdout.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            payload = self.proc.stdout.read(n) if n >= 0 else b""
        except OSError as e:
            raise self._failed(e) from e
        if n < 0 or len(payload) != n:
            raise self._failed(None)
        if self.timed_out:
            raise self._failed(None)
        return payload

    def close(self, *, kill: bool = False) -> None:
        self.timer.cancel()
        if kill:  # a failure or the deadline: do not wait for a bsdiff that may run for minutes
            self.proc.kill()
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:  # worker already killed at the deadline
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

