"""The CPU autograd of pyfastattn::attention_fwd in C++
(csrc/attention/attention_autograd.cpp): the gradients are exactly what the
backward op gives for the forward's saved out and lse, with every optional
input passed through (mask, varlen, key lengths, dropout, ALiBi, softcap,
windows), and the values of the float64 reference."""

from __future__ import annotations

import pytest
import torch

from pyfastattn import reference
from pyfastattn.testing import tolerance_failure


def _case(name, dtype):
    g = torch.Generator().manual_seed(0)
    b, sq, sk, hq, hk, d = 2, 19, 37, 4, 2, 24
    kw = dict(attn_mask=None, cu_q=None, cu_k=None, used=None, max_q=sq, max_k=sk, softcap=0.0)
    kw.update(wl=-1, wr=-1, br=False, p=0.0, rng=None, slopes=None)
    if name == "varlen":
        lq, lk = [7, 12], [20, 17]
        q = torch.randn(sum(lq), hq, d, generator=g).to(dtype)
        k = torch.randn(sum(lk), hk, d, generator=g).to(dtype)
        v = torch.randn(sum(lk), hk, d, generator=g).to(dtype)
        kw.update(
            cu_q=torch.tensor([0, 7, 19], dtype=torch.int32),
            cu_k=torch.tensor([0, 20, 37], dtype=torch.int32),
            max_q=12,
            max_k=20,
            wr=0,
            br=True,
        )
        return q, k, v, kw
    q = torch.randn(b, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    v = torch.randn(b, sk, hk, d, generator=g).to(dtype)
    if name == "mask":
        kw["attn_mask"] = torch.rand(b, hq, sq, sk, generator=g) > 0.3
    elif name == "used_window_softcap":
        kw.update(used=torch.tensor([30, 5], dtype=torch.int32), wl=9, wr=3, softcap=5.0)
    elif name == "dropout_alibi":
        kw.update(p=0.25, rng=torch.tensor([1234, 56], dtype=torch.int64), slopes=torch.rand(hq, generator=g))
    return q, k, v, kw


def _fwd(q, k, v, kw):
    d = q.shape[-1]
    return torch.ops.pyfastattn.attention_fwd(
        q, k, v, kw["attn_mask"], kw["cu_q"], kw["cu_k"], kw["used"], kw["max_q"], kw["max_k"], d**-0.5,
        kw["softcap"], kw["wl"], kw["wr"], kw["br"], kw["p"], kw["rng"], kw["slopes"],
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["plain", "mask", "varlen", "used_window_softcap", "dropout_alibi"])
def test_gradients_are_the_backward_ops(name, dtype):
    q, k, v, kw = _case(name, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = _fwd(*leaves, kw)
    assert out.grad_fn is not None and "AttentionFwdFunction" in out.grad_fn.name()
    assert not lse.requires_grad  # marked non-differentiable
    # a dout whose last dim is not contiguous: the backward makes it so
    dout = torch.randn(*out.shape[:-1], 2 * out.shape[-1], generator=torch.Generator().manual_seed(1))
    dout = dout.to(dtype)[..., ::2]
    grads = torch.autograd.grad(out, leaves, dout)
    with torch.no_grad():
        out2, lse2 = _fwd(q, k, v, kw)
    assert torch.equal(out.detach(), out2) and torch.equal(lse, lse2)
    want = torch.ops.pyfastattn.attention_bwd(
        dout.contiguous(), q, k, v, out2, lse2, kw["attn_mask"], kw["cu_q"], kw["cu_k"], kw["used"], kw["max_q"],
        kw["max_k"], q.shape[-1] ** -0.5, kw["softcap"], kw["wl"], kw["wr"], kw["br"], False, kw["p"], kw["rng"],
        kw["slopes"],
    )  # fmt: skip
    for got, exp in zip(grads, want):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("name", ["mask", "varlen", "used_window_softcap", "dropout_alibi"])
def test_gradients_match_the_reference(name):
    q, k, v, kw = _case(name, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = _fwd(*leaves, kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, leaves, dout)

    def ref_grads(dtype):
        xs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        o, _ = reference.attention(
            *xs, scale=q.shape[-1] ** -0.5, attn_mask=kw["attn_mask"], cu_seqlens_q=kw["cu_q"],
            cu_seqlens_k=kw["cu_k"], seqused_k=kw["used"], softcap=kw["softcap"], window_left=kw["wl"],
            window_right=kw["wr"], bottom_right=kw["br"], dropout_p=kw["p"], dropout_rng=kw["rng"],
            alibi_slopes=kw["slopes"],
        )  # fmt: skip
        return torch.autograd.grad(o, xs, dout.to(dtype))

    for n, got, exp, base in zip("qkv", grads, ref_grads(torch.float64), ref_grads(torch.float32)):
        msg = tolerance_failure(f"d{n}", got, exp, base, torch.float32)
        assert msg is None, msg


def test_only_inputs_that_need_grad():
    q, k, v, kw = _case("plain", torch.float32)
    qg = q.clone().requires_grad_()
    out, _ = _fwd(qg, k, v, kw)
    (dq,) = torch.autograd.grad(out.sum(), (qg,))
    assert dq.shape == q.shape and torch.isfinite(dq).all()


@pytest.mark.parametrize("mode", ["auto", "kernel"])
def test_double_backward_raises_instead_of_silent_zeros(mode):
    # attention_bwd is not differentiable. With create_graph=True its
    # outputs used to differentiate to zeros through torch's
    # autograd-not-implemented fallback (a gradient penalty would silently
    # vanish); now that raises, and the first-order gradients are unchanged.
    import pyfastattn

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=g).requires_grad_() for _ in range(3))
    with pyfastattn.backend(mode):
        out = pyfastattn.attention(q, k, v, causal=True)
        plain = torch.autograd.grad(out.pow(2).sum(), (q, k, v), retain_graph=True)
        first = torch.autograd.grad(out.pow(2).sum(), (q, k, v), create_graph=True)
        for a, b in zip(first, plain):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(first[0].pow(2).sum(), (q, k, v))
    # the reference path is plain PyTorch: twice differentiable
    with pyfastattn.backend("reference"):
        out = pyfastattn.attention(q, k, v, causal=True)
    (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    second = torch.autograd.grad(gq.pow(2).sum(), (q, k, v))
    assert all(t.abs().sum() > 0 for t in second)
