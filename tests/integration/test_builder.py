"""Remote builder protocol end to end: real Mosquitto, real HTTP (uvicorn), real store, real
builder process (``python -m controller.builder.program``) with ``--engine-kind
onnxruntime-cpu`` standing in for TensorRT (no GPU here: the TensorRT compiler is not run).

``ProtocolBuilder`` is an in-test builder that speaks the same protocol with an enrolled key:
it plays a TensorRT builder we do not have (hardware fake behind the wire interface) and a
misbehaving one (tampered upload, lying size, wrong fingerprint, foreign signature).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from sqlmodel import Session, select

from controller.builder.dispatcher import BuildDispatcher
from controller.builder.http import install_builder_routes
from controller.builder.protocol import BuilderLimits, load_or_create_identity
from controller.compile.deviceclass import DeviceClassSpec, get_device_class
from controller.fleet.db import make_engine
from controller.fleet.models import Artifact, Engine
from controller.ota.keys import KeyStore
from controller.store import ArtifactStore
from protos import envelope, topics
from protos.edgefleet.v1 import builder_pb2, common_pb2, update_pb2
from protos.errors import Rejected, RetryLater
from tests.helpers.broker import free_port
from tests.helpers.controller import mqtt_client, started_core, wait_sync, wait_until
from tests.helpers.models import build_affine

CPU = DeviceClassSpec(name="cpu-x86-64", engine_kind="onnxruntime-cpu", arch="x86_64")
TRT_FACTS = {"engine_kind": "tensorrt", "arch": "aarch64", "accelerator": "sm_87",
             "toolchain": "tensorrt", "toolchain_version": "10.3.0"}


@dataclass
class Side:
    dispatcher: BuildDispatcher
    store: ArtifactStore
    keys: KeyStore
    url: str
    db: Any


@asynccontextmanager
async def controller_side(tmp: Path, broker: Any, trusted: dict[str, bytes], *,
                          store: ArtifactStore | None = None, keys: KeyStore | None = None,
                          db: Any = None) -> AsyncIterator[Side]:
    """BuildDispatcher + its HTTP routes served by uvicorn on this event loop."""
    if db is None:
        db = make_engine(f"sqlite:///{tmp / 'ctl.db'}")
    keys = keys or KeyStore.init(tmp / "keys")
    store = store or ArtifactStore(tmp / "store", engine=db)
    d = BuildDispatcher(store=store, keys=keys, trusted_builders=trusted,
                        mqtt_host=broker.host, mqtt_port=broker.port, work_dir=tmp / "work",
                        limits=BuilderLimits(job_timeout_s=120, max_engine_bytes=1 << 20))
    await d.start()
    await asyncio.wait_for(d.connected.wait(), 15)
    app = FastAPI()
    install_builder_routes(app, d)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, what="uvicorn started")
    try:
        yield Side(d, store, keys, f"http://127.0.0.1:{port}", db)
    finally:
        server.should_exit = True
        await task
        await d.stop()


def start_builder(tmp: Path, bid: str, side: Side, broker: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "controller.builder.program", "--id", bid,
         "--engine-kind", "onnxruntime-cpu", "--controller", side.url,
         "--mqtt", f"{broker.host}:{broker.port}",
         "--root-pub", str(side.keys.dir / "root.pub"), "--work-dir", str(tmp / bid),
         "--key", str(tmp / f"{bid}.key")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop_builder(p: subprocess.Popen[bytes]) -> str:
    p.terminate()
    try:
        out, _ = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    return out.decode(errors="replace")


class ProtocolBuilder:
    """An in-test builder on the wire: signed announce, jobs queued for the test to answer."""

    def __init__(self, bid: str, port: int, key: Ed25519PrivateKey, facts: dict[str, str]):
        self.id, self.key, self.facts = bid, key, facts
        self.jobs: queue.Queue[update_pb2.SignedEnvelope] = queue.Queue()
        self.client = mqtt_client(port, f"fake-{bid}-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message
        self.client.subscribe(topics.builder_topic(bid, topics.BUILDER_JOB), qos=1)
        a = builder_pb2.BuilderAnnounce(builder_id=bid, online=True, at_ms=1,
                                        public_key=envelope.public_raw(key.public_key()),
                                        precisions=["fp32"], **facts)
        self.client.publish(topics.builder_topic(bid, topics.BUILDER_ANNOUNCE),
                            envelope.sign(a, key).SerializeToString(), qos=1, retain=True)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        env = update_pb2.SignedEnvelope()
        env.ParseFromString(msg.payload)
        self.jobs.put(env)

    async def next_job(self) -> builder_pb2.BuildJob:
        env = await asyncio.to_thread(self.jobs.get, True, 30)
        job = builder_pb2.BuildJob()
        job.ParseFromString(env.payload)
        return job

    def result(self, job: builder_pb2.BuildJob, *, sha: str, size: int,
               key: Ed25519PrivateKey | None = None, **fp_over: str) -> None:
        fp = common_pb2.EngineFingerprint(**{**self.facts, "precision": "fp32", **fp_over})
        r = builder_pb2.BuildResult(job_id=job.job_id, builder_id=self.id,
                                    state=builder_pb2.BUILD_STATE_SUCCEEDED, engine_sha256=sha,
                                    engine_size=size, fingerprint=fp,
                                    report_json=json.dumps({"latency_ms": 1.5}))
        self.client.publish(topics.builder_topic(self.id, topics.BUILDER_RESULT),
                            envelope.sign(r, key or self.key).SerializeToString(), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def upload(url: str, job: builder_pb2.BuildJob, data: bytes, *, sha: str) -> int:
    async with httpx.AsyncClient() as c:
        r = await c.put(f"{url}/api/v1/builds/{job.job_id}/engine", params={"sha256": sha},
                        content=data)
    return r.status_code


def _pub(key: Ed25519PrivateKey) -> bytes:
    return envelope.public_raw(key.public_key())


async def test_real_builder_process_builds_and_refuses_bad_jobs(tmp_path: Path,
                                                                mosquitto: Any) -> None:
    key = load_or_create_identity(tmp_path / "b1.key")
    model = build_affine(tmp_path / "m.onnx", marker=1.0)
    x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    np.savez(tmp_path / "val.npz", inputs=x)
    async with controller_side(tmp_path, mosquitto, {"b1": _pub(key)}) as side:
        d = side.dispatcher
        msha = side.store.put_file(model, kind="model").sha256
        vsha = side.store.put_file(tmp_path / "val.npz", kind="samples").sha256
        spy = mqtt_client(mosquitto.port, "spy")
        seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
        spy.on_message = lambda _c, _u, m: seen.put((m.topic, bytes(m.payload)))
        spy.subscribe(topics.builder_subscription(topics.BUILDER_JOB), qos=1)
        spy.subscribe(topics.builder_subscription(topics.BUILDER_RESULT), qos=1)
        proc = start_builder(tmp_path, "b1", side, mosquitto)
        try:
            await wait_until(lambda: any(b["id"] == "b1" and b["online"] for b in d.builders()),
                             timeout_s=60, what="builder b1 announced")
            [b1] = d.builders()
            assert b1["facts"]["engine_kind"] == "onnxruntime-cpu"
            assert b1["facts"]["toolchain_version"] == ort.__version__

            rep = await d.build(msha, device_class=CPU, precisions=["fp32"],
                                validation_sha256=vsha, model_name="affine",
                                accuracy={"metric": "max-abs-error", "budget": 1e-4})
            sha = rep["engine_sha256"]
            assert side.store.has(sha)
            stored = side.store.path(sha)
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha
            assert rep["size"] == stored.stat().st_size
            assert rep["builder"]["id"] == "b1"
            assert rep["builder"]["key_id"] == envelope.key_id(_pub(key))
            assert rep["fingerprint"]["engine_kind"] == "onnxruntime-cpu"
            assert rep["fingerprint"]["toolchain_version"] == ort.__version__
            assert rep["metric"]["passed"] and rep["model_sha256"] == msha
            with Session(side.db) as s:
                art = s.get(Artifact, sha)
                assert art is not None and art.kind == "engine" and art.meta["builder"] == "b1"
            ref = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
            got = ort.InferenceSession(str(stored)).run(None, {"x": x})[0]
            np.testing.assert_allclose(got, ref, rtol=1e-6)

            # the job the controller published, as the broker carried it
            msgs: list[tuple[str, bytes]] = []

            def job_seen() -> bytes | None:
                while not seen.empty():
                    msgs.append(seen.get_nowait())
                return next((p for t, p in msgs if t.endswith("/job")), None)
            job_env = await wait_until(job_seen, what="job on the wire")

            async def refusal(payload: bytes, job_id: str) -> builder_pb2.BuildResult:
                spy.publish(topics.builder_topic("b1", topics.BUILDER_JOB), payload, qos=1)

                def found() -> builder_pb2.BuildResult | None:
                    while not seen.empty():
                        t, p = seen.get_nowait()
                        if not t.endswith("/result"):
                            continue
                        r = envelope.verify(envelope.parse_envelope(p),
                                            envelope.load_public(_pub(key)),
                                            builder_pb2.BuildResult)
                        if r.job_id == job_id and r.state == builder_pb2.BUILD_STATE_REJECTED:
                            return r
                    return None
                return await wait_until(found, timeout_s=30, what=f"refusal of {job_id!r}")

            # unsigned (signed by a key the root never listed)
            forged = builder_pb2.BuildJob(job_id="f" * 32, builder_id="b1",
                                          device_class="cpu-x86-64",
                                          device_class_spec_json=json.dumps(CPU.to_spec()),
                                          model=builder_pb2.ArtifactRef(sha256=msha, size=1),
                                          precisions=["fp32"])
            r = await refusal(envelope.sign(forged, Ed25519PrivateKey.generate())
                              .SerializeToString(), "f" * 32)
            assert r.reason == "unknown_key"
            r = await refusal(b"\x00garbage", "")
            assert r.reason == "malformed"
            replayed = builder_pb2.BuildJob()
            replayed.ParseFromString(envelope.parse_envelope(job_env).payload)
            r = await refusal(job_env, replayed.job_id)
            assert r.reason == "replayed"

            # wrong class: no builder matches; pinned to b1 anyway, the builder refuses it
            arm = DeviceClassSpec(name="cpu-aarch64", engine_kind="onnxruntime-cpu",
                                  arch="aarch64")
            with pytest.raises(RetryLater, match="no online builder.*b1"):
                await d.build(msha, device_class=arm, precisions=["fp32"])
            with pytest.raises(Rejected, match="builder b1: this builder is x86_64") as ei:
                await d.build(msha, device_class=arm, precisions=["fp32"], builder_id="b1")
            assert ei.value.reason == "wrong_class"
            assert proc.poll() is None, "bad jobs must not stop the builder"
        finally:
            spy.disconnect()
            out = stop_builder(proc)
        assert proc.returncode == 0, out
        await wait_until(lambda: not d.builders()[0]["online"], what="offline announce")


async def test_dispatcher_rejects_bad_results(tmp_path: Path, mosquitto: Any) -> None:
    rkey, xkey = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    jetson = get_device_class("jetson-orin")
    model = build_affine(tmp_path / "m.onnx", marker=2.0)
    async with controller_side(tmp_path, mosquitto, {"r1": _pub(rkey)}) as side:
        d = side.dispatcher
        msha = side.store.put_file(model, kind="model").sha256
        rogue = ProtocolBuilder("r1", mosquitto.port, rkey, TRT_FACTS)
        stranger = ProtocolBuilder("x9", mosquitto.port, xkey, TRT_FACTS)  # never enrolled
        try:
            await wait_until(lambda: [b["id"] for b in d.builders()] == ["r1"]
                             and "x9" in d.untrusted_seen, what="announces")
            engine = b"not really a TensorRT plan " * 100
            esha = hashlib.sha256(engine).hexdigest()

            async def attempt(answer: Any, **kw: Any) -> Any:
                t = asyncio.create_task(d.build(msha, device_class=jetson,
                                                precisions=["fp32"], **kw))
                job = await rogue.next_job()
                assert job.device_class == "jetson-orin" and job.model.sha256 == msha
                await answer(job)
                return await t

            async def tampered(job: builder_pb2.BuildJob) -> None:
                async with httpx.AsyncClient() as c:
                    r = await c.get(f"{side.url}/api/v1/builds/{job.job_id}/inputs/{'0' * 64}")
                    assert r.status_code == 404        # only the job's own inputs
                    r = await c.get(f"{side.url}/api/v1/builds/{job.job_id}/inputs/{msha}")
                    assert r.content == model.read_bytes()
                assert await upload(side.url, job, engine + b"!", sha=esha) == 422
                rogue.result(job, sha=esha, size=len(engine))
            with pytest.raises(Rejected, match="never uploaded"):
                await attempt(tampered)

            async def lying_size(job: builder_pb2.BuildJob) -> None:
                assert await upload(side.url, job, engine, sha=esha) == 201
                rogue.result(job, sha=esha, size=len(engine) + 1)
            with pytest.raises(Rejected, match="size"):
                await attempt(lying_size)

            async def wrong_fp(job: builder_pb2.BuildJob) -> None:
                assert await upload(side.url, job, engine, sha=esha) == 201
                rogue.result(job, sha=esha, size=len(engine), accelerator="sm_86")
            with pytest.raises(Rejected, match="sm_86") as ei:
                await attempt(wrong_fp)
            assert ei.value.reason == "fingerprint_mismatch"

            async def foreign_sig(job: builder_pb2.BuildJob) -> None:
                assert await upload(side.url, job, engine, sha=esha) == 201
                rogue.result(job, sha=esha, size=len(engine), key=xkey)
            with pytest.raises(RetryLater, match="no result"):
                await attempt(foreign_sig, timeout_s=3)
            assert not side.store.has(esha)

            async def honest(job: builder_pb2.BuildJob) -> None:
                assert await upload(side.url, job, engine, sha=esha) == 201
                rogue.result(job, sha=esha, size=len(engine))
            rep = await attempt(honest)
            assert rep["engine_sha256"] == esha and side.store.has(esha)
            assert rep["builder"]["id"] == "r1" and rep["fingerprint"]["accelerator"] == "sm_87"
            assert [j["state"] for j in d.history] == ["Rejected"] * 3 + ["TimedOut",
                                                                           "Succeeded"]
        finally:
            rogue.close()
            stranger.close()


async def test_reconciler_sends_unavailable_backend_to_a_builder(tmp_path: Path,
                                                                 mosquitto: Any) -> None:
    tkey = Ed25519PrivateKey.generate()
    async with started_core(tmp_path / "c", mosquitto) as core, controller_side(
            tmp_path, mosquitto, {"t1": _pub(tkey)}, store=core.store, keys=core.keys,
            db=core.db) as side:
        core.build_dispatcher = side.dispatcher
        msha = core.upload_artifact(build_affine(tmp_path / "m.onnx", marker=3.0))
        doc = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel",
               "metadata": {"name": "det", "namespace": "default"},
               "spec": {"version": 1, "source": {"sha256": msha},
                        "targets": [{"deviceClass": "jetson-orin", "precisions": ["fp32"]}]}}
        assert [r.action for r in core.apply([doc])] == ["created"]

        def status() -> dict[str, Any]:
            return (core.get("EdgeModel", "default", "det") or {}).get("status") or {}

        # TensorRT is not available here and no builder is online: a retryable failure
        await wait_until(lambda: "no online builder" in json.dumps(status()), timeout_s=60,
                         what="no-builder status")
        trt = ProtocolBuilder("t1", mosquitto.port, tkey, TRT_FACTS)
        try:
            job = await trt.next_job()
            async with httpx.AsyncClient() as c:
                r = await c.get(f"{side.url}/api/v1/builds/{job.job_id}/inputs/{msha}")
            plan = b"PLAN" + r.content
            psha = hashlib.sha256(plan).hexdigest()
            assert await upload(side.url, job, plan, sha=psha) == 201
            trt.result(job, sha=psha, size=len(plan))
            await wait_until(lambda: status().get("phase") == "Ready", timeout_s=60,
                             what="EdgeModel Ready")
        finally:
            trt.close()
        [eng] = status()["engines"]
        assert eng["sha256"] == psha and eng["engineKind"] == "tensorrt"
        with Session(core.db) as s:
            row = s.exec(select(Engine).where(Engine.engine_sha256 == psha)).one()
        assert row.fingerprint["accelerator"] == "sm_87" and row.report["builder"]["id"] == "t1"
        wait_sync(lambda: core.store.has(psha), what="engine stored")
