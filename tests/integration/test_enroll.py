"""Enrollment with a bootstrap token, end to end, against the real parts.

The embedded controller runs with TLS on (``EmbeddedOptions(tls=True)``: fleet CA, a real
Mosquitto with only a TLS listener, client certificates and the device ACL). A token is made
with the real ``edgefleet token create`` command; the real ``edgefleet-agent enroll`` command
(a subprocess) generates its key, sends a CSR, and writes key/cert/CA and the agent config;
the real agent then runs from that config and its heartbeat reaches the controller through the
TLS broker (Device row online). Refusals: the same token again (used up) -> 403 and the
command fails; an expired token -> 403; a bad device id -> 422; a token for another class ->
403; a re-enrollment of the now known device without a --reenroll token -> 403.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controller.demo_agents import AgentProcess, agent_command, local_device_class
from controller.embedded import EmbeddedController, EmbeddedOptions
from controller.pki import cert_common_name
from tests.e2e.fleet import wait_device_online, wait_for
from tests.helpers.broker import free_port, mosquitto_path

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


def edgefleet_command() -> list[str]:
    script = Path(sys.executable).with_name("edgefleet")
    return [str(script)] if script.exists() else [sys.executable, "-m", "controller.cli"]


async def run(cmd: list[str], *, timeout_s: float = 60) -> tuple[int, str, str]:
    """A real command as a subprocess (without blocking the controller's event loop)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def token(url: str, *args: str) -> str:
    rc, out, err = await run([*edgefleet_command(), "--server", url, "token", "create", *args])
    assert rc == 0, err
    return out.strip()


async def enroll_api(url: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        return await c.post("/api/v1/enroll", json=body)


@pytest.fixture
async def ctrl(tmp_path: Path) -> Any:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    c = EmbeddedController(EmbeddedOptions(
        data_dir=tmp_path / "controller", api_port=0, mqtt_port=0, broker="mosquitto", tls=True,
        settings_overrides={"compile_in_process_pool": False}))
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_enroll_then_heartbeat_through_tls(ctrl: EmbeddedController,
                                                 tmp_path: Path) -> None:
    cls = local_device_class()
    tok = await token(ctrl.url, "--ttl", "1h", "--uses", "1", "--device-class", cls,
                      "--prefix", "board-")
    board = tmp_path / "board"
    out = board / "agent.yaml"
    enroll = [*agent_command(), "enroll", "--controller", ctrl.url, "--token", tok,
              "--device-id", "board-1", "--device-class", cls,
              "--data-dir", str(board / "data"), "--out", str(out)]
    rc, stdout, stderr = await run(enroll)
    assert rc == 0, stderr
    assert "with a TLS identity" in stdout

    # what was written: a config pinning the controller's root, the broker it runs, TLS files
    cfg = yaml.safe_load(out.read_text())
    assert cfg["trust"]["root_public_key"] == ctrl.keys.root_public_b64()
    assert ctrl.broker is not None
    assert (cfg["mqtt"]["host"], cfg["mqtt"]["port"]) == (ctrl.broker.host, ctrl.broker.port)
    assert str(cfg["mqtt"]["protocol"]) == "5"
    tls = cfg["mqtt"]["tls"]
    key = Path(tls["key"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.parent == (board / "data" / "tls").resolve()
    assert cert_common_name(Path(tls["cert"]).read_bytes()) == "board-1"
    assert Path(tls["ca"]).read_bytes() == ctrl.pki.ca_cert_path.read_bytes()
    # the private key never left the board: nothing in the controller's folder holds it
    key_pem = key.read_bytes()
    for f in (tmp_path / "controller").rglob("*"):
        if f.is_file():
            assert key_pem not in f.read_bytes(), f

    # the real agent runs from that config (only its local serve port and heartbeat period
    # are changed for the test) and heartbeats through the TLS-only broker
    serve_port = free_port()
    cfg["serve"]["port"] = serve_port
    cfg["heartbeat_interval_s"] = 1.0
    out.write_text(yaml.safe_dump(cfg))
    agent = AgentProcess("board-1", board, out, serve_port, board / "agent.log")
    agent.start()
    try:
        dev = await wait_device_online(ctrl.url, "board-1", timeout_s=60,
                                       what="board-1 online through TLS", on_timeout=agent.log_tail)
        assert dev["device_class"] == cls
        assert "refused" not in agent.log_tail(20000)
    finally:
        agent.stop()

    # the same token again: used up -> 403, and the command says so and fails
    rc, _, stderr = await run([*enroll[:-4], "--data-dir", str(tmp_path / "b2"),
                               "--out", str(tmp_path / "b2.yaml")])
    assert rc == 1 and "HTTP 403" in stderr and "used up" in stderr, stderr
    assert not (tmp_path / "b2.yaml").exists()

    # a second device with a fresh token, but the now known board-1 without --reenroll -> 403
    tok2 = await token(ctrl.url, "--uses", "2")
    r = await enroll_api(ctrl.url, {"token": tok2, "device_id": "board-1",
                                    "device_class": cls, "csr_pem": _csr("board-1")})
    assert r.status_code == 403 and r.json()["reason"] == "already_enrolled", r.text

    async with httpx.AsyncClient(base_url=ctrl.url, timeout=10) as c:
        events = (await c.get("/api/v1/events", params={"limit": 200})).json()["items"]
    reasons = {e["reason"] for e in events}
    assert {"Enrolled", "EnrollRefused", "TokenCreated"} <= reasons, reasons


def _csr(device_id: str) -> str:
    from agent.enroll import make_identity

    return make_identity(device_id).csr_pem.decode()


async def test_enroll_refusals(ctrl: EmbeddedController) -> None:
    cls = local_device_class()
    url = ctrl.url
    body = {"device_id": "dev-9", "device_class": cls, "csr_pem": _csr("dev-9")}

    # expired: a token made with a 1 s lifetime, used once the API says it is expired
    expired = await token(url, "--ttl", "1s")

    async def is_expired() -> bool:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            items = (await c.get("/api/v1/tokens")).json()["items"]
        return any(t["state"] == "expired" for t in items)

    await wait_for(is_expired, timeout_s=10, what="token expired")
    r = await enroll_api(url, {**body, "token": expired})
    assert r.status_code == 403 and r.json()["reason"] == "expired", r.text

    r = await enroll_api(url, {**body, "token": "not-a-token-at-all"})
    assert r.status_code == 403 and r.json()["reason"] == "unknown_token", r.text

    good = await token(url, "--device-class", cls, "--prefix", "dev-")
    r = await enroll_api(url, {**body, "token": good, "device_id": "Bad/Id"})
    assert r.status_code == 422, r.text
    r = await enroll_api(url, {**body, "token": good, "device_class": "rk3588"})
    assert r.status_code == 403 and r.json()["reason"] == "wrong_class", r.text
    r = await enroll_api(url, {**body, "token": good, "device_id": "cam-1",
                               "csr_pem": _csr("cam-1")})
    assert r.status_code == 403 and r.json()["reason"] == "wrong_prefix", r.text
    r = await enroll_api(url, {**body, "token": good, "csr_pem": _csr("other")})
    assert r.status_code == 422 and r.json()["reason"] == "bad_csr", r.text
    r = await enroll_api(url, {**body, "token": good, "csr_pem": ""})
    assert r.status_code == 422 and r.json()["reason"] == "csr_required", r.text
    # none of those spent the token: it still enrolls, once
    r = await enroll_api(url, {**body, "token": good})
    assert r.status_code == 200, r.text
    ans = r.json()
    assert ans["mqtt"]["tls"]["cert_pem"] and ans["root_public_key"] == \
        ctrl.keys.root_public_b64() and ans["controller_url"] == url
    r = await enroll_api(url, {**body, "token": good, "device_id": "dev-10",
                               "csr_pem": _csr("dev-10")})
    assert r.status_code == 403 and r.json()["reason"] == "used_up", r.text

    # revoke through the CLI; list shows it
    tid = ans["token_id"]
    rc, out, err = await run([*edgefleet_command(), "--server", url, "token", "revoke", tid])
    assert rc == 0 and tid in out, err
    rc, out, err = await run([*edgefleet_command(), "--server", url, "token", "list",
                              "-o", "json"])
    states = {t["id"]: t["state"] for t in json.loads(out)}
    assert states[tid] == "revoked"


def test_offline_enroll_with_tls_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The offline form keeps working and takes the TLS files given by the operator."""
    import base64

    from agent.cli import main
    from agent.config import load_config
    from controller.pki import CertificateAuthority

    root = base64.b64encode(bytes(range(32))).decode()
    files = CertificateAuthority.init(tmp_path / "pki").device_files("cam-3", tmp_path / "tls")
    out = tmp_path / "agent.yaml"
    assert main(["enroll", "--device-id", "cam-3", "--device-class", "cpu-x86-64",
                 "--root-public-key", root, "--mqtt-host", "mqtt.example", "--mqtt-port", "8883",
                 "--tls-ca", str(files.ca), "--tls-cert", str(files.cert),
                 "--tls-key", str(files.key), "--data-dir", str(tmp_path / "d"),
                 "--out", str(out)]) == 0
    cfg = load_config(out)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.trust.root_public_key) == (
        "mqtt.example", 8883, root)
    assert cfg.mqtt.tls.cert == str(files.cert.resolve())
    # a key without its certificate, a missing file, online without a token: clear errors
    assert main(["enroll", "--device-id", "cam-3", "--device-class", "c", "--root-public-key",
                 root, "--tls-ca", str(files.ca), "--tls-key", str(files.key),
                 "--out", str(tmp_path / "x.yaml")]) == 2
    assert main(["enroll", "--device-id", "cam-3", "--device-class", "c", "--root-public-key",
                 root, "--tls-ca", str(tmp_path / "nope.pem"), "--out", str(tmp_path / "x.yaml")
                 ]) == 2
    assert main(["enroll", "--device-id", "cam-3", "--device-class", "c",
                 "--controller", "http://127.0.0.1:9"]) == 2
    assert main(["enroll", "--device-id", "cam-3", "--device-class", "c",
                 "--controller", "http://127.0.0.1:9", "--token", "t",
                 "--out", str(tmp_path / "x.yaml")]) == 1          # nothing listens there
    assert "cannot reach the controller" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()
