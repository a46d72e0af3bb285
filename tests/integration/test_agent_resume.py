"""Resumable transfer: after a broker restart and after the agent is killed mid-transfer, the
agent re-requests only the chunks it does not have on disk (counted by the test driver)."""

from __future__ import annotations

import signal
import struct
from collections import Counter
from pathlib import Path

from agent.app import Agent
from agent.config import config_from_dict
from protos.edgefleet.v1 import common_pb2 as C
from tests.helpers.broker import Broker, free_port
from tests.helpers.models import build_mlp
from tests.helpers.ota import (
    OtaDriver,
    agent_config,
    infer,
    sha256,
    spawn_agent,
    stop_agent,
    write_config,
)

CHUNK = 4096


def big_model(tmp: Path) -> bytes:
    return build_mlp(tmp / "big.onnx", size_mb=0.3, n_in=4, marker=7.0).read_bytes()


def test_resumes_after_broker_restart_requesting_only_missing_chunks(
        tmp_path: Path, mosquitto: Broker) -> None:
    d = OtaDriver(mosquitto.host, mosquitto.port, device_id="dev-r", device_class="cpu-x86")
    d.publish_keys()
    agent = Agent(config_from_dict(agent_config(
        tmp_path, host=mosquitto.host, port=mosquitto.port, driver=d,
        update={"stall_timeout_s": 1.0, "max_retries": 20})))
    agent.start()
    try:
        offer = d.make_offer("big", 1, big_model(tmp_path), chunk_size=CHUNK)
        total = len(offer.manifest.chunk_sha256)
        first = 20
        offer.withhold = set(range(first, total))
        d.publish_offer(offer)
        d.wait_for(lambda: any(p.bytes_received == first * CHUNK
                               for p in agent.updates.progress()), what="first chunks on disk")
        assert d.chunks_sent(offer.update_id) == first
        mosquitto.restart()  # retained messages are gone too (persistence off)
        offer.withhold = set()
        d.wait_status(offer.update_id, C.UPDATE_STATE_COMMITTED, timeout_s=60)
        assert agent.link.connect_count >= 2
        # every chunk crossed the wire exactly once: nothing re-sent from zero
        counts = [d.sent[(offer.update_id, i)] for i in range(total)]
        assert counts == [1] * total
        assert infer(agent.server.url, "big", [[0.0] * 4])[:3] == [7.0, 7.0, 7.0]
    finally:
        agent.stop()
        d.close()


def test_resumes_after_agent_killed_mid_transfer(tmp_path: Path, mosquitto: Broker) -> None:
    d = OtaDriver(mosquitto.host, mosquitto.port, device_id="dev-k", device_class="cpu-x86")
    d.publish_keys()
    serve_port = free_port()
    cfg = write_config(tmp_path / "agent.yaml", agent_config(
        tmp_path, host=mosquitto.host, port=mosquitto.port, driver=d, serve_port=serve_port,
        update={"stall_timeout_s": 1.0, "max_retries": 20}))
    payload = big_model(tmp_path)
    log = tmp_path / "agent.log"
    proc = spawn_agent(cfg, log=log, crash_at="chunk:25")
    try:
        d.wait_for(lambda: any(p.online for p in d.presence), what="agent online")
        offer = d.offer("big", 1, payload, chunk_size=CHUNK)
        total = len(offer.manifest.chunk_sha256)
        assert proc.wait(30) == -signal.SIGKILL
        # the broker publishes the last will: presence offline
        d.wait_for(lambda: d.presence and not d.presence[-1].online, what="LWT")
        assert d.presence[-1].reason == "lwt"
        journal = tmp_path / "agent-data" / "transfers" / "big" / offer.update_id / "chunks.idx"
        on_disk = {i for (i,) in struct.iter_unpack("<I", journal.read_bytes())}
        assert len(on_disk) == 25
        before = Counter(d.sent)
        proc = spawn_agent(cfg, log=log)
        d.wait_status(offer.update_id, C.UPDATE_STATE_COMMITTED, timeout_s=60)
        resent = Counter({k: v for k, v in (Counter(d.sent) - before).items()})
        assert {i for (_, i) in resent} == set(range(total)) - on_disk
        assert set(resent.values()) == {1}
        url = f"http://127.0.0.1:{serve_port}"
        assert infer(url, "big", [[0.0] * 4])[:3] == [7.0, 7.0, 7.0]
        hb = d.last_heartbeat(after_seq=0)
        assert hb.models and hb.models[0].sha256 == sha256(payload) or \
            d.last_heartbeat(after_seq=hb.seq).models[0].sha256 == sha256(payload)
    finally:
        stop_agent(proc)
        d.close()
