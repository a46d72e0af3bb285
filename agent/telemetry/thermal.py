"""Thermal policy: throttle serving when the board runs hot or its CPU is saturated.

The agent app creates one ``ThermalPolicy`` with the registry and calls ``evaluate()`` every
few seconds (or ``run(stop)`` in a thread); the heartbeat reports ``health()``. Decisions use
two thresholds per signal (hysteresis) so the policy does not flap:

* temperature >= ``throttle_temp_c`` or CPU >= ``throttle_cpu_percent`` -> THROTTLED: the
  registry's per-model concurrency drops to ``throttled_concurrency`` (extra requests queue)
  and health becomes ``throttled`` with the reason; back to NORMAL only when temperature
  <= ``recover_temp_c`` and CPU <= ``recover_cpu_percent``.
* temperature >= ``light_variant_temp_c`` and the ``light_variant`` (default ``light``)
  installed -> the registry serves that variant; back to the main model at
  <= ``light_recover_temp_c``. A variant installed while hot is picked up at the next
  evaluation.

Every decision is logged and returned as a :class:`ThermalEvent`.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent.telemetry.host import read_thermal_zones

if TYPE_CHECKING:
    from agent.runtime.registry import ModelRegistry

log = logging.getLogger(__name__)

LIGHT_VARIANT = "light"
DEFAULT_ZONES_ROOT = "/sys/class/thermal"


class ThermalState(str, enum.Enum):
    NORMAL = "normal"
    THROTTLED = "throttled"


@dataclass
class ThermalConfig:
    """Thresholds of the thermal policy (agent config section ``thermal``)."""

    enabled: bool = True
    interval_s: float = 5.0
    throttle_temp_c: float = 80.0
    recover_temp_c: float = 72.0
    throttle_cpu_percent: float = 95.0
    recover_cpu_percent: float = 80.0
    throttled_concurrency: int = 1
    normal_concurrency: int = 0            # 0 = unlimited
    light_variant_temp_c: float = 85.0
    light_recover_temp_c: float = 76.0
    zones: list[str] = field(default_factory=list)  # zone name substrings; [] = every zone
    # where the thermal_zone*/temp files are ("" = /sys/class/thermal); tests point it at a
    # fake sysfs folder
    zones_root: str = ""
    # the variant (EdgeModel spec.variants[].name) served while hot
    light_variant: str = LIGHT_VARIANT

    def validate(self) -> None:
        if self.recover_temp_c > self.throttle_temp_c:
            raise ValueError("recover_temp_c must be <= throttle_temp_c")
        if self.light_recover_temp_c > self.light_variant_temp_c:
            raise ValueError("light_recover_temp_c must be <= light_variant_temp_c")
        if self.recover_cpu_percent > self.throttle_cpu_percent:
            raise ValueError("recover_cpu_percent must be <= throttle_cpu_percent")
        if self.throttled_concurrency < 1:
            raise ValueError("throttled_concurrency must be >= 1")
        if not self.light_variant:
            raise ValueError("light_variant must not be empty")


@dataclass(frozen=True)
class ThermalEvent:
    at: float               # time.time()
    action: str             # throttle | recover | light_variant_on | light_variant_off
    reason: str
    temp_c: float | None
    cpu_percent: float | None


def _default_cpu() -> float | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return None
    return float(psutil.cpu_percent(interval=None))


class ThermalPolicy:
    """Applies :class:`ThermalConfig` to the registry from temperature and CPU readings."""

    def __init__(self, config: ThermalConfig, *, zones_root: Path | None = None,
                 registry: ModelRegistry | None = None,
                 cpu_percent: Callable[[], float | None] | None = None) -> None:
        config.validate()
        self.config = config
        self.zones_root = Path(zones_root if zones_root is not None else
                               (config.zones_root or DEFAULT_ZONES_ROOT))
        self.registry = registry
        self._cpu = cpu_percent or _default_cpu
        self.state = ThermalState.NORMAL
        self.light_active = False
        self._reason = ""
        self.events: list[ThermalEvent] = []
        self._lock = threading.Lock()
        if cpu_percent is None:
            _default_cpu()  # prime psutil's baseline

    def health(self) -> tuple[str, str]:
        """("ok", "") or ("throttled", reason) for the heartbeat."""
        with self._lock:
            if self.state is ThermalState.THROTTLED:
                return "throttled", self._reason
            return "ok", ""

    def _temperature(self) -> tuple[float | None, str]:
        zones, _why = read_thermal_zones(self.zones_root)
        if self.config.zones:
            zones = [z for z in zones if any(s in z.zone for s in self.config.zones)]
        if not zones:
            return None, ""
        hottest = max(zones, key=lambda z: z.celsius)
        return hottest.celsius, hottest.zone

    def evaluate(self) -> list[ThermalEvent]:
        """Take readings, apply decisions, return the events of this evaluation."""
        cfg = self.config
        temp, zone = self._temperature()
        cpu = self._cpu()
        new: list[ThermalEvent] = []

        def emit(action: str, reason: str) -> None:
            event = ThermalEvent(time.time(), action, reason, temp, cpu)
            log.warning("thermal policy: %s (%s)", action, reason)
            new.append(event)

        with self._lock:
            if self.state is ThermalState.NORMAL:
                hot = temp is not None and temp >= cfg.throttle_temp_c
                busy = cpu is not None and cpu >= cfg.throttle_cpu_percent
                if hot or busy:
                    self._reason = (f"temperature {temp:.1f}C >= {cfg.throttle_temp_c:.1f}C "
                                    f"({zone})" if hot else
                                    f"cpu {cpu:.0f}% >= {cfg.throttle_cpu_percent:.0f}%")
                    self.state = ThermalState.THROTTLED
                    if self.registry is not None:
                        self.registry.set_max_concurrency(cfg.throttled_concurrency)
                    emit("throttle", f"{self._reason}; concurrency -> "
                                     f"{cfg.throttled_concurrency}")
            else:
                cool = temp is None or temp <= cfg.recover_temp_c
                idle = cpu is None or cpu <= cfg.recover_cpu_percent
                if cool and idle:
                    self.state = ThermalState.NORMAL
                    self._reason = ""
                    if self.registry is not None:
                        self.registry.set_max_concurrency(cfg.normal_concurrency)
                    temp_text = "n/a" if temp is None else f"{temp:.1f}C"
                    cpu_text = "n/a" if cpu is None else f"{cpu:.0f}%"
                    emit("recover", f"temperature {temp_text} <= {cfg.recover_temp_c:.1f}C, "
                                    f"cpu {cpu_text}; concurrency -> "
                                    f"{cfg.normal_concurrency or 'unlimited'}")
            if self.registry is not None and temp is not None:
                if not self.light_active and temp >= cfg.light_variant_temp_c \
                        and self.registry.has_variant(cfg.light_variant):
                    self.light_active = True
                    self.registry.set_preferred_variant(cfg.light_variant)
                    emit("light_variant_on", f"temperature {temp:.1f}C >= "
                                             f"{cfg.light_variant_temp_c:.1f}C ({zone}); "
                                             f"serving variant {cfg.light_variant!r}")
                elif self.light_active and temp <= cfg.light_recover_temp_c:
                    self.light_active = False
                    self.registry.set_preferred_variant("")
                    emit("light_variant_off", f"temperature {temp:.1f}C <= "
                                              f"{cfg.light_recover_temp_c:.1f}C")
            self.events.extend(new)
            del self.events[:-100]  # keep the recent history only
        return new

    def run(self, stop: threading.Event) -> None:
        """Evaluate every ``interval_s`` until ``stop`` is set (for a daemon thread)."""
        while not stop.wait(self.config.interval_s):
            try:
                self.evaluate()
            except Exception:  # a sensor glitch must not stop the policy
                log.exception("thermal policy evaluation failed")
