"""``python -m pyfastattn.info``: versions, what was built, and what would run here."""

from __future__ import annotations

import platform

import torch

import pyfastattn
from pyfastattn import _ops
from pyfastattn.functional import kernel_unsupported_reason


def report() -> str:
    lines = [
        f"pyfastattn      {pyfastattn.__version__}",
        f"python          {platform.python_version()}",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"backend         {pyfastattn.get_backend()}",
    ]
    if not _ops.AVAILABLE:
        lines.append(
            f"extension       NOT LOADED: {_ops.EXTENSION_ERROR} (everything runs on the reference path)"
        )
    else:
        lines.append("extension       pyfastattn._C loaded")
        for op in ("attention_fwd", "attention_bwd", "ffn_fwd", "ffn_bwd"):
            built = [
                d
                for d in ("cpu", "cuda")
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfastattn::{op}", d.upper())
            ]
            lines.append(f"  {op:14s}{', '.join(built) or 'none'}")
        lines.append(f"  CPU FFN ISA   {torch.ops.pyfastattn.ffn_cpu_isa()}")
        lines.append(f"  CUDA archs    {_ops.CUDA_ARCHS or 'none (built without CUDA)'}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"GPU             {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs"
        )
    else:
        lines.append("GPU             none visible")
    lines.append(f"threads         {torch.get_num_threads()}")
    lines.append("would run (auto backend, forward, head_dim 64):")
    for dev in devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            q = torch.empty(1, 1, 1, 64, device=dev, dtype=dtype)
            reason = kernel_unsupported_reason(q, q, mode="auto")
            what = "fused kernel" if reason is None else f"reference ({reason})"
            lines.append(f"  {dev.type:5s} {str(dtype):15s} {what}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
