"""One test per OTA attack, against the real agent, a real Mosquitto and real onnxruntime.

Each attack must end with UpdateStatus FAILED, action REJECT and a reason naming the check,
while the device keeps serving the model it served before (checked by inference through the
local KServe v2 API). Plus: garbage on every subscribed topic is logged and ignored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.app import Agent
from agent.config import config_from_dict
from protos import envelope, topics
from protos.edgefleet.v1 import common_pb2 as C
from tests.helpers.broker import Broker
from tests.helpers.models import build_affine, build_mlp
from tests.helpers.ota import Offer, OtaDriver, agent_config, infer

ZERO = [[0.0, 0.0, 0.0, 0.0]]


@dataclass
class Device:
    agent: Agent
    driver: OtaDriver
    tmp: Path

    def serves_v1(self) -> bool:
        return infer(self.agent.server.url, "affine", ZERO) == [1.0, 1.0, 1.0] and \
            self.agent.slots.active("affine").version == 1

    def expect_reject(self, offer: Offer, reason: str) -> None:
        st = self.driver.wait_status(offer.update_id, C.UPDATE_STATE_FAILED)
        assert st.action == C.ERROR_ACTION_REJECT, st
        assert st.reason.startswith(f"{reason}:"), st.reason
        assert self.serves_v1()
        assert C.UPDATE_STATE_COMMITTED not in [s.state for s in self.driver.statuses
                                                if s.update_id == offer.update_id]


def make_device(tmp_path: Path, mosquitto: Broker, **cfg: object) -> Iterator[Device]:
    driver = OtaDriver(mosquitto.host, mosquitto.port, device_id="dev-a", device_class="cpu-x86")
    driver.publish_keys()
    agent = Agent(config_from_dict(agent_config(tmp_path, host=mosquitto.host,
                                                port=mosquitto.port, driver=driver, **cfg)))
    agent.start()
    try:
        v1 = build_affine(tmp_path / "v1.onnx", marker=1.0).read_bytes()
        o1 = driver.offer("affine", 1, v1)
        driver.wait_status(o1.update_id, C.UPDATE_STATE_COMMITTED)
        yield Device(agent, driver, tmp_path)
    finally:
        agent.stop()
        driver.close()


@pytest.fixture
def dev(tmp_path: Path, mosquitto: Broker) -> Iterator[Device]:
    yield from make_device(tmp_path, mosquitto)


def v2_bytes(dev: Device) -> bytes:
    return build_affine(dev.tmp / "v2.onnx", marker=2.0).read_bytes()


def test_rejects_bad_signature(dev: Device) -> None:
    offer = dev.driver.make_offer("affine", 2, v2_bytes(dev))
    sig = bytearray(offer.envelope.signature)
    sig[0] ^= 0xFF
    offer.envelope.signature = bytes(sig)
    dev.driver.publish_offer(offer)
    dev.expect_reject(offer, "bad_signature")


def test_rejects_tampered_manifest(dev: Device) -> None:
    offer = dev.driver.make_offer("affine", 2, v2_bytes(dev))
    m = offer.manifest
    m.target_size += 1  # changed after signing
    offer.envelope.payload = m.SerializeToString(deterministic=True)
    dev.driver.publish_offer(offer)
    dev.expect_reject(offer, "bad_signature")


def test_rejects_unknown_key(dev: Device) -> None:
    offer = dev.driver.offer("affine", 2, v2_bytes(dev), signer=Ed25519PrivateKey.generate())
    dev.expect_reject(offer, "unknown_key")


def test_rejects_revoked_key(dev: Device) -> None:
    d = dev.driver
    new_signer = Ed25519PrivateKey.generate()
    d.publish_keys(version=2, signers=[d.signer, new_signer],
                   revoked=[envelope.key_id(d.signer.public_key())])
    d.wait_for(lambda: dev.agent.trust.version == 2, what="key list v2 adopted")
    offer = d.offer("affine", 2, v2_bytes(dev))  # still signed by the now revoked key
    dev.expect_reject(offer, "revoked_key")
    # the rotated key works without re-flashing the board
    ok = d.offer("affine", 3, v2_bytes(dev), signer=new_signer)
    d.wait_status(ok.update_id, C.UPDATE_STATE_COMMITTED)


def test_rejects_key_list_not_signed_by_root(dev: Device) -> None:
    d = dev.driver
    rogue_signer = Ed25519PrivateKey.generate()
    d.publish_keys(version=5, signers=[rogue_signer], signed_by=Ed25519PrivateKey.generate())
    offer = d.offer("affine", 2, v2_bytes(dev), signer=rogue_signer)
    dev.expect_reject(offer, "unknown_key")
    assert dev.agent.trust.version == 1


def test_rejects_expired_manifest(dev: Device) -> None:
    offer = dev.driver.offer("affine", 2, v2_bytes(dev), expires_in_s=-1)
    dev.expect_reject(offer, "expired")


def test_rejects_rollback_to_older_or_equal_version(dev: Device) -> None:
    v0 = build_affine(dev.tmp / "v0.onnx", marker=0.5).read_bytes()
    older = dev.driver.offer("affine", 0, v0)
    dev.expect_reject(older, "rollback")
    replay = dev.driver.offer("affine", 1, v2_bytes(dev))  # same version, new content
    dev.expect_reject(replay, "rollback")


def test_rejects_wrong_device_class(dev: Device) -> None:
    offer = dev.driver.offer("affine", 2, v2_bytes(dev), device_class="jetson-orin")
    dev.expect_reject(offer, "wrong_device_class")


def test_rejects_declared_size_over_limit(tmp_path: Path, mosquitto: Broker) -> None:
    for dev in make_device(tmp_path, mosquitto, limits={"max_update_bytes": 64 * 1024}):
        big = build_mlp(tmp_path / "big.onnx", size_mb=0.25).read_bytes()
        assert len(big) > 64 * 1024
        offer = dev.driver.offer("affine", 2, big)
        dev.expect_reject(offer, "too_large")
        assert dev.driver.chunks_sent(offer.update_id) == 0  # nothing was even requested


def test_rejects_tampered_chunk_at_that_chunk(dev: Device) -> None:
    big = build_mlp(dev.tmp / "big.onnx", size_mb=0.25).read_bytes()
    offer = dev.driver.make_offer("affine", 2, big, chunk_size=4096)
    total = len(offer.manifest.chunk_sha256)
    assert total > 40
    offer.tamper[3] = bytes(4096)
    dev.driver.publish_offer(offer)
    dev.expect_reject(offer, "chunk_hash_mismatch")
    st = dev.driver.wait_status(offer.update_id, C.UPDATE_STATE_FAILED)
    assert "chunk 3 " in st.reason
    # rejected on arrival of chunk 3, long before the end of the transfer
    requested = {i for r in dev.driver.requests if r.update_id == offer.update_id
                 for i in r.indices}
    assert max(requested) < total // 2
    assert st.bytes_received < st.bytes_total // 2


def test_rejects_delta_for_a_base_it_does_not_have(dev: Device) -> None:
    offer = dev.driver.offer("affine", 2, b"\x00" * 100, codec="bsdiff4",
                             target=v2_bytes(dev), base_sha256=hashlib.sha256(b"x").hexdigest())
    dev.expect_reject(offer, "missing_base")


def test_rejects_stalled_transfer(tmp_path: Path, mosquitto: Broker) -> None:
    for dev in make_device(tmp_path, mosquitto,
                           update={"stall_timeout_s": 0.3, "max_retries": 2}):
        offer = dev.driver.make_offer("affine", 2, v2_bytes(dev), chunk_size=256)
        offer.withhold_all = True  # slow-retrieval attack: the sender never answers
        dev.driver.publish_offer(offer)
        dev.expect_reject(offer, "stalled")
        reqs = [r for r in dev.driver.requests if r.update_id == offer.update_id]
        assert len(reqs) == 3  # first ask + one re-ask per allowed retry


def test_rejects_target_hash_mismatch_after_patching(dev: Device) -> None:
    payload = v2_bytes(dev)
    wrong = hashlib.sha256(b"another engine").hexdigest()
    offer = dev.driver.offer("affine", 2, payload, target_sha256=wrong)
    dev.expect_reject(offer, "target_hash_mismatch")
    states = dev.driver.states_of(offer.update_id)
    assert states[-2:] == ["PATCHING", "FAILED"]  # caught after patching, never staged


def test_malformed_payloads_on_every_topic_are_ignored(tmp_path: Path, mosquitto: Broker
                                                       ) -> None:
    for dev in make_device(tmp_path, mosquitto, limits={"max_envelope_bytes": 64 * 1024}):
        check_garbage_ignored(dev)


def check_garbage_ignored(dev: Device) -> None:
    d = dev.driver
    garbage = [b"", b"\xff" * 7, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)) * 4]
    subscribed = [topics.device_topic(d.device_id, leaf)
                  for leaf in (topics.OFFER, topics.CHUNK, topics.DESIRED)]
    for topic in subscribed:
        for g in garbage:
            d.publish(topic, g)
    d.publish(topics.TRUST_KEYS, b"\x12\x34garbage")
    d.publish(subscribed[0], b"\x00" * (1024 * 1024))  # over the agent's payload cap
    # the agent is alive, still serves, keeps its trust, and still installs a real update
    assert dev.serves_v1()
    ok = d.offer("affine", 2, v2_bytes(dev))
    d.wait_status(ok.update_id, C.UPDATE_STATE_COMMITTED)
    assert infer(dev.agent.server.url, "affine", ZERO) == [2.0, 2.0, 2.0]
    assert dev.agent.trust.version == 1
