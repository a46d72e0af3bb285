"""Test helpers for controller tests: a started ControllerCore, waits, and a paho stand-in device.

``FakeDevice`` is a paho-mqtt (MQTT 5) client that behaves like an agent on the wire where
the real agent is not needed: it sends heartbeats, verifies signed offers against the pinned
root (protos.trust), requests chunks, checks each chunk against the manifest, reassembles the
payload and reports UpdateStatus (committed, or failed when told to).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session, select

from controller.fleet.models import Device, DeviceRollout
from protos import topics, trust
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2
from tests.helpers.models import build_affine

API = "edgefleet.io/v1alpha1"


async def wait_until(pred: Callable[[], Any], *, timeout_s: float = 30.0,
                     what: str = "condition") -> Any:
    """Poll ``pred`` until truthy (returns it) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def wait_sync(pred: Callable[[], Any], *, timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll ``pred`` (from a thread) until truthy (returns it) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def mqtt_client(port: int, client_id: str, *, will: tuple[str, bytes] | None = None
                ) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    if will:
        c.will_set(will[0], will[1], qos=1, retain=True)
    c.connect("127.0.0.1", port, keepalive=5)
    c.loop_start()
    wait_sync(c.is_connected, timeout_s=10, what=f"{client_id} connected")
    return c


def edge_model(name: str, *, sha256: str, version: int = 1,
               classes: tuple[str, ...] = ("cpu-x86-64",)) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "EdgeModel",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"version": version, "source": {"sha256": sha256},
                     "targets": [{"deviceClass": c, "precisions": ["fp32"]} for c in classes]}}


def device_class(name: str = "cpu-x86-64") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "DeviceClass", "metadata": {"name": name},
            "spec": {"engineKind": "onnxruntime-cpu", "arch": "x86_64"}}


def edge_rollout(name: str, model: str, waves: list[dict[str, Any]],
                 **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "EdgeRollout",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": model, "waves": waves, **spec}}


@dataclass
class FakeDevice:
    """A device on the wire (paho client): heartbeats, verify offers, fetch chunks, report."""

    device_id: str
    port: int
    root_public: bytes
    device_class: str = "cpu-x86-64"
    fail_updates: bool = False           # report FAILED instead of COMMITTED
    window: int = 8
    served: list[device_pb2.ServedModel] = field(default_factory=list)
    offers: list[update_pb2.UpdateManifest] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    payloads: dict[str, bytes] = field(default_factory=dict)
    chunks_seen: list[tuple[str, int]] = field(default_factory=list)
    auto_fetch: bool = True
    offer_messages: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    empty_offers: int = 0                # retained offer cleared (zero-length message)
    desired: list[update_pb2.DesiredState] = field(default_factory=list)
    slot_models: list[device_pb2.ServedModel] = field(default_factory=list)  # inactive slots
    health: str = "ok"                   # what heartbeats report (ok | throttled | degraded)
    faults: list[device_pb2.ModelFault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.trust = trust.TrustState(root_public=self.root_public)
        self._lock = threading.Lock()
        self._chunks: dict[str, dict[int, bytes]] = {}
        self.client = mqtt_client(self.port, f"dev-{self.device_id}")
        self.client.on_message = self._on_message
        for leaf in (topics.OFFER, topics.OFFERS, topics.CHUNK, topics.DESIRED):
            self.client.subscribe(topics.device_topic(self.device_id, leaf), qos=1)
        self.client.subscribe(topics.TRUST_KEYS, qos=1)

    def topic(self, leaf: str) -> str:
        return topics.device_topic(self.device_id, leaf)

    def heartbeat(self) -> None:
        hb = device_pb2.Heartbeat(device_id=self.device_id, device_class=self.device_class,
                                  models=self.served, agent_version="test", health=self.health,
                                  sent_at_ms=int(time.time() * 1000), labels=self.labels,
                                  slots=[*self.served, *self.slot_models], faults=self.faults)
        self.client.publish(self.topic(topics.HEARTBEAT), hb.SerializeToString(), qos=1).wait_for_publish(5)

    def metrics(self, model: str, version: int, *, requests: int, errors: int = 0,
                latency_ms: float = 4.0) -> None:
        """A Metrics message with cumulative counters; every request in one latency bucket."""
        bounds = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]
        counts = [0] * (len(bounds) + 1)
        counts[next((i for i, b in enumerate(bounds) if latency_ms <= b), len(bounds))] = requests
        mm = device_pb2.ModelMetrics(name=model, version=version, requests=requests,
                                     errors=errors, latency=device_pb2.LatencyHistogram(
                                         bounds_ms=bounds, counts=counts,
                                         sum_ms=latency_ms * requests))
        msg = device_pb2.Metrics(device_id=self.device_id, at_ms=int(time.time() * 1000),
                                 models=[mm])
        self.client.publish(self.topic(topics.METRICS), msg.SerializeToString(),
                            qos=1).wait_for_publish(5)

    def status(self, m: update_pb2.UpdateManifest, state: common_pb2.UpdateState, reason: str = "") -> None:
        st = update_pb2.UpdateStatus(device_id=self.device_id, update_id=m.update_id,
                                     model_name=m.model_name, version=m.version, state=state,
                                     reason=reason, bytes_total=m.payload_size,
                                     at_ms=int(time.time() * 1000))
        self.client.publish(self.topic(topics.UPDATE_STATUS), st.SerializeToString(), qos=1)

    def request(self, m: update_pb2.UpdateManifest, indices: list[int]) -> None:
        req = update_pb2.ChunkRequest(device_id=self.device_id, update_id=m.update_id,
                                      indices=indices)
        self.client.publish(self.topic(topics.CHUNK_REQUEST), req.SerializeToString(), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def reconnect(self) -> None:
        """A fresh MQTT session (as after a reboot): retained messages are delivered again."""
        self.close()
        with self._lock:
            self.offer_messages = self.empty_offers = 0
            self.desired.clear()
        self.client = mqtt_client(self.port, f"dev-{self.device_id}")
        self.client.on_message = self._on_message
        self.client.subscribe(topics.TRUST_KEYS, qos=1)
        for leaf in (topics.OFFER, topics.OFFERS, topics.CHUNK, topics.DESIRED):
            self.client.subscribe(topics.device_topic(self.device_id, leaf), qos=1)

    # -- callbacks (paho thread) --------------------------------------------------------------
    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == topics.TRUST_KEYS:
            env = update_pb2.SignedEnvelope.FromString(msg.payload)
            self.trust.accept_key_list(env)
        elif _is_offer(msg.topic) and not msg.payload:
            with self._lock:
                self.empty_offers += 1
        elif msg.topic.endswith("/desired"):
            if msg.payload:
                env = update_pb2.SignedEnvelope.FromString(msg.payload)
                ds = self.trust.verify(env, update_pb2.DesiredState)
                assert ds.device_id == self.device_id
                with self._lock:
                    self.desired.append(ds)
        elif _is_offer(msg.topic):
            env = update_pb2.SignedEnvelope.FromString(msg.payload)
            m = self.trust.verify(env, update_pb2.UpdateManifest)
            assert m.device_id == self.device_id and m.device_class == self.device_class
            with self._lock:
                self.offer_messages += 1
                if any(o.update_id == m.update_id for o in self.offers):
                    return
                self.offers.append(m)
                self._chunks[m.update_id] = {}
            if self.auto_fetch and m.codec == "slot":
                self._commit(m)                 # the engine is already on the device
            elif self.auto_fetch:
                self.status(m, common_pb2.UPDATE_STATE_DOWNLOADING)
                self.request(m, list(range(min(self.window, len(m.chunk_sha256)))))
        elif msg.topic.endswith("/update/chunk"):
            ch = update_pb2.UpdateChunk.FromString(msg.payload)
            self._on_chunk(ch)

    def _on_chunk(self, ch: update_pb2.UpdateChunk) -> None:
        with self._lock:
            self.chunks_seen.append((ch.update_id, ch.index))
            m = next((o for o in self.offers if o.update_id == ch.update_id), None)
            if m is None:
                return
            assert hashlib.sha256(ch.data).digest() == m.chunk_sha256[ch.index], "chunk hash"
            got = self._chunks[m.update_id]
            got[ch.index] = ch.data
            n = len(m.chunk_sha256)
            done = len(got) == n
            nxt = len(got) + self.window - 1
        if not self.auto_fetch:
            return
        if not done:
            if nxt < n and nxt not in got:
                self.request(m, [nxt])
            return
        data = b"".join(got[i] for i in range(n))
        assert hashlib.sha256(data).hexdigest() == m.payload_sha256
        self.payloads[m.update_id] = data
        if self.fail_updates:
            self.status(m, common_pb2.UPDATE_STATE_FAILED, "smoke check failed (test)")
            return
        self._commit(m)

    def _commit(self, m: update_pb2.UpdateManifest) -> None:
        """Serve the manifest's target (other models and variants stay) and report it."""
        keep = [x for x in self.served if (x.name, x.variant) != (m.model_name, m.variant)]
        old = [x for x in self.served if (x.name, x.variant) == (m.model_name, m.variant)]
        if old and old[0].sha256 != m.target_sha256:   # A/B: the previous engine stays
            prev = device_pb2.ServedModel()
            prev.CopyFrom(old[0])
            prev.active = False
            self.slot_models = [x for x in self.slot_models
                                if (x.name, x.variant) != (m.model_name, m.variant)] + [prev]
        self.served = keep + [device_pb2.ServedModel(
            name=m.model_name, version=m.version, sha256=m.target_sha256, active=True,
            slot="b", revision=m.revision, engine_version=m.engine_version,
            variant=m.variant, update_id=m.update_id)]
        self.status(m, common_pb2.UPDATE_STATE_COMMITTED)
        self.committed.append(m.update_id)
        self.heartbeat()


def _is_offer(topic: str) -> bool:
    """The legacy single offer topic or a per-model one (update/offer/{model_key})."""
    return topic.endswith("/update/offer") or "/update/offer/" in topic


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class started_core:
    """``async with started_core(tmp_path, broker, **settings) as core``: connected ControllerCore."""

    def __init__(self, data_dir: Path, broker: Any, **overrides: Any) -> None:
        from controller.settings import Settings

        opts: dict[str, Any] = {"resync_s": 0.5, "compile_in_process_pool": False}
        opts.update(overrides)
        self.settings = Settings(data_dir=data_dir, mqtt_host=broker.host,
                                 mqtt_port=broker.port, **opts)
        self.core: Any = None

    async def __aenter__(self) -> Any:
        from controller.core import ControllerCore

        self.core = ControllerCore(self.settings)
        await self.core.start()
        await asyncio.wait_for(self.core.connected.wait(), 15)
        return self.core

    async def __aexit__(self, *exc: Any) -> None:
        await self.core.stop()


# -- rollout tests: a compiled model, registered stand-in devices, rollout state ------------------
def rollout_status(core: Any, name: str = "r") -> dict[str, Any]:
    """The status of EdgeRollout default/``name`` ({} until it has one)."""
    return (core.get("EdgeRollout", "default", name) or {}).get("status") or {}


def rollout_rows(core: Any) -> dict[str, DeviceRollout]:
    """Per-device rollout rows by device id."""
    with Session(core.db) as s:
        return {r.device_id: r for r in s.exec(select(DeviceRollout)).all()}


async def ready_model(core: Any, tmp: Path, *, version: int = 1, marker: float = 1.0) -> str:
    """Apply EdgeModel default/m (a small affine model) and wait until it is compiled;
    returns the sha256 of its engine."""
    src = build_affine(tmp / f"m{version}.onnx", marker=marker, n_in=96, n_out=64, seed=1)
    core.apply([device_class(), edge_model("m", sha256=core.upload_artifact(src),
                                           version=version)])
    st = await wait_until(lambda: (x := core.get("EdgeModel", "default", "m")["status"])
                          .get("phase") == "Ready" and x.get("version") == version and x,
                          timeout_s=60, what="model compiled")
    return str(st["engines"][0]["sha256"])


async def registered_devices(core: Any, port: int, ids: list[str],
                             **kw: Any) -> dict[str, FakeDevice]:
    """FakeDevices ``ids`` on the broker at ``port``, each heartbeated until the core knows it."""
    root = core.keys.root_public_raw()
    devs = {i: FakeDevice(i, port, root, **kw) for i in ids}
    for d in devs.values():
        d.heartbeat()

    def known() -> bool:
        with Session(core.db) as s:
            return all(s.get(Device, i) is not None for i in ids)

    await wait_until(known, what="devices registered")
    return devs
