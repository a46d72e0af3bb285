"""The embedded fallback broker (amqtt, MQTT 3.1.1 only) when Mosquitto is missing.

The embedded controller (controller/embedded.py, ``broker="amqtt"`` stands in for "mosquitto
is not installed") must notice that its broker speaks MQTT 3.1.1, run its own client on 3.1.1
without shared subscriptions, and a real agent process configured with ``mqtt.protocol:
"3.1.1"`` (what the demo writes) must go all the way to serving the model: offer, chunks,
verify, activate, heartbeat. Also: an MQTT 5 client is refused by amqtt (why the fallback
exists), and a TLS broker is refused without Mosquitto instead of silently running open.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from controller.demo_agents import infer, local_device_class, write_agent_config
from controller.embedded import EmbeddedController, EmbeddedOptions
from controller.models.digits import build_digits_cnn, load_digits_split
from protos.errors import GiveUp
from tests.e2e.fleet import wait_for, write_manifests

pytest.importorskip("amqtt")
pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


def _connack(port: int, protocol: mqtt.MQTTProtocolVersion) -> Any:
    """CONNACK reason of a paho client speaking ``protocol`` (None when the broker hung up)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{protocol}",
                    protocol=protocol)
    try:
        c.connect("127.0.0.1", port)
    except OSError:
        return None
    got: list[Any] = []
    c.on_connect = lambda _c, _u, _f, rc, _p: got.append(rc)
    for _ in range(50):
        if got or c.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
            break
    c.disconnect()
    return got[0] if got else None


async def test_core_and_agent_serve_over_amqtt(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgefleet.broker")
    ctrl = EmbeddedController(EmbeddedOptions(
        data_dir=tmp_path / "controller", api_port=0, mqtt_port=0, broker="amqtt",
        settings_overrides={"compile_in_process_pool": False, "resync_s": 1.0}))
    await ctrl.start()
    agent = None
    try:
        assert ctrl.broker is not None and ctrl.broker.kind == "amqtt"
        assert ctrl.broker.mqtt_protocol == "3.1.1"
        assert ctrl.core.settings.mqtt_protocol == "3.1.1"
        assert ctrl.core.settings.shared_group == ""
        assert "no ACL" in caplog.text and "MQTT 3.1.1" in caplog.text
        # amqtt refuses MQTT 5 (the reason for all of this) and accepts 3.1.1; the probes run
        # in a thread because amqtt runs in this event loop
        port = ctrl.broker.port
        v5 = await asyncio.to_thread(_connack, port, mqtt.MQTTv5)
        assert v5 is None or v5.is_failure, f"amqtt accepted MQTT 5: {v5}"
        v311 = await asyncio.to_thread(_connack, port, mqtt.MQTTv311)
        assert v311 is not None and not v311.is_failure, v311

        agent = write_agent_config(tmp_path / "agents", "fallback-1",
                                   device_class=local_device_class(), mqtt_host="127.0.0.1",
                                   mqtt_port=port, root_public_key_b64=ctrl.keys.root_public_b64(),
                                   mqtt_extra={"protocol": "3.1.1"})
        agent.start()

        async def devices() -> dict[str, Any]:
            import httpx

            async with httpx.AsyncClient(base_url=ctrl.url, timeout=10) as c:
                r = await c.get("/api/v1/devices")
                r.raise_for_status()
                return {d["id"]: d for d in r.json()["items"]}

        async def online() -> Any:
            return (await devices()).get("fallback-1", {}).get("online")

        await wait_for(online, timeout_s=60, what="agent online over amqtt",
                       on_timeout=agent.log_tail)

        model = build_digits_cnn(tmp_path / "models" / "digits-cnn.onnx")
        from controller.cli_client import apply
        from controller.crd import schema

        ctrl.core.apply(schema.load_documents(REPO / "manifests" / "deviceclasses"))
        manifests = write_manifests(tmp_path / "manifests", model=model)
        import io

        await asyncio.to_thread(apply, ctrl.url, manifests, out=io.StringIO())

        async def serving() -> Any:
            d = (await devices()).get("fallback-1", {})
            return d if d.get("model") == "digits" and d.get("version") == 1 else None

        await wait_for(serving, timeout_s=120, what="agent serving digits@1 over amqtt",
                       on_timeout=agent.log_tail)
        _x_tr, _y_tr, x_te, _y_te = load_digits_split()
        out = await asyncio.to_thread(infer, agent.serve_url, "digits", x_te[:1])
        assert next(iter(out.values())).shape[-1] == 10
        assert "ACL denials are silent" in agent.log_tail(50000)
    finally:
        if agent is not None:
            agent.stop()
        await ctrl.stop()


async def test_tls_without_mosquitto_is_refused(tmp_path: Path) -> None:
    ctrl = EmbeddedController(EmbeddedOptions(data_dir=tmp_path / "c", api_port=0, mqtt_port=0,
                                              broker="amqtt", tls=True))
    with pytest.raises(GiveUp, match="needs mosquitto"):
        await ctrl.start()
    await ctrl.stop()
