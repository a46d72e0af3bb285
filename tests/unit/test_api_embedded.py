"""The embedded runner's parts: broker launcher (Mosquitto, amqtt fallback) and `edgefleet up`.

Real brokers and real MQTT clients (paho); the embedded controller is started and stopped in
the test's event loop like `edgefleet up` does, and must leave no broker process behind.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from controller.broker import mosquitto_conf, start_broker
from controller.embedded import EmbeddedController, EmbeddedOptions
from tests.helpers.broker import mosquitto_path


def _roundtrip(host: str, port: int, *, protocol: mqtt.MQTTProtocolVersion) -> bytes:
    """Subscribe, publish one message to ourselves, return what arrived (blocking)."""
    got: list[bytes] = []
    done = threading.Event()
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got.append(msg.payload)
        done.set()

    def on_subscribe(*_a: Any) -> None:
        subscribed.set()

    def on_connect(cl: Any, *_a: Any) -> None:
        cl.subscribe("edgefleet/test", qos=1)

    c.on_message, c.on_subscribe, c.on_connect = on_message, on_subscribe, on_connect
    c.connect(host, port)
    c.loop_start()
    try:
        assert subscribed.wait(10), "no SUBACK"
        c.publish("edgefleet/test", b"hello", qos=1)
        assert done.wait(10), "message did not come back"
    finally:
        c.loop_stop()
        c.disconnect()
    return got[0]


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def test_mosquitto_broker_mqtt5(tmp_path: Path) -> None:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    b = await start_broker(tmp_path)
    try:
        assert b.kind == "mosquitto" and b.proc is not None
        assert b.conf_path is not None and "allow_anonymous true" in b.conf_path.read_text()
        got = await asyncio.to_thread(_roundtrip, b.host, b.port, protocol=mqtt.MQTTv5)
        assert got == b"hello"
    finally:
        await b.stop()
    assert b.proc.poll() is not None and _port_closed(b.port)


async def test_amqtt_fallback_broker(tmp_path: Path) -> None:
    pytest.importorskip("amqtt")
    b = await start_broker(tmp_path, prefer="amqtt")
    try:
        assert b.kind == "amqtt" and b.proc is None
        got = await asyncio.to_thread(_roundtrip, b.host, b.port, protocol=mqtt.MQTTv311)
        assert got == b"hello"
    finally:
        await b.stop()
    assert _port_closed(b.port)


async def test_external_broker_starts_nothing(tmp_path: Path) -> None:
    b = await start_broker(tmp_path, external_url="mqtt://10.1.2.3:1999")
    assert (b.kind, b.host, b.port, b.proc) == ("external", "10.1.2.3", 1999, None)
    await b.stop()
    assert not (tmp_path / "broker").exists()


def test_mosquitto_conf_text(tmp_path: Path) -> None:
    text = mosquitto_conf(host="127.0.0.1", port=1884, data_dir=tmp_path, max_packet_bytes=1000)
    assert "listener 1884 127.0.0.1" in text and "max_packet_size 1000" in text


async def test_embedded_up_and_clean_stop(tmp_path: Path) -> None:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    ctrl = EmbeddedController(EmbeddedOptions(data_dir=tmp_path / "ef", api_port=0,
                                              mqtt_port=0))
    await ctrl.start()
    try:
        assert ctrl.broker is not None and ctrl.broker.kind == "mosquitto"
        assert (tmp_path / "ef" / "keys" / "root.pub").is_file()    # keys made on first start
        async with httpx.AsyncClient(base_url=ctrl.url) as c:
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            deadline = asyncio.get_running_loop().time() + 20
            while (await c.get("/readyz")).status_code != 200:   # core connects to the broker
                assert asyncio.get_running_loop().time() < deadline, "never ready"
                await asyncio.sleep(0.05)
            assert "Fleet" in (await c.get("/")).text
        proc, api_port = ctrl.broker.proc, ctrl.api_port
    finally:
        await ctrl.stop()
    assert proc is not None and proc.poll() is not None
    assert _port_closed(api_port)


def _retained(host: str, port: int, topic: str) -> bytes | None:
    """The retained message on ``topic`` (None when there is none within 2 s)."""
    got: list[bytes] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe-retained",
                    protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.append(m.payload)
    c.connect(host, port)
    c.loop_start()
    c.subscribe(topic, qos=1)
    deadline = time.monotonic() + 2
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None


async def test_embedded_mosquitto_keeps_retained_state_across_a_restart(tmp_path: Path) -> None:
    """Retained offers, presence and the key list survive a broker restart: Mosquitto can
    write its persistence file in the data folder (also when started as root)."""
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    b = await start_broker(tmp_path)
    port = b.port

    def publish() -> None:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv5)
        c.connect(b.host, port)
        c.loop_start()
        c.publish("edgefleet/v1/trust/keys", b"key-list", qos=1, retain=True).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()

    await asyncio.to_thread(publish)
    await b.stop()
    log = (tmp_path / "broker").glob("*.log")
    text = "".join(p.read_text(errors="replace") for p in log)
    assert "Permission denied" not in text and "Error saving" not in text, text[-2000:]
    assert (tmp_path / "broker" / "mosquitto.db").exists()
    b2 = await start_broker(tmp_path, port=port)
    try:
        got = await asyncio.to_thread(_retained, b2.host, b2.port, "edgefleet/v1/trust/keys")
        assert got == b"key-list"
    finally:
        await b2.stop()
