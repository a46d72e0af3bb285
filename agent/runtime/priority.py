"""Run loading work at a lower OS priority than serving (Linux: nice is per thread), in one
long-lived loader thread.

Called by :meth:`agent.runtime.registry.ModelRegistry.activate` for the hash, session
creation and warm-up of a new engine, so that a hot swap takes CPU from idle time rather
than from requests being served.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _can_restore_priority(nice: int) -> bool:
    """Whether this process may set a thread back to ``nice`` after raising it (root, or
    RLIMIT_NICE allows it: systemd ``LimitNICE=+0``)."""
    if os.geteuid() == 0:
        return True
    try:
        import resource
        soft, _hard = resource.getrlimit(resource.RLIMIT_NICE)
    except (ImportError, OSError, ValueError):
        return False
    return soft == resource.RLIM_INFINITY or nice >= 20 - soft


class _Job:
    __slots__ = ("base", "done", "error", "fn", "nice", "value")

    def __init__(self, fn: Callable[[], object], *, nice: int, base: int) -> None:
        self.fn, self.nice, self.base = fn, nice, base
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None


class _Worker:
    """One long-lived low-priority thread (one thread = one malloc arena: a new thread per
    load would spread engine memory over many arenas and keep it after the engine closes)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="model-loader",
                                                daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def is_current(self) -> bool:
        return self._thread is threading.current_thread()

    def _loop(self) -> None:
        tid = threading.get_native_id()
        while True:
            job = self._jobs.get()
            before = _thread_ids()
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) != job.nice:
                    os.setpriority(os.PRIO_PROCESS, tid, job.nice)
            except OSError:
                pass
            try:
                job.value = job.fn()
            except BaseException as e:  # re-raised in the caller
                job.error = e
            finally:
                base = job.base
                for other in _thread_ids() - before - {tid}:
                    try:  # threads fn started (a session's pool) serve: normal priority
                        if os.getpriority(os.PRIO_PROCESS, other) != base:
                            os.setpriority(os.PRIO_PROCESS, other, base)
                    except OSError:  # thread ended meanwhile, or not permitted
                        pass
                job.done.set()


_WORKER = _Worker()


def run_at_lower_priority(fn: Callable[[], T], *, nice: int) -> T:
    """Run ``fn`` in the loader thread, whose OS priority is ``nice`` steps lower than the
    caller's (Linux: nice is per thread), and wait for it. Threads that ``fn`` starts (an
    onnxruntime session's intra-op pool, which inherits the priority) are set back to the
    caller's priority afterwards; where the process may not do that (no root, no
    ``LimitNICE``), ``fn`` runs in the caller at normal priority instead, so that serving
    threads never end up deprioritised."""
    if nice <= 0 or sys.platform != "linux" or not hasattr(os, "setpriority") \
            or _WORKER.is_current():
        return fn()
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if not _can_restore_priority(base):
        return fn()
    job = _Job(fn, nice=min(19, base + nice), base=base)
    _WORKER.submit(job)
    job.done.wait()
    if job.error is not None:
        raise job.error
    return job.value  # type: ignore[return-value]
