"""Our C kernel for the gated delta rule on the CPU (`csrc/delta_rule.c`), compiled on first use
with the machine's C compiler and called through ctypes.

Why a kernel: on a CPU the chunked form spends most of its time in passes over memory and in
hundreds of small tensor ops per layer; the recurrent form keeps each head's state (K x V floats)
in L1 and makes one pass over it per token, about 3x faster at prefill lengths (numbers in
docs/engine.md). The chunked torch form (`delta_rule.chunk_delta_rule`) stays the reference and
the path for other devices, and for machines without a C compiler.

Built on first use by `cbuild` (cached per source, compiler and CPU; `PRFAAS_CPU_KERNELS=0`
turns the kernel off). Value heads are split across threads: ctypes releases the GIL for the
duration of the call.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from prfaas.model.ops import cbuild

SOURCE = cbuild.CSRC / "delta_rule.c"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pools: dict[int, ThreadPoolExecutor] = {}
# a forked child inherits the pools but not their threads: it starts its own
os.register_at_fork(after_in_child=_pools.clear)


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (turned off, no compiler, or the build failed: logged once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        lib = cbuild.build("delta_rule", SOURCE, [], [["-march=native"], []])
        if lib is None:
            return None
        f = lib.prfaas_delta_rule
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
        f.argtypes = [p, p, i64, p, i64, p, i32, p, p, p, i32, i32, i32, i32, i32, f32, i32, i32, i32]
        f.restype = None
        d = lib.prfaas_delta_rule_decode
        d.argtypes = [p, p, i64, p, i64, p, i32, p, p, p, p, i32, i32, i32, i32, i32, f32, i32]
        d.restype = None
        lib.prfaas_max_dim.restype = ctypes.c_int
        _lib = lib
        return _lib


def available() -> bool:
    return load() is not None


def _threads(n: int) -> ThreadPoolExecutor:
    """A pool of n workers, kept for the process (one per size asked for: a pool in use by another
    caller is never shut down under it)."""
    with _lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="prfaas-kernel")
        return pool


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """(T, heads, D) float32 with each token's heads contiguous (any token stride)."""
    x = x.float()
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        x = x.contiguous()
    return x


def _kernel_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """float32, each token's heads contiguous (q and k with one token stride), g and beta contiguous."""
    q, k, v = _token_major(q), _token_major(k), _token_major(v)
    if k.stride(0) != q.stride(0):
        q, k = q.contiguous(), k.contiguous()
    return q, k, v, g.float().contiguous(), beta.float().contiguous()


def _check(
    lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> None:
    """Every shape the C code will index by, checked here: it trusts them. q, k (N, Hk, K),
    v (N, H, V), g (N, H) or (N, H, K), beta (N, H), N tokens (prefill) or sequences (decode)."""
    limit = lib.prfaas_max_dim()
    ok = q.dim() == 3 and v.dim() == 3 and k.shape == q.shape
    if ok:
        N, Hk, K = q.shape
        H, V = v.shape[1], v.shape[2]
        ok = (
            v.shape[0] == N
            and 0 < K <= limit
            and 0 < V <= limit
            and Hk > 0
            and H % Hk == 0
            and g.shape in ((N, H), (N, H, K))
            and beta.shape == (N, H)
        )
    if not ok:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)))
        raise ValueError(f"unsupported shapes for the CPU kernel: {shapes}")


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    state: torch.Tensor,
    *,
    l2norm_qk: bool = False,
) -> torch.Tensor:
    """One sequence on the CPU: q, k (T, Hk, K) with Hk dividing H, v (T, H, V), g (T, H) or
    (T, H, K) log decay, beta (T, H); `state` (H, K, V) float32, contiguous, updated in place.
    Returns o (T, H, V) float32. q, k and v may be column slices of a wider tensor (a token
    stride larger than their row): they are read in place."""
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU delta-rule kernel is not available")
    T, Hk, K = q.shape
    H, V = v.shape[1], v.shape[2]
    _check(lib, q, k, v, g, beta)
    if state.dtype != torch.float32 or not state.is_contiguous() or state.shape != (H, K, V):
        raise ValueError(f"state must be float32, contiguous, ({H}, {K}, {V}); got {state.dtype} {tuple(state.shape)}")
    q, k, v, g, beta = _kernel_inputs(q, k, v, g, beta)
    out = torch.empty(T, H, V, dtype=torch.float32)
    if T == 0:
        return out
    args = (
        q.data_ptr(), k.data_ptr(), q.stride(0), v.data_ptr(), v.stride(0),
        g.data_ptr(), int(g.dim() == 3), beta.data_ptr(), state.data_ptr(), out.data_ptr(),
        T, H, Hk, K, V, float(scale), int(l2norm_qk),
    )
    n = min(max(1, torch.get_num_threads()), H)
    bounds = [H * i // n for i in range(n + 1)]
    # the kernel holds raw pointers: q, k, v, g, beta, state and out stay referenced (locals) until
    # every call has returned
    futures = []
    if n > 1:  # heads [bounds[i], bounds[i + 1]) on workers; the first range on this thread
        pool = _threads(n - 1)
        futures = [pool.submit(lib.prfaas_delta_rule, *args, bounds[i], bounds[i + 1]) for i in range(1, n)]
    lib.prfaas_delta_rule(*args, bounds[0], bounds[1])
    for f in futures:
        f.result()
    return out


def delta_rule_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    states: torch.Tensor,
    slots: list[int],
    *,
    l2norm_qk: bool = False,
) -> torch.Tensor:
    """One token for each of B sequences: q, k (B, Hk, K), v (B, H, V), g (B, H) or (B, H, K),
    beta (B, H); sequence b's state is states[slots[b]] in the pool `states` (num_slots, H, K, V)
    float32 contiguous, read and updated in place (no gather, no scatter). Returns o (B, H, V)
    float32. One thread: a decode step is too small to split."""
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU delta-rule kernel is not available")
    B, Hk, K = q.shape
    H, V = v.shape[1], v.shape[2]
    _check(lib, q, k, v, g, beta)
    if states.dtype != torch.float32 or not states.is_contiguous() or states.shape[1:] != (H, K, V):
        raise ValueError(f"states must be float32, contiguous, (slots, {H}, {K}, {V}); got {tuple(states.shape)}")
    if len(slots) != B or not all(0 <= s < states.shape[0] for s in slots):
        raise ValueError(f"slots {slots} do not fit {B} sequences and {states.shape[0]} state slots")
    q, k, v, g, beta = _kernel_inputs(q, k, v, g, beta)
    index = torch.tensor(slots, dtype=torch.long)
    out = torch.empty(B, H, V, dtype=torch.float32)
    if B:
        lib.prfaas_delta_rule_decode(
            q.data_ptr(), k.data_ptr(), q.stride(0), v.data_ptr(), v.stride(0),
            g.data_ptr(), int(g.dim() == 3), beta.data_ptr(), states.data_ptr(), index.data_ptr(), out.data_ptr(),
            B, H, Hk, K, V, float(scale), int(l2norm_qk),
        )
    return out
