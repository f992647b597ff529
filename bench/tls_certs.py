"""Development PKI for the TLS probes: an ECDSA P-256 CA and per-node leaf certificates (the
`cryptography` package), and the `ssl` contexts for mutual TLS with them.

A node's certificate names its node id three ways: subject CN, a DNS SAN (so that OpenSSL's own
hostname check pins the peer's node id when the dialer passes it as `server_hostname`, and gRPC's
`grpc.ssl_target_name_override` does the same), and a URI SAN `prfaas://<cluster>/node/<id>`
(the identity to authorise on; the cluster travels with it). Subject O is the cluster. Extended key
usage holds both serverAuth and clientAuth: a node dials and is dialled.

    pki = make_pki(tmp_dir, "dev", ["router", "prefill-0", "decode-0"])
    server_ctx = server_context(pki, "decode-0"); client_ctx = client_context(pki, "prefill-0")
    client_ctx.wrap_socket(sock, server_hostname="decode-0")    # pins the server's node id
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

URI_PREFIX = "prfaas://"


@dataclass(frozen=True)
class Pki:
    """Paths of a CA certificate and each node's certificate and key (PEM)."""

    dir: Path
    cluster: str
    ca: Path

    def cert(self, node_id: str) -> Path:
        return self.dir / f"{node_id}.crt"

    def key(self, node_id: str) -> Path:
        return self.dir / f"{node_id}.key"


def _name(common_name: str, cluster: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(cluster: str, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"prfaas {cluster} CA", cluster)
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, node_id: str, cluster: str, days: int = 365
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(node_id), x509.UniformResourceIdentifier(f"{URI_PREFIX}{cluster}/node/{node_id}")]
    cert = (
        _builder(_name(node_id, cluster), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(directory: Path, cluster: str, node_ids: list[str]) -> Pki:
    """Writes ca.crt and <node>.crt / <node>.key (keys mode 0600) for each node id."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(cluster)
    pki = Pki(directory, cluster, directory / "ca.crt")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for node in node_ids:
        key, cert = make_leaf(ca_key, ca_cert, node, cluster)
        pki.cert(node).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pki.key(node).touch(mode=0o600)
        pki.key(node).write_bytes(_pem_key(key))
    return pki


def server_context(pki: Pki, node_id: str) -> ssl.SSLContext:
    """TLS 1.3 only; the client must present a certificate from the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(pki.cert(node_id), pki.key(node_id))
    ctx.load_verify_locations(pki.ca)
    return ctx


def client_context(pki: Pki, node_id: str) -> ssl.SSLContext:
    """TLS 1.3 only; verifies the server against the CA and (check_hostname) the node id passed
    as `server_hostname`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(pki.cert(node_id), pki.key(node_id))
    ctx.load_verify_locations(pki.ca)
    return ctx


def peer_node(peercert: dict[str, Any] | None, cluster: str) -> str | None:
    """The node id in a verified peer certificate (`getpeercert()` of an SSLSocket or SSLObject,
    `transport.get_extra_info("peercert")` in asyncio): its URI SAN in `cluster`, else None."""
    prefix = f"{URI_PREFIX}{cluster}/node/"
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "URI" and value.startswith(prefix):
            return str(value[len(prefix):])
    return None
