"""Start a real Mosquitto broker on a free loopback port for a test.

Used by tests/conftest.py (fixture ``mosquitto``). Mosquitto comes from apt (the test
command installs it); a test that needs it is skipped with a clear reason when it is absent.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


@dataclass
class Broker:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    conf_path: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> None:
        """Stop and start again on the same port (tests of reconnect and resume)."""
        self.stop()
        self.proc = _spawn(self.conf_path, self.log_path)
        wait_port(self.port)


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


def _spawn(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    exe = mosquitto_path()
    assert exe, "mosquitto not installed"
    return subprocess.Popen([exe, "-c", str(conf)], stdout=log.open("ab"), stderr=subprocess.STDOUT)


def start_mosquitto(workdir: Path, *, port: int | None = None, extra_conf: str = "",
                    plain_listener: bool = True) -> Broker:
    """Start mosquitto with anonymous access on 127.0.0.1:port (free port by default).

    ``plain_listener=False``: the config is ``extra_conf`` alone, which must open a listener on
    ``port`` (pass ``port``; e.g. the TLS + ACL config of controller.broker.mosquitto_tls_conf).
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    if not plain_listener:
        conf.write_text(extra_conf)
    else:
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_packet_size 4194304\n"
            "max_inflight_messages 100\n"
            "max_queued_messages 10000\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            + extra_conf
        )
    log = workdir / "mosquitto.log"
    proc = _spawn(conf, log)
    wait_port(port)
    return Broker("127.0.0.1", port, proc, log, conf)
