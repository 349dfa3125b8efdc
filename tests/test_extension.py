"""The compiled extension must load: a broken build may never pass as a run
of the reference path."""

import subprocess
import sys

import pytest
import torch

from pyfastattn import _ops

from ._helpers import op_call_in_subprocess

pytestmark = pytest.mark.extension  # scripts/gpu_check.sh runs these beside the gpu tests


def test_extension_loaded_with_cpu_kernels():
    assert _ops.AVAILABLE, f"pyfastattn._C failed to import: {_ops.EXTENSION_ERROR}"
    assert _ops.has_kernel("attention_fwd", "cpu")
    assert _ops.has_kernel("attention_bwd", "cpu")


def test_cuda_build_matches_torch():
    # A CUDA build registers the CUDA forward; a CPU-only build registers none.
    assert _ops.has_kernel("attention_fwd", "cuda") == _ops.WITH_CUDA
    if _ops.WITH_CUDA:
        assert torch.version.cuda is not None
        assert _ops.CUDA_ARCHS


def test_info_command_runs():
    r = subprocess.run([sys.executable, "-m", "pyfastattn.info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "attention_fwd" in r.stdout and "would run" in r.stdout


# Functions of libstdc++'s compiled library (not templates a header
# instantiates): a module that defines any of them carries its own copy of
# libstdc++'s locale code, whose facets do not match the locale of the shared
# libstdc++ the process runs with. Seen on the lent H200's image: formatting a
# number into any C++ argument error then segfaulted
# (benchmarks/results/H200/README.md).
_LIBSTDCXX_OWN = (
    "std::locale::classic()",
    "std::ios_base::Init::Init()",
    "std::codecvt<char16_t, char, __mbstate_t>::",
)


def test_module_carries_no_copy_of_libstdcxx():
    import re
    import shutil

    from pyfastattn import _C

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) on this machine")
    r = subprocess.run([nm, "-C", "--defined-only", _C.__file__], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    own = [line for line in r.stdout.splitlines()
           if re.match(r"^[0-9a-f]+ [TtWw] ", line) and any(s in line for s in _LIBSTDCXX_OWN)]  # fmt: skip
    assert not own, (
        f"{_C.__file__} defines libstdc++'s own functions (a static copy was linked in): {own[:5]}"
    )


def test_argument_error_formatting_numbers_raises_in_a_fresh_process():
    """A C++ argument check whose message formats integers (c10::str) raises
    a Python error; it must not take the process down (the H200 crash)."""
    r = op_call_in_subprocess(
        "q = torch.randn(1, 1, 2, 16); kc = torch.randn(1, 8, 2, 16)\n"
        "torch.ops.pyfastattn.attention_kvcache_fwd(q, kc, kc.clone(), None, None,\n"
        "    torch.tensor([9], dtype=torch.int32), None, None, None, None, None, True, 0.25, 0.0, -1, -1, 0, None)"
    )
    assert r.stdout.startswith("ERROR: ValueError: "), r.stdout
    assert "cache_seqlens[0] + seqlen_new = 9 + 0 = 9 exceeds the cache's capacity of 8" in r.stdout, r.stdout
