"""DESIGN.md's dependency rules, checked on the code rather than trusted."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def loaded_by(module: str) -> list[str]:
    """Modules that importing `module` in a fresh interpreter loads."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(r.stdout)


def test_library_never_imports_services():
    bad = [(str(p.relative_to(ROOT)), m) for p in (ROOT / "prfaas").rglob("*.py")
           for m in imports_of(p) if m == "services" or m.startswith("services.")]
    assert not bad, bad


def test_service_cores_import_no_generated_or_grpc_code():
    for core in sorted((ROOT / "services").glob("*/core.py")):
        module = ".".join(core.relative_to(ROOT).with_suffix("").parts)
        loaded = loaded_by(module)
        offending = [m for m in loaded if m == "grpc" or m.startswith("prfaas.v1")]
        assert not offending, f"{module} loads {offending}"


def test_deterministic_cores_import_neither_torch_nor_grpc():
    for module in ["prfaas.kv.allocator", "prfaas.kv.prefix", "prfaas.kv.prefix_index", "prfaas.kv.prefix_cache",
                   "prfaas.scheduling.policy",
                   "prfaas.scheduling.controller", "prfaas.scheduling.planner", "prfaas.scheduling.online",
                   "prfaas.sim.simulator", "prfaas.sim.prefix", "prfaas.sim.trace", "prfaas.sim.trace_run"]:
        loaded = loaded_by(module)
        assert "torch" not in loaded and "grpc" not in loaded, module


def test_model_layers_import_neither_allocator_nor_layout():
    for p in (ROOT / "prfaas" / "model").rglob("*.py"):
        mods = imports_of(p)
        assert not any(m.startswith(("prfaas.kv", "prfaas.engine", "prfaas.transport")) for m in mods), p
