"""pyfastattn.flash_attn_interface: FlashAttention 2's public functions with
their argument names, defaults, positions and return conventions, computing
what pyfastattn.attention / attention_with_kvcache compute."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import pyfastattn
from pyfastattn import flash_attn_interface as fai
from pyfastattn import reference

COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
          ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]  # fmt: skip
_ = inspect.Parameter.empty
SIGNATURES = {
    "flash_attn_qkvpacked_func": [("qkv", _)] + COMMON,
    "flash_attn_kvpacked_func": [("q", _), ("kv", _)] + COMMON,
    "flash_attn_func": [("q", _), ("k", _), ("v", _)] + COMMON,
    "flash_attn_varlen_qkvpacked_func": [("qkv", _), ("cu_seqlens", _), ("max_seqlen", _)] + COMMON,
    "flash_attn_varlen_kvpacked_func": [
        ("q", _),
        ("kv", _),
        ("cu_seqlens_q", _),
        ("cu_seqlens_k", _),
        ("max_seqlen_q", _),
        ("max_seqlen_k", _),
    ]
    + COMMON,  # fmt: skip
    "flash_attn_varlen_func": [
        ("q", _),
        ("k", _),
        ("v", _),
        ("cu_seqlens_q", _),
        ("cu_seqlens_k", _),
        ("max_seqlen_q", _),
        ("max_seqlen_k", _),
    ]
    + COMMON
    + [("block_table", None)],  # fmt: skip
    "flash_attn_with_kvcache": [
        ("q", _),
        ("k_cache", _),
        ("v_cache", _),
        ("k", None),
        ("v", None),
        ("rotary_cos", None),
        ("rotary_sin", None),
        ("cache_seqlens", None),
        ("cache_batch_idx", None),
        ("cache_leftpad", None),
        ("block_table", None),
        ("softmax_scale", None),
        ("causal", False),
        ("window_size", (-1, -1)),
        ("softcap", 0.0),
        ("rotary_interleaved", True),
        ("alibi_slopes", None),
        ("num_splits", 0),
        ("return_softmax_lse", False),
    ],  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_flash_attention_2s(name):
    params = list(inspect.signature(getattr(fai, name)).parameters.values())
    got = [(p.name, p.default) for p in params]
    assert got == SIGNATURES[name]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)


def _qkv(b=2, sq=7, sk=9, hq=4, hk=2, d=32, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    t = [
        torch.randn(b, s, h, d, generator=g, dtype=dtype).requires_grad_(grad)
        for s, h in ((sq, hq), (sk, hk), (sk, hk))
    ]
    return t


@pytest.mark.parametrize("causal", [False, True])
def test_dense_functions_agree_with_attention(causal):
    q, k, v = _qkv()
    want, lse = pyfastattn.attention(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(fai.flash_attn_func(q, k, v, 0.0, None, causal), want)
    kv = torch.stack([k, v], 2)
    torch.testing.assert_close(fai.flash_attn_kvpacked_func(q, kv, causal=causal), want)
    out, sl, s_dmask = fai.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    torch.testing.assert_close(out, want)
    assert sl.shape == (2, 4, 7) and sl.dtype == torch.float32 and s_dmask is None
    q2, k2, v2 = _qkv(sq=9, hk=4)
    qkv = torch.stack([q2, k2, v2], 2)
    torch.testing.assert_close(
        fai.flash_attn_qkvpacked_func(qkv, causal=causal), pyfastattn.attention(q2, k2, v2, causal=causal)
    )


def test_lse_of_a_row_without_keys_is_plus_inf():
    # bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key
    q, k, v = _qkv(sq=6, sk=3)
    out, lse, _ = fai.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert (lse[:, :, :3] == math.inf).all() and torch.isfinite(lse[:, :, 3:]).all()
    assert (out[:, :3] == 0).all()


@pytest.mark.parametrize("window", [(-1, 3), (-1, 5), (1, 3), (3, 3), (0, 2), (1, -1), (0, -1), (1, 5)])
def test_windows_are_normalised_as_flash_attention_does(window):
    # FlashAttention 2 normalises window_size with seqlen_k = Sk (max_seqlen_k
    # for varlen) before it masks: mha_fwd / mha_varlen_fwd turn a side >=
    # seqlen_k into -1, then set_params_fprop gives a left-only window the
    # right bound seqlen_k. Both matter only when Sq > Sk: bottom-right, row
    # i's right bound is i + Sk - Sq + right, so (-1, 3) hid keys from the
    # first rows that FlashAttention shows them, and (1, -1) showed keys that
    # it hides. (0, 2) is a control: a side below seqlen_k stays a bound.
    q, k, v = _qkv(b=2, sq=8, sk=3)
    wl, wr = (-1 if w >= 3 else w for w in window)  # Sk = max_seqlen_k = 3
    fa = dict(window_left=wl, window_right=3 if wl >= 0 and wr < 0 else wr)
    want, lse = reference.attention(q.double(), k.double(), v.double(), bottom_right=True, **fa)
    out, sl, _ = fai.flash_attn_func(q, k, v, window_size=window, return_attn_probs=True)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(sl, fai._fa_lse(lse.float()))
    cu_q = torch.tensor([0, 8, 16], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 5], dtype=torch.int32)  # max_seqlen_k 3: the second sequence has 2 keys
    qp, kp, vp = q.flatten(0, 1), k.flatten(0, 1)[:5], v.flatten(0, 1)[:5]
    want, lse = reference.attention(qp.double(), kp.double(), vp.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                    bottom_right=True, **fa)  # fmt: skip
    out, sl, _ = fai.flash_attn_varlen_func(
        qp, kp, vp, cu_q, cu_k, 8, 3, window_size=window, return_attn_probs=True
    )
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(sl, fai._fa_lse(lse.float()))


def test_varlen_functions_agree_with_attention():
    g = torch.Generator().manual_seed(1)
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 15], dtype=torch.int32)
    q = torch.randn(10, 4, 16, generator=g)
    k = torch.randn(15, 2, 16, generator=g)
    v = torch.randn(15, 2, 16, generator=g)
    want = pyfastattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7, max_seqlen_k=8,
                                causal=True)  # fmt: skip
    got = fai.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 8, causal=True)
    torch.testing.assert_close(got, want)
    out, lse, _ = fai.flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), cu_q, cu_k, 7, 8, causal=True,
                                                      return_attn_probs=True)  # fmt: skip
    torch.testing.assert_close(out, want)
    assert lse.shape == (4, 10)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    qkv = torch.randn(9, 3, 2, 16, generator=g)
    want = pyfastattn.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens_q=cu, cu_seqlens_k=cu,
                                max_seqlen_q=5, max_seqlen_k=5)  # fmt: skip
    torch.testing.assert_close(fai.flash_attn_varlen_qkvpacked_func(qkv, cu, 5), want)


def test_varlen_paged_block_table():
    g = torch.Generator().manual_seed(2)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 37], dtype=torch.int32)
    q = torch.randn(5, 2, 16, generator=g)
    kp = torch.randn(6, 16, 2, 16, generator=g)
    vp = torch.randn(6, 16, 2, 16, generator=g)
    bt = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    got = fai.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 3, 20, causal=True, block_table=bt)
    k = torch.cat([torch.cat([kp[4], kp[1]])[:20], torch.cat([kp[0], kp[5]])[:17]])
    v = torch.cat([torch.cat([vp[4], vp[1]])[:20], torch.cat([vp[0], vp[5]])[:17]])
    want = pyfastattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=20,
                                causal=True)  # fmt: skip
    torch.testing.assert_close(got, want)


def test_varlen_paged_block_table_entries_past_a_sequence_are_not_read():
    # As in FlashAttention, only the blocks a sequence's keys occupy are read:
    # the rest of its block-table row may hold padding (-1) or a stale id.
    g = torch.Generator().manual_seed(2)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 7], dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(5, 2, 16, generator=g)
    kp, vp = torch.randn(6, 16, 2, 16, generator=g), torch.randn(6, 16, 2, 16, generator=g)
    bt = torch.tensor([[4, 1, -1], [0, 99, -1]], dtype=torch.int32)  # sequence 1 has 7 keys: block 0 only
    got = fai.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, 3, 20, causal=True, block_table=bt)
    k = torch.cat([torch.cat([kp[4], kp[1]])[:20], kp[0][:7]])
    v = torch.cat([torch.cat([vp[4], vp[1]])[:20], vp[0][:7]])
    want = pyfastattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=20,
                                causal=True)  # fmt: skip
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "which, shape, match",
    [
        ("k", (16, 2, 16), r"k must be a paged cache .* got shape \(16, 2, 16\)"),  # one block, unpaged: was read
        ("v", (16, 2, 16), r"v must be a paged cache .* got shape \(16, 2, 16\)"),  # as blocks of 2 rows
        ("v", (3, 16, 2, 16), r"v.shape\[:3\] .* must equal k.shape\[:3\] \(\(6, 16, 2\)\), got \(3, 16, 2\)"),
        ("v", (6, 8, 2, 16), r"v.shape\[:3\] .* must equal k.shape\[:3\] \(\(6, 16, 2\)\), got \(6, 8, 2\)"),
    ],
    ids=["k-3d", "v-3d", "v-fewer-blocks", "v-other-block-size"],
)  # fmt: skip
def test_varlen_paged_caches_of_the_wrong_shape_are_refused(which, shape, match):
    # With a block table, k and v are (num_blocks, block_size, Hk, D) caches. A
    # 3-D tensor was indexed as blocks of Hk rows (a silent wrong answer), and
    # a v_cache with fewer blocks than k_cache was read as far as the table
    # went (IndexError, or a silent answer when the used blocks fit).
    g = torch.Generator().manual_seed(2)
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 4], dtype=torch.int32)
    q = torch.randn(5, 2, 16, generator=g)
    caches = {"k": torch.randn(6, 16, 2, 16, generator=g), "v": torch.randn(6, 16, 2, 16, generator=g)}
    caches[which] = torch.randn(*shape, generator=g)
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(fai.InvalidArgumentError, match=match):
        fai.flash_attn_varlen_func(q, caches["k"], caches["v"], cu_q, cu_k, 3, 2, block_table=bt)


@pytest.mark.parametrize("softcap", [1e4, 1e30])
def test_large_softcap_forward_and_backward(softcap):
    # The CPU kernels' tanh was accurate to ~1e-7 absolute, so softcap * tanh(s
    # / softcap) was off by ~softcap * 1e-7 (every score 0 at 1e30); the
    # reference's torch.tanh is exact to rounding.
    q, k, v = _qkv(grad=True)
    out = fai.flash_attn_func(q, k, v, causal=True, softcap=softcap)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, _ = reference.attention(q2, k2, v2, softcap=softcap, window_right=0, bottom_right=True)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(g)
    want.backward(g.double())
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=1e-4)


def test_backward_through_flash_attn_func():
    q, k, v = _qkv(grad=True)
    fai.flash_attn_func(q, k, v, causal=True).sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    reference.attention(q2, k2, v2, window_right=0, bottom_right=True)[0].sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_with_kvcache_positional_and_lse():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc, vc = torch.randn(2, 20, 2, 16, generator=g), torch.randn(2, 20, 2, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 16, generator=g), torch.randn(2, 1, 2, 16, generator=g)
    cos, sin = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)
    sl = torch.tensor([3, 0], dtype=torch.int32)
    kc1, vc1 = kc.clone(), vc.clone()
    out, lse = fai.flash_attn_with_kvcache(q, kc1, vc1, k, v, cos, sin, sl, None, None, None, None, True,
                                           return_softmax_lse=True)  # fmt: skip
    want, wlse = pyfastattn.attention_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=sl,
                                                   causal=True, return_lse=True)  # fmt: skip
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, wlse)
    torch.testing.assert_close(kc1, kc)
    assert (
        fai.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=0, return_softmax_lse=True)[1].eq(math.inf).all()
    )


def test_with_kvcache_alibi():
    # ALiBi in the KV-cache call, positionally where FlashAttention has it,
    # against the reference (float64) over the appended cache.
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 4, 16, generator=g)
    kc, vc = torch.randn(2, 20, 2, 16, generator=g), torch.randn(2, 20, 2, 16, generator=g)
    k, v = torch.randn(2, 3, 2, 16, generator=g), torch.randn(2, 3, 2, 16, generator=g)
    sl = torch.tensor([5, 11], dtype=torch.int32)
    slopes = torch.rand(2, 4, generator=g)
    want, wlse = reference.attention_with_kvcache(
        q.double(), kc.double(), vc.double(), k.double(), v.double(), cache_seqlens=sl, window_right=0,
        alibi_slopes=slopes,
    )  # fmt: skip
    out, lse = fai.flash_attn_with_kvcache(q, kc, vc, k, v, None, None, sl, None, None, None, None, True, (-1, -1),
                                           0.0, True, slopes, return_softmax_lse=True)  # fmt: skip
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), wlse, atol=2e-6, rtol=1e-5)


def _weights64(q, k, scale, causal, slopes):
    """Softmax weights (B, Hq, Sq, Sk) in float64, written out here: scores,
    ALiBi (-slope |i + Sk - Sq - j|), bottom-right causal."""
    b, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), kk) * scale
    i = torch.arange(sq).view(-1, 1)
    j = torch.arange(sk).view(1, -1)
    if slopes is not None:
        sl = slopes.double().view(-1 if slopes.dim() == 2 else 1, hq, 1, 1)
        s = s - sl * (i + sk - sq - j).abs()
    if causal:
        s = s.masked_fill(j > i + sk - sq, -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_batch_slopes", [False, True])
def test_dropout_and_alibi_with_attn_probs(causal, per_batch_slopes):
    """dropout_p and alibi_slopes reach pyfastattn.attention; S_dmask is P with
    the dropped elements negated (FlashAttention's convention), and out is the
    reference computed with exactly that pattern."""
    q, k, v = _qkv(sq=13, sk=21)
    slopes = torch.rand(2, 4) if per_batch_slopes else torch.rand(4)
    torch.manual_seed(5)
    out, lse, s_dmask = fai.flash_attn_func(
        q, k, v, 0.3, None, causal, alibi_slopes=slopes, return_attn_probs=True
    )
    torch.manual_seed(5)  # the same (seed, offset) draw: the native call's own pattern
    want, want_lse, keep = pyfastattn.attention(q, k, v, causal=causal, dropout_p=0.3, alibi_slopes=slopes,
                                                return_lse=True, return_dropout_mask=True)  # fmt: skip
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, fai._fa_lse(want_lse))
    assert s_dmask.shape == (2, 4, 13, 21) and s_dmask.dtype == q.dtype
    dropped = torch.signbit(s_dmask)
    assert torch.equal(dropped, ~keep)
    assert 0.15 < dropped.double().mean() < 0.45  # p = 0.3 over 1092 weights
    p = _weights64(q, k, 1 / math.sqrt(32), causal, slopes)
    torch.testing.assert_close(s_dmask.abs().double(), p, atol=1e-6, rtol=1e-5)
    ref, _ = reference.attention(q.double(), k.double(), v.double(), window_right=0 if causal else -1,
                                 bottom_right=True, dropout_p=0.3, dropout_mask=~dropped, alibi_slopes=slopes)  # fmt: skip
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # Without return_attn_probs: out alone, the same pattern under the same seed.
    torch.manual_seed(5)
    torch.testing.assert_close(fai.flash_attn_func(q, k, v, 0.3, None, causal, alibi_slopes=slopes), out)
    # Without dropout, S_dmask is None (FlashAttention returns it only with dropout).
    assert fai.flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True)[2] is None


def test_dropout_gradients_use_the_returned_pattern():
    q, k, v = _qkv(sq=11, sk=11, grad=True)
    slopes = torch.rand(4)
    torch.manual_seed(9)
    s_dmask = fai.flash_attn_func(q, k, v, 0.25, causal=True, alibi_slopes=slopes, return_attn_probs=True)[2]
    torch.manual_seed(9)
    out = fai.flash_attn_func(q, k, v, 0.25, causal=True, alibi_slopes=slopes)
    g = torch.randn_like(out)
    out.backward(g)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(q2, k2, v2, window_right=0, bottom_right=True, dropout_p=0.25,
                                 dropout_mask=~torch.signbit(s_dmask), alibi_slopes=slopes)  # fmt: skip
    ref.backward(g.double())
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-4)


def test_varlen_dropout_and_alibi_with_attn_probs():
    g = torch.Generator().manual_seed(4)
    cu_q = torch.tensor([0, 3, 3, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 7, 17], dtype=torch.int32)
    q = torch.randn(12, 4, 16, generator=g)
    k = torch.randn(17, 2, 16, generator=g)
    v = torch.randn(17, 2, 16, generator=g)
    slopes = torch.rand(3, 4, generator=g)
    torch.manual_seed(11)
    out, lse, s_dmask = fai.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 10, 0.4, causal=True,
                                                   alibi_slopes=slopes, return_attn_probs=True)  # fmt: skip
    assert s_dmask.shape == (3, 4, 9, 10) and lse.shape == (4, 12)
    keep = ~torch.signbit(s_dmask)
    ref, _ = reference.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                 window_right=0, bottom_right=True, dropout_p=0.4, dropout_mask=keep,
                                 alibi_slopes=slopes)  # fmt: skip
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for bi in range(3):  # |S_dmask| of each sequence: its own weights; zero past its lengths
        lq, lk = int(cu_q[bi + 1] - cu_q[bi]), int(cu_k[bi + 1] - cu_k[bi])
        qs, ks = q[cu_q[bi] : cu_q[bi + 1]][None], k[cu_k[bi] : cu_k[bi + 1]][None]
        p = _weights64(qs, ks, 0.25, True, slopes[bi])
        torch.testing.assert_close(s_dmask[bi, :, :lq, :lk].abs().double(), p[0], atol=1e-6, rtol=1e-5)
        assert (s_dmask[bi, :, lq:] == 0).all() and (s_dmask[bi, :, :, lk:] == 0).all()


def test_dropout_and_alibi_bad_input():
    q, k, v = _qkv()
    for p in (-0.1, 1.5):
        with pytest.raises(pyfastattn.InvalidArgumentError, match="dropout_p"):
            fai.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    with pytest.raises(pyfastattn.InvalidArgumentError, match="alibi_slopes"):
        fai.flash_attn_func(q, k, v, alibi_slopes=torch.zeros(3))
    with pytest.raises(pyfastattn.InvalidArgumentError, match="alibi_slopes.dtype"):
        fai.flash_attn_func(q, k, v, alibi_slopes=torch.zeros(4, dtype=torch.float64))
    out = fai.flash_attn_func(q, k, v, dropout_p=1.0)  # p = 1 drops every weight, as torch does
    assert (out == 0).all()
    fai.flash_attn_func(q, k, v, deterministic=True)  # accepted
