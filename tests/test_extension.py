"""The compiled extension must load: a broken build may never pass as a run
of the reference path."""

import subprocess
import sys

import torch

from pyfastattn import _ops


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
