"""pyfastattn.linear (the modules' projections): F.linear's result and
gradients against float64, on the fp32 CPU GEMM where it is preferred, and
F.linear itself, bit for bit, everywhere else."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pyfastattn
from pyfastattn import _linear as linear_mod

from ._helpers import assert_tolerance

OWN = linear_mod._own_gemm()
needs_own = pytest.mark.skipif(not OWN, reason="the fp32 CPU GEMM is not the preferred one on this machine")


def _own_taken(y: torch.Tensor) -> bool:
    """Whether y came from the own GEMM (its grad_fn, or the view of it that a
    non-2-D input's output is)."""
    fn = y.grad_fn
    if fn is not None and fn.name() == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return fn is not None and "LinearFp32" in fn.name()


def _inputs(shape, n_out, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_in = shape[-1]
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).requires_grad_()
    b = (torch.randn(n_out, generator=g) * 0.1).requires_grad_() if bias else None
    return x, w, b


@needs_own
@pytest.mark.parametrize(
    "shape,n_out,bias", [((333, 129), 257, True), ((3, 80, 96), 300, False), ((2, 5, 41, 64), 520, True)]
)
def test_forward_and_gradients_against_float64(shape, n_out, bias):
    x, w, b = _inputs(shape, n_out, bias)
    y = pyfastattn.linear(x, w, b)
    assert _own_taken(y)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    yt = F.linear(x, w, b)  # torch's own fp32 error sets the bar
    grads_t = torch.autograd.grad(yt, [t for t in (x, w, b) if t is not None], dy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    yd = F.linear(xd, wd, bd)
    grads_d = torch.autograd.grad(yd, [t for t in (xd, wd, bd) if t is not None], dy.double())
    assert y.shape == yt.shape
    assert_tolerance("y", y, yd, yt, torch.float32)
    for name, g, gd, gt in zip(("dx", "dw", "db"), grads, grads_d, grads_t):
        assert g.shape == gd.shape
        assert_tolerance(name, g, gd, gt, torch.float32)


@pytest.mark.skipif(not linear_mod._own_gemm(torch.float16), reason="the fp16 CPU GEMM is not preferred here")
def test_float16_forward_and_gradients():
    x, w, b = (t.detach().half().requires_grad_() for t in _inputs((333, 129), 257))
    y = pyfastattn.linear(x, w, b)
    assert _own_taken(y) and y.dtype == torch.float16
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, b], dy)
    yt = F.linear(x, w, b)
    grads_t = torch.autograd.grad(yt, [x, w, b], dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = F.linear(xd, wd, bd)
    grads_d = torch.autograd.grad(yd, [xd, wd, bd], dy.double())
    assert_tolerance("y", y, yd, yt, torch.float16)
    for name, g, gd, gt in zip(("dx", "dw", "db"), grads, grads_d, grads_t):
        assert g.dtype == torch.float16
        assert_tolerance(name, g, gd, gt, torch.float16)


@needs_own
def test_only_the_gradients_asked_for():
    x, w, b = _inputs((300, 128), 256)
    (dw,) = torch.autograd.grad(pyfastattn.linear(x.detach(), w, b).sum(), [w])
    assert dw.shape == w.shape
    (dx,) = torch.autograd.grad(pyfastattn.linear(x, w.detach(), None).sum(), [x])
    assert_tolerance("dx", dx, torch.ones(300, 256).double() @ w.detach().double(), None, torch.float32)


@pytest.mark.parametrize(
    "case",
    ["bf16", "small", "few rows", "autocast", "reference backend", "float64"],
)
def test_everything_else_is_f_linear(case):
    x, w, b = _inputs((300, 128), 256)
    x, w, b = x.detach(), w.detach(), b.detach()
    if case == "bf16":
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    elif case == "small":
        x = x[:4, :16].contiguous()
        w = w[:8, :16].contiguous()
        b = b[:8]
    elif case == "few rows":  # 16M multiply-adds, but 31 rows: W would be packed for little use
        x, w, b = torch.randn(31, 2048), torch.randn(2048, 2048), torch.randn(2048)
    elif case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, ref = pyfastattn.linear(x, w, b), F.linear(x, w, b)
    elif case == "reference backend":
        with pyfastattn.backend("reference"):
            y = pyfastattn.linear(x.requires_grad_(), w, b)
        ref = F.linear(x, w, b)
        assert not _own_taken(y)
    else:
        y, ref = pyfastattn.linear(x, w, b), F.linear(x, w, b)
    assert y.dtype == ref.dtype and torch.equal(y, ref)


def test_mismatched_shapes_raise_f_linear_error():
    with pytest.raises(RuntimeError):
        pyfastattn.linear(torch.randn(400, 300), torch.randn(600, 299))


_SWITCH = """
import torch, pyfastattn
x = torch.randn(300, 128, requires_grad=True); w = torch.randn(256, 128)
y = pyfastattn.linear(x, w)
print("own" if "LinearFp32" in y.grad_fn.name() else "aten")
"""


@needs_own
def test_switch_aten_keeps_f_linear():
    env = dict(os.environ, PYFASTATTN_CPU_FFN_GEMM="aten")
    r = subprocess.run([sys.executable, "-c", _SWITCH], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["aten"]


@needs_own
def test_multihead_attention_projections_take_it():
    """The drop-in MHA's in- and out-projections go through pyfastattn.linear:
    same output and gradients as torch's module within the fp32 tolerance."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(128, 4, batch_first=True)
    mha = pyfastattn.nn.MultiheadAttention(128, 4, batch_first=True)
    mha.load_state_dict(ref.state_dict())
    x = torch.randn(3, 100, 128, requires_grad=True)
    y, _ = mha(x, x, x, need_weights=False)
    assert _own_taken(y)
    yr, _ = ref(x, x, x, need_weights=False)
    torch.testing.assert_close(y, yr, rtol=2e-5, atol=2e-5)
    g = torch.autograd.grad(y.sum(), [x, mha.in_proj_weight])
    gr = torch.autograd.grad(yr.sum(), [x, ref.in_proj_weight])
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@needs_own
@pytest.mark.parametrize("shape", [(300, 128), (3, 100, 128)])
def test_output_can_be_modified_in_place(shape):
    """F.linear's result is an ordinary tensor: nn.ReLU(inplace=True) after a
    Linear (a common pattern) must work and give F.linear's gradients."""
    x, w, b = _inputs(shape, 256)
    y = pyfastattn.linear(x, w, b)
    assert _own_taken(y)
    y.relu_()
    grads = torch.autograd.grad(y.sum(), [x, w, b])
    yt = F.linear(x, w, b).relu_()
    grads_t = torch.autograd.grad(yt.sum(), [x, w, b])
    torch.testing.assert_close(y, yt, rtol=2e-5, atol=2e-5)
    for g, gt in zip(grads, grads_t):
        torch.testing.assert_close(g, gt, rtol=1e-4, atol=1e-4)


def test_bias_that_broadcasts_is_f_linears():
    """F.linear broadcasts a bias of shape (1,) over the outputs; so must we
    (the own GEMM takes only an (out,) bias, so this stays F.linear)."""
    x, w, _ = _inputs((300, 128), 256)
    b = torch.randn(1, requires_grad=True)
    y = pyfastattn.linear(x, w, b)
    yt = F.linear(x, w, b)
    assert torch.equal(y, yt)
    (db,) = torch.autograd.grad(y.sum(), [b])
    torch.testing.assert_close(db, torch.full((1,), 300.0 * 256))


@needs_own
def test_twice_differentiable():
    """A gradient penalty (create_graph=True, then backward through the
    gradient) gives F.linear's second derivatives, as nn.Linear does."""

    def penalty(fn):
        torch.manual_seed(0)
        x, w, b = _inputs((300, 128), 256)
        w2 = (torch.randn(1, 256) / 16).requires_grad_()
        out = fn(torch.relu(fn(x, w, b)), w2, None)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        gp = ((gx.norm(dim=1) - 1) ** 2).mean()
        return torch.autograd.grad(gp, [x, w, b, w2])

    got, want = penalty(pyfastattn.linear), penalty(F.linear)
    for name, g, r in zip(("x", "w", "b", "w2"), got, want):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5, msg=name)


@needs_own
@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev"])
def test_torch_func_transforms(transform):
    """torch.func.grad / vmap / jacrev of a function calling pyfastattn.linear
    (a patched model under torch.func.functional_call) give F.linear's result."""
    x, w, b = (t.detach() for t in _inputs((300, 128), 256))
    if transform == "grad":
        got = torch.func.grad(lambda w_: pyfastattn.linear(x, w_, b).pow(2).sum())(w)
        want = torch.func.grad(lambda w_: F.linear(x, w_, b).pow(2).sum())(w)
    elif transform == "vmap":
        xs = torch.randn(3, 64, 128)
        got = torch.func.vmap(lambda x_: pyfastattn.linear(x_, w, b))(xs)
        want = F.linear(xs, w, b)
    else:
        x2 = x[:40, :32].contiguous()
        w2 = torch.randn(2048, 32)
        got = torch.func.jacrev(lambda x_: pyfastattn.linear(x_, w2).sum(0))(x2)
        want = torch.func.jacrev(lambda x_: F.linear(x_, w2).sum(0))(x2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
