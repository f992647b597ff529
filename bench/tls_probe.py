"""What mutual TLS costs the KV data plane: two processes on loopback moving `--total-mib` in frames
of 256 KiB-4 MiB, plaintext (prfaas/transport/tcp.py's way: non-blocking socket + sendmsg) against
the ways Python's `ssl` can carry the same frames (bench/tls_endpoints.py lists them), each with
TLS 1.3, mutual certificates (ECDSA P-256, bench/tls_certs.py) and a chosen cipher suite.

    python bench/tls_probe.py [--total-mib 2048] [--reps 2] [--quick]

Needs `cryptography` (the certificates). Every configuration runs `--reps` times, round robin, so
the machine's load swings hit all of them alike; the table gives the best run and the ratio to
plaintext with the same frame size and CRC setting, measured in this run; CPU seconds per GB are
the two processes' user + system time while moving (sender: after the handshake; receiver: from
the connection's start). Then `openssl speed` for each cipher (one core) and what it bounds.

TLS 1.3 suites: `SSLContext.set_ciphers` sets only the TLS <= 1.2 list, and Python 3.11 has no
binding for SSL_CTX_set_ciphersuites, so each run restricts the suites with an OpenSSL config file
(`OPENSSL_CONF`, `Ciphersuites =` in `system_default`) in both processes; the negotiated suite is
read back from `cipher()` and printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tls_endpoints as ends  # noqa: E402

SUITES = {"aes128": "TLS_AES_128_GCM_SHA256", "aes256": "TLS_AES_256_GCM_SHA384",
          "chacha20": "TLS_CHACHA20_POLY1305_SHA256"}
OPENSSL_EVP = {"aes128": "aes-128-gcm", "aes256": "aes-256-gcm", "chacha20": "chacha20-poly1305"}
CLUSTER, SERVER_ID, CLIENT_ID = "probe", "decode-0", "prefill-0"
MiB = 1 << 20


@dataclass(frozen=True)
class Config:
    sender: str
    receiver: str
    frame: int = MiB
    suite: str = ""  # "" for plaintext
    crc: bool = True

    @property
    def tls(self) -> bool:
        return not self.sender.startswith("plain")

    def baseline(self) -> Config:
        return Config("plain-sendmsg", "proto", self.frame, "", self.crc)

    def label(self) -> str:
        return f"{self.sender} -> {self.receiver}"


def matrix(quick: bool) -> list[Config]:
    tls = Config("sslsock", "tls-proto", suite="aes128")
    plain = Config("plain-sendmsg", "proto")
    if quick:
        return [plain, tls, Config("sslsock", "sslsock", suite="aes128"),
                Config("aead-sendmsg", "aead-proto", suite="aes128")]
    out = [plain, replace(plain, crc=False), Config("plain-asyncio", "proto")]
    out += [replace(plain, frame=f) for f in (256 << 10, 4 * MiB)]
    out += [tls, replace(tls, crc=False), replace(tls, suite="aes256"), replace(tls, suite="chacha20")]
    out += [replace(tls, frame=f) for f in (256 << 10, 4 * MiB)]
    out += [Config("sslsock", "sslsock", suite="aes128"), Config("sslsock", "sslsock", frame=4 * MiB, suite="aes128"),
            Config("sslsock-join", "sslsock", suite="aes128"), Config("bio-sendmsg", "tls-proto", suite="aes128"),
            Config("asyncio-tls", "tls-proto", suite="aes128"), Config("aead-sendmsg", "aead-proto", suite="aes128"),
            Config("aead-sendmsg", "aead-proto", suite="aes128", crc=False)]
    return out


# --- one run: a receiver and a sender process --------------------------------------------------------
def _contexts(spec: dict[str, Any]) -> Any:
    if not spec["suite"]:
        return None
    import tls_certs

    pki = tls_certs.Pki(Path(spec["pki"]), CLUSTER, Path(spec["pki"]) / "ca.crt")
    if spec["role"] == "send":
        return tls_certs.client_context(pki, CLIENT_ID)
    return tls_certs.server_context(pki, SERVER_ID)


async def _child(spec: dict[str, Any]) -> None:
    ctx = _contexts(spec)
    if spec["role"] == "receive":
        info = await ends.receive(spec["kind"], ctx, spec["crc"], lambda p: print(json.dumps({"port": p}), flush=True))
    else:
        src = ends.Source(spec["total"], spec["frame"])
        info = await ends.send(spec["kind"], spec["port"], src, ctx, SERVER_ID)
    print(json.dumps(info), flush=True)


def _env(suite: str, conf_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    if suite:
        conf = conf_dir / f"{suite}.cnf"
        conf.write_text("openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = tls\n"
                        f"[tls]\nCiphersuites = {SUITES[suite]}\n")
        env["OPENSSL_CONF"] = str(conf)
    return env


def run_one(cfg: Config, total: int, pki: Path, conf_dir: Path, timeout_s: float = 300) -> dict[str, Any]:
    base = {"frame": cfg.frame, "total": total, "crc": cfg.crc, "suite": cfg.suite, "pki": str(pki)}
    argv = [sys.executable, __file__, "--child"]
    env = _env(cfg.suite, conf_dir)
    recv = subprocess.Popen([*argv, json.dumps({**base, "role": "receive", "kind": cfg.receiver})],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert recv.stdout is not None
        port = json.loads(recv.stdout.readline())["port"]
        out = subprocess.run([*argv, json.dumps({**base, "role": "send", "kind": cfg.sender, "port": port})],
                             capture_output=True, text=True, env=env, timeout=timeout_s)
        if out.returncode != 0:
            raise RuntimeError(f"{cfg}: sender failed: {out.stderr.strip()[-800:]}")
        sent = json.loads(out.stdout.strip().splitlines()[-1])
        got = json.loads(recv.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        recv.kill()
        recv.wait()
    return {**sent, "recv": got}


# --- the table -------------------------------------------------------------------------------------------
def _gbs(r: dict[str, Any]) -> float:
    return float(r["bytes"] / r["seconds"] / 1e9)


def _cpu_per_gb(r: dict[str, Any]) -> float:
    return float((r["cpu_s"] + r["recv"]["cpu_s"]) / (r["bytes"] / 1e9))


def _cpu_side(runs: list[dict[str, Any]], receiver: bool) -> float:
    """Median CPU seconds per GB of one side (load on the machine moves this far less than GB/s)."""
    return statistics.median((r["recv"] if receiver else r)["cpu_s"] / (r["bytes"] / 1e9) for r in runs)


def table(results: dict[Config, list[dict[str, Any]]]) -> list[str]:
    rows = ["| sender -> receiver | frame | TLS 1.3 suite (negotiated) | CRC | GB/s best (median) | vs plaintext "
            "| CPU s/GB send + recv | handshake ms |", "|---|---|---|---|---|---|---|---|"]
    for cfg, runs in results.items():
        best = max(runs, key=_gbs)
        base = results.get(cfg.baseline())
        ratio = f"{_gbs(best) / max(_gbs(b) for b in base):.2f}" if base else "-"
        suite = f"{cfg.suite} ({best.get('cipher', '?')})" if cfg.tls else "plaintext"
        rows.append(
            f"| {cfg.label()} | {cfg.frame >> 10} KiB | {suite} | {'yes' if cfg.crc else 'no'} | {_gbs(best):.2f} "
            f"({statistics.median(_gbs(r) for r in runs):.2f}) | {ratio} | {_cpu_side(runs, False):.2f} + "
            f"{_cpu_side(runs, True):.2f} "
            f"| {statistics.median(r['handshake_ms'] for r in runs):.1f} |"
        )
    return rows


def openssl_speed() -> dict[str, float]:
    """One core's AEAD throughput (bytes/s, 16 KiB blocks: one TLS record) from `openssl speed`."""
    if shutil.which("openssl") is None:
        return {}
    out = {}
    for suite, evp in OPENSSL_EVP.items():
        r = subprocess.run(["openssl", "speed", "-evp", evp, "-seconds", "1", "-bytes", "16384"],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"([\d.]+)k\s*$", r.stdout.strip())
        if m:
            out[suite] = float(m.group(1)) * 1000
    return out


def aesgcm_speed(mib: int = 256) -> float:
    """One core's AES-128-GCM through `cryptography` (its own, newer OpenSSL), bytes per CPU second
    of encrypt + decrypt averaged, on 1 MiB messages."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, data = AESGCM(AESGCM.generate_key(128)), os.urandom(MiB)
    out, nonce = bytearray(MiB + 16), bytes(12)
    c0 = ends.cpu_s()
    for _ in range(mib):
        key.encrypt_into(nonce, data, None, out)
        key.decrypt_into(nonce, out, None, memoryview(out)[:MiB])
    return 2 * mib * MiB / (ends.cpu_s() - c0)


def bound(results: dict[Config, list[dict[str, Any]]], speed: dict[str, float]) -> list[str]:
    """What the CPU figures say about any design on this machine."""
    plain_cfg, tls_cfg = Config("plain-sendmsg", "proto"), Config("sslsock", "tls-proto", suite="aes128")
    if plain_cfg not in results or tls_cfg not in results:
        return []
    plain = max(results[plain_cfg], key=_gbs)
    cp = statistics.median(_cpu_per_gb(r) for r in results[plain_cfg])
    ct = statistics.median(_cpu_per_gb(r) for r in results[tls_cfg])
    cores = os.cpu_count() or 1
    lines = [
        f"CPU per GB moved, both processes: plaintext {cp:.2f} s, TLS (sslsock -> tls-proto, aes128) {ct:.2f} s: "
        f"TLS adds {ct - cp:.2f} s/GB (medians). The best plaintext run kept {cp * _gbs(plain) / cores:.0%} of the "
        f"{cores} cores busy; the rest went to other work on the machine, so compare CPU s/GB, not GB/s.",
    ]
    if "aes128" in speed:
        g = speed["aes128"] / 1e9
        need = 2 / (cp * (1 / 0.85 - 1))
        lines.append(
            f"One core's AES-128-GCM (openssl speed, 16 KiB): {g:.2f} GB/s, so one encrypt + one decrypt pass costs "
            f"at least {2 / g:.2f} CPU s/GB. With both ends on {cores} cores, TLS runs at most "
            f"{cores / (cp + 2 / g):.2f} GB/s against plaintext's {cores / cp:.2f} GB/s CPU bound "
            f"({cp / (cp + 2 / g):.2f} of it); within 15% needs about {need:.1f} GB/s of AES-GCM per core."
        )
    aead = [r for c, runs in results.items() if c.sender == "aead-sendmsg" and c.crc for r in runs]
    if aead:
        ca = statistics.median(_cpu_per_gb(r) for r in aead)
        lines.append(
            f"TLS-keyed AES-GCM framing (aead-sendmsg -> aead-proto, `cryptography`'s AESGCM at "
            f"{aesgcm_speed() / 1e9:.2f} GB/s per core): {ca:.2f} CPU s/GB, +{ca - cp:.2f} over plaintext; "
            f"its CPU bound on these shared cores is {cp / ca:.2f} of plaintext's."
        )
    return lines


def ktls_available() -> str:
    """Whether the kernel offers TLS offload (the `tls` upper-layer protocol), which would let the
    sender keep `sendmsg` on the raw socket after a user-space handshake."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as lsock, socket.create_connection(lsock.getsockname()) as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_ULP", 31), b"tls")
        except OSError as e:
            return f"no (setsockopt TCP_ULP 'tls': {e.strerror})"
    return "yes (but Python 3.11's ssl cannot hand it the keys: OpenSSL's SSL_OP_ENABLE_KTLS is not exposed)"


def main(args: argparse.Namespace) -> None:
    try:
        import tls_certs
    except ImportError as e:
        sys.exit(f"tls_probe needs the `cryptography` package for its certificates: {e}")
    configs = matrix(args.quick)
    total = args.total_mib * MiB
    results: dict[Config, list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="tls-probe-") as tmp:
        pki = tls_certs.make_pki(Path(tmp) / "pki", CLUSTER, [SERVER_ID, CLIENT_ID])
        print(f"{len(configs)} configurations x {args.reps} rounds, {args.total_mib} MiB each; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        for rnd in range(args.reps):
            for cfg in configs:
                r = run_one(cfg, total, pki.dir, Path(tmp))
                results[cfg].append(r)
                print(f"  round {rnd + 1}: {cfg.label()}, {cfg.frame >> 10} KiB, {cfg.suite or 'plain'}, "
                      f"crc {cfg.crc}: {_gbs(r):.2f} GB/s", file=sys.stderr, flush=True)
        identity(results)
    speed = openssl_speed()
    print("\n".join(table(results)))
    if speed:
        print("\nopenssl speed, one core, 16 KiB blocks: "
              + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in speed.items()))
    print("\n".join(["", *bound(results, speed), f"Kernel TLS offload here: {ktls_available()}"]))


def identity(results: dict[Config, list[dict[str, Any]]]) -> None:
    """Each side read the other's node id from the verified certificate; says so, or fails."""
    import tls_certs

    for cfg, runs in results.items():
        if not cfg.tls:
            continue
        for r in runs:
            server = tls_certs.peer_node(r.get("peer"), CLUSTER)
            client = tls_certs.peer_node(r["recv"]["peer"], CLUSTER)
            if (server, client) != (SERVER_ID, CLIENT_ID):
                raise RuntimeError(f"{cfg}: peers read {server!r} / {client!r} from the certificates")
    print(f"identities: every TLS run's sender read {SERVER_ID!r} and receiver {CLIENT_ID!r} from the peer "
          "certificate's URI SAN", file=sys.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--total-mib", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="three configurations only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        asyncio.run(_child(json.loads(a.child)))
    else:
        main(a)
