"""The FFN's own fp32 CPU GEMM (csrc/cpu/matmul_fp32.cpp, reached through
torch.ops.pyfastattn.cpu_matmul_fp32) against the float64 product, with the
tolerance rule of pyfastattn.testing (at most twice torch's own fp32 error):
odd sizes across every block edge (k blocks of 256, row blocks of 128, column
chunks of 256, panels of 32, vectors of 16), both layouts of each operand,
accumulation, NaN-poisoned outputs, and the same bits on any thread count.
The FFN's use of it (PYFASTATTN_CPU_FFN_GEMM) is checked in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pyfastattn  # noqa: F401  (loads the extension)

from ._helpers import assert_tolerance

OPS = torch.ops.pyfastattn
HAS_OP = hasattr(OPS, "cpu_matmul_fp32")


def _avx512() -> bool:
    try:
        OPS.cpu_matmul_fp32(torch.ones(1, 1), torch.ones(1, 1))
        return True
    except (RuntimeError, ValueError):
        return False


needs_avx512 = pytest.mark.skipif(not (HAS_OP and _avx512()), reason="needs the extension on an AVX-512 CPU")

# m, n, k: one of each block edge, and a few at once.
SHAPES = [
    (1, 1, 1),
    (3, 5, 7),
    (8, 32, 16),
    (9, 33, 17),
    (17, 15, 255),
    (64, 100, 256),
    (65, 257, 257),
    (127, 31, 513),
    (129, 300, 64),
    (300, 70, 1000),
    (600, 48, 40),  # rows split into chunks on 2+ threads
    (40, 700, 300),  # three column chunks, a 188-column last one
]


def _operand(rows: int, cols: int, layout: str, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """A rows x cols operand in a given memory layout."""
    if layout == "row":
        return torch.randn(rows, cols, generator=gen).to(dtype)
    if layout == "col":  # the transpose of a row-major tensor, as W.t()
        return torch.randn(cols, rows, generator=gen).to(dtype).t()
    # neither stride 1: every other column of a wider tensor
    return torch.randn(rows, 2 * cols, generator=gen).to(dtype)[:, ::2]


def _check(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None, name: str = "") -> torch.Tensor:
    out = OPS.cpu_matmul_fp32(a, b, c)
    ref = a.double() @ b.double()
    base = a @ b  # torch's own product in the same dtype: the error it sets the bar with
    if c is not None:
        ref = ref + c.double()
        base = base + c
    assert out.shape == ref.shape and out.dtype == a.dtype
    assert_tolerance(name, out, ref, base, a.dtype)
    return out


@needs_avx512
@pytest.mark.parametrize("m,n,k", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("la", ["row", "col"])
@pytest.mark.parametrize("lb", ["row", "col"])
def test_against_float64(m, n, k, la, lb):
    gen = torch.Generator().manual_seed(m * 1000003 + n * 1009 + k)
    a, b = _operand(m, k, la, gen), _operand(k, n, lb, gen)
    _check(a, b, name=f"{m}x{n}x{k} A {la} B {lb}")


# fp16 data: converted to fp32 while packed, C summed in fp32 and rounded once.
F16_SHAPES = [(3, 5, 7), (9, 33, 17), (65, 257, 257), (300, 70, 1000), (1100, 40, 30)]


@needs_avx512
@pytest.mark.parametrize("m,n,k", F16_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in F16_SHAPES])
@pytest.mark.parametrize("la", ["row", "col"])
@pytest.mark.parametrize("lb", ["row", "col"])
def test_float16_against_float64(m, n, k, la, lb):
    gen = torch.Generator().manual_seed(m * 1000003 + n * 1009 + k + 1)
    a, b = _operand(m, k, la, gen, torch.float16), _operand(k, n, lb, gen, torch.float16)
    _check(a, b, name=f"fp16 {m}x{n}x{k} A {la} B {lb}")


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k", [(5, 7, 3), (65, 257, 513), (300, 70, 1000)])
def test_accumulate(m, n, k, dtype):
    gen = torch.Generator().manual_seed(7)
    a, b = _operand(m, k, "row", gen, dtype), _operand(k, n, "col", gen, dtype)
    _check(a, b, torch.randn(m, n, generator=gen).to(dtype), name="c + a b")


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k", [(5, 7, 3), (65, 257, 513), (300, 70, 1000), (4, 6, 0)])
def test_bias(m, n, k, dtype):
    """bias starts every row's sum (addmm's broadcast bias), written over a
    NaN-poisoned c; k = 0 gives the bias itself."""
    gen = torch.Generator().manual_seed(9)
    a, b = _operand(m, k, "row", gen, dtype), _operand(k, n, "col", gen, dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    out = OPS.cpu_matmul_fp32(
        a, b, torch.full((m, n), float("nan"), dtype=dtype), accumulate=False, bias=bias
    )
    ref = a.double() @ b.double() + bias.double()
    assert_tolerance("a b + bias", out, ref, torch.addmm(bias, a, b) if k else bias.expand(m, n), dtype)
    with pytest.raises(ValueError, match="bias is for a product that is not accumulated"):
        OPS.cpu_matmul_fp32(a, b, out, bias=bias)
    with pytest.raises(ValueError, match=r"bias must be a"):
        OPS.cpu_matmul_fp32(a, b, bias=bias[:-1] if n > 1 else bias.double())


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k", [(9, 33, 17), (129, 300, 600)])
def test_overwrites_poisoned_output(m, n, k, dtype):
    """Without accumulate the product is written over every element (the
    FFN's buffers are reused between calls): a NaN-filled c must not leak."""
    gen = torch.Generator().manual_seed(3)
    a, b = _operand(m, k, "row", gen, dtype), _operand(k, n, "col", gen, dtype)
    out = OPS.cpu_matmul_fp32(a, b, torch.full((m, n), float("nan"), dtype=dtype), accumulate=False)
    assert not out.isnan().any()
    assert_tolerance("poisoned", out, a.double() @ b.double(), a @ b, dtype)


@needs_avx512
@pytest.mark.parametrize("la,lb", [("strided", "row"), ("row", "strided"), ("strided", "strided")])
def test_operands_without_unit_stride(la, lb):
    gen = torch.Generator().manual_seed(11)
    _check(_operand(37, 45, la, gen), _operand(45, 50, lb, gen), name=f"A {la} B {lb}")


@needs_avx512
def test_empty_and_k0():
    assert OPS.cpu_matmul_fp32(torch.randn(0, 5), torch.randn(5, 3)).shape == (0, 3)
    assert OPS.cpu_matmul_fp32(torch.randn(4, 5), torch.randn(5, 0)).shape == (4, 0)
    z = OPS.cpu_matmul_fp32(
        torch.randn(4, 0), torch.randn(0, 3), torch.full((4, 3), float("nan")), accumulate=False
    )
    assert torch.equal(z, torch.zeros(4, 3))
    c = torch.randn(4, 3)
    assert torch.equal(OPS.cpu_matmul_fp32(torch.randn(4, 0), torch.randn(0, 3), c), c)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_same_bits_on_any_thread_count(dtype):
    """Each element's k products are summed in the same order whichever
    thread computes its chunk (and however rows are split into chunks)."""
    gen = torch.Generator().manual_seed(5)
    a, b = _operand(700, 600, "row", gen, dtype), _operand(600, 530, "col", gen, dtype)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3, 5):
            torch.set_num_threads(t)
            outs.append(OPS.cpu_matmul_fp32(a, b))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@needs_avx512
def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"a\.size\(1\) must equal b\.size\(0\)"):
        OPS.cpu_matmul_fp32(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="float32 or float16"):
        OPS.cpu_matmul_fp32(torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 6))
    with pytest.raises(ValueError, match="one dtype"):
        OPS.cpu_matmul_fp32(torch.randn(3, 4), torch.randn(4, 6, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"c must be a Float CPU tensor of shape \[3, 6\]"):
        OPS.cpu_matmul_fp32(torch.randn(3, 4), torch.randn(4, 6), torch.randn(6, 3))


_ROUTE = """
import torch, pyfastattn
print(*(torch.ops.pyfastattn.ffn_cpu_gemm(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)))
"""


def _route(**env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("PYFASTATTN_CPU_FFN_GEMM", "PYFASTATTN_FFN_ISA")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", _ROUTE], capture_output=True, text=True, env=full, timeout=300
    )


@needs_avx512
def test_ffn_route_switches():
    """PYFASTATTN_CPU_FFN_GEMM picks the FFN's fp32 / fp16 GEMM (bf16 stays
    ATen's); by default fp16 takes the own GEMM on any AVX-512 CPU; a cap of
    the FFN kernels below AVX-512 (PYFASTATTN_FFN_ISA) keeps ATen's; a bad
    value is an error naming the variable."""
    assert _route().stdout.split()[1:] == ["own", "aten"]
    assert _route(PYFASTATTN_CPU_FFN_GEMM="own").stdout.split() == ["own", "own", "aten"]
    assert _route(PYFASTATTN_CPU_FFN_GEMM="aten").stdout.split() == ["aten", "aten", "aten"]
    assert _route(PYFASTATTN_CPU_FFN_GEMM="own", PYFASTATTN_FFN_ISA="avx2").stdout.split() == ["aten"] * 3
    r = _route(PYFASTATTN_CPU_FFN_GEMM="fast")
    assert r.returncode != 0 and "PYFASTATTN_CPU_FFN_GEMM must be 'auto'" in r.stderr


_FFN_BOTH = """
import torch, pyfastattn
from pyfastattn import reference
torch.manual_seed(0)
t, d, f = 333, 96, 260
x = torch.randn(t, d, requires_grad=True)
# w_gate, w_up, w_down, b_gate, b_up, b_down
ws = [torch.randn(f, d) / d ** 0.5, torch.randn(f, d) / d ** 0.5, torch.randn(d, f) / f ** 0.5,
      torch.randn(f) * 0.1, torch.randn(f) * 0.1, torch.randn(d) * 0.1]
ws = [w.requires_grad_() for w in ws]
with pyfastattn.backend("kernel"):
    y = pyfastattn.gated_feed_forward(x, *ws, activation="silu")
g = torch.autograd.grad(y.square().sum(), [x, *ws])
xd = x.detach().double().requires_grad_()
wd = [w.detach().double().requires_grad_() for w in ws]
yd = reference.gated_feed_forward(xd, *wd, activation="silu")
gd = torch.autograd.grad(yd.square().sum(), [xd, *wd])
errs = [((y.double() - yd).abs().max() / yd.abs().max()).item()]
errs += [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(g, gd)]
print(torch.ops.pyfastattn.ffn_cpu_gemm(torch.float32), max(errs))
"""


@needs_avx512
@pytest.mark.parametrize("choice", ["own", "aten"])
def test_ffn_forward_backward_on_either_gemm(choice):
    """A gated FFN's forward and every gradient on either fp32 GEMM, against
    the float64 reference (333 tokens: past the small-token forward)."""
    full = {k: v for k, v in os.environ.items() if k != "PYFASTATTN_FFN_ISA"}
    full["PYFASTATTN_CPU_FFN_GEMM"] = choice
    r = subprocess.run(
        [sys.executable, "-c", _FFN_BOTH], capture_output=True, text=True, env=full, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    route, err = r.stdout.split()
    assert route == choice
    assert float(err) < 1e-5, err
