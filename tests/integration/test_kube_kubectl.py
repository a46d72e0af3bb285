"""The real kubectl against the Kubernetes API emulator: apply the CRDs, default device
classes and examples, let the controller reconcile, read status back with get / get -o json,
and see the API server side of the schema reject a bad document."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers.kube import RunningKube
from tests.helpers.kube_testkit import ROOT, SHA, StepReconciler, controller, wait_for

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
pytestmark = pytest.mark.skipif(not Path(KUBECTL).exists(), reason="kubectl is not installed")
pytest.importorskip("kubernetes")


@pytest.fixture
def kube() -> Iterator[RunningKube]:
    k = RunningKube()
    try:
        yield k
    finally:
        k.close()


def _kubectl(kubeconfig: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args], capture_output=True,
                         text=True, timeout=60, check=False)
    if ok:
        assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out


def test_kubectl_apply_get_against_emulator(kube: RunningKube, tmp_path: Path) -> None:
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig")
    out = _kubectl(kc, "apply", "-f", str(ROOT / "manifests" / "crds"))
    assert out.stdout.count("created") == 3
    _kubectl(kc, "apply", "-f", str(ROOT / "manifests" / "deviceclasses"))
    # examples as written for embedded mode (source.path) and a cluster-mode model (sha256)
    _kubectl(kc, "apply", "-f", str(ROOT / "manifests" / "examples"))
    pinned = yaml.safe_load((ROOT / "manifests/examples/edgemodel-digits.yaml").read_text())
    pinned["metadata"]["name"] = "digits-pinned"
    pinned["spec"]["source"] = {"sha256": SHA}
    (tmp_path / "pinned.yaml").write_text(yaml.safe_dump(pinned))
    _kubectl(kc, "apply", "-f", str(tmp_path / "pinned.yaml"))
    again = _kubectl(kc, "apply", "-f", str(tmp_path / "pinned.yaml"))
    assert "unchanged" in again.stdout

    # the API server enforces the CRD schema for kubectl too
    bad = dict(pinned, metadata={"name": "bad"})
    bad["spec"] = dict(pinned["spec"], targets=[{"deviceClass": "x", "precisions": ["int4"]}])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    refused = _kubectl(kc, "apply", "-f", str(tmp_path / "bad.yaml"), ok=False)
    assert refused.returncode != 0 and "int4" in refused.stderr

    rec = StepReconciler()
    with controller(kube, rec):
        def status(name: str) -> dict[str, object] | None:
            o = json.loads(_kubectl(kc, "get", "em", name, "-o", "json").stdout)
            conds = {c["type"]: c["status"] for c in (o.get("status") or {}).get("conditions", [])}
            return o if conds.get("Ready") == "True" or conds.get("Degraded") == "True" else None
        pinned_obj = wait_for(lambda: status("digits-pinned"), what="digits-pinned Ready")
        example = wait_for(lambda: status("digits"), what="digits reconciled")
    assert pinned_obj["status"]["compiledClasses"] == "2/2"  # type: ignore[index]
    # the embedded-mode example has no sha256: cluster mode says so in its status
    assert "sha256: is required in cluster mode" in json.dumps(example["status"])

    table = _kubectl(kc, "get", "em").stdout.splitlines()
    assert table[0].split() == ["NAME", "VERSION", "COMPILED", "PHASE", "READY"]
    row = next(r.split() for r in table if r.startswith("digits-pinned"))
    assert row == ["digits-pinned", "1", "2/2", "Ready", "True"]
    classes = _kubectl(kc, "get", "dc", "-o", "name").stdout.split()
    assert sorted(classes) == sorted(f"deviceclass.edgefleet.io/{n}" for n in
                                     ("cpu-x86-64", "cpu-aarch64", "jetson-orin", "rk3588"))
    everything = _kubectl(kc, "get", "edgefleet", "-o", "name").stdout.split()
    assert "edgerollout.edgefleet.io/digits" in everything
    ero = json.loads(_kubectl(kc, "get", "ero", "digits", "-o", "json").stdout)
    assert ero["spec"]["waves"][0]["name"] == "canary"
    assert ero["spec"]["chunkSizeBytes"] == 131072  # defaulted by the API server from the CRD
