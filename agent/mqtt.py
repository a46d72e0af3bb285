"""The agent's MQTT 5 link (paho-mqtt 2.x, threaded network loop).

Connects as client id = device id, sets the last will ``Presence(online=False, reason="lwt")``
retained on ``.../presence``, publishes ``Presence(online=True)`` retained on every connect,
(re)subscribes to the device's offer / chunk / desired topics and the trust key topic, and
reconnects with exponential backoff. A handler topic may be an MQTT filter (``+``/``#``, e.g.
the per-model offers ``.../update/offer/#``): a message goes to the handler of its exact
topic, else to the first filter that matches it. Incoming payloads over
``max_payload_bytes`` are dropped with a log line; handler errors are logged, never raised
into paho's thread.
Created by :class:`agent.app.Agent`.

With ``mqtt.tls`` set it connects over TLS with the device certificate (controller/pki.py),
whose CN the broker takes as the username for its ACL. A publish or subscription the broker
refuses (MQTT 5 PUBACK/SUBACK reason code, e.g. 0x87 "Not authorized") is logged as a warning
with the topic and reason and counted in ``denials``. ``mqtt.protocol: "3.1.1"`` exists only
for brokers without MQTT 5 (the embedded amqtt fallback): no session expiry, and ACL denials
are invisible there (MQTT 3.1.1 PUBACK carries no reason code), which the log says at start.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttConfig
from protos import topics
from protos.edgefleet.v1 import device_pb2

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]


class MqttLink:
    """One MQTT 5 connection of the agent (see module docstring)."""

    def __init__(self, cfg: MqttConfig, *, device_id: str, handlers: dict[str, Handler],
                 max_payload_bytes: int, on_connected: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.handlers = dict(handlers)
        self.max_payload_bytes = max_payload_bytes
        self._on_connected_cb = on_connected
        self.connected = threading.Event()
        self.connect_count = 0
        self.presence_topic = topics.device_topic(device_id, topics.PRESENCE)
        self.v5 = str(cfg.protocol) != "3.1.1"
        # (topic, reason) of every publish/subscription the broker refused (newest last)
        self.denials: list[tuple[str, str]] = []
        self._inflight: OrderedDict[int, str] = OrderedDict()   # mid -> topic (QoS 1)
        self._early: dict[int, mqtt.ReasonCode] = {}            # refusals seen before the mid
        self._sub_topics: dict[int, list[str]] = {}
        self._track_lock = threading.Lock()
        if self.v5:
            c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                            client_id=device_id, protocol=mqtt.MQTTv5)
        else:
            log.warning("device %s: MQTT 3.1.1 (mqtt.protocol) - the broker cannot report "
                        "refused publishes (ACL denials are silent) and sessions do not "
                        "expire; use MQTT 5 with a broker that supports it", device_id)
            c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                            client_id=device_id, protocol=mqtt.MQTTv311, clean_session=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.reconnect_delay_set(min_delay=cfg.reconnect_min_s,  # type: ignore[arg-type]
                              max_delay=cfg.reconnect_max_s)  # type: ignore[arg-type]
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls.ca:
            c.tls_set(ca_certs=cfg.tls.ca, certfile=cfg.tls.cert or None,
                      keyfile=cfg.tls.key or None, cert_reqs=ssl.CERT_REQUIRED,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.will_set(self.presence_topic, self._presence(False, "lwt"), qos=1, retain=True)
        self.client = c

    def _presence(self, online: bool, reason: str) -> bytes:
        return device_pb2.Presence(device_id=self.device_id, online=online, reason=reason,
                                   at_ms=int(time.time() * 1000)).SerializeToString()

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; reconnects forever until :meth:`stop`."""
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry_s
            self.client.connect_async(self.cfg.host, self.cfg.port,
                                      keepalive=self.cfg.keepalive_s,
                                      clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                      properties=props)
        else:
            self.client.connect_async(self.cfg.host, self.cfg.port,
                                      keepalive=self.cfg.keepalive_s)
        self.client.loop_start()

    def stop(self, *, reason: str = "shutdown", timeout_s: float = 2.0) -> None:
        """Publish presence offline (retained), disconnect cleanly, stop the loop."""
        if self.connected.is_set():
            info = self.client.publish(self.presence_topic, self._presence(False, reason),
                                       qos=1, retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as e:
                log.debug("offline presence not confirmed: %s", e)
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    # ---- publish --------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Send a message; False when not connected (nothing is queued for later: callers
        re-send what matters on reconnect, so a backlog never replays stale requests)."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.debug("publish to %s not sent now: %s", topic, mqtt.error_string(info.rc))
            return False
        if qos > 0:
            self._track(info.mid, topic)
        return True

    # ---- refusals (MQTT 5 reason codes) ---------------------------------------------------
    def _track(self, mid: int, topic: str) -> None:
        """Remember which topic a QoS 1 publish went to, so a refusal names it."""
        with self._track_lock:
            early = self._early.pop(mid, None)
            if early is None:
                self._inflight[mid] = topic
                while len(self._inflight) > 4096:   # bounded: acks lost with a connection
                    self._inflight.popitem(last=False)
        if early is not None:
            self._denied(topic, early, what="publish to")

    def _denied(self, topic: str, rc: mqtt.ReasonCode, *, what: str) -> None:
        reason = f"{rc} (0x{rc.value:02x})"
        with self._track_lock:
            self.denials.append((topic, str(rc)))
            del self.denials[:-100]
        log.warning("device %s: broker refused %s %s: %s - check the broker ACL and this "
                    "device's certificate (CN must be %s)", self.device_id, what, topic,
                    reason, self.device_id)

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason_code: mqtt.ReasonCode, properties: object) -> None:
        with self._track_lock:
            topic = self._inflight.pop(mid, None)
            if topic is None and reason_code.is_failure:
                self._early[mid] = reason_code   # the ack beat publish() back to _track
                if len(self._early) > 1024:
                    self._early.pop(next(iter(self._early)))
        if topic is not None and reason_code.is_failure:
            self._denied(topic, reason_code, what="publish to")

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reason_codes: list[mqtt.ReasonCode], properties: object) -> None:
        with self._track_lock:
            subs = self._sub_topics.pop(mid, [])
        for i, rc in enumerate(reason_codes):
            if rc.is_failure:
                self._denied(subs[i] if i < len(subs) else f"(subscription #{i})", rc,
                             what="subscription to")

    # ---- paho callbacks (network thread) --------------------------------------------------
    def connection_id(self) -> int:
        """Number of the current connection (1, 2, ...), 0 while disconnected."""
        return self.connect_count if self.connected.is_set() else 0

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason_code: mqtt.ReasonCode, properties: object) -> None:
        if reason_code.is_failure:
            log.warning("device %s: broker refused connection: %s", self.device_id, reason_code)
            return
        self.connect_count += 1
        log.info("device %s: connected to %s:%d (#%d)", self.device_id, self.cfg.host,
                 self.cfg.port, self.connect_count)
        info = client.publish(self.presence_topic, self._presence(True, "connect"), qos=1,
                              retain=True)
        self._track(info.mid, self.presence_topic)
        names = list(self.handlers)
        if names:
            subs: list[tuple[str, mqtt.SubscribeOptions]] | list[tuple[str, int]]
            if self.v5:
                subs = [(t, mqtt.SubscribeOptions(qos=1)) for t in names]
            else:
                subs = [(t, 1) for t in names]
            with self._track_lock:   # the SUBACK cannot be handled before this thread returns
                _rc, mid = client.subscribe(subs)
                if mid is not None:
                    self._sub_topics[mid] = names
        self.connected.set()
        if self._on_connected_cb:
            try:
                self._on_connected_cb()
            except Exception:  # never raise into paho's thread
                log.exception("on_connected handler failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason_code: mqtt.ReasonCode, properties: object) -> None:
        self.connected.clear()
        log.warning("device %s: disconnected (%s); reconnecting with backoff", self.device_id,
                    reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    msg: mqtt.MQTTMessage) -> None:
        size = len(msg.payload)
        if size > self.max_payload_bytes:
            log.warning("device %s: message on %s of %d bytes exceeds max_payload_bytes %d; "
                        "dropped", self.device_id, msg.topic, size, self.max_payload_bytes)
            return
        handler = self.handlers.get(msg.topic)
        if handler is None:
            handler = next((h for sub, h in self.handlers.items()
                            if ("#" in sub or "+" in sub)
                            and mqtt.topic_matches_sub(sub, msg.topic)), None)
        if handler is None:
            log.debug("message on unexpected topic %s ignored", msg.topic)
            return
        try:
            handler(bytes(msg.payload))
        except Exception:  # bad input must not kill the network thread
            log.exception("device %s: handler for %s failed", self.device_id, msg.topic)
