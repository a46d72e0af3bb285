"""Orchestrates OTA updates on the agent, one worker thread, one state machine per model.

Events (offers, chunks, key lists, reconnects, ticks) arrive from the MQTT thread through a
queue and are handled in order on the worker thread: verify (:mod:`.verify`) -> download
(:mod:`.download`) -> verify payload -> patch (:mod:`.patch`) -> stage (:mod:`.slots`) ->
activate (``ModelRegistry.activate``) -> commit, or FAILED / ROLLED_BACK while the old engine
keeps serving. Every transition is persisted by :class:`.state.StateStore` and reported as an
``UpdateStatus`` on ``.../update/status``. After a restart :meth:`UpdateManager.resume`
picks up where the persisted state says. Created and driven by :class:`agent.app.Agent`.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.trust_store import TrustStore
from agent.update.download import ChunkAssembler, Transfer
from agent.update.patch import build_target
from agent.update.slots import SlotInfo, SlotStore
from agent.update.state import (
    ModelUpdateState,
    StateStore,
    UpdateRecord,
    UpdateState,
    crash_point,
)
from agent.update.verify import VerifiedUpdate, model_key, parse_offer, peek_manifest, verify_offer
from protos import topics
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2
from protos.errors import Action, EdgefleetError, GiveUp, Rejected

log = logging.getLogger(__name__)

Publish = Callable[..., bool]
_ACTION_PROTO = {Action.RETRY.value: common_pb2.ERROR_ACTION_RETRY,
                 Action.GIVE_UP.value: common_pb2.ERROR_ACTION_GIVE_UP,
                 Action.REJECT.value: common_pb2.ERROR_ACTION_REJECT}
CHUNK_OVERHEAD_BYTES = 1024
TICK_S = 0.2


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
        self.transfers: dict[str, tuple[ModelUpdateState, VerifiedUpdate, Transfer]] = {}
        self.rejected: dict[str, device_pb2.UpdateProgress] = {}  # update id -> last rejection
        self._events: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=10000)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.work_root = cfg.data_path / "transfers"

    # ---- wiring ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="update-manager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.submit("stop", b"")
        if self._thread:
            self._thread.join(10)
        for _, _, tr in self.transfers.values():
            tr.asm.close()

    def submit(self, kind: str, payload: bytes) -> None:
        """Queue an event from the MQTT thread: offer | chunk | keys | desired | connected."""
        try:
            self._events.put_nowait((kind, payload))
        except queue.Full:
            log.warning("update event queue full; dropping a %s message", kind)

    def highest_committed(self, key: str) -> int:
        ms = self.models.get(key)
        return ms.highest_committed if ms else 0

    def progress(self) -> list[device_pb2.UpdateProgress]:
        """Update progress for heartbeats: every model's latest update, then recent rejects."""
        out = []
        for ms in list(self.models.values()):
            rec = ms.current
            if rec is not None:
                out.append(device_pb2.UpdateProgress(
                    update_id=rec.update_id, model_name=rec.model_name, version=rec.version,
                    state=rec.state.proto, reason=rec.reason, bytes_received=rec.bytes_received,
                    bytes_total=rec.bytes_total))
        out.extend(list(self.rejected.values())[-4:])
        return out

    # ---- startup --------------------------------------------------------------------------
    def load_committed(self) -> list[SlotInfo]:
        """Activate the committed engine of every model (before connecting: serve offline)."""
        loaded = []
        for key in self.slots.keys():
            active = self.slots.active(key)
            if active is None:
                continue
            candidates = [active]
            other = self.slots.read_meta(key, "b" if active.slot == "a" else "a")
            if other is not None and other.version < active.version:
                candidates.append(other)  # the previous committed engine (rollback target)
            for info in candidates:
                if not self.slots.check(info):
                    log.error("slot %s/%s: engine file missing or sha256 differs; skipping",
                              key, info.slot)
                    continue
                try:
                    self._activate(info)
                except EdgefleetError as e:
                    log.error("slot %s/%s v%d does not load: %s", key, info.slot,
                              info.version, e)
                    continue
                if info is not active:
                    self.slots.commit(info)
                    log.warning("model %s: fell back to slot %s v%d", key, info.slot,
                                info.version)
                loaded.append(info)
                break
        return loaded

    def _activate(self, info: SlotInfo) -> None:
        self.registry.activate(name=info.name, version=info.version,
                               path=self.slots.engine_path(info), sha256=info.sha256,
                               fingerprint=info.fingerprint, signature=info.signature,
                               variant=info.variant)

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
            except Exception:  # a bug must not stop updates or serving
                log.exception("device %s: error handling %s event", self.cfg.device_id, kind)

    def _dispatch(self, kind: str, payload: bytes) -> None:
        if kind == "offer":
            self.handle_offer(payload)
        elif kind == "chunk":
            self.handle_chunk(payload)
        elif kind == "keys":
            try:
                self.trust.accept(payload)
            except Rejected as e:
                log.warning("device %s: key list ignored: %s (%s)", self.cfg.device_id, e,
                            e.reason)
        elif kind == "connected":
            self._on_connected()
        elif kind == "tick":
            self._check_stalls()

    def resume(self) -> None:
        """Continue every update the persisted state says is in progress."""
        for ms in list(self.models.values()):
            rec = ms.current
            if rec is None or rec.state.terminal:
                continue
            log.info("resuming update %s (%s v%d) from %s", rec.update_id, rec.model_name,
                     rec.version, rec.state.value)
            try:
                vu = self._verify(rec.envelope)
            except Rejected as e:
                self._finish(ms, UpdateState.FAILED if rec.state != UpdateState.ACTIVATING
                             else UpdateState.ROLLED_BACK, e)
                continue
            self._advance(ms, vu)

    # ---- offers ---------------------------------------------------------------------------
    def _verify(self, data: bytes) -> VerifiedUpdate:
        return verify_offer(data, trust=self.trust.state, device_id=self.cfg.device_id,
                            device_class=self.cfg.device_class,
                            highest_committed=self.highest_committed, limits=self.cfg.limits,
                            has_base=self.slots.has_base, now_ms=now_ms())

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
            vu = self._verify(data)
        except Rejected as e:
            self._report_rejected_offer(peek, e)
            return
        key = vu.model_key
        ms = self.models.setdefault(key, ModelUpdateState(key=key))
        cur = ms.current
        if cur is not None and not cur.state.terminal:
            if vu.manifest.version <= cur.version:
                self._report_rejected_offer(peek, Rejected(
                    f"version {vu.manifest.version} is not newer than update {cur.update_id} "
                    f"(v{cur.version}) in progress", reason="rollback"))
                return
            if cur.state in (UpdateState.STAGED, UpdateState.ACTIVATING):
                log.info("offer %s waits: %s is activating", vu.update_id, cur.update_id)
                return
            self._finish(ms, UpdateState.FAILED, GiveUp(
                f"superseded by {vu.update_id} (v{vu.manifest.version})", reason="superseded"))
        m = vu.manifest
        ms.current = UpdateRecord(
            update_id=m.update_id, model_name=m.model_name, variant=m.variant,
            version=m.version, state=UpdateState.IDLE, envelope_b64=_b64(data),
            bytes_total=m.payload_size, target_sha256=m.target_sha256)
        self._transition(ms, UpdateState.RECEIVED)
        self._advance(ms, vu)

    def _report_rejected_offer(self, peek: update_pb2.UpdateManifest | None,
                               e: EdgefleetError) -> None:
        uid = peek.update_id if peek else ""
        log.warning("device %s: rejected offer %s: %s (%s)", self.cfg.device_id, uid or "?",
                    e, e.reason)
        st = update_pb2.UpdateStatus(
            device_id=self.cfg.device_id, update_id=uid,
            model_name=peek.model_name if peek else "", version=peek.version if peek else 0,
            state=UpdateState.FAILED.proto, reason=f"{e.reason}: {e}",
            action=_ACTION_PROTO[e.action.value], at_ms=now_ms(),
            target_sha256=peek.target_sha256 if peek else "")
        self._send_status(st)
        if uid:
            self.rejected[uid] = device_pb2.UpdateProgress(
                update_id=uid, model_name=st.model_name, version=st.version,
                state=st.state, reason=st.reason)
            while len(self.rejected) > 64:
                self.rejected.pop(next(iter(self.rejected)))

    # ---- the pipeline ---------------------------------------------------------------------
    def _advance(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        """Run the state machine of ``ms.current`` as far as it goes without waiting."""
        rec = ms.current
        assert rec is not None
        try:
            if rec.state == UpdateState.RECEIVED:
                self._transition(ms, UpdateState.DOWNLOADING)
            if rec.state == UpdateState.DOWNLOADING:
                self._start_transfer(ms, vu)
                return  # continues in handle_chunk when the last chunk is in
            if rec.state in (UpdateState.VERIFYING, UpdateState.PATCHING):
                self._build_and_stage(ms, vu)
            if rec.state == UpdateState.STAGED:
                self._activate_staged(ms, vu)
            elif rec.state == UpdateState.ACTIVATING:
                self._resume_activating(ms, vu)
        except EdgefleetError as e:
            after = rec.state in (UpdateState.STAGED, UpdateState.ACTIVATING)
            self._finish(ms, UpdateState.ROLLED_BACK if after else UpdateState.FAILED, e)

    def _work_dir(self, rec: UpdateRecord) -> Path:
        return self.work_root / model_key(rec.model_name, rec.variant) / rec.update_id

    def _start_transfer(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        rec = ms.current
        assert rec is not None
        asm = ChunkAssembler(vu, work_dir=self._work_dir(rec))
        have = asm.open()
        rec.bytes_received = asm.bytes_received
        if have:
            log.info("update %s: resuming with %d/%d chunks on disk", vu.update_id, len(have),
                     vu.chunk_count)
        tr = Transfer(asm, window_chunks=self.cfg.update.request_window_chunks,
                      request=lambda idx: self._request_chunks(vu.update_id, idx),
                      stall_timeout_s=self.cfg.update.stall_timeout_s,
                      connection_id=self._connection_id)
        self.transfers[vu.update_id] = (ms, vu, tr)
        if asm.complete:
            self._download_done(ms, vu, tr)
        else:
            tr.restart_requests()

    def _request_chunks(self, update_id: str, indices: list[int]) -> bool:
        req = update_pb2.ChunkRequest(device_id=self.cfg.device_id, update_id=update_id,
                                      indices=indices)
        return self._publish(topics.device_topic(self.cfg.device_id, topics.CHUNK_REQUEST),
                             req.SerializeToString(), qos=1)

    def handle_chunk(self, data: bytes) -> None:
        limit = self.cfg.limits.max_chunk_bytes + CHUNK_OVERHEAD_BYTES
        if len(data) > limit:
            log.warning("device %s: chunk message of %d bytes over %d; ignored",
                        self.cfg.device_id, len(data), limit)
            return
        chunk = update_pb2.UpdateChunk()
        try:
            chunk.ParseFromString(data)
        except Exception as e:  # protobuf DecodeError on untrusted bytes
            log.warning("device %s: malformed chunk ignored: %s", self.cfg.device_id, e)
            return
        entry = self.transfers.get(chunk.update_id)
        if entry is None:
            log.debug("chunk %d of unknown/finished update %r ignored", chunk.index,
                      chunk.update_id)
            return
        ms, vu, tr = entry
        rec = ms.current
        assert rec is not None
        try:
            new = tr.on_chunk(chunk.index, chunk.data)
        except Rejected as e:
            self._finish(ms, UpdateState.FAILED, e)
            return
        if not new:
            return
        rec.bytes_received = tr.asm.bytes_received
        crash_point(f"chunk:{len(tr.asm.have)}")
        if tr.asm.complete:
            self._download_done(ms, vu, tr)

    def _download_done(self, ms: ModelUpdateState, vu: VerifiedUpdate, tr: Transfer) -> None:
        self.transfers.pop(vu.update_id, None)
        try:
            self._transition(ms, UpdateState.VERIFYING)
            self._build_and_stage(ms, vu)
            self._activate_staged(ms, vu)
        except EdgefleetError as e:
            rec = ms.current
            assert rec is not None
            after = rec.state in (UpdateState.STAGED, UpdateState.ACTIVATING)
            self._finish(ms, UpdateState.ROLLED_BACK if after else UpdateState.FAILED, e)
        finally:
            tr.asm.close()

    def _build_and_stage(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        rec = ms.current
        assert rec is not None
        asm = ChunkAssembler(vu, work_dir=self._work_dir(rec))
        try:
            asm.open()
            if not asm.complete:
                raise GiveUp("payload on disk is incomplete after a restart", reason="lost")
            if rec.state == UpdateState.VERIFYING:
                payload = asm.finalize()
                self._transition(ms, UpdateState.PATCHING)
            else:
                payload = asm.finalize()
        finally:
            asm.close()
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

    def _activate_staged(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        rec = ms.current
        assert rec is not None
        info = self.slots.read_meta(vu.model_key, rec.staged_slot)
        if info is None or info.update_id != rec.update_id or not self.slots.check(info):
            raise GiveUp(f"staged engine in slot {rec.staged_slot} is missing or damaged",
                         reason="staged_lost")
        rec.activation_attempts += 1
        self._transition(ms, UpdateState.ACTIVATING)
        try:
            self._activate(info)
        except EdgefleetError as e:
            self._finish(ms, UpdateState.ROLLED_BACK, e)
            return
        except Exception as e:  # a loader bug must not lose the old engine
            self._finish(ms, UpdateState.ROLLED_BACK,
                         GiveUp(f"activation failed: {e!r}", reason="activation_failed"))
            return
        self.slots.commit(info)
        crash_point("commit:after")
        self._transition(ms, UpdateState.COMMITTED)
        self._cleanup(rec)

    def _resume_activating(self, ms: ModelUpdateState, vu: VerifiedUpdate) -> None:
        rec = ms.current
        assert rec is not None
        active = self.slots.active(vu.model_key)
        if active is not None and active.update_id == rec.update_id:
            # the pointer was switched before the kill: startup already serves it
            self._transition(ms, UpdateState.COMMITTED)
            self._cleanup(rec)
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
        entry = self.transfers.pop(rec.update_id, None)
        if entry is not None:
            entry[2].asm.close()
        if state == UpdateState.ROLLED_BACK and rec.state not in (UpdateState.ACTIVATING,):
            state = UpdateState.FAILED  # never activated: nothing to roll back
        self._transition(ms, state, reason=f"{e.reason}: {e}", action=e.action.value)
        self._cleanup(rec)

    def _cleanup(self, rec: UpdateRecord) -> None:
        shutil.rmtree(self._work_dir(rec), ignore_errors=True)

    def _transition(self, ms: ModelUpdateState, state: UpdateState, *, reason: str = "",
                    action: str = "") -> None:
        rec = self.states.transition(ms, state, reason=reason, action=action)
        self._send_status(self._status_of(rec))

    def _status_of(self, rec: UpdateRecord) -> update_pb2.UpdateStatus:
        return update_pb2.UpdateStatus(
            device_id=self.cfg.device_id, update_id=rec.update_id, model_name=rec.model_name,
            version=rec.version, state=rec.state.proto, reason=rec.reason,
            action=_ACTION_PROTO.get(rec.action, common_pb2.ERROR_ACTION_UNSPECIFIED),
            bytes_received=rec.bytes_received, bytes_total=rec.bytes_total, at_ms=now_ms(),
            target_sha256=rec.target_sha256)

    def _send_status(self, st: update_pb2.UpdateStatus) -> None:
        self._publish(topics.device_topic(self.cfg.device_id, topics.UPDATE_STATUS),
                      st.SerializeToString(), qos=1)

    # ---- connection and time --------------------------------------------------------------
    def _on_connected(self) -> None:
        for ms in list(self.models.values()):
            if ms.current is not None:
                self._send_status(self._status_of(ms.current))  # where we stand, after a gap
        for _, _, tr in list(self.transfers.values()):
            tr.on_connected()

    def _check_stalls(self) -> None:
        if not self._connection_id():
            return  # broker unreachable is not a stall: the reconnect re-requests
        for uid, (ms, _vu, tr) in list(self.transfers.items()):
            if not tr.stalled():
                continue
            rec = ms.current
            assert rec is not None
            rec.stalls += 1
            if rec.stalls > self.cfg.update.max_retries:
                self._finish(ms, UpdateState.FAILED, Rejected(
                    f"transfer stalled {rec.stalls} times ({self.cfg.update.stall_timeout_s}s "
                    f"each without a chunk); slow retrieval", reason="stalled"))
                continue
            log.warning("update %s: no chunk for %.1fs; re-requesting (%d/%d)", uid,
                        self.cfg.update.stall_timeout_s, rec.stalls,
                        self.cfg.update.max_retries)
            tr.restart_requests()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
