"""BuildDispatcher: the controller side of remote builds (docs/builder.md).

Engines that must be compiled on hardware of their class (TensorRT) are built by *builders*.
The dispatcher keeps its own MQTT 5 connection (aiomqtt) and:

1. tracks builders from their retained, builder-signed ``BuilderAnnounce`` (last will: the same
   announce with ``online=false``); only builders whose id and public key were enrolled
   (``trusted_builders``) count, anything else is logged and ignored;
2. ``build(...)`` picks an online builder whose facts (engine kind, arch, accelerator,
   toolchain version) match the DeviceClass (fewest running jobs first), publishes a
   ``BuildJob`` signed with the controller's online signing key on
   ``edgefleet/v1/builders/{id}/job`` and waits (``job_timeout_s``) for its ``BuildResult``;
3. serves the job's inputs by sha256 and stages the engine upload over HTTP
   (controller.builder.http mounts the routes; only for live jobs, size-capped, hashed while
   streamed);
4. accepts a result only when it is signed by that builder's enrolled key, names a staged
   upload whose sha256 and size match, and carries a fingerprint that fits the class and the
   builder's announced facts; then stores the engine (content-addressed ArtifactStore) and
   returns the report with a ``builder`` section.

Called by the EdgeModel reconciler through ``compile_remote`` (ModelContext.remote_compile)
when the class's compiler is unavailable locally, and by tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import aiomqtt

from controller.builder.protocol import (
    BuilderFacts,
    BuilderLimits,
    check_fingerprint,
    class_mismatch,
    fingerprint_dict,
    verify_from_builder,
)
from controller.compile.deviceclass import DeviceClassSpec
from controller.ota.keys import KeyStore
from controller.store import ArtifactStore
from protos import envelope, topics
from protos.edgefleet.v1 import builder_pb2
from protos.errors import EdgefleetError, GiveUp, Rejected, RetryLater
from protos.fsutil import atomic_writer, sha256_file

log = logging.getLogger("edgefleet.builder.dispatcher")


class JobState(str, Enum):
    """Lifecycle of one build job on the controller (names as in BuildState)."""

    DISPATCHED = "Dispatched"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    REJECTED = "Rejected"
    TIMED_OUT = "TimedOut"


FINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED, JobState.TIMED_OUT}


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class BuilderInfo:
    builder_id: str
    facts: BuilderFacts
    online: bool
    at_ms: int
    key_id: str
    builder_version: str = ""
    active_jobs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.builder_id, "online": self.online, "at_ms": self.at_ms,
                "key_id": self.key_id, "builder_version": self.builder_version,
                "active_jobs": self.active_jobs, "facts": {
                    "engine_kind": self.facts.engine_kind, "arch": self.facts.arch,
                    "accelerator": self.facts.accelerator, "toolchain": self.facts.toolchain,
                    "toolchain_version": self.facts.toolchain_version,
                    "precisions": list(self.facts.precisions)}}


@dataclass
class JobRecord:
    job_id: str
    builder: BuilderInfo
    device_class: DeviceClassSpec
    precisions: list[str]
    model_sha256: str
    inputs: dict[str, int]                       # sha256 -> size the builder may fetch
    max_engine_bytes: int
    future: asyncio.Future[dict[str, Any]]
    state: JobState = JobState.DISPATCHED
    staged: dict[str, tuple[Path, int]] = field(default_factory=dict)  # sha -> (path, size)
    message: str = ""


class BuildDispatcher:
    """Sends build jobs to enrolled builders and verifies what comes back."""

    def __init__(self, *, store: ArtifactStore, keys: KeyStore, trusted_builders: dict[str, bytes],
                 mqtt_host: str, mqtt_port: int, work_dir: Path,
                 limits: BuilderLimits | None = None, mqtt_username: str | None = None,
                 mqtt_password: str | None = None, publish_key_list: bool = True,
                 mqtt_options: dict[str, Any] | None = None) -> None:
        self.store = store
        self.keys = keys
        self.trusted = dict(trusted_builders)
        self.mqtt_host, self.mqtt_port = mqtt_host, mqtt_port
        self.mqtt_username, self.mqtt_password = mqtt_username, mqtt_password
        self.limits = limits or BuilderLimits()
        self.publish_key_list = publish_key_list
        # aiomqtt.Client keyword arguments: protocol + TLS (controller Settings.aiomqtt_options)
        self.mqtt_options: dict[str, Any] = dict(
            mqtt_options or {"protocol": aiomqtt.ProtocolVersion.V5})
        self.staging = Path(work_dir) / "builds"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.connected = asyncio.Event()
        self.untrusted_seen: dict[str, str] = {}     # builder id -> why it was ignored
        self.history: list[dict[str, Any]] = []      # finished jobs (newest last, capped)
        self._builders: dict[str, BuilderInfo] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()                # staging is touched by HTTP handlers
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._mqtt_loop(), name="build-dispatcher-mqtt")

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._bg] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for job in list(self._jobs.values()):
            if not job.future.done():
                job.future.set_exception(RetryLater("controller stopping", reason="stopping"))
        shutil.rmtree(self.staging, ignore_errors=True)

    async def _mqtt_loop(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.mqtt_host, self.mqtt_port,
                    identifier=f"edgefleet-builds-{uuid.uuid4().hex[:8]}", keepalive=30,
                    username=self.mqtt_username, password=self.mqtt_password,
                    **self.mqtt_options,
                ) as client:
                    await client.subscribe(topics.builder_subscription(topics.BUILDER_ANNOUNCE),
                                           qos=1)
                    await client.subscribe(topics.builder_subscription(topics.BUILDER_RESULT),
                                           qos=1)
                    if self.publish_key_list:
                        await client.publish(topics.TRUST_KEYS, self.keys.key_list_envelope()
                                             .SerializeToString(deterministic=True),
                                             qos=1, retain=True)
                    self._client = client
                    self.connected.set()
                    async for message in client.messages:
                        payload = message.payload
                        data = bytes(payload) if isinstance(payload, (bytes, bytearray)) else b""
                        self._handle(str(message.topic), data)
            except aiomqtt.MqttError as e:
                log.warning("build dispatcher lost MQTT %s:%d: %s; retrying", self.mqtt_host,
                            self.mqtt_port, e)
            except Exception:
                log.exception("build dispatcher MQTT loop error")
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(1.0)

    # -- builders -------------------------------------------------------------------------------
    def builders(self) -> list[dict[str, Any]]:
        return [b.to_dict() for b in sorted(self._builders.values(), key=lambda b: b.builder_id)]

    def pick(self, device_class: DeviceClassSpec) -> BuilderInfo:
        """An online enrolled builder for the class (fewest running jobs); RetryLater if none."""
        fits = [b for b in self._builders.values()
                if b.online and class_mismatch(b.facts, device_class) is None]
        if not fits:
            seen = "; ".join(f"{b.builder_id} ({b.facts.describe()}"
                             f"{'' if b.online else ', offline'})"
                             for b in self._builders.values()) or "none"
            want = " ".join(x for x in (device_class.engine_kind, device_class.arch,
                                        device_class.accelerator,
                                        device_class.toolchain_version) if x)
            raise RetryLater(f"no online builder for class {device_class.name} ({want}); "
                             f"builders: {seen}", reason="no_builder")
        return min(fits, key=lambda b: (b.active_jobs, b.builder_id))

    def _handle(self, topic: str, data: bytes) -> None:
        parsed = topics.parse_builder_topic(topic)
        if parsed is None:
            return
        bid, leaf = parsed.device_id, parsed.leaf
        if len(data) > self.limits.max_mqtt_payload_bytes:
            log.warning("builder %s: %s message of %d bytes over max_mqtt_payload_bytes=%d",
                        bid, leaf, len(data), self.limits.max_mqtt_payload_bytes)
            return
        try:
            if leaf == topics.BUILDER_ANNOUNCE:
                self._on_announce(bid, data)
            elif leaf == topics.BUILDER_RESULT:
                self._on_result(bid, data)
        except EdgefleetError as e:
            log.warning("builder %s: %s refused: %s", bid, leaf, e)

    def _on_announce(self, bid: str, data: bytes) -> None:
        if not data:                      # retained announce cleared
            self._builders.pop(bid, None)
            return
        pub = self.trusted.get(bid)
        if pub is None:
            self.untrusted_seen[bid] = "not enrolled"
            raise Rejected(f"builder {bid} is not enrolled (add its public key to the trusted "
                           "builders)", reason="unknown_builder")
        env = envelope.parse_envelope(data, max_bytes=self.limits.max_mqtt_payload_bytes)
        a = verify_from_builder(env, public_key=pub, message_type=builder_pb2.BuilderAnnounce)
        if a.builder_id != bid or a.public_key != pub:
            raise Rejected(f"announce names builder {a.builder_id!r} / another key",
                           reason="wrong_builder")
        old = self._builders.get(bid)
        if old is not None and a.at_ms < old.at_ms:
            return                        # a replayed or stale announce
        info = BuilderInfo(builder_id=bid, facts=BuilderFacts.from_announce(a),
                           online=a.online, at_ms=a.at_ms, key_id=env.key_id,
                           builder_version=a.builder_version,
                           active_jobs=old.active_jobs if old else 0)
        self._builders[bid] = info
        log.info("builder %s %s: %s", bid, "online" if a.online else "offline",
                 info.facts.describe())

    # -- jobs -----------------------------------------------------------------------------------
    async def build(self, model_sha256: str, *, device_class: DeviceClassSpec,
                    precisions: list[str], validation_sha256: str | None = None,
                    accuracy: dict[str, Any] | None = None, model_name: str = "",
                    builder_id: str | None = None,
                    timeout_s: float | None = None) -> dict[str, Any]:
        """Build on a matching builder; returns the CompileReport dict of the stored engine.

        ``builder_id`` sends the job to that builder without matching its facts (the builder
        still refuses a class it cannot build). Raises RetryLater (no builder, not connected,
        timeout), Rejected (bad result, builder refused) or GiveUp (the compile failed).
        """
        if not self.store.has(model_sha256):
            raise Rejected(f"model {model_sha256} is not in the store", reason="not_found")
        if validation_sha256 and not self.store.has(validation_sha256):
            raise Rejected(f"validation samples {validation_sha256} are not in the store",
                           reason="not_found")
        if builder_id is not None:
            b = self._builders.get(builder_id)
            if b is None or not b.online:
                raise RetryLater(f"builder {builder_id} is not online", reason="no_builder")
        else:
            b = self.pick(device_class)
        client = self._client
        if client is None:
            raise RetryLater("build dispatcher is not connected to MQTT", reason="offline")
        now = _now_ms()
        job_id = uuid.uuid4().hex
        inputs = {model_sha256: self.store.size(model_sha256)}
        msg = builder_pb2.BuildJob(
            job_id=job_id, builder_id=b.builder_id, device_class=device_class.name,
            device_class_spec_json=json.dumps(device_class.to_spec(), sort_keys=True),
            model=builder_pb2.ArtifactRef(sha256=model_sha256, size=inputs[model_sha256]),
            precisions=list(precisions), accuracy_json=json.dumps(accuracy) if accuracy else "",
            max_engine_bytes=self.limits.max_engine_bytes, issued_at_ms=now,
            expires_at_ms=now + int(self.limits.job_ttl_s * 1000), model_name=model_name)
        if validation_sha256:
            inputs[validation_sha256] = self.store.size(validation_sha256)
            msg.validation.sha256 = validation_sha256
            msg.validation.size = inputs[validation_sha256]
        job = JobRecord(job_id=job_id, builder=b, device_class=device_class,
                        precisions=list(precisions), model_sha256=model_sha256, inputs=inputs,
                        max_engine_bytes=self.limits.max_engine_bytes,
                        future=asyncio.get_running_loop().create_future())
        self._jobs[job_id] = job
        b.active_jobs += 1
        log.info("build job %s: %s for %s on builder %s", job_id[:12], model_name or
                 model_sha256[:12], device_class.name, b.builder_id)
        try:
            await client.publish(topics.builder_topic(b.builder_id, topics.BUILDER_JOB),
                                 self.keys.sign(msg).SerializeToString(deterministic=True),
                                 qos=1)
            timeout = self.limits.job_timeout_s if timeout_s is None else timeout_s
            try:
                return await asyncio.wait_for(asyncio.shield(job.future), timeout)
            except asyncio.TimeoutError:
                job.state = JobState.TIMED_OUT
                raise RetryLater(f"builder {b.builder_id} sent no result for job {job_id[:12]} "
                                 f"within {timeout:g}s", reason="build_timeout") from None
        except aiomqtt.MqttError as e:
            raise RetryLater(f"cannot publish build job: {e}", reason="offline") from e
        finally:
            b.active_jobs = max(0, b.active_jobs - 1)
            self._finish(job)

    async def compile_remote(self, model_sha256: str, *, device_class: dict[str, Any],
                             precisions: list[str], validation_sha256: str | None,
                             accuracy: dict[str, Any] | None,
                             model_name: str = "") -> dict[str, Any]:
        """For the reconciler: ``build`` with a DeviceClassSpec dict; failures as data.

        Returns ``{"ok": True, "report": {...}}`` or ``{"ok": False, "error", "reason",
        "transient"}`` (transient: RetryLater, e.g. no builder yet; retry on the next resync).
        """
        try:
            dc = DeviceClassSpec(**{**device_class, "isa": tuple(device_class.get("isa", ()))})
            rep = await self.build(model_sha256, device_class=dc, precisions=precisions,
                                   validation_sha256=validation_sha256, accuracy=accuracy,
                                   model_name=model_name)
            return {"ok": True, "report": rep}
        except EdgefleetError as e:
            return {"ok": False, "error": str(e), "reason": e.reason,
                    "transient": isinstance(e, RetryLater)}

    def _finish(self, job: JobRecord) -> None:
        self._jobs.pop(job.job_id, None)
        with self._lock:
            staged, job.staged = dict(job.staged), {}
        for path, _size in staged.values():
            path.unlink(missing_ok=True)
        shutil.rmtree(self.staging / job.job_id, ignore_errors=True)
        self.history.append({"job_id": job.job_id, "builder": job.builder.builder_id,
                             "device_class": job.device_class.name, "state": job.state.value,
                             "message": job.message, "at_ms": _now_ms()})
        del self.history[:-100]

    def _on_result(self, bid: str, data: bytes) -> None:
        pub = self.trusted.get(bid)
        if pub is None:
            raise Rejected(f"result from builder {bid}, which is not enrolled",
                           reason="unknown_builder")
        env = envelope.parse_envelope(data, max_bytes=self.limits.max_mqtt_payload_bytes)
        r = verify_from_builder(env, public_key=pub, message_type=builder_pb2.BuildResult)
        job = self._jobs.get(r.job_id)
        if job is None or job.builder.builder_id != bid or r.builder_id != bid:
            log.info("builder %s: result for unknown job %s (%s: %s)", bid, r.job_id[:12],
                     builder_pb2.BuildState.Name(r.state), r.message)
            return
        if job.state in FINAL or job.future.done():
            return
        if r.state == builder_pb2.BUILD_STATE_RUNNING:
            job.state = JobState.RUNNING
        elif r.state in (builder_pb2.BUILD_STATE_FAILED, builder_pb2.BUILD_STATE_REJECTED):
            refused = r.state == builder_pb2.BUILD_STATE_REJECTED
            job.state = JobState.REJECTED if refused else JobState.FAILED
            job.message = f"builder {bid}: {r.message}"
            err: EdgefleetError = (Rejected(job.message, reason=r.reason or "rejected")
                                   if refused else GiveUp(job.message,
                                                          reason=r.reason or "compile_failed"))
            job.future.set_exception(err)
        elif r.state == builder_pb2.BUILD_STATE_SUCCEEDED:
            task = asyncio.get_running_loop().create_task(self._accept(job, r, env.key_id))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _accept(self, job: JobRecord, r: builder_pb2.BuildResult, key_id: str) -> None:
        """Verify a SUCCEEDED result against the staged upload, then store the engine."""
        try:
            rep = await asyncio.to_thread(self._verify_and_store, job, r, key_id)
        except EdgefleetError as e:
            job.state = JobState.REJECTED
            job.message = f"builder {job.builder.builder_id}: result rejected: {e}"
            log.warning("job %s: %s", job.job_id[:12], job.message)
            if not job.future.done():
                job.future.set_exception(Rejected(job.message, reason=e.reason))
            return
        except Exception as e:  # disk errors and the like: this job's failure only
            job.state = JobState.FAILED
            job.message = f"storing the engine failed: {type(e).__name__}: {e}"
            if not job.future.done():
                job.future.set_exception(GiveUp(job.message, reason="store_failed"))
            return
        job.state = JobState.SUCCEEDED
        if not job.future.done():
            job.future.set_result(rep)

    def _verify_and_store(self, job: JobRecord, r: builder_pb2.BuildResult,
                          key_id: str) -> dict[str, Any]:
        with self._lock:
            staged = job.staged.get(r.engine_sha256)
        if staged is None:
            raise Rejected(f"engine {r.engine_sha256[:16]} was never uploaded (or its upload "
                           "did not match its sha256)", reason="not_uploaded")
        path, size = staged
        if r.engine_size != size or size > job.max_engine_bytes:
            raise Rejected(f"engine size {r.engine_size} does not match the {size} bytes "
                           "uploaded", reason="size_mismatch")
        if sha256_file(path) != r.engine_sha256:   # staged bytes changed on disk since upload
            raise Rejected("staged engine no longer matches its sha256", reason="hash_mismatch")
        fp = fingerprint_dict(r.fingerprint)
        check_fingerprint(fp, device_class=job.device_class, facts=job.builder.facts,
                          precisions=job.precisions)
        if len(r.report_json) > self.limits.max_report_bytes:
            raise Rejected(f"report of {len(r.report_json)} bytes is over max_report_bytes",
                           reason="too_large")
        try:
            report = json.loads(r.report_json) if r.report_json else {}
        except ValueError as e:
            raise Rejected(f"report is not JSON: {e}", reason="malformed") from e
        if not isinstance(report, dict):
            raise Rejected("report is not a JSON object", reason="malformed")
        if report.get("model_sha256") and report["model_sha256"] != job.model_sha256:
            raise Rejected("report is for another model", reason="wrong_model")
        stored = self.store.put_file(path, kind="engine", max_bytes=job.max_engine_bytes, meta={
            "deviceClass": job.device_class.name, "precision": fp["precision"],
            "builder": job.builder.builder_id, "builderKeyId": key_id, "buildJob": job.job_id})
        report.update({
            "engine_path": str(self.store.path(stored.sha256)), "engine_sha256": stored.sha256,
            "size": stored.size, "fingerprint": fp, "engine_kind": fp["engine_kind"],
            "toolchain_version": fp["toolchain_version"], "precision": fp["precision"],
            "device_class": job.device_class.name, "model_sha256": job.model_sha256,
            "builder": {"id": job.builder.builder_id, "key_id": key_id, "job_id": job.job_id,
                        "builder_version": job.builder.builder_version,
                        "facts": job.builder.to_dict()["facts"]}})
        report.setdefault("rejected", [])
        report.setdefault("signature", {})
        log.info("job %s: stored engine %s (%d bytes) from builder %s", job.job_id[:12],
                 stored.sha256[:12], stored.size, job.builder.builder_id)
        return report

    # -- HTTP side (controller.builder.http) ---------------------------------------------------
    def input_path(self, job_id: str, sha256: str) -> Path:
        """A job input the builder may download; Rejected (404) otherwise."""
        job = self._jobs.get(job_id)
        if job is None or job.state in FINAL or sha256 not in job.inputs:
            raise Rejected("no such input for a running build job", reason="not_found")
        return self.store.path(sha256)

    async def stage_upload(self, job_id: str, sha256: str,
                           stream: AsyncIterator[bytes]) -> dict[str, Any]:
        """Stream an engine upload to the job's staging folder; it must hash to ``sha256``."""
        job = self._jobs.get(job_id)
        if job is None or job.state in FINAL:
            raise Rejected("no running build job with that id", reason="not_found")
        with self._lock:
            if sha256 in job.staged:
                return {"sha256": sha256, "size": job.staged[sha256][1]}
            if len(job.staged) >= self.limits.max_uploads_per_job:
                raise GiveUp("too many uploads for this job", reason="too_many_uploads")
        folder = self.staging / job_id
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / sha256
        h, size = hashlib.sha256(), 0
        with atomic_writer(dest, mode=0o600) as f:   # dest appears only once it hashes right
            async for block in stream:
                size += len(block)
                if size > job.max_engine_bytes:
                    raise Rejected(f"engine upload over max_engine_bytes="
                                   f"{job.max_engine_bytes}", reason="too_large")
                h.update(block)
                f.write(block)
            if h.hexdigest() != sha256:
                raise Rejected(f"upload hashes to {h.hexdigest()}, not the declared {sha256}",
                               reason="hash_mismatch")
        with self._lock:
            if job.job_id not in self._jobs:   # the job ended while we streamed
                dest.unlink(missing_ok=True)
                raise Rejected("the build job ended during the upload", reason="not_found")
            job.staged[sha256] = (dest, size)
        return {"sha256": sha256, "size": size}
