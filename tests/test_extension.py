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


def test_module_carries_no_copy_of_libstdcxx():
    from pyfastattn import _C
    from pyfastattn.info import libstdcxx_functions_in_module

    own = libstdcxx_functions_in_module(_C.__file__)
    if own is None:
        pytest.skip("no nm (binutils) on this machine")
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
