"""Device enrollment with bootstrap tokens: the token table, token admin and the enrollment.

A bootstrap token is 32 random bytes (URL-safe base64) printed once by ``edgefleet token
create`` (controller/cli.py -> ``POST /api/v1/tokens``); the database keeps only its sha256,
expiry, uses left and constraints (device class, device id prefix, re-enrollment allowed).
A board presents it to ``POST /api/v1/enroll`` (controller/api/enroll.py; the client is
``edgefleet-agent enroll``, agent/enroll.py) with its device id, class and a CSR for a key it
generated itself. :class:`Enroller` checks the token and the request, signs the CSR with the
fleet CA (controller/pki.py, CN = device id) when the broker runs with TLS, spends one use of
the token atomically (a conditional UPDATE: two boards racing for the last use cannot both
win, on SQLite or PostgreSQL), records the enrollment and answers the pinned root key and the
MQTT settings. Every refusal is an :class:`EnrollRefused` (HTTP 403) with a reason code and an
Event row; the token itself never appears in logs or events (its id, a hash prefix, does).

The tables are registered with SQLModel when this module is imported (controller/fleet/db.py
imports it, so ``create_all`` creates them).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from controller.fleet.models import Device, Event
from protos import topics
from protos.errors import GiveUp, Rejected

log = logging.getLogger("edgefleet.enroll")

TOKEN_BYTES = 32
PREFIX_RE = re.compile(r"^[a-z0-9._-]{0,62}$")
CLASS_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TokenState(str, Enum):
    """Lifecycle of a bootstrap token."""

    ACTIVE = "active"
    EXPIRED = "expired"
    USED_UP = "used_up"
    REVOKED = "revoked"


class EnrollToken(SQLModel, table=True):
    """A bootstrap token: only its sha256 is stored."""

    __tablename__ = "enroll_token"

    token_id: str = Field(primary_key=True)          # first 16 hex of the sha256 (shown)
    token_sha256: str = Field(index=True, unique=True)
    created_ms: int = Field(default=0, sa_type=BigInteger)
    expires_ms: int = Field(default=0, sa_type=BigInteger)
    uses_total: int = Field(default=1, sa_type=BigInteger)
    uses_left: int = Field(default=1, sa_type=BigInteger)
    device_class: str = ""                           # "" = any class
    id_prefix: str = ""                              # "" = any device id
    reenroll: bool = False                           # may enroll an already known device id
    note: str = ""
    revoked_ms: int | None = Field(default=None, sa_type=BigInteger)
    last_used_ms: int | None = Field(default=None, sa_type=BigInteger)


class Enrollment(SQLModel, table=True):
    """The last enrollment of each device id."""

    __tablename__ = "enrollment"

    device_id: str = Field(primary_key=True)
    device_class: str = ""
    token_id: str = ""
    enrolled_ms: int = Field(default=0, sa_type=BigInteger)
    cert_serial: str = ""                            # hex, "" when no certificate was issued
    cert_not_after_ms: int | None = Field(default=None, sa_type=BigInteger)
    remote: str = ""                                 # client address seen by the API


class EnrollRefused(Rejected):
    """The token does not allow this enrollment (HTTP 403); ``reason`` says why."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def parse_duration_s(text: str) -> int:
    """Seconds from ``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``2w`` (Rejected otherwise)."""
    m = DURATION_RE.match(str(text))
    if not m:
        raise Rejected(f"bad duration {text!r}: use e.g. 3600, 15m, 24h, 7d", reason="bad_ttl")
    return int(float(m.group(1)) * DURATION_UNITS[m.group(2)])


def token_state(t: EnrollToken, *, now_ms: int | None = None) -> TokenState:
    now = _now_ms() if now_ms is None else now_ms
    if t.revoked_ms is not None:
        return TokenState.REVOKED
    if t.expires_ms <= now:
        return TokenState.EXPIRED
    if t.uses_left <= 0:
        return TokenState.USED_UP
    return TokenState.ACTIVE


def token_view(t: EnrollToken) -> dict[str, Any]:
    """A token as the API and ``edgefleet token list`` show it (never the token itself)."""
    return {"id": t.token_id, "state": token_state(t).value, "created_ms": t.created_ms,
            "expires_ms": t.expires_ms, "uses_total": t.uses_total, "uses_left": t.uses_left,
            "device_class": t.device_class, "id_prefix": t.id_prefix, "reenroll": t.reenroll,
            "note": t.note, "revoked_ms": t.revoked_ms, "last_used_ms": t.last_used_ms}


def _event(s: Session, *, name: str, reason: str, message: str, warning: bool = False,
           kind: str = "Device") -> None:
    s.add(Event(at_ms=_now_ms(), kind=kind, name=name[:63],
                type="Warning" if warning else "Normal", reason=reason, message=message[:500]))


# -- token administration ----------------------------------------------------------------------
def create_token(engine: Engine, *, ttl_s: int, uses: int = 1, device_class: str = "",
                 id_prefix: str = "", reenroll: bool = False, note: str = "",
                 max_ttl_s: int = 30 * 86400, max_uses: int = 10000) -> tuple[str, dict[str, Any]]:
    """A new token: (the token, shown once; its view). Rejected for bad constraints."""
    if not 0 < ttl_s <= max_ttl_s:
        raise Rejected(f"ttl must be between 1 s and {max_ttl_s} s, got {ttl_s}",
                       reason="bad_ttl")
    if not 0 < uses <= max_uses:
        raise Rejected(f"uses must be between 1 and {max_uses}, got {uses}", reason="bad_uses")
    if device_class and not CLASS_RE.match(device_class):
        raise Rejected(f"bad device class {device_class[:80]!r}", reason="bad_device_class")
    if not PREFIX_RE.match(id_prefix):
        raise Rejected(f"bad device id prefix {id_prefix[:80]!r}: use [a-z0-9._-]",
                       reason="bad_prefix")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    digest = token_sha256(token)
    now = _now_ms()
    row = EnrollToken(token_id=digest[:16], token_sha256=digest, created_ms=now,
                      expires_ms=now + ttl_s * 1000, uses_total=uses, uses_left=uses,
                      device_class=device_class, id_prefix=id_prefix, reenroll=reenroll,
                      note=note[:200])
    with Session(engine, expire_on_commit=False) as s:
        s.add(row)
        _event(s, kind="BootstrapToken", name=row.token_id, reason="TokenCreated",
               message=f"bootstrap token {row.token_id}: {uses} use(s), expires in {ttl_s} s"
                       f"{', class ' + device_class if device_class else ''}"
                       f"{', id prefix ' + repr(id_prefix) if id_prefix else ''}")
        s.commit()
    log.info("bootstrap token %s created (%d uses, ttl %d s)", row.token_id, uses, ttl_s)
    return token, token_view(row)


def list_tokens(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as s:
        rows = s.exec(select(EnrollToken).order_by(col(EnrollToken.created_ms).desc())).all()
        return [token_view(t) for t in rows]


def revoke_token(engine: Engine, token_id: str) -> dict[str, Any] | None:
    """Revoke by id (idempotent); None when there is no such token."""
    with Session(engine, expire_on_commit=False) as s:
        t = s.get(EnrollToken, token_id)
        if t is None:
            return None
        if t.revoked_ms is None:
            t.revoked_ms = _now_ms()
            s.add(t)
            _event(s, kind="BootstrapToken", name=token_id, reason="TokenRevoked",
                   message=f"bootstrap token {token_id} revoked")
            s.commit()
            log.info("bootstrap token %s revoked", token_id)
        return token_view(t)


# -- enrollment ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnrollRequest:
    token: str
    device_id: str
    device_class: str
    csr_pem: str = ""
    remote: str = ""


class Enroller:
    """Checks and performs enrollments for one controller (DB, keys, settings, optional CA)."""

    def __init__(self, engine: Engine, *, settings: Any, root_public_b64: str) -> None:
        self.engine = engine
        self.settings = settings
        self.root_public_b64 = root_public_b64

    @property
    def tls_on(self) -> bool:
        return bool(getattr(self.settings, "mqtt_tls_ca", ""))

    def _ca(self) -> Any:
        from controller.pki import CertificateAuthority

        pki_dir = Path(self.settings.resolved_pki_dir)
        try:
            return CertificateAuthority(pki_dir)
        except GiveUp as e:
            raise GiveUp(f"the broker needs client certificates but this controller has no "
                         f"fleet CA to sign them ({e}); set pki_dir or issue certificates with "
                         "`edgefleet pki issue-device`", reason="no_ca") from e

    def mqtt_view(self, cert_pem: str) -> dict[str, Any]:
        s = self.settings
        tls = None
        if self.tls_on:
            tls = {"ca_pem": Path(s.mqtt_tls_ca).read_text(), "cert_pem": cert_pem}
        return {"host": s.enroll_mqtt_host or s.mqtt_host,
                "port": int(s.enroll_mqtt_port or s.mqtt_port),
                "protocol": str(s.mqtt_protocol), "tls": tls}

    def _refuse(self, req: EnrollRequest, reason: str, message: str, *,
                token_id: str = "") -> EnrollRefused:
        log.warning("enrollment of %r refused (%s, token %s, from %s): %s", req.device_id[:80],
                    reason, token_id or "?", req.remote or "?", message)
        with Session(self.engine) as s:
            _event(s, name=req.device_id if topics.valid_device_id(req.device_id) else "?",
                   reason="EnrollRefused", warning=True,
                   message=f"{reason}: {message} (token {token_id or '?'}, from "
                           f"{req.remote or '?'})")
            s.commit()
        return EnrollRefused(message, reason=reason)

    def _check_request(self, req: EnrollRequest) -> None:
        """422 for a malformed request (no token use spent)."""
        from controller.pki import check_device_id

        check_device_id(req.device_id)
        if not CLASS_RE.match(req.device_class):
            raise Rejected(f"bad device class {req.device_class[:80]!r}",
                           reason="bad_device_class")

    def _check_token(self, s: Session, req: EnrollRequest) -> EnrollToken:
        t = s.exec(select(EnrollToken).where(
            EnrollToken.token_sha256 == token_sha256(req.token))).first()
        if t is None:
            raise self._refuse(req, "unknown_token", "unknown bootstrap token")
        state = token_state(t)
        if state is not TokenState.ACTIVE:
            words = {TokenState.EXPIRED: "expired", TokenState.USED_UP: "used up",
                     TokenState.REVOKED: "revoked"}[state]
            raise self._refuse(req, state.value, f"bootstrap token {t.token_id} is {words}",
                               token_id=t.token_id)
        if t.device_class and t.device_class != req.device_class:
            raise self._refuse(req, "wrong_class", f"token {t.token_id} is for device class "
                               f"{t.device_class!r}, not {req.device_class!r}",
                               token_id=t.token_id)
        if t.id_prefix and not req.device_id.startswith(t.id_prefix):
            raise self._refuse(req, "wrong_prefix", f"token {t.token_id} is for device ids "
                               f"starting with {t.id_prefix!r}", token_id=t.token_id)
        known = s.get(Enrollment, req.device_id) is not None or \
            s.get(Device, req.device_id) is not None
        if known and not t.reenroll:
            raise self._refuse(req, "already_enrolled", f"device {req.device_id} is already "
                               "known; re-enrolling it needs a token made with --reenroll",
                               token_id=t.token_id)
        return t

    def enroll(self, req: EnrollRequest, *, controller_url: str) -> dict[str, Any]:
        """Enroll one board; the answer for ``edgefleet-agent enroll``."""
        self._check_request(req)
        with Session(self.engine) as s:
            t = self._check_token(s, req)
        cert_pem, serial, not_after_ms = "", "", None
        if self.tls_on:
            if not req.csr_pem:
                raise Rejected("the broker requires a client certificate: send csr_pem "
                               "(edgefleet-agent enroll does)", reason="csr_required")
            from cryptography import x509

            cert_bytes = self._ca().sign_device_csr(
                req.device_id, req.csr_pem.encode(), days=int(self.settings.enroll_cert_days))
            cert = x509.load_pem_x509_certificate(cert_bytes)
            cert_pem, serial = cert_bytes.decode(), format(cert.serial_number, "x")
            not_after_ms = int(cert.not_valid_after_utc.timestamp() * 1000)
        now = _now_ms()
        try:
            with Session(self.engine) as s:
                spent = s.execute(update(EnrollToken).where(
                    col(EnrollToken.token_id) == t.token_id, col(EnrollToken.uses_left) > 0,
                    col(EnrollToken.expires_ms) > now, col(EnrollToken.revoked_ms).is_(None),
                ).values(uses_left=col(EnrollToken.uses_left) - 1, last_used_ms=now))
                if getattr(spent, "rowcount", 0) != 1:
                    s.rollback()
                    raise self._refuse(req, TokenState.USED_UP.value, f"bootstrap token "
                                       f"{t.token_id} was used up by another enrollment",
                                       token_id=t.token_id)
                old = s.get(Enrollment, req.device_id)
                if old is not None:
                    if not t.reenroll:
                        s.rollback()
                        raise self._refuse(req, "already_enrolled",
                                           f"device {req.device_id} was enrolled meanwhile",
                                           token_id=t.token_id)
                    s.delete(old)
                    s.flush()
                s.add(Enrollment(device_id=req.device_id, device_class=req.device_class,
                                 token_id=t.token_id, enrolled_ms=now, cert_serial=serial,
                                 cert_not_after_ms=not_after_ms, remote=req.remote[:100]))
                _event(s, name=req.device_id, reason="Enrolled",
                       message=f"enrolled as class {req.device_class} with token "
                               f"{t.token_id}{' (certificate ' + serial + ')' if serial else ''}"
                               f" from {req.remote or '?'}")
                s.commit()
        except IntegrityError as e:
            raise self._refuse(req, "already_enrolled", f"device {req.device_id} was enrolled "
                               "by a concurrent request", token_id=t.token_id) from e
        log.info("device %s enrolled (class %s, token %s, from %s)", req.device_id,
                 req.device_class, t.token_id, req.remote or "?")
        return {"device_id": req.device_id, "device_class": req.device_class,
                "root_public_key": self.root_public_b64, "controller_url": controller_url,
                "mqtt": self.mqtt_view(cert_pem), "token_id": t.token_id,
                "cert_not_after_ms": not_after_ms}
