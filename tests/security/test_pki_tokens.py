"""The pieces of issue 10 that need no cluster: `prfaas certs` (CA, identities in the SANs, key
modes, rotation reusing the CA, refusals), the TLS configuration's refusals, development
certificates issued on first use only in a development PKI, identities read from certificates,
token files re-read when they change, the per-client limiter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from prfaas.security import pki, tls
from prfaas.security.identity import Identity, parse_uri
from prfaas.security.tokens import ClientLimiter, TokenFile

ROOT = Path(__file__).resolve().parents[2]


def certs(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "prfaas.cli", "certs", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def sans(path: Path) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_certs_makes_a_ca_and_identities_and_rotates(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    r = certs("--out", str(out), "--cluster", "acme", "--node", "router:router", "--node", "prefill:p0@10.0.0.5,p0.lan")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"dir": str(out), "cluster": "acme", "new_ca": True,
                                    "issued": ["router:router", "worker:p0"]}
    s = sans(out / "p0.crt")
    assert s.get_values_for_type(x509.UniformResourceIdentifier) == ["prfaas://acme/worker/p0"]
    assert s.get_values_for_type(x509.DNSName) == ["p0", "p0.lan"]
    assert [str(a) for a in s.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert (out / "p0.key").stat().st_mode & 0o777 == 0o600 and (out / "ca.key").stat().st_mode & 0o777 == 0o600
    assert not (out / pki.DEV_MARKER).exists()
    assert tls.own_identity(out / "router.crt") == Identity("acme", "router", "router")
    ca_before, p0_before = (out / "ca.crt").read_bytes(), (out / "p0.crt").read_bytes()
    r = certs("--out", str(out), "--cluster", "acme", "--node", "decode:p0")
    assert r.returncode == 0 and not json.loads(r.stdout)["new_ca"]
    assert (out / "ca.crt").read_bytes() == ca_before and (out / "p0.crt").read_bytes() != p0_before
    r = certs("--out", str(out), "--cluster", "other", "--node", "router:router")
    assert r.returncode == 2 and "not 'other'" in r.stderr
    for bad in ("nokind", "wizard:x", "router:", "worker:a/b"):
        r = certs("--out", str(out), "--node", bad)
        assert r.returncode == 2 and "--node" in r.stderr, bad


def test_configuration_refusals(tmp_path: Path) -> None:
    with pytest.raises(tls.TlsSetupError, match="TLS is on by default"):
        tls.resolve(name="x", kind="worker")
    real = tmp_path / "real"
    pki.write_ca(real, "acme")
    with pytest.raises(tls.TlsSetupError, match="not a development PKI"):
        tls.resolve(tls_dir=str(real), name="decode-0", kind="worker")
    pki.issue(real, "worker", "decode-0")
    cfg = tls.resolve(tls_dir=str(real), name="decode-0", kind="worker")
    assert cfg.identity == Identity("acme", "worker", "decode-0")
    insecure = tls.resolve(insecure=True, name="x", kind="worker")
    for listen in ("0.0.0.0:1", "[::]:1", "10.1.2.3:1", "example.com:1"):
        with pytest.raises(tls.TlsSetupError, match="allow-insecure-remote"):
            tls.check_listen(listen, insecure, allow_insecure_remote=False)
        tls.check_listen(listen, insecure, allow_insecure_remote=True)
        tls.check_listen(listen, cfg, allow_insecure_remote=False)  # TLS: any address
    for listen in ("127.0.0.1:1", "[::1]:1", "localhost:1", "127.3.4.5:1"):
        tls.check_listen(listen, insecure, allow_insecure_remote=False)


def test_dev_pki_issues_on_first_use(tmp_path: Path) -> None:
    d = pki.ensure_dev_pki(tmp_path / "dev")
    assert pki.is_dev_pki(d) and pki.ensure_dev_pki(d) == d  # made once, reused
    cfg = tls.resolve(tls_dir=str(d), name="prefill-7", kind="worker")
    assert cfg.identity == Identity("dev", "worker", "prefill-7")
    s = sans(d / "prefill-7.crt")
    assert "localhost" in s.get_values_for_type(x509.DNSName)
    with pytest.raises(FileExistsError):
        pki.write_ca(d, "dev")


def test_identities_parse_strictly() -> None:
    assert parse_uri("prfaas://acme/worker/p0") == Identity("acme", "worker", "p0")
    for bad in ("prfaas://acme/wizard/p0", "prfaas://acme/worker", "prfaas://acme/worker/p0/x", "spiffe://a/b/c",
                "prfaas:///worker/p0"):
        assert parse_uri(bad) is None, bad


def test_token_file_rotates_and_keeps_the_last_good_set(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# clients\nalice:aaaaaaaaaaaaaaaaaaaa\nbbbbbbbbbbbbbbbbbbbb\n")
    tokens = TokenFile(f)
    assert tokens.lookup("aaaaaaaaaaaaaaaaaaaa") == "alice" and tokens.lookup("bbbbbbbbbbbbbbbbbbbb") == "line3"
    assert tokens.lookup("aaaa") is None and tokens.lookup("") is None
    time.sleep(0.01)
    f.write_text("alice:cccccccccccccccccccc\n")
    assert tokens.lookup("aaaaaaaaaaaaaaaaaaaa") is None and tokens.lookup("cccccccccccccccccccc") == "alice"
    f.write_text("alice:short\n")  # a bad file: the last good set stays
    assert tokens.lookup("cccccccccccccccccccc") == "alice"
    with pytest.raises(ValueError, match="16 characters"):
        TokenFile(f)
    with pytest.raises(ValueError, match="token file"):
        TokenFile(tmp_path / "missing")


def test_client_limiter() -> None:
    lim = ClientLimiter(2)
    assert lim.try_acquire("a") and lim.try_acquire("a") and not lim.try_acquire("a") and lim.try_acquire("b")
    lim.release("a")
    assert lim.try_acquire("a")
    assert all(ClientLimiter(0).try_acquire("a") for _ in range(100))
    assert lim.try_acquire(None)
