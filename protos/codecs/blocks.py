"""Codec ``bsdiff4``: bsdiff4 on bounded-size blocks, with cheaper per-block methods.

Whole-file bsdiff4 needs ~17 bytes of memory per input byte and goes quadratic on
zero-heavy or repetitive data. Here the target is cut into blocks of ``BLOCK_BYTES``; each
block is matched to a window of the base (offset found by voting on sampled 16-byte
anchors, so inserted or removed bytes upstream do not break the alignment) and encoded with
the smallest of:

* ``COPY``   the block equals the base window (no payload),
* ``ZSTD``   zstd with the base window as raw-content dictionary (``--patch-from`` per block),
* ``BSDIFF`` bsdiff4 control/diff/extra streams, each zstd-compressed.

bsdiff runs in worker processes under a deadline (``make`` raises GiveUp reason ``timeout``
when it passes), is skipped on repetitive blocks, and is switched off for the whole file
when a probe on two blocks shows it does not beat ``ZSTD``. ``apply`` holds one window and one
block at a time. Record layout: docs/deltas.md. Called by :mod:`protos.codecs`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import bsdiff4.core
import zstandard

from protos.codecs.container import AtomicSink, BoundedReader, Header, file_sha256
from protos.errors import GiveUp, Rejected

BLOCK_BYTES = 2 << 20
MARGIN_BYTES = 256 << 10
MAX_BLOCK_BYTES = 64 << 20       # apply refuses larger records (memory bound)
MAX_WINDOW_BYTES = 80 << 20
INPROCESS_BYTES = 64 << 10       # blocks this small are cheap even for quadratic bsdiff
REPETITIVE_RATIO = 0.1           # bsdiff is skipped on blocks zstd -1 shrinks below this
ZSTD_LEVEL = 12
ANCHOR_BYTES = 16
PROBE_BYTES = 256 << 10
PROBE_MARGIN_BYTES = 64 << 10

COPY, ZSTD, BSDIFF = 0, 1, 2
METHOD_NAMES = ("copy", "zstd", "bsdiff")
_REC = struct.Struct("<BQQQQ")  # method, new_len, old_off, old_len, payload_len


def _zc(data: bytes, dict_bytes: bytes = b"") -> bytes:
    d = zstandard.ZstdCompressionDict(dict_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT) \
        if dict_bytes else None
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=d).compress(data)


def _zd(data: bytes, size: int, dict_bytes: bytes = b"") -> bytes:
    d = zstandard.ZstdCompressionDict(dict_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT) \
        if dict_bytes else None
    try:
        out = zstandard.ZstdDecompressor(dict_data=d).decompress(data, max_output_size=size)
    except zstandard.ZstdError as e:
        raise Rejected(f"corrupt zstd payload in block: {e}", reason="delta_malformed") from e
    if len(out) != size:
        raise Rejected("block payload has the wrong length", reason="delta_malformed")
    return out


def _repetitive(data: bytes) -> bool:
    """Runs and short periods make bsdiff quadratic; zstd -1 squeezing a block below
    ``REPETITIVE_RATIO`` of its size flags them (and ZSTD handles such blocks well anyway)."""
    if len(data) < 4096:
        return False
    return len(zstandard.ZstdCompressor(level=1).compress(data)) < REPETITIVE_RATIO * len(data)


def _encode_bsdiff(old_w: bytes, new_b: bytes) -> bytes:
    ctl, diff, extra = bsdiff4.core.diff(old_w, new_b)
    parts = [struct.pack("<QQQ", len(ctl) // 24, len(diff), len(extra))]
    for raw in (ctl, diff, extra):
        z = _zc(raw)
        parts += [struct.pack("<Q", len(z)), z]
    return b"".join(parts)


def encode_block(old_path: str, new_path: str, new_off: int, new_len: int, old_off: int,
                 old_len: int, *, try_bsdiff: bool) -> tuple[bytes, str]:
    """Encode one block (runs in a worker). Returns (record bytes, method name)."""
    with open(new_path, "rb") as f:
        f.seek(new_off)
        new_b = f.read(new_len)
    old_w = b""
    if old_path and old_len:
        with open(old_path, "rb") as f:
            f.seek(old_off)
            old_w = f.read(old_len)
    best_method, best_payload = ZSTD, _zc(new_b, old_w)
    if try_bsdiff and old_w and not (_repetitive(new_b) or _repetitive(old_w)):
        payload = _encode_bsdiff(old_w, new_b)
        if len(payload) < len(best_payload):
            best_method, best_payload = BSDIFF, payload
    rec = _REC.pack(best_method, new_len, old_off, old_len, len(best_payload)) + best_payload
    return rec, METHOD_NAMES[best_method]


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


def _plan_blocks(old_m: bytes | mmap.mmap, new_m: bytes | mmap.mmap, *,
                 block_bytes: int) -> list[tuple[int, int, int, int, bool, int]]:
    """(new_off, new_len, old_off, old_len, is_copy, centre) for every block of the target;
    centre is where the block's first byte is expected in the base."""
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
        if 0 <= centre and centre + n <= len(old_m) and old_m[centre:centre + n] == new_m[off:off + n]:
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
        plan = _plan_blocks(old_m, new_m, block_bytes=block_bytes)
    old_s, new_s = str(old) if old is not None else "", str(new)
    tasks = [(old_s, new_s, o, n, oo, ol, True) for (o, n, oo, ol, copy, _) in plan if not copy]
    centres = [c for (*_, copy, c) in plan if not copy]
    methods: Counter[str] = Counter()
    encoded: dict[int, bytes] = {}
    if tasks:
        encoded = _run_tasks(tasks, centres, deadline=deadline, methods=methods)
    for (o, n, oo, ol, copy, _) in plan:
        if copy:
            methods["copy"] += 1
            out_f.write(_REC.pack(COPY, n, oo, ol, 0))
        else:
            out_f.write(encoded[o])
    if stats is not None:
        stats["blocks"] = dict(methods)
    return header


Task = tuple[str, str, int, int, int, int, bool]


def _run_tasks(tasks: list[Task], centres: list[int], *, deadline: float,
               methods: Counter[str]) -> dict[int, bytes]:
    """Probe bsdiff on two slices, then encode every block (bsdiff only if the probe paid off)."""
    if all(t[3] <= INPROCESS_BYTES for t in tasks):
        out = {}
        for t in tasks:
            rec, name = encode_block(*t[:6], try_bsdiff=t[6])
            out[t[2]] = rec
            methods[name] += 1
        return out
    with _Workers(min(len(tasks), os.cpu_count() or 1), deadline=deadline) as workers:
        probes = [_probe_task(tasks[i], centres[i])
                  for i in sorted({len(tasks) // 3, 2 * len(tasks) // 3})]
        use_bsdiff = any(name == "bsdiff" for _, name in workers.run(probes))
        done = [t[:6] + (use_bsdiff,) for t in tasks]
        results = workers.run(done)
    for (_rec, name) in results:
        methods[name] += 1
    methods["bsdiff_probe_won" if use_bsdiff else "bsdiff_probe_lost"] += 1
    return {t[2]: r[0] for t, r in zip(done, results, strict=True)}


def _probe_task(t: Task, centre: int) -> Task:
    """A PROBE_BYTES slice from the middle of a block, with the matching part of its window:
    bsdiff on it tells cheaply whether bsdiff beats zstd on this pair of files."""
    old_s, new_s, o, n, oo, ol, _ = t
    p = min(n, PROBE_BYTES)
    mid = o + (n - p) // 2
    disp = centre - o
    lo = max(oo, min(mid + disp - PROBE_MARGIN_BYTES, oo + ol))
    hi = max(lo, min(mid + disp + p + PROBE_MARGIN_BYTES, oo + ol))
    return (old_s, new_s, mid, p, lo, hi - lo, True)


class _Workers:
    """A few ``protos.codecs.blockworker`` processes, all killed when the deadline passes."""

    def __init__(self, n: int, *, deadline: float) -> None:
        self.deadline = deadline
        self.procs = [subprocess.Popen([sys.executable, "-m", "protos.codecs.blockworker"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                      for _ in range(max(1, n))]
        self.timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._kill)
        self.timer.daemon = True
        self.timed_out = False
        self.timer.start()

    def _kill(self) -> None:
        self.timed_out = True
        for p in self.procs:
            p.kill()

    def _one(self, proc: subprocess.Popen[bytes], task: Task) -> tuple[bytes, str]:
        assert proc.stdin is not None and proc.stdout is not None
        keys = ("old", "new", "new_off", "new_len", "old_off", "old_len", "try_bsdiff")
        proc.stdin.write(json.dumps(dict(zip(keys, task, strict=True))).encode() + b"\n")
        proc.stdin.flush()
        head = proc.stdout.read(9)
        if len(head) != 9:
            raise EOFError("block worker died")
        n, method = struct.unpack("<QB", head)
        rec = proc.stdout.read(n)
        if len(rec) != n:
            raise EOFError("block worker died")
        return rec, METHOD_NAMES[method]

    def run(self, tasks: list[Task]) -> list[tuple[bytes, str]]:
        results: list[tuple[bytes, str] | None] = [None] * len(tasks)
        lock = threading.Lock()
        queue = list(enumerate(tasks))
        errors: list[BaseException] = []

        def loop(proc: subprocess.Popen[bytes]) -> None:
            while True:
                with lock:
                    if not queue or errors:
                        return
                    i, t = queue.pop(0)
                try:
                    results[i] = self._one(proc, t)
                except (OSError, EOFError, ValueError) as e:
                    errors.append(e)
                    return

        threads = [threading.Thread(target=loop, args=(p,), daemon=True) for p in self.procs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if self.timed_out or time.monotonic() >= self.deadline:
            raise GiveUp("bsdiff4 block delta ran past its time limit", reason="timeout")
        if errors:
            raise GiveUp(f"bsdiff4 block worker failed: {errors[0]}", reason="worker_failed")
        return [r for r in results if r is not None]

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        for p in self.procs:
            if p.stdin:
                try:
                    p.stdin.close()
                except OSError:  # worker already killed at the deadline
                    pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()


class _mapped:
    """Read-only mmap of a file (empty bytes for None or an empty file)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._f: BinaryIO | None = None
        self._m: mmap.mmap | None = None

    def __enter__(self) -> bytes | mmap.mmap:
        if self.path is None or self.path.stat().st_size == 0:
            return b""
        self._f = open(self.path, "rb")
        self._m = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._m

    def __exit__(self, *exc: object) -> None:
        if self._m is not None:
            self._m.close()
        if self._f is not None:
            self._f.close()


def apply_blocks(r: BoundedReader, header: Header, old: Path | None, sink: AtomicSink) -> None:
    """Rebuild the target record by record; every record is validated before use."""
    with _mapped(old) as old_m:
        produced = 0
        while r.remaining() > 0:
            method, new_len, old_off, old_len, plen = _REC.unpack(r.exact(_REC.size, "record"))
            if new_len > MAX_BLOCK_BYTES or old_len > MAX_WINDOW_BYTES \
                    or produced + new_len > header.target_size \
                    or old_off + old_len > len(old_m) or plen > r.remaining():
                raise Rejected("block record out of bounds", reason="delta_malformed")
            window = bytes(old_m[old_off:old_off + old_len])
            payload = r.exact(plen, "block payload")
            if method == COPY:
                if old_len != new_len or plen:
                    raise Rejected("bad COPY record", reason="delta_malformed")
                block = window
            elif method == ZSTD:
                block = _zd(payload, new_len, window)
            elif method == BSDIFF:
                block = _decode_bsdiff(payload, window, new_len)
            else:
                raise Rejected(f"unknown block method {method}", reason="delta_malformed")
            sink.write(block)
            produced += new_len


def _decode_bsdiff(payload: bytes, window: bytes, new_len: int) -> bytes:
    if len(payload) < 24:
        raise Rejected("short bsdiff record", reason="delta_malformed")
    n_ctl, diff_len, extra_len = struct.unpack_from("<QQQ", payload, 0)
    if diff_len + extra_len != new_len or n_ctl > new_len + 1:
        raise Rejected("bsdiff record sizes disagree", reason="delta_malformed")
    pos, raws = 24, []
    for size in (n_ctl * 24, diff_len, extra_len):
        if pos + 8 > len(payload):
            raise Rejected("short bsdiff record", reason="delta_malformed")
        (zlen,) = struct.unpack_from("<Q", payload, pos)
        pos += 8
        if pos + zlen > len(payload):
            raise Rejected("short bsdiff record", reason="delta_malformed")
        raws.append(_zd(payload[pos:pos + zlen], size))
        pos += zlen
    import numpy as np  # here, not at the top: block workers stay small without numpy

    u = np.frombuffer(raws[0], dtype="<u8").reshape(-1, 3)
    mag = (u & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(object)
    xs, ys = mag[:, 0], mag[:, 1]
    if (u[:, :2] >> np.uint64(63)).any() or sum(xs) != diff_len or sum(ys) != extra_len:
        raise Rejected("bsdiff control stream is inconsistent", reason="delta_malformed")
    try:
        return bytes(bsdiff4.core.patch(window, new_len, raws[0], raws[1], raws[2]))
    except (ValueError, TypeError, OverflowError) as e:
        raise Rejected(f"bsdiff patch failed: {e}", reason="delta_malformed") from e
