"""Run calls from several threads released at the same moment (batching tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_together(calls: list[Callable[[], T]], *, timeout_s: float = 60.0) -> list[T]:
    """Run each call in its own thread, all released by one barrier; their results in order.

    Re-raises the first exception a call raised; fails when a call did not finish in time.
    """
    barrier = threading.Barrier(len(calls))
    results: list[T | None] = [None] * len(calls)
    done = [False] * len(calls)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait(timeout_s / 2)
            results[i] = calls[i]()
            done[i] = True
        except BaseException as e:  # re-raised by the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if errors:
        raise errors[0]
    assert all(done), "a concurrent call did not finish in time"
    return [r for r in results]  # type: ignore[misc]
