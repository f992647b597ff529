"""The shipped trained checkpoints (prfaas/model/trained/, docs/models.md): our engine and
transformers give the same logits and the same greedy tokens on held-out text, the tokenizer
is the same in both, and the models are trained (held-out perplexity near what the report says).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from prfaas.engine.executor import Executor
from prfaas.engine.llm import LLM
from prfaas.engine.sampling import SamplingParams
from prfaas.engine.tokenizer import HfTokenizer, load_tokenizer
from prfaas.kv.layout import KvLayout
from prfaas.model.loader import load_model
from prfaas.model.presets import resolve_model
from prfaas.model.train_forward import batch_logits
from prfaas.model.trained import HELDOUT, ROOT

transformers = pytest.importorskip("transformers")

FAMILIES = ["qwen3_next", "kimi_linear"]


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request):
    path = resolve_model(f"builtin:{request.param}-small")
    assert path.parent == ROOT, f"builtin:{request.param}-small resolved to {path}, not the shipped directory"
    return path


@pytest.fixture(scope="module")
def heldout_texts() -> list[str]:
    return [f["text"] for f in json.loads(HELDOUT.read_text())["files"]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kernel", [True, False], ids=["c_kernel", "torch_chunked"])
def test_logits_match_transformers(model_dir, heldout_texts, monkeypatch, kernel):
    from prfaas.model import linear_mixing
    from prfaas.model.ops import cpu_kernel

    if kernel and not cpu_kernel.available():
        pytest.skip("no C compiler for the CPU kernel")
    if not kernel:
        monkeypatch.setattr(linear_mixing.cpu_kernel, "available", lambda: False)
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir, model.config.vocab_size)
    prompt = tok.encode(heldout_texts[1])[:400]
    ex = Executor(model, KvLayout(model.config, block_size=16), num_blocks=64, num_slots=2)
    seq = ex.add("r", prompt, SamplingParams(max_tokens=1))
    ids = torch.tensor(prompt)
    with torch.inference_mode():
        ours = model(ids, ex._meta([seq], [len(prompt)], list(range(len(prompt)))), ex.caches)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(ids[None]).logits[0].float()
    assert rel_err(ours, theirs) < 1e-4, f"logits rel err {rel_err(ours, theirs):.2e}"


def test_greedy_tokens_match_transformers(model_dir, heldout_texts):
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir, model.config.vocab_size)
    prompts = [tok.encode(t)[:n] for t, n in zip(heldout_texts[2:4], (30, 200), strict=True)]
    ex = Executor(model, KvLayout(model.config, block_size=16), num_blocks=64, num_slots=4)
    ours = LLM(ex).generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            gen = ref.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert out == gen[0, len(prompt) :].tolist()


def test_tokenizer_is_the_same_in_both(model_dir, heldout_texts):
    ours = load_tokenizer(model_dir, 4096)
    assert isinstance(ours, HfTokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = heldout_texts[0][:3000]
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text, "byte-level BPE decodes to the text exactly"
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == 0
    chat = theirs.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_models_are_trained(model_dir, heldout_texts):
    """Perplexity on a slice of the held-out files: far below a uniform guess over the 4096
    tokens, and near the full held-out figure in the training report."""
    from prfaas.training.run import token_stream

    report = json.loads((model_dir / "training_report.json").read_text())
    model = load_model(model_dir)
    tok = HfTokenizer(model_dir / "tokenizer.json")
    stream = token_stream(tok._tok, heldout_texts[:6])[: 8 * 512].view(8, 512)
    with torch.no_grad():
        logits = batch_logits(model, stream[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), stream[:, 1:].reshape(-1))
    ppl = math.exp(float(nll))
    assert ppl < 100, f"held-out perplexity {ppl:.1f}: not a trained model"
    assert 0.5 < ppl / report["heldout_perplexity"] < 2.0, (ppl, report["heldout_perplexity"])


def test_random_presets_are_unchanged(tmp_path):
    path = resolve_model("builtin:qwen3_next-tiny", cache_dir=tmp_path)
    assert path == tmp_path / "qwen3_next-tiny"
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 1000
