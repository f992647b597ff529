"""dtype names, in one table: what flags, config files and the wire call a torch dtype.

Importing this module does not import torch (settings parse the names without it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CACHE_DTYPES = ("float32", "bfloat16")  # what a node's model and KV cache may run in
NAMES = ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn")  # every dtype a payload may have on the wire


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in NAMES:
        raise ValueError(f"unknown dtype {name!r}; known are {', '.join(NAMES)}")
    return getattr(torch, name)  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
