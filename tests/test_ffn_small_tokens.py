"""The CPU FFN forward at decode sizes (csrc/cpu/ffn_small_tokens.cpp): the
fused kernel that the CPU ffn_fwd runs for at most ffn_small_tokens_limit()
tokens (and that then also writes the pre-activations the backward reads),
against the float64 reference with the tolerance rule of tests/_helpers.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pyfastattn
from pyfastattn import ffn

from ._helpers import assert_tolerance
from .test_ffn import check_against_reference, make_params, run_fused, run_plain_torch, run_reference

HAS_KERNEL = ("ffn_fwd", "cpu") in ffn.KERNELS and hasattr(torch.ops.pyfastattn, "ffn_small_tokens_isa")
pytestmark = pytest.mark.skipif(not HAS_KERNEL, reason="pyfastattn._C has no CPU small-token FFN kernel")

ACTS = list(ffn.ACTIVATIONS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ENV = "PYFASTATTN_CPU_FFN_SMALL_TOKENS"


def forward(x, params, activation):
    with torch.no_grad(), pyfastattn.backend("kernel"):
        return run_fused(x, params, activation, False)


def reference_forward(x, params, activation):
    return run_reference(x.double(), [None if t is None else t.double() for t in params], activation)


def test_limit_default_env_and_cap(monkeypatch):
    limit = torch.ops.pyfastattn.ffn_small_tokens_limit
    monkeypatch.delenv(ENV, raising=False)
    assert (limit(torch.bfloat16), limit(torch.float32), limit(torch.float16)) == (16, 32, 32)
    monkeypatch.setenv(ENV, "0")
    assert limit(torch.float32) == 0
    monkeypatch.setenv(ENV, "1000")
    assert limit(torch.bfloat16) == 32  # the kernel's buffers hold 32 tokens
    with pytest.raises(RuntimeError, match="dtype must be"):
        limit(torch.float64)
    for bad in ("16x", "-1", "sixteen", " ", "99999999999999999999"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match="PYFASTATTN_CPU_FFN_SMALL_TOKENS must be a token count"):
            limit(torch.bfloat16)
    monkeypatch.setenv(ENV, "")
    assert limit(torch.bfloat16) == 16  # empty: the default
    assert torch.ops.pyfastattn.ffn_small_tokens_isa() in ("avx512_bf16", "avx512", "avx2", "portable")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTS)
def test_matches_reference(activation, gated, dtype, poison, monkeypatch):
    """T 1, 3, 16 and (with the limit raised) 17, 31; d_model, d_ff and d_out
    that are not multiples of the vector widths (16 fp32 / 32 bf16 lanes) nor
    of the tiles (4 or 8 rows, 4 tokens); with and without biases; outputs
    NaN-poisoned. bf16 at 3-16 tokens takes the broadcast form: T 4, 5, 7,
    8, 9, 13, 15 cover its three lane groupings (G = 4, 2, 1 pairs per
    token), reduced-dimension tails of every length below 2 G (d_model and
    d_ff odd or not multiples of 4 / 8), row blocks of 16 cut short, and h's
    last step padded past d_ff."""
    monkeypatch.setenv(ENV, "32")
    for tokens, d_model, d_ff, d_out, bias in [
        (1, 97, 260, 45, True),
        (3, 33, 203, 97, False),
        (4, 61, 130, 37, True),
        (5, 45, 131, 29, False),
        (7, 62, 66, 50, True),
        (8, 64, 96, 16, False),
        (9, 99, 77, 35, True),
        (13, 33, 203, 97, False),
        (15, 130, 47, 31, True),
        (16, 97, 203, 45, True),
        (17, 161, 70, 33, False),
        (31, 40, 129, 41, True),
    ]:
        torch.manual_seed(tokens)
        params = make_params(d_model, d_ff, gated=gated, bias=bias, dtype=dtype, d_out=d_out)
        x = torch.randn(tokens, d_model).to(dtype)
        y = forward(x, params, activation)
        assert y.dtype == dtype and y.shape == (tokens, d_out)
        assert_tolerance(
            f"y T{tokens}",
            y,
            reference_forward(x, params, activation),
            run_plain_torch(x, params, activation),
            dtype,
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_routes_to_the_kernel(dtype, monkeypatch):
    """Up to the limit a no-grad forward runs the small-token kernel, not the
    ATen GEMMs: the two round differently (bf16: h from fp32 pre-activations
    instead of bf16 ones; fp32: another summation order), so the outputs are
    not bit-identical; past the limit they are the same path."""
    torch.manual_seed(0)
    params = make_params(256, 704, gated=True, bias=True, dtype=dtype)
    x = torch.randn(16, 256).to(dtype)
    small = forward(x, params, "silu")
    monkeypatch.setenv(ENV, "0")
    aten = forward(x, params, "silu")
    assert not torch.equal(small, aten)
    monkeypatch.setenv(ENV, "15")
    assert torch.equal(forward(x, params, "silu"), aten)
    monkeypatch.delenv(ENV)
    assert torch.equal(forward(x, params, "silu"), small)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bit_identical_across_thread_counts(dtype):
    """Each output element is one thread's dot product in a fixed order."""
    torch.manual_seed(0)
    params = make_params(300, 1100, gated=True, bias=True, dtype=dtype)
    old = torch.get_num_threads()
    try:
        outs = {}
        for tokens in (1, 4, 5, 9, 16):
            x = torch.randn(tokens, 300).to(dtype)
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs[tokens, n] = forward(x, params, "gelu_tanh")
            assert torch.equal(outs[tokens, 1], outs[tokens, 2])
            assert torch.equal(outs[tokens, 1], outs[tokens, 3])
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [2, 4, 8, 16])
def test_reads_nothing_past_the_weights(tokens, dtype):
    """Each weight matrix is the start of a larger buffer whose elements past
    its end are NaN: a read past a row's last element (the reduced
    dimension's tail in the broadcast form, fewer than one step's G pairs /
    G elements) would turn the last rows' outputs NaN (0 x NaN)."""
    torch.manual_seed(0)
    d_model, d_ff, d_out = 77, 83, 45  # odd: every matrix's last row ends mid-pair

    def padded(rows, cols):
        buf = torch.full((rows * cols + 64,), float("nan"), dtype=dtype)
        w = buf[: rows * cols].view(rows, cols)
        w.copy_(torch.randn(rows, cols) / cols**0.5)
        return w

    params = [padded(d_ff, d_model), None, padded(d_out, d_ff), None, padded(d_ff, d_model), None]
    x = torch.randn(tokens, d_model).to(dtype)
    y = forward(x, params, "silu")
    assert torch.isfinite(y).all()
    assert_tolerance("y", y, reference_forward(x, params, "silu"), run_plain_torch(x, params, "silu"), dtype)


def test_fp32_accuracy_with_a_long_reduced_dimension():
    """fp32 at d_model 8192 (T 5 and 16, the broadcast form): within 3x plain
    torch's error without the rule's relative floor. One fp32 chain of 8192
    additions per lane (the form before its sums were flushed every 8 lines)
    was 2.3x and 4.6x torch's error here, 8x at D4096 F11008, and still
    passed the usual rule."""
    torch.manual_seed(0)
    d_model, d_ff = 8192, 96
    params = make_params(d_model, d_ff, gated=True, bias=False, dtype=torch.float32, d_out=64)
    for tokens in (5, 16):
        x = torch.randn(tokens, d_model)
        ref = reference_forward(x, params, "silu")
        err = (forward(x, params, "silu").double() - ref).abs().max().item()
        base = (run_plain_torch(x, params, "silu").double() - ref).abs().max().item()
        assert err <= 3 * base, (tokens, err, base)


def test_decode_shapes_and_strided_x():
    """x [batch, 1, d_model] (one decode step per sequence) and an x whose
    rows and columns are strided."""
    torch.manual_seed(0)
    params = make_params(64, 200, gated=True, bias=False, dtype=torch.float32, d_out=48)
    x = torch.randn(3, 1, 64)
    y = forward(x, params, "silu")
    assert y.shape == (3, 1, 48)
    assert_tolerance(
        "y", y, reference_forward(x, params, "silu"), run_plain_torch(x, params, "silu"), torch.float32
    )
    xs = torch.randn(64, 2 * 7)[:, ::2].t()  # [7, 64], strides (2, 14)
    y = forward(xs, params, "silu")
    assert_tolerance(
        "y strided",
        y,
        reference_forward(xs, params, "silu"),
        run_plain_torch(xs, params, "silu"),
        torch.float32,
    )


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_at_small_tokens(dtype, gated, recompute, poison):
    """With grad, both through the small-token forward: recompute=True's
    saves nothing and the backward recomputes with the ATen GEMMs; the
    default one writes the pre-activations (biases in them for bf16/fp16, as
    addmm) that the ATen backward reads. Both give the reference's output and
    gradients."""
    torch.manual_seed(1)
    for lead, d_model, d_ff in [((1,), 96, 256), ((2, 5), 72, 300)]:
        params = make_params(d_model, d_ff, gated=gated, bias=True, dtype=dtype)
        x = torch.randn(*lead, d_model).to(dtype)
        with pyfastattn.backend("kernel"):
            check_against_reference(x, params, "silu", recompute, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saved_pre_activations_match_the_aten_path(dtype, poison, monkeypatch):
    """act_in, what ffn_bwd reads, is what the ATen path saves: x W^T [+ b]
    per form, biases in it for bf16/fp16 only (bias_in_gemm), within the
    tolerance of the float64 values (every element written: NaN-poisoned)."""
    torch.manual_seed(0)
    w1, b1, w2, b2, w3, b3 = make_params(72, 203, gated=True, bias=True, dtype=dtype)
    x = torch.randn(5, 72).to(dtype)
    op = torch.ops.pyfastattn.ffn_fwd
    _, act_in = op(x, w1, b1, w2, b2, w3, b3, "silu", True)
    monkeypatch.setenv(ENV, "0")
    _, aten_act_in = op(x, w1, b1, w2, b2, w3, b3, "silu", True)
    assert act_in.shape == aten_act_in.shape == (2, 5, 203) and act_in.dtype == dtype
    with_bias = dtype != torch.float32
    for i, (w, b) in enumerate(((w1, b1), (w3, b3))):
        ref = x.double() @ w.double().t() + (b.double() if with_bias else 0.0)
        assert_tolerance(f"act_in[{i}]", act_in[i], ref, aten_act_in[i], dtype)


def test_bad_shapes_raise_before_the_kernel_reads():
    """The op's own checks run on the small-token route too (the Python layer
    normally catches these first)."""
    x = torch.randn(2, 16)
    w1, w3 = torch.randn(32, 16), torch.randn(32, 16)
    with pytest.raises(RuntimeError, match="w2 must have shape"):
        torch.ops.pyfastattn.ffn_fwd(x, w1, None, torch.randn(16, 31), None, w3, None, "silu", False)
    with pytest.raises(RuntimeError, match="w3 must have shape"):
        torch.ops.pyfastattn.ffn_fwd(x, w1, None, torch.randn(16, 32), None, w3[:31], None, "silu", False)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        torch.ops.pyfastattn.ffn_fwd(x, w1, None, torch.randn(16, 32), None, w3, None, "tanh", False)


_ISA_CHECK = """
import torch, pyfastattn
from pyfastattn import ffn, reference
print(torch.ops.pyfastattn.ffn_small_tokens_isa())
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for act in ffn.ACTIVATIONS:
        for gated in (False, True):
            for tokens in (1, 2, 3, 16):
                x = torch.randn(tokens, 37).to(dtype)
                w = [(torch.randn(300, 37) * 0.2).to(dtype) for _ in range(2)]
                wd = (torch.randn(21, 300) * 0.05).to(dtype)
                b = [torch.randn(300).to(dtype) for _ in range(2)]
                bd = torch.randn(21).to(dtype)
                args = (x, w[0], w[1], wd, b[0], b[1], bd) if gated else (x, w[0], b[0], wd, bd)
                f = ffn.gated_feed_forward if gated else ffn.feed_forward
                r = reference.gated_feed_forward if gated else reference.feed_forward
                with torch.no_grad(), pyfastattn.backend("kernel"):
                    y = f(*args, activation=act)
                e = r(*(a.double() for a in args), activation=act)
                tol = 1e-5 if dtype == torch.float32 else 3e-2
                err = ((y.double() - e).abs().max() / (1 + e.abs().max())).item()
                assert err < tol, (dtype, act, gated, tokens, err)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_other_instruction_sets(isa):
    """The other variants (forced with PYFASTATTN_FFN_ISA, as the FFN step's;
    "avx512" leaves out the BF16 dot products) agree with the reference; a
    CPU without AVX-512 (or its BF16 extension) runs one of them."""
    env = dict(os.environ, PYFASTATTN_FFN_ISA=isa)
    r = subprocess.run(
        [sys.executable, "-c", _ISA_CHECK], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split()
    assert lines[-1] == "ok"
    expected = {
        "avx512": ("avx512", "avx2", "portable"),
        "avx2": ("avx2", "portable"),
        "portable": ("portable",),
    }
    assert lines[0] in expected[isa]  # never wider than asked


_PREFETCH_CHILD = """
import sys, torch, pyfastattn
from pyfastattn import ffn, reference
torch.manual_seed(0)
outs = []
for isa_dtype in (torch.float32, torch.bfloat16, torch.float16):
    for tokens in (1, 2, 4, 7):  # the dot-product tiles (fp32 up to 4, bf16 / fp16 1-2)
        x = torch.randn(tokens, 301).to(isa_dtype)
        w1, w3 = ((torch.randn(700, 301) * 0.1).to(isa_dtype) for _ in range(2))
        w2 = (torch.randn(157, 700) * 0.05).to(isa_dtype)
        with torch.no_grad(), pyfastattn.backend("kernel"):
            y = ffn.gated_feed_forward(x, w1, w3, w2, activation="silu")
        e = reference.gated_feed_forward(x.double(), w1.double(), w3.double(), w2.double(), activation="silu")
        tol = 1e-5 if isa_dtype == torch.float32 else 3e-2
        err = ((y.double() - e).abs().max() / (1 + e.abs().max())).item()
        assert err < tol, (isa_dtype, tokens, err)
        outs.append(y)
torch.save((torch.ops.pyfastattn.cpu_prefetch_level(), outs), sys.argv[1])
"""


def test_prefetch_levels_same_bits(tmp_path):
    """PYFASTATTN_CPU_PREFETCH=l1|l2 (read once per process, hence
    subprocesses) switches the dot-product tiles' L2 prefetches off / on:
    both match the reference and give the same bits, on every AVX-512
    variant (with and without the BF16 dot products)."""
    for isa in ("avx512bf16", "avx512"):
        outs = {}
        for level in ("l1", "l2"):
            path = tmp_path / f"{isa}-{level}.pt"
            env = dict(os.environ, PYFASTATTN_CPU_PREFETCH=level, PYFASTATTN_FFN_ISA=isa)
            r = subprocess.run([sys.executable, "-c", _PREFETCH_CHILD, str(path)], capture_output=True, text=True,
                               env=env, timeout=300)  # fmt: skip
            assert r.returncode == 0, r.stderr[-3000:]
            got, outs[level] = torch.load(path)
            assert got in (level, "none"), (level, got)
        for i, (a, b) in enumerate(zip(outs["l1"], outs["l2"])):
            assert torch.equal(a, b), f"{isa} case {i}: the prefetch level changed the result"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [4, 7, 9, 16])
def test_row_strided_x_broadcast_pack(tokens, dtype):
    """The broadcast form packs x per token row: bf16 at 9-16 tokens with
    vector loads (G = 1), bf16 at 3-8 and fp32 at 5-16 tokens one step (G
    lanes) per copy, the last one short (fp32 T4 runs the dot tiles). Rows further apart than d_model (a column
    slice of a wider tensor), an odd d_model (a tail shorter than a step for
    every G; bf16: the last pair's high half zero), and NaN in the columns
    past d_model, which must never be read."""
    torch.manual_seed(tokens)
    d_model = 67
    params = make_params(d_model, 90, gated=True, bias=True, dtype=dtype, d_out=33)
    wide = torch.full((tokens, d_model + 29), float("nan"), dtype=dtype)
    wide[:, :d_model] = torch.randn(tokens, d_model).to(dtype)
    x = wide[:, :d_model]
    assert x.stride(0) == d_model + 29
    y = forward(x, params, "silu")
    assert_tolerance(
        f"y row-strided {dtype}",
        y,
        reference_forward(x, params, "silu"),
        run_plain_torch(x, params, "silu"),
        dtype,
    )
