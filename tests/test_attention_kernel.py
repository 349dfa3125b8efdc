"""The fused kernel (through torch.ops.pyfastattn.attention_fwd and its
autograd) against the float64 reference, forward and backward, over every
feature and odd sizes. Runs on CPU always and on CUDA where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from pyfastattn import reference

from ._helpers import (
    assert_tolerance,
    default_scale,
    make_qkv,
    max_err,
    naive_attention,
)

# name: (b, sq, sk, hq, hk, d, dv, options)
CASES = {
    "basic": (2, 17, 17, 2, 2, 16, None, {}),
    "causal_top_left": (1, 97, 113, 3, 3, 40, None, dict(window_right=0)),
    "causal_bottom_right_sq_gt_sk": (2, 113, 97, 2, 2, 64, None, dict(window_right=0, bottom_right=True)),
    "window_left_causal_br": (
        1,
        65,
        130,
        2,
        2,
        32,
        None,
        dict(window_left=8, window_right=0, bottom_right=True),
    ),
    "window_both_tl": (2, 64, 64, 2, 2, 24, None, dict(window_left=5, window_right=7)),
    "softcap_gqa_d111": (1, 33, 47, 4, 2, 111, None, dict(softcap=5.0)),
    "mqa_causal": (2, 31, 31, 6, 1, 32, None, dict(window_right=0)),
    "bool_mask_broadcast": (2, 29, 37, 2, 2, 16, None, dict(mask="bool_rows")),
    "additive_mask_per_head": (2, 19, 41, 3, 3, 16, None, dict(mask="additive")),
    "bool_mask_causal_gqa": (1, 40, 40, 4, 2, 32, None, dict(mask="bool_full", window_right=0)),
    "seqused_k": (3, 23, 50, 2, 1, 32, None, dict(seqused=[50, 0, 17])),
    "seqused_k_causal_br": (
        2,
        9,
        50,
        2,
        2,
        32,
        None,
        dict(seqused=[20, 3], window_right=0, bottom_right=True),
    ),
    "dv_ne_d": (2, 21, 26, 2, 2, 48, 24, {}),
    "strided": (2, 30, 44, 4, 2, 32, None, dict(strided=True, window_right=0)),
    "one_by_one": (3, 1, 1, 2, 2, 8, None, {}),
    "sq1_decode": (2, 1, 77, 4, 2, 64, None, dict(window_right=0, bottom_right=True)),
    # CPU decode path over several 256-key tiles (online rescaling), head dims
    # with vector tails (d 40 = 32 + 8, dv 72 = 64 + 8).
    "decode_multi_tile": (2, 1, 700, 4, 2, 40, 72, {}),
    # One query row per kv head (MHA decode) stays on the decode path below
    # 16 MiB of K and V (csrc/ops.cpp, dense_forward_suits_kvcache_kernel),
    # and with a mask at any size.
    "decode_mha_multi_tile": (2, 1, 700, 3, 3, 40, 72, {}),
    "decode_mha_multi_tile_mask": (2, 1, 700, 3, 3, 40, 72, dict(mask="additive")),
    # Few query rows per kv head: the forward runs on the KV-cache kernel
    # (split-KV chunks of >= 512 keys merged by their LSE), the backward on
    # the tiled one. Top-left causal with sq < sk, windows, softcap, empty
    # sequences, MQA over several chunks, strided inputs, MHA decode > 16 MiB.
    "few_rows_gqa_softcap_causal_tl": (2, 3, 150, 8, 2, 72, None, dict(window_right=0, softcap=4.0)),
    "few_rows_window_br_seqused": (
        3,
        5,
        600,
        4,
        4,
        40,
        24,
        dict(window_left=33, window_right=2, bottom_right=True, seqused=[600, 0, 131]),
    ),  # fmt: skip
    "few_rows_mqa_chunks_strided": (2, 2, 1100, 16, 1, 64, None, dict(strided=True)),
    "decode_mha_over_16mib": (1, 1, 16400, 4, 4, 64, None, {}),
    "no_keys": (2, 5, 0, 2, 2, 16, None, {}),
    "hd256": (1, 33, 35, 2, 2, 256, None, dict(window_right=0)),
    "long_odd": (1, 1025, 1023, 2, 1, 64, None, dict(window_right=0, bottom_right=True)),
    # The forward's diagonal tiles (GemmArgs::diag): one key tile of up to
    # 256 keys whose products skip or stop at the causal diagonal, here with
    # a fully seen part before the triangle (bottom-right offset 401), a
    # partial last query block, GQA and head-dim tails; and a right window
    # without causal, which has the same shape of rows.
    "causal_diag_tiles_gqa": (1, 300, 701, 4, 2, 72, None, dict(window_right=0, bottom_right=True)),
    "window_right_diag_tiles": (2, 200, 300, 2, 2, 40, None, dict(window_right=37)),
    # One kv head and more than 8 key blocks: the CPU backward takes its
    # two-pass path (the cases above with several kv heads take the one-pass
    # path, several of them with more than one key-block chunk).
    "two_pass_cpu_bwd": (1, 600, 600, 1, 1, 32, None, {}),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mask(kind, b, hq, sq, sk, dtype, device):
    if kind == "bool_rows":  # (1, 1, sq, sk); rows 0 and 3 see nothing
        m = torch.rand(1, 1, sq, sk, device=device) > 0.3
        m[..., 0, :] = False
        m[..., 3, :] = False
        return m
    if kind == "bool_full":
        return torch.rand(b, hq, sq, sk, device=device) > 0.5
    if kind == "additive":  # (b, hq, 1, sk) with some -inf
        m = torch.randn(b, hq, 1, sk, device=device).to(dtype)
        m[..., ::5] = float("-inf")
        return m
    raise AssertionError(kind)


def _run_case(case, dtype, device, backward=True):
    b, sq, sk, hq, hk, d, dv, opt = CASES[case]
    opt = dict(opt)
    q, k, v = make_qkv(
        b, sq, sk, hq, hk, d, dv, dtype=dtype, device=device, strided=opt.pop("strided", False)
    )
    mask = _mask(opt.pop("mask"), b, hq, sq, sk, dtype, device) if "mask" in opt else None
    used = opt.pop("seqused", None)
    used = None if used is None else torch.tensor(used, dtype=torch.int32, device=device)
    scale = default_scale(d)
    kw = dict(
        softcap=opt.get("softcap", 0.0),
        window_left=opt.get("window_left", -1),
        window_right=opt.get("window_right", -1),
        bottom_right=opt.get("bottom_right", False),
    )

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.pyfastattn.attention_fwd(
        *leaves,
        mask,
        None,
        None,
        used,
        sq,
        sk,
        scale,
        kw["softcap"],
        kw["window_left"],
        kw["window_right"],
        kw["bottom_right"],
    )

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_mask = None if mask is None or mask.dtype == torch.bool else mask.double()
    ref_mask = mask if ref_mask is None else ref_mask
    ref_out, ref_lse = reference.attention(*ref_leaves, scale=scale, attn_mask=ref_mask, seqused_k=used, **kw)

    base_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    base_out = naive_attention(*base_leaves, scale=scale, attn_mask=mask, seqused_k=used, **kw)

    assert_tolerance(f"{case}/{dtype}/out", out, ref_out, base_out, dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse -inf pattern differs"
    lse_tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert max_err(lse, ref_lse) <= lse_tol * (
        1 + ref_lse[torch.isfinite(ref_lse)].abs().max().item() if torch.isfinite(ref_lse).any() else 1.0
    )
    if not backward:
        return
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    base_grads = torch.autograd.grad(base_out, base_leaves, dout)
    for name, g, rg, bg in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert not torch.isnan(g).any(), f"{case}/{dtype}/{name} has NaN"
        assert_tolerance(f"{case}/{dtype}/{name}", g, rg, bg, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_kernel_matches_reference(case, dtype, poison):
    _run_case(case, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][5] <= 256 and CASES[c][6] is None])
def test_cuda_kernel_forward_matches_reference(case, dtype, poison):
    _run_case(case, dtype, "cuda", backward=False)


def _varlen_inputs(lens_q, lens_k, hq, hk, d, dtype, device, tail=0):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q) + tail, hq, d, dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    return q, k, v, cu_q, cu_k


VARLEN = {
    "plain": dict(lens_q=[5, 0, 17, 64, 1], lens_k=[7, 3, 0, 64, 9]),
    "causal_br_gqa": dict(lens_q=[13, 40, 1, 8], lens_k=[13, 50, 30, 3], hq=4, hk=2, window_right=0),
    "window_softcap_used": dict(
        lens_q=[20, 33], lens_k=[40, 33], window_left=6, window_right=2, softcap=3.0, seqused=[25, 0]
    ),
    "tail_rows": dict(lens_q=[3, 9], lens_k=[4, 9], tail=5),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", list(VARLEN))
def test_cpu_kernel_varlen(case, dtype, poison):
    _run_varlen(case, dtype, "cpu", backward=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", list(VARLEN))
def test_cuda_kernel_varlen(case, dtype, poison):
    _run_varlen(case, dtype, "cuda", backward=False)


def _run_varlen(case, dtype, device, backward):
    c = dict(VARLEN[case])
    hq, hk, d = c.get("hq", 2), c.get("hk", 2), 32
    q, k, v, cu_q, cu_k = _varlen_inputs(c["lens_q"], c["lens_k"], hq, hk, d, dtype, device, c.get("tail", 0))
    used = c.get("seqused")
    used = None if used is None else torch.tensor(used, dtype=torch.int32, device=device)
    kw = dict(
        softcap=c.get("softcap", 0.0),
        window_left=c.get("window_left", -1),
        window_right=c.get("window_right", -1),
        bottom_right=True,
    )
    scale = default_scale(d)
    max_q, max_k = max(c["lens_q"]), max(c["lens_k"])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.pyfastattn.attention_fwd(
        *leaves,
        None,
        cu_q,
        cu_k,
        used,
        max_q,
        max_k,
        scale,
        kw["softcap"],
        kw["window_left"],
        kw["window_right"],
        True,
    )
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.attention(
        *ref_leaves, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used, **kw
    )
    # plain-torch baseline in the low precision, one sequence at a time
    base = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        u = None if used is None else used[i : i + 1]
        base.append(
            naive_attention(
                q[cq[i] : cq[i + 1]][None],
                k[ck[i] : ck[i + 1]][None],
                v[ck[i] : ck[i + 1]][None],
                scale=scale,
                seqused_k=u,
                **kw,
            )[0]
        )
    base.append(torch.zeros(q.shape[0] - cq[-1], hq, d, dtype=dtype, device=device))
    base = torch.cat(base)
    assert_tolerance(f"varlen {case}/{dtype}/out", out, ref_out, base, dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    if finite.any():
        assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 2e-3
    if backward:
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
        ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
        for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
            # No per-sequence low-precision baseline for gradients here; the
            # bound is the rounding floor plus a dtype-scaled margin.
            eps = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
            err = max_err(g, rg)
            bound = eps * (1 + rg.abs().max().item())
            assert err <= bound, f"varlen {case}/{dtype}/{name}: {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("shape", [(2, 77, 91, 4, 2), (1, 3, 2100, 8, 2)], ids=["tiled", "few_rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_cpu_kernel_deterministic(dtype, shape):
    b, sq, sk, hq, hk = shape
    q, k, v = make_qkv(b, sq, sk, hq, hk, 40, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    results = []
    # 3: more workers than this machine has cores, tasks taken in another interleaving.
    for threads in (1, 2, 3, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out, lse = torch.ops.pyfastattn.attention_fwd(
                *leaves, None, None, None, None, sq, sk, 0.2, 0.0, -1, 0, True
            )
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        finally:
            torch.set_num_threads(old)
        results.append((out, lse, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), "results differ between runs / thread counts"


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_cpu_kernel_fallback_paths(isa):
    """Every CPU path (capped with PYFASTATTN_CPU_ISA, read once per process,
    hence a subprocess) passes the same cases: a CPU without AVX512-BF16,
    AVX-512 or AVX2 must still get right answers."""
    import os
    import subprocess
    import sys

    cases = (
        "basic or softcap_gqa_d111 or bool_mask_broadcast or causal_bottom_right_sq_gt_sk or dv_ne_d or seqused_k"
        " or two_pass_cpu_bwd or decode_multi_tile or decode_mha_multi_tile or few_rows_gqa_softcap_causal_tl"
        " or decode_mha_multi_tile_mask or causal_diag_tiles_gqa or window_right_diag_tiles"
    )
    env = {**os.environ, "PYFASTATTN_CPU_ISA": isa}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"{__file__}::test_cpu_kernel_matches_reference",
         "-k", cases],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


_KV_PACK_CHILD = r"""
import sys, torch
torch.manual_seed(0)
res = []
# (b, sq, sk, hq, hk, d, window_left, window_right, bottom_right, seqused_k):
# PYFASTATTN_CPU_KV_PACK=always packs K and V in every case, "off" in none, and
# the default "on" where the query blocks read each key kMinReads times or
# more (attention_fwd.cpp).
cases = [
    (2, 517, 517, 4, 2, 72, -1, 0, False, None),     # causal, odd keys, bf16 pairs end mid-pair
    (1, 300, 645, 8, 2, 64, 37, 0, True, None),      # sliding window: tiles start at odd keys
    (2, 400, 401, 8, 2, 40, -1, -1, False, [401, 333]),  # seqused_k: an odd key count per sequence
    (1, 700, 700, 2, 2, 128, -1, 0, True, None),
    (1, 384, 384, 8, 1, 17, 100, 3, False, None),    # odd head dim, two-sided window
]
for b, sq, sk, hq, hk, d, wl, wr, br, used in cases:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = torch.randn(b, sq, hq, d).to(dtype)
        k = torch.randn(b, sk, hk, d).to(dtype)
        v = torch.randn(b, sk, hk, d).to(dtype)
        u = None if used is None else torch.tensor(used, dtype=torch.int32)
        out, lse = torch.ops.pyfastattn.attention_fwd(q, k, v, None, None, None, u, sq, sk, d ** -0.5, 0.0, wl, wr, br)
        res.append((out, lse))
torch.save(res, sys.argv[1])
"""


def test_cpu_forward_kv_pack_matches_per_tile_copies(tmp_path):
    """The forward's K/V pack (csrc/cpu/attention_fwd.cpp, kv_pack_at) holds
    exactly what the per-tile copies hold: the same bits with
    PYFASTATTN_CPU_KV_PACK=always (every case packed), the default rule and
    off (read once per process, hence subprocesses),
    at causal and window edges, odd key counts (VNNI pairs of bf16) and odd
    head dims."""
    import os
    import subprocess
    import sys

    outs = {}
    for mode in ("always", "on", "off"):
        path = tmp_path / f"{mode}.pt"
        env = {**os.environ, "PYFASTATTN_CPU_KV_PACK": mode}
        r = subprocess.run(
            [sys.executable, "-c", "import pyfastattn\n" + _KV_PACK_CHILD, str(path)],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        outs[mode] = torch.load(path)
    assert len(outs["always"]) == len(outs["on"]) == len(outs["off"]) == 15
    for mode in ("always", "on"):
        for i, ((o1, l1), (o2, l2)) in enumerate(zip(outs[mode], outs["off"])):
            assert not torch.isnan(o1).any(), f"{mode}, case {i}: NaN in the output"
            assert torch.equal(o1, o2) and torch.equal(l1, l2), (
                f"{mode}, case {i}: packed and per-tile results differ"
            )


@pytest.mark.parametrize(
    "shape, bhsd, routed",
    [
        ((2, 1, 300, 8, 2, 64), False, True),
        ((2, 1, 300, 8, 2, 64), True, True),  # GQA: either layout
        ((1, 6, 700, 4, 1, 40), False, True),
        ((2, 16, 300, 4, 4, 64), False, False),
        ((1, 1, 300, 4, 4, 64), False, False),
        # MHA decode over 16 MiB: (B, S, H, D) yes, each head's rows contiguous
        # ((B, H, S, D) storage, as the SDPA drop-in passes it) no.
        ((1, 1, 16400, 4, 4, 64), False, True),
        ((1, 1, 16400, 4, 4, 64), True, False),
    ],
)
def test_cpu_few_query_rows_take_the_kvcache_kernel(shape, bhsd, routed):
    """Which dense forwards run on the KV-cache kernel (csrc/ops.cpp,
    dense_forward_suits_kvcache_kernel): the same bits as
    attention_kvcache_fwd on the same tensors when routed, and not when the
    tiled / decode path runs (in fp32: in bf16 the two paths often round to
    the same bits, so a bf16 case could not tell them apart). Both must match
    the reference (test_cpu_kernel_matches_reference's few_rows_* and
    decode_mha_* cases)."""
    b, sq, sk, hq, hk, d = shape
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, dtype=torch.float32)
    if bhsd:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    scale = default_scale(d)
    out, lse = torch.ops.pyfastattn.attention_fwd(
        q, k, v, None, None, None, None, sq, sk, scale, 0.0, -1, 0, True
    )
    seqlens = torch.full((b,), sk, dtype=torch.int32)
    kv_out, kv_lse = torch.ops.pyfastattn.attention_kvcache_fwd(
        q,
        k.clone(),
        v.clone(),
        None,
        None,
        seqlens,
        None,
        None,
        None,
        None,
        None,
        True,
        scale,
        0.0,
        -1,
        0,
        0,
        None,
    )
    same = torch.equal(out, kv_out) and torch.equal(lse, kv_lse)
    assert same == routed, (shape, routed, (out - kv_out).abs().max().item())
