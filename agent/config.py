"""Agent configuration: dataclasses loaded from a YAML file, with documented defaults.

Used by :mod:`agent.cli` (``edgefleet-agent run --config FILE``) and :class:`agent.app.Agent`.
Every limit on untrusted bytes carries its unit in the name (``max_update_bytes``). The
annotated example is ``docs/agent-config.example.yaml``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protos import topics

MQTT_PROTOCOLS = ("5", "3.1.1")

#: model names as in update manifests (``agent.update.verify.NAME_RE``)
MODEL_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")

#: ``serve.batching.MODEL`` keys and their defaults (``agent.runtime.batching.BatchingConfig``)
BATCHING_DEFAULTS: dict[str, int | float] = {
    "max_batch_size": 16,          # most rows per inference; 1 = batching off for this model
    "max_queue_delay_ms": 2.0,     # how long a batch may wait for requests on their way
    "max_concurrent_batches": 1,   # inferences of this model running at once
}


class ConfigError(ValueError):
    """The configuration file is missing, malformed or has an invalid value."""


@dataclass
class TlsConfig:
    """MQTT over TLS with a per-device X.509 certificate (all paths optional)."""

    ca: str = ""       # CA bundle that signed the broker certificate ("" = no TLS)
    cert: str = ""     # device certificate (PEM)
    key: str = ""      # device private key (PEM)


@dataclass
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 30
    tls: TlsConfig = field(default_factory=TlsConfig)
    username: str = ""
    password: str = ""
    reconnect_min_s: float = 0.5      # first reconnect delay; doubles up to reconnect_max_s
    reconnect_max_s: float = 30.0
    session_expiry_s: int = 3600      # MQTT 5 session expiry (queued QoS 1 chunks survive)
    # "5" (default) or "3.1.1" (only for brokers without MQTT 5, e.g. the embedded amqtt
    # fallback: ACL denials are then invisible and session expiry is unavailable)
    protocol: str = "5"


@dataclass
class TrustConfig:
    root_public_key: str = ""   # base64 of the raw 32-byte Ed25519 root public key (pinned)
    key_list_path: str = ""     # where the newest accepted KeyList is kept ("" = data_dir/trust/keys.pb)

    def root_raw(self) -> bytes:
        try:
            raw = base64.b64decode(self.root_public_key, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ConfigError(f"trust.root_public_key is not base64: {e}") from e
        if len(raw) != 32:
            raise ConfigError(f"trust.root_public_key must be 32 raw bytes, got {len(raw)}")
        return raw


@dataclass
class ServeConfig:
    enabled: bool = True
    host: str = "127.0.0.1"     # local inference API; loopback only by default
    port: int = 8080            # 0 = pick a free port
    # dynamic batching per model name: {MODEL: {max_batch_size, max_queue_delay_ms,
    # max_concurrent_batches}} (missing keys take BATCHING_DEFAULTS); {} = off everywhere.
    # Normalised by AgentConfig.validate to complete mappings.
    batching: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LimitsConfig:
    max_update_bytes: int = 512 * 1024 * 1024   # declared target or payload size of one update
    max_chunk_bytes: int = 256 * 1024           # one UpdateChunk's data (manifest chunk_size)
    max_envelope_bytes: int = 4 * 1024 * 1024   # one signed envelope (offer, key list, desired)
    max_chunks: int = 65536                     # chunk count of one update


@dataclass
class UpdateConfig:
    stall_timeout_s: float = 30.0       # no chunk for this long -> re-request (a retry)
    max_retries: int = 5                # stalls in a row before the update fails (slow retrieval)
    request_window_chunks: int = 16     # chunks asked for at once (ChunkRequest window)
    activation_attempts: int = 2        # agent restarts during activation before rolling back
    integrity_check_s: float = 300.0    # re-hash the active engine files this often (0 = off)
    stable_after_s: float = 120.0       # a newly committed engine that served this long is
                                        # no longer watched for crash loops
    crash_loop_restarts: int = 3        # agent restarts with a new engine that never became
                                        # stable; the next start falls back to the previous slot


@dataclass
class AgentConfig:
    device_id: str
    device_class: str
    data_dir: str = "/var/lib/edgefleet-agent"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    heartbeat_interval_s: float = 10.0
    metrics_interval_s: float = 15.0
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    labels: dict[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    # thermal policy thresholds (agent.telemetry.thermal.ThermalConfig fields); {} = defaults
    thermal: dict[str, Any] = field(default_factory=dict)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def key_list_file(self) -> Path:
        return Path(self.trust.key_list_path) if self.trust.key_list_path else (
            self.data_path / "trust" / "keys.pb")

    def validate(self) -> None:
        if not topics.valid_device_id(self.device_id):
            raise ConfigError(f"device_id {self.device_id!r}: use [a-z0-9._-], 1-63 chars")
        if not self.device_class:
            raise ConfigError("device_class is required")
        self.trust.root_raw()
        for name in ("max_update_bytes", "max_chunk_bytes", "max_envelope_bytes", "max_chunks"):
            if getattr(self.limits, name) <= 0:
                raise ConfigError(f"limits.{name} must be > 0")
        if self.update.request_window_chunks <= 0:
            raise ConfigError("update.request_window_chunks must be > 0")
        if self.update.integrity_check_s < 0:
            raise ConfigError("update.integrity_check_s must be >= 0 (0 = off)")
        if self.update.stable_after_s <= 0:
            raise ConfigError("update.stable_after_s must be > 0")
        if self.update.crash_loop_restarts < 1:
            raise ConfigError("update.crash_loop_restarts must be >= 1")
        self.mqtt.protocol = str(self.mqtt.protocol)  # YAML reads `protocol: 5` as an int
        if self.mqtt.protocol not in MQTT_PROTOCOLS:
            raise ConfigError(f"mqtt.protocol must be one of {', '.join(MQTT_PROTOCOLS)}, "
                              f"got {self.mqtt.protocol!r}")
        tls = self.mqtt.tls
        if (tls.cert or tls.key) and not tls.ca:
            raise ConfigError("mqtt.tls.cert/key need mqtt.tls.ca (the CA of the broker)")
        if bool(tls.cert) != bool(tls.key):
            raise ConfigError("mqtt.tls.cert and mqtt.tls.key go together")
        if self.heartbeat_interval_s <= 0 or self.metrics_interval_s <= 0:
            raise ConfigError("heartbeat_interval_s and metrics_interval_s must be > 0")
        self.serve.batching = _batching_settings(self.serve.batching)


def _batching_settings(raw: Any) -> dict[str, dict[str, Any]]:
    """Validate ``serve.batching`` and fill in defaults; ConfigError names the bad key."""
    from agent.runtime.batching import BatchingConfig  # the ranges live there

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"serve.batching must be a mapping of model name -> settings, "
                          f"got {type(raw).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for model, settings in raw.items():
        where = f"serve.batching.{model}"
        if not isinstance(model, str) or not MODEL_NAME_RE.match(model):
            raise ConfigError(f"serve.batching: {model!r} is not a model name "
                              f"([a-z0-9._-], 1-63 chars)")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{where} must be a mapping ({', '.join(BATCHING_DEFAULTS)})")
        unknown = sorted(str(k) for k in set(settings) - set(BATCHING_DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} "
                              f"(known: {', '.join(BATCHING_DEFAULTS)})")
        merged = {**BATCHING_DEFAULTS, **settings}
        for key in ("max_batch_size", "max_concurrent_batches"):
            if not isinstance(merged[key], int) or isinstance(merged[key], bool):
                raise ConfigError(f"{where}.{key} must be an integer, got {merged[key]!r}")
        delay = merged["max_queue_delay_ms"]
        if not isinstance(delay, (int, float)) or isinstance(delay, bool):
            raise ConfigError(f"{where}.max_queue_delay_ms must be a number, got {delay!r}")
        merged["max_queue_delay_ms"] = float(delay)
        for key in BATCHING_DEFAULTS:
            try:
                BatchingConfig(**{**BATCHING_DEFAULTS, key: merged[key]})
            except ValueError as e:
                raise ConfigError(f"{where}.{key}: {e}") from e
        out[model] = merged
    return out


def _build(cls: Any, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or 'config'}: {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        sub = f"{where}.{name}" if where else name
        ftype = f.type if not isinstance(f.type, str) else _TYPES.get(f.type)
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, value, sub)
        elif f.type in ("int",) and not isinstance(value, int):
            raise ConfigError(f"{sub} must be an integer")
        elif f.type in ("float",) and not isinstance(value, (int, float)):
            raise ConfigError(f"{sub} must be a number")
        elif f.type == "dict[str, Any]" and not isinstance(value, dict):
            raise ConfigError(f"{sub} must be a mapping")
        elif f.type == "dict[str, str]":
            if not isinstance(value, dict):
                raise ConfigError(f"{sub} must be a mapping")
            kwargs[name] = {str(k): str(v) for k, v in value.items()}
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


_TYPES: dict[str, Any] = {
    "TlsConfig": TlsConfig, "MqttConfig": MqttConfig, "TrustConfig": TrustConfig,
    "ServeConfig": ServeConfig, "LimitsConfig": LimitsConfig, "UpdateConfig": UpdateConfig,
}


def config_from_dict(data: dict[str, Any]) -> AgentConfig:
    """Build and validate an AgentConfig from a parsed mapping."""
    cfg: AgentConfig = _build(AgentConfig, data, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> AgentConfig:
    """Read ``path`` (YAML) into a validated AgentConfig; ConfigError with the reason."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from e
    return config_from_dict(data or {})


def config_to_dict(cfg: AgentConfig) -> dict[str, Any]:
    """Plain mapping (for writing a config file in tests and ``enroll``)."""
    return dataclasses.asdict(cfg)
