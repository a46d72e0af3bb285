"""Heartbeat builder: who this device is, what it can run, what it serves, update progress.

:func:`device_facts` reads architecture, the CPU flags that matter for engine selection,
available runtimes (``agent.runtime.base.available_runtimes``), OS, CPU count, memory and
board name once at startup. :class:`HeartbeatBuilder` assembles a ``Heartbeat`` message on
each tick: served models, every engine installed in a slot, update progress, recent faults,
the DesiredState generation acted on and the count of agent starts. Called by
:class:`agent.app.Agent` every ``heartbeat_interval_s``.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from protos.edgefleet.v1 import device_pb2

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"

#: CPU flags that decide which engine variant runs well (x86 and Arm names)
INTERESTING_CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
    "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "neon", "asimd", "asimdhp", "asimddp", "asimdfhm", "sve", "sve2", "i8mm", "bf16",
)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The interesting CPU flags of this machine (empty where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return []
    found: set[str] = set()
    for line in text.splitlines():
        head, sep, tail = line.partition(":")
        if sep and head.strip() in ("flags", "Features"):
            found.update(tail.split())
    return [f for f in INTERESTING_CPU_FLAGS if f in found]


def board_name() -> str:
    """Board model from the device tree (Arm boards) or DMI (x86); "" when unreadable."""
    for p in ("/sys/firmware/devicetree/base/model", "/proc/device-tree/model",
              "/sys/class/dmi/id/product_name"):
        try:
            return Path(p).read_text(errors="replace").strip("\x00\n ")
        except OSError:
            continue
    return ""


def memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return 0


def device_facts() -> device_pb2.DeviceFacts:
    """Facts that match this device to a DeviceClass."""
    from agent.runtime.base import available_runtimes, host_arch

    facts = device_pb2.DeviceFacts(
        arch=host_arch(), cpu_flags=cpu_flags(), os=platform.platform(),
        python_version=platform.python_version(), cpu_count=os.cpu_count() or 0,
        memory_bytes=memory_bytes(), board=board_name())
    # probed without importing onnxruntime; a broken backend is logged and left out
    facts.runtimes.extend(available_runtimes())
    return facts


class HeartbeatBuilder:
    """Builds one Heartbeat per call; sequence number and uptime kept here."""

    def __init__(self, *, device_id: str, device_class: str, facts: device_pb2.DeviceFacts,
                 served: Callable[[], list[device_pb2.ServedModel]],
                 progress: Callable[[], list[device_pb2.UpdateProgress]],
                 health: Callable[[], tuple[str, str]] = lambda: ("ok", ""),
                 serve_url: str = "", labels: dict[str, str] | None = None,
                 slots: Callable[[], list[device_pb2.ServedModel]] = list,
                 faults: Callable[[], list[device_pb2.ModelFault]] = list,
                 desired_generation: Callable[[], int] = lambda: 0,
                 restarts: int = 0, interval_ms: int = 0) -> None:
        self.device_id = device_id
        self.interval_ms = max(0, min(int(interval_ms), 2**32 - 1))
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self.device_class = device_class
        self.facts = facts
        self._served = served
        self._progress = progress
        self._health = health
        self._slots = slots
        self._faults = faults
        self._desired_generation = desired_generation
        self.restarts = restarts
        self.serve_url = serve_url
        self.started = time.monotonic()
        self.seq = 0

    def build(self) -> device_pb2.Heartbeat:
        self.seq += 1
        health, reason = self._health()
        hb = device_pb2.Heartbeat(
            device_id=self.device_id, device_class=self.device_class, facts=self.facts,
            agent_version=AGENT_VERSION, uptime_s=int(time.monotonic() - self.started),
            sent_at_ms=int(time.time() * 1000), seq=self.seq, health=health,
            health_reason=reason, serve_url=self.serve_url,
            desired_generation=self._desired_generation(), restarts=self.restarts,
            heartbeat_interval_ms=self.interval_ms)
        hb.labels.update(self.labels)
        hb.models.extend(self._served())
        hb.slots.extend(self._slots())
        hb.updates.extend(self._progress())
        hb.faults.extend(self._faults())
        return hb
