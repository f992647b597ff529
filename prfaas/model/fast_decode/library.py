"""The fused decode step's shared object (`ops/csrc/decode_step.c`) and the ctypes mirrors of its
structs (`csrc/decode_common.h`: the field order here is the C order; `load` checks the sizes and
a few offsets against the compiled code, so a mismatch fails at load, never as a wrong read)."""

from __future__ import annotations

import ctypes
import threading
from ctypes import c_float, c_int, c_size_t, c_void_p

from prfaas.model.ops import cbuild

SOURCE = cbuild.CSRC / "decode_step.c"
DEPS = [cbuild.CSRC / n for n in ("decode_common.h", "decode_gemm.h", "decode_ops.h", "decode_moe.h", "delta_rule.c")]
PW = 32  # columns per packed weight panel (decode_common.h)

MIX_GDN, MIX_KDA, MIX_GQA, MIX_MLA = 0, 1, 2, 3
MLP_DENSE, MLP_MOE_SOFTMAX, MLP_MOE_SIGMOID = 0, 1, 2
NORM_SCALE_AFTER, NORM_CAST_FIRST = 0, 1


class Lin(ctypes.Structure):
    _fields_ = [("w", c_void_p), ("bias", c_void_p), ("n", c_int), ("k", c_int), ("bf16", c_int), ("pad_", c_int)]


_LAYER_INTS = ("mixer mlp nk nv dk dv conv_dim conv_len nh nkv hd rot rank nope rope vdim q_lora "
               "E topk inter shared_inter norm_topk groups topk_groups has_shared_gate").split()


class Layer(ctypes.Structure):
    _fields_ = [
        *((n, Lin) for n in ("in_proj", "out_proj", "second_a", "second_b")),
        *((n, c_void_p) for n in ("heads_a", "heads_b", "norm1", "norm2", "conv_w", "A", "dt_bias", "head_norm_a",
                                  "head_norm_b", "rec_states", "conv_states", "k_cache", "v_cache")),
        *((n, Lin) for n in ("mlp_in", "mlp_down", "router")),
        *((n, c_void_p) for n in ("experts_gu", "experts_down", "e_bias")),
        *((n, c_int) for n in _LAYER_INTS),
        *((n, c_float) for n in ("theta", "scale", "mixer_eps", "scaling")),
    ]


class Model(ctypes.Structure):
    _fields_ = [
        ("embed", c_void_p), ("final_norm", c_void_p), ("lm_head", Lin), ("layers", c_void_p),
        ("ws", c_void_p), ("ws_floats", c_size_t),
        *((n, c_int) for n in ("num_layers", "D", "vocab", "act_bf16", "cache_bf16", "norm_mode", "block_size",
                               "max_cols", "max_heads", "max_moe_cols", "max_topk", "max_experts")),
        ("eps", c_float),
    ]


class Step(ctypes.Structure):
    _fields_ = [
        *((n, c_void_p) for n in ("tokens", "positions", "state_slots", "block_tables", "logits", "argmax")),
        *((n, c_int) for n in ("B", "max_blocks", "max_ctx", "nthreads")),
    ]


PARTS = ("other", "norms", "products", "conv and gates", "delta rule and gated norm", "attention: q/k/latent prep",
         "attention", "moe routing", "mlp glue (swiglu, gather, combine)", "lm head")

_lock = threading.Lock()
_libs: dict[bool, ctypes.CDLL | None] = {}


def _check(lib: ctypes.CDLL) -> None:
    got = (ctypes.c_int64 * 8)()
    lib.prfaas_decode_struct_sizes(got)
    want = [ctypes.sizeof(Lin), ctypes.sizeof(Layer), ctypes.sizeof(Model), ctypes.sizeof(Step),
            Layer.mixer.offset, Layer.theta.offset, Model.num_layers.offset, Step.B.offset]
    if list(got) != want:
        raise RuntimeError(f"decode_step.c and its ctypes mirror disagree: C {list(got)}, Python {want}")


def load(timing: bool = False) -> ctypes.CDLL | None:
    """The compiled step (with OpenMP where the compiler has it), or None (kernels off, no
    compiler, or the build failed: logged once). `timing`: the build that times its parts
    (`prfaas_decode_profile`), for bench/decode_profile.py."""
    with _lock:
        if timing in _libs:
            return _libs[timing]
        _libs[timing] = None
        # fused multiply-adds (ISO C mode turns contraction off), OpenMP where the compiler has it
        fma = ["-ffp-contract=fast"] + (["-DPRFAAS_DECODE_TIMING"] if timing else [])
        lib = cbuild.build("decode_step", SOURCE, DEPS, [["-march=native", *fma, "-fopenmp"], ["-march=native", *fma],
                                                         [*fma, "-fopenmp"], fma])
        if lib is None:
            return None
        _check(lib)
        lib.prfaas_decode_step.argtypes = [c_void_p, c_void_p]
        lib.prfaas_decode_step.restype = c_int
        lib.prfaas_decode_free.argtypes = [c_void_p]
        lib.prfaas_decode_free.restype = None
        lib.prfaas_decode_has_openmp.restype = c_int
        lib.prfaas_decode_profile.argtypes = [c_void_p]
        lib.prfaas_decode_profile.restype = c_int
        _libs[timing] = lib
        return lib
