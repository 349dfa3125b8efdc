"""The CUDA FFN's choice between its two paths (see csrc/cuda/ffn_cuda_api.cpp).

At import, the rules of :mod:`pyfastattn.ffn_cuda_dispatch` (measured by
``benchmarks/ffn_bench.py --device cuda --write-dispatch``) are handed to the
extension, keyed by device name; a device without a record uses the
documented default, the fused GEMMs (unmeasured). The environment variable
``PYFASTATTN_FFN_CUDA_PATH`` = ``auto`` | ``fused`` | ``cublas`` overrides the
table for the process; :func:`force_path` does the same in code (the benchmark
and the GPU tests time and check both paths with it).
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import _ops

__all__ = ["AVAILABLE", "PATHS", "force_path", "path_for", "rules_for", "load_table"]

PATHS = ("auto", "fused", "cublas")
_CODES = {"fused": 1, "cublas": 2}

AVAILABLE = _ops.AVAILABLE and hasattr(torch.ops.pyfastattn, "ffn_cuda_set_dispatch")
_forced = "auto"


def rules_for(entry: dict) -> list[int]:
    """A table entry's rules as the flat list the extension takes."""
    flat: list[int] = []
    for r in entry["rules"]:
        flat += [
            int(bool(r["gated"])),
            int(r["max_tokens"]),
            int(r["max_d_model"]),
            _CODES[r["fwd"]],
            _CODES[r["bwd"]],
        ]
    return flat


def load_table(table: dict) -> None:
    """Hands every device's rules of ``table`` to the extension."""
    if not AVAILABLE:
        return
    for name, entry in table.items():
        torch.ops.pyfastattn.ffn_cuda_set_dispatch(name, rules_for(entry))


def _set(path: str) -> None:
    global _forced
    if path not in PATHS:
        raise ValueError(f"CUDA FFN path must be one of {list(PATHS)}, got {path!r}")
    if AVAILABLE:
        torch.ops.pyfastattn.ffn_cuda_force_path(path)
    _forced = path


@contextlib.contextmanager
def force_path(path: str):
    """Within the block, every CUDA FFN call takes ``path`` ("auto": the table)."""
    previous = _forced
    _set(path)
    try:
        yield
    finally:
        _set(previous)


def path_for(
    tokens: int, d_model: int, d_ff: int, d_out: int, gated: bool, dtype: torch.dtype, backward: bool
) -> str:
    """The path ("fused" or "cublas") a CUDA FFN call of these sizes takes on
    the current device, layout permitting."""
    if not AVAILABLE:
        raise RuntimeError("pyfastattn was built without the CUDA FFN")
    return torch.ops.pyfastattn.ffn_cuda_path(tokens, d_model, d_ff, d_out, gated, dtype, backward)


if AVAILABLE:
    from .ffn_cuda_dispatch import TABLE

    load_table(TABLE)
    _set(os.environ.get("PYFASTATTN_FFN_CUDA_PATH", "auto").strip().lower() or "auto")
