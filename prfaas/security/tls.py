"""Mutual TLS 1.3 for every link: a process's certificates, the credentials and contexts made from
them, and the one process-wide configuration every channel, server and KV socket uses.

    tls.install(tls.resolve(tls_dir=..., name="decode-0", kind="worker"))   # once, in main
    tls.current().server_credentials()      # gRPC servers (rpc/serve.py): client certificates required
    prfaas.rpc.channel(address, expect="decode-0")   # gRPC channels: the server must name decode-0
    tls.current().server_context() / client_context()    # the raw-TCP KV plane (transport/tcp.py)

A service is configured from its flags (`--tls-dir`, `--ca`, `--cert`, `--key`, `--insecure`,
`--allow-insecure-remote`: prfaas/settings.py); any other process (a test, `prfaas demo`) from the
same PRFAAS_* variables, as the identity PRFAAS_TLS_NAME (default `client`). With a directory, the
files are `ca.crt`, `<name>.crt`, `<name>.key`; in a development PKI a missing certificate is
issued on first use (pki.py). `--insecure` turns TLS off: no identity can then be checked, and a
service refuses it on a non-loopback listen address unless `--allow-insecure-remote` is given too.

Certificates are read when a server, channel or KV context is made: a rotated certificate takes
effect when the process restarts (roll the services one by one; docs/security.md).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from prfaas.security.identity import Identity, from_peercert
from prfaas.validators import is_loopback

HANDSHAKE_TIMEOUT_S = 10.0


class TlsSetupError(ValueError):
    """The TLS configuration cannot work (missing files, an insecure remote listener...)."""


@dataclass
class TlsConfig:
    insecure: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    _identity: Identity | None = field(default=None, repr=False)
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict, repr=False)

    # --- who we are -------------------------------------------------------------------------------
    @property
    def identity(self) -> Identity | None:
        """Our own identity (the URI SAN of our certificate); None when insecure."""
        if self.insecure:
            return None
        if self._identity is None:
            self._identity = own_identity(self._path("cert"))
        return self._identity

    @property
    def domain(self) -> str:
        return self.identity.domain if self.identity else ""

    def _path(self, what: str) -> Path:
        p = getattr(self, what)
        if p is None:
            raise TlsSetupError(f"TLS: no {what} file configured")
        return Path(p)

    def _pems(self) -> tuple[bytes, bytes, bytes]:
        return self._path("ca").read_bytes(), self._path("cert").read_bytes(), self._path("key").read_bytes()

    # --- gRPC ---------------------------------------------------------------------------------------
    def server_credentials(self, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Static credentials, read now (a rotated certificate takes effect at restart)."""
        ca, cert, key = self._pems()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=require_client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._pems()
        return grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)

    # --- the ssl module (the KV data plane) ----------------------------------------------------------
    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3 only; the client must present a certificate from our CA."""
        if "server" not in self._contexts:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.num_tickets = 0  # no session tickets: an idle pooled connection stays silent
            ctx.load_cert_chain(self._path("cert"), self._path("key"))
            ctx.load_verify_locations(self._path("ca"))
            self._contexts["server"] = ctx
        return self._contexts["server"]

    def client_context(self) -> ssl.SSLContext:
        """TLS 1.3 only; verifies the server against our CA and the name passed as
        `server_hostname` (a node id, or a host its certificate names)."""
        if "client" not in self._contexts:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(self._path("cert"), self._path("key"))
            ctx.load_verify_locations(self._path("ca"))
            self._contexts["client"] = ctx
        return self._contexts["client"]

    def peer(self, peercert: dict | None) -> Identity | None:  # type: ignore[type-arg]
        return from_peercert(peercert, self.domain)


def own_identity(cert_path: Path) -> Identity:
    from cryptography import x509

    from prfaas.security.identity import parse_uri

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        who = parse_uri(uri)
        if who is not None:
            return who
    raise TlsSetupError(f"{cert_path}: no prfaas://<domain>/<kind>/<name> URI in its SANs (make it with prfaas certs)")


def resolve(*, tls_dir: str = "", ca: str = "", cert: str = "", key: str = "", insecure: bool = False,
            name: str, kind: str) -> TlsConfig:
    """The configuration from a service's flags; raises TlsSetupError with the reason."""
    if insecure:
        return TlsConfig(insecure=True)
    d = Path(tls_dir) if tls_dir else None
    if d is None and not (ca and cert and key):
        raise TlsSetupError("TLS is on by default: give --tls-dir DIR (or --ca, --cert and --key), "
                            "or --insecure for a loopback-only run without it")
    paths = {"ca": Path(ca) if ca else d / "ca.crt" if d else None,
             "cert": Path(cert) if cert else d / f"{name}.crt" if d else None,
             "key": Path(key) if key else d / f"{name}.key" if d else None}
    if d is not None and not cert and not paths["cert"].exists():  # type: ignore[union-attr]
        from prfaas.security.pki import issue_dev_cert

        try:
            issue_dev_cert(d, kind, name)
        except FileNotFoundError as e:
            raise TlsSetupError(str(e)) from None
    for what, p in paths.items():
        if p is None or not p.is_file():
            raise TlsSetupError(f"TLS: the {what} file {p} does not exist")
    cfg = TlsConfig(False, paths["ca"], paths["cert"], paths["key"])
    try:
        cfg.server_context()
        cfg.client_context()
    except (ssl.SSLError, OSError) as e:
        raise TlsSetupError(f"TLS: cannot load {paths['cert']} / {paths['key']} / {paths['ca']}: {e}") from None
    if not cert and cfg.identity is not None and cfg.identity.name != name:  # own_identity raised if none
        raise TlsSetupError(f"TLS: {paths['cert']} names {cfg.identity}, not {name}")
    return cfg


def check_listen(listen: str, cfg: TlsConfig, allow_insecure_remote: bool) -> None:
    """Refuses an insecure listener on a non-loopback address unless asked twice."""
    host = listen.rsplit(":", 1)[0]
    if cfg.insecure and not is_loopback(host) and not allow_insecure_remote:
        raise TlsSetupError(f"--insecure on {listen}, which is not a loopback address: anyone who reaches it "
                            "could read prompts and inject KV; add --allow-insecure-remote if you mean it")


_current: TlsConfig | None = None


def install(cfg: TlsConfig) -> TlsConfig:
    global _current
    _current = cfg
    return cfg


def current() -> TlsConfig:
    """The process's configuration: what `install` set, else from the PRFAAS_* variables."""
    if _current is None:
        env = os.environ.get
        insecure = env("PRFAAS_INSECURE", "").strip().lower() in ("1", "true", "yes", "on")
        name = env("PRFAAS_TLS_NAME", "client")
        install(resolve(tls_dir=env("PRFAAS_TLS_DIR", ""), ca=env("PRFAAS_CA", ""), cert=env("PRFAAS_CERT", ""),
                        key=env("PRFAAS_KEY", ""), insecure=insecure, name=name,
                        kind=env("PRFAAS_TLS_KIND", "admin" if name == "admin" else "client")))
    assert _current is not None
    return _current


def reset() -> None:
    """Forgets the installed configuration (tests: the next `current()` reads the environment)."""
    global _current
    _current = None
