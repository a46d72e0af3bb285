"""`edgefleet rollout pause|resume|abort|retry|undo|status` end to end.

Embedded mode: a real ControllerCore (real SQLite, connected to a real Mosquitto) behind the
real API app served by uvicorn (controller.api.server.ApiServer) on a free port; the verbs go
through ``POST /api/v1/namespaces/{ns}/edgerollouts/{name}/actions/{verb}`` and through the
real console script (``.venv/bin/edgefleet`` as a subprocess). The checks are on the spec
fields, the generation, the Events, the answers and the CLI's lines and exit codes; the
rollout reconcile is not run where a test writes the status itself (the core is started with
``reconcile=False``), so nothing here depends on how the controller acts on those fields.

Cluster mode: the API over the watch cache of the Kubernetes API emulator answers 409 with
the ``kubectl patch`` command, and that command, run with the real kubectl, makes the change.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, col, select

from controller.api.app import create_app
from controller.api.server import ApiServer
from controller.broker import free_port
from controller.cli_rollout import format_status
from controller.core import ControllerCore
from controller.fleet.db import session_scope
from controller.fleet.models import Event, Resource
from controller.settings import Settings
from tests.helpers.broker import Broker
from tests.helpers.controller import device_class, edge_model, edge_rollout, started_core

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".venv" / "bin" / "edgefleet"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "controller.cli"]
WAVES = [{"name": "canary", "count": 1}, {"name": "rest", "percent": 100}]


@pytest.fixture
async def served(tmp_path: Path, mosquitto: Broker) -> AsyncIterator[tuple[str, ControllerCore]]:
    """The API on a free port over a started core (MQTT connected, no reconcile loop)."""
    core = ControllerCore(Settings(data_dir=tmp_path / "ctl", mqtt_host=mosquitto.host,
                                   mqtt_port=mosquitto.port, compile_in_process_pool=False))
    await core.start(reconcile=False)
    api = ApiServer("127.0.0.1", 0)
    try:
        await asyncio.wait_for(core.connected.wait(), 15)
        await api.start(create_app(core))
        core.apply([device_class(), edge_model("m", sha256=core.upload_artifact(b"m" * 64),
                                               version=2),
                    edge_rollout("r", "m", WAVES)])
        yield f"http://127.0.0.1:{api.port}", core
    finally:
        await api.stop()
        await core.stop()


def spec_of(core: ControllerCore, name: str = "r") -> dict[str, Any]:
    return (core.get("EdgeRollout", "default", name) or {})["spec"]


def generation(core: ControllerCore, name: str = "r") -> int:
    return int((core.get("EdgeRollout", "default", name) or {})["metadata"]["generation"])


def events(core: ControllerCore) -> list[Event]:
    with Session(core.db) as s:
        return list(s.exec(select(Event).where(Event.kind == "EdgeRollout",
                                               col(Event.reason).startswith("Rollout"))
                           .order_by(col(Event.id))).all())


def set_status(core: ControllerCore, status: dict[str, Any], name: str = "r") -> None:
    """Write the rollout's status as the controller would (nothing reconciles it here)."""
    with session_scope(core.db) as s:
        row = s.exec(select(Resource).where(Resource.kind == "EdgeRollout",
                                            Resource.name == name)).one()
        row.status = status
        s.add(row)


async def cli(url: str, *args: str, stdout: Any = asyncio.subprocess.PIPE,
              timeout_s: float = 30) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(*CLI, "--server", url, "rollout", *args,
                                             stdout=stdout, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), timeout_s)
    assert p.returncode is not None
    return p.returncode, (out or b"").decode(), err.decode()


def one_error_line(err: str, *, contains: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("error: ") and contains in err, err


ACTIONS = "/api/v1/namespaces/default/edgerollouts/{name}/actions/{verb}"


async def test_verbs_through_the_api(served: tuple[str, ControllerCore],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url, core = served
    kicks: list[int] = []
    real_kick = core.kick

    def counting_kick() -> None:
        kicks.append(1)
        real_kick()

    monkeypatch.setattr(core, "kick", counting_kick)
    assert generation(core) == 1 and spec_of(core)["paused"] is False

    async with httpx.AsyncClient(base_url=url) as c:
        async def act(verb: str, body: dict[str, Any] | None = None, *, name: str = "r",
                      code: int = 200) -> dict[str, Any]:
            resp = await c.post(ACTIONS.format(name=name, verb=verb), json=body or {})
            assert resp.status_code == code, resp.text
            data: dict[str, Any] = resp.json()
            return data

        r = await act("pause")
        assert (r["action"], r["generation"], r["reason"]) == ("configured", 2, "RolloutPaused")
        assert r["patch"] == {"spec": {"paused": True}}
        assert spec_of(core)["paused"] is True and generation(core) == 2 and kicks
        ev = events(core)[-1]
        assert (ev.name, ev.type, ev.reason) == ("default/r", "Normal", "RolloutPaused")
        assert ev.message == "EdgeRollout default/r paused (spec.paused: false -> true)"

        # the same verb again changes nothing: no generation bump, no Event
        r = await act("pause")
        assert r["action"] == "unchanged" and "already paused" in r["message"]
        assert generation(core) == 2 and len(events(core)) == 1

        await act("abort")
        assert spec_of(core)["aborted"] is True and generation(core) == 3
        r = await act("resume")
        assert (spec_of(core)["paused"], spec_of(core)["aborted"]) == (False, False)
        assert "spec.paused: true -> false, spec.aborted: true -> false" in r["message"]
        for want in (1, 2):
            r = await act("retry")
            assert spec_of(core)["retry"] == want and r["spec"]["retry"] == want
        assert generation(core) == 6

        # undo: no history yet -> 422 with one clear message, nothing changes
        r = await act("undo", code=422)
        assert "has no earlier version to undo to" in r["detail"] and generation(core) == 6
        set_status(core, {"observedGeneration": 6, "phase": "Progressing", "version": 2,
                          "previousVersion": 1})
        r = await act("undo")
        assert spec_of(core)["rollbackTo"] == {"version": 1} and generation(core) == 7
        assert events(core)[-1].reason == "RolloutUndone"
        assert "rolling back to version 1" in events(core)[-1].message
        r = await act("undo", {"toVersion": 1})
        assert r["action"] == "unchanged" and "already rolls back to version 1" in r["message"]
        # resume keeps rollbackTo
        await act("pause")
        await act("resume")
        assert spec_of(core)["rollbackTo"] == {"version": 1}
        # the model ships version 2: undo to 2 or later is refused
        r = await act("undo", {"toVersion": 2}, code=422)
        assert "version 2 is not earlier than the version it ships (2)" in r["detail"]

        assert [e.reason for e in events(core)] == [
            "RolloutPaused", "RolloutAborted", "RolloutResumed", "RolloutRetried",
            "RolloutRetried", "RolloutUndone", "RolloutPaused", "RolloutResumed"]
        # the apply path validated and stored the rest of the spec unchanged
        assert spec_of(core)["waves"][0]["name"] == "canary" and spec_of(core)["model"] == "m"

        # bad input
        r = await act("pause", name="nope", code=404)
        assert r["detail"] == "EdgeRollout default/nope not found"
        r = await act("frobnicate", code=422)
        assert "unknown rollout action 'frobnicate'" in r["detail"]
        r = await act("undo", {"toVersion": "1"}, code=422)
        assert "toVersion must be an integer" in r["detail"]
        r = await act("pause", {"force": True}, code=422)
        assert "unknown field(s) force" in r["detail"]
        resp = await c.post(ACTIONS.format(name="r", verb="pause"), content=b"{not json",
                            headers={"content-type": "application/json"})
        assert resp.status_code == 422 and "not JSON" in resp.json()["detail"]
        resp = await c.post(ACTIONS.format(name="r", verb="pause"), content=b" " * 20000)
        assert resp.status_code == 413
    assert generation(core) == 9


async def test_cli_verbs_lines_and_exit_codes(served: tuple[str, ControllerCore]) -> None:
    url, core = served
    assert await cli(url, "pause", "r") == (0, "edgerollout.edgefleet.io/r paused\n", "")
    assert spec_of(core)["paused"] is True
    rc, out, err = await cli(url, "pause", "default/r")
    assert (rc, err) == (0, "") and "already paused; nothing changed" in out
    assert await cli(url, "resume", "r", "-n", "default") == (
        0, "edgerollout.edgefleet.io/r resumed\n", "")
    assert await cli(url, "abort", "r") == (0, "edgerollout.edgefleet.io/r aborted\n", "")
    assert await cli(url, "retry", "r") == (
        0, "edgerollout.edgefleet.io/r retried (spec.retry=1)\n", "")
    assert spec_of(core)["aborted"] is True and spec_of(core)["retry"] == 1

    rc, out, err = await cli(url, "undo", "r")
    assert (rc, out) == (1, "")
    one_error_line(err, contains="has no earlier version to undo to")
    assert await cli(url, "undo", "r", "--to-version", "1") == (
        0, "edgerollout.edgefleet.io/r rolled back to version 1\n", "")
    assert spec_of(core)["rollbackTo"] == {"version": 1} and generation(core) == 6
    assert [e.reason for e in events(core)] == ["RolloutPaused", "RolloutResumed",
                                                "RolloutAborted", "RolloutRetried",
                                                "RolloutUndone"]

    rc, out, err = await cli(url, "pause", "nope")
    assert (rc, out) == (1, "")
    one_error_line(err, contains="EdgeRollout default/nope not found (HTTP 404)")
    rc, _, err = await cli(url, "status", "nope", "-n", "vision")
    assert rc == 1
    one_error_line(err, contains="EdgeRollout vision/nope not found (HTTP 404)")
    rc, _, err = await cli(url, "pause", "vision/r", "-n", "default")
    assert rc == 1
    one_error_line(err, contains="namespace 'vision' conflicts with -n default")
    rc, _, err = await cli(f"http://127.0.0.1:{free_port()}", "pause", "r")
    assert rc == 1
    one_error_line(err, contains="cannot reach the controller")
    rc, _, err = await cli(url, "frobnicate", "r")
    assert rc == 2 and "invalid choice: 'frobnicate'" in err and "Traceback" not in err


STATUS: dict[str, Any] = {
    "observedGeneration": 1, "phase": "Progressing", "version": 2, "revision": 3,
    "currentWave": "canary", "targeted": 3, "updated": 1, "failed": 0, "stalled": 1,
    "pending": 1,
    "waves": [{"name": "canary", "devices": 1, "updated": 1, "failed": 0, "stalled": 0,
               "gate": {"verdict": "Passed", "message": "installs 1/1",
                        "signals": {"errorRatePercent": 0.0}}},
              {"name": "rest", "devices": 2, "updated": 0, "failed": 0, "stalled": 1}],
    "conditions": [{"type": "Progressing", "status": "True", "reason": "WaveInProgress",
                    "message": "wave rest"},
                   {"type": "Degraded", "status": "False", "reason": "AsExpected"}],
    "message": "wave rest: 1 device stalled",
}


async def test_cli_status_and_watch(served: tuple[str, ControllerCore]) -> None:
    url, core = served
    rc, out, err = await cli(url, "status", "r")
    assert (rc, err) == (0, "")
    assert out == "EdgeRollout default/r: no status yet (the controller has not reconciled it)\n"

    set_status(core, STATUS)
    async with httpx.AsyncClient(base_url=url) as c:
        view = (await c.get("/api/v1/rollouts/default/r")).json()
    rc, out, err = await cli(url, "status", "r")
    assert (rc, err) == (0, "") and out == format_status(view) + "\n"
    assert out.splitlines()[:4] == [
        "EdgeRollout default/r: Progressing", "  model m, version 2 (revision 3)",
        "  wave: canary", "  devices: targeted 3, updated 1, failed 0, stalled 1, pending 1"]
    assert "    gate canary: Passed: installs 1/1 [errorRatePercent=0.0]" in out
    assert "  message: wave rest: 1 device stalled" in out
    rc, out, _ = await cli(url, "status", "r", "-o", "json")
    assert rc == 0 and json.loads(out) == STATUS

    # --watch: exits 0 once Complete, 1 when Aborted or a gate failed, 1 on --timeout
    rc, out, err = await cli(url, "status", "r", "--watch", "--timeout", "1",
                             "--interval", "0.1")
    assert rc == 1 and out.startswith("EdgeRollout default/r: Progressing")
    one_error_line(err, contains="timed out after 1s waiting for EdgeRollout default/r to "
                                 "complete (phase Progressing)")

    p = await asyncio.create_subprocess_exec(
        *CLI, "--server", url, "rollout", "status", "r", "-w", "--interval", "0.1",
        "--timeout", "30", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert p.stdout is not None
    first = await asyncio.wait_for(p.stdout.readline(), 15)
    assert first == b"EdgeRollout default/r: Progressing\n"
    set_status(core, {**STATUS, "phase": "Complete", "updated": 3, "message": "done"})
    out_b, err_b = await asyncio.wait_for(p.communicate(), 15)
    out = first.decode() + out_b.decode()
    assert p.returncode == 0, err_b
    assert "\n\nEdgeRollout default/r: Complete\n" in out
    assert out.endswith("edgerollout default/r successfully rolled out\n")

    set_status(core, {**STATUS, "phase": "Aborted", "message": "aborted by the operator"})
    rc, out, err = await cli(url, "status", "r", "--watch")
    assert rc == 1 and "EdgeRollout default/r: Aborted" in out
    one_error_line(err, contains="EdgeRollout default/r aborted: aborted by the operator")

    gate_failed = {**STATUS, "phase": "Paused", "message": "",
                   "conditions": [{"type": "Degraded", "status": "True",
                                   "reason": "HealthGateFailed",
                                   "message": "wave canary: error rate 9% > 1%"}]}
    set_status(core, gate_failed)
    rc, out, err = await cli(url, "status", "r", "--watch")
    assert rc == 1
    one_error_line(err, contains="gate failed (HealthGateFailed): wave canary: error rate")

    # a controller that cannot be reached (restarting) is waited for, said once
    rc, out, err = await cli(f"http://127.0.0.1:{free_port()}", "status", "r", "--watch",
                             "--timeout", "0.5", "--interval", "0.1")
    lines = err.splitlines()
    assert (rc, out, len(lines)) == (1, "", 2) and "Traceback" not in err
    assert lines[0].startswith("warning: cannot reach the controller")
    assert lines[1].startswith("error: timed out after 0.5s") and "(phase unknown)" in lines[1]

    # a status computed for an older spec decides nothing: keep watching
    set_status(core, {**STATUS, "phase": "Complete", "observedGeneration": 0})
    rc, _, err = await cli(url, "status", "r", "--watch", "--timeout", "0.5",
                           "--interval", "0.1")
    assert rc == 1 and "timed out" in err


async def test_watch_ends_cleanly_on_ctrl_c_and_closed_pipe(
        served: tuple[str, ControllerCore]) -> None:
    url, core = served
    set_status(core, STATUS)
    p = await asyncio.create_subprocess_exec(
        *CLI, "--server", url, "rollout", "status", "r", "--watch", "--interval", "0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert p.stdout is not None
    assert await asyncio.wait_for(p.stdout.readline(), 15)
    p.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(p.communicate(), 15)
    assert p.returncode == 130 and b"Traceback" not in err, err

    # stdout is a pipe nobody reads any more (`edgefleet rollout status r | head -0`)
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        rc, _, err_s = await cli(url, "status", "r", stdout=w_fd)
    finally:
        os.close(w_fd)
    assert rc == 141 and err_s == "", err_s


async def test_verbs_with_the_reconcile_loop_running(tmp_path: Path, mosquitto: Broker) -> None:
    """The verbs next to a running reconcile loop: each change is one generation and the
    loop is kicked (resync is an hour, so only a kick makes it run)."""
    async with started_core(tmp_path / "ctl", mosquitto, resync_s=3600.0) as core:
        api = ApiServer("127.0.0.1", 0)
        await api.start(create_app(core))
        try:
            core.apply([device_class(), edge_model("m", sha256=core.upload_artifact(b"m" * 64)),
                        edge_rollout("r", "m", WAVES)])
            url = f"http://127.0.0.1:{api.port}"
            for verb, field, value in (("pause", "paused", True), ("retry", "retry", 1),
                                       ("abort", "aborted", True),
                                       ("resume", "aborted", False)):
                passes = core.reconcile_count
                rc, out, err = await cli(url, verb, "r")
                assert rc == 0 and "edgerollout.edgefleet.io/r" in out, err
                assert spec_of(core)[field] == value
                for _ in range(200):
                    if core.reconcile_count > passes:
                        break
                    await asyncio.sleep(0.02)
                assert core.reconcile_count > passes, f"{verb} did not kick the reconcile"
            assert generation(core) == 5
        finally:
            await api.stop()


# -- cluster mode ----------------------------------------------------------------------------
KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_cluster_mode_answers_with_the_kubectl_patch(kube: Any, tmp_path: Path) -> None:
    """In cluster mode the API does not write resources: it names the kubectl patch, and that
    exact command, run with kubectl against the API server, makes the change."""
    import subprocess

    from fastapi.testclient import TestClient
    from kubernetes import client

    from controller.cluster import ClusterController, ClusterOptions, _ApiView
    from controller.fleet.db import make_engine
    from tests.helpers.kube_testkit import G, StepReconciler, V, controller, model, wait_for

    kc = kube.api_client()
    api = client.CustomObjectsApi(kc)
    api.create_namespaced_custom_object(G, V, "vision", "edgemodels",
                                        model("digits", ["cpu-x86-64"], ns="vision", version=3))
    api.create_namespaced_custom_object(G, V, "vision", "edgerollouts", {
        "apiVersion": f"{G}/{V}", "kind": "EdgeRollout",
        "metadata": {"name": "digits", "namespace": "vision"},
        "spec": {"model": "digits", "waves": [{"name": "all", "percent": 100}]}})
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    db = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")

    class _Core:
        def __init__(self) -> None:
            self.db = db

    def spec() -> dict[str, Any]:
        obj: Any = api.get_namespaced_custom_object(G, V, "vision", "edgerollouts", "digits")
        return dict(obj["spec"])

    with controller(kube, StepReconciler()) as src:
        ctrl = ClusterController(Settings(data_dir=tmp_path), ClusterOptions())
        ctrl.source, ctrl.core = src, _Core()
        wait_for(lambda: ("EdgeRollout", "vision", "digits") in src.cache
                 and ("EdgeModel", "vision", "digits") in src.cache, what="both cached")
        http = TestClient(create_app(_ApiView(ctrl)))
        path = "/api/v1/namespaces/vision/edgerollouts/digits/actions/{}"

        steps: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
            ("pause", {}, {"paused": True}),
            ("abort", {}, {"aborted": True}),
            ("resume", {}, {"paused": False, "aborted": False}),
            ("retry", {}, {"retry": 1}),
            ("undo", {"toVersion": 2}, {"rollbackTo": {"version": 2}}),
        ]
        for verb, body, want in steps:
            resp = http.post(path.format(verb), json=body)
            assert resp.status_code == 409, resp.text
            detail = resp.json()["detail"]
            assert resp.json()["reason"] == "cluster_mode"
            assert detail.startswith("cluster mode: EdgeRollout vision/digits lives in "
                                     "Kubernetes and this API does not change it; run: ")
            command = detail.split("run: ", 1)[1]
            argv = shlex.split(command)
            assert argv[:2] == ["kubectl", "patch"] and "--type" in argv
            done = subprocess.run([KUBECTL or "kubectl", "--kubeconfig", str(kubeconfig),
                                   *argv[1:]], capture_output=True, text=True, timeout=60,
                                  check=False)
            assert done.returncode == 0, f"{command}: {done.stderr}"
            assert all(spec()[k] == v for k, v in want.items()), (verb, spec())
            # once the watch brings the change, the same verb changes nothing (200)
            def cached(w: dict[str, Any] = want) -> bool:
                obj = src.cache[("EdgeRollout", "vision", "digits")]
                return all(obj["spec"].get(k) == v for k, v in w.items())

            wait_for(cached, what=f"{verb} in the watch cache")
            if verb != "retry":
                again = http.post(path.format(verb), json=body)
                assert again.status_code == 200 and again.json()["action"] == "unchanged"

        # the same checks as the embedded mode before any write
        resp = http.post(path.format("undo"), json={"toVersion": 3})
        assert resp.status_code == 422 and "not earlier" in resp.json()["detail"]
        resp = http.post("/api/v1/namespaces/vision/edgerollouts/nope/actions/pause")
        assert resp.status_code == 404
        # status reads the watch cache in cluster mode too
        view = http.get("/api/v1/rollouts/vision/digits").json()
        assert "spec: retry 1, rollbackTo version 2" in format_status(
            {**view, "status": view.get("status") or {"phase": "Pending"}})
    kc.close()
    db.dispose()
