"""Runs INSIDE the emulated arm64 chroot (scripts/arm64/run-tests.sh): the board-side building
blocks on aarch64, fed with fixtures made on the x86_64 host (tests/arm64/prepare_fixtures.py).

* the interpreter really is aarch64 and the installed ``edgefleet[agent]`` imports;
* onnxruntime on aarch64 reproduces the x86_64 outputs of the same models (float tolerance,
  same top-1 class); the outputs are written to $EDGEFLEET_ARM64_RESULTS for the report;
* a key list and offers signed on x86_64 verify here; tampered / unknown-key offers are rejected;
* every delta codec's x86_64-made delta applies here to the exact target bytes.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protos import envelope
from protos.edgefleet.v1 import update_pb2
from protos.errors import Rejected
from protos.trust import TrustState


def load_env(path: Path) -> update_pb2.SignedEnvelope:
    return envelope.parse_envelope(path.read_bytes())


def trust_state(fixtures_dir: Path, index: dict[str, Any]) -> TrustState:
    import base64

    state = TrustState(root_public=base64.b64decode(index["root_public_key_b64"]))
    assert state.accept_key_list(load_env(fixtures_dir / index["key_list"]))
    return state


def test_runs_on_aarch64_with_installed_package() -> None:
    import agent
    import protos

    assert platform.machine() == "aarch64"
    # imported from the installed distribution, not from a source checkout
    for mod in (agent, protos):
        assert "site-packages" in str(mod.__file__), mod.__file__
    from importlib.metadata import requires, version

    assert version("edgefleet")
    extras = " ".join(requires("edgefleet") or [])
    assert "onnxruntime" in extras and "paho-mqtt" in extras


def test_onnxruntime_matches_x86_reference(fixtures_dir: Path, index: dict[str, Any],
                                           results_dir: Path) -> None:
    import onnxruntime

    inputs = np.load(fixtures_dir / index["inputs"])
    report: dict[str, Any] = {"machine": platform.machine(),
                              "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                              "host": index["host"], "models": {}}
    for v in index["versions"]:
        sess = onnxruntime.InferenceSession(str(fixtures_dir / v["model"]),
                                            providers=["CPUExecutionProvider"])
        outs = sess.run(None, {index["input_name"]: inputs})
        got = {o.name: np.asarray(x) for o, x in zip(sess.get_outputs(), outs, strict=True)}
        ref = dict(np.load(fixtures_dir / v["reference"]))
        assert sorted(got) == sorted(ref) == index["outputs"]
        np.savez(results_dir / f"arm64-onnxruntime-v{v['version']}.npz", **got)  # type: ignore[arg-type]
        diffs = {}
        for name, r in ref.items():
            assert got[name].shape == r.shape and got[name].dtype == r.dtype
            np.testing.assert_allclose(got[name], r, rtol=index["rtol"], atol=index["atol"])
            assert (got[name].argmax(-1) == r.argmax(-1)).all()
            diffs[name] = float(np.max(np.abs(got[name].astype(np.float64) - r)))
        report["models"][v["model"]] = {"max_abs_diff": diffs, "samples": int(len(inputs))}
    (results_dir / "onnxruntime-vs-x86.json").write_text(json.dumps(report, indent=2))


def test_x86_signed_offers_verify_on_arm64(fixtures_dir: Path, index: dict[str, Any]) -> None:
    state = trust_state(fixtures_dir, index)
    for v in index["versions"]:
        m = state.verify(load_env(fixtures_dir / v["offer"]), update_pb2.UpdateManifest)
        assert (m.model_name, m.version, m.target_sha256) == (index["model"], v["version"],
                                                              v["sha256"])
        assert m.fingerprint.arch == "aarch64"
    with pytest.raises(Rejected) as bad:
        state.verify(load_env(fixtures_dir / index["offer_tampered"]), update_pb2.UpdateManifest)
    assert bad.value.reason == "bad_signature"
    with pytest.raises(Rejected) as unknown:
        state.verify(load_env(fixtures_dir / index["offer_unknown_key"]),
                     update_pb2.UpdateManifest)
    assert unknown.value.reason == "unknown_key"


def test_x86_made_deltas_apply_on_arm64(fixtures_dir: Path, index: dict[str, Any],
                                        tmp_path: Path) -> None:
    assert not index["delta_errors"], index["delta_errors"]
    if not index["deltas"]:
        pytest.skip("the host had no protos.codecs when it built the fixtures")
    from protos import codecs  # type: ignore[attr-defined,unused-ignore]

    v1, v2 = index["versions"]
    base = fixtures_dir / v1["model"]
    for codec, name in sorted(index["deltas"].items()):
        out = tmp_path / f"v2.{codec}.onnx"
        codecs.apply(codec, base, fixtures_dir / name, out, max_output_bytes=v2["size"],
                     expected_sha256=v2["sha256"])
        assert hashlib.sha256(out.read_bytes()).hexdigest() == v2["sha256"], codec
        # a wrong expected hash is refused on this architecture too
        with pytest.raises(Rejected):
            codecs.apply(codec, base, fixtures_dir / name, tmp_path / f"bad.{codec}",
                         max_output_bytes=v2["size"], expected_sha256="0" * 64)
