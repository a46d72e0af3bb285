"""Delaying work queue for ``ClusterSource`` workers, one queue per kind.

Like client-go's workqueue: a key is queued at most once (the earliest due time wins),
and a key being processed is never handed to a second worker: if it is queued again
meanwhile it is parked and becomes available when ``done(key)`` is called. So several
workers may serve one queue while one object is never reconciled concurrently with itself.
All queues of a source share one condition variable (``stop`` wakes every worker).

Used by controller/crd/source.py only.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Hashable


class WorkQueue:
    """Keys due at a monotonic time; ``get`` blocks until one is due and not in process."""

    def __init__(self, cv: threading.Condition, stop: threading.Event) -> None:
        self._cv, self._stop = cv, stop
        self._heap: list[tuple[float, Hashable]] = []
        self._due: dict[Hashable, float] = {}
        self._active: set[Hashable] = set()
        self._parked: set[Hashable] = set()

    def add(self, key: Hashable, *, delay_s: float = 0.0) -> None:
        due = time.monotonic() + delay_s
        with self._cv:
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            if key in self._active:
                self._parked.add(key)  # handed out again by done()
            else:
                heapq.heappush(self._heap, (due, key))
            self._cv.notify_all()

    def get(self) -> Hashable | None:
        """The next due key (now marked in process), or None once stopped."""
        with self._cv:
            while not self._stop.is_set():
                while self._heap:
                    due, key = self._heap[0]
                    if self._due.get(key) != due:
                        heapq.heappop(self._heap)  # superseded entry
                    elif key in self._active:
                        heapq.heappop(self._heap)
                        self._parked.add(key)
                    else:
                        break
                if self._heap and self._heap[0][0] <= time.monotonic():
                    _, key = heapq.heappop(self._heap)
                    del self._due[key]
                    self._active.add(key)
                    return key
                timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                self._cv.wait(timeout)
        return None

    def done(self, key: Hashable) -> None:
        """The worker finished ``key``: a request queued meanwhile becomes available."""
        with self._cv:
            self._active.discard(key)
            if key in self._parked:
                self._parked.discard(key)
                if key in self._due:
                    heapq.heappush(self._heap, (self._due[key], key))
                    self._cv.notify_all()

    def in_process(self) -> set[Hashable]:
        with self._cv:
            return set(self._active)

    def __len__(self) -> int:
        with self._cv:
            return len(self._due)
