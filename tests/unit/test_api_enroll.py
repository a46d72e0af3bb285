"""Bootstrap tokens and POST /api/v1/enroll over a real SQLite database and a real fleet CA.

No broker: the answers are checked directly (the end-to-end path with Mosquitto, TLS and a
real agent is tests/integration/test_enroll.py). Covered here: token administration only
for loopback clients; only the sha256 of a token is stored; a one-use token raced by many
threads enrolls exactly one device; without TLS the answer has no certificate; the CA signs
only CSRs that name the device and verify; the agent's certificate checks refuse a
certificate for another key or from another CA.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from agent.enroll import EnrollError, check_certificate, make_identity
from controller.api.app import create_app
from controller.fleet import enroll as enr
from controller.fleet.db import make_engine
from controller.ota.keys import KeyStore
from controller.pki import CertificateAuthority
from controller.settings import Settings
from protos.errors import Rejected

LOOPBACK = ("127.0.0.1", 40000)


@dataclass
class Core:
    settings: Settings
    engine: Engine
    keys: KeyStore


def make_client(tmp_path: Path, *, tls: bool) -> tuple[TestClient, Core]:
    overrides: dict[str, Any] = {}
    if tls:
        ca = CertificateAuthority.init(tmp_path / "pki")
        overrides = {"mqtt_tls_ca": str(ca.ca_cert_path)}
    settings = Settings(data_dir=tmp_path, mqtt_host="10.0.0.5", mqtt_port=8883,
                        enroll_mqtt_host="mqtt.example", **overrides)
    core = Core(settings, make_engine(settings.resolved_db_url),
                KeyStore.init(tmp_path / "keys"))
    return TestClient(create_app(core), client=LOOPBACK), core


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[tuple[TestClient, Core]]:
    client, core = make_client(tmp_path, tls=False)
    with client:
        yield client, core
    core.engine.dispose()


def new_token(client: TestClient, **body: Any) -> str:
    r = client.post("/api/v1/tokens", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def test_tokens_are_loopback_only_and_stored_hashed(plain: tuple[TestClient, Core]) -> None:
    client, core = plain
    tok = new_token(client, ttl_s=600, uses=2, note="line 3")
    with Session(core.engine) as s:
        row = s.exec(select(enr.EnrollToken)).one()
    assert row.token_sha256 == enr.token_sha256(tok) and tok not in repr(row.model_dump())
    assert (row.uses_left, row.note) == (2, "line 3")
    remote = TestClient(client.app, client=("192.0.2.7", 5000))
    assert remote.post("/api/v1/tokens", json={}).status_code == 403
    assert remote.get("/api/v1/tokens").status_code == 403
    assert remote.delete(f"/api/v1/tokens/{row.token_id}").status_code == 403
    # enrollment itself is open to the network (the token is the credential)
    r = remote.post("/api/v1/enroll", json={"token": tok, "device_id": "cam-1",
                                            "device_class": "cpu-x86-64"})
    assert r.status_code == 200, r.text
    assert client.post("/api/v1/tokens", json={"ttl_s": 0}).status_code == 422
    assert client.post("/api/v1/tokens", json={"uses": "many"}).status_code == 422
    assert client.post("/api/v1/tokens", json={"id_prefix": "Bad/"}).status_code == 422
    assert client.delete("/api/v1/tokens/nope").status_code == 404


def test_enroll_without_tls_gives_no_certificate(plain: tuple[TestClient, Core]) -> None:
    client, core = plain
    tok = new_token(client)
    r = client.post("/api/v1/enroll", json={"token": tok, "device_id": "cam-1",
                                            "device_class": "cpu-x86-64",
                                            "csr_pem": make_identity("cam-1").csr_pem.decode()})
    assert r.status_code == 200, r.text
    ans = r.json()
    assert ans["mqtt"] == {"host": "mqtt.example", "port": 8883, "protocol": "5", "tls": None}
    assert ans["root_public_key"] == core.keys.root_public_b64()
    for bad in ({"device_id": "cam-2"}, {"token": 7, "device_id": "cam-2",
                                         "device_class": "x"}):
        assert client.post("/api/v1/enroll", json=bad).status_code == 422
    assert client.post("/api/v1/enroll", content=b"[1]").status_code == 422
    big = {"token": "x" * 70000, "device_id": "cam-2", "device_class": "cpu-x86-64"}
    assert client.post("/api/v1/enroll", json=big).status_code == 413


def test_one_use_token_cannot_be_double_spent(plain: tuple[TestClient, Core]) -> None:
    client, core = plain
    tok = new_token(client, uses=1)
    enroller = enr.Enroller(core.engine, settings=core.settings,
                            root_public_b64=core.keys.root_public_b64())
    results: list[str] = []
    start = threading.Barrier(8)

    def attempt(i: int) -> None:
        start.wait()
        try:
            enroller.enroll(enr.EnrollRequest(token=tok, device_id=f"race-{i}",
                                              device_class="cpu-x86-64"), controller_url="u")
            results.append("ok")
        except enr.EnrollRefused as e:
            results.append(e.reason)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["ok"] + ["used_up"] * 7, results
    with Session(core.engine) as s:
        assert len(s.exec(select(enr.Enrollment)).all()) == 1
        assert s.exec(select(enr.EnrollToken)).one().uses_left == 0


def test_reenroll_token_replaces_the_identity(tmp_path: Path) -> None:
    client, core = make_client(tmp_path, tls=True)
    with client:
        for _ in range(2):
            tok = new_token(client, reenroll=True)
            ident = make_identity("cam-1")
            r = client.post("/api/v1/enroll", json={"token": tok, "device_id": "cam-1",
                                                    "device_class": "cpu-x86-64",
                                                    "csr_pem": ident.csr_pem.decode()})
            assert r.status_code == 200, r.text
            tls = r.json()["mqtt"]["tls"]
            check_certificate(tls["cert_pem"].encode(), tls["ca_pem"].encode(),
                              device_id="cam-1", key_pem=ident.key_pem)
        # the agent refuses an answer whose certificate carries another key or another CA
        with pytest.raises(EnrollError, match="key"):
            check_certificate(tls["cert_pem"].encode(), tls["ca_pem"].encode(),
                              device_id="cam-1", key_pem=make_identity("cam-1").key_pem)
        other = CertificateAuthority.init(tmp_path / "other")
        with pytest.raises(EnrollError, match="not signed"):
            check_certificate(tls["cert_pem"].encode(), other.ca_cert_path.read_bytes(),
                              device_id="cam-1", key_pem=ident.key_pem)
    core.engine.dispose()


def test_ca_signs_only_good_csrs(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "pki")
    ident = make_identity("cam-1")
    ca.sign_device_csr("cam-1", ident.csr_pem)
    for device_id, csr, reason in [
        ("cam-2", ident.csr_pem, "bad_csr"),                      # CN is another device
        ("cam-1", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "bad_csr"),
        ("cam-1", b"x" * 20000, "bad_csr"),
        ("controller", make_identity("controller").csr_pem, "bad_device_id"),
    ]:
        with pytest.raises(Rejected) as e:
            ca.sign_device_csr(device_id, csr)
        assert e.value.reason == reason


def test_parse_duration() -> None:
    assert [enr.parse_duration_s(x) for x in ("90", "90s", "15m", "24h", "7d", "1w")] == [
        90, 90, 900, 86400, 7 * 86400, 7 * 86400]
    with pytest.raises(Rejected):
        enr.parse_duration_s("soon")
