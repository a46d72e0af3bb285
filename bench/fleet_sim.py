"""Protocol-faithful fleet simulator: thousands of simulated devices in one asyncio process,
each with its own MQTT 5 connection (:mod:`bench.mqtt5_lite`) to a real broker, so the
controller sees what real agents (agent/) send.

Per device (id ``sim-00001`` ...; client id = device id, like :class:`agent.mqtt.MqttLink`):

- CONNECT with clean start, session expiry 0 and the last will ``Presence(online=False,
  reason="lwt")`` (QoS 1, retained); on CONNACK a retained QoS 1 ``Presence(online=True,
  reason="connect")``, one SUBSCRIBE (QoS 1) to the trust key list, ``update/offer``,
  ``update/offer/#``, ``update/chunk`` and ``desired``, a heartbeat at once, then the
  UpdateStatus of every model's current update and re-requests of unfinished transfers
  (as ``UpdateManager._on_connected`` does).
- A ``Heartbeat`` (QoS 0, like ``Agent.send_heartbeat``) every ``heartbeat_s`` from a random
  phase: device class, facts, labels, served models (``models``) and every engine in an A/B
  slot (``slots``), update progress, seq (+1 per heartbeat), sent_at_ms, uptime, and the
  heartbeat period (``heartbeat_interval_ms``, where the wire contract has it). The message
  is serialized once per change of what it reports; each tick appends only the three
  varying fields (protobuf lets a later field occurrence complete a message), so a tick
  costs a few varint encodes.
- ``Metrics`` (QoS 1) every ``metrics_s``: per (model, version) cumulative requests, errors
  and a latency histogram with the agent's bounds (``agent.telemetry.metrics``), driven by a
  simulated request rate; host readings.
- Offers: the agent's own checks (``agent.update.verify.verify_offer``: signature against
  the root-signed key list when ``root_public_key`` is given, device class/id, expiry,
  (version, revision) newer than the committed one, chunk table, codec, base engine on the
  device for deltas), redeliveries ignored by update id, an offer superseding an older one
  in progress. Then UpdateStatus RECEIVED -> DOWNLOADING -> VERIFYING -> PATCHING -> STAGED
  -> ACTIVATING -> COMMITTED, with the chunk transfer of ``agent.update.download.Transfer``:
  ``ChunkRequest`` windows of missing indices (``request_window`` 16), refilled when half
  drained, every chunk checked against the signed per-chunk sha256, the whole payload's
  sha256 checked at the end, re-requests after ``stall_timeout_s`` without a chunk (doubled
  per stall in a row, up to 4x) and after a reconnect, FAILED ``stalled`` after
  ``max_stalls`` stalls in a row. Chunks are hashed as they arrive
  (out-of-order ones wait), never stored whole. "Applying" is that hash check: the device
  then serves the manifest's target (sha256, version, revision), the engine it replaced
  moves to the other slot. Codec ``slot`` (no bytes) needs the target in a slot.
  A signed probe gets a passing ProbeReport in a second COMMITTED status (as the agent
  sends after its probe); a shadow spec a passing ShadowReport. A signed DesiredState is
  checked and its generation reported in heartbeats (not acted on).

Failure injection: :meth:`Fleet.drop` (abrupt close: the broker publishes the will),
:meth:`Fleet.silence` (no more heartbeats/metrics, connection and keep-alive kept: no will),
:meth:`Fleet.reconnect` (all at once or ramped), ``fail_fraction`` / :meth:`Fleet.set_failing`
(updates roll back at activation, or fail before it), ``message_jitter_ms`` (each publish
delayed by a random amount, order per device kept). Unexpected connection losses reconnect
with the agent's exponential backoff.

Instrumentation (:class:`FleetStats`, :class:`HeartbeatLog`): send time of the last
``hb_log_depth`` heartbeats of every device by seq, messages sent per kind, PUBACK refusals
(MQTT 5 reason codes), connect failures, update timings (offer received -> final state),
chunk bytes received.

    .venv/bin/python -m bench.fleet_sim --mqtt mqtt://127.0.0.1:1883 --devices 1000 \\
        --heartbeat-s 10 --metrics-s 15 --duration 120 --ramp-s 20 [--json FILE]

``--mqtt auto`` starts a private Mosquitto (tests/helpers/broker.py) and reports its CPU and
memory too. Python API: ``fleet = Fleet(FleetConfig(port=1883, devices=50)); await
fleet.start(); ...; await fleet.stop()``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from agent.config import LimitsConfig, UpdateConfig
from agent.telemetry.heartbeat import AGENT_VERSION
from agent.telemetry.metrics import LATENCY_BOUNDS_MS
from agent.update.verify import SLOT_CODEC, model_key, verify_offer
from bench.mqtt5_lite import MqttConnection, Will, encode_string, reason_name
from protos import envelope, topics
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2
from protos.errors import Action, EdgefleetError, GiveUp, Rejected
from protos.trust import TrustState

log = logging.getLogger("bench.fleet_sim")

S = common_pb2  # UpdateState values: S.UPDATE_STATE_RECEIVED ...
TERMINAL_STATES = frozenset((S.UPDATE_STATE_COMMITTED, S.UPDATE_STATE_FAILED,
                             S.UPDATE_STATE_ROLLED_BACK))
ACTION_PROTO = {Action.RETRY.value: common_pb2.ERROR_ACTION_RETRY,
                Action.GIVE_UP.value: common_pb2.ERROR_ACTION_GIVE_UP,
                Action.REJECT.value: common_pb2.ERROR_ACTION_REJECT}
_UPDATE_DEFAULTS = UpdateConfig()
_LIMITS = LimitsConfig()
MAX_DONE_IDS = 64            # finished update ids remembered per model (redeliveries ignored)
MAX_STAT_VERSIONS = 4        # (model, version) counters kept per device for Metrics
MAX_STALL_BACKOFF = 4        # as agent.update.download: the stall timeout grows to 4x at most
# Heartbeat.heartbeat_interval_ms (the period the controller's liveness sweep judges by),
# set when the wire contract in use has the field
_HB_HAS_INTERVAL = "heartbeat_interval_ms" in device_pb2.Heartbeat.DESCRIPTOR.fields_by_name

# latency of the simulated requests: share of requests per histogram bucket (bounds of
# agent.telemetry.metrics.LATENCY_BOUNDS_MS, last = +Inf) and a representative latency each
_SHARES = {2.5: 0.10, 5.0: 0.55, 10.0: 0.28, 25.0: 0.05, 50.0: 0.015, 100.0: 0.005}


def _latency_model() -> tuple[list[float], list[float]]:
    shares, mids = [], []
    lo = 0.0
    for b in LATENCY_BOUNDS_MS:
        shares.append(_SHARES.get(b, 0.0))
        mids.append((lo + b) / 2)
        lo = b
    shares.append(0.0)
    mids.append(lo * 2)
    return shares, mids


LATENCY_SHARES, LATENCY_MIDS_MS = _latency_model()
_MODE_BUCKET = LATENCY_SHARES.index(max(LATENCY_SHARES))


class FleetError(RuntimeError):
    """The simulator cannot run as configured (e.g. too few file descriptors)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def _varint(v: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if v < 0x80:
        return bytes((v,))
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


# Heartbeat field tags (wire type 0): uptime_s = 7, sent_at_ms = 8, seq = 9
_TAG_UPTIME, _TAG_SENT, _TAG_SEQ = b"\x38", b"\x40", b"\x48"


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """(host, port) of ``mqtt://host:port`` (port 1883 by default)."""
    u = urlparse(url if "://" in url else f"mqtt://{url}")
    if u.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"only plain mqtt:// URLs are supported, got {url!r}")
    return u.hostname or "127.0.0.1", u.port or 1883


def raise_nofile_limit(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; FleetError when even that is
    below ``needed`` descriptors. Returns the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise RLIMIT_NOFILE to %d: %s", target, e)
    if soft < needed:
        raise FleetError(
            f"RLIMIT_NOFILE is {soft} (hard limit {hard}), but {needed} file descriptors are "
            f"needed (one socket per simulated device plus some): raise the hard limit "
            f"(ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=) or simulate fewer "
            f"devices")
    return soft, hard


# ---- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedSpec:
    """A model a simulated device serves from the start (its engine in slot "a")."""

    name: str
    version: int
    sha256: str
    variant: str = ""
    revision: int = 0
    engine_version: int = 0
    engine_kind: str = "onnxruntime-cpu"
    precision: str = "fp32"
    update_id: str = ""

    @classmethod
    def parse(cls, text: str) -> ServedSpec:
        """``name:version:sha256`` (the CLI's ``--model``)."""
        name, version, sha = text.split(":")
        return cls(name=name, version=int(version), sha256=sha)


def default_facts() -> device_pb2.DeviceFacts:
    """What a small x86-64 CPU board running the onnxruntime backend reports."""
    try:
        from importlib.metadata import version

        ort = version("onnxruntime")
    except Exception:  # not installed: any plausible version
        ort = "1.20.0"
    facts = device_pb2.DeviceFacts(
        arch="x86_64", cpu_flags=["sse4_2", "avx", "avx2", "fma", "f16c"], os="Linux-sim",
        python_version=platform.python_version(), cpu_count=4, memory_bytes=4 << 30,
        board="edgefleet fleet simulator")
    facts.runtimes.add(engine_kind="onnxruntime-cpu", version=ort, accelerator="")
    return facts


@dataclass
class FleetConfig:
    """Everything a :class:`Fleet` simulates. Durations in seconds."""

    host: str = "127.0.0.1"
    port: int = 1883
    devices: int = 100
    id_prefix: str = "sim-"
    first_index: int = 1
    id_width: int = 5
    device_class: str = "cpu-x86-64"
    labels: dict[str, str] = field(default_factory=dict)
    labels_fn: Callable[[int], dict[str, str]] | None = None   # per-device extra labels
    models: tuple[ServedSpec, ...] = ()         # served by every device at start
    facts: device_pb2.DeviceFacts | None = None  # default_facts() when None
    heartbeat_s: float = 10.0
    metrics_s: float = 15.0
    interval_jitter: float = 0.05               # each interval +- this fraction
    keepalive_s: int = 30
    connect_rate: float = 500.0                 # connects per second (0 = all at once)
    # TCP + CONNECT handshakes in progress at once: Mosquitto listens with a backlog of 100,
    # more overflow its accept queue on a busy host (SYN retries: connects take seconds)
    max_pending_connects: int = 64
    connect_timeout_s: float = 15.0
    auto_reconnect: bool = True                 # after an unexpected loss (not drop())
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    root_public_key: bytes | None = None        # pin: verify signatures (else parse only)
    request_window: int = _UPDATE_DEFAULTS.request_window_chunks
    stall_timeout_s: float = _UPDATE_DEFAULTS.stall_timeout_s
    max_stalls: int = _UPDATE_DEFAULTS.max_retries
    fail_fraction: float = 0.0                  # share of devices whose updates fail
    fail_mode: str = "rolled_back"              # rolled_back (at activation) | failed
    message_jitter_ms: float = 0.0              # random delay of every publish
    requests_per_s: float = 5.0                 # simulated inference load per device
    error_rate: float = 0.001
    hb_log_depth: int = 20
    seed: int = 1

    def __post_init__(self) -> None:
        if self.fail_mode not in ("rolled_back", "failed"):
            raise ValueError("fail_mode must be rolled_back or failed")
        if self.heartbeat_s <= 0 or self.metrics_s <= 0:
            raise ValueError("heartbeat_s and metrics_s must be positive")

    def device_id(self, i: int) -> str:
        """Id of the ``i``-th device (0-based)."""
        return f"{self.id_prefix}{self.first_index + i:0{self.id_width}d}"


# ---- instrumentation ----------------------------------------------------------------------
class HeartbeatLog:
    """Send time (epoch ms, = ``Heartbeat.sent_at_ms``) of the last ``depth`` heartbeats of
    every device, by seq: two small int arrays per device."""

    def __init__(self, depth: int = 20) -> None:
        self.depth = depth
        self._seq: dict[str, array[int]] = {}
        self._ms: dict[str, array[int]] = {}
        self.total = 0

    def record(self, device_id: str, seq: int, sent_ms: int) -> None:
        seqs = self._seq.get(device_id)
        if seqs is None:
            seqs = self._seq[device_id] = array("q", bytes(8 * self.depth))
            self._ms[device_id] = array("q", bytes(8 * self.depth))
        i = seq % self.depth
        seqs[i] = seq
        self._ms[device_id][i] = sent_ms
        self.total += 1

    def sent_ms(self, device_id: str, seq: int) -> int | None:
        """When heartbeat ``seq`` of ``device_id`` was sent; None when unknown or pruned."""
        seqs = self._seq.get(device_id)
        if seqs is None or seq <= 0 or seqs[seq % self.depth] != seq:
            return None
        return self._ms[device_id][seq % self.depth]

    def recent(self, device_id: str) -> dict[int, int]:
        """{seq: sent_ms} of the heartbeats still kept for ``device_id``."""
        seqs = self._seq.get(device_id)
        if seqs is None:
            return {}
        ms = self._ms[device_id]
        return dict(sorted((s, ms[i]) for i, s in enumerate(seqs) if s))

    def last_seq(self, device_id: str) -> int:
        seqs = self._seq.get(device_id)
        return max(seqs) if seqs is not None else 0

    def devices(self) -> Iterator[str]:
        return iter(self._seq)


@dataclass
class UpdateTiming:
    """One update on one device, from the offer received to its final state."""

    device_id: str
    update_id: str
    model: str
    version: int
    codec: str
    payload_bytes: int
    offer_ms: int
    done_ms: int
    state: str                 # committed | failed | rolled_back

    @property
    def seconds(self) -> float:
        return (self.done_ms - self.offer_ms) / 1000.0


@dataclass
class FleetStats:
    """Counters of the whole fleet (live; read any time)."""

    sent: Counter[str] = field(default_factory=Counter)      # by kind
    received: Counter[str] = field(default_factory=Counter)  # by kind
    sent_bytes: int = 0
    connects: int = 0
    connect_failures: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    connect_seconds_total: float = 0.0   # TCP connect to CONNACK, successful connects
    connect_seconds_max: float = 0.0
    lost: int = 0                  # unexpected connection losses
    drops: int = 0                 # abrupt closes by drop()/reconnect(abrupt=True)
    puback_failures: int = 0       # QoS 1 publishes refused (PUBACK reason >= 0x80)
    denials: Counter[str] = field(default_factory=Counter)   # "kind: reason" -> count
    subscribe_failures: int = 0
    offers: int = 0                # offer messages with a payload
    offers_redelivered: int = 0
    offers_cleared: int = 0        # empty retained offers
    offers_rejected: int = 0
    reject_reasons: Counter[str] = field(default_factory=Counter)
    chunks_received: int = 0
    chunk_bytes: int = 0
    chunks_duplicate: int = 0
    chunks_unknown: int = 0
    stall_rerequests: int = 0
    updates_started: int = 0
    updates_committed: int = 0
    updates_failed: int = 0
    updates_rolled_back: int = 0
    update_timings: list[UpdateTiming] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k == "update_timings":
                out[k] = [t.__dict__ for t in v]
            elif isinstance(v, Counter):
                out[k] = dict(v)
            else:
                out[k] = v
        return out


# ---- one simulated device -----------------------------------------------------------------
IDLE, CONNECTING, ONLINE, DROPPED, STOPPED = "idle", "connecting", "online", "dropped", "stopped"


class _Engine:
    """An engine the device holds (active for its model key, or in the other slot)."""

    __slots__ = ("engine_kind", "engine_version", "name", "precision", "revision", "sha256",
                 "slot", "update_id", "variant", "version")

    def __init__(self, *, name: str, variant: str, version: int, sha256: str, slot: str,
                 revision: int = 0, engine_version: int = 0, update_id: str = "",
                 engine_kind: str = "onnxruntime-cpu", precision: str = "fp32") -> None:
        self.name, self.variant, self.version, self.sha256 = name, variant, version, sha256
        self.slot, self.revision, self.engine_version = slot, revision, engine_version
        self.update_id, self.engine_kind, self.precision = update_id, engine_kind, precision

    def proto(self, *, active: bool) -> device_pb2.ServedModel:
        return device_pb2.ServedModel(
            name=self.name, version=self.version, sha256=self.sha256, slot=self.slot,
            engine_kind=self.engine_kind, precision=self.precision, active=active,
            variant=self.variant, revision=self.revision, engine_version=self.engine_version,
            update_id=self.update_id)


class _Update:
    """One update on one device: the verified manifest, its state and its chunk transfer."""

    __slots__ = ("action", "bytes_received", "envelope", "have", "hasher", "key", "low",
                 "manifest", "n", "next_hash", "offer_ms", "outstanding", "pending", "probe",
                 "reason", "requested_on", "shadow", "stalls", "state", "last_progress")

    def __init__(self, manifest: update_pb2.UpdateManifest, key: str) -> None:
        self.manifest = manifest
        self.key = key
        self.state: common_pb2.UpdateState = S.UPDATE_STATE_IDLE
        self.reason = ""
        self.action: common_pb2.ErrorAction = common_pb2.ERROR_ACTION_UNSPECIFIED
        self.bytes_received = 0
        self.offer_ms = now_ms()
        self.n = len(manifest.chunk_sha256)
        self.have = bytearray(self.n)        # 1 per chunk received
        self.low = 0                         # lowest index maybe missing
        self.outstanding: set[int] = set()
        self.next_hash = 0                   # chunks before this index are hashed
        self.pending: dict[int, bytes] = {}  # received out of order, not yet hashed
        self.hasher = hashlib.sha256()
        self.last_progress = time.monotonic()
        self.stalls = 0
        self.requested_on = 0
        self.probe: update_pb2.ProbeReport | None = None
        self.shadow: update_pb2.ShadowReport | None = None
        self.envelope = b""

    @property
    def pair(self) -> tuple[int, int]:
        return (self.manifest.version, self.manifest.revision)

    def chunk_length(self, index: int) -> int:
        m = self.manifest
        return max(0, min(m.chunk_size, m.payload_size - index * m.chunk_size))

    def missing(self, limit: int) -> list[int]:
        """Up to ``limit`` missing indices not yet asked for, lowest first."""
        have, n = self.have, self.n
        out: list[int] = []
        while self.low < n and have[self.low]:
            self.low += 1
        i = self.low
        while i < n and len(out) < limit:
            if not have[i] and i not in self.outstanding:
                out.append(i)
            i += 1
        return out

    @property
    def complete(self) -> bool:
        return self.next_hash == self.n


class _UnverifiedTrust(TrustState):
    """Trust without a pinned root: envelopes are decoded, their signatures not checked."""

    def verify(self, env: update_pb2.SignedEnvelope, message_type: type[envelope.M], *,
               at_ms: int | None = None) -> envelope.M:
        expected = message_type.DESCRIPTOR.full_name
        if env.payload_type != expected:
            raise Rejected(f"envelope carries {env.payload_type!r}, expected {expected!r}",
                           reason="wrong_type")
        msg = message_type()
        try:
            msg.ParseFromString(env.payload)
        except Exception as e:
            raise Rejected(f"malformed {expected}: {e}", reason="malformed") from e
        return msg


_NO_TRUST = _UnverifiedTrust(root_public=b"")


class SimDevice:
    """One simulated agent on its own MQTT connection (see the module docstring)."""

    __slots__ = (
        "_attempt", "_hb_static", "_hb_timer", "_jitter_at", "_m_last", "_m_timer", "_parked",
        "_reconnect_timer", "_t_chunk", "_t_desired", "_t_offer", "_t_offer_sub", "active",
        "conn", "connections", "desired_generation", "device_id", "done_ids", "failing",
        "fleet", "hb_seq", "highest", "index", "labels", "lost_in_row", "metrics_seq",
        "hb_silenced", "metrics_silenced", "other", "rejected", "restarts", "started",
        "state", "stats",
        "t_hb", "t_metrics", "t_presence", "t_request", "t_status", "trust", "updates",
    )

    def __init__(self, fleet: Fleet, index: int) -> None:
        cfg = fleet.config
        self.fleet = fleet
        self.index = index
        dev = self.device_id = cfg.device_id(index)
        if not topics.valid_device_id(dev):
            raise ValueError(f"invalid simulated device id {dev!r}")
        self.labels = dict(cfg.labels)
        if cfg.labels_fn is not None:
            self.labels.update(cfg.labels_fn(index))
        self.state = IDLE
        self.conn: MqttConnection | None = None
        self._attempt = 0                        # connect attempts (a late one is dropped)
        self.connections = 0
        self.lost_in_row = 0
        self.hb_silenced = False
        self.metrics_silenced = False
        self.failing = False
        self.started = time.monotonic()
        self.restarts = 1
        self.hb_seq = 0
        self.metrics_seq = 0
        self.desired_generation = 0
        self.trust: TrustState | None = None
        self._parked: list[bytes] = []          # offers that arrived before any key list
        self.active: dict[str, _Engine] = {}
        self.other: dict[str, _Engine] = {}
        self.highest: dict[str, tuple[int, int]] = {}
        for m in cfg.models:
            key = model_key(m.name, m.variant)
            self.active[key] = _Engine(
                name=m.name, variant=m.variant, version=m.version, sha256=m.sha256, slot="a",
                revision=m.revision, engine_version=m.engine_version, update_id=m.update_id,
                engine_kind=m.engine_kind, precision=m.precision)
            self.highest[key] = (m.version, m.revision)
        self.updates: dict[str, _Update] = {}    # model key -> current (or last) update
        self.done_ids: dict[str, list[str]] = {}
        self.rejected: dict[str, device_pb2.UpdateProgress] = {}
        # (name, version) -> [requests, errors, sum_ms, counts...]
        self.stats: dict[tuple[str, int], list[float]] = {}
        self._hb_static: bytes | None = None
        self._hb_timer: asyncio.TimerHandle | None = None
        self._m_timer: asyncio.TimerHandle | None = None
        self._reconnect_timer: asyncio.TimerHandle | None = None
        self._m_last = time.time()
        self._jitter_at = 0.0
        t = topics.device_topic
        self.t_hb = encode_string(t(dev, topics.HEARTBEAT))
        self.t_metrics = encode_string(t(dev, topics.METRICS))
        self.t_presence = t(dev, topics.PRESENCE)
        self.t_status = encode_string(t(dev, topics.UPDATE_STATUS))
        self.t_request = encode_string(t(dev, topics.CHUNK_REQUEST))
        self._t_offer = t(dev, topics.OFFER)
        self._t_offer_sub = t(dev, topics.OFFERS)
        self._t_chunk = t(dev, topics.CHUNK)
        self._t_desired = t(dev, topics.DESIRED)

    # -- connection ---------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self.state == ONLINE and self.conn is not None and self.conn.connected

    def _presence(self, online: bool, reason: str) -> bytes:
        return device_pb2.Presence(device_id=self.device_id, online=online, reason=reason,
                                   at_ms=now_ms()).SerializeToString()

    async def connect(self) -> None:
        """Connect and do what the agent does on every connect; raises on failure."""
        f = self.fleet
        cfg = f.config
        self.state = CONNECTING
        self._attempt += 1
        attempt = self._attempt
        t0 = time.monotonic()
        conn = MqttConnection(self.device_id, keepalive_s=cfg.keepalive_s,
                              on_message=self._on_message, on_publish_failed=self._on_refused,
                              on_close=self._on_close)
        will = Will(self.t_presence, self._presence(False, "lwt"), qos=1, retain=True)
        try:
            await conn.connect(cfg.host, cfg.port, will=will, clean_start=True,
                               session_expiry_s=0, timeout_s=cfg.connect_timeout_s)
        except BaseException:
            if self.state == CONNECTING and attempt == self._attempt:
                self.state = IDLE
            raise
        if self.state != CONNECTING or attempt != self._attempt:   # dropped/stopped meanwhile
            conn.abort()
            return
        self.conn = conn
        self.state = ONLINE
        self.connections += 1
        self.lost_in_row = 0
        took = time.monotonic() - t0
        f.stats.connects += 1
        f.stats.connect_seconds_total += took
        f.stats.connect_seconds_max = max(f.stats.connect_seconds_max, took)
        self._pub("presence", encode_string(self.t_presence), self._presence(True, "connect"),
                  qos=1, retain=True)
        subs = conn.subscribe_nowait([
            (topics.TRUST_KEYS, 1), (self._t_offer, 1), (self._t_offer_sub, 1),
            (self._t_chunk, 1), (self._t_desired, 1)])
        subs.add_done_callback(self._on_suback)
        self.send_heartbeat()                                   # Agent._on_connected
        loop = f.loop
        self._hb_timer = loop.call_later(f.rng.random() * cfg.heartbeat_s, self._hb_tick)
        self._m_timer = loop.call_later(f.rng.random() * cfg.metrics_s, self._metrics_tick)
        for u in list(self.updates.values()):                   # UpdateManager._on_connected
            self._send_status(u)
            if u.state == S.UPDATE_STATE_DOWNLOADING and u.requested_on != self.connections:
                self._restart_requests(u)

    def _on_suback(self, fut: asyncio.Future[list[int]]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        bad = [rc for rc in fut.result() if rc >= 0x80]
        if bad:
            self.fleet.stats.subscribe_failures += len(bad)
            log.warning("device %s: subscriptions refused: %s", self.device_id,
                        ", ".join(reason_name(rc) for rc in bad))

    def _on_refused(self, topic: str, rc: int) -> None:
        st = self.fleet.stats
        st.puback_failures += 1
        st.denials[f"{topic.rsplit('/', 1)[-1]}: {reason_name(rc)}"] += 1

    def _on_close(self, conn: MqttConnection, exc: Exception | None) -> None:
        if conn is not self.conn:
            return
        self._stop_timers()
        self.conn = None
        if self.state != ONLINE:     # dropped / stopped / reconnecting on purpose
            return
        self.state = IDLE
        f = self.fleet
        f.stats.lost += 1
        if f.config.auto_reconnect and f.running:
            self.lost_in_row += 1
            cfg = f.config
            delay = min(cfg.reconnect_max_s, cfg.reconnect_min_s * 2 ** (self.lost_in_row - 1))
            self._schedule_reconnect(delay * (0.5 + f.rng.random()))

    def _schedule_reconnect(self, delay: float) -> None:
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
        self._reconnect_timer = self.fleet.loop.call_later(
            delay, lambda: self.fleet.spawn(self._reconnect_once()))

    async def _reconnect_once(self) -> None:
        self._reconnect_timer = None
        f = self.fleet
        if not f.running or self.state not in (IDLE,):
            return
        try:
            await self.connect()
        except Exception as e:
            f.note_connect_failure(e)
            self.lost_in_row += 1
            cfg = f.config
            delay = min(cfg.reconnect_max_s, cfg.reconnect_min_s * 2 ** (self.lost_in_row - 1))
            self._schedule_reconnect(delay * (0.5 + f.rng.random()))

    def _stop_timers(self) -> None:
        for h in (self._hb_timer, self._m_timer):
            if h is not None:
                h.cancel()
        self._hb_timer = self._m_timer = None

    def drop(self) -> None:
        """Abrupt close (no DISCONNECT): the broker publishes the will."""
        self.state = DROPPED
        self._stop_timers()
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
            self._reconnect_timer = None
        if self.conn is not None:
            self.conn.abort()
            self.conn = None

    def shutdown(self) -> MqttConnection | None:
        """The agent's stop: retained Presence offline ("shutdown"), normal DISCONNECT."""
        self._stop_timers()
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
            self._reconnect_timer = None
        conn = self.conn
        was = self.online
        self.state = STOPPED
        self.conn = None
        if conn is not None and was:
            conn.publish(encode_string(self.t_presence), self._presence(False, "shutdown"),
                         qos=1, retain=True)
            self.fleet.stats.sent["presence"] += 1
            conn.disconnect()
        elif conn is not None:
            conn.abort()
        return conn

    # -- publishing ---------------------------------------------------------------------------
    def _pub(self, kind: str, topic: bytes, payload: bytes, *, qos: int,
             retain: bool = False) -> bool:
        conn = self.conn
        if conn is None or not conn.connected:
            return False
        f = self.fleet
        j = f.jitter_s
        if j:
            loop = f.loop
            at = max(loop.time() + f.rng.random() * j, self._jitter_at)   # order kept
            self._jitter_at = at
            loop.call_at(at, self._pub_now, conn, kind, topic, payload, qos, retain)
            return True
        return self._pub_now(conn, kind, topic, payload, qos, retain)

    def _pub_now(self, conn: MqttConnection, kind: str, topic: bytes, payload: bytes,
                 qos: int, retain: bool) -> bool:
        if not conn.publish(topic, payload, qos=qos, retain=retain):
            return False
        st = self.fleet.stats
        st.sent[kind] += 1
        st.sent_bytes += len(payload)
        return True

    # -- heartbeats ---------------------------------------------------------------------------
    def _hb_tick(self) -> None:
        f = self.fleet
        cfg = f.config
        if self.state != ONLINE:
            return
        period = cfg.heartbeat_s * (1.0 + cfg.interval_jitter * (2 * f.rng.random() - 1))
        self._hb_timer = f.loop.call_later(period, self._hb_tick)
        if not self.hb_silenced:
            if f.jitter_s:
                f.loop.call_later(f.rng.random() * f.jitter_s, self.send_heartbeat)
            else:
                self.send_heartbeat()

    def _static_heartbeat(self) -> bytes:
        """Everything of the Heartbeat but uptime_s, sent_at_ms and seq, serialized."""
        f = self.fleet
        hb = device_pb2.Heartbeat(
            device_id=self.device_id, device_class=f.config.device_class,
            agent_version=f.agent_version, health="ok", serve_url="",
            desired_generation=self.desired_generation, restarts=self.restarts)
        if _HB_HAS_INTERVAL:
            hb.heartbeat_interval_ms = int(f.config.heartbeat_s * 1000)
        hb.facts.CopyFrom(f.facts)
        hb.labels.update(self.labels)
        for e in self.active.values():
            hb.models.append(e.proto(active=True))
        for key, e in self.active.items():       # SlotStore.installed(): committed + other
            hb.slots.append(e.proto(active=True))
            o = self.other.get(key)
            if o is not None:
                hb.slots.append(o.proto(active=False))
        for u in self.updates.values():
            hb.updates.append(self._progress(u))
        hb.updates.extend(list(self.rejected.values())[-4:])
        return hb.SerializeToString()

    def send_heartbeat(self) -> bool:
        """Publish one heartbeat (QoS 0) and record its seq and send time."""
        if not self.online:
            return False
        static = self._hb_static
        if static is None:
            static = self._hb_static = self._static_heartbeat()
        self.hb_seq += 1
        seq = self.hb_seq
        sent = now_ms()
        payload = b"".join((static, _TAG_UPTIME, _varint(int(time.monotonic() - self.started)),
                            _TAG_SENT, _varint(sent), _TAG_SEQ, _varint(seq)))
        assert self.conn is not None
        if not self._pub_now(self.conn, "heartbeat", self.t_hb, payload, 0, False):
            return False
        f = self.fleet
        f.heartbeats.record(self.device_id, seq, sent)
        if f.on_heartbeat is not None:
            f.on_heartbeat(self.device_id, seq, sent)
        return True

    def _changed(self) -> None:
        self._hb_static = None

    # -- metrics ------------------------------------------------------------------------------
    def _metrics_tick(self) -> None:
        f = self.fleet
        cfg = f.config
        if self.state != ONLINE:
            return
        period = cfg.metrics_s * (1.0 + cfg.interval_jitter * (2 * f.rng.random() - 1))
        self._m_timer = f.loop.call_later(period, self._metrics_tick)
        if not self.metrics_silenced:
            self.send_metrics()

    def _simulate_traffic(self, seconds: float) -> None:
        f = self.fleet
        rng = f.rng
        for e in self.active.values():
            k = (e.name, e.version)
            st = self.stats.get(k)
            if st is None:
                st = self.stats[k] = [0.0, 0.0, 0.0] + [0.0] * len(LATENCY_SHARES)
                while len(self.stats) > MAX_STAT_VERSIONS:
                    self.stats.pop(next(iter(self.stats)))
            n = int(f.config.requests_per_s * seconds + rng.random())
            if n <= 0:
                continue
            errors = min(n, int(n * f.config.error_rate + rng.random()))
            st[0] += n
            st[1] += errors
            left = n
            for i, share in enumerate(LATENCY_SHARES):   # stochastic rounding per bucket
                if share and i != _MODE_BUCKET and left:
                    c = min(left, int(n * share + rng.random()))
                    st[3 + i] += c
                    st[2] += c * LATENCY_MIDS_MS[i]
                    left -= c
            st[3 + _MODE_BUCKET] += left
            st[2] += left * LATENCY_MIDS_MS[_MODE_BUCKET]

    def send_metrics(self) -> bool:
        """Publish one Metrics message (QoS 1) with cumulative per-model counters."""
        if not self.online:
            return False
        t = time.time()
        self._simulate_traffic(max(0.0, t - self._m_last))
        self._m_last = t
        self.metrics_seq += 1
        msg = device_pb2.Metrics(device_id=self.device_id, at_ms=int(t * 1000),
                                 seq=self.metrics_seq)
        for (name, version), st in self.stats.items():
            mm = msg.models.add(name=name, version=version, requests=int(st[0]),
                                errors=int(st[1]), queue_depth=0)
            mm.latency.bounds_ms.extend(LATENCY_BOUNDS_MS)
            mm.latency.counts.extend(int(c) for c in st[3:])
            mm.latency.sum_ms = st[2]
        rng = self.fleet.rng
        msg.host.cpu_percent = round(5.0 + 20.0 * rng.random(), 1)
        msg.host.agent_rss_bytes = 90_000_000 + int(rng.random() * 4_000_000)
        msg.host.memory_available_bytes = 2_500_000_000
        return self._pub("metrics", self.t_metrics, msg.SerializeToString(), qos=1)

    # -- incoming -----------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        st = self.fleet.stats
        if topic == self._t_chunk:
            st.received["chunk"] += 1
            self._handle_chunk(payload)
        elif topic == self._t_offer or topic.startswith(self._t_offer_sub[:-1]):
            st.received["offer"] += 1
            self._handle_offer(payload)
        elif topic == topics.TRUST_KEYS:
            st.received["keys"] += 1
            self._handle_keys(payload)
        elif topic == self._t_desired:
            st.received["desired"] += 1
            self._handle_desired(payload)
        else:
            st.received["other"] += 1

    def _handle_keys(self, payload: bytes) -> None:
        if not payload or self.fleet.config.root_public_key is None:
            return
        try:
            ts = self.fleet.trust_for(payload)
        except Rejected as e:
            log.warning("device %s: key list ignored: %s (%s)", self.device_id, e, e.reason)
            return
        if self.trust is None or ts.key_list.version > self.trust.key_list.version:
            self.trust = ts
        parked, self._parked = self._parked, []
        for data in parked:
            self._handle_offer(data)

    def _handle_desired(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            env = envelope.parse_envelope(payload, max_bytes=_LIMITS.max_envelope_bytes)
            trust = self._trust()
            if trust is None:
                return
            ds = trust.verify(env, update_pb2.DesiredState)
        except Rejected as e:
            log.warning("device %s: desired state ignored: %s", self.device_id, e)
            return
        if ds.device_id == self.device_id and ds.generation > self.desired_generation:
            self.desired_generation = int(ds.generation)
            self._changed()

    def _trust(self) -> TrustState | None:
        """What verifies envelopes: the key list (None before one arrived), or nothing."""
        if self.fleet.config.root_public_key is None:
            return _NO_TRUST
        return self.trust

    # -- offers -------------------------------------------------------------------------------
    def _handle_offer(self, data: bytes) -> None:
        st = self.fleet.stats
        if not data:
            st.offers_cleared += 1
            return
        st.offers += 1
        try:
            env = envelope.parse_envelope(data, max_bytes=_LIMITS.max_envelope_bytes)
        except Rejected as e:
            st.offers_rejected += 1
            st.reject_reasons[e.reason] += 1
            return
        peek = update_pb2.UpdateManifest()
        try:
            peek.ParseFromString(env.payload)
        except Exception:
            peek.Clear()
        if peek.update_id:
            key = model_key(peek.model_name, peek.variant)
            cur = self.updates.get(key)
            if (peek.update_id in self.done_ids.get(key, ()) or
                    (cur is not None and cur.manifest.update_id == peek.update_id) or
                    peek.update_id in self.rejected):
                st.offers_redelivered += 1
                return
        trust = self._trust()
        if trust is None:           # no key list yet (it is retained: it will come)
            self._parked = (self._parked + [data])[-8:]
            return
        try:
            vu = verify_offer(data, trust=trust, device_id=self.device_id,
                              device_class=self.fleet.config.device_class,
                              highest_committed=lambda k: self.highest.get(k, (0, 0)),
                              limits=_LIMITS, has_base=self._has_base, now_ms=now_ms())
        except Rejected as e:
            self._reject_offer(peek, e)
            return
        m = vu.manifest
        key = vu.model_key
        cur = self.updates.get(key)
        if cur is not None and cur.state not in TERMINAL_STATES:
            if (m.version, m.revision) <= cur.pair:
                self._reject_offer(peek, Rejected(
                    f"(version, revision) ({m.version}, {m.revision}) is not newer than "
                    f"({cur.manifest.version}, {cur.manifest.revision}) of update "
                    f"{cur.manifest.update_id} in progress", reason="rollback"))
                return
            self._finish(cur, S.UPDATE_STATE_FAILED, GiveUp(
                f"superseded by {m.update_id} (v{m.version} revision {m.revision})",
                reason="superseded"))
        self._start_update(m, key)

    def _has_base(self, key: str, sha256: str) -> bool:
        return any(e is not None and e.sha256 == sha256
                   for e in (self.active.get(key), self.other.get(key)))

    def _reject_offer(self, peek: update_pb2.UpdateManifest, e: EdgefleetError) -> None:
        st = self.fleet.stats
        st.offers_rejected += 1
        st.reject_reasons[e.reason] += 1
        log.info("device %s: rejected offer %s: %s (%s)", self.device_id,
                 peek.update_id or "?", e, e.reason)
        status = update_pb2.UpdateStatus(
            device_id=self.device_id, update_id=peek.update_id, model_name=peek.model_name,
            version=peek.version, state=S.UPDATE_STATE_FAILED, reason=f"{e.reason}: {e}",
            action=ACTION_PROTO[e.action.value], at_ms=now_ms(),
            target_sha256=peek.target_sha256, revision=peek.revision, variant=peek.variant)
        self._pub("status", self.t_status, status.SerializeToString(), qos=1)
        if peek.update_id:
            self.rejected[peek.update_id] = device_pb2.UpdateProgress(
                update_id=status.update_id, model_name=status.model_name,
                version=status.version, state=status.state, reason=status.reason,
                revision=status.revision, variant=status.variant,
                target_sha256=status.target_sha256)
            while len(self.rejected) > 64:
                self.rejected.pop(next(iter(self.rejected)))
            self._changed()

    def _start_update(self, m: update_pb2.UpdateManifest, key: str) -> None:
        u = _Update(m, key)
        self.updates[key] = u
        self.fleet.stats.updates_started += 1
        self._transition(u, S.UPDATE_STATE_RECEIVED)
        if m.codec == SLOT_CODEC:
            # verify_offer checked that the target is in a slot of this key
            self._transition(u, S.UPDATE_STATE_STAGED)
            self._activate(u)
            return
        self._transition(u, S.UPDATE_STATE_DOWNLOADING)
        self.fleet.downloading.add(self)
        self._restart_requests(u)

    # -- chunk transfer (agent.update.download.Transfer) --------------------------------------
    def _request_more(self, u: _Update) -> None:
        room = self.fleet.config.request_window - len(u.outstanding)
        if room <= 0:
            return
        want = u.missing(room)
        if not want:
            return
        req = update_pb2.ChunkRequest(device_id=self.device_id,
                                      update_id=u.manifest.update_id, indices=want)
        if self._pub("chunk_request", self.t_request, req.SerializeToString(), qos=1):
            u.outstanding.update(want)

    def _restart_requests(self, u: _Update) -> None:
        u.outstanding.clear()
        u.last_progress = time.monotonic()
        u.requested_on = self.connections if self.online else 0
        if u.requested_on:
            self._request_more(u)

    def _downloads(self) -> Iterator[_Update]:
        return (u for u in self.updates.values() if u.state == S.UPDATE_STATE_DOWNLOADING)

    def check_stalls(self, now: float) -> bool:
        """Re-ask stalled transfers (FAILED after ``max_stalls``); False when none is left."""
        left = False
        if not self.online:
            return any(True for _ in self._downloads())
        cfg = self.fleet.config
        for u in list(self._downloads()):
            # the agent backs off: the timeout doubles per stall in a row, up to 4x
            timeout = cfg.stall_timeout_s * min(2 ** u.stalls, MAX_STALL_BACKOFF)
            if now - u.last_progress <= timeout:
                left = True
                continue
            u.stalls += 1
            if u.stalls > cfg.max_stalls:
                self._finish(u, S.UPDATE_STATE_FAILED, Rejected(
                    f"transfer stalled {u.stalls} times in a row (from {cfg.stall_timeout_s}s "
                    f"to {timeout:g}s each without a chunk); slow retrieval", reason="stalled"))
                continue
            self.fleet.stats.stall_rerequests += 1
            self._restart_requests(u)
            left = True
        return left

    def _handle_chunk(self, data: bytes) -> None:
        st = self.fleet.stats
        if len(data) > _LIMITS.max_chunk_bytes + 1024:
            return
        ch = update_pb2.UpdateChunk()
        try:
            ch.ParseFromString(data)
        except Exception:
            return
        u = next((x for x in self._downloads() if x.manifest.update_id == ch.update_id), None)
        if u is None:
            st.chunks_unknown += 1
            return
        i = ch.index
        try:
            if not 0 <= i < u.n:
                raise Rejected(f"chunk index {i} outside 0..{u.n - 1}", reason="bad_chunk")
            if u.have[i]:
                st.chunks_duplicate += 1
                u.outstanding.discard(i)
                return
            chunk = ch.data
            if len(chunk) != u.chunk_length(i):
                raise Rejected(f"chunk {i} has {len(chunk)} bytes, manifest says "
                               f"{u.chunk_length(i)}", reason="chunk_hash_mismatch")
            if hashlib.sha256(chunk).digest() != u.manifest.chunk_sha256[i]:
                raise Rejected(f"chunk {i} sha256 does not match the signed manifest",
                               reason="chunk_hash_mismatch")
        except Rejected as e:
            self._finish(u, S.UPDATE_STATE_FAILED, e)
            return
        st.chunks_received += 1
        st.chunk_bytes += len(chunk)
        u.have[i] = 1
        u.bytes_received += len(chunk)
        u.outstanding.discard(i)
        u.last_progress = time.monotonic()
        u.stalls = 0                            # progress: stalls count only in a row
        self._changed()                         # heartbeat progress (bytes_received)
        if i == u.next_hash:                    # hash the payload in order as it arrives
            u.hasher.update(chunk)
            u.next_hash += 1
            while u.next_hash in u.pending:
                u.hasher.update(u.pending.pop(u.next_hash))
                u.next_hash += 1
        else:
            u.pending[i] = chunk
        if u.complete:
            self._download_done(u)
        elif len(u.outstanding) <= self.fleet.config.request_window // 2:
            self._request_more(u)

    def _download_done(self, u: _Update) -> None:
        m = u.manifest
        self._transition(u, S.UPDATE_STATE_VERIFYING)
        if u.bytes_received != m.payload_size or u.hasher.hexdigest() != m.payload_sha256:
            self._finish(u, S.UPDATE_STATE_FAILED, Rejected(
                "payload sha256 does not match the manifest", reason="payload_hash_mismatch"))
            return
        if self.failing and self.fleet.config.fail_mode == "failed":
            self._finish(u, S.UPDATE_STATE_FAILED, GiveUp(
                "injected failure (fleet_sim) before staging", reason="patch_failed"))
            return
        self._transition(u, S.UPDATE_STATE_PATCHING)    # "applying" = the hash check above
        self._transition(u, S.UPDATE_STATE_STAGED)
        self._activate(u)

    def _activate(self, u: _Update) -> None:
        m = u.manifest
        if m.HasField("shadow"):
            sh = m.shadow
            u.shadow = update_pb2.ShadowReport(samples=max(sh.min_samples, 1), agreement=1.0,
                                               passed=True, detail="simulated", at_ms=now_ms())
        self._transition(u, S.UPDATE_STATE_ACTIVATING)
        if self.failing and self.fleet.config.fail_mode == "rolled_back":
            self._finish(u, S.UPDATE_STATE_ROLLED_BACK, GiveUp(
                "smoke check of the new engine failed (injected by fleet_sim)",
                reason="activation_failed"))
            return
        self._commit(u)

    def _commit(self, u: _Update) -> None:
        m = u.manifest
        key = u.key
        prev = self.active.get(key)
        other = self.other.get(key)
        fp = m.fingerprint
        if m.codec == SLOT_CODEC and other is not None and other.sha256 == m.target_sha256:
            slot = other.slot                     # activate the engine of the other slot
        elif m.codec == SLOT_CODEC and prev is not None:
            slot = prev.slot                      # relabel the active engine
        else:
            slot = "b" if prev is not None and prev.slot == "a" else "a"
        new = _Engine(name=m.model_name, variant=m.variant, version=m.version,
                      sha256=m.target_sha256, slot=slot, revision=m.revision,
                      engine_version=m.engine_version, update_id=m.update_id,
                      engine_kind=fp.engine_kind or (prev.engine_kind if prev else
                                                     "onnxruntime-cpu"),
                      precision=fp.precision or (prev.precision if prev else "fp32"))
        if prev is not None and prev.slot != slot:
            self.other[key] = prev
        self.active[key] = new
        self.highest[key] = max(self.highest.get(key, (0, 0)), u.pair)
        self._transition(u, S.UPDATE_STATE_COMMITTED)
        self._done(u, "committed")
        if m.HasField("probe") and m.probe.samples_npz:
            p = m.probe
            value = 1.0 if p.metric == "top1-agreement" else 0.0
            u.probe = update_pb2.ProbeReport(metric=p.metric, value=value,
                                             threshold=p.threshold, passed=True, samples=1,
                                             detail="simulated", at_ms=now_ms())
            self._send_status(u)

    def _finish(self, u: _Update, state: common_pb2.UpdateState, e: EdgefleetError) -> None:
        if state == S.UPDATE_STATE_ROLLED_BACK and u.state != S.UPDATE_STATE_ACTIVATING:
            state = S.UPDATE_STATE_FAILED       # never activated: nothing to roll back
        self._transition(u, state, reason=f"{e.reason}: {e}", action=ACTION_PROTO[e.action.value])
        self._done(u, "rolled_back" if state == S.UPDATE_STATE_ROLLED_BACK else "failed")

    def _done(self, u: _Update, what: str) -> None:
        m = u.manifest
        ids = self.done_ids.setdefault(u.key, [])
        ids.append(m.update_id)
        del ids[:-MAX_DONE_IDS]
        u.pending.clear()
        u.outstanding.clear()
        st = self.fleet.stats
        if what == "committed":
            st.updates_committed += 1
        elif what == "failed":
            st.updates_failed += 1
        else:
            st.updates_rolled_back += 1
        st.update_timings.append(UpdateTiming(
            device_id=self.device_id, update_id=m.update_id, model=m.model_name,
            version=m.version, codec=m.codec, payload_bytes=m.payload_size,
            offer_ms=u.offer_ms, done_ms=now_ms(), state=what))

    def _transition(self, u: _Update, state: common_pb2.UpdateState, *, reason: str = "",
                    action: common_pb2.ErrorAction = common_pb2.ERROR_ACTION_UNSPECIFIED
                    ) -> None:
        u.state, u.reason, u.action = state, reason, action
        self._changed()
        self._send_status(u)

    def _progress(self, u: _Update) -> device_pb2.UpdateProgress:
        m = u.manifest
        p = device_pb2.UpdateProgress(
            update_id=m.update_id, model_name=m.model_name, version=m.version, state=u.state,
            reason=u.reason, bytes_received=u.bytes_received, bytes_total=m.payload_size,
            revision=m.revision, variant=m.variant, target_sha256=m.target_sha256)
        if u.probe is not None:
            p.probe.CopyFrom(u.probe)
        if u.shadow is not None:
            p.shadow.CopyFrom(u.shadow)
        return p

    def _send_status(self, u: _Update) -> None:
        m = u.manifest
        st = update_pb2.UpdateStatus(
            device_id=self.device_id, update_id=m.update_id, model_name=m.model_name,
            version=m.version, state=u.state, reason=u.reason, action=u.action,
            bytes_received=u.bytes_received, bytes_total=m.payload_size, at_ms=now_ms(),
            target_sha256=m.target_sha256, revision=m.revision, variant=m.variant)
        if u.probe is not None:
            st.probe.CopyFrom(u.probe)
        if u.shadow is not None:
            st.shadow.CopyFrom(u.shadow)
        self._pub("status", self.t_status, st.SerializeToString(), qos=1)

    # -- for tests and benchmarks -------------------------------------------------------------
    def served(self) -> list[device_pb2.ServedModel]:
        """What the heartbeat reports as served (``Heartbeat.models``)."""
        return [e.proto(active=True) for e in self.active.values()]


# ---- the fleet ----------------------------------------------------------------------------
class Fleet:
    """``config.devices`` simulated devices on one event loop (see the module docstring).

    ``Fleet(FleetConfig(...))`` or ``Fleet(port=..., devices=...)`` (FleetConfig fields).
    ``on_heartbeat(device_id, seq, sent_ms)`` is called for every heartbeat sent."""

    def __init__(self, config: FleetConfig | None = None, /, *,
                 on_heartbeat: Callable[[str, int, int], None] | None = None,
                 **overrides: Any) -> None:
        cfg = config or FleetConfig()
        if overrides:
            cfg = replace(cfg, **overrides)
        self.config = cfg
        self.rng = random.Random(cfg.seed)
        self.facts = cfg.facts if cfg.facts is not None else default_facts()
        self.agent_version = AGENT_VERSION
        self.jitter_s = cfg.message_jitter_ms / 1000.0
        self.on_heartbeat = on_heartbeat
        self.stats = FleetStats()
        self.heartbeats = HeartbeatLog(cfg.hb_log_depth)
        self.devices: dict[str, SimDevice] = {}
        for i in range(cfg.devices):
            d = SimDevice(self, i)
            self.devices[d.device_id] = d
        if cfg.fail_fraction > 0:
            pick = random.Random(cfg.seed + 1)
            for d in self.devices.values():
                d.failing = pick.random() < cfg.fail_fraction
        self.downloading: set[SimDevice] = set()
        self.running = False
        self.nofile: tuple[int, int] = (0, 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stall_task: asyncio.Task[None] | None = None
        self._trust_cache: dict[bytes, TrustState | Rejected] = {}
        self.started_at = 0.0

    # -- properties ---------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def ids(self) -> list[str]:
        return list(self.devices)

    def device(self, device_id: str) -> SimDevice:
        return self.devices[device_id]

    def online_ids(self) -> list[str]:
        return [i for i, d in self.devices.items() if d.online]

    @property
    def online_count(self) -> int:
        return sum(1 for d in self.devices.values() if d.online)

    @property
    def update_timings(self) -> list[UpdateTiming]:
        return self.stats.update_timings

    def failing_ids(self) -> list[str]:
        return [i for i, d in self.devices.items() if d.failing]

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Raise the descriptor limit, then connect every device at ``connect_rate`` per
        second; returns when each connected or failed (failures retry in the background
        when ``auto_reconnect``)."""
        self.nofile = raise_nofile_limit(len(self.devices) + 64)
        self._loop = asyncio.get_running_loop()
        self.running = True
        self.started_at = time.monotonic()
        self._stall_task = asyncio.create_task(self._stall_loop())
        await self.connect(self.ids, rate=self.config.connect_rate)

    async def stop(self, *, graceful: bool = True, timeout_s: float = 10.0) -> None:
        """Stop every device: like the agent's stop (offline presence, normal DISCONNECT)
        when ``graceful``, else abrupt closes (wills fire)."""
        self.running = False
        if self._stall_task is not None:
            self._stall_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stall_task
        conns = []
        for d in self.devices.values():
            if graceful:
                c = d.shutdown()
            else:
                c = d.conn
                d.drop()
            if c is not None:
                conns.append(c)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if conns:
            await asyncio.gather(*(c.wait_closed(timeout_s) for c in conns),
                                 return_exceptions=True)

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def note_connect_failure(self, e: BaseException) -> None:
        self.stats.connect_failures += 1
        self.stats.connect_errors[type(e).__name__ + (f": {e}" if str(e) else "")] += 1

    async def connect(self, ids: Iterable[str], *, rate: float | None = None) -> int:
        """Connect devices ``ids`` (those not online), ``rate`` per second (None or 0 = all
        at once, at most ``max_pending_connects`` in progress). Returns how many connected."""
        devs = [self.devices[i] for i in ids]
        devs = [d for d in devs if d.state not in (ONLINE, CONNECTING)]
        sem = asyncio.Semaphore(max(1, self.config.max_pending_connects))
        loop = self.loop
        t0 = loop.time()
        ok = 0

        async def one(d: SimDevice) -> None:
            nonlocal ok
            try:
                await d.connect()
                ok += 1 if d.online else 0
            except Exception as e:
                self.note_connect_failure(e)
                if self.config.auto_reconnect and self.running:
                    d.lost_in_row += 1
                    d._schedule_reconnect(self.config.reconnect_min_s * (0.5 + self.rng.random()))
            finally:
                sem.release()

        tasks = []
        for n, d in enumerate(devs):
            if rate:
                delay = t0 + n / rate - loop.time()
                if delay > 0.002:
                    await asyncio.sleep(delay)
            await sem.acquire()
            tasks.append(self.spawn(one(d)))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return ok

    async def wait_online(self, n: int | None = None, *, timeout_s: float = 60.0) -> int:
        """Wait until ``n`` (default all) devices are online; returns the count online."""
        want = len(self.devices) if n is None else n
        deadline = time.monotonic() + timeout_s
        while (c := self.online_count) < want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return c

    # -- failure injection --------------------------------------------------------------------
    def drop(self, ids: Iterable[str]) -> int:
        """Abrupt close of ``ids`` (the broker publishes their wills); they stay down until
        :meth:`reconnect`."""
        n = 0
        for i in ids:
            d = self.devices[i]
            if d.online:
                n += 1
            d.drop()
        self.stats.drops += n
        return n

    def silence(self, ids: Iterable[str], *, metrics: bool = True) -> None:
        """Stop the heartbeats (and, with ``metrics``, the metrics) of ``ids``; connection
        and keep-alive stay up, so no will fires: a hung agent."""
        for i in ids:
            d = self.devices[i]
            d.hb_silenced = True
            d.metrics_silenced = metrics

    def unsilence(self, ids: Iterable[str]) -> None:
        """Resume heartbeats and metrics of ``ids`` (a heartbeat goes out at once)."""
        for i in ids:
            d = self.devices[i]
            d.hb_silenced = d.metrics_silenced = False
            d.send_heartbeat()

    async def reconnect(self, ids: Iterable[str] | None = None, *, abrupt: bool = True,
                        rate: float | None = None) -> int:
        """Reconnect ``ids`` (default: all) all at once (``rate`` None) or ramped. Devices
        still online are first closed, abruptly (wills fire) or with a normal DISCONNECT.
        Returns how many connected."""
        targets = list(self.devices) if ids is None else list(ids)
        closing = []
        for i in targets:
            d = self.devices[i]
            if d.state in (ONLINE, CONNECTING):
                c = d.conn
                if abrupt:
                    self.stats.drops += 1
                    d.drop()
                else:
                    d.state = DROPPED
                    d._stop_timers()
                    if c is not None:
                        c.disconnect()
                    d.conn = None
                if c is not None:
                    closing.append(c)
            elif d.state == STOPPED:
                continue
            d.state = IDLE
        if closing:
            await asyncio.gather(*(c.wait_closed() for c in closing), return_exceptions=True)
        return await self.connect([i for i in targets if self.devices[i].state == IDLE],
                                  rate=rate)

    def set_failing(self, ids: Iterable[str], failing: bool = True) -> None:
        """Make updates of ``ids`` fail (``config.fail_mode``) or succeed again."""
        for i in ids:
            self.devices[i].failing = failing

    # -- internals ----------------------------------------------------------------------------
    def trust_for(self, key_list_bytes: bytes) -> TrustState:
        """The TrustState of a root-signed key list, verified once for the whole fleet."""
        hit = self._trust_cache.get(key_list_bytes)
        if hit is None:
            root = self.config.root_public_key
            assert root is not None
            ts = TrustState(root_public=root)
            try:
                env = envelope.parse_envelope(key_list_bytes,
                                              max_bytes=_LIMITS.max_envelope_bytes)
                ts.accept_key_list(env)
                hit = ts
            except Rejected as e:
                hit = e
            if len(self._trust_cache) > 16:
                self._trust_cache.clear()
            self._trust_cache[key_list_bytes] = hit
        if isinstance(hit, Rejected):
            raise hit
        return hit

    async def _stall_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.stall_timeout_s / 4))
            now = time.monotonic()
            for d in list(self.downloading):
                if not d.check_stalls(now):
                    self.downloading.discard(d)

    def summary(self) -> dict[str, Any]:
        """The stats as a JSON-able dict, with the online count and the heartbeats logged."""
        out = self.stats.to_dict()
        out["devices"] = len(self.devices)
        out["online"] = self.online_count
        out["heartbeats_logged"] = self.heartbeats.total
        return out


# ---- process measurements -----------------------------------------------------------------
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def proc_rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- CLI ----------------------------------------------------------------------------------
def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mqtt", default="auto",
                   help="broker URL mqtt://host:port, or 'auto' to start a private Mosquitto")
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--heartbeat-s", type=float, default=10.0)
    p.add_argument("--metrics-s", type=float, default=15.0)
    p.add_argument("--duration", type=float, default=120.0, help="seconds after the ramp")
    p.add_argument("--ramp-s", type=float, default=None,
                   help="spread the connects over this many seconds (overrides --connect-rate)")
    p.add_argument("--connect-rate", type=float, default=500.0)
    p.add_argument("--device-class", default="cpu-x86-64")
    p.add_argument("--id-prefix", default="sim-")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--model", action="append", default=[], metavar="NAME:VERSION:SHA256",
                   help="a model every device serves at start")
    p.add_argument("--keepalive-s", type=int, default=30)
    p.add_argument("--root-public-key", default="",
                   help="base64 raw Ed25519 root key: verify offers (else parse only)")
    p.add_argument("--fail-fraction", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0, help="random delay per message")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default="", help="write the summary to this file")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def _mb(n: int) -> float:
    return round(n / 1e6, 1)


async def _run(a: argparse.Namespace) -> dict[str, Any]:
    broker: Any = None
    work: Path | None = None
    if a.mqtt == "auto":
        raise_nofile_limit(a.devices + 64)     # inherited by the broker process
        from tests.helpers.broker import start_mosquitto

        work = Path(tempfile.mkdtemp(prefix="fleet-sim-"))
        broker = start_mosquitto(work, extra_conf="max_connections -1\n")
        host, port = broker.host, broker.port
    else:
        host, port = parse_mqtt_url(a.mqtt)
    rate = a.connect_rate if not a.ramp_s else max(1.0, a.devices / a.ramp_s)
    labels = dict(x.split("=", 1) for x in a.label)
    cfg = FleetConfig(host=host, port=port, devices=a.devices, heartbeat_s=a.heartbeat_s,
                      metrics_s=a.metrics_s, connect_rate=rate, device_class=a.device_class,
                      id_prefix=a.id_prefix, labels=labels, keepalive_s=a.keepalive_s,
                      models=tuple(ServedSpec.parse(m) for m in a.model),
                      root_public_key=base64.b64decode(a.root_public_key)
                      if a.root_public_key else None,
                      fail_fraction=a.fail_fraction, message_jitter_ms=a.jitter_ms,
                      seed=a.seed)
    fleet = Fleet(cfg)
    me = os.getpid()
    t0, c0 = time.monotonic(), proc_cpu_s(me)
    try:
        await fleet.start()
        t_ramp, c_ramp = time.monotonic(), proc_cpu_s(me)
        b_ramp = proc_cpu_s(broker.proc.pid) if broker else 0.0
        sent_ramp = sum(fleet.stats.sent.values())
        print(f"connected {fleet.online_count}/{a.devices} in {t_ramp - t0:.1f}s "
              f"({fleet.stats.connect_failures} connect failures); running {a.duration:.0f}s",
              flush=True)
        await asyncio.sleep(a.duration)
        t1, c1 = time.monotonic(), proc_cpu_s(me)
        b1 = proc_cpu_s(broker.proc.pid) if broker else 0.0
        steady = max(1e-9, t1 - t_ramp)
        out = fleet.summary()
        sent_steady = sum(fleet.stats.sent.values()) - sent_ramp
        out.pop("update_timings")
        out["run"] = {
            "host": host, "port": port, "heartbeat_s": a.heartbeat_s, "metrics_s": a.metrics_s,
            "ramp_s": round(t_ramp - t0, 2), "steady_s": round(steady, 2),
            "nofile": list(fleet.nofile),
            "sim_cpu_percent_ramp": round(100 * (c_ramp - c0) / max(1e-9, t_ramp - t0), 1),
            "sim_cpu_percent_steady": round(100 * (c1 - c_ramp) / steady, 1),
            "sim_rss_mb": _mb(proc_rss_bytes(me)),
            "messages_per_s_steady": round(sent_steady / steady, 1),
            "python": platform.python_version(),
        }
        if broker is not None:
            out["run"]["broker_cpu_percent_steady"] = round(100 * (b1 - b_ramp) / steady, 1)
            out["run"]["broker_rss_mb"] = _mb(proc_rss_bytes(broker.proc.pid))
        return out
    finally:
        await fleet.stop()
        if broker is not None:
            broker.stop()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        out = asyncio.run(_run(a))
    except FleetError as e:
        print(f"fleet_sim: {e}", file=sys.stderr)
        return 2
    r = out["run"]
    print(f"devices {out['devices']}: online {out['online']}, connects {out['connects']}, "
          f"connect failures {out['connect_failures']}, lost {out['lost']}")
    print("sent: " + ", ".join(f"{k} {v}" for k, v in sorted(out["sent"].items())) +
          f" ({r['messages_per_s_steady']}/s steady)")
    print(f"PUBACK refusals {out['puback_failures']}, subscribe refusals "
          f"{out['subscribe_failures']}")
    print(f"simulator: CPU {r['sim_cpu_percent_steady']}% steady "
          f"({r['sim_cpu_percent_ramp']}% during the {r['ramp_s']}s ramp), RSS {r['sim_rss_mb']} MB")
    if "broker_cpu_percent_steady" in r:
        print(f"broker: CPU {r['broker_cpu_percent_steady']}% steady, RSS {r['broker_rss_mb']} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
