"""``edgefleet-agent enroll``: get this board's identity and trust root, write its config.

Called by agent/cli.py. Online form (``--controller URL --token T``): generate an EC P-256 key
on the board (it never leaves it), send a CSR with CN = device id to the controller's
``POST /api/v1/enroll`` (controller/api/enroll.py) with the bootstrap token, check the answer
(the root key is 32 raw bytes; the certificate names this device, carries this key and is
signed by the CA it came with), then write ``{data_dir}/tls/device.key`` (0600),
``device.pem``, ``ca.pem`` and the agent config, each atomically. Offline form
(``--root-public-key``, optional ``--tls-ca/--tls-cert/--tls-key``): the operator copied
those by hand. Uses only the standard library's urllib (no httpx on boards).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.config import AgentConfig, ConfigError, config_from_dict, config_to_dict
from protos import topics
from protos.fsutil import write_atomic

MAX_RESPONSE_BYTES = 1024 * 1024
TIMEOUT_S = 30.0


class EnrollError(Exception):
    """Enrollment failed; ``status`` is the HTTP status (0 = no answer), ``reason`` the code."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """A fresh device key and its CSR (PEM)."""

    key_pem: bytes
    csr_pem: bytes


def make_identity(device_id: str) -> Identity:
    """EC P-256 key + CSR with CN = ``device_id``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Identity(key_pem, csr.public_bytes(serialization.Encoding.PEM))


def check_certificate(cert_pem: bytes, ca_pem: bytes, *, device_id: str, key_pem: bytes) -> None:
    """EnrollError unless the certificate is for ``device_id``, holds our key and is signed by
    the CA (a confused or hostile answer must not become this board's identity)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        key = serialization.load_pem_private_key(key_pem, None)
    except ValueError as e:
        raise EnrollError(f"the controller sent an unreadable certificate: {e}",
                          reason="bad_answer") from e
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [device_id]:
        raise EnrollError(f"certificate is for {cns}, not {device_id}", reason="bad_answer")
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise EnrollError("certificate does not carry this board's key", reason="bad_answer")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise EnrollError(f"certificate is not signed by the CA sent with it: {e!r}",
                          reason="bad_answer") from e


def post_enroll(controller_url: str, body: dict[str, Any], *, ca_file: str = "",
                timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """POST the request; the JSON answer, or EnrollError with the controller's reason."""
    url = controller_url.rstrip("/") + "/api/v1/enroll"
    if not url.startswith(("http://", "https://")):
        raise EnrollError(f"controller URL must start with http:// or https://: {controller_url}")
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Accept": "application/json"})
    ctx = ssl.create_default_context(cafile=ca_file or None) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as resp:
            raw = resp.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as e:
        detail, reason = e.reason, ""
        try:
            err = json.loads(e.read(64 * 1024) or b"{}")
            detail, reason = err.get("detail", detail), str(err.get("reason", ""))
        except (ValueError, AttributeError):
            pass
        raise EnrollError(f"{detail} (HTTP {e.code})", status=e.code, reason=reason) from e
    except (urllib.error.URLError, OSError) as e:
        raise EnrollError(f"cannot reach the controller at {controller_url}: {e}") from e
    if len(raw) > MAX_RESPONSE_BYTES:
        raise EnrollError(f"answer over {MAX_RESPONSE_BYTES} bytes", reason="bad_answer")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise EnrollError(f"answer is not JSON: {e}", reason="bad_answer") from e
    if not isinstance(data, dict):
        raise EnrollError("answer is not a JSON object", reason="bad_answer")
    return data


def _root_b64(value: Any) -> str:
    try:
        raw = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as e:
        raise EnrollError(f"root_public_key is not base64: {e}", reason="bad_answer") from e
    if len(raw) != 32:
        raise EnrollError(f"root_public_key has {len(raw)} bytes, not 32", reason="bad_answer")
    return base64.b64encode(raw).decode()


def write_config(out: Path, data: dict[str, Any]) -> AgentConfig:
    """Validate ``data`` as an agent config and write it atomically to ``out``."""
    cfg = config_from_dict(data)
    write_atomic(Path(out), yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode(),
                 mode=0o644)
    return cfg


def enroll_online(*, controller_url: str, token: str, device_id: str, device_class: str,
                  data_dir: str, out: Path, expected_root: str = "", controller_ca: str = "",
                  timeout_s: float = TIMEOUT_S) -> AgentConfig:
    """Enroll with the controller and write the TLS files and the config; the config."""
    if not topics.valid_device_id(device_id):
        raise ConfigError(f"device_id {device_id!r}: use [a-z0-9._-], 1-63 chars")
    ident = make_identity(device_id)
    ans = post_enroll(controller_url, {"token": token.strip(), "device_id": device_id,
                                       "device_class": device_class,
                                       "csr_pem": ident.csr_pem.decode()},
                      ca_file=controller_ca, timeout_s=timeout_s)
    root = _root_b64(ans.get("root_public_key"))
    if expected_root and _root_b64(expected_root.strip()) != root:
        raise EnrollError("the controller's root key differs from --root-public-key: refusing "
                          "(wrong controller, or someone in the middle)", reason="root_mismatch")
    mq = ans.get("mqtt")
    if not isinstance(mq, dict) or not isinstance(mq.get("host"), str) or \
            not isinstance(mq.get("port"), int):
        raise EnrollError("answer has no mqtt host/port", reason="bad_answer")
    mqtt: dict[str, Any] = {"host": mq["host"], "port": mq["port"],
                            "protocol": str(mq.get("protocol") or "5")}
    tls = mq.get("tls")
    if isinstance(tls, dict) and tls.get("cert_pem"):
        ca_pem, cert_pem = str(tls.get("ca_pem", "")).encode(), str(tls["cert_pem"]).encode()
        check_certificate(cert_pem, ca_pem, device_id=device_id, key_pem=ident.key_pem)
        tls_dir = Path(data_dir).resolve() / "tls"
        tls_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(tls_dir, 0o700)
        write_atomic(tls_dir / "device.key", ident.key_pem, mode=0o600)
        write_atomic(tls_dir / "device.pem", cert_pem, mode=0o600)
        write_atomic(tls_dir / "ca.pem", ca_pem, mode=0o600)
        mqtt["tls"] = {"ca": str(tls_dir / "ca.pem"), "cert": str(tls_dir / "device.pem"),
                       "key": str(tls_dir / "device.key")}
    return write_config(out, {"device_id": device_id, "device_class": device_class,
                              "data_dir": data_dir, "mqtt": mqtt,
                              "trust": {"root_public_key": root}})


def read_root_key(value: str) -> str:
    """Base64 of the 32-byte root key from base64 text or a file holding it (raw or base64)."""
    p = Path(value)
    try:
        raw = p.read_bytes() if p.is_file() else base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConfigError(f"--root-public-key is neither a file nor base64: {e}") from e
    if len(raw) != 32:  # a file may hold base64 text
        try:
            raw = base64.b64decode(raw.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ConfigError(f"--root-public-key file holds neither 32 raw bytes nor "
                              f"base64: {e}") from e
    return base64.b64encode(raw).decode()


def enroll_offline(*, root_public_key: str, device_id: str, device_class: str, data_dir: str,
                   out: Path, mqtt_host: str, mqtt_port: int, mqtt_protocol: str = "5",
                   tls_ca: str = "", tls_cert: str = "", tls_key: str = "") -> AgentConfig:
    """Write a config from what the operator gives (no network)."""
    mqtt: dict[str, Any] = {"host": mqtt_host, "port": mqtt_port, "protocol": mqtt_protocol}
    if tls_ca or tls_cert or tls_key:
        for flag, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert),
                           ("--tls-key", tls_key)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        mqtt["tls"] = {"ca": str(Path(tls_ca).resolve()) if tls_ca else "",
                       "cert": str(Path(tls_cert).resolve()) if tls_cert else "",
                       "key": str(Path(tls_key).resolve()) if tls_key else ""}
    return write_config(out, {"device_id": device_id, "device_class": device_class,
                              "data_dir": data_dir, "mqtt": mqtt,
                              "trust": {"root_public_key": read_root_key(root_public_key)}})
