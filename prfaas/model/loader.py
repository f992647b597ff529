"""Loading a Hugging Face format directory (config.json + *.safetensors) into our model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from prfaas.errors import InvalidRequest
from prfaas.model.config import ModelConfig
from prfaas.model.hybrid import HybridForCausalLM, family_parts


class CheckpointError(InvalidRequest):
    """A checkpoint whose tensors do not fit the model its config describes."""


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> HybridForCausalLM:
    """Builds the model described by `path/config.json` and loads its weights, checking that every
    tensor is present, expected and of the right shape (the error names the tensor)."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = HybridForCausalLM(cfg)
    expected = model.state_dict(keep_vars=True)
    tied = cfg.tie_word_embeddings
    parts = family_parts(cfg.family)
    rename = parts.checkpoint_name
    loaded: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for stored in f.keys():  # noqa: SIM118 - safe_open is not a dict
                name = rename(stored)
                if name not in expected:
                    if tied and name == "lm_head.weight":
                        continue
                    raise CheckpointError(
                        f"unexpected tensor {name!r} in {file.name} (not part of a {cfg.family} model)"
                    )
                t = f.get_tensor(stored)
                want = tuple(expected[name].shape)
                if tuple(t.shape) != want:
                    raise CheckpointError(
                        f"tensor {name!r}: shape {tuple(t.shape)} in {file.name}, model expects {want}"
                    )
                loaded[name] = parts.from_checkpoint(cfg, name, t)
    missing = [n for n in expected if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r} in {path}: {', '.join(missing[:5])}{more}")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if name in loaded:
                param.copy_(loaded[name])
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(dtype)
    model.eval()
    return model

