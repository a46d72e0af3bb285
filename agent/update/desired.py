"""What the agent does with the signed DesiredState (retained on ``.../desired``).

:class:`DesiredTracker` keeps the newest generation acted on (persisted in
``data_dir/health/desired.json``, so a restart never goes back to an older one; an older
generation is ignored) and the last verified DesiredState. :func:`plan` compares it with the
update state of every model key it lists and returns what to do:

* :class:`Abandon`: an update in progress (not yet STAGED/ACTIVATING) whose update id is not
  the desired one and whose target engine differs, from an offer issued before the desired
  state, is superseded (a withdrawn or replaced offer stops downloading);
* :class:`FromSlot`: nothing is in progress, the desired (version, revision) is above the
  highest committed and the target engine is already in a slot: activate it from there, as
  a codec "slot" offer would (the signed DesiredState authorizes it).

Models the DesiredState does not list are left alone (never unloaded). A desired model
without a target sha256 says nothing about engines and is skipped. Used by
:class:`agent.update.manager.UpdateManager` on every DesiredState and on its periodic tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.config import LimitsConfig
from agent.update.health import Counter
from agent.update.state import ModelUpdateState, UpdateRecord, UpdateState
from agent.update.verify import (
    VerifiedDesired,
    desired_update_id,
    model_key,
    parse_offer,
    peek_manifest,
)
from protos.edgefleet.v1 import update_pb2
from protos.errors import Rejected

log = logging.getLogger(__name__)

_NOT_ABANDONED = (UpdateState.STAGED, UpdateState.ACTIVATING)


class DesiredTracker:
    """The newest DesiredState generation acted on (persisted) and its verified state."""

    def __init__(self, path: Path) -> None:
        self._generation = Counter(path)
        self.current: VerifiedDesired | None = None

    @property
    def generation(self) -> int:
        return self._generation.value

    def receive(self, data: bytes, *, verify: Callable[[bytes], VerifiedDesired],
                device_id: str) -> bool:
        """Verify and :meth:`accept` a retained DesiredState message; False (logged) when it
        is empty (cleared), does not verify or is older than the newest one acted on."""
        if not data:  # retained desired state cleared
            return False
        try:
            vd = verify(data)
        except Rejected as e:
            log.warning("device %s: desired state ignored: %s (%s)", device_id, e, e.reason)
            return False
        ds = vd.state
        if not self.accept(vd):
            log.warning("device %s: desired state generation %d ignored: generation %d was "
                        "already acted on", device_id, ds.generation, self.generation)
            return False
        log.info("device %s: desired state generation %d: %s", device_id, ds.generation,
                 ", ".join(f"{model_key(m.name, m.variant)} v{m.version}"
                           f"{f' revision {m.revision}' if m.revision else ''}"
                           for m in ds.models) or "nothing")
        return True

    def accept(self, vd: VerifiedDesired) -> bool:
        """Keep ``vd`` unless its generation is older than the newest one acted on."""
        gen = vd.state.generation
        if gen < self._generation.value:
            return False
        if gen > self._generation.value:
            self._generation.set(gen)
        self.current = vd
        return True


@dataclass(frozen=True)
class Abandon:
    """Fail the update in progress for ``key`` (reason superseded, ``message``)."""

    key: str
    message: str


@dataclass(frozen=True)
class FromSlot:
    """Activate desired model ``model`` of ``key`` from the slot that holds its engine."""

    key: str
    model: update_pb2.DesiredModel


def plan(vd: VerifiedDesired, models: dict[str, ModelUpdateState], *,
         in_slot: Callable[[str, str], bool],
         offer_issued_at_ms: Callable[[UpdateRecord], int]) -> list[Abandon | FromSlot]:
    """The actions that bring the board towards ``vd`` (see module docstring)."""
    ds = vd.state
    actions: list[Abandon | FromSlot] = []
    for dm in ds.models:
        key = model_key(dm.name, dm.variant)
        if not dm.target_sha256:
            continue
        ms = models.get(key)
        cur = ms.current if ms is not None else None
        if cur is not None and not cur.state.terminal:
            if (cur.state in _NOT_ABANDONED or cur.update_id == dm.update_id
                    or cur.target_sha256 == dm.target_sha256
                    or offer_issued_at_ms(cur) >= ds.issued_at_ms):
                continue  # wanted, nearly done, or newer than this desired state
            actions.append(Abandon(key, (
                f"not in the desired state (generation {ds.generation} wants "
                f"{dm.update_id or 'engine ' + dm.target_sha256[:12]}, "
                f"v{dm.version} revision {dm.revision})")))
        highest = ms.highest if ms is not None else (0, 0)
        if (dm.version, dm.revision) <= highest:
            continue
        if ms is not None and desired_update_id(vd, dm) in ms.done_ids:
            continue  # tried once already (failed or rolled back): wait for a new target
        if in_slot(key, dm.target_sha256):
            actions.append(FromSlot(key, dm))
    return actions


def offer_issued_at_ms(rec: UpdateRecord, *, limits: LimitsConfig) -> int:
    """When the offer of update ``rec`` was signed (it was verified on arrival); updates
    that a DesiredState started count as newest (a desired state never abandons them)."""
    if rec.source != "offer":
        return 2**62
    try:
        peek = peek_manifest(parse_offer(rec.envelope, limits=limits))
    except Rejected:
        return 0
    return peek.issued_at_ms if peek is not None else 0
