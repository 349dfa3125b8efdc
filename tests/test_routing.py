"""Backend ``auto``'s routing, tested without a GPU.

The rule (``functional.decide_path``): the fused kernel where it can run (on
CUDA only on verified hardware), else torch's own SDPA where it expresses the
call exactly, else the reference. The decision is tested as a function of the
device type and capability; the SDPA route's numbers are tested on CPU tensors
with the kernel declined, against the float64 reference."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import pyfastattn
from pyfastattn import functional, reference
from tests._helpers import assert_tolerance, default_scale, make_qkv, naive_attention


def test_cuda_capability_decides_until_verified(monkeypatch):
    for cap in [(8, 0), (8, 6), (9, 0), (10, 0), (12, 0)]:
        why = functional.cuda_unverified_reason(cap)
        assert why is not None and f"{cap[0]}.{cap[1]}" in why
        path, reason = functional.decide_path(why, None, "auto")
        assert (path, reason) == ("sdpa", why)
        path, _ = functional.decide_path(why, "torch's SDPA has no softcap", "auto")
        assert path == "reference"
    monkeypatch.setattr(functional, "CUDA_VERIFIED_CAPABILITIES", ((9, 0),))
    assert functional.cuda_unverified_reason((9, 0)) is None
    assert functional.decide_path(None, None, "auto") == ("kernel", None)
    assert functional.cuda_unverified_reason((8, 0)) is not None


def test_decide_path_modes():
    assert functional.decide_path(None, None, "kernel") == ("kernel", None)
    assert functional.decide_path("x", None, "reference") == ("reference", None)
    assert functional.decide_path(None, None, "reference") == ("reference", None)
    with pytest.raises(RuntimeError, match="backend 'kernel' cannot run this call: because"):
        functional.decide_path("because", None, "kernel")
    assert functional.decide_path("no kernel", "no lse", "auto") == ("reference", "no kernel, and no lse")


def test_sdpa_unsupported_reasons():
    assert functional.sdpa_unsupported_reason(softcap=0.0, need_lse=False, varlen=True) is None
    assert "softcap" in functional.sdpa_unsupported_reason(softcap=30.0, need_lse=False, varlen=False)
    assert "log-sum-exp" in functional.sdpa_unsupported_reason(softcap=0.0, need_lse=True, varlen=False)
    f64 = functional.sdpa_unsupported_reason(
        softcap=0.0, need_lse=False, varlen=False, dropout_dtype=torch.float64
    )
    assert "drops other weights" in f64
    assert (
        functional.sdpa_unsupported_reason(
            softcap=0.0, need_lse=False, varlen=False, dropout_dtype=torch.float32
        )
        is None
    )


@pytest.fixture
def kernel_declined(monkeypatch):
    """Backend auto with the kernel declined, as on an unverified GPU."""
    calls = []

    def declined(*args, **kwargs):
        calls.append(1)
        return "the test declines the kernel"

    monkeypatch.setattr(functional, "kernel_unsupported_reason", declined)
    sdpa_calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        sdpa_calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "_torch_sdpa", counting)  # torch's SDPA as the fallbacks call it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield sdpa_calls


# (b, sq, sk, hq, hk, d, kwargs of canonical_attention)
ROUTED = {
    "plain": (2, 17, 17, 4, 4, 32, {}),
    "top-left causal": (2, 17, 29, 4, 4, 32, {"window_right": 0}),
    "bottom-right causal, Sq < Sk": (2, 13, 29, 4, 4, 32, {"window_right": 0, "bottom_right": True}),
    "bottom-right causal, Sq > Sk": (2, 29, 13, 4, 4, 32, {"window_right": 0, "bottom_right": True}),
    "sliding window": (1, 33, 33, 2, 2, 16, {"window_left": 5, "window_right": 0, "bottom_right": True}),
    "two-sided window": (1, 20, 31, 2, 1, 16, {"window_left": 3, "window_right": 4}),
    "GQA 8:2 causal": (2, 17, 17, 8, 2, 16, {"window_right": 0}),
    "key lengths": (3, 9, 21, 2, 2, 16, {"seqused_k": [21, 4, 0]}),
    "key lengths + causal": (
        3,
        9,
        21,
        2,
        2,
        16,
        {"seqused_k": [21, 12, 3], "window_right": 0, "bottom_right": True},
    ),
    "bool mask + causal": (2, 15, 15, 3, 3, 16, {"mask": "bool", "window_right": 0}),
    "float mask, GQA": (2, 15, 22, 4, 2, 16, {"mask": "float"}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(ROUTED))
def test_sdpa_route_matches_reference(case, dtype, kernel_declined, poison):
    b, sq, sk, hq, hk, d, kw = ROUTED[case]
    kw = dict(kw)
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, dtype=dtype, strided=True)
    if "seqused_k" in kw:
        kw["seqused_k"] = torch.tensor(kw["seqused_k"], dtype=torch.int32)
    mask = kw.pop("mask", None)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(b, 1, sq, sk) > 0.3
    elif mask == "float":
        kw["attn_mask"] = torch.randn(1, hq, sq, sk, dtype=dtype)
    out = pyfastattn.canonical_attention(q, k, v, **kw)
    assert len(kernel_declined) >= 1, "the call did not go through torch's SDPA"
    assert out.shape == (b, sq, hq, d)
    ref_kw = {n: kw[n] for n in ("window_left", "window_right", "bottom_right", "seqused_k") if n in kw}
    m = kw.get("attn_mask")
    m64 = m if m is None or m.dtype == torch.bool else m.double()
    ref, _ = reference.attention(q.double(), k.double(), v.double(), attn_mask=m64, **ref_kw)
    base = naive_attention(q, k, v, scale=default_scale(d), attn_mask=m, **ref_kw)
    assert_tolerance(f"sdpa route {case}", out, ref, base, dtype)


def test_sdpa_route_gradients_and_varlen(kernel_declined):
    cu = torch.tensor([0, 5, 5, 17], dtype=torch.int32)
    q, k, v = (torch.randn(19, 4, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = pyfastattn.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert len(kernel_declined) == 2  # one SDPA call per non-empty sequence
    ref, _ = reference.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, window_right=0, bottom_right=True)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), g)
    theirs = torch.autograd.grad(ref, (q, k, v), g)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r)


def test_sdpa_route_dropout_is_torchs(kernel_declined):
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    torch.manual_seed(3)
    ours = pyfastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    theirs = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("api", ["attention", "sdpa"])
def test_float64_dropout_keeps_pyfastattns_pattern(api):
    # float64 has no kernel; auto sent its dropout to torch's SDPA, which
    # drops other weights than the Philox pattern the kernels and the
    # reference share: the same seed gave a float64 result unlike the
    # float32 one (off by O(1)), and unlike float64 with return_lse (which
    # runs on the reference). Now float64 dropout runs on the reference.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 16, 2, 16, generator=g) for _ in range(3))

    def run(dtype, **kw):
        qq, kk, vv = (t.to(dtype) for t in (q, k, v))
        torch.manual_seed(0)
        if api == "sdpa":
            return pyfastattn.scaled_dot_product_attention(
                qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), dropout_p=0.5
            ).transpose(1, 2)
        r = pyfastattn.attention(qq, kk, vv, dropout_p=0.5, **kw)
        return r[0] if isinstance(r, tuple) else r

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback note for float64
        o64 = run(torch.float64)
        with pyfastattn.backend("reference"):
            want = run(torch.float64)
        o32 = run(torch.float32)  # the CPU kernel
    assert torch.equal(o64, want)
    assert (o64 - o32.double()).abs().max() < 1e-5
    if api == "attention":
        assert torch.equal(run(torch.float64, return_lse=True), o64)


def test_lse_and_softcap_stay_on_the_reference(kernel_declined):
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8)
    out, lse = pyfastattn.attention(q, k, v, return_lse=True)
    pyfastattn.attention(q, k, v, softcap=5.0)
    assert kernel_declined == [] and lse.shape == (1, 2, 6)


def test_auto_on_cpu_still_runs_the_kernel(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(functional, "_torch_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8)
    pyfastattn.attention(q, k, v, causal=True)
    assert calls == []


def test_ffn_auto_fallback_is_eager_torch_in_the_input_dtype(monkeypatch):
    """Where the fused FFN can't run (an unverified GPU), auto runs the FFN as
    eager torch does (its GEMMs, in the input dtype), not the fp32 reference."""
    from pyfastattn import ffn

    monkeypatch.setattr(ffn, "ffn_unsupported_reason", lambda *a, **k: "the test declines the kernel")
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    w1, w2, w3 = (
        torch.randn(24, 16, dtype=torch.bfloat16),
        torch.randn(16, 24, dtype=torch.bfloat16),
        torch.randn(24, 16, dtype=torch.bfloat16),
    )
    b1 = torch.randn(24, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = pyfastattn.feed_forward(x, w1, b1, w2, activation="gelu")
        yg = pyfastattn.gated_feed_forward(x, w1, w3, w2, activation="silu")
    assert torch.equal(y, F.linear(F.gelu(F.linear(x, w1, b1)), w2))
    assert torch.equal(yg, F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2))
    assert any("eager torch" in str(m.message) for m in w)
    with pyfastattn.backend("reference"):
        assert not torch.equal(pyfastattn.feed_forward(x, w1, b1, w2, activation="gelu"), y)  # fp32 inside


def test_meta_tensors_through_every_entry():
    """Shapes only, as FSDP2 initialises a model under torch.device("meta")."""
    q = torch.randn(2, 4, 9, 16, device="meta")
    out = pyfastattn.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert out.device.type == "meta" and out.shape == (2, 4, 9, 16) and out.is_contiguous()
    assert pyfastattn.attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2)).shape == (
        2,
        9,
        4,
        16,
    )
    with torch.device("meta"):
        mha = pyfastattn.nn.MultiheadAttention(16, 4, batch_first=True)
        enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2)
    pyfastattn.patch(enc)
    x = torch.randn(2, 7, 16, device="meta")
    y, _ = mha(x, x, x, need_weights=False)
    assert y.shape == (2, 7, 16) and y.device.type == "meta"
    z = enc(x, mask=torch.nn.Transformer.generate_square_subsequent_mask(7, device="meta"), is_causal=True)
    assert z.shape == (2, 7, 16) and z.device.type == "meta"
    z.sum().backward()
