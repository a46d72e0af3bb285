"""Controller ingest over a real Mosquitto: heartbeats, last-will presence, metrics, garbage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlmodel import Session, select

from controller.fleet.ingest import percentile
from controller.fleet.models import Device, MetricSample
from protos import topics
from protos.edgefleet.v1 import device_pb2
from tests.helpers.controller import mqtt_client, started_core, wait_until


def _device(core, dev_id):
    with Session(core.db) as s:
        return s.get(Device, dev_id)


async def test_heartbeat_updates_device_row(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto) as core:
        c = mqtt_client(mosquitto.port, "d1")
        hb = device_pb2.Heartbeat(
            device_id="board-1", device_class="cpu-x86-64", agent_version="0.1", seq=7,
            health="throttled", health_reason="cpu 91C", serve_url="http://10.0.0.5:8000",
            facts=device_pb2.DeviceFacts(arch="x86_64", cpu_count=4, cpu_flags=["avx2"]),
            models=[device_pb2.ServedModel(name="digits", version=3, sha256="ab" * 32,
                                           active=True, slot="a")])
        c.publish(topics.device_topic("board-1", topics.HEARTBEAT), hb.SerializeToString(), qos=1)
        d = await wait_until(lambda: _device(core, "board-1"), what="device row")
        assert d.online and d.device_class == "cpu-x86-64" and d.heartbeat_seq == 7
        assert d.facts["arch"] == "x86_64" and d.facts["cpu_flags"] == ["avx2"]
        assert d.models[0]["name"] == "digits" and d.models[0]["sha256"] == "ab" * 32
        assert d.health == "throttled" and d.health_reason == "cpu 91C"
        assert d.serve_url == "http://10.0.0.5:8000" and d.last_heartbeat_ms
        c.loop_stop()
        c.disconnect()


WILL_CLIENT = r"""
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from protos import topics
from protos.edgefleet.v1 import device_pb2
port, dev = int(sys.argv[1]), sys.argv[2]
t = topics.device_topic(dev, topics.PRESENCE)
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv5)
c.will_set(t, device_pb2.Presence(device_id=dev, online=False, reason="lwt").SerializeToString(),
           qos=1, retain=True)
c.connect("127.0.0.1", port, keepalive=2)
c.loop_start()
c.publish(t, device_pb2.Presence(device_id=dev, online=True, reason="connect").SerializeToString(),
          qos=1, retain=True).wait_for_publish(5)
print("up", flush=True)
time.sleep(600)
"""


async def test_last_will_marks_device_offline(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto) as core:
        proc = subprocess.Popen([sys.executable, "-c", WILL_CLIENT, str(mosquitto.port),
                                 "board-lwt"], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(Path.cwd())})
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
            d = await wait_until(lambda: (x := _device(core, "board-lwt")) and x.online and x,
                                 what="online")
            assert d.online
            proc.send_signal(signal.SIGKILL)   # socket dies without DISCONNECT: broker sends will
            proc.wait(5)
            d = await wait_until(lambda: (x := _device(core, "board-lwt")) and not x.online and x,
                                 timeout_s=30, what="offline via last will")
            assert d.offline_reason == "lwt" and d.offline_since_ms
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_garbage_is_ignored_and_metrics_stored(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, max_mqtt_payload_bytes=4096) as core:
        c = mqtt_client(mosquitto.port, "g")
        hbt = topics.device_topic("board-2", topics.HEARTBEAT)
        c.publish(hbt, b"\xff\xfe garbage", qos=1)
        c.publish(hbt, b"\x00" * 10000, qos=1)                       # over the size limit
        c.publish(hbt, device_pb2.Heartbeat(device_id="someone-else").SerializeToString(), qos=1)
        c.publish(topics.device_topic("board-2", topics.METRICS), b"\x12\x05junk", qos=1)
        c.publish(topics.device_topic("board-2", topics.UPDATE_STATUS), b"\xff", qos=1)
        c.publish(topics.device_topic("board-2", topics.CHUNK_REQUEST), b"\xff\xff", qos=1)
        await wait_until(lambda: core.ingest.dropped >= 5, what="garbage dropped")
        assert _device(core, "board-2") is None
        hist = device_pb2.LatencyHistogram(bounds_ms=[1, 2, 5, 10], counts=[0, 50, 40, 10, 0])
        m = device_pb2.Metrics(device_id="board-2", at_ms=int(time.time() * 1000), models=[
            device_pb2.ModelMetrics(name="digits", version=1, requests=100, errors=2,
                                    latency=hist)],
            host=device_pb2.HostMetrics(cpu_percent=12.5,
                                        temperatures=[device_pb2.Temperature(zone="cpu",
                                                                             celsius=55)]))
        c.publish(topics.device_topic("board-2", topics.METRICS), m.SerializeToString(), qos=1)

        def sample():
            with Session(core.db) as s:
                return s.exec(select(MetricSample).where(MetricSample.device_id == "board-2")).first()

        row = await wait_until(sample, what="metric sample")
        assert row.requests == 100 and row.errors == 2 and row.cpu_percent == 12.5
        assert row.temperature_c == 55
        # the first message of a (device, model, version) opens no window: no quantiles yet
        assert row.p50_ms is None and row.p95_ms is None and row.p99_ms is None
        # the next one is differenced against it: the window holds the same histogram again
        m.at_ms += 10_000
        m.models[0].requests, m.models[0].errors = 200, 4
        del m.models[0].latency.counts[:]
        m.models[0].latency.counts.extend([0, 100, 80, 20, 0])
        c.publish(topics.device_topic("board-2", topics.METRICS), m.SerializeToString(), qos=1)

        def windowed():
            with Session(core.db) as s:
                return s.exec(select(MetricSample).where(MetricSample.device_id == "board-2",
                                                         MetricSample.at_ms == m.at_ms)).first()

        row = await wait_until(windowed, what="windowed metric sample")
        assert row.p50_ms == 2.0 and row.p95_ms == 7.5 and row.p99_ms == 9.5
        # the controller kept working: a good heartbeat still lands
        c.publish(hbt, device_pb2.Heartbeat(device_id="board-2").SerializeToString(), qos=1)
        await wait_until(lambda: _device(core, "board-2"), what="device after garbage")
        c.loop_stop()
        c.disconnect()


def test_percentile_from_histogram() -> None:
    assert percentile([1, 2], [0, 0, 0], 0.5) is None
    assert percentile([10], [4, 0], 0.5) == 5.0
    assert percentile([10], [0, 3], 0.99) == 10.0     # +Inf bucket reports the last bound
    assert percentile([1, 2], [1, 2], 0.5) is None    # malformed: wrong number of counts
