"""The front door over HTTPS (issue 10: prompts never in clear across a network): with
--https-cert/--https-key it serves TLS only (a completion equals the plain loopback front door's;
plain HTTP and a client that does not trust the certificate are refused); on a non-loopback
address it will not serve plain HTTP unless told --allow-plain-http; half a certificate is refused."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.frontdoor.conftest import MODEL_NAME

ROOT = Path(__file__).resolve().parents[2]


def self_signed(d: Path) -> tuple[Path, Path]:
    """An operator's own certificate for 127.0.0.1 (not the cluster CA's)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prfaas front door")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    crt, pem = d / "door.crt", d / "door.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def frontdoor(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "services.frontdoor", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def refused(*args: str) -> str:
    p = frontdoor("--router", "127.0.0.1:9", *args)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    return err


def test_plain_http_only_on_loopback_and_whole_certificates_only():
    err = refused("--listen", "0.0.0.0:0")
    assert "not a loopback address" in err and "--https-cert" in err
    assert "go together" in refused("--listen", "127.0.0.1:0", "--https-cert", "x.crt")
    assert "FileNotFoundError" in refused("--listen", "127.0.0.1:0", "--https-cert", "no.crt", "--https-key", "no.key")


def test_completions_over_https(served, tmp_path):
    crt, key = self_signed(tmp_path)
    c = served.cluster
    door = frontdoor("--listen", "127.0.0.1:0", "--router", c.router_address, "--model", str(served.model_dir),
                     "--served-model-name", MODEL_NAME, "--https-cert", str(crt), "--https-key", str(key),
                     env={"PRFAAS_TLS_DIR": str(c.tls_dir), "PRFAAS_INSECURE": "0"})  # its identity for the router
    try:
        assert door.stdout is not None
        line = json.loads(door.stdout.readline())
        url, address = line["url"], line["address"]
        assert url == f"https://{address}/v1"
        prompt = "The front door speaks TLS"

        def complete(base_url: str, ctx: ssl.SSLContext | None = None) -> str:
            body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0}).encode()
            req = urllib.request.Request(f"{base_url}/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120, context=ctx) as r:
                return str(json.loads(r.read())["choices"][0]["text"])

        text = complete(url, ssl.create_default_context(cafile=str(crt)))
        assert text and text == complete(c.frontdoor_url)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # a client not trusting it
            complete(url, ssl.create_default_context())
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # plain HTTP to the TLS port
            urllib.request.urlopen(f"http://{address}/v1/models", timeout=10).read()
    finally:
        door.terminate()
        door.communicate(timeout=30)
