"""``python -m pyfastattn.info``: versions, what was built, and what would run here."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import torch

import pyfastattn
from pyfastattn import _ops, functional

# Functions of libstdc++'s compiled library (not templates a header
# instantiates): a module that defines any of them carries its own copy of
# libstdc++'s locale code, whose facets do not match the locale of the shared
# libstdc++ the process runs with. Seen on the lent H200's image: formatting a
# number into any C++ argument error then segfaulted
# (benchmarks/results/H200/README.md; setup.py _shared_libstdcxx).
_LIBSTDCXX_OWN = (
    "std::locale::classic()",
    "std::ios_base::Init::Init()",
    "std::codecvt<char16_t, char, __mbstate_t>::",
)


def libstdcxx_functions_in_module(path: str) -> list[str] | None:
    """The lines of ``nm -C --defined-only path`` that define one of
    libstdc++'s own functions (empty for a sound build), or None where there
    is no ``nm``."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    r = subprocess.run(
        [nm, "-C", "--defined-only", path], capture_output=True, text=True, timeout=120, check=True
    )
    return [line for line in r.stdout.splitlines()
            if re.match(r"^[0-9a-f]+ [TtWw] ", line) and any(s in line for s in _LIBSTDCXX_OWN)]  # fmt: skip


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
    lines.append("would run (auto backend, forward, head_dim 64; softcap or the LSE: kernel or reference):")
    for dev in devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            what = functional.describe_path(*functional.auto_path(dev, dtype))
            lines.append(f"  {dev.type:5s} {str(dtype):15s} {what}")
    verified = ", ".join(f"{a}.{b}" for a, b in functional.CUDA_VERIFIED_CAPABILITIES) or "none yet"
    lines.append(
        f"CUDA kernel verified on capabilities: {verified}; on any other GPU, auto runs torch's "
        "scaled_dot_product_attention (the reference where SDPA cannot express the call)"
    )
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
