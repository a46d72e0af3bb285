"""A slow but moving chunk sender is a retry with backoff for the agent, not a failure.

When 1,000 devices share the controller's bandwidth, each one gets a chunk every few
seconds, longer than its stall timeout. The real agent (agent.update.download) counts
stalls *in a row*: every chunk that arrives resets the count, and the stall timeout doubles
after each stall in a row (up to 4x), so this transfer completes; a sender that never
answers still fails after ``max_retries`` stalls (tests/integration/test_attacks.py
test_rejects_stalled_transfer). A real Mosquitto, an in-process Agent, an OTA driver.
"""

from __future__ import annotations

import threading
from pathlib import Path

from agent.app import Agent
from agent.config import config_from_dict
from protos.edgefleet.v1 import common_pb2 as C
from tests.helpers.broker import Broker
from tests.helpers.models import build_affine
from tests.helpers.ota import OtaDriver, agent_config, infer

STALL_S = 0.3
GAP_S = 0.5        # between chunks: every gap is a stall of the agent's timer


def test_chunks_slower_than_the_stall_timeout_still_complete(tmp_path: Path,
                                                             mosquitto: Broker) -> None:
    d = OtaDriver(mosquitto.host, mosquitto.port, device_id="dev-s", device_class="cpu-x86")
    d.publish_keys()
    agent = Agent(config_from_dict(agent_config(
        tmp_path, host=mosquitto.host, port=mosquitto.port, driver=d,
        update={"stall_timeout_s": STALL_S, "max_retries": 2})))
    agent.start()
    stop = threading.Event()
    try:
        payload = build_affine(tmp_path / "v1.onnx", marker=3.0).read_bytes()
        offer = d.make_offer("affine", 1, payload, chunk_size=max(16, len(payload) // 6))
        n = len(offer.manifest.chunk_sha256)
        assert n >= 5     # more chunks than max_retries + 1: stalls would add up to a failure
        offer.withhold_all = True                      # the driver answers on its own pace

        def trickle() -> None:
            d.wait_for(lambda: d.requests_for(offer.update_id), what="first request")
            for i in range(n):
                if stop.wait(GAP_S):
                    return
                d.send_chunk(offer, i)

        sender = threading.Thread(target=trickle, daemon=True)
        d.publish_offer(offer)
        sender.start()
        d.wait_status(offer.update_id, C.UPDATE_STATE_COMMITTED, timeout_s=60)
        assert C.UPDATE_STATE_FAILED not in [s.state for s in d.statuses
                                             if s.update_id == offer.update_id]
        # it did stall (and re-asked) more often than max_retries, one stall at a time
        assert len(d.requests_for(offer.update_id)) > 3
        assert infer(agent.server.url, "affine", [[0.0] * 4]) == [3.0, 3.0, 3.0]
    finally:
        stop.set()
        agent.stop()
        d.close()
