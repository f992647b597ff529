"""Building our C sources into shared objects on first use, with the machine's C compiler.

A shared object is cached under `$PRFAAS_KERNEL_CACHE` (default `~/.cache/prfaas/kernels`), keyed
by its sources, the compiler, the flags and the CPU's feature flags (it is built with
-march=native where the compiler takes it), and written aside then renamed, so processes starting
together never load a half-written file. `PRFAAS_CPU_KERNELS=0` turns every C kernel off.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from prfaas.obs.log import get_logger

CSRC = Path(__file__).parent / "csrc"
log = get_logger(__name__)


def enabled() -> bool:
    return os.environ.get("PRFAAS_CPU_KERNELS", "1") != "0"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cache_dir() -> Path:
    return Path(os.environ.get("PRFAAS_KERNEL_CACHE") or Path.home() / ".cache" / "prfaas" / "kernels")


def _compile(cc: str, source: Path, flags: Sequence[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, "-O3", *flags, "-shared", "-fPIC", "-std=c99", "-o", tmp, str(source), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile_once(cc: str, source: Path, flags: Sequence[str], out: Path) -> None:
    """Compiles unless another process, holding the lock, did it meanwhile: processes starting
    together (a cluster's workers) wait for one build instead of each running its own."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_file():
            _compile(cc, source, flags, out)


def build(name: str, source: Path, deps: Sequence[Path], flag_sets: Sequence[Sequence[str]]) -> ctypes.CDLL | None:
    """The shared object of `source` (which includes `deps`), built with the first of `flag_sets`
    the compiler accepts; None when kernels are off, there is no compiler or no flags work (logged)."""
    if not enabled():
        return None
    cc = compiler()
    if cc is None:
        log.warning("cpu_kernel_unavailable", kernel=name, reason="no C compiler (cc, gcc or clang) on PATH")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cpu_kernel_unavailable", kernel=name, reason=str(e))
        return None
    text = b"".join(p.read_bytes() for p in (source, *deps))
    detail = ""
    for flags in flag_sets:
        key = hashlib.sha256(
            text + version.encode() + " ".join(flags).encode() + cpu_flags().encode() + platform.machine().encode()
        ).hexdigest()[:16]
        so = cache_dir() / f"{name}-{key}.so"
        try:
            if not so.is_file():
                _compile_once(cc, source, flags, so)
            return ctypes.CDLL(str(so))
        except (OSError, subprocess.SubprocessError) as e:  # next flags: no -march=native, no OpenMP
            detail = (getattr(e, "stderr", b"") or str(e).encode()).decode(errors="replace")[-2000:]
    log.warning("cpu_kernel_unavailable", kernel=name, reason="the build failed", compiler_output=detail)
    return None
