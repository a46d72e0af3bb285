"""bench.mqtt5_lite: the codec (variable byte integers, properties, packet framing) and the
client against a real Mosquitto: CONNACK reason codes, QoS 0/1 both ways, retained
messages, PUBACK refusals (ACL), the will on an abrupt close but not on DISCONNECT, keep
alive, the server's Receive Maximum. Also the fleet simulator's heartbeat encoding."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import mqtt5_lite as m
from bench.mqtt5_lite import ConnectRefused, MqttConnection, Will
from tests.helpers.broker import Broker, mosquitto_path, start_mosquitto

Msg = tuple[str, bytes, int, bool]


def test_vbi_round_trip_and_limits() -> None:
    for n, size in [(0, 1), (127, 1), (128, 2), (16383, 2), (16384, 3), (2097151, 3),
                    (2097152, 4), (m.MAX_VBI, 4)]:
        raw = m.encode_vbi(n)
        assert len(raw) == size
        assert m.decode_vbi(b"\xaa" + raw + b"\x00", 1) == (n, 1 + size)
    with pytest.raises(ValueError):
        m.encode_vbi(m.MAX_VBI + 1)
    with pytest.raises(m.MalformedPacket):
        m.decode_vbi(b"\xff\xff\xff\xff\x01", 0)
    with pytest.raises(IndexError):          # incomplete: wait for more bytes
        m.decode_vbi(b"\x80", 0)


def test_properties_round_trip() -> None:
    props = {m.PROP_SESSION_EXPIRY: 3600, m.PROP_RECEIVE_MAXIMUM: 20, 0x01: 1,
             m.PROP_REASON_STRING: "ok ü", 0x09: b"\x00\x01", 0x0B: 300,
             m.PROP_USER_PROPERTY: [("a", "1"), ("b", "2")]}
    raw = m.encode_properties(props)
    decoded, end = m.decode_properties(b"\x00" + raw, 1)
    assert decoded == props and end == 1 + len(raw)
    assert m.encode_properties({}) == b"\x00"
    with pytest.raises(m.MalformedPacket):
        m.decode_properties(b"\x02\x7e\x00", 0)    # unknown property id


def test_split_packets_waits_for_whole_packets() -> None:
    a = m.publish_packet("t/1", b"x" * 300, qos=1, packet_id=7)
    b = m.PINGREQ_PACKET
    buf = bytearray(a + b)
    for cut in (1, 2, 3, len(a) - 1):
        got, used = m.split_packets(bytearray(buf[:cut]))
        assert got == [] and used == 0
    got, used = m.split_packets(buf)
    assert used == len(buf) and [f >> 4 for f, _ in got] == [m.PUBLISH, m.PINGREQ]
    first, body = got[0]
    assert first == 0x32 and body.endswith(b"x" * 300)


def test_heartbeat_tail_fields_parse_as_one_message() -> None:
    """The simulator appends uptime/sent_at/seq to a pre-serialized heartbeat."""
    from bench.fleet_sim import _TAG_SENT, _TAG_SEQ, _TAG_UPTIME, _varint
    from protos.edgefleet.v1 import device_pb2

    static = device_pb2.Heartbeat(device_id="sim-00001", device_class="c").SerializeToString()
    raw = static + _TAG_UPTIME + _varint(0) + _TAG_SENT + _varint(1_800_000_000_123) + \
        _TAG_SEQ + _varint(300)
    hb = device_pb2.Heartbeat.FromString(raw)
    assert (hb.device_id, hb.uptime_s, hb.sent_at_ms, hb.seq) == ("sim-00001", 0,
                                                                  1_800_000_000_123, 300)


# ---- against a real broker ----------------------------------------------------------------
@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed")
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite ok/#\n")
    # started as root, Mosquitto would switch to user "mosquitto", who cannot read tmp_path
    b = start_mosquitto(tmp_path / "acl-broker",
                        extra_conf=f"user {getpass.getuser()}\nacl_file {acl}\n")
    yield b
    b.stop()


async def _client(broker: Broker, cid: str, inbox: list[Msg] | None = None, **kw: object
                  ) -> MqttConnection:
    c = MqttConnection(cid, on_message=(lambda *a: inbox.append(a)) if inbox is not None
                       else None, **kw)  # type: ignore[arg-type]
    await c.connect(broker.host, broker.port)
    return c


async def _until(pred, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_publish_subscribe_both_qos_and_retained(mosquitto: Broker) -> None:
    inbox: list[Msg] = []
    sub = await _client(mosquitto, "sub", inbox)
    assert sub.receive_maximum == 100            # Mosquitto's max_inflight_messages
    pub = await _client(mosquitto, "pub")
    assert await pub.publish_acked("r/1", b"kept", retain=True) == 0x10   # none yet
    assert await sub.subscribe([("a/#", 1), ("r/#", 1), ("z", 0)]) == [1, 1, 0]
    assert pub.publish("a/0", b"zero")
    assert await pub.publish_acked("a/1", b"\x00one" * 5000) == 0   # 20 kB, multi-read
    await _until(lambda: len(inbox) == 3)
    assert inbox[0] == ("r/1", b"kept", 1, True)
    assert inbox[1] == ("a/0", b"zero", 0, False)
    assert inbox[2] == ("a/1", b"\x00one" * 5000, 1, False)
    # no subscriber: MQTT 5 "No matching subscribers" (0x10) is a success, not a refusal
    assert await pub.publish_acked("nobody/here", b"x") == 0x10 and pub.refused == 0
    # many QoS 1 publishes at once: over Receive Maximum they queue locally, all acked
    for i in range(250):
        pub.publish("a/many", str(i).encode(), qos=1)
    await _until(lambda: len(inbox) == 253 and not pub.inflight)
    assert [int(p) for t, p, _q, _r in inbox[3:]] == list(range(250))
    sub.disconnect()
    pub.disconnect()
    await sub.wait_closed()


async def test_refused_publish_and_connect(acl_broker: Broker, tmp_path: Path) -> None:
    failed: list[tuple[str, int]] = []
    c = await _client(acl_broker, "acl", on_publish_failed=lambda t, rc: failed.append((t, rc)))
    assert await c.publish_acked("ok/1", b"x") == 0x10
    assert await c.publish_acked("no/1", b"x") == 0x87          # Not authorized
    assert c.refused == 1 and failed == [("no/1", 0x87)]
    c.disconnect()
    closed = start_mosquitto(tmp_path / "closed", extra_conf="allow_anonymous false\n")
    try:
        with pytest.raises(ConnectRefused) as e:
            await _client(closed, "anon")
        assert e.value.reason_code == 0x87
    finally:
        closed.stop()


async def test_will_on_abort_not_on_disconnect(mosquitto: Broker) -> None:
    inbox: list[Msg] = []
    watcher = await _client(mosquitto, "watcher", inbox)
    await watcher.subscribe([("will/#", 1)])
    for name, abrupt in (("polite", False), ("rude", True)):
        c = MqttConnection(name)
        await c.connect(mosquitto.host, mosquitto.port,
                        will=Will(f"will/{name}", name.encode(), qos=1, retain=True))
        c.abort() if abrupt else c.disconnect()
        await c.wait_closed()
    await _until(lambda: inbox)
    await asyncio.sleep(0.3)
    assert inbox == [("will/rude", b"rude", 1, False)]
    # the will was retained: a new subscriber gets it
    late: list[Msg] = []
    c2 = await _client(mosquitto, "late", late)
    await c2.subscribe([("will/#", 1)])
    await _until(lambda: late)
    assert late == [("will/rude", b"rude", 1, True)]
    watcher.disconnect()
    c2.disconnect()


async def test_keepalive_pings_keep_an_idle_connection(mosquitto: Broker) -> None:
    closed: list[object] = []
    c = MqttConnection("idle", keepalive_s=1, on_close=lambda conn, exc: closed.append(exc))
    await c.connect(mosquitto.host, mosquitto.port)
    await asyncio.sleep(3.5)        # Mosquitto drops a client silent for 1.5 x keep alive
    assert c.connected and not closed
    assert await c.publish_acked("still/here", b"x") == 0x10
    c.disconnect()
