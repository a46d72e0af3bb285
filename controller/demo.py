"""`edgefleet demo`: the whole spine on one machine, with three real agent processes.

Called by controller/cli.py (and tests/e2e/test_demo.py as a subprocess). Steps: build the
example digits model (controller/models/digits.py) into manifests/examples/models/ if missing;
start the embedded controller (broker + core + API/dashboard, controller/embedded.py); start
three agents (controller/demo_agents.py), each with its own data folder, device id, serve port
and the demo's trust root; wait until they report; apply manifests/deviceclasses/ and
manifests/examples/ with the same client as `edgefleet apply`; print progress until every agent
serves the model, with the time since apply; send one inference to each agent; print the
dashboard URL and keep running until Ctrl-C (``--exit-when-ready``: stop and exit 0 instead;
exit 1 if not all agents serve within the timeout).

``--secure``: the broker runs with TLS, client certificates and the device ACL
(controller/pki.py, controller/broker.py) and every agent gets its own device certificate.
When only the amqtt fallback broker is available (no mosquitto), the agents are told to speak
MQTT 3.1.1 and the demo says what that costs (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from controller.cli_client import ServerError
from controller.demo_agents import AgentProcess, infer, local_device_class, write_agent_config
from controller.embedded import EmbeddedController, EmbeddedOptions
from protos.errors import EdgefleetError

log = logging.getLogger("edgefleet.demo")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "manifests" / "examples"
DEVICE_CLASSES = REPO / "manifests" / "deviceclasses"
MODEL_FILE = EXAMPLES / "models" / "digits-cnn.onnx"
MODEL_NAME = "digits"
POLL_S = 0.25


@dataclass
class DemoOptions:
    data_dir: Path = field(default_factory=lambda: Path(".edgefleet/demo"))
    api_port: int = 8080
    agents: int = 3
    exit_when_ready: bool = False
    timeout_s: float = 300.0
    examples: Path = EXAMPLES
    secure: bool = False          # TLS + client certificates + ACL (needs mosquitto)
    broker: str = "auto"          # auto | mosquitto | amqtt


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def ensure_model(path: Path = MODEL_FILE) -> Path:
    """Build the example model (deterministic, a few seconds) unless it is there already."""
    if path.is_file():
        return path
    from controller.models.digits import build_digits_cnn

    say(f"building the example model {path} (scikit-learn digits CNN) ...")
    path.parent.mkdir(parents=True, exist_ok=True)
    build_digits_cnn(path)
    return path


def expected_version(examples: Path) -> int:
    from controller.crd import schema

    for ld in schema.load_documents(examples):
        if ld.kind == "EdgeModel" and ld.name == MODEL_NAME:
            return int(ld.doc["spec"]["version"])
    return 1


def _serving(devices: list[dict[str, Any]], ids: set[str], version: int) -> list[str]:
    return sorted(d["id"] for d in devices if d["id"] in ids and d["online"]
                  and d["model"] == MODEL_NAME and d["version"] == version)


async def wait_devices_online(api: httpx.AsyncClient, agents: list[AgentProcess], *,
                              deadline: float) -> None:
    ids = {a.device_id for a in agents}
    while True:
        items = (await api.get("/api/v1/devices")).json()["items"]
        online = {d["id"] for d in items if d["online"]}
        if ids <= online:
            return
        for a in agents:
            if not a.alive():
                raise RuntimeError(f"agent {a.device_id} exited:\n{a.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"agents not online: {sorted(ids - online)}")
        await asyncio.sleep(POLL_S)


async def watch_rollout(api: httpx.AsyncClient, agents: list[AgentProcess], *, version: int,
                        applied_at: float, deadline: float) -> float:
    """Print progress lines until every agent serves ``version``; returns seconds since apply."""
    ids = {a.device_id for a in agents}
    last: dict[str, str] = {}

    def changed(key: str, text: str) -> bool:
        if last.get(key) == text:
            return False
        last[key] = text
        return True

    while True:
        elapsed = time.monotonic() - applied_at
        models = (await api.get("/api/v1/models")).json()["items"]
        for m in models:
            text = f"model {m['namespace']}/{m['name']} v{m['version']}: {m['phase'] or 'Pending'}"
            if m["compiled"]:
                text += f", compiled {m['compiled']}"
            if m["message"]:
                text += f" ({m['message']})"
            if changed("model/" + m["name"], text):
                say(f"{text}  [{elapsed:.1f}s]")
        for r in (await api.get("/api/v1/rollouts")).json()["items"]:
            text = (f"rollout {r['namespace']}/{r['name']}: {r['phase'] or 'Pending'}, "
                    f"wave {r['wave'] if r['wave'] is not None else '-'}, "
                    f"{r['progress']} committed, {r['bytes_sent_total']} bytes sent")
            if r["message"]:
                text += f" ({r['message']})"
            if changed("rollout/" + r["name"], text):
                say(f"{text}  [{elapsed:.1f}s]")
        devices = (await api.get("/api/v1/devices")).json()["items"]
        for d in devices:
            if d["id"] in ids and d["update_state"] and changed(
                    "dev/" + d["id"], f"{d['update_state']}"):
                say(f"{d['id']}: update {d['update_state']}  [{elapsed:.1f}s]")
        serving = _serving(devices, ids, version)
        if changed("serving", str(len(serving))) and serving:
            say(f"{len(serving)}/{len(ids)} serving {MODEL_NAME}@{version}  [{elapsed:.1f}s]")
        if len(serving) == len(ids):
            return elapsed
        for a in agents:
            if not a.alive():
                raise RuntimeError(f"agent {a.device_id} exited:\n{a.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(serving)}/{len(ids)} serving after "
                               f"{elapsed:.0f}s since apply")
        await asyncio.sleep(POLL_S)


def sample_input() -> tuple[np.ndarray, int]:
    from controller.models.digits import load_digits_split

    _x_tr, _y_tr, x_te, y_te = load_digits_split()
    return x_te[:1], int(y_te[0])


async def infer_each(agents: list[AgentProcess]) -> None:
    x, label = sample_input()
    for a in agents:
        out = await asyncio.to_thread(infer, a.serve_url, MODEL_NAME, x)
        logits = next(iter(out.values())).ravel()
        say(f"inference on {a.device_id} ({a.serve_url}): predicted {int(np.argmax(logits))} "
            f"(label {label}), logits[:3]=[{', '.join(f'{v:.4f}' for v in logits[:3])}]")


MARKER = ".edgefleet-demo"


def fresh_data_dir(path: Path) -> Path:
    """Start each demo from scratch: empty the folder if an earlier demo made it (marker file).

    A folder without the marker that is not empty is left alone (never delete user data).
    """
    path = path.resolve()
    if (path / MARKER).is_file():
        shutil.rmtree(path)
    elif path.is_dir() and any(path.iterdir()):
        raise RuntimeError(f"{path} is not empty and was not made by the demo: "
                           "use --data-dir with a new folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("made by edgefleet demo; removed at the next demo start\n")
    return path


async def run_demo_async(opts: DemoOptions) -> int:
    try:
        data_dir = fresh_data_dir(opts.data_dir)
    except RuntimeError as e:
        say(f"FAILED: {e}")
        return 2
    ensure_model()
    version = expected_version(opts.examples)
    ctrl = EmbeddedController(EmbeddedOptions(data_dir=data_dir, api_port=opts.api_port,
                                              mqtt_port=0, tls=opts.secure, broker=opts.broker))
    agents: list[AgentProcess] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    deadline = started + opts.timeout_s
    try:
        await ctrl.start()
    except EdgefleetError as e:
        say(f"FAILED: {e}")
        return 1
    flow = asyncio.create_task(_flow(ctrl, agents, opts, version=version, deadline=deadline))
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({flow, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not flow.done():
            say("interrupted; stopping")
            flow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flow
            return 130
        flow.result()
        if not opts.exit_when_ready:
            say("running; Ctrl-C to stop")
            await stop.wait()
        return 0
    except (TimeoutError, RuntimeError, EdgefleetError, ServerError, httpx.HTTPError) as e:
        say(f"FAILED: {e}")
        return 1
    finally:
        stopper.cancel()
        for a in agents:
            a.stop()
        await ctrl.stop()


async def _flow(ctrl: EmbeddedController, agents: list[AgentProcess], opts: DemoOptions, *,
                version: int, deadline: float) -> None:
    """Agents up, apply, watch until all serve, one inference each (raises on failure)."""
    from controller.cli_client import apply

    assert ctrl.broker is not None and ctrl.keys is not None
    say(f"controller up: dashboard {ctrl.url}, MQTT broker {ctrl.broker.kind} at "
        f"{ctrl.broker.url}, data {ctrl.data_dir}")
    dclass = local_device_class()
    if ctrl.broker.mqtt_protocol == "3.1.1":
        say("WARNING: the broker is the embedded amqtt (mosquitto is not installed, or "
            "--broker amqtt), which speaks MQTT 3.1.1 only, so the controller and agents run on MQTT 3.1.1 without TLS or ACLs and "
            "refused publishes are invisible (apt-get install mosquitto for the real thing)")
    if ctrl.pki is not None:
        say(f"secure broker: TLS, one certificate per device (CA {ctrl.pki.ca_cert_path}), "
            "ACL confines each device to its own topics")
    for i in range(1, opts.agents + 1):
        device_id = f"demo-{i}"
        mqtt_extra: dict[str, Any] = {"protocol": ctrl.broker.mqtt_protocol}
        if ctrl.pki is not None:
            files = await asyncio.to_thread(ctrl.pki.device_files, device_id,
                                            ctrl.data_dir / "agents" / device_id / "tls")
            mqtt_extra["tls"] = {"ca": str(files.ca), "cert": str(files.cert),
                                 "key": str(files.key)}
        a = write_agent_config(ctrl.data_dir / "agents", device_id, device_class=dclass,
                               mqtt_host=ctrl.broker.host, mqtt_port=ctrl.broker.port,
                               root_public_key_b64=ctrl.keys.root_public_b64(),
                               mqtt_extra=mqtt_extra)
        a.start()
        agents.append(a)
    say(f"started {len(agents)} agents ({dclass}): "
        + ", ".join(f"{a.device_id} serve {a.serve_url}" for a in agents))
    async with httpx.AsyncClient(base_url=ctrl.url, timeout=30) as api:
        await wait_devices_online(api, agents, deadline=deadline)
        say(f"{len(agents)}/{len(agents)} agents online")
        applied_at = time.monotonic()
        for folder in (DEVICE_CLASSES, opts.examples):
            if folder.is_dir():
                say(f"edgefleet apply -f {folder}")
                await asyncio.to_thread(apply, ctrl.url, folder, out=sys.stdout)
        elapsed = await watch_rollout(api, agents, version=version, applied_at=applied_at,
                                      deadline=deadline)
    say(f"{len(agents)}/{len(agents)} serving {MODEL_NAME}@{version}: "
        f"{elapsed:.1f} s from apply to all serving")
    await infer_each(agents)
    say(f"dashboard: {ctrl.url}/")


def run_demo(opts: DemoOptions) -> int:
    """Entry point of `edgefleet demo`: returns the exit code."""
    return asyncio.run(run_demo_async(opts))
