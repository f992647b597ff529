"""Our checkpoints as GGUF files for llama.cpp, made by llama.cpp's own converter.

The converter (`convert_hf_to_gguf.py` and its `conversion/` and `gguf-py/` folders) ships inside
the llama-cpp-python source distribution; `scripts/bench_setup.sh` unpacks it under
~/.cache/prfaas/llama.cpp-src (or set PRFAAS_LLAMA_CPP_SRC to a llama.cpp checkout). What it
needs that our tiny random checkpoints lack is written into a staging copy, never into the
checkpoint itself:
  - tokenizer.json: a byte-level BPE with GPT-2's pre-tokenizer, trained with `tokenizers` on a
    seeded synthetic corpus to exactly the config's vocab_size, and a tokenizer_config.json that
    makes transformers' AutoTokenizer load it as a plain fast tokenizer;
  - its pre-tokenizer recognition: the converter hashes the tokens of a fixed text and looks the
    hash up in a table of known models. Ours is in no table, so the converter runs in a child
    process (`python bench/llamacpp_gguf.py convert ...`) whose get_vocab_base_pre is wrapped: a
    hash the table knows keeps its answer; an unknown one gets "gpt-2", which is what we wrote,
    and only for staged directories, whose tokenizer is always ours;
  - Qwen3-Next: `--no-mtp` (our checkpoints carry no multi-token-prediction layer);
  - Kimi-Linear: Moonshot's original config layout (`linear_attn_config`, `first_k_dense_replace`,
    `moe_router_activation_func`, num_key_value_heads = num_attention_heads, by which the converter
    splits kv_b_proj), and tensor names as Moonshot's files have them: routed experts under
    `block_sparse_moe.experts`, everything else of the MLP under `mlp` (transformers'
    save_pretrained writes the dense MLP under `block_sparse_moe`, our own writer the experts
    under `mlp`).
The GGUF is cached under ~/.cache/prfaas/gguf (PRFAAS_GGUF_CACHE), keyed by a hash of the
checkpoint's config and weights, the output type and the converter's version.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CACHE_ENV, SRC_ENV = "PRFAAS_GGUF_CACHE", "PRFAAS_LLAMA_CPP_SRC"
DEFAULT_CACHE = Path.home() / ".cache" / "prfaas" / "gguf"
DEFAULT_SRC = Path.home() / ".cache" / "prfaas" / "llama.cpp-src"
OUTTYPES = ("f32", "f16", "bf16")
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the pre-tokenizer we write (GPT-2's regex, byte level)
SPECIAL = "<|endoftext|>"
CONVERT_TIMEOUT_S = 600


class GgufError(RuntimeError):
    """A checkpoint that could not be made into a GGUF file (the message says why)."""


# --- where the converter is ----------------------------------------------------------------------
def converter_dir() -> Path:
    """The llama.cpp folder holding convert_hf_to_gguf.py: PRFAAS_LLAMA_CPP_SRC, or the one
    scripts/bench_setup.sh unpacked (the newest, if several)."""
    if os.environ.get(SRC_ENV):
        found = [Path(os.environ[SRC_ENV])]
    else:
        found = sorted(DEFAULT_SRC.glob("*/vendor/llama.cpp"), key=lambda p: p.stat().st_mtime, reverse=True)
    for d in found:
        if (d / "convert_hf_to_gguf.py").is_file() and (d / "gguf-py").is_dir():
            return d
    where = os.environ.get(SRC_ENV) or f"{DEFAULT_SRC}/*/vendor/llama.cpp"
    raise GgufError(f"no llama.cpp converter at {where} (run scripts/bench_setup.sh, or set {SRC_ENV})")


def converter_version(src: Path) -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (src / "gguf-py" / "pyproject.toml").read_text(), re.M)
    return f"{src.resolve()}:gguf-py {m.group(1) if m else '?'}"


# --- what llama.cpp's loaders take -----------------------------------------------------------------
def unsupported(raw: dict[str, Any]) -> str | None:
    """Why llama.cpp cannot load a checkpoint of this config.json, or None."""
    from prfaas.model.config import ModelConfig

    cfg = ModelConfig.from_dict(raw)
    if cfg.family == "qwen3_next":
        if set(cfg.mlp_types) != {"moe"}:
            return ("llama.cpp's qwen3next loader wants every layer MoE; this config has dense layers "
                    f"{[i for i, t in enumerate(cfg.mlp_types) if t != 'moe']} (decoder_sparse_step, mlp_only_layers)")
        if cfg.linear.head_k_dim != cfg.linear.head_v_dim:
            return (f"llama.cpp's qwen3next loader wants equal key and value head sizes in the linear layers "
                    f"(linear_key_head_dim {cfg.linear.head_k_dim}, linear_value_head_dim {cfg.linear.head_v_dim})")
        return None
    if cfg.linear.num_k_heads != cfg.full.num_heads:
        return (f"llama.cpp's kimi-linear graph uses num_attention_heads ({cfg.full.num_heads}) as the KDA head "
                f"count; this config has linear_num_heads {cfg.linear.num_k_heads}")
    lead = next((i for i, t in enumerate(cfg.mlp_types) if t == "moe"), cfg.num_layers)
    if any(t != "moe" for t in cfg.mlp_types[lead:]):
        return f"llama.cpp's kimi-linear loader wants leading dense layers then MoE; this config has {cfg.mlp_types}"
    if not cfg.full_layers or not cfg.linear_layers:
        return "llama.cpp's kimi-linear crashes in llama_decode without both KDA and MLA layers"
    if cfg.tie_word_embeddings:
        return "llama.cpp's kimi-linear loader wants an lm_head of its own (tie_word_embeddings is set)"
    return None


# --- the staging copy ------------------------------------------------------------------------------
def kimi_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The same model in Moonshot's original config layout, which the converter reads."""
    from prfaas.model.config import ModelConfig

    cfg = ModelConfig.from_dict(raw)
    out = dict(raw)
    out["linear_attn_config"] = {
        "full_attn_layers": [i + 1 for i in cfg.full_layers],
        "kda_layers": [i + 1 for i in cfg.linear_layers],
        "num_heads": cfg.linear.num_k_heads,
        "head_dim": cfg.linear.head_k_dim,
        "short_conv_kernel_size": cfg.linear.conv_kernel,
    }
    out["first_k_dense_replace"] = cfg.mlp_types.index("moe") if "moe" in cfg.mlp_types else cfg.num_layers
    out["moe_router_activation_func"] = "sigmoid"
    out["num_key_value_heads"] = cfg.full.num_heads
    # transformers' config carries head_dim (= qk_rope_head_dim); the converter would write key
    # and value lengths from it, the value length wrong for MLA (its own key length overrides)
    out.pop("head_dim", None)
    return out


def kimi_tensor_name(name: str) -> str:
    """Routed experts under `block_sparse_moe.experts`, the rest of the MLP under `mlp`."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return name.replace(".mlp.experts.", ".block_sparse_moe.experts.")


def synthetic_corpus(seed: int = 0, lines: int = 1000) -> Iterator[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    for _ in range(lines):
        text = " ".join(rng.choice(words) for _ in range(20))
        yield f"{text}{rng.choice('.,!?;')} {rng.randint(0, 99999)}\n"


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE of exactly `vocab_size` tokens (id 0 the one special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 257:
        raise GgufError(f"vocab_size {vocab_size}: a byte-level BPE needs at least 257 tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(synthetic_corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise GgufError(f"the synthetic corpus gave a BPE of {tok.get_vocab_size()} tokens, not {vocab_size}")
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIAL, "bos_token": None,
              "pad_token": None, "unk_token": None, "add_bos_token": False, "model_max_length": 1 << 20}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GgufError(f"{model_dir}: no *.safetensors weights")
    return files


def stage(model_dir: Path, out: Path) -> dict[str, Any]:
    """Writes the converter-ready copy of `model_dir` into `out`; returns its config."""
    from safetensors.torch import load_file, save_file

    raw = json.loads((model_dir / "config.json").read_text())
    if (reason := unsupported(raw)) is not None:
        raise GgufError(f"{model_dir}: {reason}")
    kimi = raw["model_type"] == "kimi_linear"
    staged = kimi_config(raw) if kimi else dict(raw)
    (out / "config.json").write_text(json.dumps(staged, indent=2) + "\n")
    for f in weight_files(model_dir):
        if kimi:
            save_file({kimi_tensor_name(k): v for k, v in load_file(str(f)).items()}, str(out / f.name),
                      metadata={"format": "pt"})
        else:
            (out / f.name).symlink_to(f.resolve())
    if (index := model_dir / "model.safetensors.index.json").is_file():
        data = json.loads(index.read_text())
        if kimi:
            data["weight_map"] = {kimi_tensor_name(k): v for k, v in data["weight_map"].items()}
        (out / index.name).write_text(json.dumps(data))
    if (model_dir / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, out / name)
    else:
        write_tokenizer(out, int(raw["vocab_size"]))
    return staged


# --- conversion, cached ------------------------------------------------------------------------------
def cache_key(model_dir: Path, outtype: str, src: Path) -> str:
    h = hashlib.sha256()
    h.update(f"{outtype}\n{converter_version(src)}\n".encode())
    for f in [model_dir / "config.json", *weight_files(model_dir)]:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:24]


def prepare_gguf(model_dir: str | Path, outtype: str = "f32", cache: str | Path | None = None,
                 log: Any = print) -> Path:
    """The GGUF of `model_dir` at `outtype` (f32, f16 or bf16), converted on first use and cached."""
    model_dir = Path(model_dir)
    if outtype not in OUTTYPES:
        raise GgufError(f"outtype {outtype!r}: one of {', '.join(OUTTYPES)}")
    if not (model_dir / "config.json").is_file():
        raise GgufError(f"{model_dir}: no config.json")
    src = converter_dir()
    base = Path(cache or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    key = cache_key(model_dir, outtype, src)
    final = base / key / f"model-{outtype}.gguf"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stage.", dir=final.parent) as tmp:
        staged_dir = Path(tmp) / "hf"
        staged_dir.mkdir()
        wrote_tokenizer = not (model_dir / "tokenizer.json").is_file()
        staged = stage(model_dir, staged_dir)
        out = Path(tmp) / final.name
        cmd = [sys.executable, str(Path(__file__).resolve()), "convert", "--src", str(src)]
        if wrote_tokenizer:
            cmd += ["--pre", PRE_TOKENIZER]
        cmd += ["--", str(staged_dir), "--outtype", outtype, "--outfile", str(out)]
        if staged["model_type"] == "qwen3_next":
            cmd.append("--no-mtp")
        log(f"llama.cpp: converting {model_dir} to {outtype} GGUF (log: {final.parent / 'convert.log'})")
        with (final.parent / "convert.log").open("w") as logf:
            try:
                rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=CONVERT_TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        if rc != 0 or not out.is_file():
            tail = (final.parent / "convert.log").read_text().strip().splitlines()[-8:]
            raise GgufError(f"convert_hf_to_gguf.py failed (rc {rc}) on {model_dir}:\n  " + "\n  ".join(tail))
        (final.parent / "source.json").write_text(json.dumps(
            {"model_dir": str(model_dir.resolve()), "outtype": outtype, "converter": converter_version(src)}) + "\n")
        os.replace(out, final)
    return final


# --- in the child process: the converter, with our pre-tokenizer registered ------------------------------
def run_converter(src: Path, pre: str | None, argv: list[str]) -> None:
    here = Path(__file__).resolve().parent  # bench/: its modules must not shadow the converter's imports
    sys.path[:] = [str(src), str(src / "gguf-py"), *(p for p in sys.path if Path(p or ".").resolve() != here)]
    import convert_hf_to_gguf  # type: ignore[import-not-found]
    from conversion.base import TextModel  # type: ignore[import-not-found]

    if pre is not None:
        known = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
            try:
                return known(self, tokenizer)
            except NotImplementedError:
                print(f"[prfaas] pre-tokenizer not in the converter's table: registered as {pre!r} "
                      f"(the staged tokenizer is ours, with GPT-2's byte-level pre-tokenizer)", flush=True)
                return pre

        TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    convert_hf_to_gguf.main()


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="(internal) run llama.cpp's converter with our pre-tokenizer registered")
    conv.add_argument("--src", type=Path, required=True)
    conv.add_argument("--pre", default=None)
    conv.add_argument("rest", nargs=argparse.REMAINDER)
    prep = sub.add_parser("prepare", help="convert a checkpoint (cached) and print the GGUF's path")
    prep.add_argument("model_dir", type=Path)
    prep.add_argument("--outtype", default="f32", choices=OUTTYPES)
    args = ap.parse_args()
    if args.cmd == "convert":
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        run_converter(args.src, args.pre, rest)
        return
    try:
        print(prepare_gguf(args.model_dir, args.outtype, log=lambda m: print(m, file=sys.stderr)))
    except GgufError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
