"""Wire reports of the update pipeline: ``UpdateStatus`` messages and heartbeat
``UpdateProgress`` entries built from persisted update records, and the guarded call of
the on-device accuracy probe (``agent.update.probe``): its first sample as warm-up inputs
of the activation, then the probe itself once the update is committed.

Pure functions, no state. Used by :class:`agent.update.manager.UpdateManager`.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.update.slots import SlotInfo
from agent.update.state import UpdateRecord, UpdateState
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2
from protos.errors import Action, EdgefleetError

log = logging.getLogger(__name__)

ACTION_PROTO = {Action.RETRY.value: common_pb2.ERROR_ACTION_RETRY,
                Action.GIVE_UP.value: common_pb2.ERROR_ACTION_GIVE_UP,
                Action.REJECT.value: common_pb2.ERROR_ACTION_REJECT}


def status_of(rec: UpdateRecord, *, device_id: str, at_ms: int) -> update_pb2.UpdateStatus:
    """The ``UpdateStatus`` saying where update ``rec`` stands (with its probe and shadow
    reports)."""
    st = update_pb2.UpdateStatus(
        device_id=device_id, update_id=rec.update_id, model_name=rec.model_name,
        version=rec.version, state=rec.state.proto, reason=rec.reason,
        action=ACTION_PROTO.get(rec.action, common_pb2.ERROR_ACTION_UNSPECIFIED),
        bytes_received=rec.bytes_received, bytes_total=rec.bytes_total, at_ms=at_ms,
        target_sha256=rec.target_sha256, revision=rec.revision, variant=rec.variant)
    probe = rec.probe
    if probe is not None:
        st.probe.CopyFrom(probe)
    shadow = rec.shadow
    if shadow is not None:
        st.shadow.CopyFrom(shadow)
    return st


def progress_of(rec: UpdateRecord) -> device_pb2.UpdateProgress:
    """The heartbeat ``UpdateProgress`` of update ``rec`` (with its probe and shadow reports)."""
    p = device_pb2.UpdateProgress(
        update_id=rec.update_id, model_name=rec.model_name, version=rec.version,
        state=rec.state.proto, reason=rec.reason, bytes_received=rec.bytes_received,
        bytes_total=rec.bytes_total, revision=rec.revision, variant=rec.variant,
        target_sha256=rec.target_sha256)
    probe = rec.probe
    if probe is not None:
        p.probe.CopyFrom(probe)
    shadow = rec.shadow
    if shadow is not None:
        p.shadow.CopyFrom(shadow)
    return p


def rejected_status(peek: update_pb2.UpdateManifest | None, e: EdgefleetError, *,
                    device_id: str, at_ms: int) -> update_pb2.UpdateStatus:
    """FAILED status for an offer refused before it became an update (``peek`` is the
    unverified manifest, only used to name it)."""
    return update_pb2.UpdateStatus(
        device_id=device_id, update_id=peek.update_id if peek else "",
        model_name=peek.model_name if peek else "", version=peek.version if peek else 0,
        state=UpdateState.FAILED.proto, reason=f"{e.reason}: {e}",
        action=ACTION_PROTO[e.action.value], at_ms=at_ms,
        target_sha256=peek.target_sha256 if peek else "",
        revision=peek.revision if peek else 0, variant=peek.variant if peek else "")


def progress_of_status(st: update_pb2.UpdateStatus) -> device_pb2.UpdateProgress:
    return device_pb2.UpdateProgress(
        update_id=st.update_id, model_name=st.model_name, version=st.version, state=st.state,
        reason=st.reason, revision=st.revision, variant=st.variant,
        target_sha256=st.target_sha256)


def fallback_status(failed: SlotInfo, reason: str, *, device_id: str,
                    at_ms: int) -> update_pb2.UpdateStatus:
    """ROLLED_BACK status for the update that installed ``failed`` (a local fallback)."""
    return update_pb2.UpdateStatus(
        device_id=device_id, update_id=failed.update_id, model_name=failed.name,
        version=failed.version, revision=failed.revision, variant=failed.variant,
        state=UpdateState.ROLLED_BACK.proto, reason=reason,
        action=common_pb2.ERROR_ACTION_GIVE_UP, at_ms=at_ms, target_sha256=failed.sha256)


def warmup_inputs(manifest: update_pb2.UpdateManifest) -> Any:
    """The manifest's first probe sample as warm-up inputs for the activation, or None
    (no probe, bad probe data, or no probe module: the warm-up is then synthetic)."""
    if not (manifest.HasField("probe") and manifest.probe.samples_npz):
        return None
    try:
        from agent.update.probe import probe_inputs

        return probe_inputs(manifest.probe)
    except Exception:  # warm-up inputs are an improvement, never a reason to fail
        log.exception("update %s: probe samples unusable for the warm-up", manifest.update_id)
        return None


def run_probe(registry: Any, manifest: update_pb2.UpdateManifest
              ) -> update_pb2.ProbeReport | None:
    """Run the manifest's signed accuracy probe on the engine now serving; None when the
    manifest has none or the probe could not run (logged: a probe never fails an update)."""
    m = manifest
    if not (m.HasField("probe") and m.probe.samples_npz):
        return None
    try:
        from agent.update.probe import run_probe as probe

        report: update_pb2.ProbeReport = probe(registry, name=m.model_name, version=m.version,
                                               variant=m.variant, spec=m.probe)
    except Exception:  # the probe reports on an engine; it must not break updates
        log.exception("update %s: accuracy probe failed to run", m.update_id)
        return None
    log.info("update %s: probe %s %.4g (threshold %.4g): %s", m.update_id, report.metric,
             report.value, report.threshold, "passed" if report.passed else "FAILED")
    return report
