"""Durable file helpers shared by the controller and the agent.

Atomic writes (temp file in the same folder, fsync, ``os.replace``, fsync the folder) so a
kill at any moment leaves either the old or the new file on disk, never a torn one, and the
sha256 of a file read in blocks. Lives in protos because it is the one package both sides
import. Used by the agent's state/slot/trust stores and enrollment, and on the controller
side by the artifact store, signing keys, the fleet PKI, builder identities and compilers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

READ_BLOCK_BYTES = 1024 * 1024


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a file in ``path``'s folder; on a clean exit it replaces ``path`` durably.

    The temp file gets ``mode`` before any byte is written (private keys never exist with
    looser permissions). On an exception the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` atomically (file mode ``mode``); returns ``path``."""
    with atomic_writer(path, mode=mode) as f:
        f.write(data)
    return Path(path)


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` (written by someone else, same folder as ``path``) and rename it over."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def copy_hashing(src: IO[bytes], dst: IO[bytes], *, max_bytes: int,
                 too_large: Callable[[], Exception]) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` in blocks, hashing; ``too_large()`` is raised past ``max_bytes``.

    Returns (hex sha256, size). ``dst`` is flushed and fsynced.
    """
    h = hashlib.sha256()
    size = 0
    while block := src.read(READ_BLOCK_BYTES):
        size += len(block)
        if size > max_bytes:
            raise too_large()
        h.update(block)
        dst.write(block)
    dst.flush()
    os.fsync(dst.fileno())
    return h.hexdigest(), size
