"""Model configuration, read from a Hugging Face config.json.

One frozen dataclass for what every layer needs, with the attention specifics in two small
specs. Parsing is the only place that knows the field names of each family's config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prfaas.errors import InvalidRequest

FAMILIES = ("qwen3_next", "kimi_linear")

FullKind = Literal["gqa", "mla"]
LinearKind = Literal["gdn", "kda"]


class ModelConfigError(InvalidRequest):
    """A config.json that this engine cannot serve."""


@dataclass(frozen=True)
class FullAttnSpec:
    kind: FullKind
    num_heads: int
    num_kv_heads: int = 0  # gqa
    head_dim: int = 0  # gqa
    rotary_dim: int = 0  # gqa: partial rotary
    rope_theta: float = 10000.0
    gated: bool = False  # gqa: qwen3_next output gate
    kv_lora_rank: int = 0  # mla
    q_lora_rank: int | None = None  # mla
    qk_nope_head_dim: int = 0  # mla
    qk_rope_head_dim: int = 0  # mla
    v_head_dim: int = 0  # mla


@dataclass(frozen=True)
class LinearAttnSpec:
    kind: LinearKind
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the short causal conv (q, k and v together)."""
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int
    norm_topk_prob: bool = True
    # kimi_linear (DeepSeek-style sigmoid router with groups)
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    layer_types: tuple[str, ...]  # "full" or "linear", one per layer
    mlp_types: tuple[str, ...]  # "dense" or "moe", one per layer
    rms_norm_eps: float
    max_position_embeddings: int
    full: FullAttnSpec
    linear: LinearAttnSpec
    moe: MoeSpec | None
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full")

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "linear")

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ModelConfigError(f"{cfg_path}: no config.json")
        return cls.from_dict(json.loads(cfg_path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        family = raw.get("model_type")
        if family == "qwen3_next":
            return _parse_qwen3_next(raw)
        if family == "kimi_linear":
            return _parse_kimi_linear(raw)
        raise ModelConfigError(f"unknown model family {family!r}: supported are {', '.join(FAMILIES)}")


def _eos(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _layer_kind(name: str) -> str:
    if name == "full_attention":
        return "full"
    if name == "linear_attention":
        return "linear"
    raise ModelConfigError(f"unknown layer type {name!r}")


def _parse_qwen3_next(raw: dict[str, Any]) -> ModelConfig:
    n = int(raw["num_hidden_layers"])
    types = raw.get("layer_types") or [
        "linear_attention" if (i + 1) % int(raw.get("full_attention_interval", 4)) else "full_attention"
        for i in range(n)
    ]
    mlp_only = set(raw.get("mlp_only_layers") or [])
    num_experts = int(raw.get("num_experts", 0))
    step = int(raw.get("decoder_sparse_step", 1))
    mlp_types = tuple(
        "moe" if (i not in mlp_only and num_experts > 0 and (i + 1) % step == 0) else "dense" for i in range(n)
    )
    rope = raw.get("rope_parameters") or {}
    head_dim = int(raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"])
    partial = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25)))
    if rope.get("rope_type", "default") != "default":
        raise ModelConfigError(f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    full = FullAttnSpec(
        kind="gqa",
        num_heads=int(raw["num_attention_heads"]),
        num_kv_heads=int(raw["num_key_value_heads"]),
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        gated=True,
    )
    linear = LinearAttnSpec(
        kind="gdn",
        num_k_heads=int(raw["linear_num_key_heads"]),
        num_v_heads=int(raw["linear_num_value_heads"]),
        head_k_dim=int(raw["linear_key_head_dim"]),
        head_v_dim=int(raw["linear_value_head_dim"]),
        conv_kernel=int(raw.get("linear_conv_kernel_dim", 4)),
    )
    moe = None
    if num_experts > 0:
        moe = MoeSpec(
            num_experts=num_experts,
            top_k=int(raw["num_experts_per_tok"]),
            intermediate_size=int(raw["moe_intermediate_size"]),
            shared_intermediate_size=int(raw.get("shared_expert_intermediate_size", 0)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        )
    return ModelConfig(
        family="qwen3_next",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=n,
        layer_types=tuple(_layer_kind(t) for t in types),
        mlp_types=mlp_types,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        full=full,
        linear=linear,
        moe=moe,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=_eos(raw),
        raw=raw,
    )


def _parse_kimi_linear(raw: dict[str, Any]) -> ModelConfig:
    n = int(raw["num_hidden_layers"])
    lin_cfg = raw.get("linear_attn_config") or {}
    types = raw.get("layer_types") or _kimi_layer_types(n, lin_cfg)
    mlp_layer_types = raw.get("mlp_layer_types") or [
        "dense" if i < int(raw.get("first_k_dense_replace", 1)) else "sparse" for i in range(n)
    ]
    mlp_types = tuple("moe" if t == "sparse" else "dense" for t in mlp_layer_types)
    heads = int(raw["num_attention_heads"])
    full = FullAttnSpec(
        kind="mla",
        num_heads=heads,
        kv_lora_rank=int(raw["kv_lora_rank"]),
        q_lora_rank=raw.get("q_lora_rank"),
        qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
        qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
        v_head_dim=int(raw.get("v_head_dim") or raw["qk_nope_head_dim"]),
    )
    lin_heads = int(lin_cfg.get("num_heads", raw.get("linear_num_heads", 32)))
    lin_dim = int(lin_cfg.get("head_dim", raw.get("linear_head_dim", 128)))
    linear = LinearAttnSpec(
        kind="kda",
        num_k_heads=lin_heads,
        num_v_heads=lin_heads,
        head_k_dim=lin_dim,
        head_v_dim=lin_dim,
        conv_kernel=int(lin_cfg.get("short_conv_kernel_size", raw.get("linear_conv_kernel_dim", 4))),
    )
    moe = _kimi_moe(raw, mlp_types)
    return ModelConfig(
        family="kimi_linear",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=n,
        layer_types=tuple(_layer_kind(t) for t in types),
        mlp_types=mlp_types,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(raw.get("max_position_embeddings") or raw.get("model_max_length") or 1 << 20),
        full=full,
        linear=linear,
        moe=moe,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=_eos(raw),
        raw=raw,
    )


def _kimi_layer_types(n: int, lin_cfg: dict[str, Any]) -> list[str]:
    """Moonshot's original layout lists 1-based layer numbers per kind; else every fourth is full."""
    if "full_attn_layers" in lin_cfg and "kda_layers" in lin_cfg:
        types = [""] * n
        for i in lin_cfg["full_attn_layers"]:
            types[i - 1] = "full_attention"
        for i in lin_cfg["kda_layers"]:
            types[i - 1] = "linear_attention"
        return types
    return ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]


def _kimi_moe(raw: dict[str, Any], mlp_types: tuple[str, ...]) -> MoeSpec | None:
    num_experts = int(raw.get("num_local_experts", raw.get("num_experts", 0)))
    moe = None
    if num_experts > 0 and "moe" in mlp_types:
        moe = MoeSpec(
            num_experts=num_experts,
            top_k=int(raw.get("num_experts_per_tok") or raw.get("num_experts_per_token") or 1),
            intermediate_size=int(raw["moe_intermediate_size"]),
            shared_intermediate_size=int(raw["moe_intermediate_size"])
            * int(raw.get("n_shared_experts", raw.get("num_shared_experts", 1)) or 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", raw.get("moe_renormalize", True))),
            num_groups=int(raw.get("n_group", raw.get("num_expert_group", 1)) or 1),
            topk_groups=int(raw.get("topk_group", 1) or 1),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        )
    return moe
