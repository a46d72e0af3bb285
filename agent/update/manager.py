"""Orchestrates OTA updates on the agent, one worker thread, one state machine per model.

Events (offers from ``update/offer`` and ``update/offer/{key}``, chunks, key lists, desired
states, reconnects, ticks) arrive from the MQTT thread through a queue and are handled in
order on the worker thread: verify (:mod:`.verify`) -> download (:mod:`.download`) -> verify
payload -> patch (:mod:`.patch`) -> stage (:mod:`.slots`) -> activate (:mod:`.serving`,
``ModelRegistry.activate``) -> commit, or FAILED / ROLLED_BACK while the old engine keeps
serving. A codec "slot" update (or a signed DesiredState, :mod:`.desired`) names an engine
already in a slot: RECEIVED -> STAGED -> ACTIVATING -> COMMITTED, no bytes move. Every
transition is persisted by :class:`.state.StateStore` and reported as an ``UpdateStatus`` on
``.../update/status``; after a commit the signed accuracy probe runs (``agent.update.probe``)
and a second COMMITTED status carries its report. A manifest with a ``ShadowSpec`` stops at
STAGED while :mod:`.shadow` mirrors live requests to the staged engine (checked on ticks,
the worker never waits; restarted from STAGED after a restart): passed -> activation,
failed -> FAILED (``shadow_check``), the active engine untouched. After a restart
:meth:`UpdateManager.resume` picks up where the persisted state says; local fallbacks
(integrity, load failures, crash loops: :mod:`.serving`) mark the update ROLLED_BACK.
Created and driven by :class:`agent.app.Agent`.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from agent.config import AgentConfig
from agent.trust_store import TrustStore
from agent.update import desired as desired_plan
from agent.update import report
from agent.update import shadow as shadow_check
from agent.update.download import Fetcher
from agent.update.health import BootMarkers, FaultLog
from agent.update.patch import build_target
from agent.update.serving import Serving
from agent.update.slots import SlotInfo, SlotStore
from agent.update.state import (
    ModelUpdateState,
    StateStore,
    UpdateRecord,
    UpdateState,
    crash_point,
)
from agent.update.verify import (
    VerifiedUpdate,
    Verifier,
    model_key,
    parse_offer,
    peek_manifest,
)
from protos import topics
from protos.edgefleet.v1 import device_pb2, update_pb2
from protos.errors import Action, EdgefleetError, GiveUp, Rejected

log = logging.getLogger(__name__)

Publish = Callable[..., bool]
TICK_S = 0.2
DESIRED_RECHECK_S = 2.0   # the desired state is re-planned this often (level-triggered)


def now_ms() -> int:
    return int(time.time() * 1000)


class UpdateManager:
    """The agent side of OTA updates (see module docstring)."""

    def __init__(self, cfg: AgentConfig, *, trust: TrustStore, registry: Any, slots: SlotStore,
                 states: StateStore, publish: Publish,
                 connection_id: Callable[[], int] = lambda: 1) -> None:
        self.cfg = cfg
        self.trust = trust
        self.registry = registry
        self.slots = slots
        self.states = states
        self._publish = publish
        self._connection_id = connection_id
        self.models: dict[str, ModelUpdateState] = states.load_all()
        self.verify = Verifier(device_id=cfg.device_id, device_class=cfg.device_class,
                               limits=cfg.limits, trust=lambda: self.trust.state,
                               highest_committed=self.highest_pair, has_base=slots.has_base,
                               now_ms=now_ms)
        self.fetch = Fetcher(cfg, publish=publish, connection_id=connection_id,
                             on_complete=self._download_done, on_failed=self._fail)
        self.rejected: dict[str, device_pb2.UpdateProgress] = {}  # update id -> last rejection
        self._events: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=10000)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        health = cfg.data_path / "health"
        self.faults = FaultLog(health / "faults.json")
        self.desired = desired_plan.DesiredTracker(health / "desired.json")
        self.serving = Serving(cfg.update, registry=registry, slots=slots, faults=self.faults,
                               markers=BootMarkers(health / "boot"),
                               on_fallback=self._on_fallback)
        self._next_periodic = 0.0
        self._next_desired = 0.0
        self.shadows = shadow_check.ShadowGate(registry=registry, slots=slots,
                                               loaded=self.serving.loaded.get)

    # ---- wiring ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="update-manager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.submit("stop", b"")
        if self._thread:
            self._thread.join(10)
        self.shadows.close()
        self.fetch.close()

    def submit(self, kind: str, payload: bytes) -> None:
        """Queue an event from the MQTT thread: offer | chunk | keys | desired | connected."""
        try:
            self._events.put_nowait((kind, payload))
        except queue.Full:
            log.warning("update event queue full; dropping a %s message", kind)

    def highest_committed(self, key: str) -> int:
        """Highest committed version of a model key (0 = none)."""
        return self.highest_pair(key)[0]

    def highest_pair(self, key: str) -> tuple[int, int]:
        """Highest committed (version, revision) of a model key: offers must be above it."""
        ms = self.models.get(key)
        return ms.highest if ms else (0, 0)

    def progress(self) -> list[device_pb2.UpdateProgress]:
        """Update progress for heartbeats: every model's latest update, then recent rejects."""
        out = [report.progress_of(ms.current) for ms in list(self.models.values())
               if ms.current is not None]
        out.extend(list(self.rejected.values())[-4:])
        return out

    def slot_report(self) -> list[device_pb2.ServedModel]:
        """Every engine installed in a slot (heartbeat ``slots``), committed ones active."""
        return [info.to_proto(active=active) for info, active in self.slots.installed()]

    def loaded_info(self, key: str) -> SlotInfo | None:
        """The slot engine loaded in the registry for ``key`` (what is really served)."""
        return self.serving.loaded.get(key)

    # ---- startup --------------------------------------------------------------------------
    def load_committed(self) -> list[SlotInfo]:
        """Activate the committed engine of every model (before connecting: serve offline),
        falling back to the previous slot when it is damaged, does not load or crash-loops
        (:meth:`agent.update.serving.Serving.load_committed`)."""
        return self.serving.load_committed()

    def _on_fallback(self, failed: SlotInfo, reason: str, message: str) -> None:
        """The committed engine ``failed`` was dropped for the previous one: report the
        update that installed it ROLLED_BACK (reason ``integrity`` / ``load_failed`` /
        ``crash_loop``)."""
        key = failed.key
        ms = self.models.setdefault(key, ModelUpdateState(key=key))
        cur = ms.current
        if cur is not None and not cur.state.terminal:  # an update is under way: keep it
            self._send_status(report.fallback_status(
                failed, f"{reason}: {message}", device_id=self.cfg.device_id, at_ms=now_ms()))
            return
        if cur is None or cur.update_id != failed.update_id or \
                cur.state != UpdateState.COMMITTED:
            ms.current = UpdateRecord(
                update_id=failed.update_id or f"local-{key}", model_name=failed.name,
                variant=failed.variant, version=failed.version, revision=failed.revision,
                engine_version=failed.built_for, state=UpdateState.COMMITTED,
                target_sha256=failed.sha256)
        self._transition(ms, UpdateState.ROLLED_BACK, reason=f"{reason}: {message}",
                         action=Action.GIVE_UP.value)

    # ---- worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.resume()
        except Exception:  # never let the worker die
            log.exception("resuming updates failed")
        while not self._stopping.is_set():
            try:
                kind, payload = self._events.get(timeout=TICK_S)
            except queue.Empty:
                kind, payload = "tick", b""
            if kind == "stop":
                break
            try:
                self._dispatch(kind, payload)
                if kind != "tick" and time.monotonic() >= self._next_periodic:
                    self._dispatch("tick", b"")  # busy with chunks: timers still run
            except Exception:  # a bug must not stop updates or serving
                log.exception("device %s: error handling %s event", self.cfg.device_id, kind)

    def _dispatch(self, kind: str, payload: bytes) -> None:
        if kind == "offer":
            self.handle_offer(payload)
        elif kind == "chunk":
            self.fetch.handle_chunk(payload)
        elif kind == "keys":
            try:
                self.trust.accept(payload)
            except Rejected as e:
                log.warning("device %s: key list ignored: %s (%s)", self.cfg.device_id, e,
                            e.reason)
        elif kind == "desired":
            self.handle_desired(payload)
        elif kind == "connected":
            self._on_connected()
        elif kind == "tick":
            self._next_periodic = time.monotonic() + TICK_S
            self.fetch.check_stalls()
            self.serving.tick()
            self._poll_shadows()
            if time.monotonic() >= self._next_desired:
                self._next_desired = time.monotonic() + DESIRED_RECHECK_S
                self._reconcile_desired()

    def resume(self) -> None:
        """Continue every update the persisted state says is in progress."""
        for ms in list(self.models.values()):
            rec = ms.current
            if rec is None or rec.state.terminal:
                continue
            log.info("resuming update %s (%s v%d) from %s", rec.update_id, rec.model_name,
                     rec.version, rec.state.value)
            try:
                vu = self.verify.again(source=rec.source, envelope_bytes=rec.envelope,
                                       key=ms.key)
            except Rejected as e:
                self._finish(ms, UpdateState.FAILED if rec.state != UpdateState.ACTIVATING
                             else UpdateState.ROLLED_BACK, e)
                continue
            self._advance(ms, vu)

    # ---- offers ---------------------------------------------------------------------------
    def handle_offer(self, data: bytes) -> None:
        if not data:  # the controller cleared the retained offer (the update is finished)
            log.debug("device %s: retained offer cleared", self.cfg.device_id)
            return
        try:
            env = parse_offer(data, limits=self.cfg.limits)
        except Rejected as e:
            log.warning("device %s: offer ignored: %s", self.cfg.device_id, e)
            return
        peek = peek_manifest(env)
        if peek is not None and peek.update_id:
            key = model_key(peek.model_name, peek.variant)
            ms = self.models.get(key)
            if ms and (peek.update_id in ms.done_ids or (
                    ms.current and ms.current.update_id == peek.update_id)):
                log.debug("offer %s already handled; ignoring redelivery", peek.update_id)
                return
            if peek.update_id in self.rejected:
                return
        try:
            vu = self.verify.offer(data)
        except Rejected as e:
            self._report_rejected_offer(peek, e)
            return
        key = vu.model_key
        ms = self.models.setdefault(key, ModelUpdateState(key=key))
        cur = ms.current
        m = vu.manifest
        if cur is not None and not cur.state.terminal:
            if (m.version, m.revision) <= cur.pair:
                self._report_rejected_offer(peek, Rejected(
                    f"(version, revision) ({m.version}, {m.revision}) is not newer than "
                    f"({cur.version}, {cur.revision}) of update {cur.update_id} in progress",
                    reason="rollback"))
                return
            if cur.state == UpdateState.ACTIVATING or (
                    cur.state == UpdateState.STAGED and key not in self.shadows):
                log.info("offer %s waits: %s is activating", vu.update_id, cur.update_id)
                return
            self._finish(ms, UpdateState.FAILED, GiveUp(
                f"superseded by {vu.update_id} (v{m.version} revision {m.revision})",
                reason="superseded"))
        self._start(ms, vu, source="offer")

    def _start(self, ms: ModelUpdateState, vu: VerifiedUpdate, *, source: str) -> None:
        """A new current update for ``ms`` from a verified offer or desired state."""
        m = vu.manifest
        ms.current = UpdateRecord(
            update_id=m.update_id, model_name=m.model_name, variant=m.variant,
            version=m.version, revision=m.revision, engine_version=m.engine_version,
            state=UpdateState.IDLE, envelope_b64=base64.b64encode(vu.envelope_bytes).decode(),
            source=source, bytes_total=m.payload_size, target_sha256=m.target_sha256)
        self._transition(ms, UpdateState.RECEIVED)
        self._advance(ms, vu)

    # ---- desired state --------------------------------------------------------------------
    def handle_desired(self, data: bytes) -> None:
        """A signed DesiredState (retained): keep the newest generation and act on it."""
        if self.desired.receive(data, verify=self.verify.desired,
                                device_id=self.cfg.device_id):
            self._reconcile_desired()

    def _reconcile_desired(self) -> None:
        """Abandon updates the desired state superseded; activate desired engines that are
        already in a slot (:func:`agent.update.desired.plan`)."""
        vd = self.desired.current
        if vd is None:
            return
        issued_at = partial(desired_plan.offer_issued_at_ms, limits=self.cfg.limits)
        for action in desired_plan.plan(vd, self.models, in_slot=self.slots.has_base,
                                        offer_issued_at_ms=issued_at):
            ms = self.models.setdefault(action.key, ModelUpdateState(key=action.key))
            if isinstance(action, desired_plan.Abandon):
                self._finish(ms, UpdateState.FAILED, GiveUp(action.message,
                                                            reason="superseded"))
                continue
            try:
                vu = self.verify.desired_model(vd, action.model)
            except Rejected as e:
                log.warning("device %s: desired %s not activated from its slot: %s (%s)",
                            self.cfg.device_id, action.key, e, e.reason)
                continue
            log.info("device %s: desired state generation %d: activating %s v%d from its "
                     "slot", self.cfg.device_id, vd.state.generation, action.key,
                     action.model.version)
            self._start(ms, vu, source="desired")

    def _report_rejected_offer(self, peek: update_pb2.UpdateManifest | None,
                               e: EdgefleetError) -> None:
        uid = peek.update_id if peek else ""
        log.warning("device %s: rejected offer %s: %s (%s)", self.cfg.device_id, uid or "?",
                    e, e.reason)
        st = report.rejected_status(peek, e, device_id=self.cfg.device_id, at_ms=now_ms())
        self._send_status(st)
        if uid:
            self.rejected[uid] = report.progress_of_status(st)
            while len(self.rejected) > 64:
                self.rejected.pop(next(iter(self.rejected)))

    # ---- the pipeline ---------------------------------------------------------------------
    def _advance(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        """Run the state machine of ``ms.current`` as far as it goes without waiting."""
        rec = ms.current
        assert rec is not None
        try:
            if rec.state == UpdateState.RECEIVED and vu.is_slot:
                self._stage_from_slot(ms, vu)
            if rec.state == UpdateState.RECEIVED:
                self._transition(ms, UpdateState.DOWNLOADING)
            if rec.state == UpdateState.DOWNLOADING:
                self.fetch.start(ms, vu)
                return  # continues in _download_done when the last chunk is in
            if rec.state in (UpdateState.VERIFYING, UpdateState.PATCHING):
                self._build_and_stage(ms, vu)
            if rec.state == UpdateState.STAGED:
                self._activate_staged(ms, vu)
            elif rec.state == UpdateState.ACTIVATING:
                self._resume_activating(ms, vu)
        except EdgefleetError as e:
            after = rec.state in (UpdateState.STAGED, UpdateState.ACTIVATING)
            self._finish(ms, UpdateState.ROLLED_BACK if after else UpdateState.FAILED, e)

    def _download_done(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        """The last chunk is in: verify, patch, stage, activate (from the Fetcher)."""
        try:
            self._transition(ms, UpdateState.VERIFYING)
            self._build_and_stage(ms, vu)
            self._activate_staged(ms, vu)
        except EdgefleetError as e:
            rec = ms.current
            assert rec is not None
            after = rec.state in (UpdateState.STAGED, UpdateState.ACTIVATING)
            self._finish(ms, UpdateState.ROLLED_BACK if after else UpdateState.FAILED, e)

    def _fail(self, ms: ModelUpdateState, e: EdgefleetError) -> None:
        self._finish(ms, UpdateState.FAILED, e)

    def _build_and_stage(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        rec = ms.current
        assert rec is not None
        payload = self.fetch.payload(rec, vu)
        if rec.state == UpdateState.VERIFYING:
            self._transition(ms, UpdateState.PATCHING)
        m = vu.manifest
        slot = self.slots.inactive_slot(vu.model_key)
        base = self.slots.find_base(vu.model_key, m.base_sha256) if m.base_sha256 else None
        out = self.slots.staging_file(vu, slot)
        try:
            build_target(vu, payload, out=out, base=base)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        self.slots.stage(vu, out, slot=slot)
        rec.staged_slot = slot
        self._transition(ms, UpdateState.STAGED)

    def _stage_from_slot(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        """Codec "slot": the target engine is already in a slot; STAGED names that slot."""
        rec = ms.current
        assert rec is not None
        slot = self.slots.slot_of(vu.model_key, vu.manifest.target_sha256)
        if slot is None:
            raise Rejected(f"engine {vu.manifest.target_sha256[:12]} is no longer in a slot "
                           f"of {vu.model_key}", reason="slot_missing")
        rec.staged_slot = slot
        self._transition(ms, UpdateState.STAGED)

    def _activate_from_slot(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        """Codec "slot", STAGED -> COMMITTED: the other slot's engine is loaded, warmed up,
        smoke-checked and swapped in; the active slot's engine is only relabelled (reloaded
        when the registry must serve it under a new version). Then that slot's meta gets the
        update's version, revision, engine_version and update id, and is committed."""
        rec = ms.current
        assert rec is not None
        key = vu.model_key
        info = self.slots.read_meta(key, rec.staged_slot)
        if info is None or info.sha256 != vu.manifest.target_sha256 or \
                not self.slots.check(info):
            raise Rejected(f"engine {vu.manifest.target_sha256[:12]} in slot "
                           f"{rec.staged_slot} is missing or damaged", reason="slot_missing")
        previous = self.slots.active(key)
        rec.activation_attempts += 1
        self._transition(ms, UpdateState.ACTIVATING)
        new = self.slots.relabeled(info, vu)
        warmup = report.warmup_inputs(vu.manifest)

        def swap() -> None:
            if previous is not None and previous.slot == new.slot:
                reloaded = self.serving.relabel(new, warmup_inputs=warmup)
                log.info("update %s: engine of slot %s/%s relabelled v%d revision %d%s",
                         vu.update_id, key, new.slot, new.version, new.revision,
                         " (reloaded for the new version label)" if reloaded else "")
            else:
                self.serving.activate(new, warmup_inputs=warmup)

        if self._swapped(ms, swap):
            self.slots.write_meta(new)
            self._commit(ms, vu, new, previous)

    def _swapped(self, ms: ModelUpdateState, swap: Callable[[], None]) -> bool:
        """Run an activation; False after ROLLED_BACK when it failed (old engine serving)."""
        try:
            swap()
        except EdgefleetError as e:
            self._finish(ms, UpdateState.ROLLED_BACK, e)
            return False
        except Exception as e:  # a loader bug must not lose the old engine
            self._finish(ms, UpdateState.ROLLED_BACK,
                         GiveUp(f"activation failed: {e!r}", reason="activation_failed"))
            return False
        return True

    def _commit(self, ms: ModelUpdateState, vu: VerifiedUpdate, info: SlotInfo,
                previous: SlotInfo | None) -> None:
        """Switch the active pointer to ``info`` (the commit), COMMITTED, then the probe."""
        rec = ms.current
        assert rec is not None
        self.slots.commit(info)
        self.serving.mark_committed(info, previous_sha256=previous.sha256 if previous else "")
        crash_point("commit:after")
        self._transition(ms, UpdateState.COMMITTED)
        self.fetch.drop(rec)
        self._run_probe(ms, vu)

    def _run_probe(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        """Run the signed on-device accuracy probe of a committed update, keep its report on
        the record and send a second COMMITTED status with it. Never fails the update."""
        rec = ms.current
        probe = report.run_probe(self.registry, vu.manifest)
        if rec is None or probe is None:
            return
        rec.probe_b64 = base64.b64encode(probe.SerializeToString()).decode()
        self.states.save(ms)
        self._send_status(self._status_of(rec))

    def _activate_staged(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        assert ms.current is not None
        if self.shadows.pending(ms.key, ms.current, vu):
            return  # stays STAGED; _poll_shadows continues on a tick
        if vu.is_slot:
            self._activate_from_slot(ms, vu)
            return
        rec = ms.current
        assert rec is not None
        info = self.slots.read_meta(vu.model_key, rec.staged_slot)
        if info is None or info.update_id != rec.update_id or not self.slots.check(info):
            raise GiveUp(f"staged engine in slot {rec.staged_slot} is missing or damaged",
                         reason="staged_lost")
        previous = self.slots.active(vu.model_key)
        rec.activation_attempts += 1
        self._transition(ms, UpdateState.ACTIVATING)
        warmup = report.warmup_inputs(vu.manifest)
        if self._swapped(ms, lambda: self.serving.activate(info, warmup_inputs=warmup)):
            self._commit(ms, vu, info, previous)

    # ---- shadow check (agent.update.shadow) ------------------------------------------------
    def _poll_shadows(self) -> None:
        """On ticks: act on every shadow check that decided (activate, or FAILED)."""
        for key, vu, decision in self.shadows.decided():
            ms = self.models.get(key)
            rec = ms.current if ms else None
            if ms is None or rec is None or rec.update_id != vu.update_id or \
                    rec.state != UpdateState.STAGED:
                continue
            rec.shadow_b64 = base64.b64encode(decision.SerializeToString()).decode()
            self.states.save(ms)
            if decision.passed:
                self._advance(ms, vu)
            else:
                self._finish(ms, UpdateState.FAILED, GiveUp(decision.detail,
                                                            reason="shadow_check"))

    def _resume_activating(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        rec = ms.current
        assert rec is not None
        active = self.slots.active(vu.model_key)
        if active is not None and active.update_id == rec.update_id:
            # the pointer was switched before the kill: startup already serves it
            self._transition(ms, UpdateState.COMMITTED)
            self.fetch.drop(rec)
            return
        if rec.activation_attempts >= self.cfg.update.activation_attempts:
            self._finish(ms, UpdateState.ROLLED_BACK, GiveUp(
                f"agent restarted {rec.activation_attempts} time(s) while activating; "
                "keeping the previous engine", reason="activation_crashed"))
            return
        rec.state = UpdateState.STAGED  # retry activation (counted)
        self._activate_staged(ms, vu)

    def _finish(self, ms: ModelUpdateState, state: UpdateState, e: EdgefleetError) -> None:
        rec = ms.current
        assert rec is not None
        log.warning("device %s: update %s (%s v%d) %s: %s (%s)", self.cfg.device_id,
                    rec.update_id, rec.model_name, rec.version, state.value, e, e.reason)
        self.fetch.drop(rec)
        self.shadows.drop(ms.key)
        if state == UpdateState.ROLLED_BACK and rec.state not in (UpdateState.ACTIVATING,):
            state = UpdateState.FAILED  # never activated: nothing to roll back
        self._transition(ms, state, reason=f"{e.reason}: {e}", action=e.action.value)

    def _transition(self, ms: ModelUpdateState, state: UpdateState, *, reason: str = "",
                    action: str = "") -> None:
        rec = self.states.transition(ms, state, reason=reason, action=action)
        self._send_status(self._status_of(rec))

    def _status_of(self, rec: UpdateRecord) -> update_pb2.UpdateStatus:
        return report.status_of(rec, device_id=self.cfg.device_id, at_ms=now_ms())

    def _send_status(self, st: update_pb2.UpdateStatus) -> None:
        self._publish(topics.device_topic(self.cfg.device_id, topics.UPDATE_STATUS),
                      st.SerializeToString(), qos=1)

    # ---- connection and time --------------------------------------------------------------
    def _on_connected(self) -> None:
        for ms in list(self.models.values()):
            if ms.current is not None:
                self._send_status(self._status_of(ms.current))  # where we stand, after a gap
        self.fetch.on_connected()
