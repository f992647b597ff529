"""llama.cpp (through llama-cpp-python) as a second baseline for bench/engine.py.

    python bench/llamacpp.py check MODEL_DIR [--tokens 24]          # llama.cpp against transformers
    python bench/llamacpp.py bench MODEL_DIR [--threads 2] [--quick]  # its prefill and decode alone

Given one of our model directories, the GGUF is made by llama.cpp's own converter and cached
(bench/llamacpp_gguf.py); the model then runs through llama-cpp-python's C API at a fixed thread
count, with nothing of its Python layer in the timed loops but one ctypes call per step:
  prefill   one llama_decode of the whole prompt, logits of the last token only (n_batch = the
            prompt, n_ubatch llama.cpp's default 512)
  decode    tokens/s of steady greedy steps after a prefill: batch 1, and one batch of several
            sequences (one token each per llama_decode, as llama.cpp's server batches them; any
            prompt lengths, as ours)
The KV cache is kept at the GGUF's precision and flash attention is off for f32 (it rounds through
f16 on the CPU), so that f32 compares like for like; `--flash-attn` sets it.
`open_llamacpp` and `measure_llamacpp` return None, printing why, where llama_cpp is not
installed (scripts/bench_setup.sh builds it), the converter is missing, or llama.cpp cannot load
the checkpoint's config.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_gguf import GgufError, prepare_gguf  # noqa: E402

DTYPE_OUTTYPE = {"fp32": "f32", "f32": "f32", "bf16": "bf16", "f16": "f16"}
GGML_TYPES = {"f32": 0, "f16": 1, "bf16": 30}  # ggml_type: GGML_TYPE_F32, _F16, _BF16
N_UBATCH = 512
# llama.cpp's CPU flash attention rounds through f16 (logits off by ~5e-4 relative on our f32
# checkpoints, against ~1e-6 without it): off by default for f32, llama.cpp's own default (auto,
# which is on for the CPU) otherwise
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type


def import_reason() -> str | None:
    """None if llama_cpp imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # an ImportError, or a shared library that does not load
        return f"llama_cpp is not importable ({type(e).__name__}: {e}); scripts/bench_setup.sh builds it"
    return None


class LlamaCpp:
    """One GGUF model, with a context per shape (tokens, sequences) made on first use."""

    def __init__(self, gguf: Path, threads: int, outtype: str = "f32", flash_attn: str | None = None) -> None:
        import llama_cpp as lc

        self.lc, self.threads, self.kv_type = lc, threads, GGML_TYPES[outtype]
        flash_attn = flash_attn or ("off" if outtype == "f32" else "auto")
        self.flash_attn = FLASH_ATTN[flash_attn]
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        lc.llama_log_set(self._quiet, ctypes.c_void_p())
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self._contexts: dict[tuple[int, int], tuple[Any, Any, int]] = {}

    def close(self) -> None:
        for ctx, batch, _ in self._contexts.values():
            self.lc.llama_batch_free(batch)
            self.lc.llama_free(ctx)
        self._contexts.clear()
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None

    def _context(self, n_ctx: int, n_seq: int, n_batch: int) -> tuple[Any, Any, int]:
        """A context holding `n_ctx` tokens over `n_seq` sequences (one unified KV pool), taking
        up to `n_batch` tokens a llama_decode; made once per size, rounded up to reuse it."""
        n_ctx, n_batch = -(-n_ctx // 256) * 256, -(-n_batch // 256) * 256
        for (c, s), entry in self._contexts.items():
            if c >= n_ctx and s == n_seq and entry[2] >= n_batch:
                return entry
        lc = self.lc
        p = lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, min(N_UBATCH, n_batch), n_seq
        p.n_threads = p.n_threads_batch = self.threads
        p.type_k = p.type_v = self.kv_type
        p.kv_unified, p.no_perf, p.flash_attn_type = True, True, self.flash_attn
        ctx = lc.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n_ctx} tokens, {n_seq} sequences")
        entry = (ctx, lc.llama_batch_init(n_batch, 0, 1), n_batch)
        self._contexts[(n_ctx, n_seq)] = entry
        return entry

    def _decode(self, ctx: Any, batch: Any, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (sequence, position, token, wants logits) items."""
        for i, (seq, pos, tok, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        rc = self.lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} on a batch of {len(items)} tokens")

    def _logits(self, ctx: Any, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))

    def _fresh(self, n_ctx: int, n_seq: int, n_batch: int) -> tuple[Any, Any]:
        ctx, batch, _ = self._context(n_ctx, n_seq, n_batch)
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        return ctx, batch

    # --- what the bench times ---------------------------------------------------------------------
    def prefill(self, prompt: list[int]) -> Callable[[], float]:
        def run() -> float:
            ctx, batch = self._fresh(len(prompt) + 1, 1, len(prompt))
            items = [(0, p, t, p == len(prompt) - 1) for p, t in enumerate(prompt)]
            t0 = time.perf_counter()
            self._decode(ctx, batch, items)
            self.lc.llama_synchronize(ctx)
            return time.perf_counter() - t0
        return run

    def decode(self, prompts: list[list[int]], steps: int) -> Callable[[], float]:
        """Tokens/s of `steps` greedy steps over all the prompts as one batch of sequences."""
        n_ctx = sum(len(p) + steps + 1 for p in prompts)

        def run() -> float:
            ctx, batch = self._fresh(n_ctx, len(prompts), max(max(map(len, prompts)), len(prompts)))
            toks = []
            for s, p in enumerate(prompts):
                self._decode(ctx, batch, [(s, i, t, i == len(p) - 1) for i, t in enumerate(p)])
                toks.append(int(self._logits(ctx, -1).argmax()))
            pos = [len(p) for p in prompts]
            t0 = time.perf_counter()
            for _ in range(steps):
                self._decode(ctx, batch, [(s, pos[s], toks[s], True) for s in range(len(prompts))])
                toks = [int(self._logits(ctx, s).argmax()) for s in range(len(prompts))]
                pos = [q + 1 for q in pos]
            return len(prompts) * steps / (time.perf_counter() - t0)
        return run

    # --- what the numerics check reads ----------------------------------------------------------------
    def prompt_logits(self, prompt: list[int]) -> np.ndarray:
        """(T, vocab) logits of every prompt position, from one prefill."""
        ctx, batch = self._fresh(len(prompt) + 1, 1, len(prompt))
        self._decode(ctx, batch, [(0, p, t, True) for p, t in enumerate(prompt)])
        return np.stack([self._logits(ctx, i).copy() for i in range(len(prompt))])

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        ctx, batch = self._fresh(len(prompt) + n + 1, 1, len(prompt))
        self._decode(ctx, batch, [(0, p, t, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        out = [int(self._logits(ctx, -1).argmax())]
        for i in range(n - 1):
            self._decode(ctx, batch, [(0, len(prompt) + i, out[-1], True)])
            out.append(int(self._logits(ctx, -1).argmax()))
        return out


# --- for bench/engine.py ------------------------------------------------------------------------------
def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def open_llamacpp(model_dir: str | Path, dtype: str = "fp32", threads: int = 2,
                  log: Callable[[str], None] = say, flash_attn: str | None = None) -> LlamaCpp | None:
    """The model of `model_dir` in llama.cpp at `dtype` (fp32 / bf16 / f16), or None with the
    reason logged: llama_cpp missing, no converter, a config llama.cpp cannot load."""
    if (reason := import_reason()) is not None:
        log(f"llama.cpp baseline skipped: {reason}")
        return None
    outtype = DTYPE_OUTTYPE.get(dtype)
    if outtype is None:
        log(f"llama.cpp baseline skipped: dtype {dtype!r} has no GGUF type here")
        return None
    try:
        gguf = prepare_gguf(model_dir, outtype, log=log)
    except GgufError as e:
        log(f"llama.cpp baseline skipped: {e}")
        return None
    if (caveat := numerics_caveat(Path(model_dir))) is not None:
        log(f"llama.cpp: {caveat}")
    return LlamaCpp(gguf, threads, outtype, flash_attn)


def numerics_caveat(model_dir: Path) -> str | None:
    """Where llama.cpp computes another function than the reference on this config."""
    raw = json.loads((model_dir / "config.json").read_text())
    eps = float(raw.get("rms_norm_eps", 1e-5))
    if raw.get("model_type") == "kimi_linear" and eps != 1e-6:
        return (f"rms_norm_eps {eps:g}: llama.cpp's kimi-linear also uses it for KDA's q/k l2 norm and MLA's "
                "kv_a_layernorm, where transformers (and we) use 1e-6: where activations are small (random "
                "weights of std 0.02) its logits differ, by 13% on the bench's checkpoint (speed is unaffected)")
    return None


def measure_llamacpp(model_dir: str | Path, threads: int = 2, prefill_tokens: tuple[int, ...] = (512, 4096),
                     decode_tokens: int = 48, dtype: str = "fp32", decode_prompt: int = 128,
                     batch: int = 16, repeats: int = 3, flash_attn: str | None = None) -> dict[str, float] | None:
    """llama.cpp alone on one checkpoint: {"prefill N": tok/s, "decode b1": tok/s, "decode bB": tok/s},
    medians of `repeats` after a warmup; None (reason printed) where it cannot run."""
    side = open_llamacpp(model_dir, dtype, threads, flash_attn=flash_attn)
    if side is None:
        return None
    try:
        out: dict[str, float] = {}
        for n in prefill_tokens:
            run = side.prefill(prompt_of(n, n))
            out[f"prefill {n}"] = n / median_of(run, repeats)
        one = side.decode([prompt_of(decode_prompt, 1)], decode_tokens)
        out["decode b1"] = median_of(one, repeats)
        if batch > 1:
            prompts = [prompt_of(64 + 29 * i, 100 + i) for i in range(batch)]
            out[f"decode b{batch}"] = median_of(side.decode(prompts, decode_tokens), repeats)
        return out
    finally:
        side.close()


def prompt_of(n: int, seed: int, vocab: int = 1000) -> list[int]:
    """The same prompts as bench/engine.py's (token ids 3 .. vocab-1)."""
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def median_of(run: Callable[[], float], repeats: int) -> float:
    run()
    return statistics.median(run() for _ in range(repeats))


# --- numerics: llama.cpp and ours against transformers ----------------------------------------------------
def check(model_dir: Path, tokens: int, prompt_len: int, threads: int) -> int:
    """Logits of a short prompt and greedy continuations, llama.cpp (f32) and ours against
    transformers on the same checkpoint. Returns 0 when llama.cpp's greedy tokens agree."""
    import torch
    import transformers

    from prfaas.engine.executor import Executor
    from prfaas.kv.layout import KvLayout
    from prfaas.messages import SamplingParams
    from prfaas.model.loader import load_model

    torch.set_num_threads(threads)
    side = open_llamacpp(model_dir, "fp32", threads)
    if side is None:
        return 2
    prompt = prompt_of(prompt_len, 7)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours_model = load_model(model_dir)
    ex = Executor(ours_model, KvLayout(ours_model.config, block_size=16), num_blocks=64, num_slots=2)
    with torch.inference_mode():
        theirs = ref(torch.tensor([prompt])).logits[0].float()
        seq = ex.add("check", prompt, SamplingParams(max_tokens=1))
        ours = ours_model(torch.tensor(prompt), ex._meta([seq], [len(prompt)], list(range(len(prompt)))), ex.caches)
        ex.free(seq)
        gen = ref.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    theirs_tokens = gen[0, len(prompt):].tolist()
    seq = ex.add("greedy", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    ours_tokens = [ex.prefill(seq)] + [ex.decode_step([seq])[0] for _ in range(tokens - 1)]
    llama = torch.from_numpy(side.prompt_logits(prompt))
    llama_tokens = side.greedy(prompt, tokens)
    side.close()
    for name, logits, toks in (("llama.cpp", llama, llama_tokens), ("ours", ours.float(), ours_tokens)):
        diff = (logits - theirs).abs()
        rel = float((logits - theirs).norm() / theirs.norm())
        same = sum(a == b for a, b in zip(toks, theirs_tokens, strict=True))
        top1 = float((logits.argmax(-1) == theirs.argmax(-1)).float().mean())
        print(f"{model_dir.name}: {name} vs transformers, {prompt_len}-token prompt: logits max |diff| "
              f"{float(diff.max()):.2e} (|logit| max {float(theirs.abs().max()):.2f}), rel err {rel:.2e}, "
              f"top-1 agree {top1:.0%}; greedy {same}/{tokens} tokens equal")
    return 0 if llama_tokens == theirs_tokens else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="llama.cpp and ours against transformers on one checkpoint (f32)")
    c.add_argument("model_dir", type=Path)
    c.add_argument("--tokens", type=int, default=24, help="greedy tokens to compare")
    c.add_argument("--prompt", type=int, default=40, help="prompt length")
    c.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("bench", help="llama.cpp's prefill and decode on one checkpoint")
    b.add_argument("model_dir", type=Path)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_OUTTYPE))
    b.add_argument("--quick", action="store_true", help="prefill 128 and 512, 8 decode steps")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--flash-attn", choices=sorted(FLASH_ATTN), default=None,
                   help="llama.cpp's flash attention (default: off for fp32, auto otherwise)")
    args = ap.parse_args()
    if args.cmd == "check":
        sys.exit(check(args.model_dir, args.tokens, args.prompt, args.threads))
    sizes = ((128, 512), 8, 32) if args.quick else ((512, 4096), 48, 128)
    res = measure_llamacpp(args.model_dir, args.threads, sizes[0], sizes[1], args.dtype, sizes[2],
                           repeats=args.repeats, flash_attn=args.flash_attn)
    if res is None:
        sys.exit(2)
    for k, v in res.items():
        print(f"{k}: {v:,.0f} tok/s")


if __name__ == "__main__":
    main()
