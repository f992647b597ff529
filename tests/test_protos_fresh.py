"""The committed generated code matches protos/: regenerate into a temp dir and compare."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    fresh = {p.name: p.read_text() for p in (tmp_path / "prfaas" / "v1").iterdir() if p.is_file()}
    committed = {p.name: p.read_text() for p in (ROOT / "prfaas" / "v1").iterdir() if p.is_file()}
    assert set(fresh) == set(committed), "files differ: run python scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run python scripts/gen_protos.py"
