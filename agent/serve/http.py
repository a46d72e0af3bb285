"""A small threaded HTTP/1.1 server for the local inference API (stdlib sockets only).

Used by :mod:`agent.serve.oip`. One thread per keep-alive connection (boards see a handful of
local clients), hand-rolled request parsing with hard limits (request line, header bytes,
header count, body bytes), ``Expect: 100-continue``, chunked request bodies, TCP_NODELAY and
one ``sendall`` per response. It is here instead of ``http.server`` because it adds less
latency per request (no email-parser headers, no per-request handler objects), and instead of
an ASGI stack because the agent's dependency set stays small.

A malformed request gets a 4xx with ``{"error": ...}`` and closes only its own connection.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

REASONS = {200: "OK", 100: "Continue", 204: "No Content", 400: "Bad Request",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           411: "Length Required", 413: "Payload Too Large", 414: "URI Too Long",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable"}

MAX_LINE_BYTES = 8192
MAX_HEADER_BYTES = 32768
MAX_HEADERS = 100


@dataclass
class Request:
    method: str
    path: str          # without the query string
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class HttpError(Exception):
    """Raised while reading a request: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_response(status: int, obj: object) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode())


def error_response(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


Handler = Callable[[Request], Response]


class HttpServer:
    """Listens on ``host:port`` and calls ``handler(request)`` for each request."""

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0,
                 max_request_bytes: int = 64 << 20, max_connections: int = 64,
                 idle_timeout_s: float = 60.0) -> None:
        self._handler = handler
        self.max_request_bytes = max_request_bytes
        self._max_connections = max_connections
        self._idle_timeout_s = idle_timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(128)
        self.host = host
        self.port = self._sock.getsockname()[1]
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="serve-accept",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout_s)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _addr = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            with self._conns_lock:
                too_many = len(self._conns) >= self._max_connections
                if not too_many:
                    self._conns.add(conn)
            if too_many:
                self._reject(conn)
                continue
            threading.Thread(target=self._serve_connection, args=(conn,),
                             name="serve-conn", daemon=True).start()

    def _reject(self, conn: socket.socket) -> None:
        try:
            conn.sendall(_encode(error_response(503, "too many connections"), keep_alive=False))
        except OSError:
            pass
        conn.close()

    def _serve_connection(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self._idle_timeout_s)
        rfile = conn.makefile("rb", buffering=65536)
        try:
            while not self._stopping.is_set():
                try:
                    request, keep_alive = self._read_request(rfile, conn)
                except HttpError as e:
                    conn.sendall(_encode(error_response(e.status, str(e)), keep_alive=False))
                    return
                if request is None:
                    return
                try:
                    response = self._handler(request)
                except Exception as e:  # a handler bug must not kill the server
                    log.exception("handler failed for %s %s", request.method, request.path)
                    response = error_response(500, f"internal error: {type(e).__name__}")
                conn.sendall(_encode(response, keep_alive=keep_alive,
                                     head=request.method == "HEAD"))
                if not keep_alive:
                    return
        except (OSError, ValueError):  # client went away, timeout, or socket closed by stop()
            return
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            try:
                rfile.close()
                conn.close()
            except OSError:
                pass

    def _read_request(self, rfile, conn: socket.socket) -> tuple[Request | None, bool]:
        line = rfile.readline(MAX_LINE_BYTES + 1)
        while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests
            line = rfile.readline(MAX_LINE_BYTES + 1)
        if not line:
            return None, False
        if len(line) > MAX_LINE_BYTES:
            raise HttpError(414, "request line too long")
        try:
            method, target, version = line.decode("latin-1").split()
        except ValueError as e:
            raise HttpError(400, "malformed request line") from e
        if not version.startswith("HTTP/1."):
            raise HttpError(400, f"unsupported protocol {version[:16]!r}")
        headers: dict[str, str] = {}
        total = 0
        while True:
            hline = rfile.readline(MAX_LINE_BYTES + 1)
            if not hline:
                return None, False
            total += len(hline)
            if total > MAX_HEADER_BYTES or len(headers) >= MAX_HEADERS:
                raise HttpError(431, "request headers too large")
            if hline in (b"\r\n", b"\n"):
                break
            name, sep, value = hline.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise HttpError(400, "malformed header line")
            headers[name.lower()] = value.strip()
        conn_hdr = headers.get("connection", "").lower()
        keep_alive = (conn_hdr != "close") if version == "HTTP/1.1" else (conn_hdr == "keep-alive")
        if headers.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._read_body(rfile, headers)
        path, _, query = target.partition("?")
        return Request(method.upper(), path, query, headers, body), keep_alive

    def _read_body(self, rfile, headers: dict[str, str]) -> bytes:
        limit = self.max_request_bytes
        te = headers.get("transfer-encoding", "").lower()
        if te:
            if te != "chunked":
                raise HttpError(501, f"transfer-encoding {te!r} is not supported")
            return _read_chunked(rfile, limit)
        cl = headers.get("content-length")
        if cl is None:
            return b""
        if not cl.isdigit():
            raise HttpError(400, "invalid Content-Length")
        length = int(cl)
        if length > limit:
            raise HttpError(413, f"request body of {length} bytes exceeds max_request_bytes="
                                 f"{limit}")
        body = rfile.read(length) if length else b""
        if len(body) != length:
            raise HttpError(400, "request body shorter than Content-Length")
        return body


def _read_chunked(rfile, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = rfile.readline(MAX_LINE_BYTES + 1)
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError as e:
            raise HttpError(400, "malformed chunk size") from e
        if size < 0:
            raise HttpError(400, "malformed chunk size")
        if size == 0:
            while rfile.readline(MAX_LINE_BYTES + 1) not in (b"\r\n", b"\n", b""):
                pass  # trailers are ignored
            return b"".join(parts)
        total += size
        if total > limit:
            raise HttpError(413, f"request body exceeds max_request_bytes={limit}")
        chunk = rfile.read(size)
        if len(chunk) != size or rfile.readline(MAX_LINE_BYTES + 1) not in (b"\r\n", b"\n"):
            raise HttpError(400, "truncated chunk")
        parts.append(chunk)


def _encode(resp: Response, *, keep_alive: bool, head: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Unknown')}",
             f"Content-Type: {resp.content_type}",
             f"Content-Length: {len(resp.body)}"]
    lines.extend(f"{k}: {v}" for k, v in resp.headers)
    if not keep_alive:
        lines.append("Connection: close")
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head_bytes if head else head_bytes + resp.body
