"""Host readings for metrics and the thermal policy: CPU percent, the agent's RSS, available
memory, thermal zone temperatures and accelerator load.

Called by :class:`agent.telemetry.metrics.MetricsCollector` and
:class:`agent.telemetry.thermal.ThermalPolicy`. Every reading that cannot be taken on this
board is left absent and named in ``HostMetrics.unavailable`` with the reason; nothing is
invented. Roots are configurable so tests can point them at fake sysfs trees.

Sources: ``/sys/class/thermal/thermal_zone*/{type,temp}`` (millidegrees C); accelerator load
from Jetson ``/sys/devices/gpu.0/load`` (per-mille), ``/sys/class/devfreq/*/load``
("busy@freq" or a number) and RK3588 ``/sys/kernel/debug/rknpu/load``
("NPU load:  Core0: 12%, Core1: 0%, ...").
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from protos.edgefleet.v1.device_pb2 import HostMetrics, Temperature

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the agent extra
    psutil = None

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZoneReading:
    zone: str
    celsius: float


def read_thermal_zones(root: Path = Path("/sys/class/thermal")) -> tuple[list[ZoneReading], str]:
    """Temperatures of every readable thermal zone under ``root``; second item is why
    none could be read ("" when at least one was)."""
    readings: list[ZoneReading] = []
    errors: list[str] = []
    try:
        zones = sorted(p for p in root.glob("thermal_zone*") if p.is_dir())
    except OSError as e:
        return [], f"cannot list {root}: {e}"
    for zone in zones:
        try:
            raw = (zone / "temp").read_text().strip()
            millideg = int(raw)
        except (OSError, ValueError) as e:
            errors.append(f"{zone.name}: {e}")
            continue
        try:
            name = (zone / "type").read_text().strip() or zone.name
        except OSError:
            name = zone.name
        readings.append(ZoneReading(f"{zone.name}:{name}", millideg / 1000.0))
    if readings:
        return readings, ""
    return [], "; ".join(errors) if errors else f"no thermal zones under {root}"


_RKNPU_CORE = re.compile(r"Core\d+:\s*(\d+(?:\.\d+)?)%")


def read_accelerator_load(*, sys_root: Path = Path("/sys")) -> tuple[float | None, str]:
    """Accelerator load in percent, or ``(None, why)``."""
    jetson = sys_root / "devices/gpu.0/load"
    tried: list[str] = []
    try:
        if jetson.is_file():
            return int(jetson.read_text().strip()) / 10.0, ""  # per-mille on Jetson
        tried.append(str(jetson))
        rknpu = sys_root / "kernel/debug/rknpu/load"
        if rknpu.is_file():
            cores = [float(v) for v in _RKNPU_CORE.findall(rknpu.read_text())]
            if cores:
                return sum(cores) / len(cores), ""
        tried.append(str(rknpu))
        for dev in sorted((sys_root / "class/devfreq").glob("*/load")):
            text = dev.read_text().strip()  # "37@624750000Hz" or "37"
            return float(text.split("@", 1)[0]), ""
        tried.append(str(sys_root / "class/devfreq/*/load"))
    except (OSError, ValueError) as e:
        return None, f"accelerator load unreadable: {e}"
    return None, "no accelerator load source (" + ", ".join(tried) + ")"


@dataclass
class HostReader:
    """Takes host readings. ``cpu_percent`` is system-wide since the previous read."""

    thermal_root: Path = Path("/sys/class/thermal")
    sys_root: Path = Path("/sys")
    pid: int = field(default_factory=os.getpid)

    def __post_init__(self) -> None:
        self._proc = psutil.Process(self.pid) if psutil is not None else None
        if psutil is not None:
            psutil.cpu_percent(interval=None)  # prime: the first call has no baseline

    def temperatures(self) -> list[ZoneReading]:
        return read_thermal_zones(self.thermal_root)[0]

    def cpu_percent(self) -> float | None:
        return psutil.cpu_percent(interval=None) if psutil is not None else None

    def read(self) -> HostMetrics:
        msg = HostMetrics()
        if psutil is None or self._proc is None:
            msg.unavailable.append("cpu_percent, agent_rss_bytes, memory_available_bytes: "
                                   "psutil is not installed")
        else:
            msg.cpu_percent = psutil.cpu_percent(interval=None)
            try:
                msg.agent_rss_bytes = self._proc.memory_info().rss
            except (psutil.Error, OSError) as e:
                msg.unavailable.append(f"agent_rss_bytes: {e}")
            msg.memory_available_bytes = psutil.virtual_memory().available
        zones, why = read_thermal_zones(self.thermal_root)
        msg.temperatures.extend(Temperature(zone=z.zone, celsius=z.celsius) for z in zones)
        if why:
            msg.unavailable.append(f"temperatures: {why}")
        load, why = read_accelerator_load(sys_root=self.sys_root)
        if load is not None:
            msg.accelerator_load_percent = load
        else:
            msg.unavailable.append(f"accelerator_load_percent: {why}")
        return msg
