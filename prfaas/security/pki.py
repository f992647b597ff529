"""Certificates: a cluster's CA and one key and certificate per identity (the `cryptography` package).

The CA is the cluster's trust root: an ECDSA P-256 certificate (`BasicConstraints(ca=True,
path_length=0)`, keyCertSign + cRLSign). Each identity gets a P-256 leaf with subject
`CN=<name>, O=<domain>`, EKU serverAuth + clientAuth (every service dials and is dialled), and SANs:
- `URI:prfaas://<domain>/<kind>/<name>`: the identity authorisation reads (`identity.py`);
- `DNS:<name>`: the name a dialler expects (gRPC's `ssl_target_name_override`, the `ssl` module's
  `server_hostname`), whatever address it dials;
- the hosts it serves on (DNS names and IP addresses), given per identity.

A directory holds `ca.crt` and `<name>.crt` / `<name>.key` (keys mode 0600). `prfaas certs` writes
the CA key as `ca.key` beside them: keep it off the nodes. A development PKI (`ensure_dev_pki`, what
`prfaas up` and the tests use) also holds a `DEV_PKI` marker: there, and only there, a service that
finds no certificate for its name issues one itself from `ca.key` (`issue_dev_cert`).
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from prfaas.security.identity import KINDS, Identity

DEV_MARKER = "DEV_PKI"
DEV_HOSTS = ("localhost", "127.0.0.1", "::1")


def _name(common_name: str, domain: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def make_ca(domain: str, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"prfaas {domain} CA", domain)
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, who: Identity,
              hosts: Sequence[str] = (), days: int = 365) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and a certificate for `who`, valid for `hosts` too."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(who.uri), x509.DNSName(who.name)]
    names += [_san(h) for h in dict.fromkeys(hosts) if h and h != who.name]
    cert = (
        _builder(_name(who.name, who.domain), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_suffix(".key.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_suffix(".crt.tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def write_ca(directory: Path, domain: str) -> None:
    """A new CA in `directory` (ca.crt and ca.key); refuses to replace one."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.crt").exists():
        raise FileExistsError(f"{directory / 'ca.crt'} exists: a new CA would orphan every certificate it signed")
    key, cert = make_ca(domain)
    _write_key(directory / "ca.key", key)
    _write_cert(directory / "ca.crt", cert)


def load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'}: not an EC key")
    return key, x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())


def ca_domain(directory: Path) -> str:
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value)


def issue(directory: Path, kind: str, name: str, hosts: Sequence[str] = (), days: int = 365) -> Identity:
    """Writes `<name>.crt` / `<name>.key` signed by the CA in `directory` (replacing any: rotation)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    ca_key, ca_cert = load_ca(directory)
    who = Identity(ca_domain(directory), kind, name)
    key, cert = make_leaf(ca_key, ca_cert, who, hosts, days)
    _write_key(directory / f"{name}.key", key)  # the key first: a reader that sees the new cert finds it
    _write_cert(directory / f"{name}.crt", cert)
    return who


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_dev_pki(directory: Path, domain: str = "dev") -> Path:
    """A development PKI in `directory`: made on first use, reused after (safe across processes)."""
    with _locked(directory):
        if not (directory / "ca.crt").exists():
            write_ca(directory, domain)
            (directory / DEV_MARKER).write_text("a development PKI: services issue their own certificates here\n")
    return directory


def is_dev_pki(directory: Path) -> bool:
    return (directory / DEV_MARKER).is_file() and (directory / "ca.key").is_file()


def issue_dev_cert(directory: Path, kind: str, name: str) -> None:
    """In a development PKI only: a certificate for `name` unless one exists (valid on loopback)."""
    if not is_dev_pki(directory):
        raise FileNotFoundError(f"no certificate {directory / (name + '.crt')} (and {directory} is not a "
                                "development PKI: make one with `prfaas certs`)")
    with _locked(directory):
        if not (directory / f"{name}.crt").exists():
            issue(directory, kind, name, DEV_HOSTS)
