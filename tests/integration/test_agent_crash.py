"""Crash safety: the real agent process is SIGKILLed at every update state transition
(``EDGEFLEET_CRASH_AT``), restarted without the kill switch, and must (1) serve a verified
model as soon as it is up (v1 or v2, never nothing, never a torn file), (2) finish the
update to COMMITTED, (3) serve v2 through the local KServe v2 API, with the served engine
file's sha256 equal to the committed one, and (4) report the same state in its heartbeat,
its UpdateStatus and ``edgefleet-agent status``.

A data folder with v1 committed is built once (in-process agent) and copied per kill point.
``EDGEFLEET_CRASH_REPEAT=N`` runs every kill point N times (default 2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.app import Agent
from agent.config import config_from_dict
from protos.edgefleet.v1 import common_pb2 as C
from protos.fsutil import sha256_file
from tests.helpers.broker import Broker, free_port, mosquitto_path, start_mosquitto
from tests.helpers.models import build_affine
from tests.helpers.ota import (
    OtaDriver,
    agent_config,
    infer,
    sha256,
    spawn_agent,
    stop_agent,
    write_config,
)

STATES = ("received", "downloading", "verifying", "patching", "staged", "activating",
          "committed")
KILL_POINTS = [f"{s}:before" for s in STATES] + list(STATES) + ["chunk:1", "commit:after"]
REPEAT = int(os.environ.get("EDGEFLEET_CRASH_REPEAT", "2"))
ZERO = [[0.0, 0.0, 0.0, 0.0]]


@dataclass
class Env:
    broker: Broker
    root: Ed25519PrivateKey
    signer: Ed25519PrivateKey
    template: Path      # agent data dir with v1 committed
    v1: bytes
    v2: bytes


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    tmp = tmp_path_factory.mktemp("crash")
    broker = start_mosquitto(tmp / "broker")
    try:
        d = OtaDriver(broker.host, broker.port, device_id="template", device_class="cpu-x86")
        d.publish_keys()
        v1 = build_affine(tmp / "v1.onnx", marker=1.0).read_bytes()
        v2 = build_affine(tmp / "v2.onnx", marker=2.0).read_bytes()
        agent = Agent(config_from_dict(agent_config(tmp, host=broker.host, port=broker.port,
                                                    driver=d)))
        agent.start()
        try:
            o = d.offer("affine", 1, v1)
            d.wait_status(o.update_id, C.UPDATE_STATE_COMMITTED)
        finally:
            agent.stop()
            d.close()
        shutil.rmtree(tmp / "agent-data" / "transfers", ignore_errors=True)
        yield Env(broker, d.root, d.signer, tmp / "agent-data", v1, v2)
    finally:
        broker.stop()


def served_or_none(url: str) -> float | None:
    try:
        return infer(url, "affine", ZERO)[0]
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


@pytest.mark.parametrize("repeat", range(REPEAT))
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_agent_killed_at_transition_recovers(env: Env, tmp_path: Path, kill_at: str,
                                              repeat: int) -> None:
    dev_id = f"crash-{KILL_POINTS.index(kill_at)}-{repeat}"
    d = OtaDriver(env.broker.host, env.broker.port, device_id=dev_id, device_class="cpu-x86",
                  root=env.root, signer=env.signer)
    shutil.copytree(env.template, tmp_path / "agent-data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg_map = agent_config(tmp_path, host=env.broker.host, port=env.broker.port, driver=d,
                           serve_port=port)
    cfg = write_config(tmp_path / "agent.yaml", cfg_map)
    log = tmp_path / "agent.log"
    offer = d.offer("affine", 2, env.v2, chunk_size=512)  # retained: read on subscribe
    proc = spawn_agent(cfg, log=log, crash_at=kill_at)
    try:
        rc = proc.wait(30)
        assert rc == -signal.SIGKILL, f"agent exited {rc}, not killed at {kill_at}:\n" + \
            log.read_text()[-3000:]
        proc = spawn_agent(cfg, log=log)
        # serving a verified model as soon as the API is up: v1 or v2, nothing else
        first = d.wait_for(lambda: served_or_none(url), what="inference API up")
        assert first in (1.0, 2.0)
        d.wait_status(offer.update_id, C.UPDATE_STATE_COMMITTED)
        assert served_or_none(url) == 2.0
        # the served file is the committed engine, byte for byte
        active = json.loads((tmp_path / "agent-data/models/affine/active.json").read_text())
        engine = next((tmp_path / "agent-data/models/affine" / active["slot"]).glob("engine*"))
        assert sha256_file(engine) == sha256(env.v2) == active["sha256"]
        # consistent reports: heartbeat, status CLI
        def committed_hb(h: object) -> bool:
            return any(u.update_id == offer.update_id and u.state == C.UPDATE_STATE_COMMITTED
                       for u in h.updates)  # type: ignore[attr-defined]
        hb = d.wait_for(lambda: next((h for h in reversed(d.heartbeats) if committed_hb(h)),
                                     None), what="heartbeat reporting the commit")
        (model,) = hb.models
        assert (model.version, model.sha256, model.slot) == (2, sha256(env.v2), active["slot"])
        out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--config", str(cfg)],
                             capture_output=True, text=True, check=True)
        st = json.loads(out.stdout)["models"]["affine"]
        assert (st["version"], st["highest_committed"], st["update"]["state"]) == (
            2, 2, "committed")
    finally:
        stop_agent(proc)
        d.close()


def test_agent_rolls_back_after_repeated_crashes_during_activation(env: Env,
                                                                   tmp_path: Path) -> None:
    """An engine that kills the process while activating (twice) is rolled back, not retried
    forever: the previous engine keeps serving and ROLLED_BACK is reported."""
    d = OtaDriver(env.broker.host, env.broker.port, device_id="crash-loop",
                  device_class="cpu-x86", root=env.root, signer=env.signer)
    shutil.copytree(env.template, tmp_path / "agent-data")
    port = free_port()
    cfg = write_config(tmp_path / "agent.yaml", agent_config(
        tmp_path, host=env.broker.host, port=env.broker.port, driver=d, serve_port=port))
    log = tmp_path / "agent.log"
    offer = d.offer("affine", 2, env.v2)
    proc = spawn_agent(cfg, log=log, crash_at="activating")
    try:
        assert proc.wait(30) == -signal.SIGKILL
        proc = spawn_agent(cfg, log=log, crash_at="activating")  # the retry crashes too
        assert proc.wait(30) == -signal.SIGKILL
        proc = spawn_agent(cfg, log=log)
        st = d.wait_status(offer.update_id, C.UPDATE_STATE_ROLLED_BACK)
        assert st.reason.startswith("activation_crashed:")
        assert d.wait_for(lambda: served_or_none(f"http://127.0.0.1:{port}"),
                          what="serving") == 1.0
    finally:
        stop_agent(proc)
        d.close()
