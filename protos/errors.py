"""Typed errors that say what happens next: retry later, give up, or reject the data.

Used by both sides. Wrap third-party exceptions with ``raise RejectError(...) from e``.
"""

from __future__ import annotations

from enum import Enum


class Action(str, Enum):
    """What the caller should do about an error."""

    RETRY = "retry"      # transient: the same call may succeed later
    GIVE_UP = "give_up"  # will not succeed by retrying; report and stop
    REJECT = "reject"    # the data is bad or hostile; never use it


class EdgefleetError(Exception):
    """Base class. ``reason`` is a short machine-friendly code, the message is for people."""

    action: Action = Action.GIVE_UP

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:  # pragma: no cover - trivial
        return super().__str__()


class RetryLater(EdgefleetError):
    """Transient failure (broker down, busy, timeout)."""

    action = Action.RETRY


class GiveUp(EdgefleetError):
    """Permanent failure that is not the data's fault (backend missing, disk full)."""

    action = Action.GIVE_UP


class Rejected(EdgefleetError):
    """The input is invalid or fails a security check; it must not be used."""

    action = Action.REJECT


class BackendUnavailable(GiveUp):
    """A vendor SDK or hardware backend is not available on this machine."""

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"{backend} is not available on this machine: {detail}",
                         reason="backend_unavailable")
        self.backend = backend
