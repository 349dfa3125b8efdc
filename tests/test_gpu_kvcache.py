"""The CUDA KV-cache kernels (skipped without a GPU): append + rotary, split-KV
attention over contiguous and paged caches, and the LSE combine, against the
float64 reference of tests/test_kvcache.py under the tolerance rule, and
against the CPU op on the same inputs; NaN-poisoned allocations; ALiBi;
bad metadata refused before any launch; the backend rule (an unverified GPU
keeps the PyTorch path under "auto"). Every test runs with both split-KV
kernels (PYFASTATTN_KVCACHE_CUDA_KERNEL=simt, the default, and mma)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyfastattn
from pyfastattn import _ops, kvcache, reference

from ._helpers import assert_tolerance
from .test_kvcache import CASES, make_case, truth

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and _ops.has_kernel("attention_kvcache_fwd", "cuda")),
        reason="no CUDA device or no compiled CUDA KV-cache kernel",
    ),
]

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["simt", "mma"], autouse=True)
def split_kernel(request, monkeypatch):
    """Every test runs with each split-KV kernel (PYFASTATTN_KVCACHE_CUDA_KERNEL,
    read on every call): the CUDA-core one (the default) and the tensor-core one."""
    monkeypatch.setenv("PYFASTATTN_KVCACHE_CUDA_KERNEL", request.param)
    return request.param


def to_cuda(q, kc, vc, k, v, args):
    mv = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return mv(q), mv(kc), mv(vc), mv(k), mv(v), {n: mv(t) for n, t in args.items()}


def check_cuda(name, q, kc, vc, k, v, args, causal=False, window=(-1, -1), softcap=0.0, num_splits=0):
    ref_out, ref_lse, ref_kc, ref_vc, base = truth(q, kc, vc, k, v, args, causal, window, softcap)
    gq, gkc, gvc, gk, gv, gargs = to_cuda(q, kc, vc, k, v, args)
    with pyfastattn.backend("kernel"):
        out, lse = pyfastattn.attention_with_kvcache(
            gq, gkc, gvc, gk, gv, **gargs, causal=causal, window_size=window, softcap=softcap,
            num_splits=num_splits, return_lse=True,
        )  # fmt: skip
    out, lse = out.cpu(), lse.cpu()
    assert_tolerance(f"{name} out", out, ref_out, base, q.dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: lse -inf pattern differs"
    assert (lse[~finite] == -math.inf).all() and (out.transpose(1, 2)[~finite] == 0).all()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(gkc.cpu(), ref_kc)  # rotary: one rounding from fp32, FMA may move 1 ulp
    assert torch.equal(gvc.cpu(), ref_vc), f"{name}: v_cache differs from the reference append"
    return out, lse


def _covered(mk) -> bool:
    d, dv = mk.get("d", 64), mk.get("dv")
    rd = mk.get("rotary_dim") or d
    return d % 8 == 0 and (dv is None or dv == d) and (mk.get("rotary") is None or rd % 16 == 0)


CUDA_CASES = [c for c in CASES if _covered(c[1])]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,mk,ck", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_cuda_kvcache_matches_reference(name, mk, ck, dtype, poison):
    q, kc, vc, k, v, args = make_case(dtype=dtype, **mk)
    check_cuda(name, q, kc, vc, k, v, args, **ck)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("block", [16, 64, 256])
@pytest.mark.parametrize("num_splits", [0, 1, 5])
def test_cuda_kvcache_paged_decode_gqa(block, num_splits, dtype, poison):
    # The decode shape at a small context: Hq 32 / Hk 8, d 128, paged.
    q, kc, vc, k, v, args = make_case(b=3, hq=32, hk=8, d=128, cap=700, block=block, dtype=dtype,
                                      rotary="half", full=True)  # fmt: skip
    check_cuda(f"paged{block}", q, kc, vc, k, v, args, causal=True, num_splits=num_splits)


@pytest.mark.parametrize("d", [64, 96, 256])
def test_cuda_kvcache_head_dims_and_splits(d, poison):
    q, kc, vc, k, v, args = make_case(b=1, hq=4, hk=1, d=d, cap=1500, dtype=torch.bfloat16, full=True,
                                      leftpad=True)  # fmt: skip
    for splits in (1, 3, 64):
        check_cuda(f"d{d} splits{splits}", q, kc, vc, k, v, args, num_splits=splits)


@pytest.mark.parametrize("per_batch", [False, True])
def test_cuda_kvcache_alibi(per_batch, poison):
    q, kc, vc, k, v, args = make_case(b=2, hq=8, hk=2, d=64, cap=300, block=16, dtype=torch.bfloat16, sq=2,
                                      s_new=2)  # fmt: skip
    slopes = torch.rand(2, 8) * 0.5 if per_batch else torch.rand(8) * 0.5
    s_new = k.shape[1]
    ref_kc, ref_vc = kc.clone(), vc.clone()
    reference.kvcache_append_(ref_kc, ref_vc, k, v, args["cache_seqlens"], block_table=args["block_table"])
    len_k = args["cache_seqlens"].long() + s_new
    kk, vv = reference.kvcache_gather(ref_kc, ref_vc, len_k, block_table=args["block_table"])
    scale = 1 / 8
    ref_out, ref_lse = reference.attention(
        q.double(), kk.double(), vv.double(), scale=scale, seqused_k=len_k.to(torch.int32), window_right=0,
        bottom_right=True, alibi_slopes=slopes,
    )  # fmt: skip
    gq, gkc, gvc, gk, gv, gargs = to_cuda(q, kc, vc, k, v, args)
    out, lse = torch.ops.pyfastattn.attention_kvcache_fwd(
        gq, gkc, gvc, gk, gv, gargs["cache_seqlens"], None, None, gargs["block_table"], None, None, True, scale,
        0.0, -1, 0, 3, slopes.cuda(),
    )  # fmt: skip
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("block", [None, 64])
def test_cuda_kvcache_matches_cpu_op(block, poison):
    q, kc, vc, k, v, args = make_case(b=2, hq=8, hk=2, d=128, cap=400, block=block, dtype=torch.bfloat16,
                                      rotary="interleaved", sq=3, s_new=3, leftpad=block is None)  # fmt: skip
    with pyfastattn.backend("kernel"):
        kc1, vc1 = kc.clone(), vc.clone()
        out_c, lse_c = pyfastattn.attention_with_kvcache(
            q, kc1, vc1, k, v, **args, causal=True, return_lse=True
        )
        gq, gkc, gvc, gk, gv, gargs = to_cuda(q, kc, vc, k, v, args)
        out_g, lse_g = pyfastattn.attention_with_kvcache(gq, gkc, gvc, gk, gv, **gargs, causal=True,
                                                         return_lse=True)  # fmt: skip
    torch.testing.assert_close(out_g.cpu(), out_c, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_g.cpu(), lse_c, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(gkc.cpu(), kc1)
    assert torch.equal(gvc.cpu(), vc1)


def test_cuda_kvcache_misaligned_new_keys_are_copied(poison):
    q, kc, vc, k, v, args = make_case(b=1, hq=4, hk=2, d=64, cap=50, dtype=torch.float16, s_new=2)
    gq, gkc, gvc, gk, gv, gargs = to_cuda(q, kc, vc, k, v, args)
    flat = torch.empty(gk.numel() + 4, device="cuda", dtype=gk.dtype)
    gk_off = flat[4:].view_as(gk).copy_(gk)  # 8 bytes past an aligned block
    with pyfastattn.backend("kernel"):
        out = pyfastattn.attention_with_kvcache(gq, gkc.clone(), gvc.clone(), gk_off, gv, **gargs)
        want = pyfastattn.attention_with_kvcache(gq, gkc.clone(), gvc.clone(), gk, gv, **gargs)
    assert torch.equal(out, want)


def test_cuda_kvcache_bad_metadata_refused_before_launch():
    """In a fresh process (a crash fails this test, not the whole run): a
    block-table entry past the cache and cache_seqlens past its capacity are
    refused before any launch, and the CUDA context survives."""
    code = textwrap.dedent(
        """
        import torch, pyfastattn
        from tests.test_gpu_kvcache import make_case, to_cuda
        q, kc, vc, k, v, args = make_case(b=2, hq=4, hk=2, d=64, cap=64, block=16, dtype=torch.bfloat16)
        gq, gkc, gvc, gk, gv, gargs = to_cuda(q, kc, vc, k, v, args)
        bad = gargs["block_table"].clone()
        bad[0, 0] = gkc.shape[0]
        for kw in ({"block_table": bad}, {"cache_seqlens": 64}):
            try:
                with pyfastattn.backend("kernel"):
                    pyfastattn.attention_with_kvcache(gq, gkc, gvc, gk, gv, **{**gargs, **kw})
                print("NO ERROR")
            except ValueError as e:
                print("ValueError", str(e).splitlines()[0])
        torch.cuda.synchronize()  # the context survives: nothing was launched
        print("synchronized")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, f"the process died (rc {r.returncode}): {r.stderr[-2000:]}"
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[2] == "synchronized", r.stdout
    assert lines[0].startswith("ValueError block_table[0, 0] must be in [0, "), lines[0]
    assert lines[1].startswith("ValueError") and "capacity" in lines[1], lines[1]


def test_cuda_kvcache_metadata_one_round_trip():
    """The op reads all its metadata (cache_seqlens, block_table, cache_leftpad
    here) on the host with one device-to-host copy, and sends the checked
    values back with one copy from pinned memory (no second wait)."""
    from torch.profiler import ProfilerActivity, profile

    q, kc, vc, k, v, args = make_case(
        b=3, hq=4, hk=2, d=64, cap=64, block=16, leftpad=True, dtype=torch.bfloat16
    )
    gq, gkc, gvc, gk, gv, gargs = to_cuda(q, kc, vc, k, v, args)
    with pyfastattn.backend("kernel"):
        pyfastattn.attention_with_kvcache(gq, gkc, gvc, gk, gv, **gargs)  # warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            pyfastattn.attention_with_kvcache(gq, gkc, gvc, gk, gv, **gargs)
            torch.cuda.synchronize()
    copies = {e.key: e.count for e in prof.key_averages() if e.key.startswith("Memcpy")}
    if not copies:
        pytest.skip("the profiler recorded no CUDA activity (no CUPTI)")
    dtoh = {n: c for n, c in copies.items() if n.startswith("Memcpy DtoH")}
    htod = {n: c for n, c in copies.items() if n.startswith("Memcpy HtoD")}
    assert sum(dtoh.values()) == 1, copies
    assert sum(htod.values()) == 1 and all("Pinned" in n for n in htod), copies


def test_cuda_kvcache_backend_rule():
    q, kc, vc, k, v, args = make_case(b=1, hq=2, hk=1, d=64, cap=40, dtype=torch.bfloat16)
    gq, gkc, gvc, gk, gv, gargs = to_cuda(q, kc, vc, k, v, args)
    cap = torch.cuda.get_device_capability()
    reason = kvcache.kvcache_unsupported_reason(gq, gkc, gvc, mode="auto")
    assert (reason is None) == (tuple(cap) in kvcache.KVCACHE_CUDA_VERIFIED_CAPABILITIES), reason
    assert kvcache.kvcache_unsupported_reason(gq, gkc, gvc, mode="kernel") is None
    assert "float32" in kvcache.kvcache_unsupported_reason(
        gq.float(), gkc.float(), gvc.float(), mode="kernel"
    )
    with pyfastattn.backend("auto"):  # the PyTorch path where unverified: same result
        out = pyfastattn.attention_with_kvcache(gq, gkc.clone(), gvc.clone(), gk, gv, **gargs)
    with pyfastattn.backend("kernel"):
        want = pyfastattn.attention_with_kvcache(gq, gkc.clone(), gvc.clone(), gk, gv, **gargs)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


def test_cuda_kvcache_kernel_switch_refuses_unknown_values(monkeypatch):
    q, kc, vc, k, v, args = make_case(b=1, hq=2, hk=1, d=64, cap=40, dtype=torch.bfloat16)
    gq, gkc, gvc, gk, gv, gargs = to_cuda(q, kc, vc, k, v, args)
    monkeypatch.setenv("PYFASTATTN_KVCACHE_CUDA_KERNEL", "tensorcore")
    with pytest.raises(ValueError, match="PYFASTATTN_KVCACHE_CUDA_KERNEL must be 'simt' \\(the default\\) or 'mma', "
                       "got 'tensorcore'"):  # fmt: skip
        with pyfastattn.backend("kernel"):
            pyfastattn.attention_with_kvcache(gq, gkc, gvc, gk, gv, **gargs)


@pytest.mark.parametrize("block", [None, 16])
def test_cuda_kvcache_kernels_agree_at_decode(block, monkeypatch, poison):
    """Both split kernels on the issue's decode shape at 9k keys, contiguous or
    paged, several splits each: the same result up to rounding (outputs and
    split workspaces start as NaN, so an element left unwritten fails)."""
    q, kc, vc, k, v, args = make_case(b=2, hq=32, hk=8, d=128, cap=9000, block=block, dtype=torch.bfloat16,
                                      full=True)  # fmt: skip
    gq, gkc, gvc, gk, gv, gargs = to_cuda(q, kc, vc, k, v, args)
    outs = {}
    for kernel in ("simt", "mma"):
        monkeypatch.setenv("PYFASTATTN_KVCACHE_CUDA_KERNEL", kernel)
        for splits in (0, 1, 7):
            with pyfastattn.backend("kernel"):
                outs[kernel, splits] = pyfastattn.attention_with_kvcache(
                    gq, gkc.clone(), gvc.clone(), gk, gv, **gargs, causal=True, num_splits=splits, return_lse=True
                )  # fmt: skip
    o0, l0 = outs["simt", 1]
    for key, (o, lse) in outs.items():
        torch.testing.assert_close(o, o0, atol=2e-2, rtol=2e-2, msg=lambda m, key=key: f"{key}: {m}")
        torch.testing.assert_close(lse, l0, atol=2e-3, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
