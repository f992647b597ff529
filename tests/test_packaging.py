"""Packaging and the command line: the wheel installs into a fresh venv with the lowest protobuf
and grpcio pyproject.toml allows and every service imports from it (as `prfaas.services.*`: no
top-level `services` in site-packages); every flag's `--help` shows its default (and its PRFAAS_*
variable where it has one); a bad value is one line and exit status 2; `prfaas --version`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("router", "cachepool", "prefill", "decode", "frontdoor")
COMMANDS = [["--help"], ["up", "--help"], ["demo", "--help"], ["status", "--help"], ["plan", "--help"],
            ["sim", "--help"], ["model", "init", "--help"], ["generate", "--help"]]


def _lowest(requirement: str) -> str:
    """`name>=X,...` -> `name==X`."""
    m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement)
    assert m, requirement
    return f"{m.group(1)}=={m.group(2)}"


def _deps() -> list[str]:
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_services_import_each_other_relatively():
    """So that they run as `services.*` in a checkout and as `prfaas.services.*` when installed."""
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "services").rglob("*.py")
           for i, line in enumerate(p.read_text().splitlines(), 1) if re.match(r"\s*(from|import) services\b", line)]
    assert not bad, f"absolute imports of services: {bad}"


def test_dependency_bounds():
    deps = {re.match(r"[A-Za-z0-9_.-]+", d).group(0): d for d in _deps()}  # type: ignore[union-attr]
    assert "grpcio-tools" not in deps and "matplotlib" not in deps, "tooling and plots are extras"
    assert all(">=" in deps[n] and "==" not in deps[n] for n in deps if n.startswith("grpcio"))
    assert "<" in deps["torch"] and "<" in deps["protobuf"]
    from google.protobuf import runtime_version

    import prfaas.v1.common_pb2 as gen

    source = Path(gen.__file__).read_text()
    found = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+)", source)
    assert found
    major, minor, patch = found.groups()
    assert _lowest(deps["protobuf"]) == f"protobuf=={major}.{minor}.{patch}", "the gencode's version is the floor"
    assert runtime_version.MAJOR == int(major)
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", (ROOT / "prfaas/v1/router_pb2_grpc.py").read_text())
    assert _lowest(deps["grpcio"]) == f"grpcio=={grpc_gen.group(1)}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert all("<" in g for g in extras["gpu"]), "GPU extras are bounded"


def _prfaas(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prfaas.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _option_blocks(help_text: str) -> dict[str, str]:
    """Each option's help block in argparse's `--help` output."""
    blocks: dict[str, str] = {}
    name = None
    for line in help_text.splitlines():
        m = re.match(r"  (-\w, )?(--[\w-]+)", line)
        if m:
            name = m.group(2)
            blocks[name] = line
        elif name and line.startswith("      "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return {k: re.sub(r"\s+", " ", v) for k, v in blocks.items() if k not in ("--help", "--version")}


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_every_command_flag_shows_its_default(args):
    r = _prfaas(*args)
    assert r.returncode == 0, r.stderr
    blocks = _option_blocks(r.stdout)
    assert blocks or args == ["--help"], r.stdout  # the top level has only --help and --version
    missing = [k for k, v in blocks.items() if "(default:" not in v]
    assert not missing, f"prfaas {' '.join(args)}: no default shown for {missing}"


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_flag_shows_default_and_variable(service):
    r = subprocess.run([sys.executable, "-m", f"services.{service}", "--help"], capture_output=True, text=True,
                       timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    blocks = _option_blocks(r.stdout)
    missing = [k for k, v in blocks.items() if "(default:" not in v or "[env PRFAAS_" not in v]
    assert blocks and not missing, f"{service}: {missing}"


@pytest.mark.parametrize(("service", "env"), [("frontdoor", {"PRFAAS_MAX_N": "lots"}),
                                              ("router", {"PRFAAS_THRESHOLD_TOKENS": "-1"}),
                                              ("cachepool", {"PRFAAS_LISTEN": "nowhere"})])
def test_bad_values_are_one_line(service, env):
    r = subprocess.run([sys.executable, "-m", f"services.{service}"], capture_output=True, text=True, timeout=180,
                       cwd=ROOT, env={**os.environ, "PRFAAS_ROUTER": "127.0.0.1:1", "PRFAAS_CACHEPOOL": "127.0.0.1:1",
                                      **env})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert next(iter(env)) in r.stderr.splitlines()[-1]


def test_a_model_that_is_not_one_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "services.frontdoor", "--router", "127.0.0.1:1", "--model",
                        str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "config.json" in r.stderr


def test_version_and_bad_command_values():
    import prfaas

    assert _prfaas("--version").stdout.strip() == f"prfaas {prfaas.__version__}"
    r = _prfaas("demo", "--router", "127.0.0.1:1", env={"PRFAAS_DEMO_REQUESTS": "-3"})
    assert r.returncode == 2 and "PRFAAS_DEMO_REQUESTS='-3': must be a positive integer" in r.stderr
    r = _prfaas("status")
    assert r.returncode == 2 and "--cachepool (or PRFAAS_CACHEPOOL) is required" in r.stderr


def _pypi_reachable() -> str | None:
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", "/tmp/prfaas-pip-probe",
                        "six"], capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["pip failed"])[-1]


def _torch_layer(dest: Path) -> Path:
    """The running interpreter's torch and its dependencies, linked into one folder a fresh venv
    can add to its path (no multi-GB download, and pip sees torch as installed)."""
    import torch

    site = Path(torch.__file__).resolve().parents[1]
    dest.mkdir()
    names = ("torch", "torchgen", "functorch", "sympy", "mpmath", "networkx", "filelock", "fsspec",
             "typing_extensions", "jinja2", "markupsafe", "setuptools")
    for entry in site.iterdir():
        stem = entry.name.split("-")[0].lower().removesuffix(".py")
        if stem in names or entry.name.lower().startswith(tuple(f"{n}-" for n in names)):
            (dest / entry.name).symlink_to(entry)
    return dest


@pytest.mark.slow
def test_wheel_installs_with_lowest_protobuf_and_grpcio(tmp_path):
    why = _pypi_reachable()
    if why:
        pytest.skip(f"PyPI is not reachable: {why}")
    t0 = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "torch-layer.pth").write_text(str(_torch_layer(tmp_path / "torch-layer")) + "\n")
    lowest = [_lowest(d) for d in _deps() if d.startswith(("protobuf", "grpcio"))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT), *lowest],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    check = (
        "import importlib, importlib.util, google.protobuf, grpc;"
        f"[importlib.import_module('prfaas.services.' + s + '.__main__') for s in {SERVICES!r}];"
        "import prfaas.v1.router_pb2, prfaas.cluster.local as local;"
        "assert importlib.util.find_spec('services') is None, 'a top-level services package is installed';"
        "assert local.service_module('services.router')[0] == 'prfaas.services.router';"
        "from importlib.resources import files;"
        "assert files('prfaas.model.ops').joinpath('csrc/delta_rule.c').is_file();"
        "print(google.protobuf.__version__, grpc.__version__)"
    )
    r = subprocess.run([str(py), "-c", check], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    want = {x.split("==")[0]: x.split("==")[1] for x in lowest}
    assert r.stdout.split() == [want["protobuf"], want["grpcio"]]
    r = subprocess.run([str(venv / "bin" / "prfaas"), "--version"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.startswith("prfaas ")
    print(f"[packaging] fresh venv, install and imports: {time.monotonic() - t0:.0f} s")
    shutil.rmtree(venv, ignore_errors=True)
