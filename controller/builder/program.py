"""The builder program: ``edgefleet builder run`` (``run_builder(argv) -> int``).

Runs on a machine of a device class's kind (a GPU node with the class's TensorRT version, or
later a board that volunteers) and compiles engines for the controller (docs/builder.md):

1. probes its facts from the local compiler (controller.compile.get_compiler): engine kind,
   arch, accelerator (e.g. ``sm_87``), toolchain and exact version; exits 3 when the toolchain
   is not usable here (no GPU / no TensorRT);
2. connects to MQTT 5 with a last will (signed offline announce, retained), publishes a signed
   ``BuilderAnnounce`` (retained) and subscribes to the root-signed key list and its job topic;
3. for each ``BuildJob``: verifies the controller's signature against the pinned root's key list
   (protos.trust), its builder id, expiry, replay and that the class fits its facts (else a
   REJECTED result); downloads the inputs over HTTP and checks their sha256/size against the
   signed job; compiles in a child process (controller.compile.worker, accuracy gate included);
   uploads the engine (``PUT /api/v1/builds/{job}/engine?sha256=``); publishes a signed
   ``BuildResult`` (engine sha256, size, fingerprint, report). Errors become FAILED results with
   a reason; bad input never stops the builder. SIGTERM/SIGINT: offline announce, exit 0.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import logging
import queue
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from controller.builder.protocol import (
    BuilderFacts,
    BuilderLimits,
    class_mismatch,
    load_or_create_identity,
    public_b64,
)
from controller.compile.api import get_compiler
from controller.compile.deviceclass import AccuracySpec, DeviceClassSpec, host_arch
from controller.compile.worker import compile_in_subprocess
from protos import envelope, topics, trust
from protos.edgefleet.v1 import builder_pb2, common_pb2
from protos.errors import BackendUnavailable, EdgefleetError, Rejected, RetryLater
from protos.fsutil import atomic_writer

log = logging.getLogger("edgefleet.builder")
BUILDER_VERSION = "0.1"
EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_FAILED = 0, 2, 3, 4


def _now_ms() -> int:
    return int(time.time() * 1000)


def probe_facts(engine_kind: str) -> BuilderFacts:
    """This machine's facts for ``engine_kind``; BackendUnavailable if it cannot build it."""
    probe = DeviceClassSpec(name="builder-probe", engine_kind=engine_kind, arch=host_arch())
    c = get_compiler(probe)
    return BuilderFacts(engine_kind=engine_kind, arch=probe.arch, accelerator=c.accelerator(),
                        toolchain=c.toolchain, toolchain_version=c.toolchain_version(),
                        precisions=tuple(c.precisions))


class Builder:
    """One builder process: MQTT control, HTTP bytes, compiles one job at a time."""

    def __init__(self, builder_id: str, facts: BuilderFacts, *, key: Ed25519PrivateKey,
                 root_public: bytes, controller_url: str, mqtt_host: str, mqtt_port: int,
                 work_dir: Path, limits: BuilderLimits, compile_timeout_s: float,
                 mqtt_username: str | None = None, mqtt_password: str | None = None) -> None:
        self.id, self.facts, self.key = builder_id, facts, key
        self.trust = trust.TrustState(root_public=root_public)
        self.url = controller_url.rstrip("/")
        self.work_dir = Path(work_dir)
        self.limits, self.compile_timeout_s = limits, compile_timeout_s
        self.jobs: queue.Queue[bytes] = queue.Queue(maxsize=32)
        self.done_ids: set[str] = set()
        self.at_ms = _now_ms()
        self._trust_lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgefleet-builder-"
                                  f"{builder_id}", protocol=mqtt.MQTTv5)
        if mqtt_username:
            self.client.username_pw_set(mqtt_username, mqtt_password)
        self.client.will_set(self._topic(topics.BUILDER_ANNOUNCE), self._announce(False),
                             qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.mqtt_host, self.mqtt_port = mqtt_host, mqtt_port

    def _topic(self, leaf: str) -> str:
        return topics.builder_topic(self.id, leaf)

    def _announce(self, online: bool) -> bytes:
        f = self.facts
        a = builder_pb2.BuilderAnnounce(
            builder_id=self.id, online=online, engine_kind=f.engine_kind, arch=f.arch,
            accelerator=f.accelerator, toolchain=f.toolchain,
            toolchain_version=f.toolchain_version, at_ms=self.at_ms,
            public_key=envelope.public_raw(self.key.public_key()), precisions=list(f.precisions),
            builder_version=BUILDER_VERSION)
        return envelope.sign(a, self.key).SerializeToString(deterministic=True)

    # -- MQTT thread ----------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if rc.is_failure:
            log.warning("builder %s: MQTT connect refused: %s", self.id, rc)
            return
        client.subscribe(topics.TRUST_KEYS, qos=1)
        client.subscribe(self._topic(topics.BUILDER_JOB), qos=1)
        client.publish(self._topic(topics.BUILDER_ANNOUNCE), self._announce(True), qos=1,
                       retain=True)
        log.info("builder %s connected to mqtt://%s:%d", self.id, self.mqtt_host, self.mqtt_port)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        data = bytes(msg.payload or b"")
        if msg.topic == topics.TRUST_KEYS:
            try:
                env = envelope.parse_envelope(data, max_bytes=self.limits.max_mqtt_payload_bytes)
                with self._trust_lock:
                    if self.trust.accept_key_list(env):
                        log.info("builder %s: key list v%d", self.id, self.trust.key_list.version)
            except Rejected as e:
                log.warning("builder %s: key list refused: %s", self.id, e)
            return
        try:
            self.jobs.put_nowait(data)
        except queue.Full:
            log.warning("builder %s: job queue full, dropping a job message", self.id)

    def _result(self, job_id: str, state: int, *, reason: str = "", message: str = "",
                device_class: str = "", **fields: Any) -> None:
        r = builder_pb2.BuildResult(job_id=job_id, builder_id=self.id, state=state,  # type: ignore[arg-type]
                                    reason=reason, message=message[:4000], at_ms=_now_ms(),
                                    device_class=device_class, **fields)
        payload = envelope.sign(r, self.key).SerializeToString(deterministic=True)
        self.client.publish(self._topic(topics.BUILDER_RESULT), payload, qos=1)

    # -- jobs (main thread) ---------------------------------------------------------------------
    def handle(self, data: bytes) -> None:
        """Verify, build and answer one job message; never raises."""
        job_id = ""
        try:
            env = envelope.parse_envelope(data, max_bytes=self.limits.max_mqtt_payload_bytes)
            job_id = _peek_job_id(env)   # unverified: only to label a refusal
            with self._trust_lock:
                job = self.trust.verify(env, builder_pb2.BuildJob)
            dc = self._check(job)
        except Rejected as e:
            log.warning("builder %s: job %s refused: %s", self.id, job_id[:12] or "?", e)
            self._result(job_id, builder_pb2.BUILD_STATE_REJECTED, reason=e.reason,
                         message=str(e))
            return
        self.done_ids.add(job.job_id)
        self._result(job.job_id, builder_pb2.BUILD_STATE_RUNNING, device_class=dc.name)
        work = self.work_dir / "jobs" / job.job_id
        try:
            self._build(job, dc, work)
        except EdgefleetError as e:
            log.warning("builder %s: job %s failed: %s", self.id, job.job_id[:12], e)
            self._result(job.job_id, builder_pb2.BUILD_STATE_FAILED, reason=e.reason,
                         message=str(e), device_class=dc.name)
        except Exception as e:  # anything else is this job's failure, not the builder's
            log.exception("builder %s: job %s crashed", self.id, job.job_id[:12])
            self._result(job.job_id, builder_pb2.BUILD_STATE_FAILED, reason="builder_error",
                         message=f"{type(e).__name__}: {e}", device_class=dc.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _check(self, job: builder_pb2.BuildJob) -> DeviceClassSpec:
        if job.builder_id != self.id:
            raise Rejected(f"job is for builder {job.builder_id!r}", reason="wrong_builder")
        if job.expires_at_ms and job.expires_at_ms < _now_ms():
            raise Rejected("job expired", reason="expired")
        if job.job_id in self.done_ids or not job.job_id:
            raise Rejected("job already handled (replay)", reason="replayed")
        try:
            spec = json.loads(job.device_class_spec_json)
        except ValueError as e:
            raise Rejected(f"device class spec is not JSON: {e}", reason="malformed") from e
        dc = DeviceClassSpec.from_spec(spec, name=job.device_class)
        why = class_mismatch(self.facts, dc)
        if why:
            raise Rejected(f"this builder {why}", reason="wrong_class")
        if not job.precisions or not job.model.sha256:
            raise Rejected("job names no model or no precisions", reason="malformed")
        for ref in (job.model, job.validation):
            if ref.size > self.limits.max_model_bytes:
                raise Rejected(f"input of {ref.size} bytes is over max_model_bytes",
                               reason="too_large")
        return dc

    def _download(self, job_id: str, ref: builder_pb2.ArtifactRef, dest: Path) -> Path:
        url = f"{self.url}/api/v1/builds/{job_id}/inputs/{ref.sha256}"
        h, size = hashlib.sha256(), 0
        try:
            with atomic_writer(dest, mode=0o600) as f, \
                    httpx.stream("GET", url, timeout=60) as resp:
                if resp.status_code != 200:
                    raise RetryLater(f"GET {url}: HTTP {resp.status_code}", reason="download")
                for block in resp.iter_bytes(1 << 20):
                    size += len(block)
                    if size > ref.size:
                        raise Rejected("input is larger than the signed job says",
                                       reason="size_mismatch")
                    h.update(block)
                    f.write(block)
                if size != ref.size or h.hexdigest() != ref.sha256:
                    raise Rejected(f"input {ref.sha256[:16]} arrived with another hash or size",
                                   reason="hash_mismatch")
        except httpx.HTTPError as e:
            raise RetryLater(f"GET {url}: {e}", reason="download") from e
        return dest

    def _build(self, job: builder_pb2.BuildJob, dc: DeviceClassSpec, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        model = self._download(job.job_id, job.model, work / "model.onnx")
        val = (self._download(job.job_id, job.validation, work / "validation.npz")
               if job.validation.sha256 else None)
        acc = AccuracySpec.from_spec(json.loads(job.accuracy_json)) if job.accuracy_json else None
        rep = compile_in_subprocess(model, device_class=dc, precisions=list(job.precisions),
                                    validation=val, accuracy=acc, work_dir=work / "compile",
                                    timeout_s=self.compile_timeout_s)
        engine = Path(rep.engine_path)
        if rep.size > job.max_engine_bytes:
            raise Rejected(f"engine of {rep.size} bytes is over the job's max_engine_bytes",
                           reason="too_large")
        url = f"{self.url}/api/v1/builds/{job.job_id}/engine"
        try:
            with open(engine, "rb") as f:
                resp = httpx.put(url, params={"sha256": rep.engine_sha256}, content=f,
                                 timeout=300)
        except httpx.HTTPError as e:
            raise RetryLater(f"PUT {url}: {e}", reason="upload") from e
        if resp.status_code != 201:
            raise RetryLater(f"PUT {url}: HTTP {resp.status_code} {resp.text[:300]}",
                             reason="upload")
        d = rep.to_dict()
        d["engine_path"] = ""
        report_json = json.dumps(d, sort_keys=True)
        if len(report_json) > self.limits.max_report_bytes:
            d["notes"] = {"truncated": True}
            report_json = json.dumps(d, sort_keys=True)
        self._result(job.job_id, builder_pb2.BUILD_STATE_SUCCEEDED, device_class=dc.name,
                     engine_sha256=rep.engine_sha256, engine_size=rep.size,
                     fingerprint=common_pb2.EngineFingerprint(**rep.fingerprint),
                     report_json=report_json)
        log.info("builder %s: job %s done: %s %s (%d bytes)", self.id, job.job_id[:12],
                 rep.precision, rep.engine_sha256[:12], rep.size)

    # -- run ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> int:
        self.client.reconnect_delay_set(1, 10)
        try:
            self.client.connect(self.mqtt_host, self.mqtt_port, keepalive=30)
        except OSError as e:
            log.warning("builder %s: MQTT %s:%d not reachable yet (%s); retrying", self.id,
                        self.mqtt_host, self.mqtt_port, e)
            self.client.connect_async(self.mqtt_host, self.mqtt_port, keepalive=30)
        self.client.loop_start()
        try:
            while not stop.is_set():
                try:
                    data = self.jobs.get(timeout=0.5)
                except queue.Empty:
                    continue
                self.handle(data)
        finally:
            with contextlib.suppress(Exception):
                info = self.client.publish(self._topic(topics.BUILDER_ANNOUNCE),
                                           self._announce(False), qos=1, retain=True)
                info.wait_for_publish(timeout=5)
            self.client.disconnect()
            self.client.loop_stop()
        return EXIT_OK


def _peek_job_id(env: Any) -> str:
    j = builder_pb2.BuildJob()
    with contextlib.suppress(Exception):
        j.ParseFromString(env.payload)
    jid = j.job_id
    return jid if len(jid) <= 64 and jid.isalnum() else ""


def _root_public(value: str) -> bytes:
    text = value
    if value.startswith("@") or Path(value).is_file():
        text = Path(value.lstrip("@")).read_text()
    raw = base64.b64decode(text.strip(), validate=True)
    envelope.load_public(raw)
    return raw


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet builder run",
                                description="Build engines for the controller on this machine.")
    p.add_argument("--id", required=True, help="builder id ([a-z0-9._-], enrolled on the controller)")
    p.add_argument("--engine-kind", required=True, choices=["tensorrt", "onnxruntime-cpu", "rknn"])
    p.add_argument("--controller", required=True, help="controller API base URL")
    p.add_argument("--mqtt", required=True, help="broker HOST:PORT")
    p.add_argument("--root-pub", required=True,
                   help="pinned root public key: base64, or a file (root.pub) / @file")
    p.add_argument("--work-dir", type=Path, default=Path("edgefleet-builder"))
    p.add_argument("--key", type=Path, default=None,
                   help="builder identity key (PEM; created if missing; default WORK/builder.key)")
    p.add_argument("--mqtt-username")
    p.add_argument("--mqtt-password")
    p.add_argument("--compile-timeout-s", type=float, default=3600.0)
    p.add_argument("--max-model-bytes", type=int, default=BuilderLimits.max_model_bytes)
    p.add_argument("--max-mqtt-payload-bytes", type=int,
                   default=BuilderLimits.max_mqtt_payload_bytes)
    p.add_argument("--print-public-key", action="store_true",
                   help="print the builder's public key (to enrol it) and exit")
    return p


def run_builder(argv: list[str] | None = None) -> int:
    """``edgefleet builder run ...``: returns 0 on a clean stop, 2 usage, 3 no toolchain, 4 error."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not topics.valid_device_id(args.id):
        print(f"error: invalid builder id {args.id!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        key = load_or_create_identity(args.key or args.work_dir / "builder.key")
        if args.print_public_key:
            print(public_b64(key))
            return EXIT_OK
        root = _root_public(args.root_pub)
        host, _, port = args.mqtt.rpartition(":")
        facts = probe_facts(args.engine_kind)
    except BackendUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (EdgefleetError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    limits = BuilderLimits(max_model_bytes=args.max_model_bytes,
                           max_mqtt_payload_bytes=args.max_mqtt_payload_bytes)
    b = Builder(args.id, facts, key=key, root_public=root, controller_url=args.controller,
                mqtt_host=host or "127.0.0.1", mqtt_port=int(port), work_dir=args.work_dir,
                limits=limits, compile_timeout_s=args.compile_timeout_s,
                mqtt_username=args.mqtt_username, mqtt_password=args.mqtt_password)
    print(f"builder {args.id}: {facts.describe()}; public key {public_b64(key)}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_a: stop.set())
    try:
        return b.run(stop)
    except Exception as e:  # last resort: one line, not a traceback
        print(f"error: builder stopped: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(run_builder())
