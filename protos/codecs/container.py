"""Delta file header and the atomic, hashing, size-bounded output writer.

Every delta file made by :mod:`protos.codecs` starts with the same header (see docs/deltas.md):
magic, version, header length, codec name, target size and sha256, base size and sha256. The
codec modules (``full``, ``blocks``, ``tensorxor``) write it with :func:`write_header` and read it
back with :func:`read_header`; :class:`AtomicSink` is where every ``apply`` writes its output.
Only byte operations here: the agent runs this code.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from protos.errors import Rejected
from protos.fsutil import sha256_file

MAGIC = b"EFDL"
VERSION = 1
# magic, version u16, header_len u16, codec name 16s, target_size u64, target sha256,
# base_size u64, base sha256 (all zero when the delta needs no base)
_HEADER = struct.Struct("<4sHH16sQ32sQ32s")
HEADER_BYTES = _HEADER.size
NO_BASE = b"\0" * 32
READ_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Header:
    """The fixed header every delta file starts with."""

    codec: str
    target_size: int
    target_sha256: str
    base_size: int
    base_sha256: str | None  # None: the delta does not read the base file

    def pack(self) -> bytes:
        base = bytes.fromhex(self.base_sha256) if self.base_sha256 else NO_BASE
        return _HEADER.pack(MAGIC, VERSION, HEADER_BYTES, self.codec.encode("ascii"),
                            self.target_size, bytes.fromhex(self.target_sha256),
                            self.base_size, base)


def read_header(f: BinaryIO) -> Header:
    """Parse the header at the start of ``f``; raises Rejected when it is not one of ours."""
    raw = f.read(HEADER_BYTES)
    if len(raw) != HEADER_BYTES:
        raise Rejected("delta is shorter than its header", reason="delta_malformed")
    magic, version, header_len, codec, tsize, tsha, bsize, bsha = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise Rejected("not an edgefleet delta (bad magic)", reason="delta_malformed")
    if version != VERSION or header_len < HEADER_BYTES:
        raise Rejected(f"unsupported delta version {version}", reason="delta_malformed")
    if header_len > HEADER_BYTES:  # room for later optional fields: skip them
        f.seek(header_len - HEADER_BYTES, os.SEEK_CUR)
    try:
        name = codec.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError as e:
        raise Rejected("delta codec name is not ascii", reason="delta_malformed") from e
    return Header(codec=name, target_size=tsize, target_sha256=tsha.hex(), base_size=bsize,
                  base_sha256=None if bsha == NO_BASE else bsha.hex())


_SHA_MEMO: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path, *, memo: bool = False) -> str:
    """sha256 hex of a file, read in chunks.

    ``memo=True`` (make/plan on the controller, which hash the same inputs several times)
    reuses a result for the same path, inode, size and mtime; ``apply`` never does.
    """
    if memo:
        st = path.stat()
        key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _SHA_MEMO:
            if len(_SHA_MEMO) > 64:
                _SHA_MEMO.clear()
            _SHA_MEMO[key] = file_sha256(path)
        return _SHA_MEMO[key]
    return sha256_file(path)


def check_header(header: Header, *, codec: str, old: Path | None, max_output_bytes: int,
                 expected_sha256: str, memo: bool = False) -> None:
    """Everything that can be refused before a single output byte is written. ``memo``: the
    base hash may come from :func:`file_sha256`'s memo (the planner's own check only)."""
    if header.codec != codec:
        raise Rejected(f"delta holds codec {header.codec!r}, expected {codec!r}",
                       reason="delta_codec_mismatch")
    if header.target_sha256 != expected_sha256.lower():
        raise Rejected("delta was made for another target (sha256 differs from the manifest)",
                       reason="delta_target_mismatch")
    if header.target_size > max_output_bytes:
        raise Rejected(f"delta output {header.target_size} bytes is over max_output_bytes="
                       f"{max_output_bytes}", reason="delta_too_large")
    if header.base_sha256 is None:
        return
    if old is None:
        raise Rejected("delta needs a base file and none was given", reason="delta_wrong_base")
    if old.stat().st_size != header.base_size or file_sha256(old, memo=memo) != header.base_sha256:
        raise Rejected("base file is not the one this delta was made from",
                       reason="delta_wrong_base")


class Sink(Protocol):
    """Where a codec's ``apply`` writes the target: :class:`AtomicSink` or :class:`HashSink`."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...


class HashSink:
    """Output that keeps nothing: counts and hashes what ``apply`` produces, with the checks of
    :class:`AtomicSink`. The planner verifies a delta with it (no temp file, no fsync)."""

    def __init__(self, *, limit_bytes: int, expected_sha256: str) -> None:
        self.limit_bytes = limit_bytes
        self.expected_sha256 = expected_sha256.lower()
        self.written = 0
        self._hash = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)
        if self.written > self.limit_bytes:
            raise Rejected(f"delta output exceeds its declared size {self.limit_bytes}",
                           reason="delta_malformed")
        self._hash.update(data)

    def commit(self) -> None:
        if self.written != self.limit_bytes:
            raise Rejected(f"delta produced {self.written} bytes, header says "
                           f"{self.limit_bytes}", reason="delta_malformed")
        if self._hash.hexdigest() != self.expected_sha256:
            raise Rejected("patched output sha256 does not match the expected sha256",
                           reason="delta_hash_mismatch")


class AtomicSink:
    """Output writer: temp file beside ``out``, sha256 while writing, size cap, fsync, replace.

    ``write`` raises Rejected as soon as more than ``limit_bytes`` arrive; ``commit`` checks the
    length and hash and only then renames onto ``out``. ``close`` without commit removes the
    temp file, so a failed apply never leaves a partial file at ``out``.
    """

    def __init__(self, out: Path, *, limit_bytes: int, expected_sha256: str) -> None:
        self.out = out
        self.limit_bytes = limit_bytes
        self.expected_sha256 = expected_sha256.lower()
        self.written = 0
        self._hash = hashlib.sha256()
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
        self._tmp = Path(name)
        self._f: BinaryIO | None = os.fdopen(fd, "wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._f is not None
        self.written += len(data)
        if self.written > self.limit_bytes:
            raise Rejected(f"delta output exceeds its declared size {self.limit_bytes}",
                           reason="delta_malformed")
        self._hash.update(data)
        self._f.write(data)

    def commit(self) -> None:
        assert self._f is not None
        if self.written != self.limit_bytes:
            raise Rejected(f"delta produced {self.written} bytes, header says "
                           f"{self.limit_bytes}", reason="delta_malformed")
        if self._hash.hexdigest() != self.expected_sha256:
            raise Rejected("patched output sha256 does not match the expected sha256",
                           reason="delta_hash_mismatch")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.out)
        _fsync_dir(self.out.parent)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(out: Path) -> Iterator[BinaryIO]:
    """File for ``make`` to write: temp in the same folder, fsync and replace on success."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class BoundedReader:
    """Reads exact-length fields from the delta body; every short read is a Rejected."""

    def __init__(self, f: BinaryIO, *, end: int) -> None:
        self.f = f
        self.end = end

    def remaining(self) -> int:
        return self.end - self.f.tell()

    def exact(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining():
            raise Rejected(f"delta truncated or malformed reading {what}",
                           reason="delta_malformed")
        data = self.f.read(n)
        if len(data) != n:
            raise Rejected(f"delta truncated reading {what}", reason="delta_malformed")
        return data

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.exact(8, what))[0])
