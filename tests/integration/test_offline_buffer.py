"""Offline telemetry buffer: bounded, ordered, persistent across restarts; and the metrics
publisher over a real Mosquitto broker that goes down and comes back."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.runtime.registry import ModelRegistry
from agent.telemetry.buffer import MetricsPublisher, OfflineBuffer
from agent.telemetry.host import HostReader
from agent.telemetry.metrics import MetricsCollector
from protos import topics
from protos.edgefleet.v1.device_pb2 import Metrics
from tests.helpers.models import activate_file, build_affine


def _drain_all(buf: OfflineBuffer) -> list[bytes]:
    got: list[bytes] = []
    buf.drain(lambda b: got.append(b) or True)
    return got


def test_fifo_bounded_and_persistent(tmp_path: Path) -> None:
    buf = OfflineBuffer(tmp_path / "buf", max_bytes=100)
    for i in range(5):
        assert buf.append(bytes([i]) * 30)
    # 5 x 30 bytes do not fit in 100: the two oldest were dropped
    assert len(buf) == 3 and buf.size_bytes == 90 and buf.dropped == 2
    assert not buf.append(b"x" * 101)  # larger than the whole buffer: refused
    (tmp_path / "buf" / ".tmp-leftover").write_bytes(b"half a record")  # kill during append
    reopened = OfflineBuffer(tmp_path / "buf", max_bytes=100)
    assert not (tmp_path / "buf" / ".tmp-leftover").exists()
    assert len(reopened) == 3
    reopened.append(b"late")
    assert _drain_all(reopened) == [bytes([2]) * 30, bytes([3]) * 30, bytes([4]) * 30, b"late"]
    assert len(reopened) == 0 and reopened.size_bytes == 0
    assert len(OfflineBuffer(tmp_path / "buf", max_bytes=100)) == 0


def test_drain_stops_at_first_refusal(tmp_path: Path) -> None:
    buf = OfflineBuffer(tmp_path, max_bytes=1 << 20)
    for i in range(4):
        buf.append(str(i).encode())
    accepted: list[bytes] = []

    def flaky(data: bytes) -> bool:
        if len(accepted) == 2:
            raise ConnectionError("link dropped")
        accepted.append(data)
        return True

    assert buf.drain(flaky) == 2
    assert accepted == [b"0", b"1"]
    assert _drain_all(buf) == [b"2", b"3"]


def _connect(broker, client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    connected = threading.Event()
    client.on_connect = lambda *_a, **_k: connected.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert connected.wait(10)
    return client


def _wait_for(predicate, *, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.02)


def test_metrics_publisher_buffers_while_broker_is_down(mosquitto, tmp_path: Path) -> None:
    device_id = "dev-buffer-1"
    topic = topics.device_topic(device_id, topics.METRICS)
    received: queue.Queue[Metrics] = queue.Queue()
    sub = _connect(mosquitto, "controller-side")
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_a, **_k: subscribed.set()
    sub.on_message = lambda _c, _u, msg: received.put(Metrics.FromString(msg.payload))
    sub.subscribe(topic, qos=1)
    assert subscribed.wait(10)
    dev = _connect(mosquitto, device_id)

    def publish(payload: bytes) -> bool:
        if not dev.is_connected():
            return False
        info = dev.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        return info.is_published()

    reg = ModelRegistry()
    activate_file(reg, build_affine(tmp_path / "m.onnx", marker=1.0), name="m", version=1)
    collector = MetricsCollector(reg, host=HostReader(thermal_root=tmp_path / "no-zones"))
    buf_dir = tmp_path / "buffer"
    publisher = MetricsPublisher(collector, OfflineBuffer(buf_dir, max_bytes=1 << 20), publish,
                                 device_id=device_id)
    first = publisher.tick()
    assert first.sent == 1 and not first.buffered
    live = received.get(timeout=10)
    assert live.seq == 1 and not live.buffered and live.models[0].name == "m"
    assert any("temperatures" in u for u in live.host.unavailable)

    mosquitto.stop()
    _wait_for(lambda: not dev.is_connected())
    for _ in range(3):
        assert publisher.tick().buffered
    assert len(publisher.buffer) == 3

    # the agent restarts while offline: a new buffer on the same folder still holds them
    publisher.buffer = OfflineBuffer(buf_dir, max_bytes=1 << 20)
    assert len(publisher.buffer) == 3
    mosquitto.restart()
    _wait_for(lambda: dev.is_connected() and sub.is_connected())
    subscribed.clear()
    sub.subscribe(topic, qos=1)  # the broker runs without persistence: subscribe again
    assert subscribed.wait(10)
    assert received.empty()
    result = publisher.tick()
    assert result.sent == 4 and not result.buffered and result.backlog == 0
    late = [received.get(timeout=10) for _ in range(4)]
    assert [m.seq for m in late] == [2, 3, 4, 5]
    assert [m.buffered for m in late] == [True, True, True, False]
    dev.loop_stop()
    sub.loop_stop()
    dev.disconnect()
    sub.disconnect()
