"""Blobs on disk, named by their sha256, written atomically, with a size limit.

Layout: ``{root}/sha256/{hex[:2]}/{hex}``. Each put also records an ``Artifact`` row when
the store was given a database engine. Used by ControllerCore.upload_artifact, the model
reconciler (source models and compiled engines), the OTA planner (deltas) and the publisher
(reading chunks). Blobs are immutable once written: a second put of the same bytes is a no-op.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from sqlalchemy.engine import Engine

from controller.fleet.db import session_scope
from controller.fleet.models import Artifact
from protos.errors import Rejected
from protos.fsutil import copy_hashing, fsync_dir

HEX = set("0123456789abcdef")


def valid_sha256(value: str) -> bool:
    return len(value) == 64 and set(value) <= HEX


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size: int
    path: Path


class ArtifactStore:
    """Content-addressed blobs under ``root``; records Artifact rows in ``engine`` if given."""

    def __init__(self, root: Path, *, max_artifact_bytes: int = 2 * 1024**3,
                 engine: Engine | None = None) -> None:
        self.root = Path(root)
        self.max_artifact_bytes = max_artifact_bytes
        self.engine = engine
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------------
    def path(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives (it may not exist: see ``has``)."""
        if not valid_sha256(sha256):
            raise Rejected(f"not a lowercase hex sha256: {sha256[:80]!r}", reason="bad_sha256")
        return self.root / "sha256" / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return valid_sha256(sha256) and self.path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        """Open a stored blob for reading; Rejected when unknown."""
        p = self.path(sha256)
        try:
            return open(p, "rb")
        except FileNotFoundError as e:
            raise Rejected(f"artifact {sha256} is not in the store", reason="not_found") from e

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    # -- writing -------------------------------------------------------------------------
    def put_bytes(self, data: bytes, *, kind: str, media_type: str = "",
                  meta: dict[str, Any] | None = None,
                  max_bytes: int | None = None) -> StoredArtifact:
        """Store ``data``; returns its sha256, size and path."""
        limit = self._limit(max_bytes)
        if len(data) > limit:
            raise Rejected(f"artifact of {len(data)} bytes exceeds limit {limit}",
                           reason="too_large")
        import io

        return self._put_stream(io.BytesIO(data), kind=kind, media_type=media_type,
                                meta=meta, limit=limit)

    def put_file(self, src: Path, *, kind: str, media_type: str = "",
                 meta: dict[str, Any] | None = None,
                 max_bytes: int | None = None) -> StoredArtifact:
        """Copy the file ``src`` into the store (hashing while copying)."""
        limit = self._limit(max_bytes)
        src = Path(src)
        try:
            size = src.stat().st_size
        except OSError as e:
            raise Rejected(f"cannot read {src}: {e}", reason="not_found") from e
        if size > limit:
            raise Rejected(f"{src.name} is {size} bytes, over the limit of {limit}",
                           reason="too_large")
        with open(src, "rb") as f:
            return self._put_stream(f, kind=kind, media_type=media_type, meta=meta, limit=limit)

    def put_stream(self, stream: IO[bytes], *, kind: str, media_type: str = "",
                   meta: dict[str, Any] | None = None,
                   max_bytes: int | None = None) -> StoredArtifact:
        """Store from a readable stream (uploads), stopping at the size limit."""
        return self._put_stream(stream, kind=kind, media_type=media_type, meta=meta,
                                limit=self._limit(max_bytes))

    def _limit(self, max_bytes: int | None) -> int:
        return min(max_bytes, self.max_artifact_bytes) if max_bytes else self.max_artifact_bytes

    def _put_stream(self, stream: IO[bytes], *, kind: str, media_type: str,
                    meta: dict[str, Any] | None, limit: int) -> StoredArtifact:
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp", prefix="put-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = copy_hashing(stream, out, max_bytes=limit, too_large=lambda: Rejected(
                    f"artifact exceeds limit of {limit} bytes", reason="too_large"))
            dest = self.path(digest)
            if dest.is_file() and dest.stat().st_size == size:
                tmp.unlink()
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)  # same filesystem: root/tmp and root/sha256
                fsync_dir(dest.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._record(digest, size, kind=kind, media_type=media_type, meta=meta)
        return StoredArtifact(digest, size, dest)

    def _record(self, digest: str, size: int, *, kind: str, media_type: str,
                meta: dict[str, Any] | None) -> None:
        if self.engine is None:
            return
        with session_scope(self.engine) as s:
            if s.get(Artifact, digest) is None:
                s.add(Artifact(sha256=digest, size=size, kind=kind, media_type=media_type,
                               created_ms=int(time.time() * 1000), meta=dict(meta or {})))
