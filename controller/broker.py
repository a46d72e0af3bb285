"""Start an MQTT broker for the embedded, single-machine shape (`edgefleet up`, `edgefleet demo`).

Called by controller/embedded.py. Prefers Mosquitto (MQTT 5, what production uses): writes a
config into the data folder (listener on a loopback or configured port, anonymous access,
persistence in the data folder) and runs it as a child process. When Mosquitto is not
installed it falls back to the embedded Python broker amqtt, which runs in the caller's asyncio
loop. amqtt (0.12) speaks MQTT 3.1.1 only and answers an MQTT 5 CONNECT with "Unsupported
protocol version", so with it ``BrokerHandle.mqtt_protocol`` is "3.1.1" and the embedded
controller runs itself and the demo agents on MQTT 3.1.1 (settings ``mqtt_protocol``, agent
``mqtt.protocol``), warning loudly what that costs: ACL denials are invisible, no shared
subscriptions, no session expiry, no TLS/ACL at all. The fix is `apt-get install mosquitto`.

With ``tls=BrokerTls(...)`` (``edgefleet up --tls``, ``edgefleet demo --secure``) Mosquitto gets
one TLS listener that requires a client certificate signed by the fleet CA (controller/pki.py),
takes the certificate's CN as the MQTT username (``use_identity_as_username``), refuses
anonymous clients and applies the ACL of :func:`mosquitto_acl`: a device may publish only to
its own heartbeat/metrics/presence/update-status/update-request topics and subscribe only to
its own offer/chunk/desired topics and the trust key list; the controller identity may do
anything under ``edgefleet/v1/#``. No plain listener is opened then. amqtt cannot do this,
so TLS without Mosquitto is refused.

A broker given by URL (``mqtt://host:port``) is used as is and nothing is started.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from protos import topics
from protos.errors import GiveUp
from protos.fsutil import write_atomic

log = logging.getLogger("edgefleet.broker")

MOSQUITTO_FALLBACK_PATH = "/usr/sbin/mosquitto"
DEFAULT_MAX_PACKET_BYTES = 4 * 1024 * 1024


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str | None:
    """Path of the mosquitto executable, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return MOSQUITTO_FALLBACK_PATH if Path(MOSQUITTO_FALLBACK_PATH).exists() else None


async def wait_port(host: str, port: int, *, timeout_s: float = 10.0) -> None:
    """Wait until something accepts TCP connections on host:port; GiveUp after the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            _reader, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError as e:
            if loop.time() > deadline:
                raise GiveUp(f"MQTT broker did not listen on {host}:{port} within {timeout_s}s",
                             reason="broker_start") from e
            await asyncio.sleep(0.05)


@dataclass
class BrokerHandle:
    """A running (or external) broker: where to connect and how to stop it."""

    kind: str                      # "mosquitto" | "amqtt" | "external"
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    conf_path: Path | None = None
    log_path: Path | None = None
    _amqtt: Any = field(default=None, repr=False)
    tls: bool = False              # True: TLS listener with client certificates + ACL

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def mqtt_protocol(self) -> str:
        """The MQTT version clients must speak to this broker: "3.1.1" for amqtt, else "5"."""
        return "3.1.1" if self.kind == "amqtt" else "5"

    async def stop(self) -> None:
        """Stop the broker if this process started it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 5)
            log.info("mosquitto stopped (port %d)", self.port)
        if self._amqtt is not None:
            await self._amqtt.shutdown()
            self._amqtt = None
            log.info("amqtt broker stopped (port %d)", self.port)


def mosquitto_conf(*, host: str, port: int, data_dir: Path,
                   max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES) -> str:
    """Mosquitto 2.x config text for the embedded broker (MQTT 5 is on by default)."""
    return (
        # started as root, Mosquitto switches to user "mosquitto", which cannot write the
        # persistence file in our data folder: retained offers, presence and the key list
        # would not survive a broker restart ("Error: Permission denied" at shutdown)
        f"user {getpass.getuser()}\n"
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        + _storage_and_limits(data_dir=data_dir, max_packet_bytes=max_packet_bytes)
    )


def _storage_and_limits(*, data_dir: Path, max_packet_bytes: int) -> str:
    """The config lines both listeners share: persistence, packet/queue limits, logging."""
    return (
        "persistence true\n"
        f"persistence_location {data_dir}/\n"
        f"max_packet_size {max_packet_bytes}\n"
        "max_inflight_messages 100\n"
        "max_queued_messages 10000\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
    )


# -- TLS + ACL ----------------------------------------------------------------------------------
DEVICE_WRITE_LEAVES = topics.DEVICE_TO_CONTROLLER
DEVICE_READ_LEAVES = topics.CONTROLLER_TO_DEVICE


@dataclass(frozen=True)
class BrokerTls:
    """Files for a TLS listener with client certificates (controller/pki.py makes them)."""

    ca: Path                       # the fleet CA certificate (verifies client certificates)
    cert: Path                     # the broker's server certificate
    key: Path                      # its private key
    controller_cn: str = "controller@edgefleet"
    builders: tuple[str, ...] = () # builder ids (CN) allowed on their own builder subtree


def mosquitto_acl(*, controller_cn: str = "controller@edgefleet",
                  builders: tuple[str, ...] | list[str] = ()) -> str:
    """Mosquitto ACL text: devices (username = certificate CN) confined to their own subtree."""
    p = topics.PREFIX
    lines = ["# generated by edgefleet (controller/broker.py); username = certificate CN",
             f"user {controller_cn}", f"topic readwrite {p}/#", ""]
    for b in builders:
        if not topics.valid_device_id(b):
            raise ValueError(f"invalid builder id {b!r}")
        lines += [f"user {b}",
                  f"topic write {p}/builders/{b}/{topics.BUILDER_ANNOUNCE}",
                  f"topic write {p}/builders/{b}/{topics.BUILDER_RESULT}",
                  f"topic read {p}/builders/{b}/{topics.BUILDER_JOB}", ""]
    lines.append("# every client with a certificate: only its own device subtree")
    lines += [f"pattern write {p}/devices/%u/{leaf}" for leaf in DEVICE_WRITE_LEAVES]
    lines += [f"pattern read {p}/devices/%u/{leaf}" for leaf in DEVICE_READ_LEAVES]
    lines.append(f"pattern read {topics.TRUST_KEYS}")
    return "\n".join(lines) + "\n"


def mosquitto_tls_conf(*, host: str, port: int, data_dir: Path, tls: BrokerTls,
                       acl_path: Path, max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES) -> str:
    """Mosquitto 2.x config: one TLS listener, client certificates required, CN = username.

    ``user`` is the account we run as: mosquitto started by root otherwise switches to the
    ``mosquitto`` account, which cannot read the 0600 server key in the data folder.
    """
    return (
        f"user {getpass.getuser()}\n"
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"acl_file {acl_path}\n"
        f"listener {port} {host}\n"
        f"cafile {tls.ca}\n"
        f"certfile {tls.cert}\n"
        f"keyfile {tls.key}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "tls_version tlsv1.2\n"
        + _storage_and_limits(data_dir=data_dir, max_packet_bytes=max_packet_bytes)
    )


async def start_broker(data_dir: Path, *, host: str = "127.0.0.1", port: int | None = None,
                       external_url: str | None = None,
                       prefer: str = "auto",
                       max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
                       tls: BrokerTls | None = None) -> BrokerHandle:
    """Start Mosquitto (or amqtt when Mosquitto is missing, or when ``prefer="amqtt"``).

    ``port=None`` picks a free port. ``external_url`` skips starting anything (an
    ``mqtts://`` URL marks it as TLS). ``tls`` needs Mosquitto: GiveUp without it.
    """
    if external_url:
        u = urlparse(external_url)
        handle = BrokerHandle("external", u.hostname or "127.0.0.1",
                              u.port or (8883 if u.scheme == "mqtts" else 1883),
                              tls=u.scheme == "mqtts")
        log.info("using external MQTT broker at %s", handle.url)
        return handle
    port = port or free_port(host)
    exe = mosquitto_path()
    if tls is not None and (not exe or prefer == "amqtt"):
        raise GiveUp("a TLS broker with client certificates and ACLs needs mosquitto "
                     "(apt-get install mosquitto); the embedded amqtt broker cannot do it",
                     reason="broker_missing")
    if exe and prefer in ("auto", "mosquitto"):
        return await _start_mosquitto(exe, data_dir / "broker", host=host, port=port,
                                      max_packet_bytes=max_packet_bytes, tls=tls)
    if prefer == "mosquitto":
        raise GiveUp("mosquitto is not installed (apt-get install mosquitto)",
                     reason="broker_missing")
    return await _start_amqtt(host=host, port=port)


async def _start_mosquitto(exe: str, workdir: Path, *, host: str, port: int,
                           max_packet_bytes: int, tls: BrokerTls | None = None) -> BrokerHandle:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    if tls is not None:
        acl = workdir / "acl"
        write_atomic(acl, mosquitto_acl(controller_cn=tls.controller_cn,
                                        builders=tls.builders).encode())
        text = mosquitto_tls_conf(host=host, port=port, data_dir=workdir, tls=tls,
                                  acl_path=acl, max_packet_bytes=max_packet_bytes)
    else:
        text = mosquitto_conf(host=host, port=port, data_dir=workdir,
                              max_packet_bytes=max_packet_bytes)
    write_atomic(conf, text.encode())
    log_path = workdir / "mosquitto.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    handle = BrokerHandle("mosquitto", host, port, proc=proc, conf_path=conf, log_path=log_path,
                          tls=tls is not None)
    try:
        await wait_port(host, port)
    except GiveUp:
        await handle.stop()
        tail = log_path.read_text(errors="replace")[-400:]
        raise GiveUp(f"mosquitto failed to start on {host}:{port}: {tail}",
                     reason="broker_start") from None
    log.info("broker: mosquitto (MQTT 5%s) pid %d listening on %s:%d, config %s, log %s",
             ", TLS + client certificates + ACL" if tls else "", proc.pid, host, port, conf,
             log_path)
    return handle


async def _start_amqtt(*, host: str, port: int) -> BrokerHandle:
    try:
        from amqtt.broker import Broker
    except ImportError as e:
        raise GiveUp("no MQTT broker: mosquitto is not installed and amqtt is not importable "
                     "(apt-get install mosquitto, or pip install amqtt)",
                     reason="broker_missing") from e
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    await wait_port(host, port)
    log.warning("broker: embedded amqtt (Python, MQTT 3.1.1 only) on %s:%d because mosquitto is "
                "not installed. The controller and the demo agents fall back to MQTT 3.1.1: "
                "no TLS, no ACL (any client may publish anywhere), refused publishes are "
                "invisible, no shared subscriptions, no session expiry. For anything but a "
                "local try-out: apt-get install mosquitto, or --broker-url of an MQTT 5 broker",
                host, port)
    return BrokerHandle("amqtt", host, port, _amqtt=broker)
