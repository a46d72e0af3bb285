"""Host-side (x86_64) fixtures for the emulated-arm64 tests: what a controller would send.

Run by ``scripts/arm64/run-tests.sh`` with the host's Python (which has onnx):
``python -m tests.arm64.prepare_fixtures OUT_DIR``. Writes into OUT_DIR:

* ``digits-v1.onnx``, ``digits-v2.onnx``: the digits CNN (``controller.models.digits``), base and
  head-retrained variant (a realistic OTA delta pair);
* ``inputs.npy`` (held-out digit images) and ``ref-v1.npz`` / ``ref-v2.npz``: onnxruntime outputs
  computed HERE, on x86_64, that the arm64 run must reproduce within float tolerance;
* ``keys.pb``: a root-signed KeyList; ``offer-v1.pb`` (full artifact) and ``offer-v2.pb`` (delta
  chosen by ``protos.codecs.plan``) signed by the online key; their payloads; a tampered and
  a wrongly-signed offer; ``delta-v2.<codec>.bin`` for every delta codec;
* ``fixtures.json``: the index (names, sha256s, device id/class, tolerances, host versions).

The arm64 side only reads these files (tests/arm64/test_*.py); signatures made here are
verified there, deltas made here are applied there.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import platform
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protos import envelope, trust
from protos.edgefleet.v1 import common_pb2, update_pb2

DEVICE_ID = "arm64-board-1"
DEVICE_CLASS = "cpu-arm64"
MODEL = "digits"
CHUNK_BYTES = 4 * 1024  # several chunks per model: exercises the chunked download
N_SAMPLES = 32
# float32 CNN on different SIMD kernels (AVX2/AVX-512 here, NEON there): sums are reordered,
# so allow a few ulps of the logits' magnitude, never more.
RTOL = 1e-4
ATOL = 1e-4
VALID_S = 6 * 3600


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_models(out: Path) -> tuple[Path, Path, np.ndarray]:
    """The digits CNN pair and held-out inputs (onnx.helper models; no downloads)."""
    from controller.models.digits import build_digits_cnn, build_validation_samples

    v1 = build_digits_cnn(out / "digits-v1.onnx", variant="v1")
    v2 = build_digits_cnn(out / "digits-v2.onnx", variant="v2-head")
    val = build_validation_samples(out / "val.npz", n=N_SAMPLES)
    inputs = np.load(val)["inputs"].astype(np.float32)
    val.unlink()
    return v1, v2, inputs


def reference(model: Path, inputs: np.ndarray) -> dict[str, np.ndarray]:
    sess = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = sess.run(None, {name: inputs})
    return {o.name: np.asarray(v) for o, v in zip(sess.get_outputs(), outs, strict=True)}


def manifest(version: int, payload: bytes, target: bytes, *, codec: str,
             base_sha256: str = "") -> update_pb2.UpdateManifest:
    """An UpdateManifest as controller.ota.offers would build it for this device."""
    chunks = [payload[i:i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)]
    now = trust.now_ms()
    return update_pb2.UpdateManifest(
        update_id=f"{MODEL}-v{version}-{uuid.uuid4().hex[:8]}", device_class=DEVICE_CLASS,
        model_name=MODEL, version=version, target_sha256=sha256(target),
        target_size=len(target), codec=codec, base_sha256=base_sha256,
        payload_sha256=sha256(payload), payload_size=len(payload), chunk_size=CHUNK_BYTES,
        chunk_sha256=[hashlib.sha256(c).digest() for c in chunks], issued_at_ms=now,
        expires_at_ms=now + VALID_S * 1000, device_id=DEVICE_ID,
        # arch pinned: an arm64 agent must accept it (and an x86_64 one would refuse it)
        fingerprint=common_pb2.EngineFingerprint(
            engine_kind="onnxruntime-cpu", arch="aarch64", toolchain="onnxruntime",
            toolchain_version=onnxruntime.__version__, precision="fp32"))


def make_deltas(v1: Path, v2: Path, out: Path, *, errors: dict[str, str]
                ) -> tuple[dict[str, str], str, Path | None]:
    """delta-v2.<codec>.bin for every delta codec, and the planner's choice for the offer.
    Codec failures go into ``errors`` (codec -> message)."""
    try:
        from protos import codecs  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return {}, "", None
    if not all(hasattr(codecs, f) for f in ("CODECS", "make", "plan", "apply")):
        return {}, "", None  # package still being written
    deltas: dict[str, str] = {}
    for codec in codecs.CODECS:
        if codec == "full":
            continue
        path = out / f"delta-v2.{codec}.bin"
        try:
            codecs.make(codec, v1, v2, path)
        except Exception as e:  # recorded: the arm64 test fails on it, other tests still run
            errors[codec] = f"make failed on the host: {type(e).__name__}: {e}"[:500]
            continue
        deltas[codec] = path.name
    plan_dir = out / "plan"
    try:
        choice = codecs.plan(v1, v2, plan_dir)
    except Exception as e:
        errors["plan"] = f"plan failed on the host: {type(e).__name__}: {e}"[:500]
        return deltas, "", None
    chosen = out / "payload-v2.bin"
    shutil.copyfile(choice.path, chosen)
    shutil.rmtree(plan_dir, ignore_errors=True)
    return deltas, str(choice.codec), chosen


def write_pb(path: Path, env: update_pb2.SignedEnvelope) -> str:
    path.write_bytes(env.SerializeToString())
    return path.name


def prepare(out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    v1, v2, inputs = build_models(out)
    np.save(out / "inputs.npy", inputs)
    refs = {}
    for tag, model in (("v1", v1), ("v2", v2)):
        ref = reference(model, inputs)
        np.savez(out / f"ref-{tag}.npz", **ref)  # type: ignore[arg-type]
        refs[tag] = ref

    root, signer, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    exp = trust.now_ms() + VALID_S * 1000
    keys = trust.make_key_list(root, [(signer.public_key(), exp)], version=1, expires_at_ms=exp)

    b1, b2 = v1.read_bytes(), v2.read_bytes()
    (out / "payload-v1.bin").write_bytes(b1)
    m1 = manifest(1, b1, b1, codec="full")
    delta_errors: dict[str, str] = {}
    deltas, codec2, payload2 = make_deltas(v1, v2, out, errors=delta_errors)
    if payload2 is None:  # no delta codecs in this tree yet: ship v2 in full
        codec2, payload2 = "full", out / "payload-v2.bin"
        payload2.write_bytes(b2)
    m2 = manifest(2, payload2.read_bytes(), b2, codec=codec2,
                  base_sha256=sha256(b1) if codec2 != "full" else "")
    env1, env2 = envelope.sign(m1, signer), envelope.sign(m2, signer)
    tampered = update_pb2.SignedEnvelope()
    tampered.CopyFrom(env2)
    bad = bytearray(tampered.payload)
    bad[-1] ^= 0x01  # one bit of the signed manifest
    tampered.payload = bytes(bad)

    index: dict[str, Any] = {
        "host": {"machine": platform.machine(), "python": platform.python_version(),
                 "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "device_id": DEVICE_ID, "device_class": DEVICE_CLASS, "model": MODEL,
        "root_public_key_b64": base64.b64encode(
            envelope.public_raw(root.public_key())).decode(),
        "key_list": write_pb(out / "keys.pb", keys),
        "inputs": "inputs.npy", "input_name": "input",
        "outputs": sorted(refs["v1"]),
        "rtol": RTOL, "atol": ATOL,
        "deltas": deltas, "delta_errors": delta_errors,
        "offer_tampered": write_pb(out / "offer-v2-tampered.pb", tampered),
        "offer_unknown_key": write_pb(out / "offer-v2-unknown-key.pb",
                                      envelope.sign(m2, stranger)),
        "versions": [
            {"version": 1, "model": v1.name, "sha256": sha256(b1), "size": len(b1),
             "codec": "full", "offer": write_pb(out / "offer-v1.pb", env1),
             "payload": "payload-v1.bin", "reference": "ref-v1.npz"},
            {"version": 2, "model": v2.name, "sha256": sha256(b2), "size": len(b2),
             "codec": codec2, "offer": write_pb(out / "offer-v2.pb", env2),
             "payload": payload2.name, "reference": "ref-v2.npz",
             "base_sha256": m2.base_sha256},
        ],
    }
    (out / "fixtures.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    index = prepare(args.out)
    v2 = index["versions"][1]
    print(f"[arm64] fixtures on {index['host']['machine']}: digits v1 {index['versions'][0]['size']} B,"
          f" v2 via {v2['codec']} ({(args.out / v2['payload']).stat().st_size} B),"
          f" delta codecs {sorted(index['deltas']) or 'none (protos.codecs missing)'}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
