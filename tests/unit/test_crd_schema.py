"""CRD files and controller.crd.schema: examples validate, bad documents are rejected with the
field path, defaults are applied, the CRDs are structural and parse with the real kubectl."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.crd import schema
from protos.errors import Rejected

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "manifests" / "crds"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

MODEL: dict[str, Any] = {
    "apiVersion": "edgefleet.io/v1alpha1",
    "kind": "EdgeModel",
    "metadata": {"name": "digits", "namespace": "default"},
    "spec": {"version": 1, "source": {"path": "m.onnx"},
             "targets": [{"deviceClass": "cpu-x86-64"}]},
}
ROLLOUT: dict[str, Any] = {
    "apiVersion": "edgefleet.io/v1alpha1",
    "kind": "EdgeRollout",
    "metadata": {"name": "digits"},
    "spec": {"model": "digits"},
}
CLASS: dict[str, Any] = {
    "apiVersion": "edgefleet.io/v1alpha1",
    "kind": "DeviceClass",
    "metadata": {"name": "jetson-orin"},
    "spec": {"engineKind": "tensorrt", "arch": "aarch64"},
}
SHA = "a" * 64


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy of base with the dotted path set (``[i]`` for list items); value None deletes."""
    doc = copy.deepcopy(base)
    parts: list[Any] = []
    for p in path.split("."):
        if "[" in p:
            name, idx = p[:-1].split("[")
            parts += [name, int(idx)]
        else:
            parts.append(p)
    cur: Any = doc
    for p in parts[:-1]:
        cur = cur[p]
    if value is None:
        del cur[parts[-1]]
    else:
        cur[parts[-1]] = value
    return doc


def test_examples_and_default_device_classes_validate() -> None:
    docs = (schema.load_documents(ROOT / "manifests" / "examples")
            + schema.load_documents(ROOT / "manifests" / "deviceclasses"))
    kinds = sorted({d.kind for d in docs})
    assert kinds == ["DeviceClass", "EdgeModel", "EdgeRollout"]
    names = {d.name for d in docs if d.kind == "DeviceClass"}
    assert names == {"cpu-x86-64", "cpu-aarch64", "jetson-orin", "rk3588"}
    for d in docs:
        schema.validate(d.doc)
    model = next(d for d in docs if d.kind == "EdgeModel")
    assert model.resolve(model.doc["spec"]["source"]["path"]) == (
        ROOT / "manifests" / "examples" / "models" / "digits-cnn.onnx")


@pytest.mark.parametrize(("doc", "where", "what"), [
    (_with(MODEL, "spec.targets[0].precisions", ["fp32", "int4"]),
     "EdgeModel digits: spec.targets[0].precisions[1]", "'int4' is not one of"),
    (_with(MODEL, "spec.version", 0), "spec.version", "less than the minimum of 1"),
    (_with(MODEL, "spec.version", None), "spec", "'version' is a required property"),
    (_with(MODEL, "spec.source", {"url": "https://x"}), "spec.source",
     "one of path, sha256 is required"),
    (_with(MODEL, "spec.source", {"sha256": "ABCD"}), "spec.source.sha256", "does not match"),
    (_with(MODEL, "spec.targets", []), "spec.targets", "should be non-empty"),
    (_with(MODEL, "spec.accuracy", {"metric": "top5", "budget": 0.01}), "spec.accuracy.metric",
     "'top5' is not one of"),
    (_with(MODEL, "spec.accuracy", {"metric": "top1-drop", "budget": -1}), "spec.accuracy.budget",
     "less than the minimum of 0"),
    (_with(MODEL, "spec.target", []), "EdgeModel digits: spec", "'target' was unexpected"),
    (_with(MODEL, "spec.targets", [{"deviceClass": "a"}, {"deviceClass": "a"}]),
     "spec.targets[1].deviceClass", "listed twice"),
    (_with(MODEL, "metadata.name", "Digits_1"), "metadata.name", "DNS-1123"),
    (_with(MODEL, "metadata", None), "metadata", "is required"),
    (_with(MODEL, "apiVersion", "edgefleet.io/v1"), "apiVersion", "is not"),
    (_with(MODEL, "kind", "EdgeThing"), "kind", "is not one of"),
    (_with(ROLLOUT, "spec.waves", [{"name": "a", "percent": 10, "count": 2}]), "spec.waves[0]",
     "only one of percent, count may be set"),
    (_with(ROLLOUT, "spec.waves", [{"name": "a"}]), "spec.waves[0]",
     "one of percent, count is required"),
    (_with(ROLLOUT, "spec.waves", [{"name": "a", "percent": 101}]), "spec.waves[0].percent",
     "greater than the maximum of 100"),
    (_with(ROLLOUT, "spec.waves", [{"name": "a", "percent": 50}, {"name": "b", "percent": 20}]),
     "spec.waves[1].percent", "cumulative"),
    (_with(ROLLOUT, "spec.waves", [{"name": "a", "count": 1,
                                    "healthGate": {"minSuccessPercent": 120}}]),
     "spec.waves[0].healthGate.minSuccessPercent", "maximum of 100"),
    (_with(ROLLOUT, "spec.chunkSizeBytes", 512), "spec.chunkSizeBytes", "minimum of 1024"),
    (_with(ROLLOUT, "spec.chunkSizeBytes", 8 * 1024 * 1024), "spec.chunkSizeBytes", "maximum"),
    (_with(ROLLOUT, "spec.paused", "yes"), "spec.paused", "is not of type 'boolean'"),
    (_with(ROLLOUT, "spec.model", None), "spec", "'model' is a required property"),
    (_with(CLASS, "spec.engineKind", "tpu"), "spec.engineKind", "'tpu' is not one of"),
    (_with(CLASS, "spec.arch", "riscv64"), "spec.arch", "'riscv64' is not one of"),
    (_with(CLASS, "spec.budgets", {"memoryMB": 1.5}), "spec.budgets.memoryMB",
     "is not of type 'integer'"),
])
def test_invalid_documents_name_the_field(doc: dict[str, Any], where: str, what: str) -> None:
    with pytest.raises(Rejected) as ei:
        schema.validate(doc)
    msg = str(ei.value)
    assert f"{where}: " in msg, msg
    assert what in msg, msg


def test_cluster_mode_requires_pinned_content() -> None:
    schema.validate(MODEL)
    with pytest.raises(Rejected, match=r"spec\.source\.sha256: is required in cluster mode"):
        schema.validate(MODEL, cluster=True)
    pinned = _with(MODEL, "spec.source", {"sha256": SHA})
    schema.validate(pinned, cluster=True)
    bad_variant = _with(pinned, "spec.variants", [{"name": "small", "source": {"path": "s.onnx"}}])
    schema.validate(bad_variant)
    with pytest.raises(Rejected, match=r"spec\.variants\[0\]\.source\.sha256"):
        schema.validate(bad_variant, cluster=True)


def test_defaults_follow_the_schema() -> None:
    m = schema.with_defaults(_with(MODEL, "spec.validation", {"samples": {"path": "v.npz"}}))
    assert m["spec"]["targets"][0]["precisions"] == ["fp32"]
    assert m["spec"]["validation"]["labelsKey"] == "labels"
    assert m["spec"]["validation"]["inputsKey"] == "inputs"
    r = schema.with_defaults(ROLLOUT)["spec"]
    assert r["chunkSizeBytes"] == 131072 and r["paused"] is False
    assert r["onFailure"] == "rollback" and r["progressDeadlineSeconds"] == 600
    assert r["aborted"] is False and r["retry"] == 0 and "rollbackTo" not in r
    assert r["waves"] == [{"name": "all", "percent": 100,
                           "healthGate": {"minSuccessPercent": 100, "soakSeconds": 0,
                                          "maxFailed": 0, "minRequests": 0,
                                          "requireAccuracyProbe": False}}]
    given = _with(ROLLOUT, "spec.waves", [{"name": "c", "count": 1,
                                          "healthGate": {"soakSeconds": 30}}])
    gate = schema.with_defaults(given)["spec"]["waves"][0]["healthGate"]
    assert gate == {"soakSeconds": 30, "minSuccessPercent": 100, "maxFailed": 0,
                    "minRequests": 0, "requireAccuracyProbe": False}
    assert "waves" not in ROLLOUT["spec"]  # input untouched


def test_load_documents_multi_doc_lists_and_limits(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "all.yaml").write_text(
        "---\n" + yaml.safe_dump(MODEL) + "---\n\n---\n"
        + yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [ROLLOUT, CLASS]}))
    (sub / "notes.txt").write_text("not yaml: [")
    docs = schema.load_documents(sub)
    assert [d.kind for d in docs] == ["EdgeModel", "EdgeRollout", "DeviceClass"]
    assert docs[0].base_dir == sub.resolve()
    assert docs[0].resolve("m.onnx") == sub.resolve() / "m.onnx"
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(Rejected, match="bad.yaml: not valid YAML"):
        schema.load_documents(tmp_path / "bad.yaml")
    (tmp_path / "scalar.yaml").write_text("just a string\n")
    with pytest.raises(Rejected, match="not a mapping"):
        schema.load_documents(tmp_path / "scalar.yaml")
    with pytest.raises(Rejected, match="max_manifest_bytes=10"):
        schema.load_documents(sub / "all.yaml", max_manifest_bytes=10)
    with pytest.raises(Rejected, match="no such file"):
        schema.load_documents(tmp_path / "missing.yaml")


def _walk(node: dict[str, Any], path: str, problems: list[str]) -> None:
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type (not structural)")
    if "description" not in node:
        problems.append(f"{path}: no description")
    for key in ("anyOf", "oneOf", "allOf"):
        for branch in node.get(key, []):
            if set(branch) - {"required"}:
                problems.append(f"{path}.{key}: branches may only hold 'required' (structural)")
    for name, sub in (node.get("properties") or {}).items():
        _walk(sub, f"{path}.{name}", problems)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], f"{path}[]", problems)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}{{}}", problems)


@pytest.mark.parametrize(("kind", "short", "namespaced"), [
    ("EdgeModel", "em", True), ("EdgeRollout", "ero", True), ("DeviceClass", "dc", False)])
def test_crds_are_structural_and_described(kind: str, short: str, namespaced: bool) -> None:
    info = schema.crds()[kind]
    assert info.short_names == (short,)
    assert info.namespaced is namespaced
    problems: list[str] = []
    _walk(info.schema, kind, problems)
    assert problems == []
    crd = next(c for p in CRDS.glob("*.yaml") for c in yaml.safe_load_all(p.read_text())
               if c["spec"]["names"]["kind"] == kind)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{info.plural}.edgefleet.io"
    assert crd["spec"]["names"]["categories"] == ["edgefleet"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    assert version["additionalPrinterColumns"]
    # every default must itself validate (the API server refuses the CRD otherwise)
    import jsonschema

    def defaults(node: dict[str, Any]) -> None:
        if "default" in node:
            jsonschema.Draft7Validator(node).validate(node["default"])
        for sub in (node.get("properties") or {}).values():
            defaults(sub)
        if isinstance(node.get("items"), dict):
            defaults(node["items"])
    defaults(info.schema)


def test_packaged_copy_matches_manifests() -> None:
    packaged = ROOT / "controller" / "crd" / "crds"
    names = sorted(p.name for p in CRDS.glob("*.yaml"))
    assert names == sorted(p.name for p in packaged.glob("*.yaml"))
    for n in names:
        assert (CRDS / n).read_bytes() == (packaged / n).read_bytes(), (
            f"controller/crd/crds/{n} is stale: cp manifests/crds/*.yaml controller/crd/crds/")
    chart = ROOT / "charts" / "edgefleet" / "crds"
    if chart.is_dir():
        for n in names:
            assert (CRDS / n).read_bytes() == (chart / n).read_bytes(), (
                f"charts/edgefleet/crds/{n} is stale: cp manifests/crds/*.yaml charts/edgefleet/crds/")


@pytest.mark.skipif(not Path(KUBECTL).exists(), reason="kubectl is not installed")
def test_kubectl_parses_crds_and_examples_offline() -> None:
    # No cluster here: `apply/create --dry-run=client` still need API discovery, but
    # `annotate --local` decodes the files with kubectl's own YAML/JSON machinery offline.
    for folder in ("manifests/crds", "manifests/examples", "manifests/deviceclasses"):
        out = subprocess.run(
            [KUBECTL, "annotate", "--local", "-f", str(ROOT / folder), "-o", "json", "checked=1"],
            capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        items, pos, text, dec = [], 0, out.stdout, json.JSONDecoder()
        while text[pos:].strip():  # kubectl prints one JSON object per input object
            pos += len(text[pos:]) - len(text[pos:].lstrip())
            obj, pos = dec.raw_decode(text, pos)
            items.append(obj)
        ours = schema.load_documents(ROOT / folder)
        assert len(items) == len(ours)
        for item, mine in zip(items, ours, strict=True):
            item["metadata"].pop("annotations")
            if not mine.doc["metadata"].get("annotations"):
                mine.doc["metadata"].pop("annotations", None)
            assert item == mine.doc
