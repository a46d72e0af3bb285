"""Cluster mode end to end: ``python -m controller.cluster`` (what `edgefleet cluster` runs)
against the Kubernetes API emulator, a real Mosquitto, real SQLite, real onnxruntime compiles
and two real ``edgefleet-agent run`` processes.

kubectl applies the CRDs, a DeviceClass, an EdgeModel pinned by the sha256 that
``edgefleet push`` got from the controller's API, and an EdgeRollout (canary wave with a soak,
then the rest). The model gets Compiled/Ready and its engine in status; the canary commits;
the controller is SIGKILLed mid-rollout (canary committed, second device not yet offered);
a second controller (another pod identity) takes the Lease over after it expires and
finishes the rollout from the DB and cluster state: updated == targeted, Ready=True,
Progressing=False, and every device was offered exactly once (counted on the broker).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlmodel import select

from controller.demo_agents import AgentProcess, local_device_class, write_agent_config
from controller.fleet.db import make_engine, session_scope
from controller.fleet.models import Device, DeviceRollout, DeviceRolloutState
from controller.models.digits import build_digits_cnn
from controller.ota.keys import KeyStore
from protos import topics
from tests.helpers.broker import Broker, free_port
from tests.helpers.controller import mqtt_client
from tests.helpers.kube import RunningKube
from tests.helpers.kube_testkit import ROOT, G, V, cond, get, wait_for

pytest.importorskip("kubernetes")
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not Path(KUBECTL).exists(), reason="kubectl is not installed")]
SOAK_S = 6  # canary soak: the window in which the first controller is killed


@dataclass
class ClusterProc:
    """One `edgefleet cluster` process (a controller pod)."""

    identity: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Env:
    tmp: Path
    kube: RunningKube
    kubeconfig: Path
    broker: Broker
    config: Path
    db_url: str
    procs: list[ClusterProc] = field(default_factory=list)
    agents: list[AgentProcess] = field(default_factory=list)

    def kubectl(self, *args: str) -> str:
        out = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), *args],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
        return out.stdout

    def start_controller(self, identity: str) -> ClusterProc:
        port = free_port()
        log_path = self.tmp / f"{identity}.log"
        env = dict(os.environ, POD_NAME=identity, POD_NAMESPACE="default",
                   EDGEFLEET_DB_URL=self.db_url, PYTHONUNBUFFERED="1")
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "controller.cluster", "--config", str(self.config),
                 "--kubeconfig", str(self.kubeconfig), "--listen", f"127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=ROOT)
        cp = ClusterProc(identity, proc, f"http://127.0.0.1:{port}", log_path)
        self.procs.append(cp)
        return cp

    def logs(self) -> str:
        return "\n".join([f"--- {p.identity} ---\n{p.log()}" for p in self.procs]
                         + [f"--- {a.device_id} ---\n{a.log_tail(2000)}" for a in self.agents])


def _ready(cp: ClusterProc) -> bool:
    assert cp.proc.poll() is None, f"{cp.identity} exited: {cp.log()}"
    try:
        return httpx.get(f"{cp.url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _lease_holder(api_client: Any) -> str:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        lease = client.CoordinationV1Api(api_client).read_namespaced_lease(
            "edgefleet-controller", "default")
    except ApiException:
        return ""
    return str(getattr(lease.spec, "holder_identity", "") or "")


def _rows(db: Any) -> dict[str, DeviceRollout]:
    with session_scope(db) as s:
        return {r.device_id: r for r in s.exec(select(DeviceRollout)).all()}


class StatusHistory:
    """Every status of one EdgeModel as a watch sees it: (phase, Compiled reason, Ready)."""

    def __init__(self, api_client: Any, name: str) -> None:
        from kubernetes import client, watch

        self.seen: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        self._w = watch.Watch()
        self._api = client.CustomObjectsApi(api_client)
        self._name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                for ev in self._w.stream(self._api.list_namespaced_custom_object, G, V,
                                         "default", "edgemodels", resource_version=rv,
                                         timeout_seconds=170):
                    rv = str(ev["raw_object"]["metadata"]["resourceVersion"])
                    self._record(ev["raw_object"])
            except Exception:  # a dropped watch resumes from the last resourceVersion
                self._stop.wait(0.1)

    def _record(self, obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] == self._name and obj.get("status"):
            conds = {c["type"]: c for c in obj["status"].get("conditions") or []}
            entry = (str(obj["status"].get("phase", "")),
                     str(conds.get("Compiled", {}).get("reason", "")),
                     str(conds.get("Ready", {}).get("status", "")))
            with self.lock:
                if not self.seen or self.seen[-1] != entry:
                    self.seen.append(entry)

    def history(self) -> list[tuple[str, str, str]]:
        with self.lock:
            return list(self.seen)

    def close(self) -> None:
        self._stop.set()
        self._w.stop()


def _api_items(url: str, path: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/{path}", timeout=10)
    assert r.status_code == 200, r.text
    return {f"{i['namespace']}/{i['name']}": i for i in r.json()["items"]}


class OfferCounter:
    """Counts live (non-retained) offers per device on the broker: one per publish_offer."""

    def __init__(self, port: int) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt_client(port, "offer-counter")
        self.client.on_message = self._on
        self.client.subscribe(topics.device_subscription(topics.OFFER), qos=1)
        self.client.subscribe(topics.device_subscription(topics.OFFERS), qos=1)  # per model

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        parsed = topics.parse_device_topic(msg.topic)
        if parsed is not None and msg.payload and not msg.retain:
            with self.lock:
                self.seen.append((parsed.device_id, bytes(msg.payload)))

    def per_device(self) -> dict[str, int]:
        with self.lock:
            out: dict[str, int] = {}
            for dev, _ in self.seen:
                out[dev] = out.get(dev, 0) + 1
            return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def env(tmp_path: Path, mosquitto: Broker) -> Iterator[Env]:
    kube = RunningKube()
    KeyStore.init(tmp_path / "keys")  # `edgefleet keys init`; mounted as a Secret
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "mode": "cluster", "data_dir": str(tmp_path / "data"),
        "keys_dir": str(tmp_path / "keys"),
        "mqtt_host": mosquitto.host, "mqtt_port": mosquitto.port, "mqtt_tls": False,
        "compile_in_process_pool": False, "progress_requeue_s": 0.3,
        # generous enough that a busy 2-core CI machine never loses the lease by accident;
        # failover after the SIGKILL waits for expiry, a few seconds
        "leader_election": {"lease_duration_s": 5, "renew_deadline_s": 3.5,
                            "retry_period_s": 0.3},
    }))
    e = Env(tmp_path, kube, kube.write_kubeconfig(tmp_path / "kubeconfig"), mosquitto,
            config, f"sqlite:///{tmp_path / 'data' / 'edgefleet.db'}")
    try:
        yield e
    finally:
        for a in e.agents:
            a.stop()
        for p in e.procs:
            p.stop()
        kube.close()


def test_cluster_mode_rollout_survives_controller_restart(env: Env) -> None:
    from kubernetes import client

    api_client = env.kube.api_client()
    api = client.CustomObjectsApi(api_client)
    counter = OfferCounter(env.broker.port)
    history: StatusHistory | None = None
    try:
        # the first controller pod; agents start meanwhile (both are slow to import)
        first = env.start_controller("controller-a")
        root_pub = KeyStore(env.tmp / "keys").root_public_b64()
        for i in (1, 2):
            a = write_agent_config(env.tmp / "agents", f"board-{i}",
                                   device_class=local_device_class(),
                                   mqtt_host=env.broker.host, mqtt_port=env.broker.port,
                                   root_public_key_b64=root_pub)
            a.start()
            env.agents.append(a)
        assert "created" in env.kubectl("apply", "-f", str(ROOT / "manifests" / "crds"))
        history = StatusHistory(api_client, "digits")
        env.kubectl("apply", "-f",
                    str(ROOT / "manifests" / "deviceclasses" / f"{local_device_class()}.yaml"))
        wait_for(lambda: _ready(first), timeout=60, what="controller-a /readyz")
        wait_for(lambda: _lease_holder(api_client) == "controller-a", what="controller-a leads")

        # push the model into the controller's store through its API, as `edgefleet push` does
        model = build_digits_cnn(env.tmp / "digits-cnn.onnx")
        push = subprocess.run([sys.executable, "-m", "controller.cli", "--server", first.url,
                               "push", str(model)], capture_output=True, text=True, timeout=60,
                              cwd=ROOT, check=False)
        assert push.returncode == 0, push.stderr
        sha = push.stdout.strip().splitlines()[-1]
        assert len(sha) == 64
        # resources live in Kubernetes: the API refuses to apply them (409, not stored)
        r = httpx.post(f"{first.url}/api/v1/apply", timeout=10, json={
            "apiVersion": f"{G}/{V}", "kind": "EdgeModel",
            "metadata": {"name": "x", "namespace": "default"},
            "spec": {"version": 1, "source": {"sha256": sha},
                     "targets": [{"deviceClass": local_device_class()}]}})
        assert r.status_code == 409 and "kubectl apply" in r.json()["detail"], r.text

        db = make_engine(env.db_url)

        def online() -> bool:
            with session_scope(db) as s:
                devs = {d.device_id: d for d in s.exec(select(Device)).all()}
            return all(d in devs and devs[d].online and devs[d].device_class
                       for d in ("board-1", "board-2"))
        wait_for(online, timeout=60, what="both agents online")

        docs = [
            {"apiVersion": f"{G}/{V}", "kind": "EdgeModel",
             "metadata": {"name": "digits", "namespace": "default"},
             "spec": {"version": 1, "source": {"sha256": sha},
                      "targets": [{"deviceClass": local_device_class(),
                                   "precisions": ["fp32"]}]}},
            {"apiVersion": f"{G}/{V}", "kind": "EdgeRollout",
             "metadata": {"name": "digits", "namespace": "default"},
             "spec": {"model": "digits", "waves": [
                 {"name": "canary", "count": 1, "healthGate": {"soakSeconds": SOAK_S}},
                 {"name": "rest", "percent": 100}]}},
        ]
        (env.tmp / "digits.yaml").write_text(yaml.safe_dump_all(docs))
        out = env.kubectl("apply", "-f", str(env.tmp / "digits.yaml"))
        assert "edgemodel.edgefleet.io/digits created" in out, out

        # the model compiles: Compiled/Ready conditions and its engine in status
        m = wait_for(lambda: (o := get(api, "edgemodels", "digits")) and cond(o, "Ready") == "True"
                     and o, timeout=60, what="EdgeModel Ready")
        assert cond(m, "Compiled") == "True", m["status"]
        engines = m["status"]["engines"]
        assert [e["deviceClass"] for e in engines] == [local_device_class()]
        assert len(engines[0]["sha256"]) == 64 and engines[0]["precision"] == "fp32"
        assert m["status"]["observedGeneration"] == 1 and m["status"]["sourceSha256"] == sha
        # a watch saw the intermediate Compiling status (written before the compile) first
        assert history is not None
        seen = wait_for(lambda: (h := history.history()) and h[-1][0] == "Ready" and h,
                        what="watch sees Ready")
        assert ("Compiling", "Compiling", "False") in seen, seen
        assert seen.index(("Compiling", "Compiling", "False")) < seen.index(
            ("Ready", "AllCompiled", "True")), seen

        # the API and dashboard show the cluster's objects (watch cache) with their status
        models = _api_items(first.url, "models")
        assert set(models) == {"default/digits"}, models
        assert (models["default/digits"]["phase"], models["default/digits"]["compiled"],
                models["default/digits"]["source_sha256"]) == ("Ready", "1/1", sha)
        full = httpx.get(f"{first.url}/api/v1/models/default/digits", timeout=10).json()
        assert [e["engine_sha256"] for e in full["engines"]] == [engines[0]["sha256"]]
        assert full["status"]["observedGeneration"] == 1
        assert httpx.get(f"{first.url}/api/v1/models/default/nope", timeout=10).status_code \
            == 404
        assert set(_api_items(first.url, "deviceclasses")) == {f"/{local_device_class()}"}
        assert _api_items(first.url, "rollouts")["default/digits"]["model"] == "digits"

        # canary commits on a real agent; then the controller dies mid-rollout (soak window)
        rows = wait_for(lambda: (r := _rows(db)).get("board-1") and r["board-1"].state
                        == DeviceRolloutState.COMMITTED and r, timeout=60,
                        what="canary board-1 committed", )
        first.stop(signal.SIGKILL)
        assert "board-2" not in rows, rows["board-2"]          # its wave is not open: no offer
        canary_before = rows["board-1"]
        assert counter.per_device() == {"board-1": 1}
        ro = get(api, "edgerollouts", "digits")
        assert ro is not None and cond(ro, "Progressing") == "True", ro
        assert cond(ro, "Ready") == "False"

        # a second controller pod takes the Lease over once it expires and resumes
        second = env.start_controller("controller-b")
        wait_for(lambda: _lease_holder(api_client) == "controller-b", timeout=60,
                 what="controller-b takes the lease")

        def complete() -> dict[str, Any] | None:
            o = get(api, "edgerollouts", "digits")
            st = (o or {}).get("status") or {}
            if o and st.get("targeted") == 2 and st.get("updated") == 2 and cond(
                    o, "Ready") == "True":
                return o
            return None
        try:
            ro = wait_for(complete, timeout=90, what="rollout updated == targeted")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{json.dumps(get(api, 'edgerollouts', 'digits'))}\n"
                                 f"{env.logs()}") from None
        st = ro["status"]
        assert cond(ro, "Progressing") == "False" and cond(ro, "Degraded") == "False"
        assert st["phase"] == "Complete" and st["observedGeneration"] == 1
        assert {d: v["state"] for d, v in st["devices"].items()} == {
            "board-1": "updated", "board-2": "updated"}
        # the new leader's API and dashboard: rollout status from the cluster, devices from DB
        def api_complete() -> dict[str, Any] | None:
            r = _api_items(second.url, "rollouts").get("default/digits")
            return r if r and r["phase"] == "Complete" else None
        api_ro = wait_for(api_complete, what="API shows the rollout Complete")
        assert (api_ro["progress"], api_ro["devices_committed"], api_ro["model"]) == (
            "2/2", 2, "digits")
        one = httpx.get(f"{second.url}/api/v1/rollouts/default/digits", timeout=10).json()
        assert {d["device_id"]: d["state"] for d in one["devices"]} == {
            "board-1": "updated", "board-2": "updated"}
        page = httpx.get(f"{second.url}/", timeout=10).text
        models_table = page.split('id="models"')[1].split("</table>")[0]
        rollouts_table = page.split('id="rollouts"')[1].split("</table>")[0]
        assert "default/digits" in models_table and "Ready" in models_table, models_table
        assert "default/digits" in rollouts_table and "2/2" in rollouts_table, rollouts_table

        # nobody was offered twice: the committed canary was not re-offered after the restart
        assert counter.per_device() == {"board-1": 1, "board-2": 1}
        after = _rows(db)
        assert after["board-1"].update_id == canary_before.update_id
        assert after["board-1"].offered_ms == canary_before.offered_ms
        assert after["board-2"].bytes_sent > 0
        # both agents report (heartbeat) serving the engine the model compiled
        def serving() -> bool:
            with session_scope(db) as s:
                served = {d.device_id: d.models for d in s.exec(select(Device)).all()}
            return all(any(x.get("name") == "digits" and x.get("active")
                           and x.get("sha256") == engines[0]["sha256"] for x in served[dev])
                       for dev in ("board-1", "board-2"))
        wait_for(serving, timeout=30, what="both agents serving the compiled engine")
        assert _ready(second)
        # SIGTERM: a clean exit that hands the Lease back for a standby to take at once
        second.stop(signal.SIGTERM)
        assert second.proc.returncode == 0, second.log()
        assert _lease_holder(api_client) == ""
        db.dispose()
    finally:
        if history is not None:
            history.close()
        counter.close()
        api_client.close()


def test_cluster_config_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from controller.cluster import load_config, rollout_status_for_cluster, run_cluster
    from protos.errors import Rejected

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "mode": "cluster", "data_dir": str(tmp_path / "d"), "mqtt_port": 1884,
        "watch_namespace": "fleet", "listen": "127.0.0.1:9999",
        "leader_election": {"lease_name": "ef", "lease_duration_s": 9, "renew_deadline_s": 6,
                            "retry_period_s": 1}}))
    settings, opts = load_config(cfg, env={"EDGEFLEET_DB_URL": "sqlite:///x.db",
                                           "POD_NAME": "pod-1", "POD_NAMESPACE": "ops",
                                           "EDGEFLEET_MQTT_PASSWORD": "pw"})
    assert (settings.db_url, settings.mqtt_port, settings.mqtt_password) == (
        "sqlite:///x.db", 1884, "pw")
    assert settings.data_dir == tmp_path / "d"
    assert (opts.identity, opts.lease_namespace, opts.lease_name, opts.watch_namespace) == (
        "pod-1", "ops", "ef", "fleet")
    assert (opts.lease_duration_s, opts.listen_host, opts.listen_port) == (9.0, "127.0.0.1", 9999)

    for bad, words in [({"mqtt_hots": "x"}, "unknown setting(s) mqtt_hots"),
                       ({"mode": "embedded"}, "mode is 'embedded'"),
                       ({"leader_election": {"lease_duration_s": 1, "renew_deadline_s": 2}},
                        "retry_period_s < renew_deadline_s < lease_duration_s"),
                       ({"chunk_size_bytes": 10**9}, "chunk_size_bytes must be in"),
                       ({"mqtt_tls": True}, "no mqtt_tls_ca")]:
        cfg.write_text(yaml.safe_dump(bad))
        with pytest.raises(Rejected) as ei:
            load_config(cfg, env={})
        assert words in str(ei.value)

    # bad input: one error line and a non-zero exit, no traceback
    cfg.write_text("mode: [cluster\n")
    assert run_cluster(["--config", str(cfg)]) == 1
    assert "is not valid YAML" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "d2")}))
    assert run_cluster(["--config", str(cfg), "--kubeconfig", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot configure the Kubernetes client"), err

    # the rollout's Ready condition follows Complete
    done = rollout_status_for_cluster({"phase": "Complete", "conditions": [
        {"type": "Progressing", "status": "False"}, {"type": "Complete", "status": "True"}]})
    assert {c["type"]: c["status"] for c in done["conditions"]}["Ready"] == "True"
    going = rollout_status_for_cluster({"conditions": [
        {"type": "Progressing", "status": "True", "reason": "WaveInProgress"}]})
    ready = next(c for c in going["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaveInProgress")
