"""The host side of scripts/compose_smoke.py: commands run with progress and a log, the tools and
settings podman needs on a machine without systemd, the base image from a Debian rootfs, and the
PrfaaS image build."""

from __future__ import annotations

import contextlib
import fcntl
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SKIP_RC = 77  # the automake convention for "skipped"
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
# podman without systemd: runc (crun may be absent), cgroupfs (no systemd cgroup manager), events in a
# file (no journald), and no default ulimits (raising nproc is refused in some sandboxes)
CONTAINERS_CONF_TEXT = """\
# written by PrfaaS scripts/compose_smoke.py: settings for podman on a machine without systemd
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
# what the base image carries besides Debian's minimal base: Python with venv, and a C compiler
# for the delta-rule CPU kernel (deploy/Dockerfile would otherwise apt-get them)
BASE_PACKAGES = ("python3", "python3-venv", "gcc", "libc6-dev")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}  # command -> Debian package


class Skip(Exception):
    """The machine cannot run the check (not a failure of the code under test)."""


class SmokeError(Exception):
    """The check ran and failed."""


def say(msg: str) -> None:
    print(f"[smoke] {msg}", flush=True)


class Phases:
    """Times each phase: `with phases("build"): ...`; `times` maps phase name to seconds."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        say(f">> {name}")
        t = time.monotonic()
        try:
            yield
        finally:
            self.times[name] = round(time.monotonic() - t, 1)
            say(f"<< {name}: {self.times[name]:.1f} s")

    def summary(self) -> None:
        total = time.monotonic() - self.t0
        say("phase times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items()) + f"; total {total:.1f} s")


def sh(
    cmd: Sequence[str],
    *,
    timeout: float,
    log: Path | None = None,
    show: str | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
    what: str = "",
) -> subprocess.CompletedProcess[str]:
    """Runs `cmd`, stdout and stderr together: every line goes to `log` (appended), lines matching
    the regex `show` are printed, and a heartbeat every 30 s says it is still running. Past
    `timeout` it is killed. `check`: a non-zero exit raises SmokeError with the last lines."""
    what = what or Path(cmd[0]).name
    lines: list[str] = []
    pattern = re.compile(show) if show else None
    sink = open(log, "a") if log else None  # noqa: SIM115 - closed below
    if sink:
        sink.write(f"$ {shlex.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if sink:
                sink.write(line)
            if pattern and pattern.search(line):
                print(f"    {line.rstrip()[:160]}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t0 = time.monotonic()
    try:
        while True:
            try:
                proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    raise SmokeError(f"{what} ran past {timeout:.0f} s: {shlex.join(cmd)[:200]}") from None
                last = lines[-1][:100] if lines else ""
                say(f"   ... {what} still running ({time.monotonic() - t0:.0f} s): {last}")
    finally:
        reader.join(timeout=10)
        if sink:
            sink.close()
    out = "\n".join(lines)
    if check and proc.returncode != 0:
        tail = "\n".join(lines[-15:])
        raise SmokeError(f"{what} exited with {proc.returncode}: {shlex.join(cmd)[:200]}\n{tail}")
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, "")


@contextlib.contextmanager
def lock(path: Path) -> Iterator[None]:
    """One run at a time per work directory (project name, image tags and ports are shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another run holding {path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_tools(install: bool, log: Path) -> None:
    """podman, runc and debootstrap, installed with apt-get where missing."""
    missing = [pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None]
    if not missing:
        say("podman, runc, debootstrap: present")
        return
    if not install:
        raise Skip(f"not installed: {' '.join(missing)} (and --no-install)")
    if shutil.which("apt-get") is None:
        raise Skip(f"not installed: {' '.join(missing)}, and there is no apt-get to install them")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    say(f"apt-get install {' '.join(missing)} (log: {log})")
    if sh(cmd, timeout=900, log=log, env=env, check=False).returncode != 0:
        sh(["apt-get", "update", "-q"], timeout=600, log=log, env=env, check=False)
        r = sh(cmd, timeout=900, log=log, env=env, check=False)
        if r.returncode != 0:
            raise Skip(f"apt-get could not install {' '.join(missing)}: {r.stdout.splitlines()[-1:]}")
    r = sh(["podman", "info"], timeout=120, check=False)
    if r.returncode != 0:
        raise Skip(f"podman is installed but does not run here: {r.stdout.splitlines()[-1:]}")


def ensure_containers_conf() -> None:
    """Writes the system containers.conf for a machine without systemd, unless one is there (or
    CONTAINERS_CONF points elsewhere): an existing one is the machine owner's and is left alone."""
    if CONTAINERS_CONF.exists():
        say(f"{CONTAINERS_CONF}: present, left as it is")
        return
    CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
    CONTAINERS_CONF.write_text(CONTAINERS_CONF_TEXT)
    say(f"{CONTAINERS_CONF}: written (runc, cgroupfs, file events, no default ulimits)")


def ensure_podman_compose(venv: Path, log: Path) -> Path:
    """podman-compose from PyPI, in a venv of its own."""
    exe = venv / "bin" / "podman-compose"
    if not exe.exists():
        say(f"installing podman-compose into {venv} (log: {log})")
        shutil.rmtree(venv, ignore_errors=True)
        sh([sys.executable, "-m", "venv", str(venv)], timeout=300, log=log, what="python -m venv")
        sh([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "podman-compose>=1.3,<2"],
           timeout=600, log=log, what="pip install podman-compose")
    version = sh([str(exe), "version"], timeout=60).stdout.replace("\n", "; ")
    say(version)
    return exe


def ensure_base_image(name: str, suite: str, mirror: str, work: Path, rebuild: bool) -> None:
    """A base image from a minimal Debian rootfs (debootstrap, then podman import), unless it exists;
    then a throwaway container from it, to know podman can run one here."""
    exists = sh(["podman", "image", "exists", name], timeout=60, check=False).returncode == 0
    if exists and not rebuild:
        say(f"{name}: present (cached)")
    else:
        rootfs, log = work / "rootfs", work / "debootstrap.log"
        shutil.rmtree(rootfs, ignore_errors=True)
        say(f"debootstrap {suite} (+{','.join(BASE_PACKAGES)}) into {rootfs} (log: {log})")
        sh(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs), mirror],
           timeout=1800, log=log, show=r"^I: (Retrieving Release|Resolving|Checking component|Base system)")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):  # the .debs and indexes: 150 MB
            for f in (rootfs / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        say(f"podman import -> {name}")
        sh(["bash", "-o", "pipefail", "-c", f"tar -C {shlex.quote(str(rootfs))} -c . | podman import -q - {name}"],
           timeout=900, log=log, what="podman import")
        shutil.rmtree(rootfs, ignore_errors=True)
    r = sh(["podman", "run", "--rm", "--network=none", "--pull=never", name, "true"], timeout=300, check=False)
    if r.returncode != 0:
        raise Skip(f"podman cannot run a container here: {r.stdout.strip().splitlines()[-1:]}")


def stage_torch_wheel(root: Path, explicit: str) -> Path | None:
    """The local CPU torch wheel, linked into the build context's .whl/ (git-ignored), where the
    Dockerfile installs it instead of downloading torch."""
    found = [Path(explicit)] if explicit else sorted(Path("/opt/wheels").glob("torch-*+cpu-*.whl"))
    found = [w for w in found if w.is_file()]
    if not found:
        say("no local torch wheel: the build takes torch from its TORCH_INDEX")
        return None
    wheel = next((w for w in found if "-cp311-" in w.name), found[0])  # the base image's Python
    dest_dir = root / ".whl"
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / wheel.name
    if not dest.exists():
        try:
            dest.hardlink_to(wheel)
        except OSError:
            shutil.copy2(wheel, dest)
    others = sorted(p.name for p in dest_dir.glob("torch-*.whl") if p.name != wheel.name)
    if others:
        say(f"warning: .whl/ also holds {others}; the Dockerfile installs the first by name")
    say(f"torch from the local wheel {wheel.name}")
    return dest


def build_image(image: str, build: dict[str, Any], base: str, wheel: Path | None, log: Path) -> None:
    """`podman build` of a compose service's build section, on the host's network (no container
    network), with the base image as BASE_IMAGE. The host's CA bundle goes in as pip's `cert`, for
    machines that reach PyPI through a TLS-inspecting proxy; pip in the build finds nothing else."""
    context = Path(build.get("context", "."))
    dockerfile = build.get("dockerfile", "Dockerfile")
    args = {**_build_args(build.get("args")), "BASE_IMAGE": base}
    cmd = ["podman", "build", "--network=host", "-f", str(context / dockerfile), "-t", image]
    for k, v in args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    if HOST_CA_BUNDLE.is_file():
        pip_conf = log.parent / "pip-build.conf"
        pip_conf.write_text("[global]\ncert = /run/prfaas-host-ca.crt\n")
        cmd += ["-v", f"{HOST_CA_BUNDLE}:/run/prfaas-host-ca.crt:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
    say(f"podman build -t {image} (base {base}, torch {'from ' + wheel.name if wheel else 'from the index'}; "
        f"log: {log})")
    sh([*cmd, str(context)], timeout=3600, log=log, show=r"^(STEP \d+/\d+: (FROM|RUN)|--> Using cache|COMMIT)",
       what="podman build")


def _build_args(raw: Any) -> dict[str, str]:
    if isinstance(raw, list):
        return dict(str(item).split("=", 1) for item in raw)
    return {str(k): str(v) for k, v in (raw or {}).items()}


def free_ports(names: set[str]) -> dict[str, str]:
    """A free loopback port for each name, all distinct (held together while they are picked)."""
    socks = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return {name: str(s.getsockname()[1]) for name, s in zip(sorted(names), socks, strict=True)}
    finally:
        for s in socks:
            s.close()
