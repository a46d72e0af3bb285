"""A small X.509 certificate authority for MQTT identities (broker, controller, devices).

Used by ``edgefleet pki ...`` (controller/cli.py), by enrollment (``sign_device_csr``,
controller/fleet/enroll.py), by the embedded controller when the broker
runs with TLS (controller/embedded.py: ``tls=True``, ``edgefleet up --tls``/``demo --secure``)
and by tests. Every identity is an ECDSA P-256 key and a certificate signed by the fleet CA:

- the CA (``ca.key`` 0600 + ``ca.pem``) lives in ``{data_dir}/pki``;
- a device certificate has CN = device id: Mosquitto's ``use_identity_as_username`` turns the
  CN into the MQTT username, and the ACL (controller/broker.py ``mosquitto_acl``) confines that
  username to ``edgefleet/v1/devices/{CN}/...``;
- the controller certificate has CN = ``CONTROLLER_CN`` (``controller@edgefleet``): the ``@``
  cannot appear in a device id (protos.topics.DEVICE_ID_RE), so no device can be issued a
  certificate that the ACL mistakes for the controller;
- the server certificate names the broker's host names / IP addresses (subjectAltName).

Private keys are written atomically with mode 0600. This CA is for one fleet run by one
operator: there is no revocation list (re-issue the CA to revoke everything; docs/security.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protos import topics
from protos.errors import GiveUp, Rejected
from protos.fsutil import write_atomic

CONTROLLER_CN = "controller@edgefleet"
CA_CN = "edgefleet fleet CA"
CA_DAYS = 3650
LEAF_DAYS = 825
RESERVED_IDS = frozenset({"controller", "edgefleet", "broker"})
MAX_CSR_BYTES = 16 * 1024
CSR_CURVES = ("secp256r1", "secp384r1")


def check_device_id(device_id: str) -> None:
    """Rejected (reason ``bad_device_id``) unless ``device_id`` may be a certificate CN."""
    if not topics.valid_device_id(device_id):
        raise Rejected(f"invalid device id {device_id!r}: use [a-z0-9._-], 1-63 chars",
                       reason="bad_device_id")
    if device_id in RESERVED_IDS:
        raise Rejected(f"device id {device_id!r} is reserved", reason="bad_device_id")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class IssuedFiles:
    """Where an identity's files were written."""

    ca: Path
    cert: Path
    key: Path


class CertificateAuthority:
    """The fleet CA kept in ``root`` (normally ``{data_dir}/pki``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.ca_key_path = self.root / "ca.key"
        self.ca_cert_path = self.root / "ca.pem"
        if not (self.ca_key_path.is_file() and self.ca_cert_path.is_file()):
            raise GiveUp(f"no CA in {self.root}: run `edgefleet pki init`", reason="no_ca")
        try:
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
            self.ca_cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        except (ValueError, TypeError) as e:
            raise GiveUp(f"CA files in {self.root} are unreadable: {e}", reason="bad_ca") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise GiveUp(f"{self.ca_key_path} is not an EC key", reason="bad_ca")
        self._ca_key = key

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def init(cls, root: Path, *, force: bool = False) -> CertificateAuthority:
        """Create a new CA key (0600) and self-signed certificate in ``root``."""
        root = Path(root)
        if (root / "ca.key").exists() and not force:
            raise Rejected(f"a CA already exists in {root} (use --force to replace it; every "
                           "certificate it issued stops working)", reason="ca_exists")
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_CN)])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        write_atomic(root / "ca.key", _key_pem(key), mode=0o600)
        write_atomic(root / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return cls(root)

    @classmethod
    def load_or_init(cls, root: Path) -> CertificateAuthority:
        root = Path(root)
        if (root / "ca.key").is_file():
            return cls(root)
        return cls.init(root)

    # -- issuing --------------------------------------------------------------------------------
    def _issue(self, cn: str, *, server_hosts: list[str] | None = None,
               client: bool = True, days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._certificate(cn, key.public_key(), server_hosts=server_hosts,
                                 client=client, days=days)
        return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)

    def _certificate(self, cn: str, public_key: ec.EllipticCurvePublicKey, *,
                     server_hosts: list[str] | None = None, client: bool = True,
                     days: int = LEAF_DAYS) -> x509.Certificate:
        now = _now()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(self.ca_cert.subject).public_key(public_key)
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 self._ca_key.public_key()), critical=False))
        if server_hosts is not None:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            sans: list[x509.GeneralName] = []
            for h in server_hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return b.sign(self._ca_key, hashes.SHA256())

    def issue_device_cert(self, device_id: str, *, days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
        """(key_pem, cert_pem) for a device: CN = ``device_id`` (validated), client auth."""
        check_device_id(device_id)
        return self._issue(device_id, days=days)

    def sign_device_csr(self, device_id: str, csr_pem: bytes, *,
                        days: int = LEAF_DAYS) -> bytes:
        """A device certificate (PEM) for the key in ``csr_pem``: the device keeps its private
        key (enrollment, controller/fleet/enroll.py). The CSR must carry a valid self-signature
        over an EC P-256 or P-384 key; its subject must be empty or CN = ``device_id``. Only the
        public key is taken from it: CN, validity and usages are the CA's choice."""
        check_device_id(device_id)
        if len(csr_pem) > MAX_CSR_BYTES:
            raise Rejected(f"CSR of {len(csr_pem)} bytes is over {MAX_CSR_BYTES}",
                           reason="bad_csr")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            signature_ok = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, TypeError) as e:
            raise Rejected(f"CSR is not a PEM certificate request: {e}", reason="bad_csr") from e
        if not signature_ok:
            raise Rejected("CSR signature does not verify (not made with its own key)",
                           reason="bad_csr")
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
                public_key.curve.name not in CSR_CURVES:
            raise Rejected("CSR key must be EC P-256 or P-384", reason="bad_csr")
        cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns and cns != [device_id]:
            raise Rejected(f"CSR names CN {cns[0]!r}, not the device id {device_id!r}",
                           reason="bad_csr")
        cert = self._certificate(device_id, public_key, days=days)
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue_server_cert(self, hosts: list[str], *, days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
        """(key_pem, cert_pem) for the broker: subjectAltName = ``hosts`` (names or IPs)."""
        if not hosts:
            raise Rejected("a server certificate needs at least one host name or IP",
                           reason="no_hosts")
        return self._issue(hosts[0], server_hosts=list(hosts), client=False, days=days)

    def issue_controller_cert(self, *, days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
        """(key_pem, cert_pem) for the controller's MQTT client: CN = CONTROLLER_CN."""
        return self._issue(CONTROLLER_CN, days=days)

    # -- files ----------------------------------------------------------------------------------
    def write_identity(self, out_dir: Path, name: str, key_pem: bytes,
                       cert_pem: bytes) -> IssuedFiles:
        """Write ``name.key`` (0600), ``name.pem`` and a copy of ``ca.pem`` into ``out_dir``."""
        out_dir = Path(out_dir)
        files = IssuedFiles(ca=out_dir / "ca.pem", cert=out_dir / f"{name}.pem",
                            key=out_dir / f"{name}.key")
        write_atomic(files.key, key_pem, mode=0o600)
        write_atomic(files.cert, cert_pem, mode=0o644)
        if files.ca.resolve() != self.ca_cert_path.resolve():
            write_atomic(files.ca, self.ca_cert_path.read_bytes(), mode=0o644)
        return files

    def device_files(self, device_id: str, out_dir: Path) -> IssuedFiles:
        """Issue a device identity and write it as ``device.key``/``device.pem``/``ca.pem``."""
        key_pem, cert_pem = self.issue_device_cert(device_id)
        return self.write_identity(out_dir, "device", key_pem, cert_pem)

    def ensure_server(self, hosts: list[str]) -> IssuedFiles:
        """The broker identity in ``root`` (issued on first use, re-issued if hosts change)."""
        cert_path = self.root / "server.pem"
        if cert_path.is_file() and (self.root / "server.key").is_file():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
                have |= set(san.get_values_for_type(x509.DNSName))
            except x509.ExtensionNotFound:
                have = set()
            if set(hosts) <= have and cert.not_valid_after_utc > _now():
                return IssuedFiles(self.ca_cert_path, cert_path, self.root / "server.key")
        key_pem, cert_pem = self.issue_server_cert(hosts)
        return self.write_identity(self.root, "server", key_pem, cert_pem)

    def ensure_controller(self) -> IssuedFiles:
        """The controller's client identity in ``root`` (issued on first use)."""
        cert_path = self.root / "controller.pem"
        if cert_path.is_file() and (self.root / "controller.key").is_file():
            return IssuedFiles(self.ca_cert_path, cert_path, self.root / "controller.key")
        key_pem, cert_pem = self.issue_controller_cert()
        return self.write_identity(self.root, "controller", key_pem, cert_pem)


def cert_common_name(cert_pem: bytes) -> str:
    """The CN of a PEM certificate (for `edgefleet pki show` and tests)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""
