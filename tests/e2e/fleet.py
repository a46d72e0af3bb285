"""A real fleet on this machine for end-to-end tests: embedded controller + real agent processes.

Used by tests/e2e/test_spine.py and tests/e2e/test_dashboard_browser.py. The controller
(ControllerCore + API server, controller/embedded.py) runs in the test's event loop against the
test's Mosquitto broker (fixture ``mosquitto``) and a real SQLite database; each agent is a real
``edgefleet-agent run`` process with its own data folder and inference port.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from controller.demo_agents import AgentProcess, local_device_class, write_agent_config
from controller.embedded import EmbeddedController, EmbeddedOptions
from tests.helpers.broker import Broker

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


@dataclass
class Fleet:
    ctrl: EmbeddedController
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.ctrl.url

    async def get(self, path: str) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as c:
            r = await c.get(path)
            r.raise_for_status()
            return r.json()

    async def devices(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in (await self.get("/api/v1/devices"))["items"]}

    def logs(self) -> str:
        return "\n".join(f"--- {a.device_id} ---\n{a.log_tail(3000)}" for a in self.agents)

    async def stop(self) -> None:
        for a in self.agents:
            a.stop()
        await self.ctrl.stop()


async def wait_for(check: Callable[[], Awaitable[T | None]], *, timeout_s: float, what: str,
                   on_timeout: Callable[[], str] = lambda: "") -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last={last!r}\n"
                         f"{on_timeout()}")


async def wait_device_online(url: str, device_id: str, *, timeout_s: float, what: str,
                             on_timeout: Callable[[], str] = lambda: "") -> dict[str, Any]:
    """Wait until the API at ``url`` lists ``device_id`` online with a heartbeat; its row."""
    async def online() -> dict[str, Any] | None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            items = (await c.get("/api/v1/devices")).json()["items"]
        dev = next((d for d in items if d["id"] == device_id), None)
        return dev if dev and dev["online"] and dev.get("last_heartbeat_ms") else None

    return await wait_for(online, timeout_s=timeout_s, what=what, on_timeout=on_timeout)


async def start_fleet(tmp_path: Path, broker: Broker, *, agents: int) -> Fleet:
    ctrl = EmbeddedController(EmbeddedOptions(
        data_dir=tmp_path / "controller", api_port=0, broker_url=broker.url,
        settings_overrides={"compile_in_process_pool": False, "resync_s": 1.0}))
    await ctrl.start()
    fleet = Fleet(ctrl)
    try:
        for i in range(1, agents + 1):
            a = write_agent_config(tmp_path / "agents", f"board-{i}",
                                   device_class=local_device_class(), mqtt_host=broker.host,
                                   mqtt_port=broker.port,
                                   root_public_key_b64=ctrl.keys.root_public_b64())
            a.start()
            fleet.agents.append(a)

        async def all_online() -> bool:
            devs = await fleet.devices()
            return all(devs.get(a.device_id, {}).get("online") for a in fleet.agents)

        await wait_for(all_online, timeout_s=60, what="agents online", on_timeout=fleet.logs)
    except BaseException:
        await fleet.stop()
        raise
    return fleet


def write_manifests(folder: Path, *, model: Path, name: str = "digits", version: int = 1,
                    rollout: bool = True, waves: list[dict[str, Any]] | None = None) -> Path:
    """EdgeModel (+ EdgeRollout) YAML for ``model`` targeting this machine's device class."""
    folder.mkdir(parents=True, exist_ok=True)
    docs: list[dict[str, Any]] = [{
        "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"version": version, "source": {"path": str(model)},
                 "targets": [{"deviceClass": local_device_class(), "precisions": ["fp32"]}]},
    }]
    if rollout:
        docs.append({
            "apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeRollout",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": name, "waves": waves or [{"name": "all", "percent": 100}]},
        })
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


async def edgefleet_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real ``edgefleet`` console script (or ``python -m controller.cli``) in a thread,
    so the controller in this event loop keeps answering it."""
    script = Path(sys.executable).with_name("edgefleet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "controller.cli"]
    return await asyncio.to_thread(subprocess.run, [*cmd, *args], capture_output=True,
                                   text=True, timeout=timeout_s, cwd=REPO)
