"""GPU attention backends against the torch reference, on CUDA. Skipped where CUDA or the
package is missing (always on the development and CI machines, which have no GPU)."""

from __future__ import annotations

import pytest
import torch

from prfaas.engine.backends import make_backend, unavailable_reason
from prfaas.model.ops.attention import TorchAttention, store_tokens

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["flashinfer", "flash_attn"])
def backend(request):
    reason = unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"{request.param}: {reason}")
    return make_backend(request.param)


@pytest.mark.parametrize("t,s,dv", [(64, 64, 64), (1, 200, 64), (16, 80, 64), (128, 128, 32)])
def test_attend_matches_torch(backend, t, s, dv):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(t, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(s, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(s, 2, dv, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = TorchAttention().attend(q.float(), k.float(), v.float(), 0.125)
    torch.testing.assert_close(backend.attend(q, k, v, 0.125).float(), ref, rtol=2e-2, atol=2e-2)


def test_paged_decode_matches_torch(backend):
    g = torch.Generator(device="cuda").manual_seed(1)
    kc = torch.zeros(32, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    lens = [5, 40, 77]
    tables = torch.tensor([[3, 0, 0, 0, 0], [7, 1, 9, 0, 0], [2, 4, 6, 8, 10]], device="cuda")
    for row, n in zip(tables, lens, strict=True):
        pos = torch.arange(n, device="cuda")
        slots = row[pos // 16] * 16 + pos % 16
        store_tokens(kc, slots, torch.randn(n, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g))
        store_tokens(vc, slots, torch.randn(n, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g))
    q = torch.randn(3, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx = torch.tensor(lens, device="cuda")
    ref = TorchAttention().decode(q.float(), kc.float(), vc.float(), tables, ctx, 0.125)
    torch.testing.assert_close(backend.decode(q, kc, vc, tables, ctx, 0.125).float(), ref, rtol=2e-2, atol=2e-2)


def test_whole_model_on_cuda_matches_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from prfaas.engine.llm import LLM, build_executor
    from prfaas.messages import SamplingParams
    from prfaas.model.presets import write_preset

    path = write_preset(tmp_path, "qwen3_next", "tiny")
    prompt = list(range(3, 90))
    cpu = LLM(build_executor(path)[0]).generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    gpu = LLM(build_executor(path, device="cuda", backend="auto")[0]).generate(
        [prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    assert gpu == cpu
