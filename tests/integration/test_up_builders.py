"""``edgefleet up --builders FILE``: the embedded controller starts the remote-build dispatcher.

Real Mosquitto, real builder process (``--engine-kind onnxruntime-cpu``), real API server: the
builder enrolled in the JSON file announces itself and ``GET /api/v1/builders`` lists it
online (the dispatcher's MQTT connection and its HTTP routes are wired in). With ``tls=True``
the dispatcher connects to the TLS-only broker with the controller's certificate
(``Settings.aiomqtt_options()``), which a hard-coded plain MQTT connection could not.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.builder.protocol import load_or_create_identity, public_b64
from controller.cli import build_parser
from controller.embedded import EmbeddedController, EmbeddedOptions
from tests.e2e.fleet import wait_for
from tests.helpers.broker import Broker, mosquitto_path

pytestmark = pytest.mark.timeout(120)


def builders_file(tmp_path: Path) -> Path:
    key = load_or_create_identity(tmp_path / "b1.key")
    path = tmp_path / "builders.json"
    path.write_text(json.dumps({"b1": public_b64(key)}))
    return path


def test_up_parses_builders_and_advertise() -> None:
    args = build_parser().parse_args(["up", "--builders", "b.json", "--advertise-mqtt",
                                      "mqtt.example:8883"])
    assert (args.builders, args.advertise_mqtt) == ("b.json", "mqtt.example:8883")


async def test_builders_file_starts_the_dispatcher(mosquitto: Broker, tmp_path: Path) -> None:
    ctrl = EmbeddedController(EmbeddedOptions(
        data_dir=tmp_path / "controller", api_port=0, broker_url=mosquitto.url,
        builders_file=builders_file(tmp_path),
        settings_overrides={"compile_in_process_pool": False}))
    await ctrl.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.builder.program", "--id", "b1",
         "--engine-kind", "onnxruntime-cpu", "--controller", ctrl.url,
         "--mqtt", f"{mosquitto.host}:{mosquitto.port}",
         "--root-pub", str(tmp_path / "controller" / "keys" / "root.pub"),
         "--work-dir", str(tmp_path / "b1"), "--key", str(tmp_path / "b1.key")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert ctrl.core.build_dispatcher is ctrl.build_dispatcher is not None

        async def listed() -> Any:
            async with httpx.AsyncClient(base_url=ctrl.url, timeout=10) as c:
                r = await c.get("/api/v1/builders")
            items = r.json()["items"] if r.status_code == 200 else []
            return next((b for b in items if b["id"] == "b1" and b["online"]), None)

        b = await wait_for(listed, timeout_s=60, what="builder b1 online in /api/v1/builders")
        assert b["facts"]["engine_kind"] == "onnxruntime-cpu"
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.communicate, timeout=20)
        await ctrl.stop()
    assert ctrl.build_dispatcher is None


async def test_dispatcher_connects_through_tls(tmp_path: Path) -> None:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    ctrl = EmbeddedController(EmbeddedOptions(
        data_dir=tmp_path / "controller", api_port=0, mqtt_port=0, broker="mosquitto", tls=True,
        builders_file=builders_file(tmp_path),
        settings_overrides={"compile_in_process_pool": False}))
    await ctrl.start()
    try:
        d = ctrl.build_dispatcher
        assert d is not None and "tls_params" in d.mqtt_options
        await asyncio.wait_for(d.connected.wait(), 30)
    finally:
        await ctrl.stop()
