"""DESIGN.md's dependency rules, checked on the code rather than trusted."""

from __future__ import annotations

import ast
import json
import re
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


# --- the rules of the restructuring (issue 8) ------------------------------------------------------
def _sources(*roots: str) -> list[Path]:
    return [p for r in roots for p in (ROOT / r).rglob("*.py") if "v1" not in p.relative_to(ROOT).parts]


LAYER_KIND_WORDS = ("layer_types", "full_layers", "linear_layers", "FullAttnCache", "LinearStateCache",
                    "PagedCache", "StateCache", "KvKind.FULL_", "KvKind.LINEAR_")


def test_layer_kinds_only_in_the_layout_and_the_model():
    """Only the model and the KV layout know which layer is linear and which is full attention;
    everyone else iterates over the layout's tensor specs."""
    allowed = {ROOT / "prfaas" / "kv" / "layout.py", ROOT / "prfaas" / "kv" / "kinds.py"}
    bad = [
        (str(p.relative_to(ROOT)), w)
        for p in _sources("prfaas", "services")
        if p not in allowed and "model" not in p.relative_to(ROOT).parts
        for w in LAYER_KIND_WORDS
        if w in p.read_text()
    ]
    assert not bad, bad


def test_kv_imports_no_generated_code_nor_grpc():
    for p in sorted((ROOT / "prfaas" / "kv").glob("*.py")):
        module = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        loaded = loaded_by(module)
        offending = [m for m in loaded if m == "grpc" or m.startswith("prfaas.v1")]
        assert not offending, f"{module} loads {offending}"


def test_router_core_loads_neither_torch_nor_another_service():
    loaded = loaded_by("services.router.core")
    offending = [m for m in loaded if m == "torch" or m.startswith(("services.prefill", "services.decode",
                                                                     "services.worker"))]
    assert not offending, offending


def test_messages_settings_and_errors_are_torch_free():
    for module in ["prfaas.messages", "prfaas.errors", "prfaas.settings", "prfaas.dtypes"]:
        loaded = loaded_by(module)
        assert "torch" not in loaded and "grpc" not in loaded, module


def test_only_the_rpc_edge_maps_status_codes():
    """One table from domain errors to gRPC status codes (prfaas/rpc/status.py): no servicer aborts
    with a status of its own choosing, and no code is parsed back out of a message string."""
    literal_abort = re.compile(r"abort\(\s*grpc\.StatusCode\.")
    parsed_back = re.compile(r"partition\(\": \"\)|split\(\": \"")
    bad = [
        str(p.relative_to(ROOT))
        for p in _sources("prfaas", "services")
        if p.name != "status.py" and (literal_abort.search(p.read_text()) or parsed_back.search(p.read_text()))
    ]
    assert not bad, bad


def test_files_and_functions_stay_readable():
    """Modules short enough to read in one sitting: files up to ~400 lines, functions up to ~60."""
    long_files, long_functions = [], []
    for p in _sources("prfaas", "services"):
        text = p.read_text()
        if text.count("\n") > 420:
            long_files.append((str(p.relative_to(ROOT)), text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 65:
                    long_functions.append((f"{p.relative_to(ROOT)}:{node.lineno} {node.name}", n))
    assert not long_files and not long_functions, (long_files, long_functions)
