"""opcheck for every op, and torch.compile(fullgraph=True) of both public APIs."""

from __future__ import annotations

import pytest
import torch

import pyfastattn

from ._helpers import make_qkv


def _fwd_samples():
    q, k, v = make_qkv(2, 9, 11, 4, 2, 16)
    yield (q, k, v, None, None, None, None, 9, 11, 0.25, 0.0, -1, 0, True)
    m = torch.rand(2, 1, 9, 11) > 0.3
    yield (q, k, v, m, None, None, None, 9, 11, 0.25, 2.0, 3, -1, False)
    yield (
        q,
        k,
        v,
        None,
        None,
        None,
        torch.tensor([5, 11], dtype=torch.int32),
        9,
        11,
        0.25,
        0.0,
        -1,
        -1,
        False,
    )
    qp, kp, vp = torch.randn(12, 4, 16), torch.randn(15, 2, 16), torch.randn(15, 2, 8)
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 15], dtype=torch.int32)
    yield (qp, kp, vp, None, cu_q, cu_k, None, 7, 9, 0.25, 0.0, -1, 0, True)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("i", range(4))
def test_opcheck_attention_fwd(i, requires_grad):
    args = list(_fwd_samples())[i]
    args = [
        a.requires_grad_(requires_grad)
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.bool
        else a
        for a in args
    ]
    torch.library.opcheck(torch.ops.pyfastattn.attention_fwd.default, tuple(args))


def test_opcheck_attention_bwd():
    q, k, v, *rest = next(_fwd_samples())
    out, lse = torch.ops.pyfastattn.attention_fwd(q, k, v, *rest)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pyfastattn.attention_bwd.default, (dout, q, k, v, out, lse, *rest, False))


def test_compile_fullgraph_sdpa_forward_backward():
    q, k, v = (torch.randn(2, 4, 33, 32, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return pyfastattn.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = f(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_native_varlen_and_lse():
    q, k, v = torch.randn(12, 4, 16), torch.randn(15, 2, 16), torch.randn(15, 2, 16)
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 15], dtype=torch.int32)

    def f(q, k, v):
        return pyfastattn.attention(
            q,
            k,
            v,
            causal=True,
            window_size=(4, -1),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=7,
            max_seqlen_k=9,
            return_lse=True,
        )

    out, lse = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    ref_out, ref_lse = f(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
