"""Test driver that plays the controller's side of OTA on a real broker, for agent tests.

:class:`OtaDriver` makes a root key and an online signing key, publishes the root-signed
KeyList (retained), signs UpdateManifests with :mod:`protos.envelope`, publishes offers
(retained) and answers the agent's ChunkRequests with UpdateChunks, counting every chunk it
sends (resume tests). It can misbehave on purpose (tampered or withheld chunks, wrong keys)
for the attack tests. It records UpdateStatus, Heartbeat and Presence messages. Offers go on
the legacy ``update/offer`` topic or on the per-model ``update/offer/{key}`` topics
(``per_model=True``); ``codec="slot"`` offers carry no payload; :meth:`OtaDriver.publish_desired`
signs and retains a DesiredState.
The real controller publisher (controller.ota) is tested end to end elsewhere.
Also: :func:`agent_config` / :func:`write_config` and :func:`infer` (local OIP API).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime
import paho.mqtt.client as mqtt
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protos import envelope, topics, trust
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2

DEFAULT_CHUNK = 4096


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(**overrides: str) -> common_pb2.EngineFingerprint:
    f = {"engine_kind": "onnxruntime-cpu", "arch": "", "toolchain": "onnxruntime",
         "toolchain_version": onnxruntime.__version__, "accelerator": "", "precision": "fp32"}
    f.update(overrides)
    return common_pb2.EngineFingerprint(**f)


@dataclass
class Offer:
    manifest: update_pb2.UpdateManifest
    envelope: update_pb2.SignedEnvelope
    payload: bytes
    tamper: dict[int, bytes] = field(default_factory=dict)   # index -> bytes sent instead
    withhold: set[int] = field(default_factory=set)          # indices never answered
    withhold_all: bool = False

    @property
    def update_id(self) -> str:
        return self.manifest.update_id


class OtaDriver:
    """The controller side of OTA for one device (see module docstring)."""

    def __init__(self, host: str, port: int, *, device_id: str, device_class: str,
                 root: Ed25519PrivateKey | None = None,
                 signer: Ed25519PrivateKey | None = None) -> None:
        self.host, self.port = host, port
        self.device_id = device_id
        self.device_class = device_class
        self.root = root or Ed25519PrivateKey.generate()
        self.signer = signer or Ed25519PrivateKey.generate()
        self.offers: dict[str, Offer] = {}
        self.sent: Counter[tuple[str, int]] = Counter()
        self.requests: list[update_pb2.ChunkRequest] = []
        self.statuses: list[update_pb2.UpdateStatus] = []
        self.heartbeats: list[device_pb2.Heartbeat] = []
        self.presence: list[device_pb2.Presence] = []
        self.answer = True
        self._cond = threading.Condition()
        self._connected = threading.Event()
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                        client_id=f"ota-driver-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.reconnect_delay_set(1, 2)
        self.client = c
        c.connect(host, port)
        c.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("driver could not connect to the broker")

    # ---- keys -----------------------------------------------------------------------------
    @property
    def root_public_b64(self) -> str:
        return base64.b64encode(envelope.public_raw(self.root.public_key())).decode()

    def publish_keys(self, *, version: int = 1, signers: list[Ed25519PrivateKey] | None = None,
                     revoked: list[str] | None = None, signed_by: Ed25519PrivateKey | None = None
                     ) -> None:
        exp = trust.now_ms() + 3_600_000
        env = trust.make_key_list(signed_by or self.root,
                                  [(k.public_key(), exp) for k in (signers or [self.signer])],
                                  version=version, revoked=revoked, expires_at_ms=exp)
        self.publish(topics.TRUST_KEYS, env.SerializeToString(), retain=True)

    # ---- offers ---------------------------------------------------------------------------
    def make_offer(self, name: str, version: int, payload: bytes, *, codec: str = "full",
                   target: bytes | None = None, base_sha256: str = "",
                   chunk_size: int = DEFAULT_CHUNK, signer: Ed25519PrivateKey | None = None,
                   expires_in_s: float = 600, variant: str = "",
                   **manifest_overrides: Any) -> Offer:
        target = payload if target is None else target
        if codec == "slot":  # the target engine is already on the device: no bytes move
            payload = b""
        chunks = [payload[i:i + chunk_size] for i in range(0, len(payload), chunk_size)]
        m = update_pb2.UpdateManifest(
            update_id=f"{name}-v{version}-{uuid.uuid4().hex[:8]}",
            device_class=self.device_class, model_name=name, version=version,
            target_sha256=sha256(target), target_size=len(target), codec=codec,
            base_sha256=base_sha256, payload_sha256=sha256(payload) if payload else "",
            payload_size=len(payload),
            chunk_size=chunk_size, chunk_sha256=[hashlib.sha256(c).digest() for c in chunks],
            issued_at_ms=trust.now_ms(),
            expires_at_ms=trust.now_ms() + int(expires_in_s * 1000),
            fingerprint=fingerprint(), variant=variant, device_id=self.device_id)
        for k, v in manifest_overrides.items():
            if k == "chunk_sha256":
                del m.chunk_sha256[:]
                m.chunk_sha256.extend(v)
            elif k in ("fingerprint", "probe", "shadow", "signature"):  # message fields
                getattr(m, k).CopyFrom(v)
            else:
                setattr(m, k, v)
        env = envelope.sign(m, signer or self.signer)
        return Offer(manifest=m, envelope=env, payload=payload)

    def offer(self, name: str, version: int, payload: bytes, **kw: Any) -> Offer:
        """Build, sign and publish (retained) an offer; returns it for tampering/assertions."""
        return self.publish_offer(self.make_offer(name, version, payload, **kw))

    def publish_offer(self, offer: Offer, *, raw: bytes | None = None,
                      per_model: bool = False) -> Offer:
        """Publish (retained) on ``update/offer``, or with ``per_model`` on the offer topic
        of the manifest's model key (``update/offer/{name[.variant]}``)."""
        self.offers[offer.update_id] = offer
        m = offer.manifest
        key = f"{m.model_name}.{m.variant}" if m.variant else m.model_name
        self.publish(self.offer_topic(key if per_model else None),
                     raw if raw is not None else offer.envelope.SerializeToString(),
                     retain=True)
        return offer

    def offer_topic(self, key: str | None = None) -> str:
        """The legacy offer topic, or the per-model one of ``key``."""
        return topics.device_topic(self.device_id,
                                   topics.offer_leaf(key) if key else topics.OFFER)

    def clear_offer(self, key: str | None = None) -> None:
        """Clear a retained offer (an empty retained message)."""
        self.publish(self.offer_topic(key), b"", retain=True)

    def publish_desired(self, models: list[dict[str, Any]], *, generation: int,
                        issued_at_ms: int | None = None,
                        signer: Ed25519PrivateKey | None = None) -> update_pb2.DesiredState:
        """Sign and publish (retained) a DesiredState; ``models`` are DesiredModel fields."""
        ds = update_pb2.DesiredState(
            device_id=self.device_id, generation=generation,
            issued_at_ms=trust.now_ms() if issued_at_ms is None else issued_at_ms)
        for m in models:
            ds.models.add(**m)
        self.publish(topics.device_topic(self.device_id, topics.DESIRED),
                     envelope.sign(ds, signer or self.signer).SerializeToString(), retain=True)
        return ds

    def clear_desired(self) -> None:
        self.publish(topics.device_topic(self.device_id, topics.DESIRED), b"", retain=True)

    def requests_for(self, update_id: str) -> list[update_pb2.ChunkRequest]:
        """The ChunkRequests the agent sent for ``update_id``."""
        with self._cond:
            return [r for r in self.requests if r.update_id == update_id]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def send_chunk(self, offer: Offer, index: int) -> None:
        cs = offer.manifest.chunk_size
        data = offer.tamper.get(index, offer.payload[index * cs:(index + 1) * cs])
        msg = update_pb2.UpdateChunk(update_id=offer.update_id, index=index,
                                     total=len(offer.manifest.chunk_sha256), data=data)
        self.client.publish(topics.device_topic(self.device_id, topics.CHUNK),
                            msg.SerializeToString(), qos=1)
        with self._cond:
            self.sent[(offer.update_id, index)] += 1

    def chunks_sent(self, update_id: str) -> int:
        return sum(n for (uid, _), n in self.sent.items() if uid == update_id)

    # ---- waiting --------------------------------------------------------------------------
    def wait_for(self, pred: Callable[[], Any], *, timeout_s: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                value = pred()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    states = [(s.update_id, common_pb2.UpdateState.Name(s.state), s.reason)
                              for s in self.statuses[-8:]]
                    raise TimeoutError(f"timed out waiting for {what or pred}; "
                                       f"last statuses: {states}")
                self._cond.wait(min(left, 0.2))

    def wait_status(self, update_id: str, state: int, *, timeout_s: float = 20.0
                    ) -> update_pb2.UpdateStatus:
        def find() -> update_pb2.UpdateStatus | None:
            for s in reversed(self.statuses):
                if s.update_id == update_id and s.state == state:
                    return s
            return None
        return self.wait_for(find, timeout_s=timeout_s,
                             what=f"{update_id} {common_pb2.UpdateState.Name(state)}")

    def states_of(self, update_id: str) -> list[str]:
        with self._cond:
            return [common_pb2.UpdateState.Name(s.state).removeprefix("UPDATE_STATE_")
                    for s in self.statuses if s.update_id == update_id]

    def last_heartbeat(self, *, after_seq: int = 0, timeout_s: float = 20.0
                       ) -> device_pb2.Heartbeat:
        return self.wait_for(lambda: next((h for h in reversed(self.heartbeats)
                                           if h.seq > after_seq), None),
                             timeout_s=timeout_s, what="heartbeat")

    # ---- MQTT callbacks -------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    rc: mqtt.ReasonCode, props: object) -> None:
        for leaf in (topics.CHUNK_REQUEST, topics.UPDATE_STATUS, topics.HEARTBEAT,
                     topics.PRESENCE):
            client.subscribe(topics.device_topic(self.device_id, leaf), qos=1)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        leaf = msg.topic.split(f"/{self.device_id}/", 1)[-1]
        if leaf == topics.CHUNK_REQUEST:
            req = update_pb2.ChunkRequest.FromString(msg.payload)
            with self._cond:
                self.requests.append(req)
            offer = self.offers.get(req.update_id)
            if offer is None or not self.answer or offer.withhold_all:
                return
            for i in req.indices:
                if i not in offer.withhold and i < len(offer.manifest.chunk_sha256):
                    self.send_chunk(offer, i)
            return
        with self._cond:
            if leaf == topics.UPDATE_STATUS:
                self.statuses.append(update_pb2.UpdateStatus.FromString(msg.payload))
            elif leaf == topics.HEARTBEAT:
                self.heartbeats.append(device_pb2.Heartbeat.FromString(msg.payload))
            elif leaf == topics.PRESENCE:
                self.presence.append(device_pb2.Presence.FromString(msg.payload))
            self._cond.notify_all()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def agent_config(tmp: Path, *, host: str, port: int, driver: OtaDriver,
                 serve_port: int = 0, **overrides: Any) -> dict[str, Any]:
    """A config mapping for an agent of ``driver``'s device, fast timers for tests."""
    cfg: dict[str, Any] = {
        "device_id": driver.device_id, "device_class": driver.device_class,
        "data_dir": str(tmp / "agent-data"),
        "mqtt": {"host": host, "port": port, "keepalive_s": 10, "reconnect_min_s": 0.2,
                 "reconnect_max_s": 1.0},
        "trust": {"root_public_key": driver.root_public_b64},
        "serve": {"host": "127.0.0.1", "port": serve_port},
        "heartbeat_interval_s": 0.5, "metrics_interval_s": 1.0,
        "update": {"stall_timeout_s": 2.0, "max_retries": 2, "request_window_chunks": 8},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def infer(url: str, model: str, inputs: list[list[float]]) -> list[float]:
    """POST a float32 [batch, n] tensor named x to the local OIP API; flat output data."""
    body = {"inputs": [{"name": "x", "shape": [len(inputs), len(inputs[0])], "datatype": "FP32",
                        "data": [v for row in inputs for v in row]}]}
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        out = json.loads(resp.read())
    return [float(v) for v in out["outputs"][0]["data"]]


def spawn_agent(config: Path, *, log: Path, crash_at: str | None = None
                ) -> subprocess.Popen[bytes]:
    """Start the real agent process (``python -m agent.cli run --config``)."""
    env = dict(os.environ)
    env.pop("EDGEFLEET_CRASH_AT", None)
    if crash_at:
        env["EDGEFLEET_CRASH_AT"] = crash_at
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                            cwd=root, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def stop_agent(proc: subprocess.Popen[bytes], *, timeout_s: float = 10.0) -> int:
    """SIGTERM (graceful) then SIGKILL if needed; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
    return int(proc.returncode)
