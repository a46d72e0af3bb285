"""Desired vs observed for one (device, model): DeviceTarget rows and per-device views.

Used by controller.reconcile.rollouts (set targets when a wave opens, move them back on a
back-out or abort, compute each device's view for the status and the gates) and by the
API's device views. The observed side is what the device reports in heartbeats
(``Device.models``: loaded engines with version, revision, sha256; ``Device.slots``;
``Device.faults``) plus the state of the offer that carries the target's bytes (the
DeviceRollout row with the target's update id, moved by the ingest). A device is
``updated`` only when it reports serving exactly the target (sha256, version, revision):
an offer's history never counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.fleet.models import Device, DeviceRollout, DeviceRolloutState, DeviceTarget

FAILED_ATTEMPT = {DeviceRolloutState.FAILED, DeviceRolloutState.ROLLED_BACK}
IN_FLIGHT = {DeviceRolloutState.OFFERED, DeviceRolloutState.DOWNLOADING,
             DeviceRolloutState.VERIFYING, DeviceRolloutState.PATCHING,
             DeviceRolloutState.STAGED, DeviceRolloutState.ACTIVATING}


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class Served:
    """What a device reports loaded for one (model, variant)."""

    sha256: str = ""
    version: int = 0
    revision: int = 0
    engine_version: int = 0
    active: bool = False

    @property
    def pair(self) -> tuple[int, int]:
        return (self.version, self.revision)

    @property
    def label(self) -> str:
        if not self.sha256:
            return ""
        out = f"v{self.version}"
        if self.engine_version and self.engine_version != self.version:
            out += f" (engine of v{self.engine_version})"
        if self.revision:
            out += f" r{self.revision}"
        return out


def served(device: Device | None, model: str, variant: str = "") -> Served:
    """The engine a device reports for (model, variant); empty when none.

    ``active`` is not required: while the thermal policy serves a variant, the main engine
    is loaded but not active, and it is still what the device has installed."""
    for m in (device.models if device is not None else None) or []:
        if m.get("name") == model and str(m.get("variant") or "") == variant:
            return Served(sha256=str(m.get("sha256") or ""), version=_int(m.get("version")),
                          revision=_int(m.get("revision")),
                          engine_version=_int(m.get("engine_version")),
                          active=bool(m.get("active")))
    return Served()


def in_slots(device: Device | None, sha256: str) -> bool:
    """True when the device reports ``sha256`` in one of its A/B slots (or loaded)."""
    if device is None or not sha256:
        return False
    return any(str(m.get("sha256") or "") == sha256
               for m in [*(device.slots or []), *(device.models or [])])


def fault_for(device: Device | None, model: str, sha256: str, since_ms: int) -> dict[str, Any] | None:
    """A fault the device reported for this engine after ``since_ms`` (integrity, crash loop)."""
    for f in reversed((device.faults if device is not None else None) or []):
        if (f.get("name") == model and str(f.get("sha256") or "") == sha256
                and _int(f.get("at_ms")) >= since_ms):
            return f
    return None


def reached(t: DeviceTarget, s: Served) -> bool:
    return bool(t.target_sha256) and s.sha256 == t.target_sha256 and s.pair == (t.version,
                                                                                t.revision)


@dataclass
class DeviceView:
    """One device's place in a rollout, for status, gates and the dashboard."""

    device_id: str
    wave: int
    state: str                     # pending | offered..activating | updated | failed |
    #                                rolled_back | stalled | superseded | backed_out
    reason: str = ""
    target: DeviceTarget | None = None
    served: Served = field(default_factory=Served)
    attempt: DeviceRollout | None = None
    set_ms: int = 0
    reached_ms: int | None = None
    health: str = ""
    online: bool = True
    restarted: bool = False
    probe: dict[str, Any] = field(default_factory=dict)
    prev_version: int = 0
    prev_since_ms: int = 0

    def to_status(self, wave_name: str) -> dict[str, Any]:
        a, t = self.attempt, self.target
        out: dict[str, Any] = {"state": self.state, "wave": wave_name, "reason": self.reason,
                               "serving": self.served.label, "online": self.online}
        if t is not None:
            out.update({"desiredVersion": t.version, "desiredRevision": t.revision,
                        "desiredEngineVersion": t.engine_version or t.version})
        if a is not None:
            out.update({"updateId": a.update_id, "bytesSent": a.bytes_sent, "codec": a.codec,
                        "payloadSize": a.payload_size})
        if self.probe:
            out["probe"] = self.probe
        return out


def view(*, device_id: str, wave: int, device: Device | None, target: DeviceTarget | None,
         attempt: DeviceRollout | None, model: str, now_ms: int, deadline_s: int,
         heartbeat_ms: int) -> DeviceView:
    """Compare desired and observed for one device whose target this rollout owns."""
    v = DeviceView(device_id=device_id, wave=wave, state="pending", target=target,
                   attempt=attempt,
                   served=served(device, model, target.variant if target else ""))
    if device is not None:
        v.health = device.health or ""
        v.online = bool(device.online)
        if not v.online:
            v.health = "stale"
    if target is None:
        v.reason = "waiting for its wave"
        return v
    v.set_ms, v.reached_ms, v.prev_version = target.set_ms, target.reached_ms, target.prev_version
    v.prev_since_ms = target.prev_since_ms
    if attempt is not None and attempt.probe:
        v.probe = dict(attempt.probe)
    if reached(target, v.served):
        v.state = "backed_out" if target.reason in ("backout", "abort") else "updated"
        v.reason = "" if v.state == "updated" else f"returned to the previous engine ({target.reason})"
        if device is not None and v.reached_ms and device.uptime_s:
            started = now_ms - int(device.uptime_s) * 1000
            v.restarted = started > v.reached_ms + 2 * max(heartbeat_ms, 1000)
        return v
    fault = fault_for(device, model, target.target_sha256, target.set_ms)
    if fault is not None:
        v.state, v.reason = "rolled_back", f"{fault.get('reason')}: {fault.get('message', '')}"
        return v
    if attempt is not None and attempt.state in FAILED_ATTEMPT:
        v.state, v.reason = attempt.state.value, attempt.reason
        return v
    if attempt is not None and attempt.state == DeviceRolloutState.COMMITTED:
        # committed, but the device does not report serving it (yet): trust the heartbeat
        # that comes after the commit
        if device is not None and (device.last_heartbeat_ms or 0) > attempt.updated_ms + 1000:
            v.state, v.reason = "rolled_back", (
                f"committed, but the device serves {v.served.label or 'nothing'}")
            return v
        v.state = "activating"
    elif attempt is not None and attempt.state in IN_FLIGHT:
        v.state, v.reason = attempt.state.value, attempt.reason
    else:
        v.reason = "offer not published yet" if attempt is None else attempt.reason
    last = max(target.progress_ms, target.set_ms,
               attempt.updated_ms if attempt is not None else 0)
    if now_ms - last > deadline_s * 1000:
        why = "offline" if not v.online else f"no progress ({v.state})"
        v.state, v.reason = "stalled", f"{why} for over {deadline_s}s"
    return v


def device_updates(device: Device, targets: list[DeviceTarget],
                   attempts: dict[str, DeviceRollout]) -> tuple[str, list[dict[str, Any]]]:
    """The device's UPDATE column and per-target detail: desired vs observed for each of its
    targets (what it should serve, what it serves, the offer's state). "" when it serves
    every target; a refused offer of a deleted rollout or an earlier version leaves no
    trace here (that is history)."""
    rows: list[dict[str, Any]] = []
    for t in sorted(targets, key=lambda t: (t.model_name, t.variant)):
        s = served(device, t.model_name, t.variant)
        a = attempts.get(t.update_id) if t.update_id else None
        if reached(t, s):
            state = "up-to-date"
        elif fault_for(device, t.model_name, t.target_sha256, t.set_ms) is not None:
            state = "rolled_back"
        elif a is not None and a.state != DeviceRolloutState.COMMITTED:
            state = a.state.value
        else:
            state = "pending"
        rows.append({"model": t.model_name, "variant": t.variant, "state": state,
                     "desired": f"v{t.version}" + (f"r{t.revision}" if t.revision else ""),
                     "serving": s.label, "rollout": t.rollout, "reason": t.reason,
                     "reason_detail": a.reason if a is not None else ""})
    open_ = [r for r in rows if r["state"] != "up-to-date"]
    if not open_:
        return "", rows
    order = ["failed", "rolled_back", "activating", "staged", "patching", "verifying",
             "downloading", "offered", "pending", "cancelled"]
    worst = min(open_, key=lambda r: order.index(r["state"]) if r["state"] in order else 99)
    text = worst["state"] if len(open_) == 1 else f"{worst['state']} (+{len(open_) - 1})"
    return text, rows
