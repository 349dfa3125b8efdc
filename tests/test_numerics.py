"""Numerical edge cases, determinism, threads, and resource use of the fused
CPU path (issue: reliability). GPU variants live in tests/test_gpu.py."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import pyfastattn
from pyfastattn import reference

from ._helpers import assert_tolerance, make_qkv, max_err, naive_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ids = lambda t: str(t).split(".")[-1]  # noqa: E731


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_large_scores_do_not_overflow(dtype, poison):
    # |scores| ~ 1e4: exp must be taken after subtracting the running max.
    q, k, v = make_qkv(1, 33, 47, 2, 2, 64, dtype=dtype)
    q = (q.float() * 40).to(dtype)
    k = (k.float() * 40).to(dtype)
    scale = 1 / 8
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()).abs().max().item() * scale
    assert s > 5e3, s
    with pyfastattn.backend("kernel"):
        out, lse = pyfastattn.attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), window_right=0, bottom_right=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    base = naive_attention(q, k, v, scale=scale, window_right=0, bottom_right=True)
    assert_tolerance("out", out, ref, base, dtype)
    assert max_err(lse, ref_lse) <= 1e-5 * ref_lse.abs().max().item() + 1e-3


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_the_reference(where, bad):
    q, k, v = make_qkv(1, 9, 9, 1, 1, 16)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 3, 0, 5] = bad
    with pyfastattn.backend("kernel"):
        out = pyfastattn.attention(q, k, v)
    ref, _ = reference.attention(q.double(), k.double(), v.double())
    # which rows become NaN (or inf) must match; finite rows must agree
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (torch.isnan(out).sum(), torch.isnan(ref).sum())
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin)
    if fin.any():
        assert (out[fin].double() - ref[fin]).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_scale_zero_is_a_uniform_average(dtype):
    q, k, v = make_qkv(2, 7, 5, 2, 2, 16, dtype=dtype)
    with pyfastattn.backend("kernel"):
        out = pyfastattn.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.0, is_causal=True
        ).transpose(1, 2)
    # top-left causal: row i averages keys 0..i
    expect = torch.stack([v[:, : i + 1].double().mean(1) for i in range(7)], 1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (out.double() - expect).abs().max() < tol


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_single_key_and_fully_masked_rows(dtype, poison):
    q, k, v = make_qkv(2, 6, 1, 2, 2, 32, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_()
    with pyfastattn.backend("kernel"):
        out, lse = pyfastattn.attention(q, k, v, causal=True, return_lse=True)  # Sq > Sk, bottom-right
    assert torch.all(out[:, :5] == 0) and torch.all(torch.isneginf(lse[..., :5]))
    torch.testing.assert_close(out[:, 5], v[:, 0].expand_as(out[:, 5]))
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][:, :5] == 0)


def test_forward_is_bit_identical_across_runs():
    q, k, v = make_qkv(2, 129, 131, 4, 2, 64, dtype=torch.bfloat16)
    with pyfastattn.backend("kernel"):
        outs = [pyfastattn.attention(q, k, v, causal=True, return_lse=True) for _ in range(5)]
    for o, lse in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(lse, outs[0][1])


def test_concurrent_python_threads_are_correct():
    inputs = [make_qkv(1, 70 + i, 90, 2, 1, 32) for i in range(6)]
    expected = [pyfastattn.attention(*x, causal=True) for x in inputs]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = pyfastattn.attention(*inputs[i], causal=True)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for i, e in enumerate(expected):
        assert torch.equal(results[i], e)


def _run_py(code: str, timeout=300) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_rss_stays_flat_over_10000_calls():
    out = _run_py(
        """
        import resource, torch, pyfastattn
        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize() / 2**20
        q, k, v = (torch.randn(1, 16, 2, 32, requires_grad=True) for _ in range(3))
        def step():
            out = pyfastattn.attention(q, k, v, causal=True)
            torch.autograd.grad(out.sum(), (q, k, v))
        for _ in range(500):
            step()
        before = rss_mb()
        for _ in range(10_000):
            step()
        print(before, rss_mb())
        """
    )
    before, after = map(float, out.split())
    assert after - before < 20, f"RSS grew from {before:.1f} MiB to {after:.1f} MiB over 10,000 fwd+bwd calls"


def test_peak_memory_is_linear_in_sequence_length():
    # S = 16384, one head, fp32: an S x S score matrix alone would be 1 GiB.
    out = _run_py(
        """
        import resource, torch, pyfastattn
        torch.set_num_threads(2)
        q, k, v = (torch.randn(1, 16384, 1, 64) for _ in range(3))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pyfastattn.backend("kernel"):
            out = pyfastattn.attention(q, k, v, causal=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) / 1024)
        """,
        timeout=600,
    )
    extra_mib = float(out)
    s2_mib = 16384**2 * 4 / 2**20
    assert extra_mib < 64, (
        f"fused forward used {extra_mib:.0f} MiB extra (S^2 scores would be {s2_mib:.0f} MiB)"
    )


def test_scale_default_matches_head_dim():
    q, k, v = make_qkv(1, 5, 5, 1, 1, 48)
    a = pyfastattn.attention(q, k, v)
    b = pyfastattn.attention(q, k, v, softmax_scale=1 / math.sqrt(48))
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=ids)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_keys_past_seqused_k_are_never_read(varlen, dtype, mode):
    # FlashAttention's contract: keys past seqused_k may hold anything (a
    # padded batch, a cache from torch.empty). NaN and inf there must reach
    # neither the output nor the gradients on any path: the kernel, torch's
    # SDPA route (float64 under auto) and the reference.
    used = torch.tensor([3, 7], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, h, 16, generator=g, dtype=dtype) for n, h in ((5, 4), (9, 2), (9, 2)))
    if varlen:
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        cu = dict(cu_seqlens_q=torch.tensor([0, 5, 10], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 9, 18], dtype=torch.int32), max_seqlen_q=5, max_seqlen_k=9)  # fmt: skip
    else:
        cu = {}
    past = torch.arange(9) >= used.view(2, 1)  # (2, 9): keys not read
    past = past.flatten() if varlen else past

    def run(fill):
        kk, vv = k.clone(), v.clone()
        kk[past], vv[past] = fill, -fill
        leaves = [t.requires_grad_() for t in (q.clone(), kk, vv)]
        with pyfastattn.backend(mode):
            out = pyfastattn.attention(
                *leaves, seqused_k=used, causal=True, softcap=5.0 if mode == "reference" else 0.0, **cu
            )
        out.backward(torch.ones_like(out))
        return out, *(t.grad for t in leaves)

    clean = run(0.0)
    for fill in (float("nan"), float("inf")):
        got = run(fill)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, clean):
            assert torch.isfinite(a).all(), f"{name}: {fill} past seqused_k reached it"
            torch.testing.assert_close(a, b, msg=name)
        assert torch.equal(got[2][past], torch.zeros_like(got[2][past]))
