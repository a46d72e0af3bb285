"""Wave gates: install results, then serving health over an observation window.

Called by controller.reconcile.rollouts for the open wave of a rollout release. Input: the
wave's per-device views (controller.reconcile.targets.DeviceView: updated, failed, stalled,
in progress, health, probe) and the wave's HealthGate; serving signals come from the
controller's windowed metrics (controller.fleet.windows.window_stats) on the wave's updated
devices since they reached the new engine, compared with the previous version's windows on
the same devices before the update.

The verdict is one of ``passed`` / ``waiting`` / ``failed`` with a message that names the
signal and the numbers (e.g. ``p99 41.2 ms vs 3.9 ms baseline (10.6x > 2.0x) on 3/3 canary
devices``) and the signals as a dict for the status. A serving signal that is already over
its limit with at least ``minRequests`` requests fails the gate at once, without waiting for
the soak to end: a bad canary is stopped as soon as the numbers say so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller.reconcile.spec import HealthGate

BASELINE_WINDOW_MS = 10 * 60 * 1000   # previous version's windows used as the baseline (at most)


class View(Protocol):
    device_id: str
    state: str
    reached_ms: int | None
    set_ms: int
    health: str
    online: bool
    probe: dict[str, Any]
    prev_version: int
    prev_since_ms: int
    restarted: bool


@dataclass
class GateResult:
    verdict: str                      # passed | waiting | failed
    message: str
    signals: dict[str, Any] = field(default_factory=dict)
    wait_ms: int = 0                  # re-check after this long (soak end), 0 = on change

    def to_status(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "message": self.message, "signals": self.signals}


# (model, version, device_ids, since_ms, until_ms) -> stats with requests, errors, p99_ms
StatsFn = Callable[[str, int, list[str], int, int | None], Any]


def evaluate(views: Sequence[View], gate: HealthGate, *, wave: str, model: str,
             version: int, now_ms: int, stats: StatsFn | None) -> GateResult:
    """The gate verdict of one wave (see module docstring)."""
    n = len(views)
    if n == 0:
        return GateResult("passed", "no devices in this wave")
    updated = [v for v in views if v.state == "updated"]
    failed = [v for v in views if v.state in ("failed", "rolled_back")]
    stalled = [v for v in views if v.state == "stalled"]
    moving = n - len(updated) - len(failed) - len(stalled)
    sig: dict[str, Any] = {"devices": n, "updated": len(updated), "failed": len(failed),
                           "stalled": len(stalled), "inProgress": moving,
                           "minSuccessPercent": gate.min_success_percent,
                           "maxFailed": gate.max_failed}
    if len(failed) > gate.max_failed:
        names = ", ".join(v.device_id for v in failed[:5])
        return GateResult("failed", f"{len(failed)} device(s) failed ({names}), maxFailed is "
                                    f"{gate.max_failed}", sig)
    if (n - len(failed)) * 100.0 / n < gate.min_success_percent:
        return GateResult("failed", f"{n - len(failed)}/{n} can still update, below "
                                    f"minSuccessPercent {gate.min_success_percent:g}", sig)
    # serving health on the devices that already run the new engine (early failure)
    health = _serving(updated, gate, model=model, version=version, now_ms=now_ms,
                      stats=stats, wave=wave, n=n)
    sig.update(health.signals)
    if health.verdict == "failed":
        return GateResult("failed", health.message, sig)
    if moving:
        return GateResult("waiting", f"{len(updated)}/{n} updated, {moving} in progress"
                          + (f", {len(stalled)} stalled" if stalled else ""), sig)
    if len(updated) * 100.0 / n < gate.min_success_percent:
        return GateResult("waiting", f"{len(updated)}/{n} updated, {len(stalled)} stalled: "
                                     f"below minSuccessPercent {gate.min_success_percent:g}",
                          sig)
    if gate.require_accuracy_probe:
        bad = [v for v in updated if v.probe and not v.probe.get("passed")]
        missing = [v for v in updated if not v.probe]
        sig["probe"] = {"passed": len(updated) - len(bad) - len(missing), "failed": len(bad),
                        "missing": len(missing)}
        if bad:
            p = bad[0].probe
            return GateResult("failed", (
                f"accuracy probe failed on {len(bad)}/{len(updated)} {wave} device(s): "
                f"{bad[0].device_id} {p.get('metric')} {float(p.get('value', 0)):.4g} vs "
                f"threshold {float(p.get('threshold', 0)):.4g}"), sig)
        if missing:
            return GateResult("waiting", f"waiting for the accuracy probe of "
                                         f"{len(missing)} device(s)", sig)
    if health.verdict == "waiting":
        return GateResult("waiting", health.message, sig, health.wait_ms)
    return GateResult("passed", f"gate passed: {len(updated)}/{n} updated"
                      + (f", {health.message}" if health.message else ""), sig)


def _serving(updated: Sequence[View], gate: HealthGate, *, model: str, version: int,
             now_ms: int, stats: StatsFn | None, wave: str, n: int) -> GateResult:
    """Observation window over the updated devices: soak time, samples, errors, latency,
    device health. ``passed`` with a summary, ``waiting`` with the time left, or ``failed``."""
    if not updated:
        return GateResult("waiting", "no device updated yet")
    since = max((v.reached_ms or v.set_ms) for v in updated)
    elapsed_ms = max(0, now_ms - since)
    sig: dict[str, Any] = {"observedSeconds": round(elapsed_ms / 1000, 1),
                           "soakSeconds": gate.soak_seconds}
    unhealthy = [v for v in updated if not v.online or v.health in ("throttled", "degraded")
                 or v.restarted]
    sig["unhealthy"] = len(unhealthy)
    if gate.max_unhealthy_percent is not None and updated:
        share = len(unhealthy) * 100.0 / len(updated)
        if share > gate.max_unhealthy_percent:
            return GateResult("failed", (
                f"{len(unhealthy)}/{len(updated)} {wave} device(s) offline, throttled, "
                f"degraded or restarted ({share:.0f}% > {gate.max_unhealthy_percent:g}%): "
                + ", ".join(v.device_id for v in unhealthy[:5])), sig)
    parts: list[str] = []
    if gate.watches_serving and stats is not None:
        ids = [v.device_id for v in updated]
        cur = stats(model, version, ids, since, None)
        reqs, errs = int(cur.requests or 0), int(cur.errors or 0)
        sig.update({"requests": reqs, "errors": errs, "minRequests": gate.min_requests})
        enough = reqs >= max(1, gate.min_requests)
        if gate.max_error_rate_percent is not None and reqs:
            rate = errs * 100.0 / reqs
            sig["errorRatePercent"] = round(rate, 3)
            sig["maxErrorRatePercent"] = gate.max_error_rate_percent
            if enough and rate > gate.max_error_rate_percent:
                return GateResult("failed", (
                    f"error rate {rate:.1f}% ({errs}/{reqs} requests) > "
                    f"{gate.max_error_rate_percent:g}% on {len(updated)}/{n} {wave} "
                    "device(s)"), sig)
            parts.append(f"error rate {rate:.2f}%")
        if gate.max_latency_ratio is not None and cur.p99_ms is not None:
            prev_versions = sorted({v.prev_version for v in updated if v.prev_version})
            base_p99 = None
            if prev_versions:
                # the previous engine's windows on these devices, since they served it
                first_set = min(v.set_ms for v in updated)
                start = max([first_set - BASELINE_WINDOW_MS,
                             *(v.prev_since_ms for v in updated)])
                base = stats(model, prev_versions[-1], ids, start, first_set)
                base_p99 = base.p99_ms
            sig["p99Ms"] = round(float(cur.p99_ms), 3)
            sig["maxLatencyRatio"] = gate.max_latency_ratio
            if base_p99:
                ratio = float(cur.p99_ms) / float(base_p99)
                sig.update({"baselineP99Ms": round(float(base_p99), 3),
                            "latencyRatio": round(ratio, 2)})
                if enough and ratio > gate.max_latency_ratio:
                    return GateResult("failed", (
                        f"p99 {cur.p99_ms:.1f} ms vs {base_p99:.1f} ms baseline "
                        f"({ratio:.1f}x > {gate.max_latency_ratio:g}x) on "
                        f"{len(updated)}/{n} {wave} device(s)"), sig)
                parts.append(f"p99 {ratio:.2f}x baseline")
            else:
                sig["baseline"] = "none (no earlier windows on these devices)"
        if reqs < gate.min_requests:
            return GateResult("waiting", f"observing: {reqs}/{gate.min_requests} requests "
                                         f"served on the new version", sig)
    soak_ms = gate.soak_seconds * 1000
    if elapsed_ms < soak_ms:
        left = soak_ms - elapsed_ms
        return GateResult("waiting", f"observing for {left // 1000 + 1}s more"
                          + (f" ({', '.join(parts)})" if parts else ""), sig, left)
    return GateResult("passed", ", ".join(parts), sig)
