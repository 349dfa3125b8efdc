"""The CUDA FFN (skipped without a GPU): both CUDA paths, our fused GEMMs and
cuBLAS + the fused elementwise kernel, forward and gradients against the
float64 reference under the tolerance rule, for every activation, both forms,
recompute on and off, odd sizes, with NaN-poisoned allocations."""

from __future__ import annotations

import math
import os

import pytest
import torch

import pyfastattn
from pyfastattn import _ffn_cuda, ffn

from ._helpers import assert_tolerance
from .test_ffn import NAMES, forward_and_grads, make_params, run_fused, run_plain_torch, run_reference

# cuBLAS under torch.use_deterministic_algorithms (the poison fixture) needs a
# fixed workspace configuration.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.gpu

ACTS = list(ffn.ACTIVATIONS)

# (tokens, d_model, d_ff, bias): tokens 1, 7, 1000; d_model 96 and 1000; the
# last d_ff is not a multiple of 8, so "fused" falls back to the composition.
CASES = [
    (1, 96, 256, True),
    (7, 1000, 96, False),
    (1000, 96, 72, True),
    (1000, 1000, 264, True),
    (7, 96, 100, True),
]


def _check(tokens, d_model, d_ff, bias, activation, gated, dtype, recompute, path):
    torch.manual_seed(tokens * 7 + d_model + d_ff)
    params = [
        None if t is None else t.cuda()
        for t in make_params(d_model, d_ff, gated=gated, bias=bias, dtype=dtype)
    ]
    x = torch.randn(tokens, d_model, device="cuda").to(dtype)
    dy = torch.randn(tokens, params[2].shape[0], device="cuda").to(dtype)
    with pyfastattn.backend("kernel"), _ffn_cuda.force_path(path):
        y, g = forward_and_grads(lambda a, p: run_fused(a, p, activation, recompute), x, params, dy)
    ref_y, ref_g = forward_and_grads(
        lambda a, p: run_reference(a, p, activation),
        x.double(),
        [None if t is None else t.double() for t in params],
        dy.double(),
    )
    base_y, base_g = forward_and_grads(lambda a, p: run_plain_torch(a, p, activation), x, params, dy)
    assert_tolerance("y", y, ref_y, base_y, dtype)
    present = [n for n, t in zip(NAMES, [x, *params]) if t is not None]
    for name, a, r, b in zip(present, g, ref_g, base_g):
        assert_tolerance(f"d{name}", a, r, b, dtype)


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_ffn_matches_reference(case, activation, gated, recompute, path, poison):
    dtype = (torch.bfloat16, torch.float16)[(case + ACTS.index(activation)) % 2]
    _check(*CASES[case], activation, gated, dtype, recompute, path)


@pytest.mark.parametrize("gated", [False, True])
def test_cuda_ffn_float32_composition(gated, poison):
    for case in CASES:
        _check(*case, "gelu", gated, torch.float32, False, "auto")


def _kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("gated", [False, True])
def test_forced_paths_run_the_kernels_they_name(gated):
    params = [
        t.cuda() if t is not None else None
        for t in make_params(256, 512, gated=gated, bias=True, dtype=torch.bfloat16)
    ]
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        run_fused(x, params, "silu", False).sum().backward()

    with pyfastattn.backend("kernel"):
        with _ffn_cuda.force_path("fused"):
            names = _kernel_names(step)
        assert any("ffn_gemm_kernel" in n for n in names), names
        assert not any("act_fwd_kernel" in n or "act_bwd_kernel" in n for n in names), names
        with _ffn_cuda.force_path("cublas"):
            names = _kernel_names(step)
        assert not any("ffn_gemm_kernel" in n for n in names), names
        assert any("act_bwd_kernel" in n for n in names), names


def test_dispatch_table_rules():
    dev = torch.cuda.get_device_name()
    try:
        _ffn_cuda.load_table(
            {
                dev: {
                    "rules": [
                        {
                            "gated": False,
                            "max_tokens": 64,
                            "max_d_model": -1,
                            "fwd": "cublas",
                            "bwd": "fused",
                        },
                        {
                            "gated": True,
                            "max_tokens": -1,
                            "max_d_model": 2048,
                            "fwd": "fused",
                            "bwd": "cublas",
                        },
                    ]
                }
            }
        )
        bf = torch.bfloat16
        assert _ffn_cuda.path_for(16, 1024, 4096, 1024, False, bf, False) == "cublas"
        assert _ffn_cuda.path_for(16, 1024, 4096, 1024, False, bf, True) == "fused"
        assert _ffn_cuda.path_for(512, 1024, 4096, 1024, False, bf, False) == "fused"  # no rule: default
        assert _ffn_cuda.path_for(512, 1024, 2816, 1024, True, bf, True) == "cublas"
        assert _ffn_cuda.path_for(512, 4096, 11008, 4096, True, bf, False) == "fused"
        assert _ffn_cuda.path_for(16, 1024, 100, 1024, False, bf, False) == "cublas"  # d_ff % 8
        assert _ffn_cuda.path_for(512, 1024, 4096, 1024, False, torch.float32, False) == "cublas"
        with _ffn_cuda.force_path("cublas"):
            assert _ffn_cuda.path_for(512, 1024, 4096, 1024, False, bf, False) == "cublas"
    finally:
        _ffn_cuda.load_table({dev: {"rules": []}})
        from pyfastattn.ffn_cuda_dispatch import TABLE

        _ffn_cuda.load_table(TABLE)


@pytest.mark.parametrize("path", ["fused", "cublas"])
def test_cuda_ffn_backward_bit_identical(path):
    params = [t.cuda() for t in make_params(512, 1024, gated=True, bias=True, dtype=torch.bfloat16)]
    x = torch.randn(777, 512, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(777, 512, device="cuda", dtype=torch.bfloat16)
    with pyfastattn.backend("kernel"), _ffn_cuda.force_path(path):
        runs = [
            forward_and_grads(lambda a, p: run_fused(a, p, "gelu", True), x, params, dy) for _ in range(3)
        ]
    for y, g in runs[1:]:
        assert torch.equal(y, runs[0][0])
        for a, b in zip(g, runs[0][1]):
            assert torch.equal(a, b)


def test_cuda_ffn_on_current_stream_and_device_guard():
    params = [
        None if t is None else t.cuda()
        for t in make_params(128, 256, gated=False, bias=True, dtype=torch.float16)
    ]
    x = torch.randn(100, 128, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    with pyfastattn.backend("kernel"), torch.cuda.stream(s):
        y = run_fused(x, params, "relu", False)
    s.synchronize()
    ref = run_reference(x.double(), [None if t is None else t.double() for t in params], "relu")
    assert math.isfinite(y.float().sum().item())
    assert_tolerance("y", y, ref, run_plain_torch(x, params, "relu"), torch.float16)


@pytest.mark.parametrize("gated", [False, True])
def test_cuda_ffn_fused_path_takes_unaligned_and_odd_stride_operands(gated):
    """x and dout that are is_contiguous() but not what a 16-byte cp.async can
    read: views with a 2-byte storage offset, and [1, d] rows whose stride(0)
    is odd (PyTorch ignores a size-1 dim's stride). The fused path must copy
    them, use the cuBLAS path, or read only row 0 -- never refuse a valid call
    or hand the kernel a misaligned row. Compared with the same op on fresh
    aligned copies: y bit for bit where both runs take the fused GEMMs (the
    weight gradients go through cuBLAS with x's own strides, so to rounding)."""
    dtype = torch.bfloat16
    d_model, d_ff = 96, 256
    torch.manual_seed(5)
    w1, b1, w2, b2, w3, b3 = (
        None if t is None else t.cuda()
        for t in make_params(d_model, d_ff, gated=gated, bias=True, dtype=dtype)
    )

    def offset_view(rows, cols):  # data_ptr 2 bytes past a 512-byte-aligned block
        return torch.randn(rows * cols + 1, device="cuda").to(dtype)[1:].view(rows, cols)

    def odd_row(cols):  # shape [1, cols], stride (cols + 1, 1)
        return torch.randn(1, cols + 1, device="cuda").to(dtype)[:, :cols]

    mask = [True, True, True, True, True, gated, gated]
    # (x, dout, both runs on the fused GEMMs?)
    cases = [
        (torch.randn(37, d_model, device="cuda").to(dtype), offset_view(37, d_model), True),
        (odd_row(d_model), odd_row(d_model), True),
        (offset_view(37, d_model), offset_view(37, d_model), False),  # x unaligned: cuBLAS path
    ]
    for x, dy, same_path in cases:
        assert x.is_contiguous() and dy.is_contiguous()
        for recompute in (False, True):
            runs = []
            for xx, dd in ((x, dy), (x.clone(memory_format=torch.contiguous_format), dy.clone())):
                with _ffn_cuda.force_path("fused"):
                    y, act_in = torch.ops.pyfastattn.ffn_fwd(
                        xx, w1, b1, w2, b2, w3, b3, "silu", not recompute
                    )
                    grads = torch.ops.pyfastattn.ffn_bwd(
                        dd, xx, w1, b1, w2, w3, b3, act_in, "silu", recompute, mask
                    )
                runs.append((y, *grads))
            if same_path:
                assert torch.equal(runs[0][0], runs[1][0])
            for got, want in zip(*runs):
                assert got.shape == want.shape
                # to rounding: the two runs sum in different orders (fused
                # GEMMs or cuBLAS), so single elements where the sum cancels
                # can differ by a few bf16 steps of the summands' size; the
                # whole tensor agrees to within bf16's epsilon (2^-7; measured
                # on an H200: 4.1e-3 and 4.5e-3), a misread operand by ~1.
                assert torch.isfinite(got).all()
                rel = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
                assert rel < 2**-7, rel
