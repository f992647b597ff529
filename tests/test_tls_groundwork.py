"""Groundwork for mutual TLS (issue 10) and the Mooncake anchor, in real processes on loopback:
- grpc.aio with node-id certificates: the servicer reads the caller's node id from its
  certificate; a node the rule does not admit gets PERMISSION_DENIED; no certificate, a certificate
  from another CA, or a server certificate that does not name the expected node id fails the call;
- bench/tls_probe.py moves frames over mutual TLS 1.3 with the suite it asked for, each side reading
  the other's node id, every CRC good (its figures are not checked: they belong to docs/);
- bench/mooncake_anchor.py moves bytes with Mooncake's engine where the package imports, and where
  it does not, says why and exits non-zero (the benches then leave its rows out).
The TLS tests need the `cryptography` package and are skipped without it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

HAVE_CRYPTOGRAPHY = importlib.util.find_spec("cryptography") is not None
needs_crypto = pytest.mark.skipif(not HAVE_CRYPTOGRAPHY, reason="needs the `cryptography` package")


def run(*args: str, env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@needs_crypto
async def test_grpc_mtls_servicer_reads_the_callers_node_id(tmp_path):
    from grpc_mtls_example import METHOD, call, channel, serve
    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki", "example", ["router", "decode-0", "prefill-0"])
    other = make_pki(tmp_path / "other", "example", ["router", "decode-0"])  # same names, another CA
    server, port = await serve(pki, "decode-0", {METHOD: lambda node: node == "router"})
    try:
        async with channel(pki, "router", port, "decode-0") as ch:
            seen = await call(ch)
        assert seen["node"] == "router"
        assert seen["identity_key"] == "x509_subject_alternative_name"
        assert sorted(seen["identities"]) == ["127.0.0.1", "::1", "localhost", "prfaas://example/router/router",
                                              "router"]

        async with channel(pki, "prefill-0", port, "decode-0") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call(ch)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        refused = [(pki, None, pki.ca, "decode-0"),  # no client certificate
                   (other, "router", pki.ca, "decode-0"),  # a client certificate from another CA
                   (pki, "router", pki.ca, "prefill-0")]  # the server is not the node expected
        for owner, who, ca, expect in refused:
            async with channel(owner, who, port, expect, ca=ca) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call(ch, timeout_s=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (who, expect)
    finally:
        await server.stop(None)


@needs_crypto
def test_tls_probe_moves_frames_over_mutual_tls():
    out = run("bench/tls_probe.py", "--quick", "--total-mib", "16", "--reps", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "KiB" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["plain-sendmsg -> proto", "sslsock -> tls-proto",
                                                       "sslsock -> sslsock", "aead-sendmsg -> aead-proto"]
    assert all("TLS_AES_128_GCM_SHA256" in r for r in rows[1:])
    assert "receiver 'prefill-0' from the peer certificate" in out.stderr


@needs_crypto
def test_tls_probe_negotiates_the_suite_it_asks_for():
    import tls_probe

    cfg = tls_probe.Config("asyncio-tls", "sslsock", frame=256 << 10, suite="chacha20")
    with tempfile.TemporaryDirectory() as tmp:
        from tls_certs import make_pki

        pki = make_pki(Path(tmp) / "pki", tls_probe.CLUSTER, [tls_probe.SERVER_ID, tls_probe.CLIENT_ID])
        r = tls_probe.run_one(cfg, 4 << 20, pki.dir, Path(tmp))
    assert r["cipher"] == "TLS_CHACHA20_POLY1305_SHA256" and r["version"] == "TLSv1.3"
    assert r["recv"]["frames"] == 16 and r["recv"]["bad"] == 0


def test_mooncake_anchor_says_why_it_cannot_run():
    out = run("bench/mooncake_anchor.py", "--bytes", str(1 << 20), "--reps", "1",
              env={"PRFAAS_MOONCAKE_PYTHON": str(ROOT / "no-such-python")})
    assert out.returncode == 1
    assert "[mooncake] skipped: cannot run" in out.stderr


def _mooncake_python() -> str | None:
    import mooncake_anchor

    return None if mooncake_anchor.unavailable() else mooncake_anchor.mooncake_python()


@pytest.mark.skipif(_mooncake_python() is None, reason="mooncake-transfer-engine-non-cuda is not installed")
def test_mooncake_anchor_moves_the_bytes():
    import mooncake_anchor

    rates = mooncake_anchor.loopback_gbps(24 << 20, block_bytes=1 << 20, reps=1)  # CRC-checked inside
    assert rates is not None and set(rates) == set(mooncake_anchor.MODES)
    assert all(r > 0 for r in rates.values())


def test_listening_sockets_reads_this_process(tmp_path):
    import socket

    import mooncake_anchor

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
        assert f"127.0.0.1:{port}" in mooncake_anchor.listening_sockets()
    assert f"127.0.0.1:{port}" not in mooncake_anchor.listening_sockets()

