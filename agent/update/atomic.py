"""Atomic file writes (temp file in the same folder, fsync, os.replace, fsync the folder).

Used by the update state store, the slot store and the trust store so a kill at any moment
leaves either the old or the new file on disk, never a torn one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_replace(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` (same folder as ``path``) and rename it over ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK_BYTES)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
