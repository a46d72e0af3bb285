"""Broker down when the agent starts, up later (issue 5).

A real agent process (``python -m agent.cli run --config``) with a committed model in its
data dir starts while Mosquitto is down: it serves inference from its slots at once, and its
metrics go to the offline buffer on disk. When Mosquitto comes back on the same port the
agent reconnects, the buffered metrics arrive (``buffered=True``, oldest first) at a
subscriber, and the retained messages kept by the broker while the agent was away (a signed
DesiredState and an offer for version 2) are read after the reconnect: version 2 installs.

The broker runs with persistence on, so retained messages and the subscriber's session
survive its restart (as a production broker's would).
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protos import envelope, topics
from protos.edgefleet.v1 import common_pb2 as C
from protos.edgefleet.v1 import device_pb2, update_pb2
from tests.helpers.broker import Broker, free_port, mosquitto_path, start_mosquitto
from tests.helpers.models import build_affine
from tests.helpers.ota import OtaDriver, agent_config, infer, spawn_agent, stop_agent, write_config

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed")]

DEVICE = "dev-offline"


def _persistent_broker(workdir: Path) -> Broker:
    port = free_port()
    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    # as root, mosquitto switches to the "mosquitto" user, which cannot write under the
    # test's private tmp folder: stay root there (the option does nothing otherwise)
    conf = (f"listener {port} 127.0.0.1\n"
            + ("user root\n" if os.geteuid() == 0 else "")
            + "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {store}/\n"
            "max_packet_size 4194304\n"
            "max_queued_messages 10000\n"
            "log_type error\nlog_type warning\nlog_type notice\n")
    return start_mosquitto(workdir, port=port, extra_conf=conf, plain_listener=False)


class MetricsSubscriber:
    """A persistent MQTT 5 session (clean start off, 1 h expiry) on the device's metrics
    topic, so messages published while it reconnects are kept for it."""

    def __init__(self, broker: Broker) -> None:
        self.messages: list[device_pb2.Metrics] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id="metrics-sub-offline-start", protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.reconnect_delay_set(1, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect(broker.host, broker.port, clean_start=False, properties=props)
        c.loop_start()
        self.client = c
        if not self._subscribed.wait(10):
            raise TimeoutError("metrics subscriber did not subscribe")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    rc: mqtt.ReasonCode, props: object) -> None:
        client.subscribe(topics.device_topic(DEVICE, topics.METRICS), qos=1)
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(device_pb2.Metrics.FromString(msg.payload))
            self._cond.notify_all()

    def snapshot(self) -> list[device_pb2.Metrics]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(pred: object, *, timeout_s: float, what: str, log: Path | None = None) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{tail}")


def _marker(url: str) -> float | None:
    try:
        return infer(url, "m", [[0.0] * 4])[0]
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def test_agent_starts_offline_serves_buffers_and_catches_up(tmp_path: Path) -> None:
    broker = _persistent_broker(tmp_path / "broker")
    driver = OtaDriver(broker.host, broker.port, device_id=DEVICE, device_class="cpu-x86")
    sub = MetricsSubscriber(broker)
    serve_port = free_port()
    url = f"http://127.0.0.1:{serve_port}"
    log = tmp_path / "agent.log"
    cfg = write_config(tmp_path / "agent.yaml", agent_config(
        tmp_path, host=broker.host, port=broker.port, driver=driver, serve_port=serve_port,
        metrics_interval_s=0.3, heartbeat_interval_s=0.5,
        update={"stall_timeout_s": 1.0, "max_retries": 20}))
    proc = None
    try:
        # 1. install v1 through the OTA driver, then stop the agent
        driver.publish_keys()
        proc = spawn_agent(cfg, log=log)
        v1 = driver.offer("m", 1, build_affine(tmp_path / "v1.onnx", marker=1.0).read_bytes())
        driver.wait_status(v1.update_id, C.UPDATE_STATE_COMMITTED, timeout_s=60)
        assert _marker(url) == 1.0
        assert stop_agent(proc) == 0
        proc = None
        n_before = len(sub.snapshot())
        assert not any(m.buffered for m in sub.snapshot())  # online: sent as they were taken

        # 2. while the agent is away the "controller" leaves a desired state and a v2 offer
        #    (retained); then the broker goes down
        ds = update_pb2.DesiredState(device_id=DEVICE, generation=7,
                                     issued_at_ms=int(time.time() * 1000))
        ds.models.add(name="m", version=2)
        driver.publish(topics.device_topic(DEVICE, topics.DESIRED),
                       envelope.sign(ds, driver.signer).SerializeToString(), retain=True)
        v2 = driver.offer("m", 2, build_affine(tmp_path / "v2.onnx", marker=2.0).read_bytes())
        broker.stop()

        # 3. the agent starts with no broker: serves v1 from its slot at once
        proc = spawn_agent(cfg, log=log)
        _wait(lambda: _marker(url) is not None, timeout_s=30, what="serving while offline",
              log=log)
        for _ in range(5):
            assert _marker(url) == 1.0
        assert proc.poll() is None

        # metrics pile up on disk (one record per interval)
        buffer = tmp_path / "agent-data" / "telemetry"
        _wait(lambda: buffer.is_dir() and len(list(buffer.iterdir())) >= 3, timeout_s=30,
              what="3 buffered metrics records on disk", log=log)
        assert len(sub.snapshot()) == n_before  # nothing could be delivered
        assert proc.poll() is None and _marker(url) == 1.0

        # 4. Mosquitto back on the same port: reconnect, buffered metrics delivered
        broker.restart()
        late = _wait(lambda: [m for m in sub.snapshot()[n_before:] if m.buffered],
                     timeout_s=60, what="buffered metrics at the subscriber", log=log)
        assert isinstance(late, list) and len(late) >= 3
        stamps = [m.at_ms for m in late]
        assert stamps == sorted(stamps), "the buffer is replayed oldest first"
        assert all(m.device_id == DEVICE for m in late)
        _wait(lambda: not any(buffer.iterdir()), timeout_s=30, what="buffer emptied", log=log)

        # 5. the retained offer and desired state are read after the reconnect: v2 installs
        _wait(lambda: _marker(url) == 2.0, timeout_s=60, what="v2 served after reconnect",
              log=log)
        driver.wait_status(v2.update_id, C.UPDATE_STATE_COMMITTED, timeout_s=30)
        _wait(lambda: "desired state generation 7" in log.read_text(errors="replace"),
              timeout_s=30, what="desired state read after reconnect", log=log)
        assert proc.poll() is None
    finally:
        if proc is not None:
            stop_agent(proc)
        sub.close()
        driver.close()
        broker.stop()
