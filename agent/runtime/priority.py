"""Run loading work at a lower OS priority than serving (Linux: nice is per thread).

Called by :meth:`agent.runtime.registry.ModelRegistry.activate` for the hash, session
creation and warm-up of a new engine, so that a hot swap takes CPU from idle time rather
than from requests being served.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
#: GIL switch interval while a model loads (see run_at_lower_priority)
LOAD_SWITCH_INTERVAL_S = 0.0005


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


def run_at_lower_priority(fn: Callable[[], T], *, nice: int) -> T:
    """Run ``fn`` in the calling thread with its OS priority ``nice`` steps lower (Linux:
    nice is per thread), then set the thread back. Threads that ``fn`` starts (an
    onnxruntime session's intra-op pool, which inherits the priority) are set back to the
    caller's priority too. Where the process may not raise a priority again (no root, no
    ``LimitNICE``), ``fn`` runs at normal priority, so that serving threads never end up
    deprioritised. (Same thread on purpose: a separate loader thread allocates from its
    own malloc arena, which kept up to 3x the model size after the old engine was freed.)"""
    if nice <= 0:
        return fn()
    # The loader's Python stretches (onnxruntime's session wrapper, warm-up inputs) keep the
    # GIL until the interpreter's switch interval (5 ms by default) forces a hand-over; a
    # request thread that wants the GIL meanwhile waits that long. A shorter interval while
    # loading bounds that wait.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, LOAD_SWITCH_INTERVAL_S))
    try:
        return _reniced(fn, nice=nice)
    finally:
        sys.setswitchinterval(interval)


def _reniced(fn: Callable[[], T], *, nice: int) -> T:
    if sys.platform != "linux" or not hasattr(os, "setpriority"):
        return fn()
    tid = threading.get_native_id()
    base = os.getpriority(os.PRIO_PROCESS, tid)
    if not _can_restore_priority(base):
        return fn()
    before = _thread_ids()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, base + nice))
    except OSError:
        return fn()
    try:
        return fn()
    finally:
        for other in sorted(_thread_ids() - before) + [tid]:
            try:  # threads fn started (a session's pool) serve: normal priority
                if os.getpriority(os.PRIO_PROCESS, other) != base:
                    os.setpriority(os.PRIO_PROCESS, other, base)
            except OSError:  # thread ended meanwhile, or not permitted
                pass
