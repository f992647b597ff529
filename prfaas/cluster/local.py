"""`prfaas up`: a local cluster as processes on loopback.

Default shape: one cache pool, two prefill nodes in the "prfaas" cluster, one prefill and one
decode node in the "local" cluster, one router, and the OpenAI-compatible front door in front of
it. Every process binds port 0 and prints a JSON `listening` line that this launcher reads; each
one also opens a Prometheus endpoint (the front door serves its own at /metrics). Ctrl-C (or the
end of `--demo`) stops everything.

Mutual TLS is on (`ClusterSpec.tls`): the cluster uses the development PKI in `tls_dir`
(PRFAAS_TLS_DIR, else `tls` beside the log directory, else a temporary one), made on first use;
every process issues its own certificate there as it starts (prfaas/security/pki.py).
`cluster.tls_as(name, kind)` is a configuration to call the cluster as some identity.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from prfaas.model.presets import resolve_model

if TYPE_CHECKING:
    from prfaas.security.tls import TlsConfig


@dataclass
class ClusterSpec:
    prfaas_prefill: int = 2
    local_prefill: int = 1
    local_decode: int = 1
    policy: str = "prfaas"
    threshold_tokens: int = 256
    kv_connections: int = 4
    convertible_local: bool = True  # local nodes serve both roles, so the router may convert them
    link_gbps: float = 10.0  # the PrfaaS -> local link capacity the router's controller assumes
    router_metrics_port: int = 0  # the router's Prometheus endpoint; 0 = a free port (with `metrics`)
    metrics: bool = True  # a Prometheus endpoint per process
    frontdoor: bool = True  # the OpenAI-compatible HTTP front door
    served_model_name: str = ""  # the model name the front door answers to; empty = the directory's
    extra_env: dict[str, str] = field(default_factory=dict)  # PRFAAS_* for every process
    router_env: dict[str, str] = field(default_factory=dict)  # and for the router alone
    # and for the nodes of one cluster, "prfaas" or "local" (e.g. {"prfaas": {"PRFAAS_DTYPE": "bfloat16"}})
    cluster_env: dict[str, dict[str, str]] = field(default_factory=dict)
    tls: bool = True  # mutual TLS with a development PKI; False: every process --insecure
    tls_dir: str = ""  # the development PKI; empty: PRFAAS_TLS_DIR, else beside the logs, else temporary

    @classmethod
    def from_toml(cls, path: str) -> ClusterSpec:
        raw = tomllib.loads(Path(path).read_text())
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known are {sorted(known)}")
        return cls(**raw)


def stop_processes(popens: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM to each (the last started first: the router before the nodes it calls), then up to
    `timeout_s` in all for them to drain and exit; a process still running is killed."""
    for popen in reversed(popens):
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for popen in popens:
        try:
            popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        if popen.stdout:
            popen.stdout.close()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    address: str = ""
    module: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    listening: dict[str, str] = field(default_factory=dict)  # its `listening` line (token_address...)


class LocalCluster:
    """Starts and stops the processes; usable from tests as a context manager."""

    def __init__(
        self, model: str, spec: ClusterSpec | None = None, log_dir: str | None = None, startup_timeout_s: float = 120.0
    ) -> None:
        self.model = str(resolve_model(model))
        self.spec = spec or ClusterSpec()
        self.log_dir = Path(log_dir) if log_dir else None
        self.startup_timeout_s = startup_timeout_s
        self.procs: list[Proc] = []
        self.router_address = ""
        self.cachepool_address = ""
        self.frontdoor_url = ""  # http://HOST:PORT/v1 when the front door runs
        self.metrics_urls: dict[str, str] = {}  # process name -> its /metrics URL
        self.tls_dir = self._pki_dir()

    def _pki_dir(self) -> Path | None:
        if not self.spec.tls:
            return None
        from prfaas.security.pki import ensure_dev_pki

        where = self.spec.tls_dir or os.environ.get("PRFAAS_TLS_DIR", "")
        if where:
            path = Path(where)
        elif self.log_dir is not None:
            path = self.log_dir.parent / "tls"
        else:
            import tempfile

            path = Path(tempfile.mkdtemp(prefix="prfaas-pki-"))
        return ensure_dev_pki(path)

    def tls_as(self, name: str, kind: str = "") -> TlsConfig:
        """A TLS configuration to call the cluster as `name` (kind: `name` itself for router,
        cachepool, frontdoor, admin and client, else a worker); insecure when the cluster is."""
        from prfaas.security import tls

        if self.tls_dir is None:
            return tls.TlsConfig(insecure=True)
        kind = kind or (name if name in ("router", "cachepool", "frontdoor", "admin", "client") else "worker")
        return tls.resolve(tls_dir=str(self.tls_dir), name=name, kind=kind)

    def _tls_env(self) -> dict[str, str]:
        if self.tls_dir is None:
            return {"PRFAAS_INSECURE": "1"}
        return {"PRFAAS_TLS_DIR": str(self.tls_dir), "PRFAAS_INSECURE": "0"}

    def _metrics_args(self, name: str, port: int = 0) -> list[str]:
        """`--metrics-port` for a gRPC service (a free loopback port unless given)."""
        if not self.spec.metrics and not port:
            return []
        port = port or _free_port()
        self.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        return ["--metrics-port", str(port)]

    def _start(self, name: str, module: str, args: list[str], env_extra: dict[str, str] | None = None) -> Proc:
        if module in ("services.cachepool", "services.prefill", "services.decode") and "--metrics-port" not in args:
            args = [*args, *self._metrics_args(name)]
        launch, pythonpath = service_module(module)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **pythonpath, **self._tls_env(), **self.spec.extra_env,
               **(env_extra or {})}
        stderr: IO[str] | int = subprocess.DEVNULL
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        popen = subprocess.Popen(
            [sys.executable, "-m", launch, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            start_new_session=True,
        )
        proc = Proc(name, popen, module=module, args=args, env=dict(env_extra or {}))
        self.procs.append(proc)
        return proc

    def restart(self, name: str) -> Proc:
        """Starts a process again (after a test killed it) with the same arguments; waits until it
        listens. Its port may change: a node registers its new address with the cache pool."""
        old = next(p for p in self.procs if p.name == name)
        if old.popen.poll() is None:
            raise RuntimeError(f"{name} is still running")
        self.procs.remove(old)
        args = old.args
        if name == "cachepool":  # the others know the pool by its address: keep the port
            args = [a if a != "127.0.0.1:0" else old.address for a in args]
        proc = self._start(name, old.module, args, old.env)
        self._wait_listening(proc)
        return proc

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def _wait_listening(self, proc: Proc) -> str:
        deadline = time.monotonic() + self.startup_timeout_s
        assert proc.popen.stdout is not None
        while time.monotonic() < deadline:
            line = proc.popen.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.wait()} before listening"
                    + (f"; see {self.log_dir}/{proc.name}.log" if self.log_dir else "")
                )
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg.get("event") == "listening":
                proc.address, proc.listening = msg["address"], msg
                return proc.address
        raise TimeoutError(f"{proc.name} did not start listening within {self.startup_timeout_s:.0f} s")

    def _threads_env(self, nodes: int) -> dict[str, str]:
        """The nodes share this machine: each gets its share of the cores as torch threads (one
        node taking every core slows them all), unless the environment already says."""
        given = {**os.environ, **self.spec.extra_env}
        if "PRFAAS_THREADS" in given or "OMP_NUM_THREADS" in given:
            return {}
        return {"PRFAAS_THREADS": str(max(1, len(os.sched_getaffinity(0)) // max(1, nodes)))}

    def start(self) -> str:
        s = self.spec
        cp = self._start("cachepool", "services.cachepool", ["--listen", "127.0.0.1:0"])
        self.cachepool_address = self._wait_listening(cp)
        common = [
            "--cachepool",
            self.cachepool_address,
            "--model",
            self.model,
            "--listen",
            "127.0.0.1:0",
            "--kv-connections",
            str(s.kv_connections),
        ]
        nodes = [(f"prfaas-p{i}", "services.prefill", "prfaas") for i in range(s.prfaas_prefill)]
        nodes += [(f"local-p{i}", "services.prefill", "local") for i in range(s.local_prefill)]
        nodes += [(f"local-d{i}", "services.decode", "local") for i in range(s.local_decode)]
        started = [
            self._start(
                n,
                mod,
                [
                    *common,
                    "--node-id",
                    n,
                    "--cluster",
                    c,
                    *(["--convertible"] if c == "local" and s.convertible_local else []),
                ],
                {**self._threads_env(len(nodes)), **s.cluster_env.get(c, {})},
            )
            for n, mod, c in nodes
        ]
        for p in started:
            self._wait_listening(p)
        router = self._start(
            "router",
            "services.router",
            [
                "--listen",
                "127.0.0.1:0",
                "--cachepool",
                self.cachepool_address,
                "--model",
                self.model,
                "--policy",
                s.policy,
                "--threshold-tokens",
                str(s.threshold_tokens),
                "--link-gbps",
                str(s.link_gbps),
                *self._metrics_args("router", s.router_metrics_port),
            ],
            s.router_env,
        )
        self.router_address = self._wait_listening(router)
        asyncio.run(self._wait_registered(len(nodes)))
        if s.frontdoor:
            args = ["--listen", "127.0.0.1:0", "--router", self.router_address, "--model", self.model]
            door = self._start("frontdoor", "services.frontdoor",
                               [*args, *(["--served-model-name", s.served_model_name] if s.served_model_name else [])])
            address = self._wait_listening(door)
            self.frontdoor_url = f"http://{address}/v1"
            self.metrics_urls["frontdoor"] = f"http://{address}/metrics"
        return self.router_address

    async def _wait_registered(self, n: int) -> None:
        from prfaas.cluster.client import CachePoolClient

        client = CachePoolClient(self.cachepool_address, tls=self.tls_as("admin"))
        try:
            deadline = time.monotonic() + self.startup_timeout_s
            while time.monotonic() < deadline:
                if len(await client.list_nodes()) >= n:
                    return
                await asyncio.sleep(0.1)
            raise TimeoutError(f"only some of the {n} nodes registered with the cache pool")
        finally:
            await client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_processes([p.popen for p in self.procs], timeout_s)
        self.procs.clear()

    def address_of(self, name: str) -> str:
        return next(p.address for p in self.procs if p.name == name)

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def up_command(argv: list[str]) -> int:
    from prfaas.settings import DEFAULT_MODEL, command_parser, positive_int

    p = command_parser("prfaas up", __doc__)
    p.flag("--model", "MODEL", DEFAULT_MODEL, str, "a model directory or builtin:FAMILY-PRESET")
    p.add_argument("--config", help="cluster.toml: node counts, policy, threshold_tokens, kv_connections, "
                   "frontdoor, metrics, served_model_name (see ClusterSpec)")
    p.add_argument("--demo", action="store_true", help="serve a demo workload, print the results and stop")
    p.add_argument("--demo-requests", type=positive_int, default=12, help="requests of the demo workload")
    p.add_argument("--log-dir", default=".prfaas/logs", help="one log file per process")
    p.switch("--insecure", "INSECURE", "no TLS: every process --insecure (loopback only)")
    a = p.parse_args(argv)
    try:
        spec = ClusterSpec.from_toml(a.config) if a.config else ClusterSpec()
    except (OSError, ValueError, TypeError) as e:
        p.error(f"--config {a.config}: {e}")
    print(
        f"[prfaas up] model {a.model}; starting cache pool, {spec.prfaas_prefill} PrfaaS prefill, "
        f"{spec.local_prefill} local prefill, {spec.local_decode} local decode, router ...",
        flush=True,
    )
    if a.insecure:
        spec.tls = False
    cluster = LocalCluster(a.model, spec, log_dir=a.log_dir)
    from prfaas.security import tls

    tls.install(cluster.tls_as("client"))  # the demo's identity
    try:
        with cluster:
            ready = {"event": "ready", "router": cluster.router_address, "cachepool": cluster.cachepool_address,
                     "openai": cluster.frontdoor_url, "metrics": cluster.metrics_urls,
                     "tls_dir": str(cluster.tls_dir or "")}
            print(json.dumps(ready), flush=True)
            print(f"[prfaas up] router (gRPC) on {cluster.router_address}; OpenAI API at "
                  f"{cluster.frontdoor_url or '(front door off)'}; logs in {a.log_dir}/", flush=True)
            print(f"[prfaas up] mutual TLS with the development CA in {cluster.tls_dir}/ (call the router "
                  f"with --tls-dir {cluster.tls_dir})" if cluster.tls_dir else "[prfaas up] TLS off (--insecure)",
                  flush=True)
            for name, url in cluster.metrics_urls.items():
                print(f"[prfaas up]   metrics of {name}: {url}", flush=True)
            if a.demo:
                from prfaas.cluster.demo import print_table, run_demo

                print(f"[prfaas up] sending {a.demo_requests} demo requests ...", flush=True)
                results = asyncio.run(run_demo(cluster.router_address, a.demo_requests, model=a.model))
                print_table(results)
                return 0
            print("[prfaas up] Ctrl-C stops the cluster", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("[prfaas up] stopped", flush=True)
    return 0


def _free_port() -> int:
    """A free loopback port for a process that cannot report the one it bound (the metrics
    endpoints): taken from the kernel and released, then bound by the process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CHECKOUT = Path(__file__).resolve().parents[2]  # the repository, when running from one


def service_module(module: str) -> tuple[str, dict[str, str]]:
    """The module to run a service as, and the PYTHONPATH it needs: in a checkout, the top-level
    `services.X` (with the repository on the path, whatever the working directory); in an
    installed wheel, `prfaas.services.X` (the wheel installs the services folders there)."""
    if (CHECKOUT / "services" / "__init__.py").is_file() and (CHECKOUT / "pyproject.toml").is_file():
        path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH", "")) if p)
        return module, {"PYTHONPATH": path}
    return f"prfaas.{module}", {}
