"""Shadow check before activation, on the real agent (in-process) against a real Mosquitto.

An update whose signed manifest carries a ``ShadowSpec`` stops at STAGED while the agent
mirrors a sample of live requests to the staged engine (loaded beside the active one, never
served) and compares: (1) a v2 that agrees with v1 passes under client load and commits with
the report (a first install skips the check: nothing to compare); (2) a v2 with other
outputs fails (``shadow_check: ...``, GIVE_UP) while v1 keeps answering every request;
(3) without traffic the check fails after ``seconds`` ("not enough live traffic"); (4) the
staged engine runs on the shadow thread only and the mirror queue is bounded (drops are
counted); (5) a restart during the observation starts it again from STAGED. Also the check
itself on real onnxruntime engines: the latency-ratio gate and the bounded queue, a staged
engine that does not load; the registry's tap (a raising tap is removed, the request still
succeeds); the comparison helpers. No timing is asserted.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest

from agent.app import Agent
from agent.config import config_from_dict
from agent.update import shadow as S
from protos import envelope
from protos.edgefleet.v1 import common_pb2, update_pb2
from tests.helpers.broker import Broker
from tests.helpers.models import build_affine, build_mlp, fingerprint
from tests.helpers.ota import Offer, OtaDriver, agent_config, infer

C = common_pb2
ZERO = [[0.0, 0.0, 0.0, 0.0]]


@pytest.fixture
def driver(mosquitto: Broker) -> Iterator[OtaDriver]:
    d = OtaDriver(mosquitto.host, mosquitto.port, device_id="dev-shadow",
                  device_class="cpu-x86")
    d.publish_keys()
    yield d
    d.close()


def start_agent(tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> Agent:
    agent = Agent(config_from_dict(agent_config(tmp_path, host=mosquitto.host,
                                                port=mosquitto.port, driver=driver)))
    agent.start()
    return agent


def spec(**kw: Any) -> update_pb2.ShadowSpec:
    fields: dict[str, Any] = {"seconds": 60, "min_samples": 20, "sample_percent": 100,
                              "max_cpu_percent": 50, "min_agreement": 0.99,
                              "max_latency_ratio": 0.0}
    fields.update(kw)
    return update_pb2.ShadowSpec(**fields)


def offer_with_shadow(driver: OtaDriver, name: str, version: int, payload: bytes,
                      shadow: update_pb2.ShadowSpec | None) -> Offer:
    """Sign and publish an offer whose manifest carries ``shadow`` (a message field)."""
    o = driver.make_offer(name, version, payload)
    if shadow is not None:
        o.manifest.shadow.CopyFrom(shadow)
        o.envelope = envelope.sign(o.manifest, driver.signer)
    return driver.publish_offer(o)


def shadow_status(driver: OtaDriver, update_id: str, state: int,
                  timeout_s: float = 60.0) -> update_pb2.UpdateStatus:
    """The status of ``update_id`` in ``state`` that carries a shadow report."""
    return driver.wait_for(lambda: next((s for s in driver.statuses if s.update_id == update_id
                                         and s.state == state and s.HasField("shadow")), None),
                           timeout_s=timeout_s, what=f"{update_id} shadow report")


def wait_check(agent: Agent, key: str = "affine", timeout_s: float = 20.0) -> S.ShadowCheck:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check = agent.updates.shadows.check(key)
        if check is not None:
            return check
        time.sleep(0.02)
    raise TimeoutError("no shadow check started")


def no_shadow_thread() -> bool:
    return not any(t.name == "update-shadow" for t in threading.enumerate())


class Load:
    """Client threads sending random requests to the agent; every failure is counted, and
    every answer is compared with ``reference`` (an onnxruntime session) when given."""

    def __init__(self, url: str, *, reference: onnxruntime.InferenceSession | None = None,
                 threads: int = 3) -> None:
        self.url, self.reference = url, reference
        self.ok = 0
        self.failures: list[str] = []
        self.mismatches: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            x = rng.standard_normal((1, 4)).astype(np.float32)
            try:
                got = infer(self.url, "affine", x.tolist())
            except Exception as e:  # counted: the test asserts there is none
                with self._lock:
                    self.failures.append(repr(e))
                continue
            bad = ""
            if self.reference is not None:
                (want,) = self.reference.run(None, {"x": x})
                if not np.allclose(got, want.ravel(), atol=1e-5):
                    bad = f"{got} != {want.ravel().tolist()}"
            with self._lock:
                self.ok += 1
                if bad:
                    self.mismatches.append(bad)
            time.sleep(0.001)


def install_v1(tmp_path: Path, driver: OtaDriver, *, shadow: update_pb2.ShadowSpec | None
               = None) -> Path:
    v1 = build_affine(tmp_path / "v1.onnx", marker=1.0)
    o1 = offer_with_shadow(driver, "affine", 1, v1.read_bytes(), shadow)
    driver.wait_status(o1.update_id, C.UPDATE_STATE_COMMITTED)
    return v1


# ---- 1. agreeing v2 passes under load ------------------------------------------------------
def test_agreeing_v2_passes_the_shadow_check_under_load_and_commits(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver,
        caplog: pytest.LogCaptureFixture) -> None:
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        with caplog.at_level(logging.INFO, logger="agent.update.shadow"):
            install_v1(tmp_path, driver, shadow=spec())   # first install: nothing to compare
        assert "shadow check skipped" in caplog.text and "first install" in caplog.text
        assert not any(s.HasField("shadow") for s in driver.statuses)
        # same weights, logits shifted by 5e-4: same top-1 everywhere
        v2 = build_affine(tmp_path / "v2.onnx", marker=1.0005)
        with Load(agent.server.url) as load:
            o2 = offer_with_shadow(driver, "affine", 2, v2.read_bytes(),
                                   spec(min_samples=20, sample_percent=50))
            st = shadow_status(driver, o2.update_id, C.UPDATE_STATE_COMMITTED)
        assert st.shadow.passed and st.shadow.samples >= 20
        assert st.shadow.agreement >= 0.99 and st.shadow.staged_p99_ms > 0
        assert st.shadow.active_p99_ms > 0 and "agreement" in st.shadow.detail
        assert driver.states_of(o2.update_id)[-3:] == ["STAGED", "ACTIVATING", "COMMITTED"]
        assert load.ok > 0 and not load.failures
        assert agent.slots.active("affine").version == 2
        assert infer(agent.server.url, "affine", ZERO)[0] == pytest.approx(1.0005)
        hb = driver.wait_for(lambda: next((h for h in reversed(driver.heartbeats)
                                           if h.updates and h.updates[0].HasField("shadow")),
                                          None), what="shadow report in a heartbeat")
        assert hb.updates[0].shadow.passed and hb.updates[0].update_id == o2.update_id
        assert no_shadow_thread() and not agent.registry._taps
    finally:
        agent.stop()


# ---- 2. disagreeing v2 fails, v1 keeps serving ---------------------------------------------
def test_disagreeing_v2_fails_and_v1_keeps_serving_every_request(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        v1 = install_v1(tmp_path, driver)
        reference = onnxruntime.InferenceSession(str(v1))
        v2 = build_affine(tmp_path / "v2.onnx", marker=2.0, seed=1)   # other weights
        with Load(agent.server.url, reference=reference) as load:
            o2 = offer_with_shadow(driver, "affine", 2, v2.read_bytes(), spec())
            st = shadow_status(driver, o2.update_id, C.UPDATE_STATE_FAILED)
            time.sleep(0.3)  # requests after the decision too
        assert st.reason.startswith("shadow_check: agreement ") and "< 0.99" in st.reason
        assert st.action == C.ERROR_ACTION_GIVE_UP
        assert not st.shadow.passed and st.shadow.samples >= 20
        assert st.shadow.agreement < 0.99
        assert "ACTIVATING" not in driver.states_of(o2.update_id)
        assert load.ok > 20 and not load.failures and not load.mismatches
        assert infer(agent.server.url, "affine", ZERO) == [1.0, 1.0, 1.0]
        assert agent.slots.active("affine").version == 1
        assert [(m.version, m.active) for m in agent.registry.served()] == [(1, True)]
        driver.wait_for(no_shadow_thread, what="shadow thread ended")
        assert not agent.registry._taps
    finally:
        agent.stop()


# ---- 3. no traffic -------------------------------------------------------------------------
def test_no_live_traffic_fails_after_seconds(tmp_path: Path, mosquitto: Broker,
                                             driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        install_v1(tmp_path, driver)
        v2 = build_affine(tmp_path / "v2.onnx", marker=1.0005)
        o2 = offer_with_shadow(driver, "affine", 2, v2.read_bytes(),
                               spec(seconds=2, min_samples=5))
        st = shadow_status(driver, o2.update_id, C.UPDATE_STATE_FAILED, timeout_s=30)
        assert "not enough live traffic" in st.reason and st.reason.startswith("shadow_check:")
        assert st.shadow.samples == 0 and not st.shadow.passed
        assert infer(agent.server.url, "affine", ZERO) == [1.0, 1.0, 1.0]
        assert agent.slots.active("affine").version == 1
    finally:
        agent.stop()


# ---- 4. off the serving threads, bounded queue ---------------------------------------------
def test_shadow_runs_on_its_own_thread_and_its_queue_is_bounded(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        install_v1(tmp_path, driver)
        v2 = build_affine(tmp_path / "v2.onnx", marker=1.0005)
        with Load(agent.server.url, threads=4) as load:
            # 1% of a core: the shadow thread pauses ~99x each inference, the queue fills
            o2 = offer_with_shadow(driver, "affine", 2, v2.read_bytes(),
                                   spec(min_samples=30, max_cpu_percent=1))
            check = wait_check(agent)
            st = shadow_status(driver, o2.update_id, C.UPDATE_STATE_COMMITTED)
        stats = check.stats
        assert stats.threads == {"update-shadow"}
        assert stats.tap_threads and all(n.startswith("serve-conn") for n in stats.tap_threads)
        assert not stats.threads & stats.tap_threads
        assert check._queue.maxsize == S.QUEUE_SIZE
        assert stats.dropped > 0 and stats.compared >= 30
        reported = int(re.search(r"(\d+) dropped", st.shadow.detail).group(1))  # type: ignore[union-attr]
        assert 0 < reported <= stats.dropped   # a request in flight may count after the decision
        assert not load.failures
    finally:
        agent.stop()


# ---- 5. restart during the observation -----------------------------------------------------
def test_restart_during_the_observation_restarts_it_from_staged(
        tmp_path: Path, mosquitto: Broker, driver: OtaDriver) -> None:
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        install_v1(tmp_path, driver)
        v2 = build_affine(tmp_path / "v2.onnx", marker=1.0005)
        o2 = offer_with_shadow(driver, "affine", 2, v2.read_bytes(), spec(min_samples=20))
        wait_check(agent)   # observing, no traffic yet
        driver.wait_status(o2.update_id, C.UPDATE_STATE_STAGED)
        assert "ACTIVATING" not in driver.states_of(o2.update_id)
    finally:
        agent.stop()
    assert no_shadow_thread()
    agent = start_agent(tmp_path, mosquitto, driver)
    try:
        assert agent.slots.active("affine").version == 1
        wait_check(agent)   # resumed from STAGED: a new observation
        with Load(agent.server.url) as load:
            st = shadow_status(driver, o2.update_id, C.UPDATE_STATE_COMMITTED)
        assert st.shadow.passed and st.shadow.samples >= 20 and not load.failures
        assert agent.slots.active("affine").version == 2
    finally:
        agent.stop()


# ---- the check on real engines, without an agent -------------------------------------------
class TapRecorder:
    """Stands in for the registry's ``set_tap`` (records the calls)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, str]] = []
        self.tapped = threading.Event()

    def set_tap(self, name: str, tap: Any, *, variant: str = "") -> None:
        self.calls.append((name, tap, variant))
        if tap is not None:
            self.tapped.set()


def test_check_fails_on_latency_ratio_and_drops_when_its_queue_is_full(tmp_path: Path) -> None:
    path = build_mlp(tmp_path / "mlp.onnx", size_mb=2.0)
    session = onnxruntime.InferenceSession(str(path))
    reg = TapRecorder()
    policy = S.ShadowPolicy.from_spec(spec(min_samples=3, max_cpu_percent=1,
                                           max_latency_ratio=2.0))
    check = S.ShadowCheck(policy, registry=reg, name="mlp", queue_size=4,
                          load=lambda: S.load_staged(path, fingerprint=fingerprint(),
                                                     signature=None))
    check.start()
    try:
        assert reg.tapped.wait(20)
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        (y,) = session.run(None, {"x": x})
        for _ in range(20):   # far faster than a thread that pauses 99x each inference
            check.tap({"x": x}, {"y": y}, 1e-6)
        assert check.stats.dropped >= 20 - 4 - 1
        deadline = time.monotonic() + 30
        while (report := check.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert report is not None and not report.passed
        assert report.agreement == pytest.approx(1.0) and report.samples == 3
        assert report.staged_p99_ms / report.active_p99_ms > 2.0 and "> 2" in report.detail
    finally:
        check.close()
    assert reg.calls[-1][1] is None and no_shadow_thread()


def test_check_fails_when_the_staged_engine_does_not_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    reg = TapRecorder()
    check = S.ShadowCheck(S.ShadowPolicy.from_spec(spec()), registry=reg, name="m",
                          load=lambda: S.load_staged(broken, fingerprint=fingerprint(),
                                                     signature=None))
    check.start()
    try:
        deadline = time.monotonic() + 20
        while (report := check.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert report is not None and not report.passed
        assert "staged engine did not load" in report.detail
        assert not any(tap for _n, tap, _v in reg.calls)   # never tapped serving
    finally:
        check.close()


def test_comparison_helpers() -> None:
    logits = np.array([[0.1, 2.0, 0.3], [1.0, 0.0, 0.5]], np.float32)
    assert S.agreement({"y": logits}, {"y": logits + 3.0}) == 1.0      # same top-1
    swapped = logits[:, ::-1].copy()
    assert S.agreement({"y": logits}, {"y": swapped}) == 0.5
    boxes = np.array([10.0, 20.0, 30.0], np.float32)                   # not classifier-like
    assert S.agreement({"b": boxes}, {"b": boxes + 1e-4}) == 1.0
    assert S.agreement({"b": boxes}, {"b": boxes * 1.1}) == 0.0
    assert S.agreement({"y": logits}, {"y": logits[:1]}) == 0.0        # other shape
    assert S.agreement({"y": logits}, {}) == 0.0
    assert S.agreement({"y": logits}, {"y": np.full_like(logits, np.nan)}) == 0.0
    assert S.p99([]) == 0.0 and S.p99([float(i) for i in range(1, 101)]) == 99.0
    pol = S.ShadowPolicy.from_spec(update_pb2.ShadowSpec(seconds=5))
    assert (pol.sample_percent, pol.cpu_fraction) == (S.DEFAULT_SAMPLE_PERCENT, 0.25)
    assert not S.wanted(update_pb2.UpdateManifest())
    assert not S.wanted(update_pb2.UpdateManifest(shadow=update_pb2.ShadowSpec(seconds=0)))
    assert S.wanted(update_pb2.UpdateManifest(shadow=update_pb2.ShadowSpec(seconds=1)))


def test_registry_tap_sees_each_inference_and_a_raising_tap_is_removed(tmp_path: Path) -> None:
    from agent.runtime.registry import ModelRegistry
    from tests.helpers.models import activate_file

    reg = ModelRegistry()
    try:
        activate_file(reg, build_affine(tmp_path / "m.onnx", marker=1.0), name="m", version=1)
        seen: list[tuple[list[float], float]] = []
        reg.set_tap("m", lambda i, o, ms: seen.append((o["y"].ravel().tolist(), ms)))
        x = {"x": np.zeros((1, 4), np.float32)}
        lease = reg.get("m")
        with lease:
            out, _rows = lease.infer(x)
        assert seen == [([1.0, 1.0, 1.0], seen[0][1])] and seen[0][1] >= 0
        reg.set_tap("m", lambda i, o, ms: 1 / 0)
        lease = reg.get("m")
        with lease:
            out, _rows = lease.infer(x)   # the request succeeds; the tap is dropped
        assert out["y"].ravel().tolist() == [1.0, 1.0, 1.0] and not reg._taps
    finally:
        reg.close()
