"""attention_with_kvcache: the CPU kernel (append, rotary, batch index, left
padding, paged blocks, split-KV) against the pure-PyTorch reference computed
in float64, the caches it writes against the reference's, and bad input
(refused with a message, never a read or write outside a tensor; run in
subprocesses)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import pyfastattn
from pyfastattn import _ops, flash_attn_interface, reference
from tests._helpers import assert_tolerance, naive_attention

pytestmark = pytest.mark.skipif(
    not _ops.has_kernel("attention_kvcache_fwd", "cpu"), reason="no compiled CPU KV-cache kernel"
)


def make_case(
    b=2, sq=1, s_new=1, hq=4, hk=2, d=64, dv=None, cap=80, dtype=torch.float32, block=None, batch_idx=False,
    leftpad=False, rotary=None, rotary_dim=None, seed=0, full=False,
):  # fmt: skip
    """Random caches (contiguous, or paged with a shuffled block table holding
    the same logical rows), new k / v, cache_seqlens that leave room for them."""
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    rows = b + 2 if batch_idx else b
    kc = torch.randn(rows, cap, hk, d, generator=g).to(dtype)
    vc = torch.randn(rows, cap, hk, dv, generator=g).to(dtype)
    q = torch.randn(b, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(b, s_new, hk, d, generator=g).to(dtype) if s_new else None
    v = torch.randn(b, s_new, hk, dv, generator=g).to(dtype) if s_new else None
    hi = cap - s_new
    seqlens = torch.randint(0, hi + 1, (b,), generator=g, dtype=torch.int32)
    if full:
        seqlens[0] = hi
    args = dict(cache_seqlens=seqlens)
    if batch_idx:
        args["cache_batch_idx"] = torch.randperm(rows, generator=g)[:b].to(torch.int32)
    if leftpad:
        args["cache_leftpad"] = (
            (torch.rand(b, generator=g) * (seqlens.float() + 1)).floor().clamp(max=seqlens).to(torch.int32)
        )
    if block is not None:
        assert not batch_idx
        nblk = (cap + block - 1) // block
        num_blocks = b * nblk + 3
        perm = torch.randperm(num_blocks, generator=g)[: b * nblk].to(torch.int32).view(b, nblk)
        pk = torch.randn(num_blocks, block, hk, d, generator=g).to(dtype)
        pv = torch.randn(num_blocks, block, hk, dv, generator=g).to(dtype)
        for bi in range(b):
            for j in range(nblk):
                n = min(block, cap - j * block)
                pk[perm[bi, j], :n] = kc[bi, j * block : j * block + n]
                pv[perm[bi, j], :n] = vc[bi, j * block : j * block + n]
        kc, vc = pk, pv
        args["block_table"] = perm
    if rotary is not None:
        rd = rotary_dim or d
        pos = torch.arange(cap + sq, dtype=torch.float64)[:, None]
        inv = 1.0 / (10000.0 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
        args["rotary_cos"] = torch.cos(pos * inv).to(dtype)
        args["rotary_sin"] = torch.sin(pos * inv).to(dtype)
        args["rotary_interleaved"] = rotary == "interleaved"
    return q, kc, vc, k, v, args


def slopes_for(b, hq, per_batch=False, seed=1):
    """ALiBi slopes as models use them (2^(-8 h / H)), jittered so that heads
    and batch rows differ; fp32 (Hq,) or (B, Hq)."""
    g = torch.Generator().manual_seed(seed)
    base = 2.0 ** (-8.0 * torch.arange(1, hq + 1, dtype=torch.float32) / hq)
    shape = (b, hq) if per_batch else (hq,)
    return base * (0.5 + torch.rand(shape, generator=g))


def truth(q, kc, vc, k, v, args, causal=False, window=(-1, -1), softcap=0.0, scale=None, alibi=None):
    """(out, lse) in float64, and the caches after the append, from the reference."""
    kc, vc = kc.clone(), vc.clone()
    seqlens = args["cache_seqlens"]
    s_new = 0 if k is None else k.shape[1]
    wl, wr = window
    if causal:
        wr = 0
    extra = {n: args.get(n) for n in ("cache_batch_idx", "block_table")}
    rot = {n: args.get(n) for n in ("rotary_cos", "rotary_sin")}
    inter = args.get("rotary_interleaved", True)
    if k is not None:
        reference.kvcache_append_(kc, vc, k, v, seqlens, **extra, **rot, rotary_interleaved=inter)
    if rot["rotary_cos"] is not None:
        pos = reference.kvcache_query_positions(seqlens, q.shape[1], wl >= 0 or wr >= 0)
        q = reference.apply_rotary(q, rot["rotary_cos"], rot["rotary_sin"], pos, inter)
    lp = args.get("cache_leftpad")
    len_k = seqlens.long() + s_new - (0 if lp is None else lp.long())
    kk, vv = reference.kvcache_gather(kc, vc, len_k, cache_leftpad=lp, **extra)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    common = dict(scale=sc, seqused_k=len_k.to(torch.int32), softcap=softcap, window_left=wl, window_right=wr,
                  bottom_right=True)  # fmt: skip
    out, lse = reference.attention(q.double(), kk.double(), vv.double(), alibi_slopes=alibi, **common)
    bias = None
    if alibi is not None:  # plain PyTorch's ALiBi: a bias in q's dtype
        bias = reference.alibi_bias(alibi, q.shape[1], kk.shape[1], len_k, torch.float32).to(q.dtype)
    base = naive_attention(q, kk, vv, attn_mask=bias, **common) if q.dtype != torch.float32 else None
    return out, lse, kc, vc, base


def run(q, kc, vc, k, v, args, **kw):
    return pyfastattn.attention_with_kvcache(q, kc, vc, k, v, **args, return_lse=True, **kw)


def check(name, q, kc, vc, k, v, args, causal=False, window=(-1, -1), softcap=0.0, num_splits=0, alibi=None):
    ref_out, ref_lse, ref_kc, ref_vc, base = truth(
        q, kc, vc, k, v, args, causal, window, softcap, alibi=alibi
    )
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = run(q, kc2, vc2, k, v, args, causal=causal, window_size=window, softcap=softcap,
                   num_splits=num_splits, alibi_slopes=alibi)  # fmt: skip
    assert_tolerance(f"{name} out", out, ref_out, base, q.dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: lse -inf pattern differs"
    assert (lse[~finite] == -math.inf).all() and (out.transpose(1, 2)[~finite] == 0).all()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-4, rtol=1e-5)
    if (
        "rotary_cos" in args
    ):  # the kernel rounds once from fp32, as the reference; FMA contraction may differ by 1 ulp
        torch.testing.assert_close(kc2, ref_kc)
    else:
        assert torch.equal(kc2, ref_kc), f"{name}: k_cache differs from the reference append"
    assert torch.equal(vc2, ref_vc), f"{name}: v_cache differs from the reference append"
    return out, lse


CASES = [
    # name, make_case kwargs, check kwargs
    ("decode", dict(), dict()),
    ("decode_causal_mqa", dict(hq=6, hk=1), dict(causal=True)),
    ("no_append", dict(s_new=0), dict()),
    ("full_cache", dict(full=True, s_new=3, sq=3), dict(causal=True)),
    ("spec_decode_causal", dict(sq=4, s_new=4), dict(causal=True)),
    ("window", dict(sq=3, s_new=3, cap=120), dict(window=(17, 0))),
    ("window_both", dict(sq=5, s_new=2), dict(window=(9, 1))),
    ("softcap", dict(), dict(softcap=5.0)),
    ("batch_idx", dict(batch_idx=True, b=3), dict(causal=True)),
    ("leftpad", dict(leftpad=True, b=3, sq=2, s_new=2), dict(causal=True)),
    ("dv_ne_d", dict(d=40, dv=24, hq=2, hk=2), dict()),
    ("odd_head_dim", dict(d=97, hq=3, hk=3), dict()),
    ("rotary_interleaved", dict(rotary="interleaved"), dict(causal=True)),
    ("rotary_half", dict(rotary="half", sq=3, s_new=3), dict(causal=True)),
    ("rotary_partial_noncausal", dict(rotary="half", rotary_dim=32, sq=2, s_new=2), dict()),
    ("rotary_leftpad", dict(rotary="interleaved", leftpad=True, b=3), dict(causal=True)),
    ("paged16", dict(block=16), dict()),
    ("paged16_causal_gqa", dict(block=16, hq=8, hk=2, sq=3, s_new=3), dict(causal=True)),
    ("paged64_rotary", dict(block=64, cap=200, rotary="half"), dict(causal=True)),
    ("paged_leftpad", dict(block=16, leftpad=True, b=3), dict()),
    ("paged_odd_block", dict(block=24, cap=100), dict(window=(30, 0))),
    # Tasks of 3 of the 6 kv heads (rows per task capped): two head groups.
    ("kv_head_groups", dict(hq=12, hk=6, sq=4, s_new=4), dict(causal=True)),
    # 80 rows per kv head: one kv head per task, above the split limit.
    ("paged_many_rows", dict(block=16, sq=20, s_new=20, hq=8, hk=2, cap=120), dict(causal=True)),
]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("name,mk,ck", CASES, ids=[c[0] for c in CASES])
def test_kvcache_matches_reference(name, mk, ck, dtype):
    q, kc, vc, k, v, args = make_case(dtype=dtype, **mk)
    check(name, q, kc, vc, k, v, args, **ck)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_splits", [0, 1, 3, 7])
@pytest.mark.parametrize("block", [None, 16])
def test_split_kv(dtype, num_splits, block):
    # One sequence, one kv head, a long cache: the automatic split cuts it into
    # chunks of 512 keys; forced splits give chunks of any multiple of 16.
    q, kc, vc, k, v, args = make_case(b=1, hq=4, hk=1, d=64, cap=2100, dtype=dtype, block=block, full=True)
    check(f"split{num_splits}", q, kc, vc, k, v, args, num_splits=num_splits)


def test_split_kv_empty_chunks():
    # A window leaves most chunks of the sequence empty for the query row.
    q, kc, vc, k, v, args = make_case(b=1, hq=2, hk=1, cap=2000, full=True)
    check("split_window", q, kc, vc, k, v, args, window=(100, 0), num_splits=8)


@pytest.mark.parametrize("softcap", [1e4, 1e30])
@pytest.mark.parametrize("sq", [1, 80], ids=["kvcache_kernel", "tiled_kernel"])  # 80 rows per kv head: tiled
def test_large_softcap_is_no_cap(softcap, sq):
    # softcap * tanh(s / softcap) is ~s when softcap >> |s|. The CPU kernels'
    # tanh had an absolute error of ~1e-7, which the softcap scaled up (1e-3 in
    # a score at 1e4); at 1e30 every tanh of the tiny argument was 0, and the
    # softmax uniform.
    q, kc, vc, k, v, args = make_case(sq=sq, s_new=sq, hq=2, hk=1, cap=120)
    check(f"softcap{softcap:g}", q, kc, vc, k, v, args, causal=True, softcap=softcap)


def test_rows_without_keys():
    # cache_seqlens 0 and nothing appended: no key; lse -inf, out 0.
    q, kc, vc, _, _, args = make_case(b=2, s_new=0)
    args["cache_seqlens"] = torch.tensor([0, 5], dtype=torch.int32)
    out, lse = check("empty", q, kc, vc, None, None, args)
    assert (lse[0] == -math.inf).all() and (out[0] == 0).all()


def test_int_cache_seqlens_and_generation_loop():
    # A decode loop: each step appends one token and must equal attention over
    # the concatenation of everything appended so far.
    torch.manual_seed(0)
    b, hq, hk, d, cap = 2, 4, 2, 32, 40
    kc = torch.zeros(b, cap, hk, d)
    vc = torch.zeros(b, cap, hk, d)
    ks, vs = [], []
    for step in range(6):
        q, k, v = torch.randn(b, 1, hq, d), torch.randn(b, 1, hk, d), torch.randn(b, 1, hk, d)
        ks.append(k)
        vs.append(v)
        out = pyfastattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=step, causal=True)
        ref, _ = reference.attention(q, torch.cat(ks, 1), torch.cat(vs, 1), window_right=0, bottom_right=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cache_seqlens_none_attends_whole_cache():
    q, kc, vc, _, _, args = make_case(s_new=0, cap=33)
    out = pyfastattn.attention_with_kvcache(q, kc, vc)
    ref, _ = reference.attention(q, kc, vc, bottom_right=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_deterministic_across_threads():
    q, kc, vc, k, v, args = make_case(b=1, hk=1, cap=3000, dtype=torch.bfloat16, full=True)
    outs = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(run(q, kc.clone(), vc.clone(), k, v, args)[0])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("block", [None, 16])
def test_many_chunks_across_threads(block):
    """A long cache is many chunks (40 here), which each thread claims one
    ahead so that a chunk's last tile can prefetch the next one's first (v20
    in PERF_NOTES.md): with 1, 2 and 3 threads the same bits, and the
    reference's values."""
    q, kc, vc, k, v, args = make_case(
        b=1, hq=8, hk=2, cap=20000, dtype=torch.bfloat16, block=block, full=True
    )
    outs = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(run(q, kc.clone(), vc.clone(), k, v, args))
    finally:
        torch.set_num_threads(old)
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
    check("many_chunks", q, kc, vc, k, v, args)


@pytest.mark.parametrize(
    "mk",
    [
        dict(b=1, hq=8, hk=8, cap=300),  # MHA decode, one chunk: kv heads split over the threads
        dict(b=1, hq=32, hk=8, cap=700, d=40, dv=72),  # GQA decode, two chunks
        dict(b=2, hq=12, hk=12, cap=200, block=16),  # paged, 12 kv heads: groups of 6, 4, 3, 2, 1
        dict(b=1, sq=3, s_new=3, hq=16, hk=4, cap=90),  # a few rows per kv head
    ],
    ids=["mha_one_chunk", "gqa_two_chunks", "paged_12_heads", "three_rows"],
)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_deterministic_across_threads_with_few_tasks(mk, dtype):
    """With fewer (sequence, chunk) tasks than threads the kernel splits each
    task's kv heads into smaller groups (attention_kvcache.cpp,
    heads_for_threads): the same bits for 1, 2, 3 and 5 threads, and the
    reference's values."""
    q, kc, vc, k, v, args = make_case(dtype=dtype, full=True, **mk)
    outs = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            out, lse = run(q, kc.clone(), vc.clone(), k, v, args)
            outs.append((out, lse))
    finally:
        torch.set_num_threads(old)
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
    check("few_tasks", q, kc, vc, k, v, args)


@pytest.mark.parametrize(
    "mk",
    [
        dict(b=2, hq=8, hk=8, cap=300),  # MHA decode
        dict(b=2, hq=8, hk=2, cap=700, d=40, dv=72),  # GQA, two chunks, odd head dims
        dict(b=3, sq=2, s_new=2, hq=6, hk=3, cap=90, batch_idx=True, rotary="interleaved"),
        dict(b=2, hq=4, hk=4, cap=120, leftpad=True),
    ],
    ids=["mha", "gqa_chunks", "batch_idx_rotary", "leftpad"],
)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_head_contiguous_cache(mk, dtype):
    """A cache whose kv heads each hold contiguous rows (a (B, H, S, D)
    buffer seen as (B, S, H, D), as Hugging Face's StaticCache hands it over)
    takes one kv head per task (attention_kvcache.cpp, heads_per_task): the
    reference's values (outputs by the 2x rule, lse within 2e-4), the append
    written in place, and the lse of the (B, S, H, D) cache within 1e-5."""
    q, kc, vc, k, v, args = make_case(dtype=dtype, **mk)
    kh = kc.transpose(1, 2).contiguous().transpose(1, 2)
    vh = vc.transpose(1, 2).contiguous().transpose(1, 2)
    assert kh.stride(2) > kh.stride(1) and torch.equal(kh, kc)
    _, lse_h = check("head_contiguous", q, kh, vh, k, v, args)
    _, lse_s = check("row_interleaved", q, kc, vc, k, v, args)
    torch.testing.assert_close(lse_h, lse_s, atol=1e-5, rtol=1e-5)


ALIBI_CASES = [
    # name, make_case kwargs, check kwargs, slopes per batch row
    ("decode_gqa", dict(hq=8, hk=2), dict(), False),
    ("decode_per_batch", dict(b=3, hq=4, hk=1), dict(), True),
    ("spec_decode_causal", dict(sq=4, s_new=4), dict(causal=True), True),
    ("window_softcap", dict(sq=3, s_new=3, cap=120), dict(window=(17, 0), softcap=5.0), False),
    ("batch_idx", dict(batch_idx=True, b=3), dict(causal=True), True),
    ("leftpad", dict(leftpad=True, b=3, sq=2, s_new=2), dict(causal=True), True),
    ("paged16_gqa", dict(block=16, hq=8, hk=2, sq=3, s_new=3), dict(causal=True), False),
    ("paged_leftpad_rotary", dict(block=16, leftpad=True, b=3, rotary="half"), dict(), True),
    ("odd_head_dim", dict(d=97, hq=3, hk=3), dict(), False),
    ("no_append", dict(s_new=0), dict(), False),
]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("name,mk,ck,per_batch", ALIBI_CASES, ids=[c[0] for c in ALIBI_CASES])
def test_alibi_matches_reference(name, mk, ck, per_batch, dtype):
    q, kc, vc, k, v, args = make_case(dtype=dtype, **mk)
    alibi = slopes_for(q.shape[0], q.shape[2], per_batch)
    check(f"alibi_{name}", q, kc, vc, k, v, args, alibi=alibi, **ck)


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("block", [None, 16])
def test_alibi_split_kv(num_splits, block):
    # Chunks of one sequence each carry the bias of their own key positions:
    # the merge must give the unsplit result.
    q, kc, vc, k, v, args = make_case(
        b=1, hq=4, hk=1, d=64, cap=2100, dtype=torch.bfloat16, block=block, full=True
    )
    alibi = slopes_for(1, 4) * 0.05  # a bias that leaves far keys some weight
    check(f"alibi_split{num_splits}", q, kc, vc, k, v, args, num_splits=num_splits, alibi=alibi)


@pytest.mark.parametrize("leftpad", [False, True])
def test_alibi_prefill_into_cache(leftpad):
    # Many query rows: the tiled kernel attends over the cache, with the same bias.
    q, kc, vc, k, v, args = make_case(
        b=2, sq=40, s_new=40, hq=4, hk=2, cap=120, dtype=torch.bfloat16, leftpad=leftpad
    )
    check("alibi_prefill", q, kc, vc, k, v, args, causal=True, alibi=slopes_for(2, 4, per_batch=True))


def test_alibi_reference_backend_matches_kernel():
    q, kc, vc, k, v, args = make_case(block=16, leftpad=True, b=3, sq=2, s_new=2)
    alibi = slopes_for(3, 4)
    out1 = pyfastattn.attention_with_kvcache(
        q, kc.clone(), vc.clone(), k, v, **args, causal=True, alibi_slopes=alibi
    )
    with pyfastattn.backend("reference"):
        out2 = pyfastattn.attention_with_kvcache(
            q, kc.clone(), vc.clone(), k, v, **args, causal=True, alibi_slopes=alibi
        )
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "slopes,match",
    [
        (torch.ones(4, dtype=torch.float64), "alibi_slopes.dtype must be torch.float32"),
        (torch.ones(5), r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
        (torch.ones(3, 4), r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
        (torch.ones(4, device="meta"), "alibi_slopes.device must equal q.device"),
    ],
    ids=["dtype", "shape", "batch", "device"],
)
def test_alibi_bad_slopes(slopes, match):
    q, kc, vc, k, v, args = make_case()
    kc0, vc0 = kc.clone(), vc.clone()
    with pytest.raises(pyfastattn.InvalidArgumentError, match=match):
        pyfastattn.attention_with_kvcache(q, kc, vc, k, v, **args, alibi_slopes=slopes)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0), "a refused call wrote into the cache"


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
def test_append_into_an_overlapping_cache_is_refused(which):
    """A cache made with expand() (a stride-0 batch dim) would have both
    sequences' new keys land in one slot, which the other then reads: an
    error naming the cache, before anything is written. Without new k / v
    (reading only) such a cache is fine."""
    q, kc, vc, k, v, args = make_case()
    shared_k, shared_v = kc[:1].expand_as(kc), vc[:1].expand_as(vc)
    kc_in, vc_in = (shared_k, vc) if which == "k_cache" else (kc, shared_v)
    before_k, before_v = kc_in.clone(), vc_in.clone()
    for backend in ("auto", "reference"):  # the kernel path and the PyTorch one
        with (
            pyfastattn.backend(backend),
            pytest.raises(pyfastattn.InvalidArgumentError, match=f"{which} must not overlap itself"),
        ):
            pyfastattn.attention_with_kvcache(q, kc_in, vc_in, k, v, **args)
        assert torch.equal(kc_in, before_k) and torch.equal(vc_in, before_v), (
            "a refused call wrote into the cache"
        )
    out = pyfastattn.attention_with_kvcache(q, shared_k, shared_v, **args)
    with pyfastattn.backend("reference"):
        ref = pyfastattn.attention_with_kvcache(q, shared_k, shared_v, **args)
    assert_tolerance("read-only overlapping cache", out, ref.double(), None, torch.float32)


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("layout", ["plain", "paged_rotary_lse"])
def test_inputs_that_require_grad_give_outputs_without_a_graph(layout, mode):
    """Not differentiable, alike on every path: q / k / v that require grad
    (a model's projections called without torch.no_grad) give the same
    outputs with no autograd graph, as the PyTorch path and FlashAttention's
    flash_attn_with_kvcache do. The kernel path used to carry torch's fallback
    node, whose backward gave no gradients, with a deprecation warning."""
    if layout == "plain":  # the small-call fast path
        q, kc, vc, k, v, args = make_case()
        extra = {}
    else:  # the Python path
        q, kc, vc, k, v, args = make_case(block=16, rotary="half", sq=2, s_new=2)
        extra = dict(causal=True, return_lse=True)
    kc2, vc2 = kc.clone(), vc.clone()
    with pyfastattn.backend(mode):
        with torch.no_grad():
            want = pyfastattn.attention_with_kvcache(q, kc2, vc2, k, v, **args, **extra)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        got = pyfastattn.attention_with_kvcache(q, kc, vc, k, v, **args, **extra)
    for g, w in zip(got, want) if isinstance(got, tuple) else [(got, want)]:
        assert not g.requires_grad and g.grad_fn is None, f"{mode}: an output carries a graph ({g.grad_fn})"
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    torch.testing.assert_close(kc, kc2, atol=0, rtol=0)
    torch.testing.assert_close(vc, vc2, atol=0, rtol=0)


def test_reference_backend_matches_kernel():
    q, kc, vc, k, v, args = make_case(block=16, rotary="half", sq=2, s_new=2)
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    out1 = pyfastattn.attention_with_kvcache(q, kc1, vc1, k, v, **args, causal=True)
    with pyfastattn.backend("reference"):
        out2 = pyfastattn.attention_with_kvcache(q, kc2, vc2, k, v, **args, causal=True)
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc1, kc2)


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("block", [None, 4], ids=["contiguous", "paged"])
def test_left_only_window_gets_right_bound_capacity(block, mode):
    # FlashAttention 2's mha_fwd_kvcache gives a left-only window without
    # causal the right bound seqlen_k = the cache's capacity (set_params_fprop).
    # With more query rows than capacity + 1 that bound cuts keys for the first
    # rows (row i sits at key i + len_k - Sq); we left them unbounded.
    cap, sq = 8, 13
    q, kc, vc, _, _, args = make_case(b=2, sq=sq, s_new=0, hq=2, hk=1, d=16, cap=cap, block=block, full=True)
    ref_out, ref_lse, _, _, _ = truth(q, kc, vc, None, None, args, window=(2, cap))
    plain_out, _, _, _, _ = truth(q, kc, vc, None, None, args, window=(2, -1))
    assert (ref_out - plain_out).abs().max() > 0.1  # the bound changes the answer here
    with pyfastattn.backend(mode):
        out, lse = run(q, kc, vc, None, None, args, window_size=(2, -1))
        fa_out = flash_attn_interface.flash_attn_with_kvcache(q, kc, vc, **args, window_size=(2, -1))
    assert_tolerance(f"{mode} out", out, ref_out, None, q.dtype)
    assert_tolerance(f"{mode} flash_attn_with_kvcache out", fa_out, ref_out, None, q.dtype)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("layout", ["column_step", "transposed", "different_row_strides"])
def test_rotary_tables_of_any_layout(layout, mode):
    # The reference path took rotary tables of any strides; the kernel path
    # refused those without unit column stride or with different row strides.
    # Both take them now (the kernel path copies the small tables).
    q, kc, vc, k, v, args = make_case(rotary="half", sq=3, s_new=3, d=32)
    cos, sin = args["rotary_cos"], args["rotary_sin"]
    if layout == "column_step":
        cos, sin = (torch.stack([t, -t], -1).flatten(-2)[:, ::2] for t in (cos, sin))
        assert cos.stride(1) == 2
    elif layout == "transposed":
        cos, sin = (t.t().contiguous().t() for t in (cos, sin))
        assert cos.stride(1) != 1
    else:
        sin = torch.cat([sin, sin], 1)[:, : sin.shape[1]]
        assert sin.stride(0) != cos.stride(0)
    assert torch.equal(cos, args["rotary_cos"]) and torch.equal(sin, args["rotary_sin"])
    with pyfastattn.backend(mode):
        args = dict(args, rotary_cos=cos, rotary_sin=sin)
        check(f"rotary {layout} {mode}", q, kc, vc, k, v, args, causal=True)


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_repeated_batch_idx_with_append_is_refused(mode):
    # Two batch rows appending into one cache row write the same slots (which
    # write wins is undefined; FlashAttention races). Without an append,
    # repeated rows only read and stay allowed.
    q, kc, vc, k, v, args = make_case(b=3, batch_idx=True)
    args["cache_batch_idx"] = torch.tensor([2, 0, 2], dtype=torch.int32)
    before = kc.clone(), vc.clone()
    with pyfastattn.backend(mode):
        with pytest.raises(
            pyfastattn.InvalidArgumentError,
            match=r"cache_batch_idx must not repeat a cache row when k / v are appended .* "
            r"got cache_batch_idx\[0\] = cache_batch_idx\[2\] = 2",
        ):
            run(q, kc, vc, k, v, args)
        assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
        check(f"repeated rows, no append, {mode}", q, kc, vc, None, None, args)


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_paged_append_into_one_slot_twice_is_refused(mode):
    # A block table that sends two appended positions to one cache slot (two
    # sequences' appends into one block row, or one sequence's table listing a
    # block twice over its append range) is the same race as a repeated
    # cache_batch_idx. Blocks that sequences only read (a shared prefix) stay
    # allowed. Blocks of 4 rows, 3 blocks per sequence (capacity 12).
    hq, hk, d = 4, 2, 16
    g = torch.Generator().manual_seed(3)
    pk, pv = torch.randn(8, 4, hk, d, generator=g), torch.randn(8, 4, hk, d, generator=g)
    t32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    new = lambda s: [torch.randn(2, s, h, d, generator=g) for h in (hq, hk, hk)]  # noqa: E731
    cases = [
        # appends at 5-7 and 6-8: sequence 1's positions 6, 7 are block 1's rows 2, 3, as sequence 0's 6, 7
        (new(3), t32(5, 6), t32([0, 1, 2], [3, 1, 4]),
         r"block 1, row 2 for position 6 of sequence 0 and position 6 of sequence 1"),
        # sequence 0 appends at 1-5: 1-3 in block 0 rows 1-3, 4-5 in block 0 (listed again) rows 0-1
        (new(5), t32(1, 2), t32([0, 0, 2], [3, 4, 5]),
         r"block 0, row 1 for position [15] of sequence 0 and position [15] of sequence 0"),
    ]  # fmt: skip
    with pyfastattn.backend(mode):
        for (q, k, v), seqlens, table, where in cases:
            before = pk.clone(), pv.clone()
            with pytest.raises(
                pyfastattn.InvalidArgumentError,
                match=r"block_table must not send two appended positions to one cache slot .*" + where,
            ):
                pyfastattn.attention_with_kvcache(q, pk, pv, k, v, cache_seqlens=seqlens, block_table=table)
            assert torch.equal(pk, before[0]) and torch.equal(pv, before[1])
    # Block 0 shared by both sequences (read only), the appends in blocks of their own: allowed.
    q, k, v = new(3)
    table, seqlens = t32([0, 1, 2], [0, 3, 4]), t32(5, 6)
    outs = []
    for m in (mode, "reference"):
        kc, vc = pk.clone(), pv.clone()
        with pyfastattn.backend(m):
            outs.append(
                pyfastattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table)
            )
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Bad input: each call runs in a subprocess (a wild read or write would crash
# it or corrupt it, not this process) and must raise with a message naming
# the argument. Both the public function and the raw op (the C++ checks).
# ---------------------------------------------------------------------------

BAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch, pyfastattn
    op = torch.ops.pyfastattn.attention_kvcache_fwd
    b, hq, hk, d, cap = 2, 4, 2, 16, 32
    q = torch.randn(b, 1, hq, d); kc = torch.randn(b, cap, hk, d); vc = torch.randn(b, cap, hk, d)
    k = torch.randn(b, 1, hk, d); v = torch.randn(b, 1, hk, d)
    sl = lambda *x: torch.tensor(x, dtype=torch.int32)
    pk = torch.randn(5, 16, hk, d); pv = torch.randn(5, 16, hk, d)
    cos = torch.randn(40, 8); sin = torch.randn(40, 8)
    def raw(q=q, kc=kc, vc=vc, k=k, v=v, seqlens=sl(3, 4), bidx=None, lp=None, bt=None, cos=None, sin=None,
            alibi=None):
        return op(q, kc, vc, k, v, seqlens, bidx, lp, bt, cos, sin, True, 0.25, 0.0, -1, -1, 0, alibi)
    def api(**kw):
        a = dict(k=k, v=v, cache_seqlens=sl(3, 4)); a.update(kw)
        kcc, vcc = a.pop("k_cache", kc), a.pop("v_cache", vc)
        return pyfastattn.attention_with_kvcache(q, kcc, vcc, **a)
    cases = {
        "seqlens_over_capacity": lambda: raw(seqlens=sl(3, 32)),
        "seqlens_negative": lambda: raw(seqlens=sl(-1, 0)),
        "api_seqlens_over_capacity": lambda: api(cache_seqlens=32),
        "block_negative": lambda: raw(kc=pk, vc=pv, bt=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32), seqlens=sl(20, 3)),
        "block_too_large": lambda: raw(kc=pk, vc=pv, bt=torch.tensor([[0, 1], [5, 3]], dtype=torch.int32)),
        "paged_over_capacity": lambda: raw(kc=pk, vc=pv, bt=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), seqlens=sl(32, 0)),
        "api_block_too_large": lambda: api(k_cache=pk, v_cache=pv, block_table=torch.tensor([[0, 1], [9, 3]], dtype=torch.int32)),
        "hk_mismatch": lambda: raw(vc=torch.randn(b, cap, 1, d)),
        "hq_not_multiple": lambda: raw(kc=torch.randn(b, cap, 3, d), vc=torch.randn(b, cap, 3, d), k=torch.randn(b, 1, 3, d), v=torch.randn(b, 1, 3, d)),
        "d_mismatch": lambda: raw(kc=torch.randn(b, cap, hk, d + 1)),
        "new_k_shape": lambda: raw(k=torch.randn(b, 1, hk + 1, d)),
        "batch_idx_range": lambda: raw(bidx=sl(0, 2)),
        "leftpad_range": lambda: raw(lp=sl(4, 0)),
        "rotary_too_short": lambda: raw(seqlens=sl(3, 31), cos=cos[:10], sin=sin[:10]),
        "rotary_dim_too_large": lambda: raw(cos=torch.randn(40, 9), sin=torch.randn(40, 9)),
        "batch_idx_repeated": lambda: raw(kc=torch.randn(3, cap, hk, d), vc=torch.randn(3, cap, hk, d), bidx=sl(1, 1)),
        "api_batch_idx_repeated": lambda: api(cache_batch_idx=sl(0, 0)),
        "seqlens_dtype": lambda: raw(seqlens=torch.tensor([3, 4])),
        "api_dtype": lambda: api(k=k.double(), v=v.double()),
        "alibi_shape": lambda: raw(alibi=torch.ones(hq + 1)),
        "alibi_batch": lambda: raw(alibi=torch.ones(b + 1, hq)),
        "alibi_dtype": lambda: raw(alibi=torch.ones(hq, dtype=torch.float64)),
        "alibi_last_dim": lambda: raw(alibi=torch.ones(hq, b).t()),
    }
    before = (kc.clone(), vc.clone(), pk.clone(), pv.clone())
    for name, fn in cases.items():
        try:
            fn()
            print(f"{name}\\tNO ERROR")
        except Exception as e:
            print(f"{name}\\t{type(e).__name__}: {str(e).splitlines()[0]}")
    untouched = all(torch.equal(a, b) for a, b in zip(before, (kc, vc, pk, pv)))
    print(f"caches_untouched\\t{untouched}")
    """
)

EXPECT = {
    "seqlens_over_capacity": "exceeds the cache's capacity",
    "seqlens_negative": "cache_seqlens[0] must be >= 0",
    "api_seqlens_over_capacity": "capacity",
    "block_negative": "block_table[0, 1] must be in [0, 5)",
    "block_too_large": "block_table[1, 0] must be in [0, 5)",
    "paged_over_capacity": "exceeds the cache's capacity",
    "api_block_too_large": "block_table[1, 0] must be in [0, 5)",
    "hk_mismatch": "v_cache.shape[2]",
    "hq_not_multiple": "multiple of the cache's kv heads",
    "d_mismatch": "k_cache.shape[3]",
    "new_k_shape": "k must have shape",
    "batch_idx_range": "cache_batch_idx[1] must be in [0, 2)",
    "leftpad_range": "cache_leftpad[0] must be in [0, cache_seqlens[0] = 3]",
    "batch_idx_repeated": "cache_batch_idx must not repeat a cache row when k / v are appended",
    "api_batch_idx_repeated": "got cache_batch_idx[0] = cache_batch_idx[1] = 0",
    "rotary_too_short": "seqlen_ro",
    "rotary_dim_too_large": "rotary_dim",
    "seqlens_dtype": "cache_seqlens.dtype must be torch.int32",
    "api_dtype": "k.dtype must equal q.dtype",
    "alibi_shape": "alibi_slopes must have shape (4,) or (2, 4)",
    "alibi_batch": "alibi_slopes must have shape (4,) or (2, 4)",
    "alibi_dtype": "alibi_slopes.dtype must be torch.float32",
    "alibi_last_dim": "alibi_slopes must be contiguous in its last dim",
}


def test_bad_input_refused_in_subprocess():
    r = subprocess.run([sys.executable, "-c", BAD_SCRIPT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"subprocess died (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
    got = dict(line.split("\t", 1) for line in r.stdout.strip().splitlines())
    assert got.pop("caches_untouched") == "True", "a refused call wrote into a cache"
    for name, want in EXPECT.items():
        assert name in got, f"{name}: no result\n{r.stdout}\n{r.stderr}"
        assert want in got[name], f"{name}: expected an error containing {want!r}, got {got[name]!r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [20, 40, 72])
def test_memory_past_a_row_is_never_read(dtype, d):
    # q, k_cache and v_cache are views into buffers whose elements past each
    # row's head dim hold inf: a kernel that loads whole vectors past d (and
    # multiplies them by zero lanes) turns them into NaN.
    q, kc, vc, k, v, args = make_case(d=d, hq=4, hk=2, dtype=dtype, cap=70)

    def padded(t):
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 40), math.inf, dtype=t.dtype)
        buf[..., : t.shape[-1]] = t
        return buf[..., : t.shape[-1]]

    check(f"padded_d{d}", padded(q), padded(kc), padded(vc), k, v, args, causal=True)


def test_head_dim_one_cache_with_any_last_stride():
    # A cache whose head dim is 1, cut with a step from a wider buffer: the
    # stride of a size-1 last dim is never stepped along, so the op takes the
    # cache as it is (it cannot copy it: the append writes in place).
    def cache():
        return torch.randn(2, 8, 1, 2)[..., ::2]

    kc, vc = cache(), cache()
    assert kc.stride(-1) == 2
    kr, vr = kc.clone(), vc.clone()
    q, k, v = torch.randn(2, 1, 2, 1), torch.randn(2, 1, 1, 1), torch.randn(2, 1, 1, 1)
    seqlens = torch.tensor([3, 6], dtype=torch.int32)
    out = pyfastattn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, causal=True)
    ref, _ = reference.attention_with_kvcache(
        q.double(), kr.double(), vr.double(), k.double(), v.double(), cache_seqlens=seqlens, window_right=0
    )
    assert_tolerance("out", out, ref, None, torch.float32)
    assert torch.equal(kc[0, 3], k[0, 0]) and torch.equal(vc[1, 6], v[1, 0])


@pytest.mark.parametrize("mode", ["auto", "reference"])
@pytest.mark.parametrize("block", [None, 4], ids=["contiguous", "paged"])
def test_cache_past_seqlens_is_never_read(block, mode):
    # A cache allocated with torch.empty may hold NaN or inf past
    # cache_seqlens: FlashAttention never reads there, and neither may any
    # path here (the kernel, or the PyTorch path: gather, then attention).
    q, kc, vc, k, v, args = make_case(b=2, sq=3, s_new=2, cap=24, block=block, seed=3)
    seqlens, table = args["cache_seqlens"], args.get("block_table")
    pos = torch.arange(24)
    past = pos >= (seqlens.long() + 2).view(-1, 1)  # (b, cap): positions no call reads
    outs = []
    for fill in (0.0, float("nan"), float("inf")):
        kk, vv = kc.clone(), vc.clone()
        for bi in range(2):
            for t in pos[past[bi]].tolist():
                blk, row = (bi, t) if table is None else (int(table[bi, t // block]), t % block)
                kk[blk, row], vv[blk, row] = fill, -fill
        with pyfastattn.backend(mode):
            outs.append(pyfastattn.attention_with_kvcache(q, kk, vv, k, v, **args, causal=True))
    assert all(torch.isfinite(o).all() for o in outs), "a value past cache_seqlens reached the output"
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_block_table_entries_past_a_sequence_are_not_read(mode):
    # As in FlashAttention, only the blocks holding a sequence's keys are
    # read; the rest of its row may be padding (-1) or a stale block id.
    q, kc, vc, k, v, args = make_case(b=2, sq=2, s_new=1, cap=64, block=16, seed=4)
    args["cache_seqlens"] = torch.tensor([40, 9], dtype=torch.int32)  # 3 and 1 blocks with the new key
    want = pyfastattn.attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, **args, causal=True)
    table = args["block_table"].clone()
    table[0, 3], table[1, 1:] = -1, torch.tensor([999, -7, 10**6], dtype=torch.int32)
    kk, vv = kc.clone(), vc.clone()
    with pyfastattn.backend(mode):
        got = pyfastattn.attention_with_kvcache(
            q, kk, vv, k, v, **{**args, "block_table": table}, causal=True
        )
    torch.testing.assert_close(got, want)


def test_opcheck():
    q, kc, vc, k, v, args = make_case(block=16, rotary="half", sq=2, s_new=2)
    op_args = (q, kc, vc, k, v, args["cache_seqlens"], None, None, args["block_table"], args["rotary_cos"],
               args["rotary_sin"], False, 0.125, 0.0, -1, 0, 0)  # fmt: skip
    torch.library.opcheck(torch.ops.pyfastattn.attention_kvcache_fwd, op_args)
    torch.library.opcheck(
        torch.ops.pyfastattn.attention_kvcache_fwd, (*op_args, slopes_for(2, 4, per_batch=True))
    )


def tiled_kernel_bits(q, kc, vc, len_k, args, causal):
    """(out, lse) of the tiled kernel (torch.ops.pyfastattn.attention_fwd) on
    the keys gathered from the cache (after the op's append), padded to the
    cache's capacity so that its key tiles are the op's."""
    kk, vv = reference.kvcache_gather(
        kc, vc, len_k.long(), cache_batch_idx=args.get("cache_batch_idx"),
        cache_leftpad=args.get("cache_leftpad"), block_table=args.get("block_table"),
    )  # fmt: skip
    cap = args["capacity"]
    kp = kk.new_zeros(kk.shape[0], cap, *kk.shape[2:])
    vp = vv.new_zeros(vv.shape[0], cap, *vv.shape[2:])
    kp[:, : kk.shape[1]] = kk
    vp[:, : vv.shape[1]] = vv
    d = q.shape[-1]
    return torch.ops.pyfastattn.attention_fwd(
        q, kp, vp, None, None, None, len_k.to(torch.int32), q.shape[1], cap, 1.0 / math.sqrt(d), 0.0, -1,
        0 if causal else -1, True,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "layout", ["plain", "batch_idx", "leftpad", "batch_idx_leftpad", "paged16", "paged16_leftpad", "paged24"]
)
@pytest.mark.parametrize("sq, routed", [(20, True), (16, False)], ids=["80rows", "64rows"])
def test_many_query_rows_take_the_tiled_kernel(dtype, layout, sq, routed):
    # Query rows per kv head (sq x 4) above 64: the op appends, then the tiled
    # forward reads the cache in place (block table, batch index, left
    # padding: csrc/cpu/attention_fwd.cpp), the same bits as the tiled kernel
    # on the gathered keys; at 64 rows the KV-cache kernel runs (other bits).
    # Both match the reference.
    block = 24 if layout == "paged24" else 16 if "paged" in layout else None
    cap = 300
    q, kc, vc, k, v, args = make_case(
        b=3, sq=sq, s_new=sq, hq=8, hk=2, cap=cap, dtype=dtype, batch_idx="batch_idx" in layout,
        leftpad="leftpad" in layout, block=block, full=True,
    )  # fmt: skip
    for causal in (True, False):
        check(f"prefill {layout} causal={causal}", q, kc, vc, k, v, args, causal=causal)
        kc2, vc2 = kc.clone(), vc.clone()
        out, lse = run(q, kc2, vc2, k, v, args, causal=causal)
        lp = args.get("cache_leftpad")
        len_k = args["cache_seqlens"] + sq - (0 if lp is None else lp)
        t_out, t_lse = tiled_kernel_bits(q, kc2, vc2, len_k, dict(args, capacity=cap), causal)
        same = torch.equal(out, t_out) and torch.equal(lse, t_lse)
        assert same == routed, (layout, sq, causal, (out.float() - t_out.float()).abs().max().item())


def test_prefill_rows_without_keys():
    # Left padding that leaves a sequence no key, and a sequence with an empty
    # cache: out 0, lse -inf, on the tiled route (80 query rows per kv head).
    for block in (None, 16):
        q, kc, vc, _, _, args = make_case(b=3, sq=40, s_new=0, hq=4, hk=2, cap=50, leftpad=block is None,
                                          block=block)  # fmt: skip
        args["cache_seqlens"] = torch.tensor([7, 0, 30], dtype=torch.int32)
        if block is None:
            args["cache_leftpad"] = torch.tensor([7, 0, 4], dtype=torch.int32)
        out, lse = check("prefill_empty", q, kc, vc, None, None, args, causal=True)
        empty = [0, 1] if block is None else [1]
        assert (lse[empty] == -math.inf).all() and (out[empty] == 0).all()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_instruction_set_fallbacks(isa):
    # The capped paths (AVX-512 without BF16 dot products, AVX2 and portable
    # both on the portable row steps) in a subprocess: the cap is read once.
    import os

    env = dict(os.environ, PYFASTATTN_CPU_ISA=isa)
    sel = (
        "matches_reference and (decode or paged16 or paged_many_rows or softcap or window or rotary_half or dv_ne_d) "
        "or alibi_matches_reference and (decode_gqa or paged16_gqa or leftpad)"
    )
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", sel],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


_PREFETCH_CHILD = textwrap.dedent(
    """
    import sys, torch, pyfastattn
    from tests.test_kvcache import make_case
    res = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d, block in ((64, None), (97, 16), (128, 64), (128, None)):
            # Two chunks of keys (> 512) so that the split-KV merge runs too.
            q, kc, vc, k, v, args = make_case(b=2, sq=1, s_new=1, hq=8, hk=2, d=d, cap=1100, dtype=dtype,
                                              block=block, full=True, seed=d)
            res.append(pyfastattn.attention_with_kvcache(q, kc, vc, k, v, causal=True, return_lse=True, **args))
    torch.save((torch.ops.pyfastattn.cpu_prefetch_level(), res), sys.argv[1])
    """
)


def _amd_family():
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return 0
    info = {k.strip(): v.strip() for k, v in info.items()}
    return int(info.get("cpu family", "0")) if info.get("vendor_id") == "AuthenticAMD" else 0


def test_prefetch_level_changes_no_bits(tmp_path):
    """PYFASTATTN_CPU_PREFETCH=l1|l2 (read once per process, hence
    subprocesses) picks where the KV-cache kernel's row prefetches go; the
    results are the same bits either way, and the default (auto: l2 on AMD
    family 19h, l1 elsewhere) is one of the two. An unknown value is a clear
    ValueError."""
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    outs = {}
    for level in ("l1", "l2", "auto"):
        path = tmp_path / f"{level}.pt"
        env = dict(os.environ, PYFASTATTN_CPU_PREFETCH=level)
        r = subprocess.run([sys.executable, "-c", _PREFETCH_CHILD, str(path)], capture_output=True, text=True,
                           env=env, cwd=root, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        got, outs[level] = torch.load(path)
        # The setting took effect; auto is l2 exactly on AMD family 19h (Zen 4:
        # /proc/cpuinfo "cpu family : 25"). "none": a CPU without AVX-512,
        # whose portable steps have no prefetches.
        want = level if level != "auto" else ("l2" if _amd_family() == 0x19 else "l1")
        assert got in (want, "none"), (level, got, want)
    assert len(outs["l1"]) == 12
    for i, ((o1, s1), (o2, s2), (o3, s3)) in enumerate(zip(outs["l1"], outs["l2"], outs["auto"])):
        assert not torch.isnan(o1).any(), f"case {i}: NaN in the output"
        assert torch.equal(o1, o2) and torch.equal(s1, s2), f"case {i}: l1 and l2 prefetches give other bits"
        assert torch.equal(o1, o3) and torch.equal(s1, s3), f"case {i}: the default gives other bits"
    env = dict(os.environ, PYFASTATTN_CPU_PREFETCH="L3")
    r = subprocess.run([sys.executable, "-c", _PREFETCH_CHILD, str(tmp_path / "bad.pt")], capture_output=True,
                       text=True, env=env, cwd=root, timeout=600)  # fmt: skip
    assert r.returncode != 0
    # pyfastattn's InvalidArgumentError, a ValueError
    assert "InvalidArgumentError" in r.stderr and "PYFASTATTN_CPU_PREFETCH must be 'auto'" in r.stderr
    assert "got 'L3'" in r.stderr


@pytest.mark.parametrize("level", ["l1", "l2"])
def test_prefetch_levels_match_reference(level):
    # Both prefetch levels' instantiations of the AVX-512 steps against the
    # reference (the default runs only one of them on a given machine).
    import os

    env = dict(os.environ, PYFASTATTN_CPU_PREFETCH=level)
    sel = "matches_reference and (decode or paged or softcap or window or dv_ne_d or odd_head_dim or kv_head_groups)"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", sel],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " 0 passed" not in r.stdout


def test_decode_benchmark_interleaved_rows_and_csv(tmp_path):
    # decode_kvcache.py's own CSV: an older file (no ratio_to_contiguous /
    # read_probe columns) is rewritten once with them, its row kept; every new
    # row names the probe it is measured against, and each paged layout its
    # median per-round ratio to contiguous.
    import csv
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import decode_kvcache
    finally:
        sys.path.pop(0)
    out = tmp_path / "decode.csv"
    old_fields = decode_kvcache.CSV_FIELDS[:-3]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow({k: "old" for k in old_fields})
    rows = decode_kvcache.main(
        ["--context", "300", "--layout", "contiguous", "paged16", "--reps", "3", "--allocs", "2",
         "--threads", "1", "--no-baselines", "--out", str(out)]
    )  # fmt: skip
    assert [r["layout"] for r in rows] == ["contiguous", "paged16"]
    with open(out, newline="") as f:
        rd = csv.DictReader(f)
        assert rd.fieldnames == decode_kvcache.CSV_FIELDS
        got = list(rd)
    assert len(got) == 3 and got[0]["provider"] == "old" and got[0]["read_probe"] == ""
    probes = set(decode_kvcache.read_probes(1 << 16))
    assert probes >= {"buf.sum()"}
    for r in got[1:]:
        assert r["read_probe"] in probes and 0 < float(r["frac_read_bw"]) and float(r["p50_ms"]) > 0, r
    assert float(got[1]["ratio_to_contiguous"]) == 1.0
    # steps in whole scheduler quanta are flagged (a loaded box), others not
    assert decode_kvcache._on_scheduler_tick([24.0, 23.99, 20.01, 5.8]) == 0.75
    assert decode_kvcache._on_scheduler_tick([5.77, 4.79, 6.16, 7.08]) == 0.0
    assert 0 < float(got[2]["ratio_to_contiguous"]) < 100
    assert got[1]["read_bw_1thread_gbps"] == ""  # one thread: no second probe to compare with
    assert got[0]["cpu_prefetch"] == "" and {r["cpu_prefetch"] for r in got[1:]} <= {"l1", "l2", "none"}
    # On two threads every row also carries the one-thread probe's bandwidth
    # (the memory's state: what the second thread adds).
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = decode_kvcache.run_case(1, 300, torch.bfloat16, ["contiguous"], 2, False, False)
    finally:
        torch.set_num_threads(old_threads)
    assert rows[0]["read_bw_1thread_gbps"] > 0 and rows[0]["read_bw_gbps"] > 0, rows[0]
    assert "one thread" in decode_kvcache._state_note(rows[0])


def test_decode_benchmark_rows_for_run_py():
    # The form benchmarks/run.py takes (smoke grid: tiny, timing meaningless).
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import decode_kvcache
    finally:
        sys.path.pop(0)
    rows = decode_kvcache.run("cpu", ["bfloat16"], quick=True, threads=1, smoke=True)
    provs = {r["provider"] for r in rows}
    assert provs == {"pyfastattn", "torch sdpa (cache views)", "naive (cat + pyfastattn.attention)"}, provs
    for r in rows:
        assert r["suite"] == "decode-kvcache" and r["pass"] == "fwd" and r["status"] == "ok", r
        assert (
            0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["gbps"] > 0 and "read bandwidth" in r["note"]
        )


@pytest.mark.parametrize("d", [64, 128, 96])
@pytest.mark.parametrize("paged", [False, True])
def test_gqa_rows_give_the_bits_of_single_heads(d, paged):
    """A GQA group's query heads share the key loads of the bf16 score step
    (two rows per K load at d 64 / 128, v19 in PERF_NOTES.md), which must not
    change any result bit: each head of an 8:1 group (plus a 3:1 group's odd
    last row) equals, bit for bit, the same head's query run alone against
    the same cache (hq = hk = 1, one row per step). q is scaled by 4 so that
    the dot products' partial sums are large enough for a changed summation
    order to show in the bits (a two-row step that reverses one row's
    accumulation order fails at d 128: checked)."""
    for hq in (8, 3):
        q, kc, vc, k, v, args = make_case(b=2, hq=hq, hk=1, d=d, cap=700, dtype=torch.bfloat16,
                                          block=16 if paged else None, seed=5)  # fmt: skip
        q = (q.float() * 4).to(torch.bfloat16)
        with pyfastattn.backend("kernel"):
            out, lse = pyfastattn.attention_with_kvcache(
                q, kc.clone(), vc.clone(), k, v, **args, return_lse=True
            )
            for h in range(hq):
                o1, l1 = pyfastattn.attention_with_kvcache(
                    q[:, :, h : h + 1].contiguous(), kc.clone(), vc.clone(), k, v, **args, return_lse=True
                )  # fmt: skip
                assert torch.equal(out[:, :, h : h + 1], o1), f"hq {hq} head {h}: output bits differ"
                assert torch.equal(lse[:, h : h + 1], l1), f"hq {hq} head {h}: lse bits differ"
