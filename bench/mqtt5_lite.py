"""A minimal MQTT 5 client on asyncio: one small object per connection, for fleets of
thousands of simulated devices in one process (:mod:`bench.fleet_sim`).

paho-mqtt or aiomqtt cost a thread or several tasks and kilobytes of state per client; here
one :class:`MqttConnection` (an ``asyncio.Protocol``) is the whole client: no task, one
keep-alive timer, a receive buffer and a dict of QoS 1 publishes in flight.

What it speaks (MQTT 5.0, OASIS standard):

- CONNECT with clean start, session expiry interval, keep alive, optional username/password
  and a will message (topic, payload, QoS, retain); CONNACK with its reason code checked
  (a refusal raises :class:`ConnectRefused`) and its properties decoded (Receive Maximum,
  Server Keep Alive, Reason String ...).
- PUBLISH QoS 0 and 1. QoS 1 publishes are tracked by packet id until their PUBACK; a PUBACK
  reason code >= 0x80 (e.g. 0x87 Not authorized) is a refusal, counted in
  :attr:`MqttConnection.refused` and passed to ``on_publish_failed``. The server's Receive
  Maximum is honoured (publishes over it wait in a local queue).
- SUBSCRIBE / SUBACK with per-filter reason codes; incoming PUBLISH QoS 0/1 (QoS 1 is
  acknowledged with PUBACK after ``on_message`` returns); PINGREQ / PINGRESP when nothing
  was sent for a keep-alive period (a missing PINGRESP closes the connection as lost).
- DISCONNECT with reason 0x00 (normal: the broker discards the will) via :meth:`disconnect`,
  and an abrupt close (``transport.abort()``: the broker publishes the will) via
  :meth:`abort`. A server DISCONNECT is recorded in :attr:`server_disconnect_reason`.

Not supported: QoS 2 (never subscribed to or published), topic aliases (Topic Alias Maximum
is left at 0, so the server sends none), enhanced AUTH, session resumption.

The codec helpers (:func:`encode_vbi`, :func:`decode_vbi`, :func:`encode_properties`,
:func:`decode_properties`, the ``*_packet`` builders and :func:`split_packets`) are plain
functions, tested against a real Mosquitto in tests/unit/test_mqtt5_lite.py.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# control packet types (high nibble of the first byte)
CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
PUBREC, PUBREL, PUBCOMP = 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT, AUTH = 12, 13, 14, 15

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_NORMAL_PACKET = b"\xe0\x00"   # reason 0x00 Normal disconnection: will discarded

# property identifiers used here (MQTT 5 section 2.2.2.2)
PROP_SESSION_EXPIRY = 0x11
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_SERVER_KEEP_ALIVE = 0x13
PROP_REASON_STRING = 0x1F
PROP_RECEIVE_MAXIMUM = 0x21
PROP_TOPIC_ALIAS_MAXIMUM = 0x22
PROP_MAXIMUM_PACKET_SIZE = 0x27
PROP_USER_PROPERTY = 0x26

# property value types
_BYTE, _U16, _U32, _VBI, _STR, _BIN, _PAIR = range(7)
PROPERTY_TYPES: dict[int, int] = {
    0x01: _BYTE,  # payload format indicator
    0x02: _U32,   # message expiry interval
    0x03: _STR,   # content type
    0x08: _STR,   # response topic
    0x09: _BIN,   # correlation data
    0x0B: _VBI,   # subscription identifier
    0x11: _U32,   # session expiry interval
    0x12: _STR,   # assigned client identifier
    0x13: _U16,   # server keep alive
    0x15: _STR,   # authentication method
    0x16: _BIN,   # authentication data
    0x17: _BYTE,  # request problem information
    0x18: _U32,   # will delay interval
    0x19: _BYTE,  # request response information
    0x1A: _STR,   # response information
    0x1C: _STR,   # server reference
    0x1F: _STR,   # reason string
    0x21: _U16,   # receive maximum
    0x22: _U16,   # topic alias maximum
    0x23: _U16,   # topic alias
    0x24: _BYTE,  # maximum qos
    0x25: _BYTE,  # retain available
    0x26: _PAIR,  # user property (may repeat)
    0x27: _U32,   # maximum packet size
    0x28: _BYTE,  # wildcard subscription available
    0x29: _BYTE,  # subscription identifiers available
    0x2A: _BYTE,  # shared subscription available
}

REASON_NAMES: dict[int, str] = {
    0x00: "Success", 0x01: "Granted QoS 1", 0x02: "Granted QoS 2", 0x04: "Disconnect with will",
    0x10: "No matching subscribers", 0x80: "Unspecified error", 0x81: "Malformed Packet",
    0x82: "Protocol Error", 0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version", 0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password", 0x87: "Not authorized", 0x88: "Server unavailable",
    0x89: "Server busy", 0x8A: "Banned", 0x8D: "Keep Alive timeout", 0x8E: "Session taken over",
    0x8F: "Topic Filter invalid", 0x90: "Topic Name invalid", 0x91: "Packet Identifier in use",
    0x93: "Receive Maximum exceeded", 0x95: "Packet too large", 0x97: "Quota exceeded",
    0x99: "Payload format invalid", 0x9C: "Use another server", 0x9F: "Connection rate exceeded",
}

MAX_VBI = 268_435_455


def reason_name(rc: int) -> str:
    """``"Not authorized (0x87)"`` for a reason code."""
    return f"{REASON_NAMES.get(rc, 'Unknown')} (0x{rc:02x})"


class MqttError(Exception):
    """Base class of this client's errors."""


class MalformedPacket(MqttError):
    """Bytes from the server that are not a valid MQTT 5 packet."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, reason_code: int, reason_string: str = "") -> None:
        self.reason_code = reason_code
        self.reason_string = reason_string
        extra = f": {reason_string}" if reason_string else ""
        super().__init__(f"connection refused: {reason_name(reason_code)}{extra}")


class ConnectionLost(MqttError):
    """The connection closed before the awaited answer arrived."""


# ---- codec --------------------------------------------------------------------------------
def encode_vbi(n: int) -> bytes:
    """MQTT variable byte integer (1-4 bytes, 7 bits each, little-endian groups)."""
    if not 0 <= n <= MAX_VBI:
        raise ValueError(f"variable byte integer out of range: {n}")
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_vbi(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); IndexError when ``buf`` ends inside it, MalformedPacket
    when it is longer than 4 bytes."""
    value = 0
    shift = 0
    for i in range(4):
        b = buf[pos + i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos + i + 1
        shift += 7
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def encode_string(s: str) -> bytes:
    """UTF-8 string with its 2-byte length."""
    raw = s.encode()
    if len(raw) > 65535:
        raise ValueError("string longer than 65535 bytes")
    return struct.pack("!H", len(raw)) + raw


def encode_binary(b: bytes) -> bytes:
    """Binary data with its 2-byte length."""
    if len(b) > 65535:
        raise ValueError("binary data longer than 65535 bytes")
    return struct.pack("!H", len(b)) + b


def _decode_string(buf: bytes | memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("!H", buf, pos)
    end = pos + 2 + n
    if end > len(buf):
        raise MalformedPacket("string runs past the end of the packet")
    return bytes(buf[pos + 2:end]).decode(), end


def encode_properties(props: dict[int, Any] | None = None) -> bytes:
    """Property block: its length (VBI) then each property; a user property (0x26) takes a
    list of (name, value) pairs."""
    if not props:
        return b"\x00"
    body = bytearray()
    for pid, value in props.items():
        kind = PROPERTY_TYPES.get(pid)
        if kind is None:
            raise ValueError(f"unknown property id 0x{pid:02x}")
        values = value if kind == _PAIR else [value]
        for v in values:
            body.append(pid)
            if kind == _BYTE:
                body.append(int(v))
            elif kind == _U16:
                body += struct.pack("!H", int(v))
            elif kind == _U32:
                body += struct.pack("!I", int(v))
            elif kind == _VBI:
                body += encode_vbi(int(v))
            elif kind == _STR:
                body += encode_string(str(v))
            elif kind == _BIN:
                body += encode_binary(bytes(v))
            else:
                body += encode_string(v[0]) + encode_string(v[1])
    return encode_vbi(len(body)) + bytes(body)


def decode_properties(buf: bytes | memoryview, pos: int) -> tuple[dict[int, Any], int]:
    """(properties by id, position after the block); user properties as a list of pairs."""
    length, pos = decode_vbi(buf, pos)
    end = pos + length
    if end > len(buf):
        raise MalformedPacket("property block runs past the end of the packet")
    props: dict[int, Any] = {}
    while pos < end:
        pid = buf[pos]
        pos += 1
        kind = PROPERTY_TYPES.get(pid)
        value: Any
        if kind == _BYTE:
            value = buf[pos]
            pos += 1
        elif kind == _U16:
            (value,) = struct.unpack_from("!H", buf, pos)
            pos += 2
        elif kind == _U32:
            (value,) = struct.unpack_from("!I", buf, pos)
            pos += 4
        elif kind == _VBI:
            value, pos = decode_vbi(buf, pos)
        elif kind == _STR:
            value, pos = _decode_string(buf, pos)
        elif kind == _BIN:
            (n,) = struct.unpack_from("!H", buf, pos)
            value = bytes(buf[pos + 2:pos + 2 + n])
            pos += 2 + n
        elif kind == _PAIR:
            k, pos = _decode_string(buf, pos)
            v, pos = _decode_string(buf, pos)
            props.setdefault(pid, []).append((k, v))
            continue
        else:
            raise MalformedPacket(f"unknown property id 0x{pid:02x}")
        props[pid] = value
    if pos != end:
        raise MalformedPacket("property block length mismatch")
    return props, end


def packet(first_byte: int, body: bytes) -> bytes:
    """Fixed header (type and flags, remaining length) + ``body``."""
    return bytes((first_byte,)) + encode_vbi(len(body)) + body


@dataclass(frozen=True)
class Will:
    """The last will the broker publishes when the connection ends without a normal
    DISCONNECT (abrupt close, keep-alive timeout)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def connect_packet(client_id: str, *, keepalive_s: int, clean_start: bool = True,
                   session_expiry_s: int = 0, will: Will | None = None, username: str = "",
                   password: str = "", properties: dict[int, Any] | None = None) -> bytes:
    """CONNECT (protocol level 5)."""
    flags = 0x02 if clean_start else 0
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError("will QoS must be 0, 1 or 2")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if password:
        flags |= 0x40
    if username:
        flags |= 0x80
    props = {PROP_SESSION_EXPIRY: session_expiry_s, **(properties or {})}
    body = bytearray(b"\x00\x04MQTT\x05")
    body.append(flags)
    body += struct.pack("!H", keepalive_s)
    body += encode_properties(props)
    body += encode_string(client_id)
    if will is not None:
        body += b"\x00"   # will properties: none (will delay 0: published at once)
        body += encode_string(will.topic) + encode_binary(will.payload)
    if username:
        body += encode_string(username)
    if password:
        body += encode_binary(password.encode())
    return packet(CONNECT << 4, bytes(body))


def publish_packet(topic: str | bytes, payload: bytes, *, qos: int = 0, retain: bool = False,
                   packet_id: int = 0, dup: bool = False) -> bytes:
    """PUBLISH with no properties. ``topic`` may be pre-encoded (length-prefixed bytes from
    :func:`encode_string`) to save the encoding on hot paths."""
    t = topic if isinstance(topic, bytes) else encode_string(topic)
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    if qos:
        head = t + struct.pack("!H", packet_id) + b"\x00"
    else:
        head = t + b"\x00"
    n = len(head) + len(payload)
    return bytes((first,)) + encode_vbi(n) + head + payload


def puback_packet(packet_id: int, reason_code: int = 0) -> bytes:
    """PUBACK (the short form for success)."""
    if reason_code == 0:
        return b"\x40\x02" + struct.pack("!H", packet_id)
    return b"\x40\x04" + struct.pack("!HB", packet_id, reason_code) + b"\x00"


def subscribe_packet(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    """SUBSCRIBE; each filter with its maximum QoS (no-local, retain-as-published off,
    retain handling 0: retained messages are sent on subscribe)."""
    body = bytearray(struct.pack("!H", packet_id))
    body += b"\x00"
    for topic_filter, qos in filters:
        body += encode_string(topic_filter)
        body.append(qos & 0x03)
    return packet((SUBSCRIBE << 4) | 0x02, bytes(body))


def disconnect_packet(reason_code: int = 0) -> bytes:
    """DISCONNECT; 0x00 discards the will, 0x04 asks the broker to publish it."""
    if reason_code == 0:
        return DISCONNECT_NORMAL_PACKET
    return packet(DISCONNECT << 4, bytes((reason_code,)) + b"\x00")


def split_packets(buf: bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Complete packets at the start of ``buf``: ([(first byte, body)], bytes consumed)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    n = len(buf)
    while n - pos >= 2:
        first = buf[pos]
        try:
            length, body_start = decode_vbi(buf, pos + 1)
        except IndexError:
            break
        end = body_start + length
        if end > n:
            break
        out.append((first, bytes(buf[body_start:end])))
        pos = end
    return out, pos


# ---- the client ---------------------------------------------------------------------------
OnMessage = Callable[[str, bytes, int, bool], None]     # topic, payload, qos, retain
OnPublishFailed = Callable[[str, int], None]            # topic, reason code (>= 0x80)
OnClose = Callable[["MqttConnection", "Exception | None"], None]


class MqttConnection(asyncio.Protocol):
    """One MQTT 5 client connection (see the module docstring). Use once: connect, talk,
    close; a reconnect is a new object."""

    __slots__ = (
        "_backlog", "_buf", "_closed", "_connack", "_ka_handle", "_last_rx", "_last_tx",
        "_loop", "_next_pid", "_ping_sent", "_sub_waiters", "client_id", "connack_properties",
        "connected", "inflight", "keepalive_s", "on_close", "on_message", "on_publish_failed",
        "receive_maximum", "refused", "server_disconnect_reason", "transport",
    )

    def __init__(self, client_id: str, *, keepalive_s: int = 30,
                 on_message: OnMessage | None = None,
                 on_publish_failed: OnPublishFailed | None = None,
                 on_close: OnClose | None = None) -> None:
        self.client_id = client_id
        self.keepalive_s = keepalive_s
        self.on_message = on_message
        self.on_publish_failed = on_publish_failed
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.connack_properties: dict[int, Any] = {}
        self.receive_maximum = 65535
        self.refused = 0                         # QoS 1 publishes the broker refused
        self.server_disconnect_reason: int | None = None
        # packet id -> (topic, future or None): QoS 1 publishes waiting for their PUBACK
        self.inflight: dict[int, tuple[str, asyncio.Future[int] | None]] = {}
        self._backlog: deque[tuple[str | bytes, bytes, bool, asyncio.Future[int] | None]] = \
            deque()
        self._sub_waiters: dict[int, asyncio.Future[list[int]]] = {}
        self._buf = bytearray()
        self._next_pid = 0
        self._connack: asyncio.Future[int] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ka_handle: asyncio.TimerHandle | None = None
        self._last_tx = 0.0
        self._last_rx = 0.0
        self._ping_sent = 0.0

    # -- lifecycle --------------------------------------------------------------------------
    async def connect(self, host: str, port: int, *, will: Will | None = None,
                      clean_start: bool = True, session_expiry_s: int = 0,
                      timeout_s: float = 10.0, username: str = "",
                      password: str = "") -> dict[int, Any]:
        """Open the TCP connection, send CONNECT, wait for a successful CONNACK (returns its
        properties). Raises ConnectRefused, ConnectionLost, OSError or TimeoutError; the
        socket is closed on any failure."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._connack = loop.create_future()
        self._closed = loop.create_future()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self, host, port), timeout_s)
            self._write(connect_packet(self.client_id, keepalive_s=self.keepalive_s,
                                       clean_start=clean_start,
                                       session_expiry_s=session_expiry_s, will=will,
                                       username=username, password=password))
            rc = await asyncio.wait_for(asyncio.shield(self._connack), timeout_s)
        except BaseException:
            self.abort()
            raise
        if rc >= 0x80:
            self.abort()
            raise ConnectRefused(rc, str(self.connack_properties.get(PROP_REASON_STRING, "")))
        self.receive_maximum = int(self.connack_properties.get(PROP_RECEIVE_MAXIMUM, 65535))
        server_ka = self.connack_properties.get(PROP_SERVER_KEEP_ALIVE)
        if server_ka is not None:
            self.keepalive_s = int(server_ka)
        self.connected = True
        self._arm_keepalive()
        return self.connack_properties

    def disconnect(self) -> None:
        """Normal DISCONNECT (reason 0x00: the broker discards the will), then close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(DISCONNECT_NORMAL_PACKET)
            self.transport.close()
        self.connected = False

    def abort(self) -> None:
        """Drop the TCP connection at once, no DISCONNECT: the broker publishes the will."""
        if self.transport is not None:
            self.transport.abort()
        self.connected = False

    async def wait_closed(self, timeout_s: float = 5.0) -> None:
        """Wait until the socket is closed (after :meth:`disconnect` or :meth:`abort`)."""
        if self._closed is not None and not self._closed.done():
            await asyncio.wait_for(asyncio.shield(self._closed), timeout_s)

    # -- publish / subscribe ----------------------------------------------------------------
    def publish(self, topic: str | bytes, payload: bytes, *, qos: int = 0,
                retain: bool = False) -> bool:
        """Send a PUBLISH (QoS 0 or 1); False when not connected. A QoS 1 publish beyond the
        server's Receive Maximum waits locally until a PUBACK frees a slot."""
        if not self.connected:
            return False
        if qos == 0:
            self._write(publish_packet(topic, payload, retain=retain))
            return True
        self._publish_qos1(topic, payload, retain, None)
        return True

    async def publish_acked(self, topic: str, payload: bytes, *, retain: bool = False,
                            timeout_s: float = 10.0) -> int:
        """QoS 1 publish; returns the PUBACK reason code (>= 0x80 is a refusal)."""
        if not self.connected:
            raise ConnectionLost("not connected")
        assert self._loop is not None
        fut: asyncio.Future[int] = self._loop.create_future()
        self._publish_qos1(topic, payload, retain, fut)
        return await asyncio.wait_for(fut, timeout_s)

    def _publish_qos1(self, topic: str | bytes, payload: bytes, retain: bool,
                      fut: asyncio.Future[int] | None) -> None:
        if len(self.inflight) >= self.receive_maximum:
            self._backlog.append((topic, payload, retain, fut))
            return
        pid = self._alloc_pid()
        name = topic if isinstance(topic, str) else topic[2:].decode()
        self.inflight[pid] = (name, fut)
        self._write(publish_packet(topic, payload, qos=1, retain=retain, packet_id=pid))

    def subscribe_nowait(self, filters: Sequence[tuple[str, int]]) -> asyncio.Future[list[int]]:
        """Send SUBSCRIBE; the returned future gets the SUBACK's reason codes (one per
        filter: 0-2 granted QoS, >= 0x80 refused)."""
        assert self._loop is not None
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        if not self.connected:
            fut.set_exception(ConnectionLost("not connected"))
            return fut
        pid = self._alloc_pid()
        self._sub_waiters[pid] = fut
        self._write(subscribe_packet(pid, filters))
        return fut

    async def subscribe(self, filters: Sequence[tuple[str, int]], *,
                        timeout_s: float = 10.0) -> list[int]:
        """SUBSCRIBE and wait for the SUBACK's reason codes."""
        return await asyncio.wait_for(self.subscribe_nowait(filters), timeout_s)

    def _alloc_pid(self) -> int:
        """A packet identifier in use by no publish or subscription in flight."""
        for _ in range(65535):
            self._next_pid = self._next_pid % 65535 + 1
            pid = self._next_pid
            if pid not in self.inflight and pid not in self._sub_waiters:
                return pid
        raise MqttError("no free packet identifier")

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)
            assert self._loop is not None
            self._last_tx = self._loop.time()

    # -- keep alive -------------------------------------------------------------------------
    def _arm_keepalive(self) -> None:
        if self.keepalive_s <= 0 or self._loop is None:
            return
        now = self._loop.time()
        self._last_rx = self._last_tx = now
        self._ka_handle = self._loop.call_later(self.keepalive_s * 0.75, self._keepalive)

    def _keepalive(self) -> None:
        if not self.connected or self._loop is None:
            return
        now = self._loop.time()
        ka = self.keepalive_s
        if self._ping_sent and now - self._ping_sent > ka * 0.75 and self._last_rx < self._ping_sent:
            log.debug("%s: no PINGRESP; connection lost", self.client_id)
            self.abort()
            return
        if now - self._last_tx >= ka * 0.75 - 0.01:
            self._write(PINGREQ_PACKET)
            self._ping_sent = now
            delay = ka * 0.75
        else:
            delay = max(0.5, self._last_tx + ka * 0.75 - now)
        self._ka_handle = self._loop.call_later(delay, self._keepalive)

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.connected
        self.connected = False
        if self._ka_handle is not None:
            self._ka_handle.cancel()
            self._ka_handle = None
        err = ConnectionLost(f"connection closed ({exc or 'eof'})")
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(err)
            self._connack.exception()       # retrieved: no "never retrieved" warning
        for _topic, fut in self.inflight.values():
            if fut is not None and not fut.done():
                fut.set_exception(err)
        for _t, _p, _r, fut in self._backlog:
            if fut is not None and not fut.done():
                fut.set_exception(err)
        for sub in self._sub_waiters.values():
            if not sub.done():
                sub.set_exception(err)
                sub.exception()
        self.inflight.clear()
        self._backlog.clear()
        self._sub_waiters.clear()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if was and self.on_close is not None:
            try:
                self.on_close(self, exc)
            except Exception:
                log.exception("%s: on_close failed", self.client_id)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._loop is not None:
            self._last_rx = self._loop.time()
        try:
            packets, used = split_packets(buf)
            if used:
                del buf[:used]
            for first, body in packets:
                self._handle(first, body)
        except MqttError as e:
            log.warning("%s: %s; closing", self.client_id, e)
            self.abort()
        except (struct.error, IndexError, UnicodeDecodeError) as e:
            log.warning("%s: malformed packet (%s); closing", self.client_id, e)
            self.abort()

    def eof_received(self) -> bool | None:
        return None   # close the transport

    # -- incoming packets -------------------------------------------------------------------
    def _handle(self, first: int, body: bytes) -> None:
        ptype = first >> 4
        if ptype == PUBLISH:
            self._on_publish(first, body)
        elif ptype == PUBACK:
            self._on_puback(body)
        elif ptype == PINGRESP:
            self._ping_sent = 0.0
        elif ptype == SUBACK:
            self._on_suback(body)
        elif ptype == CONNACK:
            self._on_connack(body)
        elif ptype == DISCONNECT:
            self.server_disconnect_reason = body[0] if body else 0
            props = decode_properties(body, 1)[0] if len(body) > 1 else {}
            log.debug("%s: server DISCONNECT %s %s", self.client_id,
                      reason_name(self.server_disconnect_reason),
                      props.get(PROP_REASON_STRING, ""))
            if self.transport is not None:
                self.transport.close()
        elif ptype in (PUBREC, PUBREL, PUBCOMP, UNSUBACK, AUTH):
            log.debug("%s: unexpected packet type %d ignored", self.client_id, ptype)
        else:
            raise MalformedPacket(f"packet type {ptype} from the server")

    def _on_connack(self, body: bytes) -> None:
        if len(body) < 2:
            raise MalformedPacket("short CONNACK")
        rc = body[1]
        if len(body) > 2:
            self.connack_properties, _ = decode_properties(body, 2)
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(rc)

    def _on_publish(self, first: int, body: bytes) -> None:
        qos = (first >> 1) & 0x03
        retain = bool(first & 0x01)
        (tlen,) = struct.unpack_from("!H", body, 0)
        pos = 2 + tlen
        topic = body[2:pos].decode()
        pid = 0
        if qos:
            (pid,) = struct.unpack_from("!H", body, pos)
            pos += 2
        plen, pos = decode_vbi(body, pos)   # properties (none we need): skipped
        pos += plen
        if pos > len(body):
            raise MalformedPacket("PUBLISH properties run past the packet")
        payload = body[pos:]
        if self.on_message is not None:
            try:
                self.on_message(topic, payload, qos, retain)
            except Exception:
                log.exception("%s: message handler failed for %s", self.client_id, topic)
        if qos == 1:
            self._write(puback_packet(pid))
        elif qos == 2:
            raise MalformedPacket("QoS 2 PUBLISH (never subscribed with QoS 2)")

    def _on_puback(self, body: bytes) -> None:
        (pid,) = struct.unpack_from("!H", body, 0)
        rc = body[2] if len(body) > 2 else 0
        entry = self.inflight.pop(pid, None)
        if entry is None:
            return
        topic, fut = entry
        if rc >= 0x80:
            self.refused += 1
            if self.on_publish_failed is not None:
                self.on_publish_failed(topic, rc)
        if fut is not None and not fut.done():
            fut.set_result(rc)
        while self._backlog and len(self.inflight) < self.receive_maximum:
            t, p, r, f = self._backlog.popleft()
            self._publish_qos1(t, p, r, f)

    def _on_suback(self, body: bytes) -> None:
        (pid,) = struct.unpack_from("!H", body, 0)
        _props, pos = decode_properties(body, 2)
        codes = list(body[pos:])
        fut = self._sub_waiters.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result(codes)
