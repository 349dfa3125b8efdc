"""The reference itself, checked against independent formulations: torch's
own SDPA math in float64, and explicit per-row loops for the window rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyfastattn import reference


def test_reference_matches_torch_sdpa_with_masks():
    q, k, v = (torch.randn(2, 3, 13, 8, dtype=torch.float64) for _ in range(3))
    m = torch.rand(2, 1, 13, 13) > 0.4
    m[..., 0] = True  # torch's math path returns NaN-free output only for rows with a visible key
    ours, _ = reference.attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, window_right=0
    )
    theirs = F.scaled_dot_product_attention(
        q, k, v, attn_mask=m & torch.ones(13, 13, dtype=torch.bool).tril()
    )
    torch.testing.assert_close(ours.transpose(1, 2), theirs)


@pytest.mark.parametrize(
    "sq, sk, wl, wr, br",
    [
        (5, 9, -1, 0, True),
        (9, 5, -1, 0, True),
        (7, 7, 2, 1, False),
        (6, 10, 3, 0, True),
        (10, 6, -1, 2, False),
    ],
)
def test_reference_window_rule_by_loops(sq, sk, wl, wr, br):
    q, k, v = (
        torch.randn(1, sq, 1, 4, dtype=torch.float64),
        torch.randn(1, sk, 1, 4, dtype=torch.float64),
        torch.randn(1, sk, 1, 4, dtype=torch.float64),
    )
    out, lse = reference.attention(q, k, v, scale=0.5, window_left=wl, window_right=wr, bottom_right=br)
    off = sk - sq if br else 0
    for i in range(sq):
        keys = [j for j in range(sk) if (wl < 0 or j >= i + off - wl) and (wr < 0 or j <= i + off + wr)]
        if not keys:
            assert torch.all(out[0, i] == 0) and torch.isneginf(lse[0, 0, i])
            continue
        s = (k[0, keys, 0] @ q[0, i, 0]) * 0.5
        p = torch.softmax(s, 0)
        torch.testing.assert_close(out[0, i, 0], p @ v[0, keys, 0])
        torch.testing.assert_close(lse[0, 0, i], torch.logsumexp(s, 0))


def test_reference_softcap_and_seqused():
    q, k, v = (torch.randn(2, 4, 1, 8, dtype=torch.float64) for _ in range(3))
    used = torch.tensor([2, 4], dtype=torch.int32)
    out, _ = reference.attention(q, k, v, scale=1.0, softcap=1.5, seqused_k=used)
    for b, n in enumerate(used.tolist()):
        s = q[b, :, 0] @ k[b, :n, 0].T
        p = torch.softmax(1.5 * torch.tanh(s / 1.5), -1)
        torch.testing.assert_close(out[b, :, 0], p @ v[b, :n, 0])


@pytest.mark.parametrize(
    "activation, module",
    [
        ("gelu", torch.nn.GELU()),
        ("gelu_tanh", torch.nn.GELU("tanh")),
        ("relu", torch.nn.ReLU()),
        ("silu", torch.nn.SiLU()),
    ],
)
def test_reference_ffn_matches_torch_modules(activation, module):
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    l1, l2 = torch.nn.Linear(16, 40).double(), torch.nn.Linear(40, 16).double()
    torch.testing.assert_close(
        reference.feed_forward(x, l1.weight, l1.bias, l2.weight, l2.bias, activation), l2(module(l1(x)))
    )
    g, u, d = (
        torch.nn.Linear(16, 40, bias=False).double(),
        torch.nn.Linear(16, 40, bias=False).double(),
        torch.nn.Linear(40, 16, bias=False).double(),
    )
    torch.testing.assert_close(
        reference.gated_feed_forward(x, g.weight, u.weight, d.weight, activation=activation),
        d(module(g(x)) * u(x)),
    )
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.feed_forward(x, l1.weight, l1.bias, l2.weight, l2.bias, "tanh")
