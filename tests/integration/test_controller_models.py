"""EdgeModel reconcile through ControllerCore: real onnxruntime compile in a worker process."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session, select

from controller.fleet.models import Engine
from tests.helpers.controller import device_class, edge_model, started_core, wait_until
from tests.helpers.models import build_affine


def _engines(core) -> list[Engine]:
    with Session(core.db) as s:
        return list(s.exec(select(Engine)).all())


async def test_broken_model_fails_alone_and_reapply_compiles_nothing(tmp_path: Path,
                                                                     mosquitto) -> None:
    good = build_affine(tmp_path / "good.onnx", marker=1.0)
    async with started_core(tmp_path / "c", mosquitto, compile_in_process_pool=True) as core:
        good_sha = core.upload_artifact(good)
        bad_sha = core.upload_artifact(b"\x08\x07 this is not an onnx model")
        docs = [device_class(), edge_model("good", sha256=good_sha),
                edge_model("broken", sha256=bad_sha)]
        res = core.apply(docs)
        assert [r.action for r in res] == ["created", "created", "created"]

        def phase(name):
            return ((core.get("EdgeModel", "default", name) or {}).get("status") or {}).get("phase")

        await wait_until(lambda: phase("good") == "Ready" and phase("broken") == "Failed",
                         timeout_s=90, what="models reconciled")
        st = core.get("EdgeModel", "default", "good")["status"]
        assert st["observedGeneration"] == 1 and st["compiledClasses"] == "1/1"
        [eng] = st["engines"]
        assert eng["deviceClass"] == "cpu-x86-64" and eng["precision"] == "fp32"
        assert core.store.has(eng["sha256"])
        ready = {c["type"]: c for c in st["conditions"]}
        assert ready["Ready"]["status"] == "True" and ready["Degraded"]["status"] == "False"
        bad = core.get("EdgeModel", "default", "broken")["status"]
        conds = {c["type"]: c for c in bad["conditions"]}
        assert conds["Ready"]["status"] == "False"
        assert "not a valid ONNX model" in conds["Ready"]["message"]
        assert bad["engines"] == []
        rows = _engines(core)
        assert len(rows) == 1

        # same spec again: unchanged, nothing compiled
        res = core.apply(docs)
        assert [r.action for r in res] == ["unchanged"] * 3
        n = core.reconcile_count
        await wait_until(lambda: core.reconcile_count >= n + 3, what="resyncs")
        assert [(e.id, e.engine_sha256) for e in _engines(core)] == [(rows[0].id,
                                                                       rows[0].engine_sha256)]

        # a new version of the source: generation bump, one new engine
        v2 = core.upload_artifact(build_affine(tmp_path / "v2.onnx", marker=2.0))
        res = core.apply([edge_model("good", sha256=v2, version=2)])
        assert res[0].action == "configured" and res[0].generation == 2
        await wait_until(lambda: len(_engines(core)) == 2, timeout_s=90, what="v2 engine")
        await wait_until(lambda: core.get("EdgeModel", "default", "good")["status"]
                         .get("observedGeneration") == 2, what="status of generation 2")

    # a restarted controller on the same DB compiles nothing for the same spec
    async with started_core(tmp_path / "c", mosquitto) as core:
        core.apply([edge_model("good", sha256=v2, version=2)])
        n = core.reconcile_count
        await wait_until(lambda: core.reconcile_count >= n + 3, what="resyncs")
        assert len(_engines(core)) == 2


async def test_source_path_is_uploaded_and_pinned(tmp_path: Path, mosquitto) -> None:
    build_affine(tmp_path / "yaml" / "models" / "m.onnx", marker=3.0)
    doc = edge_model("bypath", sha256="")
    doc["spec"]["source"] = {"path": "models/m.onnx"}
    async with started_core(tmp_path / "c", mosquitto) as core:
        [r] = core.apply([doc], base_dir=tmp_path / "yaml")
        assert r.action == "created", r.message
        spec = core.get("EdgeModel", "default", "bypath")["spec"]
        assert core.store.has(spec["source"]["sha256"])
        await wait_until(lambda: core.get("EdgeModel", "default", "bypath")["status"]
                         .get("phase") == "Ready", timeout_s=60, what="compiled")
        assert core.apply([doc], base_dir=tmp_path / "yaml")[0].action == "unchanged"
        bad = edge_model("invalid", sha256="")
        del bad["spec"]["targets"]
        [r] = core.apply([bad])
        assert r.action == "rejected" and "targets" in r.message
