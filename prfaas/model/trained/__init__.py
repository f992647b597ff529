"""Trained checkpoints shipped with the package, one Hugging Face directory per model
(`qwen3_next-small/`, `kimi_linear-small/`: config.json, model.safetensors, tokenizer files),
and `heldout.json`, the standard-library files they were not trained on.

`builtin:qwen3_next-small` and `builtin:kimi_linear-small` name them (presets.resolve_model).
How they were made, and their held-out perplexity: docs/models.md; to remake them:
`python scripts/train_models.py`.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
HELDOUT = ROOT / "heldout.json"


def shipped_dir(name: str) -> Path | None:
    """The directory of shipped model `name` (FAMILY-PRESET), or None when there is none."""
    path = ROOT / name
    if name and "/" not in name and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    return None
