"""A real fleet on this machine for end-to-end tests: embedded controller + real agent processes.

Used by tests/e2e/test_spine.py, test_dashboard_browser.py, test_variants.py and
test_fleet_state_agents.py. The controller (ControllerCore + API server, controller/embedded.py)
runs in the test's event loop against the test's Mosquitto broker (fixture ``mosquitto``) and a
real SQLite database; each agent is a real ``edgefleet-agent run`` process with its own data
folder and inference port.

Also: :class:`ControllerProcess` (the same embedded controller as its own process, so a test
can SIGKILL it and start a successor on the same data folder), :class:`DegradedAgentProcess`
(a real agent process whose onnxruntime backend is tests.helpers.fake_backends'
DegradedOrtBackend: a board worse than the controller's check), :class:`OfferCounter` (every
offer published on the broker, per device), and JSON helpers for resources and statuses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from controller.demo_agents import AgentProcess, local_device_class, write_agent_config
from controller.embedded import EmbeddedController, EmbeddedOptions
from protos import topics
from tests.helpers.broker import Broker, free_port

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

    async def device(self, device_id: str) -> dict[str, Any]:
        """``/api/v1/devices/{id}``: the row plus heartbeat models, slots, desired, history."""
        view: dict[str, Any] = await self.get(f"/api/v1/devices/{device_id}")
        return view

    async def rollout(self, name: str) -> dict[str, Any]:
        """EdgeRollout default/``name``'s status ({} before it has one)."""
        return await rollout_status(self.url, name)

    async def apply(self, *docs: dict[str, Any]) -> list[dict[str, Any]]:
        """Apply through the API (files by absolute path); fails unless every doc is taken."""
        return await apply_ok(self.url, list(docs))

    def agent(self, device_id: str) -> AgentProcess:
        return next(a for a in self.agents if a.device_id == device_id)

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


FAST_SETTINGS: dict[str, Any] = {"compile_in_process_pool": False, "resync_s": 1.0}


Wrap = Callable[[AgentProcess], AgentProcess]


def start_agents(folder: Path, broker: Broker, *, root_public_key_b64: str, count: int,
                 wrap: Wrap | None = None, **options: Any) -> list[AgentProcess]:
    """Start ``count`` real agent processes board-1..board-N trusting that root key
    (``options``: write_agent_config keywords; ``wrap`` may swap one for, e.g., a
    :func:`degraded_agent` before it starts)."""
    out = []
    for i in range(1, count + 1):
        a = write_agent_config(folder, f"board-{i}", device_class=local_device_class(),
                               mqtt_host=broker.host, mqtt_port=broker.port,
                               root_public_key_b64=root_public_key_b64, **options)
        a = wrap(a) if wrap is not None else a
        a.start()
        out.append(a)
    return out


def start_agent(folder: Path, broker: Broker, device_id: str, *, root_public_key_b64: str,
                **options: Any) -> AgentProcess:
    """Start one real agent process named ``device_id`` (as :func:`start_agents` does, for
    boards that are not board-N or that join later)."""
    a = write_agent_config(folder, device_id, device_class=local_device_class(),
                           mqtt_host=broker.host, mqtt_port=broker.port,
                           root_public_key_b64=root_public_key_b64, **options)
    a.start()
    return a


async def wait_online(url: str, agents: list[AgentProcess], *, timeout_s: float = 60,
                      on_timeout: Callable[[], str] = lambda: "") -> None:
    """Wait until the API at ``url`` lists every agent online."""
    async def all_online() -> bool:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            devs = {d["id"]: d for d in (await c.get("/api/v1/devices")).json()["items"]}
        return all(devs.get(a.device_id, {}).get("online") for a in agents)

    await wait_for(all_online, timeout_s=timeout_s, what="agents online",
                   on_timeout=on_timeout)


async def start_fleet(tmp_path: Path, broker: Broker, *, agents: int,
                      settings: dict[str, Any] | None = None,
                      agent_options: dict[str, Any] | None = None,
                      wrap: Wrap | None = None) -> Fleet:
    """The embedded controller (``FAST_SETTINGS`` updated with ``settings``) and ``agents``
    real agent processes board-1..board-N (see :func:`start_agents`), all online."""
    ctrl = EmbeddedController(EmbeddedOptions(
        data_dir=tmp_path / "controller", api_port=0, broker_url=broker.url,
        settings_overrides={**FAST_SETTINGS, **(settings or {})}))
    await ctrl.start()
    fleet = Fleet(ctrl)
    try:
        fleet.agents.extend(start_agents(tmp_path / "agents", broker, count=agents, wrap=wrap,
                                         root_public_key_b64=ctrl.keys.root_public_b64(),
                                         **(agent_options or {})))
        await wait_online(fleet.url, fleet.agents, on_timeout=fleet.logs)
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


# -- resources and statuses through the API --------------------------------------------------
API_VERSION = "edgefleet.io/v1alpha1"


def device_class_doc() -> dict[str, Any]:
    """This machine's DeviceClass, as shipped in manifests/deviceclasses/."""
    path = REPO / "manifests" / "deviceclasses" / f"{local_device_class()}.yaml"
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def model_doc(name: str, *, version: int, path: Path, samples: Path | None = None,
              input_shapes: dict[str, list[int]] | None = None,
              accuracy: dict[str, Any] | None = None) -> dict[str, Any]:
    """An EdgeModel (fp32 on this machine's class) whose files are named by local path:
    :func:`apply_ok` uploads them and pins their sha256, as `edgefleet apply` does."""
    spec: dict[str, Any] = {
        "version": version, "source": {"path": str(path)},
        "targets": [{"deviceClass": local_device_class(), "precisions": ["fp32"]}]}
    if samples is not None:
        spec["validation"] = {"samples": {"path": str(samples)}}
    if input_shapes:
        spec["inputShapes"] = input_shapes
    if accuracy:
        spec["accuracy"] = accuracy
    return {"apiVersion": API_VERSION, "kind": "EdgeModel",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def rollout_doc(name: str, *, model: str, waves: list[dict[str, Any]] | None = None,
                **spec: Any) -> dict[str, Any]:
    """An EdgeRollout of ``model`` (one wave of 100% unless ``waves``)."""
    return {"apiVersion": API_VERSION, "kind": "EdgeRollout",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": model, "waves": waves or [{"name": "all", "percent": 100}],
                     **spec}}


async def post_apply(url: str, docs: list[dict[str, Any]]) -> httpx.Response:
    """What `edgefleet apply` does: upload the local files the EdgeModels name
    (``POST /api/v1/artifacts``), pin their sha256 in place of the path, POST the documents
    to ``/api/v1/apply``; the response."""
    docs = json.loads(json.dumps(docs))
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for doc in docs:
            spec = doc.get("spec") or {} if doc.get("kind") == "EdgeModel" else {}
            refs = [(spec.get("source"), "model"),
                    ((spec.get("validation") or {}).get("samples"), "samples")]
            for ref, kind in refs:
                if not ref or not ref.get("path"):
                    continue
                local = Path(ref.pop("path"))
                r = await c.post("/api/v1/artifacts", params={"kind": kind, "name": local.name},
                                 content=local.read_bytes(),
                                 headers={"content-type": "application/octet-stream"})
                assert r.status_code == 201, f"upload of {local}: {r.status_code} {r.text}"
                ref["sha256"] = r.json()["sha256"]
        return await c.post("/api/v1/apply", content=json.dumps(docs),
                            headers={"content-type": "application/json"})


async def apply_ok(url: str, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply and require success; the per-document results."""
    r = await post_apply(url, docs)
    assert r.status_code == 200, f"apply answered {r.status_code}: {r.text}"
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def get_json(url: str, path: str) -> Any:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        r = await c.get(path)
        r.raise_for_status()
        return r.json()


async def rollout_status(url: str, name: str) -> dict[str, Any]:
    """EdgeRollout default/``name``'s status ({} before it has one or exists)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        r = await c.get(f"/api/v1/rollouts/default/{name}")
    if r.status_code == 404:
        return {}
    r.raise_for_status()
    status: dict[str, Any] = r.json().get("status") or {}
    return status


async def devices_at(url: str) -> dict[str, dict[str, Any]]:
    """``/api/v1/devices`` rows by device id."""
    return {d["id"]: d for d in (await get_json(url, "/api/v1/devices"))["items"]}


def serves(device: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The main (non-variant) engine of ``model`` in a ``/api/v1/devices/{id}`` view's
    heartbeat ``models`` (version, revision, engine_version, sha256, active), or None."""
    return next((m for m in device.get("models") or []
                 if m.get("name") == model and not m.get("variant")), None)


# -- agents with a test backend, a controller process, an offer counter ----------------------
_DEGRADED_BOOT = (
    "import sys\n"
    "from agent.runtime import base\n"
    "from tests.helpers.fake_backends import DegradedOrtBackend\n"
    "base._BACKEND_CACHE['onnxruntime-cpu'] = DegradedOrtBackend(\n"
    "    noise=float(sys.argv[1]), levels=int(sys.argv[2]))\n"
    "from agent.cli import main\n"
    "sys.exit(main(sys.argv[3:]))\n")


@dataclass
class DegradedAgentProcess(AgentProcess):
    """A real ``edgefleet-agent run`` process (agent.cli.main) whose onnxruntime-cpu backend
    is DegradedOrtBackend (tests/helpers/fake_backends.py): it loads, smoke-checks and serves
    like the real one, but its outputs get ``noise`` x std Gaussian noise and/or rounding to
    ``levels`` steps. The backend is put in the agent runtime's backend cache before the agent
    starts, so the product code is unchanged."""

    noise: float = 0.0
    levels: int = 4

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DEGRADED_BOOT, str(self.noise), str(self.levels),
                 "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=REPO)


def degraded_agent(plain: AgentProcess, *, noise: float = 0.0,
                   levels: int = 4) -> DegradedAgentProcess:
    """The same agent (config, data folder, port) started with the degraded backend."""
    return DegradedAgentProcess(plain.device_id, plain.data_dir, plain.config_path,
                                plain.serve_port, plain.log_path, noise=noise, levels=levels)


_CONTROLLER_BOOT = (
    "import json, logging, sys\n"
    "from pathlib import Path\n"
    "from controller.embedded import EmbeddedOptions, run_embedded\n"
    "logging.basicConfig(level=logging.INFO,\n"
    "                    format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "o = json.loads(sys.argv[1])\n"
    "sys.exit(run_embedded(EmbeddedOptions(data_dir=Path(o['data_dir']),\n"
    "    api_port=o['api_port'], broker_url=o['broker_url'],\n"
    "    settings_overrides=o['settings'])))\n")


@dataclass
class ControllerProcess:
    """The embedded controller (what `edgefleet up --broker-url` runs, with test settings) as
    its own process on ``data_dir``: SIGKILL it, then start a successor on the same folder
    (same SQLite database, store and signing keys)."""

    data_dir: Path
    broker_url: str
    settings: dict[str, Any] = field(default_factory=lambda: dict(FAST_SETTINGS))
    api_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def root_public_b64(self) -> str:
        """The fleet's root key (created here first when the folder has none)."""
        from controller.ota.keys import KeyStore

        return str(KeyStore.load_or_init(self.data_dir / "keys").root_public_b64())

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.log_path = self.data_dir / f"controller-{self.api_port}.log"
        opts = {"data_dir": str(self.data_dir), "api_port": self.api_port,
                "broker_url": self.broker_url, "settings": self.settings}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CONTROLLER_BOOT, json.dumps(opts)], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))

    async def wait_ready(self, *, timeout_s: float = 60) -> None:
        async def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, \
                f"the controller exited:\n{self.log_tail()}"
            try:
                async with httpx.AsyncClient(timeout=2) as c:
                    return (await c.get(f"{self.url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(ready, timeout_s=timeout_s, what="controller /readyz",
                       on_timeout=self.log_tail)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown of anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""


class OfferCounter:
    """Every non-empty message on ``edgefleet/v1/devices/+/update/offer[/{model key}]`` from
    the moment it subscribed, retained or not: started before any offer exists, it counts
    every offer the controller(s) published, per device (a re-published retained offer counts
    again). Each is kept with its manifest (decoded, not verified) for codec checks."""

    def __init__(self, broker: Broker) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.seen: list[tuple[str, Any]] = []      # (device id, UpdateManifest)
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="offer-counter",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topics.device_subscription(topics.OFFERS), qos=1)
        if not subscribed.wait(10):
            raise TimeoutError("offer counter: no SUBACK from the broker")

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        from protos.edgefleet.v1 import update_pb2

        parsed = topics.parse_device_topic(msg.topic)
        if parsed is None or not msg.payload:
            return
        env = update_pb2.SignedEnvelope.FromString(msg.payload)
        with self._lock:
            self.seen.append((parsed.device_id, update_pb2.UpdateManifest.FromString(
                env.payload)))

    def per_device(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for dev, _ in self.seen:
                out[dev] = out.get(dev, 0) + 1
            return out

    def manifests(self, device_id: str) -> list[Any]:
        with self._lock:
            return [m for d, m in self.seen if d == device_id]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained_offers(broker: Broker) -> dict[str, int]:
    """The non-empty retained messages on every device's offer topics now (topic -> size):
    what a board that reconnects would receive. A retained sentinel subscribed after the
    offer topics arrives after their retained messages (Mosquitto answers one connection's
    subscriptions in order), so its arrival ends the collection."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    sentinel = "edgefleet-test/retained-sentinel"
    got: dict[str, int] = {}
    done = threading.Event()

    def on(_c: Any, _u: Any, msg: Any) -> None:
        if msg.topic == sentinel:
            done.set()
        elif msg.retain and msg.payload:
            got[msg.topic] = len(msg.payload)

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="retained-offers",
                    protocol=mqtt.MQTTv5)
    c.on_message = on
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        c.publish(sentinel, b"1", qos=1, retain=True).wait_for_publish(10)
        c.subscribe(topics.device_subscription(topics.OFFERS), qos=1)
        c.subscribe(sentinel, qos=1)
        if not done.wait(10):
            raise TimeoutError("retained sentinel never arrived")
    finally:
        c.loop_stop()
        c.disconnect()
    return got
