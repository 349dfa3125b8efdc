"""The public functions: SDPA parity with torch, the native API's conventions,
and the backend rule."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import pyfastattn
from pyfastattn import reference

from ._helpers import assert_tolerance, make_qkv

SDPA_CASES = [
    # (q shape, k shape, v shape, kwargs, mask shape or None, mask dtype)
    ((2, 3, 17, 16), (2, 3, 19, 16), (2, 3, 19, 8), {}, None, None),
    ((2, 3, 17, 16), (2, 3, 19, 16), (2, 3, 19, 16), dict(is_causal=True), None, None),
    ((2, 3, 23, 16), (2, 3, 11, 16), (2, 3, 11, 16), dict(is_causal=True), None, None),  # L > S, top-left
    ((2, 4, 9, 32), (2, 2, 13, 32), (2, 2, 13, 32), dict(enable_gqa=True), None, None),
    ((2, 4, 9, 32), (2, 1, 13, 32), (2, 1, 13, 32), {}, None, None),  # head broadcast
    ((5, 9, 16), (5, 12, 16), (5, 12, 16), {}, None, None),  # 3-D
    ((9, 16), (12, 16), (12, 16), dict(scale=0.3), None, None),  # 2-D
    ((2, 2, 3, 9, 16), (2, 2, 3, 12, 16), (2, 2, 3, 12, 16), {}, (12,), torch.bool),  # 5-D, 1-D mask
    ((2, 3, 17, 16), (2, 3, 19, 16), (2, 3, 19, 16), {}, (17, 19), torch.bool),
    ((2, 3, 17, 16), (2, 3, 19, 16), (2, 3, 19, 16), {}, (2, 1, 17, 19), "float"),
    ((2, 3, 17, 16), (2, 3, 19, 16), (2, 3, 19, 16), {}, (3, 17, 1), "float"),  # broadcast over keys
    ((2, 3, 17, 16), (1, 3, 19, 16), (1, 3, 19, 16), {}, None, None),  # batch broadcast
]


def _mask(shape, dtype, ref_dtype):
    if shape is None:
        return None
    if dtype == torch.bool:
        m = torch.rand(shape) > 0.3
        return m
    return torch.randn(shape, dtype=ref_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(SDPA_CASES)))
def test_sdpa_matches_torch(case, dtype):
    qs, ks, vs, kw, ms, mdt = SDPA_CASES[case]
    q, k, v = (torch.randn(s, dtype=dtype) for s in (qs, ks, vs))
    m = _mask(ms, mdt, dtype)
    out = pyfastattn.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)
    m64 = m if m is None or m.dtype == torch.bool else m.double()
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m64, **kw)
    base = F.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_tolerance("sdpa", out, ref, base, dtype)


def test_sdpa_gradients_match_torch():
    q, k, v = (torch.randn(2, 3, 13, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    m = torch.randn(13, 13, dtype=torch.float64)
    g = torch.randn(2, 3, 13, 16, dtype=torch.float64)
    ours = torch.autograd.grad(pyfastattn.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v), g)
    theirs = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v), g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_sdpa_mask_gradient_falls_back_to_reference():
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    m = torch.randn(7, 7, requires_grad=True)
    with pytest.warns(UserWarning, match="attn_mask"):
        out = pyfastattn.scaled_dot_product_attention(q, k, v, attn_mask=m)
    (gm,) = torch.autograd.grad(out.sum(), m)
    m2 = m.detach().requires_grad_()
    (gm2,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=m2).sum(), m2)
    torch.testing.assert_close(gm, gm2)


def test_sdpa_dropout_runs_and_is_seeded():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    with pyfastattn.backend("reference"):
        torch.manual_seed(1)
        a = pyfastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(1)
        b = pyfastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        c = pyfastattn.scaled_dot_product_attention(q, k, v)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # The kernel runs dropout itself (issue 17) and drops what the reference drops.
    with pyfastattn.backend("kernel"):
        torch.manual_seed(1)
        d = pyfastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(d, a)


def test_native_attention_bottom_right_and_lse():
    q, k, v = make_qkv(2, 5, 12, 4, 2, 16)
    out, lse = pyfastattn.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (2, 5, 4, 16) and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    # Bottom-right: the last query row sees every key; row i sees keys <= i + 7.
    ref_out, ref_lse = reference.attention(
        q.double(), k.double(), v.double(), window_right=0, bottom_right=True
    )
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    full = F.scaled_dot_product_attention(
        q[:, -1:].transpose(1, 2),
        k.transpose(1, 2).repeat_interleave(2, 1),
        v.transpose(1, 2).repeat_interleave(2, 1),
    )
    torch.testing.assert_close(out[:, -1:], full.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_native_window_and_softcap_match_reference():
    q, k, v = make_qkv(1, 40, 40, 2, 2, 32)
    out = pyfastattn.attention(q, k, v, window_size=(4, 2), softcap=2.0)
    ref, _ = reference.attention(
        q.double(), k.double(), v.double(), window_left=4, window_right=2, softcap=2.0, bottom_right=True
    )
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_native_varlen_equals_separate_calls():
    lens = [(3, 5), (0, 4), (11, 11), (6, 0)]
    qs = [torch.randn(a, 2, 16) for a, _ in lens]
    ks = [torch.randn(b, 1, 16) for _, b in lens]
    vs = [torch.randn(b, 1, 16) for _, b in lens]
    cu_q = torch.tensor([0, 3, 3, 14, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9, 20, 20], dtype=torch.int32)
    out, lse = pyfastattn.attention(
        torch.cat(qs),
        torch.cat(ks),
        torch.cat(vs),
        causal=True,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        return_lse=True,
    )
    assert lse.shape == (2, 20)
    for i, (a, _) in enumerate(lens):
        if a == 0:
            continue
        o = pyfastattn.attention(qs[i][None], ks[i][None], vs[i][None], causal=True)[0]
        torch.testing.assert_close(out[cu_q[i] : cu_q[i + 1]], o, atol=1e-5, rtol=1e-5)
    assert torch.all(out[14:] == 0) and torch.all(torch.isneginf(lse[:, 14:]))


def test_fully_masked_rows_are_zero_without_nan():
    q, k, v = make_qkv(1, 6, 4, 2, 2, 8)
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = pyfastattn.attention(q, k, v, causal=True, return_lse=True)  # rows 0, 1 see nothing
    assert torch.all(out[:, :2] == 0) and torch.all(torch.isneginf(lse[:, :, :2]))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(not torch.isnan(g).any() for g in grads)
    assert torch.all(grads[0][:, :2] == 0)


# ---------------------------------------------------------------------------
# backend rule
# ---------------------------------------------------------------------------


def test_backend_reference_never_calls_the_op(monkeypatch):
    calls = []
    real = reference.attention
    monkeypatch.setattr(reference, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8)
    with pyfastattn.backend("reference"):
        pyfastattn.attention(q, k, v)
    assert calls == [1]
    pyfastattn.attention(q, k, v)  # auto on CPU float32: the kernel
    assert calls == [1]
    assert pyfastattn.get_backend() == "auto"


def test_backend_kernel_raises_and_auto_warns_once_for_float64():
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, dtype=torch.float64)
    with pyfastattn.backend("kernel"), pytest.raises(RuntimeError, match="float64"):
        pyfastattn.attention(q, k, v)
    pyfastattn._backend._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pyfastattn.attention(q, k, v)
        pyfastattn.attention(q, k, v)
        pyfastattn.attention(q, k, v, return_lse=True)  # torch's SDPA has no LSE: the reference
        pyfastattn.attention(q, k, v, return_lse=True)
    msgs = [str(x.message) for x in w]
    assert (
        len([m for m in msgs if "torch's scaled_dot_product_attention because" in m and "float64" in m]) == 1
    )
    assert len([m for m in msgs if "reference path" in m and "float64" in m and "log-sum-exp" in m]) == 1


def test_backend_validation():
    with pytest.raises(ValueError, match="backend"):
        pyfastattn.set_backend("fast")
    with pytest.raises(ValueError, match="backend"), pyfastattn.backend("nope"):
        pass
    r = subprocess.run(
        [sys.executable, "-c", "import pyfastattn"],
        capture_output=True,
        text=True,
        env={"PYFASTATTN_BACKEND": "turbo", "PATH": ""},
        timeout=120,
    )
    assert r.returncode != 0 and "PYFASTATTN_BACKEND" in r.stderr
    r = subprocess.run(
        [sys.executable, "-c", "import pyfastattn; print(pyfastattn.get_backend())"],
        capture_output=True,
        text=True,
        env={"PYFASTATTN_BACKEND": "Reference", "PATH": ""},
        timeout=120,
    )
    assert r.stdout.strip() == "reference", r.stderr


@pytest.mark.parametrize("mode", ["auto", "kernel", "reference"])
def test_metadata_views_are_accepted(mode):
    # cu_seqlens and seqused_k taken as views of larger tensors (not
    # contiguous) are valid arguments on every backend, as fresh tensors are.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 2, 16, generator=g) for _ in range(3))
    every = torch.tensor([0, 99, 5, 99, 12, 99], dtype=torch.int32)
    cu, used = every[::2], torch.tensor([[4, 0], [6, 0]], dtype=torch.int32)[:, 0]
    assert not cu.is_contiguous() and not used.is_contiguous()
    meta = dict(max_seqlen_q=7, max_seqlen_k=7, causal=True)
    with pyfastattn.backend(mode):
        got = pyfastattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, seqused_k=used, **meta)
        dense = pyfastattn.attention(q[None], k[None], v[None], seqused_k=used[:1])
    want = pyfastattn.attention(q, k, v, cu_seqlens_q=cu.contiguous(), cu_seqlens_k=cu.contiguous(),
                                seqused_k=used.contiguous(), **meta)  # fmt: skip
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dense, pyfastattn.attention(q[None, :, :, :], k[None, :4], v[None, :4]))
