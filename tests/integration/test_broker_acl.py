"""Broker identity and ACL against a REAL Mosquitto with TLS, client certificates and the ACL
that controller/broker.py generates (``mosquitto_tls_conf`` + ``mosquitto_acl``), with the
certificates from controller/pki.py.

What is checked: a device publishes its own heartbeat (PUBACK success) and the controller gets
it; a device publishing to another device's topic gets MQTT 5 PUBACK 0x87 "Not authorized"
and the controller never gets that message; a device subscribing to another device's offer
topic receives nothing (Mosquitto's acl_file grants the SUBACK but filters delivery, see
docs/security.md); clients without a certificate, or with one from another CA, cannot
connect; the agent's MqttLink logs refusals; a real agent process heartbeats through TLS and
the controller's ingest (aiomqtt with the controller certificate) marks it online.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from controller.broker import BrokerTls, mosquitto_acl, mosquitto_tls_conf
from controller.pki import CONTROLLER_CN, CertificateAuthority, IssuedFiles, cert_common_name
from protos import topics
from tests.helpers.broker import Broker, free_port, mosquitto_path, start_mosquitto

pytestmark = pytest.mark.timeout(120)
NOT_AUTHORIZED = 0x87


@dataclass
class Pki:
    ca: CertificateAuthority
    server: IssuedFiles
    controller: IssuedFiles
    dev_a: IssuedFiles
    dev_b: IssuedFiles


@dataclass
class SecureBroker:
    broker: Broker
    pki: Pki


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed (the test command installs it with apt)")
    ca = CertificateAuthority.init(tmp_path / "pki")
    pki = Pki(ca, ca.ensure_server(["127.0.0.1", "localhost"]), ca.ensure_controller(),
              ca.device_files("dev-a", tmp_path / "dev-a"),
              ca.device_files("dev-b", tmp_path / "dev-b"))
    workdir = tmp_path / "broker"
    workdir.mkdir()
    acl = workdir / "acl"
    acl.write_text(mosquitto_acl())
    port = free_port()
    conf = mosquitto_tls_conf(host="127.0.0.1", port=port, data_dir=workdir, acl_path=acl,
                              tls=BrokerTls(pki.server.ca, pki.server.cert, pki.server.key))
    broker = start_mosquitto(workdir, port=port, extra_conf=conf, plain_listener=False)
    try:
        yield SecureBroker(broker, pki)
    finally:
        broker.stop()


@dataclass
class Client:
    """A paho MQTT 5 client that records what happens (acks by mid, messages)."""

    c: mqtt.Client
    cond: threading.Condition = field(default_factory=threading.Condition)
    connack: Any = None
    closed: bool = False
    pubacks: dict[int, mqtt.ReasonCode] = field(default_factory=dict)
    subacks: dict[int, list[mqtt.ReasonCode]] = field(default_factory=dict)
    messages: list[tuple[str, bytes]] = field(default_factory=list)

    def wait(self, check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not (result := check()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self.cond.wait(left)
            return result

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> mqtt.ReasonCode:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        rc: mqtt.ReasonCode = self.wait(lambda: self.pubacks.get(info.mid), f"PUBACK {topic}")
        return rc

    def subscribe(self, topic: str) -> list[mqtt.ReasonCode]:
        _rc, mid = self.c.subscribe([(topic, mqtt.SubscribeOptions(qos=1))])
        assert mid is not None
        codes: list[mqtt.ReasonCode] = self.wait(lambda: self.subacks.get(mid), f"SUBACK {topic}")
        return codes

    def received(self, topic: str) -> list[bytes]:
        with self.cond:
            return [p for t, p in self.messages if t == topic]

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def make_client(port: int, *, client_id: str, ca: Path, cert: Path | None,
                key: Path | None) -> Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None,
              keyfile=str(key) if key else None, cert_reqs=ssl.CERT_REQUIRED)
    cl = Client(c)

    def note(fn: Callable[..., None]) -> Callable[..., None]:
        def wrapped(*args: Any) -> None:
            with cl.cond:
                fn(*args)
                cl.cond.notify_all()
        return wrapped

    def on_connect(_c: Any, _u: Any, _f: Any, rc: mqtt.ReasonCode, _p: Any) -> None:
        cl.connack = rc

    def on_disconnect(*_a: Any) -> None:
        cl.closed = True

    def on_publish(_c: Any, _u: Any, mid: int, rc: mqtt.ReasonCode, _p: Any) -> None:
        cl.pubacks[mid] = rc

    def on_subscribe(_c: Any, _u: Any, mid: int, rcs: list[mqtt.ReasonCode], _p: Any) -> None:
        cl.subacks[mid] = list(rcs)

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        cl.messages.append((msg.topic, bytes(msg.payload)))

    c.on_connect = note(on_connect)
    c.on_disconnect = note(on_disconnect)
    c.on_connect_fail = note(on_disconnect)
    c.on_publish = note(on_publish)
    c.on_subscribe = note(on_subscribe)
    c.on_message = note(on_message)
    try:
        c.connect("127.0.0.1", port)
    except (ssl.SSLError, OSError):
        cl.closed = True
        return cl
    c.loop_start()
    return cl


def connected(sb: SecureBroker, files: IssuedFiles, client_id: str) -> Client:
    cl = make_client(sb.broker.port, client_id=client_id, ca=files.ca, cert=files.cert,
                     key=files.key)
    rc = cl.wait(lambda: cl.connack or cl.closed, f"CONNACK for {client_id}")
    assert rc is not True and not rc.is_failure, f"{client_id} not connected: {rc}"
    return cl


def test_pki_names_identities(secure: SecureBroker) -> None:
    assert cert_common_name(secure.pki.dev_a.cert.read_bytes()) == "dev-a"
    assert cert_common_name(secure.pki.controller.cert.read_bytes()) == CONTROLLER_CN
    assert (secure.pki.ca.ca_key_path.stat().st_mode & 0o777) == 0o600
    assert (secure.pki.dev_a.key.stat().st_mode & 0o777) == 0o600


def test_device_publishes_own_heartbeat_not_anothers(secure: SecureBroker) -> None:
    ctl = connected(secure, secure.pki.controller, "ctl")
    # client id "dev-b" on purpose: the ACL goes by the certificate's CN, not the client id
    dev = connected(secure, secure.pki.dev_a, "dev-b")
    try:
        assert not ctl.subscribe(topics.device_subscription(topics.HEARTBEAT))[0].is_failure
        mine, theirs = (topics.device_topic(d, topics.HEARTBEAT) for d in ("dev-a", "dev-b"))

        rc = dev.publish(theirs, b"forged")
        assert rc.value == NOT_AUTHORIZED, f"expected 0x87 Not authorized, got {rc}"
        rc = dev.publish(mine, b"real")
        assert not rc.is_failure, rc
        # same publisher, same subscriber, same QoS: delivery keeps order, so once "real"
        # arrived the forged message (published before it) would have arrived too
        ctl.wait(lambda: ctl.received(mine), "the controller to get dev-a's heartbeat")
        assert ctl.received(theirs) == []
        assert ctl.received(mine) == [b"real"]
        # the other controller-bound leaves are allowed, controller-to-device ones are not
        for leaf in topics.DEVICE_TO_CONTROLLER:
            assert not dev.publish(topics.device_topic("dev-a", leaf), b"x").is_failure, leaf
        for leaf in topics.CONTROLLER_TO_DEVICE:
            # a wildcard read leaf (update/offer/#) is checked on one of its topics
            leaf = topics.offer_leaf("digits") if leaf == topics.OFFERS else leaf
            rc = dev.publish(topics.device_topic("dev-a", leaf), b"x")
            assert rc.value == NOT_AUTHORIZED, (leaf, rc)
        assert dev.publish(topics.TRUST_KEYS, b"x").value == NOT_AUTHORIZED
    finally:
        dev.stop()
        ctl.stop()


def test_device_cannot_read_another_devices_offer(secure: SecureBroker) -> None:
    ctl = connected(secure, secure.pki.controller, "ctl")
    dev = connected(secure, secure.pki.dev_a, "dev-a")
    try:
        offer_a, offer_b = (topics.device_topic(d, topics.OFFER) for d in ("dev-a", "dev-b"))
        # a retained offer for dev-b exists before dev-a tries to subscribe
        assert not ctl.publish(offer_b, b"offer-b-retained", retain=True).is_failure
        # Mosquitto's acl_file never refuses a SUBSCRIBE (it grants the SUBACK and filters
        # delivery by the "read" rules), so what must hold is: nothing of dev-b arrives.
        dev.subscribe(offer_b)
        dev.subscribe(topics.device_subscription(topics.OFFER))  # a wildcard over all devices
        dev.subscribe(offer_a)
        assert not ctl.publish(offer_b, b"offer-b-live").is_failure
        assert not ctl.publish(offer_a, b"offer-a-live").is_failure
        dev.wait(lambda: len(dev.received(offer_a)) >= 2,
                 "dev-a's own offer via both subscriptions")
        assert dev.received(offer_b) == []
        assert set(dev.received(offer_a)) == {b"offer-a-live"}
        # the per-model offer topics (update/offer/{model}) are confined the same way
        m_a, m_b = (topics.device_topic(d, topics.offer_leaf("digits")) for d in ("dev-a", "dev-b"))
        assert not ctl.publish(m_b, b"model-offer-b", retain=True).is_failure
        dev.subscribe(topics.device_subscription(topics.OFFERS))
        dev.subscribe(topics.device_topic("dev-a", topics.OFFERS))
        assert not ctl.publish(m_a, b"model-offer-a").is_failure
        dev.wait(lambda: len(dev.received(m_a)) >= 2, "dev-a's own per-model offer")
        assert dev.received(m_b) == []
    finally:
        ctl.c.publish(topics.device_topic("dev-b", topics.OFFER), b"", qos=1, retain=True)
        ctl.c.publish(topics.device_topic("dev-b", topics.offer_leaf("digits")), b"", qos=1,
                      retain=True)
        dev.stop()
        ctl.stop()


def test_clients_without_a_fleet_certificate_cannot_connect(secure: SecureBroker,
                                                            tmp_path: Path) -> None:
    port = secure.broker.port
    no_cert = make_client(port, client_id="anon", ca=secure.pki.server.ca, cert=None, key=None)
    rc = no_cert.wait(lambda: no_cert.connack or no_cert.closed, "the no-cert client to end")
    no_cert.stop()
    assert rc is True or rc.is_failure, f"a client without a certificate connected: {rc}"

    rogue = CertificateAuthority.init(tmp_path / "rogue")
    files = rogue.device_files("dev-b", tmp_path / "rogue-dev-b")  # right CN, wrong CA
    forged = make_client(port, client_id="dev-b", ca=secure.pki.server.ca, cert=files.cert,
                         key=files.key)
    rc = forged.wait(lambda: forged.connack or forged.closed, "the rogue client to end")
    forged.stop()
    assert rc is True or rc.is_failure, f"a certificate from another CA connected: {rc}"

    # and the real one does connect (so the two refusals above are about the certificate)
    connected(secure, secure.pki.dev_b, "dev-b").stop()


def test_agent_link_logs_refusals(secure: SecureBroker, caplog: pytest.LogCaptureFixture) -> None:
    """agent/mqtt.py with dev-a's certificate but configured as dev-b: every publish and
    subscription is refused, and the link says so (topic + reason) instead of going on."""
    from agent.config import MqttConfig, TlsConfig
    from agent.mqtt import MqttLink

    files = secure.pki.dev_a
    cfg = MqttConfig(host="127.0.0.1", port=secure.broker.port, reconnect_min_s=0.2,
                     reconnect_max_s=1.0,
                     tls=TlsConfig(ca=str(files.ca), cert=str(files.cert), key=str(files.key)))
    offer_b = topics.device_topic("dev-b", topics.OFFER)
    link = MqttLink(cfg, device_id="dev-b", handlers={offer_b: lambda _b: None},
                    max_payload_bytes=1024)
    caplog.set_level("WARNING", logger="agent.mqtt")
    link.start()
    try:
        assert link.connected.wait(10), "the agent link did not connect over TLS"
        hb_b = topics.device_topic("dev-b", topics.HEARTBEAT)
        assert link.publish(hb_b, b"x")
        deadline = time.monotonic() + 10
        want = {hb_b, topics.device_topic("dev-b", topics.PRESENCE)}
        while not want <= {t for t, _ in link.denials} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert want <= {t for t, _ in link.denials}, link.denials
        assert all(reason == "Not authorized" for t, reason in link.denials if t in want)
        assert f"broker refused publish to {hb_b}: Not authorized (0x87)" in caplog.text
    finally:
        link.stop()


async def test_real_agent_heartbeats_through_tls(secure: SecureBroker, tmp_path: Path) -> None:
    from controller.demo_agents import local_device_class, write_agent_config
    from controller.embedded import EmbeddedController, EmbeddedOptions
    from tests.e2e.fleet import wait_device_online

    pki = secure.pki
    ctrl = EmbeddedController(EmbeddedOptions(
        data_dir=tmp_path / "controller", api_port=0,
        broker_url=f"mqtts://127.0.0.1:{secure.broker.port}",
        settings_overrides={"compile_in_process_pool": False, "mqtt_tls_ca": str(pki.controller.ca),
                            "mqtt_tls_cert": str(pki.controller.cert),
                            "mqtt_tls_key": str(pki.controller.key)}))
    await ctrl.start()
    agent = write_agent_config(
        tmp_path / "agents", "dev-a", device_class=local_device_class(), mqtt_host="127.0.0.1",
        mqtt_port=secure.broker.port, root_public_key_b64=ctrl.keys.root_public_b64(),
        mqtt_extra={"tls": {"ca": str(pki.dev_a.ca), "cert": str(pki.dev_a.cert),
                            "key": str(pki.dev_a.key)}})
    agent.start()
    try:
        dev = await wait_device_online(ctrl.url, "dev-a", timeout_s=60,
                                       what="dev-a online via TLS", on_timeout=agent.log_tail)
        assert dev["device_class"] == local_device_class()
        assert "refused" not in agent.log_tail(20000)
    finally:
        agent.stop()
        await ctrl.stop()


@pytest.mark.timeout(300)
def test_secure_demo_serves_through_tls(tmp_path: Path) -> None:
    """`edgefleet demo --secure` as a user runs it (one agent): the broker it starts has only a
    TLS listener with client certificates and the ACL, and the agent still reaches serving."""
    import subprocess
    import sys

    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    repo = Path(__file__).resolve().parents[2]
    script = Path(sys.executable).with_name("edgefleet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "controller.cli"]
    data = tmp_path / "demo"
    res = subprocess.run([*cmd, "demo", "--secure", "--agents", "1", "--exit-when-ready",
                          "--port", "0", "--data-dir", str(data), "--timeout", "240"],
                         capture_output=True, text=True, timeout=280, cwd=repo)
    out = res.stdout
    assert res.returncode == 0, f"{out[-4000:]}\n{res.stderr[-4000:]}"
    assert "secure broker: TLS" in out and "mqtts://127.0.0.1:" in out
    assert "1/1 serving digits@" in out
    conf = (data / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "allow_anonymous false" in conf
    assert conf.count("listener ") == 1
    agent_cfg = (data / "agents" / "demo-1" / "agent.yaml").read_text()
    assert "device.pem" in agent_cfg
    assert "refused" not in (data / "agents" / "demo-1" / "agent.log").read_text()


def test_pki_cli_and_agent_tls_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`edgefleet pki init | issue-device` and the agent config it prints."""
    import json

    from agent.config import ConfigError, config_from_dict
    from controller.cli import main

    data = str(tmp_path / "data")
    assert main(["pki", "init", "--data-dir", data]) == 0
    assert main(["pki", "init", "--data-dir", data]) == 1          # never silently replaced
    capsys.readouterr()
    assert main(["pki", "issue-device", "board-7", "--out", str(tmp_path / "b7"),
                 "--data-dir", data]) == 0
    info = json.loads(capsys.readouterr().out)
    assert cert_common_name(Path(info["cert"]).read_bytes()) == "board-7"
    assert main(["pki", "issue-device", "Bad/Id", "--out", str(tmp_path / "x"),
                 "--data-dir", data]) == 1
    assert main(["pki", "issue-device", "controller", "--out", str(tmp_path / "x"),
                 "--data-dir", data]) == 1
    root = "A" * 43 + "="
    cfg = config_from_dict({"device_id": "board-7", "device_class": "cpu-x86-64",
                            "trust": {"root_public_key": root}, **info["agent_config"]})
    assert cfg.mqtt.tls.cert == info["cert"] and cfg.mqtt.protocol == "5"
    with pytest.raises(ConfigError, match="mqtt.protocol"):
        config_from_dict({"device_id": "b", "device_class": "c",
                          "trust": {"root_public_key": root}, "mqtt": {"protocol": "4"}})
    with pytest.raises(ConfigError, match="need mqtt.tls.ca"):
        config_from_dict({"device_id": "b", "device_class": "c",
                          "trust": {"root_public_key": root},
                          "mqtt": {"tls": {"cert": "c.pem", "key": "k.pem"}}})
