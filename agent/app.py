"""The agent process: wires the MQTT link, trust store, update manager, model registry,
local inference server, heartbeats and metrics.

Startup order matters: the start is counted (``Heartbeat.restarts``), then the committed
engines are loaded from the slots BEFORE connecting (with the integrity / crash-loop
fallbacks of :mod:`agent.update.serving`), so a board serves its last good model even with
no network. Offers arrive on ``update/offer`` and on the per-model ``update/offer/{key}``
topics; the signed DesiredState on ``desired`` goes to the update manager (verified there,
after any key list that arrived before it). Created by :mod:`agent.cli`
(``edgefleet-agent run --config FILE``) and by tests in-process.

``serve.batching`` (dynamic batching per model) is applied after every activation of a
configured model, at startup (slots) and after OTA updates (:meth:`Agent._apply_batching`).
numpy and onnxruntime are not imported here: the runtime imports them when the first
engine is activated, so an agent without a model stays small.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from agent.config import AgentConfig, ConfigError
from agent.mqtt import MqttLink
from agent.telemetry.heartbeat import HeartbeatBuilder, device_facts
from agent.trust_store import TrustStore
from agent.update.health import Counter
from agent.update.manager import UpdateManager
from agent.update.slots import SlotStore
from agent.update.state import StateStore
from protos import topics
from protos.edgefleet.v1 import device_pb2

log = logging.getLogger(__name__)

MQTT_OVERHEAD_BYTES = 4096


class Agent:
    """One device agent. ``start()`` returns once serving (MQTT connects in the background)."""

    def __init__(self, cfg: AgentConfig) -> None:
        from agent.runtime.registry import ModelRegistry

        cfg.validate()
        self.cfg = cfg
        data = cfg.data_path
        data.mkdir(parents=True, exist_ok=True)
        self.registry = ModelRegistry()
        self.slots = SlotStore(data / "models")
        self.trust = TrustStore(cfg.trust.root_raw(), path=cfg.key_list_file(),
                                max_envelope_bytes=cfg.limits.max_envelope_bytes)
        self.updates = UpdateManager(cfg, trust=self.trust,
                                     registry=_AfterActivation(self.registry,
                                                               self._apply_batching),
                                     slots=self.slots, states=StateStore(data / "update"),
                                     publish=self._publish,
                                     connection_id=lambda: self.link.connection_id())
        dev = cfg.device_id
        def offer(b: bytes) -> None:
            self.updates.submit("offer", b)

        handlers = {  # trust keys first: retained messages arrive in subscription order
            topics.TRUST_KEYS: lambda b: self.updates.submit("keys", b),
            topics.device_topic(dev, topics.OFFER): offer,
            topics.device_topic(dev, topics.OFFERS): offer,   # update/offer/{model key}
            topics.device_topic(dev, topics.CHUNK): lambda b: self.updates.submit("chunk", b),
            topics.device_topic(dev, topics.DESIRED): self._on_desired,
        }
        max_payload = max(cfg.limits.max_envelope_bytes,
                          cfg.limits.max_chunk_bytes) + MQTT_OVERHEAD_BYTES
        self.link = MqttLink(cfg.mqtt, device_id=dev, handlers=handlers,
                             max_payload_bytes=max_payload, on_connected=self._on_connected)
        self.server: Any = None
        self.heartbeats: HeartbeatBuilder | None = None
        self._metrics_tick: Any = None
        self.thermal: Any = None
        self.collector: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def desired_generation(self) -> int:
        """Generation of the newest signed DesiredState acted on (persisted)."""
        return self.updates.desired.generation

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.restarts = Counter(self.cfg.data_path / "health" / "restarts.json").increment()
        loaded = self.updates.load_committed()
        log.info("device %s: serving %d committed model(s) before connecting: %s",
                 self.cfg.device_id, len(loaded),
                 ", ".join(f"{i.key} v{i.version}" for i in loaded) or "none")
        self.thermal = self._make_thermal()
        self._metrics_tick = self._make_metrics_tick()
        serve_url = ""
        if self.cfg.serve.enabled:
            from agent.serve import start_server

            self.server = start_server(self.registry, host=self.cfg.serve.host,
                                       port=self.cfg.serve.port, metrics=self.collector)
            serve_url = self.server.url
            log.info("device %s: inference API on %s", self.cfg.device_id, serve_url)
        self.heartbeats = HeartbeatBuilder(
            device_id=self.cfg.device_id, device_class=self.cfg.device_class,
            facts=device_facts(), served=self._served, progress=self.updates.progress,
            health=self._health, serve_url=serve_url, labels=self.cfg.labels,
            slots=self.updates.slot_report, faults=self.updates.faults.faults,
            desired_generation=lambda: self.updates.desired.generation,
            restarts=self.restarts,
            interval_ms=int(self.cfg.heartbeat_interval_s * 1000))
        self.updates.start()
        self.link.start()
        self._thread = threading.Thread(target=self._loop, name="agent-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.link.stop(reason="shutdown")
        self.updates.stop()
        if self.server is not None:
            self.server.stop()
        self.registry.close()

    def wait(self) -> None:
        """Block until :meth:`stop` (the CLI's main thread)."""
        while not self._stop.wait(1.0):
            pass

    # ---- serving options ------------------------------------------------------------------
    def _apply_batching(self, name: str, version: int) -> None:
        """Turn on ``serve.batching`` for model ``name`` after one of its engines was
        activated (startup or OTA). The registry keeps the settings for later versions; a
        version that cannot be batched is logged and served unbatched. Never raises: a
        serving option must not fail an update."""
        from protos.errors import Rejected

        settings = self.cfg.serve.batching.get(name)
        if settings is None:
            return
        dev = self.cfg.device_id
        try:
            if self.registry.batching(name) is None:
                self.registry.configure_batching(name, **settings)
                log.info("device %s: model %s v%d: dynamic batching on (%s)", dev, name,
                         version, ", ".join(f"{k}={v}" for k, v in settings.items()))
            else:  # the registry applied the kept settings while activating: check them
                from agent.runtime.batching import check_batchable

                _info, signature = self.registry.describe(name, version)
                check_batchable(signature, model=name)
        except Rejected as e:
            log.warning("device %s: model %s v%d served without batching: %s (%s)", dev, name,
                        version, e, e.reason)
        except Exception:  # a batching bug must not fail the update that is committing
            log.exception("device %s: model %s v%d: batching not applied", dev, name, version)

    # ---- MQTT -----------------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        return self.link.publish(topic, payload, qos=qos, retain=retain)

    def _on_connected(self) -> None:
        self.updates.submit("connected", b"")
        self.send_heartbeat()

    def _on_desired(self, data: bytes) -> None:
        """The signed DesiredState: verified and acted on by the update worker, in order
        with the key list (:meth:`agent.update.manager.UpdateManager.handle_desired`)."""
        self.updates.submit("desired", data)

    # ---- telemetry ------------------------------------------------------------------------
    def _served(self) -> list[device_pb2.ServedModel]:
        """The engines in the registry, with the slot, revision, engine_version and update
        id of the slot engine really loaded (by sha256)."""
        out = []
        for m in self.registry.served():
            key = f"{m.name}.{m.variant}" if m.variant else m.name
            info = self.updates.loaded_info(key)
            if info is None or info.sha256 != m.sha256:
                info = next((i for i in (self.slots.read_meta(key, s) for s in ("a", "b"))
                             if i is not None and i.sha256 == m.sha256), None)
            p = m.to_proto(slot=info.slot if info else "")
            if info is not None:
                p.revision, p.engine_version = info.revision, info.built_for
                p.update_id = info.update_id
            out.append(p)
        return out

    def send_heartbeat(self) -> bool:
        if self.heartbeats is None:
            return False
        hb = self.heartbeats.build()
        return self._publish(topics.device_topic(self.cfg.device_id, topics.HEARTBEAT),
                             hb.SerializeToString(), qos=0)

    def _make_thermal(self) -> Any:
        from agent.telemetry.thermal import ThermalConfig, ThermalPolicy

        try:
            tcfg = ThermalConfig(**self.cfg.thermal)
            tcfg.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"thermal: {e}") from e
        return ThermalPolicy(tcfg, registry=self.registry) if tcfg.enabled else None

    def _health(self) -> tuple[str, str]:
        return self.thermal.health() if self.thermal is not None else ("ok", "")

    def _make_metrics_tick(self) -> Any:
        from agent.telemetry.buffer import OfflineBuffer
        from agent.telemetry.host import HostReader
        from agent.telemetry.metrics import MetricsCollector, MetricsPublisher

        dev = self.cfg.device_id
        topic = topics.device_topic(dev, topics.METRICS)
        host_reader = None
        try:
            host_reader = HostReader()
        except Exception as e:  # host readings are optional
            log.warning("host readings unavailable: %s", e)
        self.collector = MetricsCollector(self.registry, host=host_reader)
        buffer = OfflineBuffer(self.cfg.data_path / "telemetry")
        pub = MetricsPublisher(self.collector, buffer,
                               lambda payload: self._publish(topic, payload, qos=1),
                               device_id=dev)
        return pub.tick

    def _loop(self) -> None:
        next_hb = time.monotonic() + self.cfg.heartbeat_interval_s
        next_metrics = time.monotonic() + self.cfg.metrics_interval_s
        next_thermal = time.monotonic()
        while not self._stop.wait(0.1):
            now = time.monotonic()
            try:
                if self.thermal is not None and now >= next_thermal:
                    next_thermal = now + self.thermal.config.interval_s
                    self.thermal.evaluate()
                if now >= next_hb:
                    next_hb = now + self.cfg.heartbeat_interval_s
                    self.send_heartbeat()
                if now >= next_metrics:
                    next_metrics = now + self.cfg.metrics_interval_s
                    if self._metrics_tick is not None:
                        self._metrics_tick()
            except Exception:  # telemetry must never stop the agent
                log.exception("device %s: telemetry tick failed", self.cfg.device_id)


class _AfterActivation:
    """The registry as the update manager sees it: ``activate`` then ``after(name,
    version)`` (used for ``serve.batching``); everything else (``get`` for the accuracy
    probe) goes to the registry itself."""

    def __init__(self, registry: Any, after: Any) -> None:
        self._registry = registry
        self._after = after

    def activate(self, **kwargs: Any) -> None:
        self._registry.activate(**kwargs)
        self._after(kwargs["name"], kwargs["version"])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)
