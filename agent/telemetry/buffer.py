"""Offline buffer for telemetry, and the metrics publisher that uses it.

``OfflineBuffer`` is a bounded on-disk FIFO: one file per record (``<seq>.rec``), each written
atomically (temp file in the same folder, fsync, ``os.replace``), so a kill at any moment
leaves only whole records. It survives restarts (records are found again by name) and drops
the oldest records when ``max_bytes`` would be exceeded.

``MetricsPublisher`` (defined in :mod:`agent.telemetry.metrics`, re-exported here):
``tick()`` is called by the agent app every metrics interval with the
app's MQTT publish function (``publish(payload) -> bool``, True when the broker took it):
older buffered messages go first, in order; a message that cannot be sent is buffered with
``Metrics.buffered = True``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from agent.telemetry.metrics import MetricsPublisher, TickResult
from protos.fsutil import write_atomic

log = logging.getLogger(__name__)

SUFFIX = ".rec"
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

__all__ = ["DEFAULT_MAX_BYTES", "MetricsPublisher", "OfflineBuffer", "TickResult"]


class OfflineBuffer:
    """Bounded, persistent FIFO of byte records. Thread-safe within one process."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.dropped = 0
        # leftovers of a kill during append (".tmp-*" from agents before protos.fsutil)
        for tmp in [*self.path.glob(".*.tmp"), *self.path.glob(".tmp-*")]:
            tmp.unlink(missing_ok=True)
        self._records: list[tuple[int, int]] = []  # (seq, size), oldest first
        for f in self.path.glob(f"*{SUFFIX}"):
            try:
                self._records.append((int(f.stem), f.stat().st_size))
            except (ValueError, OSError):
                log.warning("ignoring stray file %s in the offline buffer", f)
        self._records.sort()
        self._next = self._records[-1][0] + 1 if self._records else 0
        self._bytes = sum(size for _, size in self._records)
        self._trim(0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def _file(self, seq: int) -> Path:
        return self.path / f"{seq:020d}{SUFFIX}"

    def _trim(self, incoming: int) -> None:
        while self._records and self._bytes + incoming > self.max_bytes:
            seq, size = self._records.pop(0)
            self._file(seq).unlink(missing_ok=True)
            self._bytes -= size
            self.dropped += 1
            log.warning("offline buffer full (%d bytes): dropped oldest record %d",
                        self.max_bytes, seq)

    def append(self, record: bytes) -> bool:
        """Store ``record`` durably; drops the oldest records to fit. Returns False (and
        stores nothing) when the record alone is larger than ``max_bytes``."""
        if len(record) > self.max_bytes:
            log.warning("record of %d bytes exceeds the offline buffer (%d bytes): dropped",
                        len(record), self.max_bytes)
            self.dropped += 1
            return False
        with self._lock:
            self._trim(len(record))
            seq = self._next
            self._next += 1
            write_atomic(self._file(seq), record, mode=0o600)
            self._records.append((seq, len(record)))
            self._bytes += len(record)
        return True

    def drain(self, publish: Callable[[bytes], bool]) -> int:
        """Publish records oldest first, removing each that ``publish`` accepts; stops at
        the first refusal (or exception). Returns how many were sent."""
        sent = 0
        while True:
            with self._lock:
                if not self._records:
                    return sent
                seq, size = self._records[0]
            try:
                data = self._file(seq).read_bytes()
            except OSError as e:
                log.warning("offline buffer record %d unreadable (%s): dropped", seq, e)
                data = None
            if data is not None:
                try:
                    ok = publish(data)
                except Exception:
                    log.exception("publishing a buffered record failed")
                    ok = False
                if not ok:
                    return sent
                sent += 1
            with self._lock:
                if self._records and self._records[0][0] == seq:
                    self._records.pop(0)
                    self._bytes -= size
                    self._file(seq).unlink(missing_ok=True)
