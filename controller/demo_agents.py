"""Run real agent processes on this machine (for `edgefleet demo` and the end-to-end tests).

Called by controller/demo.py and tests/e2e. Each agent gets its own data folder, device id,
config file and local inference port, and trusts the demo controller's root key. The agent is
started as its own process (``edgefleet-agent run --config FILE``), never imported: the
controller and the agent do not import each other. ``infer`` talks to an agent's KServe v2 API.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from controller.broker import free_port

ARCH_CLASSES = {"x86_64": "cpu-x86-64", "amd64": "cpu-x86-64", "aarch64": "cpu-aarch64",
                "arm64": "cpu-aarch64"}


def local_device_class() -> str:
    """The default DeviceClass name of this machine's CPU (cpu-x86-64 or cpu-aarch64)."""
    return ARCH_CLASSES.get(platform.machine().lower(), "cpu-x86-64")


def agent_command() -> list[str]:
    """How to start an agent: the console script beside this Python, else ``-m agent.cli``."""
    script = Path(sys.executable).with_name("edgefleet-agent")
    if script.exists():
        return [str(script)]
    found = shutil.which("edgefleet-agent")
    return [found] if found else [sys.executable, "-m", "agent.cli"]


@dataclass
class AgentProcess:
    """One agent child process and where to reach it."""

    device_id: str
    data_dir: Path
    config_path: Path
    serve_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*agent_command(), "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, so the broker publishes the agent's last will."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def write_agent_config(root: Path, device_id: str, *, device_class: str, mqtt_host: str,
                       mqtt_port: int, root_public_key_b64: str, serve_port: int | None = None,
                       heartbeat_interval_s: float = 1.0, metrics_interval_s: float = 2.0,
                       extra: dict[str, Any] | None = None,
                       mqtt_extra: dict[str, Any] | None = None) -> AgentProcess:
    """Write ``root/device_id/agent.yaml`` and return the (not yet started) AgentProcess.

    ``mqtt_extra`` is merged into the ``mqtt`` section (``tls: {ca, cert, key}``, ``protocol``).
    """
    data_dir = (root / device_id).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = serve_port or free_port()
    cfg: dict[str, Any] = {
        "device_id": device_id,
        "device_class": device_class,
        "data_dir": str(data_dir / "data"),
        "mqtt": {"host": mqtt_host, "port": mqtt_port, "reconnect_min_s": 0.2,
                 "reconnect_max_s": 2.0},
        "trust": {"root_public_key": root_public_key_b64},
        "serve": {"enabled": True, "host": "127.0.0.1", "port": port},
        "heartbeat_interval_s": heartbeat_interval_s,
        "metrics_interval_s": metrics_interval_s,
        "labels": {"demo": "true"},
    }
    if mqtt_extra:
        cfg["mqtt"].update(mqtt_extra)
    if extra:
        cfg.update(extra)
    config_path = data_dir / "agent.yaml"
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, config_path)
    return AgentProcess(device_id, data_dir, config_path, port, data_dir / "agent.log")


def infer(serve_url: str, model: str, array: np.ndarray, *, input_name: str = "input",
          timeout_s: float = 10.0) -> dict[str, np.ndarray]:
    """One KServe v2 (Open Inference Protocol) request; returns outputs by name."""
    body = {"inputs": [{"name": input_name, "shape": list(array.shape), "datatype": "FP32",
                        "data": array.astype(np.float32).ravel().tolist()}]}
    resp = httpx.post(f"{serve_url}/v2/models/{model}/infer", json=body, timeout=timeout_s)
    resp.raise_for_status()
    out: dict[str, np.ndarray] = {}
    for o in resp.json().get("outputs", []):
        out[o["name"]] = np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
    return out
