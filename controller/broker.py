"""Start an MQTT broker for the embedded, single-machine shape (`edgefleet up`, `edgefleet demo`).

Called by controller/embedded.py. Prefers Mosquitto (MQTT 5, what production uses): writes a
config into the data folder (listener on a loopback or configured port, anonymous access,
persistence in the data folder) and runs it as a child process. When Mosquitto is not
installed it falls back to the embedded Python broker amqtt, which runs in the caller's asyncio
loop. amqtt (0.12) speaks MQTT 3.1.1 only and answers an MQTT 5 CONNECT with "Unsupported
protocol version", so the controller and the agents (both MQTT 5) cannot use it: it is there
for MQTT 3.1.1 tools, the log says so loudly, and the fix is `apt-get install mosquitto`.

A broker given by URL (``mqtt://host:port``) is used as is and nothing is started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from protos.errors import GiveUp

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

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

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
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {data_dir}/\n"
        f"max_packet_size {max_packet_bytes}\n"
        "max_inflight_messages 100\n"
        "max_queued_messages 10000\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
    )


async def start_broker(data_dir: Path, *, host: str = "127.0.0.1", port: int | None = None,
                       external_url: str | None = None,
                       prefer: str = "auto",
                       max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES) -> BrokerHandle:
    """Start Mosquitto (or amqtt when Mosquitto is missing, or when ``prefer="amqtt"``).

    ``port=None`` picks a free port. ``external_url`` skips starting anything.
    """
    if external_url:
        u = urlparse(external_url)
        handle = BrokerHandle("external", u.hostname or "127.0.0.1", u.port or 1883)
        log.info("using external MQTT broker at %s", handle.url)
        return handle
    port = port or free_port(host)
    exe = mosquitto_path()
    if exe and prefer in ("auto", "mosquitto"):
        return await _start_mosquitto(exe, data_dir / "broker", host=host, port=port,
                                      max_packet_bytes=max_packet_bytes)
    if prefer == "mosquitto":
        raise GiveUp("mosquitto is not installed (apt-get install mosquitto)",
                     reason="broker_missing")
    return await _start_amqtt(host=host, port=port)


async def _start_mosquitto(exe: str, workdir: Path, *, host: str, port: int,
                           max_packet_bytes: int) -> BrokerHandle:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    tmp = conf.with_suffix(".tmp")
    tmp.write_text(mosquitto_conf(host=host, port=port, data_dir=workdir,
                                  max_packet_bytes=max_packet_bytes))
    os.replace(tmp, conf)
    log_path = workdir / "mosquitto.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    handle = BrokerHandle("mosquitto", host, port, proc=proc, conf_path=conf, log_path=log_path)
    try:
        await wait_port(host, port)
    except GiveUp:
        await handle.stop()
        tail = log_path.read_text(errors="replace")[-400:]
        raise GiveUp(f"mosquitto failed to start on {host}:{port}: {tail}",
                     reason="broker_start") from None
    log.info("broker: mosquitto (MQTT 5) pid %d listening on %s:%d, config %s, log %s",
             proc.pid, host, port, conf, log_path)
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
                "not installed. The controller and agents speak MQTT 5, which amqtt refuses "
                "('Unsupported protocol version'): apt-get install mosquitto, or pass "
                "--broker-url of an MQTT 5 broker", host, port)
    return BrokerHandle("amqtt", host, port, _amqtt=broker)
