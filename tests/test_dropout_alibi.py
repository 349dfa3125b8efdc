"""Dropout and ALiBi inside the attention kernels (issue 17).

The keep pattern is a pure function (Philox 4x32-10 of seed, offset, b, h, i,
j): the C++ function (csrc/attention/dropout.h, through the debug
``dropout_mask`` op) and the pure-PyTorch one (``reference.dropout_keep_mask``)
must agree bit for bit, and the kernel's output and gradients are compared
with the float64 reference that drops exactly the same weights."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pyfastattn
from pyfastattn import _ops, functional, reference

from ._helpers import assert_tolerance, default_scale, make_qkv

pytestmark = pytest.mark.skipif(not _ops.AVAILABLE, reason="needs the compiled extension")


# ---------------------------------------------------------------------------
# The keep function
# ---------------------------------------------------------------------------

# Known-answer vectors of Philox 4x32-10 (Random123's kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_reference_philox_known_answers(ctr, key, want):
    words = reference.philox4x32_10(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
    assert tuple(int(w.item()) for w in words) == want


@pytest.mark.parametrize(
    "seed,offset",
    [(0, 0), (1234567, 89), (2**63 - 1, 2**63 - 1), (-1, -(2**40)), (0x0123456789ABCDEF, 2**62 + 12345)],
)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0, 1e-9])
def test_keep_pattern_cpp_equals_reference(seed, offset, p):
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    cpp = torch.ops.pyfastattn.dropout_mask(rng, p, 3, 2, 19, 37)
    ref = reference.dropout_keep_mask(rng, p, 3, 2, 19, 37)
    assert cpp.dtype == torch.bool and cpp.shape == (3, 2, 19, 37)
    assert torch.equal(cpp, ref)
    if p == 1.0:
        assert not cpp.any()


def test_keep_rate_per_row_and_head():
    p, b, h, s = 0.3, 2, 4, 512
    keep = torch.ops.pyfastattn.dropout_mask(torch.tensor([42, 7]), p, b, h, s, s).double()
    row_sigma = math.sqrt(p * (1 - p) / s)
    rows = keep.mean(-1)
    assert ((rows - (1 - p)).abs() <= 4 * row_sigma).all(), (rows - (1 - p)).abs().max()
    head_sigma = math.sqrt(p * (1 - p) / (s * s))
    heads = keep.mean((-1, -2))
    assert ((heads - (1 - p)).abs() <= 4 * head_sigma).all(), (heads - (1 - p)).abs().max()


def test_different_seeds_give_different_patterns():
    a = functional.dropout_mask(functional.draw_dropout_rng("cpu"), 0.5, 1, 2, 64, 64)
    b = functional.dropout_mask(functional.draw_dropout_rng("cpu"), 0.5, 1, 2, 64, 64)
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    c = functional.dropout_mask(functional.draw_dropout_rng("cpu"), 0.5, 1, 2, 64, 64)
    torch.manual_seed(5)
    d = functional.dropout_mask(functional.draw_dropout_rng("cpu"), 0.5, 1, 2, 64, 64)
    assert torch.equal(c, d)


# ---------------------------------------------------------------------------
# Kernel against the reference with the same pattern
# ---------------------------------------------------------------------------

# name: (b, sq, sk, hq, hk, d, options)
CASES = {
    "plain": (2, 97, 97, 2, 2, 32, {}),
    "causal_top_left": (1, 97, 113, 3, 3, 40, dict(window_right=0)),
    "causal_bottom_right": (2, 113, 97, 2, 2, 64, dict(window_right=0, bottom_right=True)),
    "window_br": (1, 65, 130, 2, 2, 32, dict(window_left=8, window_right=0, bottom_right=True)),
    "softcap_gqa_d111": (1, 33, 47, 4, 2, 111, dict(softcap=5.0)),
    "bool_mask": (2, 29, 37, 2, 2, 16, dict(mask="bool")),
    "additive_mask_causal": (2, 19, 41, 3, 3, 16, dict(mask="additive", window_right=0)),
    "seqused_k": (3, 23, 50, 2, 1, 32, dict(seqused=[50, 0, 17])),
    "decode": (2, 1, 77, 4, 2, 64, dict(window_right=0, bottom_right=True)),
    # many key blocks for one kv head: the two-pass backward (fused_chunks = 0)
    "two_pass_bwd": (1, 150, 600, 2, 1, 64, dict(window_right=0, bottom_right=True)),
}

FEATURES = ["dropout", "alibi", "dropout_alibi"]


def _slopes(b, hq, per_batch):
    s = torch.rand(b, hq) * 0.5 + 0.05 if per_batch else torch.rand(hq) * 0.5 + 0.05
    return s.float()


def _inputs(case, dtype):
    b, sq, sk, hq, hk, d, opts = CASES[case]
    q, k, v = make_qkv(b, sq, sk, hq, hk, d, dtype=dtype)
    kw = dict(
        window_left=opts.get("window_left", -1),
        window_right=opts.get("window_right", -1),
        bottom_right=opts.get("bottom_right", False),
        softcap=opts.get("softcap", 0.0),
    )
    mask = opts.get("mask")
    if mask == "bool":
        kw["attn_mask"] = torch.rand(b, 1, sq, sk) > 0.3
    elif mask == "additive":
        kw["attn_mask"] = torch.randn(b, hq, sq, sk).to(dtype)
    if "seqused" in opts:
        kw["seqused_k"] = torch.tensor(opts["seqused"], dtype=torch.int32)
    return q, k, v, kw


def _naive_low_precision(q, k, v, kw, scale, dropout_p, keep, slopes):
    """The same math as the reference, in the inputs' own precision: the
    'plain PyTorch error' of the tolerance rule."""
    b, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hk != hq:
        kt, vt = kt.repeat_interleave(hq // hk, 1), vt.repeat_interleave(hq // hk, 1)
    s = (qt @ kt.transpose(-1, -2)) * scale
    if kw["softcap"] > 0:
        s = torch.tanh(s / kw["softcap"]) * kw["softcap"]
    used = kw.get("seqused_k")
    len_k = torch.full((b,), sk, device=q.device) if used is None else used.long()
    if slopes is not None:
        s = s + reference.alibi_bias(slopes, sq, sk, len_k, torch.float32).to(q.dtype)
    vis = reference._visible(
        sq, sk, len_k, kw["window_left"], kw["window_right"], kw["bottom_right"], q.device
    )
    m = kw.get("attn_mask")
    if m is not None:
        if m.dtype == torch.bool:
            vis = vis & m
        else:
            s = s + m
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if keep is not None:
        p = p * (keep.to(q.dtype) / (1 - dropout_p))
    return (p @ vt).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case, feature, dtype, poison):
    q, k, v, kw = _inputs(case, dtype)
    b, sq, sk, hq = q.shape[0], q.shape[1], k.shape[1], q.shape[2]
    dropout_p = 0.2 if "dropout" in feature else 0.0
    slopes = _slopes(b, hq, per_batch=case in ("plain", "seqused_k")) if "alibi" in feature else None
    rng = torch.tensor([987654321 + sq, 12345 * sk], dtype=torch.int64) if dropout_p else None
    scale = default_scale(q.shape[-1])
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = functional.canonical_attention(
        qs, ks, vs, scale=scale, dropout_p=dropout_p, dropout_rng=rng, alibi_slopes=slopes,
        return_lse=True, **kw,
    )  # fmt: skip
    g = torch.randn_like(out)
    out.backward(g)

    keep = None
    if dropout_p:
        keep = torch.ops.pyfastattn.dropout_mask(rng, dropout_p, b, hq, sq, sk)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    kw64 = dict(kw)
    if "attn_mask" in kw64 and kw64["attn_mask"].dtype != torch.bool:
        kw64["attn_mask"] = kw64["attn_mask"].double()
    ref, ref_lse = reference.attention(
        q64, k64, v64, scale=scale, dropout_p=dropout_p, dropout_mask=keep, alibi_slopes=slopes, **kw64
    )
    ref.backward(g.double())
    base_grads = [None] * 3
    base = None
    if dtype != torch.float32:
        ql, kl, vl = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        base = _naive_low_precision(ql, kl, vl, kw, scale, dropout_p, keep, slopes)
        base.backward(g)
        base_grads = [ql.grad, kl.grad, vl.grad]
    assert_tolerance(f"{case}/{feature} out", out, ref.detach(), base, dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= 1e-3 * (1 + ref_lse[finite].abs().max())
    for name, got, want, bg in zip(
        "qkv", (qs.grad, ks.grad, vs.grad), (q64.grad, k64.grad, v64.grad), base_grads
    ):
        assert_tolerance(f"{case}/{feature} d{name}", got, want, bg, dtype)


@pytest.mark.parametrize("feature", FEATURES)
def test_varlen_matches_reference(feature, poison):
    lens_q, lens_k = [5, 0, 37, 64], [9, 3, 37, 130]
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    hq, hk, d = 4, 2, 32
    q = torch.randn(int(cq[-1]) + 3, hq, d, requires_grad=True)
    k = torch.randn(int(ck[-1]), hk, d, requires_grad=True)
    v = torch.randn(int(ck[-1]), hk, d, requires_grad=True)
    dropout_p = 0.25 if "dropout" in feature else 0.0
    slopes = torch.rand(len(lens_q), hq) * 0.3 if "alibi" in feature else None
    out, lse, keep = pyfastattn.attention(
        q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True, dropout_p=dropout_p,
        alibi_slopes=slopes, return_lse=True, return_dropout_mask=True,
    )  # fmt: skip
    assert keep.shape == (len(lens_q), hq, max(lens_q), max(lens_k))
    g = torch.randn_like(out)
    out.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = reference.attention(
        q64, k64, v64, scale=default_scale(d), cu_seqlens_q=cq, cu_seqlens_k=ck, window_right=0,
        bottom_right=True, dropout_p=dropout_p, dropout_mask=keep if dropout_p else None, alibi_slopes=slopes,
    )  # fmt: skip
    ref.backward(g.double())
    assert_tolerance(f"varlen/{feature} out", out, ref.detach(), None, torch.float32)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad)):
        assert_tolerance(f"varlen/{feature} d{name}", got, want, None, torch.float32)


def test_returned_pattern_is_the_one_applied():
    """Zeroing v's rows shows which weights the kernel kept: with v = e_j for
    one key j, out[i] = P[i, j] * keep[i, j] / (1 - p)."""
    b, s, h, d = 1, 40, 2, 8
    q = torch.randn(b, s, h, d)
    k = torch.randn(b, s, h, d)
    v = torch.zeros(b, s, h, d)
    v[:, :, :, 0] = 1.0  # out[..., 0] = sum_j P * keep / (1 - p): 1 without dropout
    torch.manual_seed(3)
    out, keep = pyfastattn.attention(q, k, v, dropout_p=0.5, return_dropout_mask=True)
    p_ref, _ = reference.attention(
        q.double(), k.double(), torch.eye(s, dtype=torch.float64)[None, :, None, :].expand(b, s, h, s),
        bottom_right=True,
    )  # fmt: skip
    expect = (p_ref.permute(0, 2, 1, 3) * keep).sum(-1) / 0.5  # (b, h, sq)
    torch.testing.assert_close(out[..., 0].permute(0, 2, 1).double(), expect, rtol=1e-5, atol=1e-6)


def test_p_one_drops_everything_and_p_zero_is_plain():
    q, k, v = make_qkv(1, 33, 33, 2, 2, 16)
    out = pyfastattn.attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(pyfastattn.attention(q, k, v, dropout_p=0.0), pyfastattn.attention(q, k, v))


def test_reproducible_under_manual_seed_and_generator():
    q, k, v = make_qkv(2, 70, 70, 2, 2, 16)
    torch.manual_seed(11)
    a = pyfastattn.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(11)
    b = pyfastattn.attention(q, k, v, dropout_p=0.3)
    c = pyfastattn.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(b, c)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    state = torch.get_rng_state()
    x = pyfastattn.attention(q, k, v, dropout_p=0.3, generator=g1)
    y = pyfastattn.attention(q, k, v, dropout_p=0.3, generator=g2)
    assert torch.equal(x, y)
    assert torch.equal(state, torch.get_rng_state())  # the default generator was not used


_THREADS_SCRIPT = textwrap.dedent(
    """
    import sys, torch, pyfastattn
    torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 300, 4, 64).to(dtype).requires_grad_(True)
        k = torch.randn(2, 300, 2, 64).to(dtype).requires_grad_(True)
        v = torch.randn(2, 300, 2, 64).to(dtype).requires_grad_(True)
        slopes = torch.rand(4)
        o = pyfastattn.attention(q, k, v, causal=True, dropout_p=0.1, alibi_slopes=slopes)
        o.backward(torch.ones_like(o))
        out += [o.detach(), q.grad, k.grad, v.grad]
    torch.save(out, sys.argv[2])
    """
)


def test_bit_identical_across_thread_counts(tmp_path):
    results = []
    for threads in (1, 3):
        path = tmp_path / f"t{threads}.pt"
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(threads), str(path)], check=True)
        results.append(torch.load(path))
    for a, b in zip(*results):
        assert torch.equal(a, b)


_ISA_SCRIPT = textwrap.dedent(
    """
    import torch
    from pyfastattn import functional, reference
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q = torch.randn(1, 77, 2, 24).to(dtype).requires_grad_(True)
        k = torch.randn(1, 90, 1, 24).to(dtype).requires_grad_(True)
        v = torch.randn(1, 90, 1, 24).to(dtype).requires_grad_(True)
        rng = torch.tensor([5, 6])
        slopes = torch.rand(2)
        o = functional.canonical_attention(q, k, v, window_right=0, bottom_right=True, dropout_p=0.3,
                                           dropout_rng=rng, alibi_slopes=slopes)
        o.backward(torch.ones_like(o))
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        r, _ = reference.attention(q64, k64, v64, window_right=0, bottom_right=True, dropout_p=0.3,
                                   dropout_rng=rng, alibi_slopes=slopes)
        r.backward(torch.ones_like(r))
        tol = 1e-4 if dtype == torch.float32 else 6e-2
        for a, b in ((o, r), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            err = (a.double() - b).abs().max().item()
            assert err <= tol * (1 + b.abs().max().item()), (dtype, err)
    print("ok")
    """
)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_every_isa_path(isa):
    env = dict(os.environ, PYFASTATTN_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------------------
# ALiBi in the SDPA route, bad input
# ---------------------------------------------------------------------------


def test_alibi_through_sdpa_route_matches_reference():
    q, k, v = make_qkv(2, 30, 45, 4, 2, 16)
    slopes = torch.rand(2, 4)
    out = functional._sdpa_route(
        q, k, v, attn_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, softcap=0.0,
        window_left=-1, window_right=0, bottom_right=True, scale=0.25, dropout_p=0.0, alibi_slopes=slopes,
    )  # fmt: skip
    ref, _ = reference.attention(
        q.double(), k.double(), v.double(), scale=0.25, window_right=0, bottom_right=True, alibi_slopes=slopes
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dropout_p=-0.1), "dropout_p"),
        (dict(dropout_p=1.5), "dropout_p"),
        (dict(dropout_p=float("nan")), "dropout_p"),
        (dict(alibi_slopes=torch.rand(3)), "alibi_slopes must have shape"),
        (dict(alibi_slopes=torch.rand(2, 2, 2)), "alibi_slopes must have shape"),
        (dict(alibi_slopes=torch.rand(2, dtype=torch.float64)), "alibi_slopes.dtype"),
        (dict(alibi_slopes=[0.1, 0.2]), "alibi_slopes must be a torch.Tensor"),
        (dict(alibi_slopes=torch.rand(2, device="meta")), "alibi_slopes.device"),
    ],
)
def test_bad_input(kwargs, match):
    q, k, v = make_qkv(1, 8, 8, 2, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        pyfastattn.attention(q, k, v, **kwargs)


def test_bad_input_op_level():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 8)
    args = (q, k, v, None, None, None, None, 8, 8, 0.3, 0.0, -1, -1, False)
    with pytest.raises(ValueError, match="dropout_rng"):
        torch.ops.pyfastattn.attention_fwd(*args, 0.5, None, None)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        torch.ops.pyfastattn.attention_fwd(*args, 2.0, torch.tensor([1, 2]), None)
    with pytest.raises(ValueError, match="dropout_rng must be"):
        torch.ops.pyfastattn.attention_fwd(*args, 0.5, torch.tensor([1, 2, 3]), None)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        torch.ops.pyfastattn.attention_fwd(*args, 0.0, None, torch.rand(5))
    with pytest.raises(ValueError, match="alibi_slopes.dtype"):
        torch.ops.pyfastattn.attention_fwd(*args, 0.0, None, torch.rand(2).half())


# ---------------------------------------------------------------------------
# The CUDA forward under the CPU emulation of its sm_80 primitives
# ---------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_fp16.h")) or shutil.which("g++") is None,
    reason="needs g++ and the CUDA headers (cuda_fp16.h) for the emulator",
)
def test_emulated_cuda_forward_and_cpu_kernel_drop_the_same_elements(tmp_path):
    """The CUDA forward kernel, run by the emulator
    (csrc/cuda/attention/emu/attention_fwd_emu_test.cc keep-pattern), and the
    CPU kernel, for one (seed, offset): Q = 0 and one-hot V make each output
    element nonzero exactly where its weight is kept, so the two zero patterns
    are the two kernels' keep patterns. Without a GPU this is what ties the
    devices together (test_cpu_and_cuda_drop_the_same_elements does it on one)."""
    exe = tmp_path / "attention_fwd_emu_test"
    src = os.path.join(ROOT, "csrc", "cuda", "attention", "emu", "attention_fwd_emu_test.cc")
    subprocess.run(["g++", "-std=c++17", "-O1", "-DPFA_ATTN_HOST_EMULATION", f"-I{CUDA_INCLUDE}", src, "-o",
                    str(exe)], check=True, capture_output=True, timeout=600)  # fmt: skip
    b, h, s, p = 2, 3, 61, 0.3
    seed, offset = 0x1234_5678_9ABC_DEF0 & (2**62 - 1), 987_654_321_012
    r = subprocess.run([str(exe), "keep-pattern", str(seed), str(offset), str(p), str(b), str(h), str(s)],
                       check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
    cuda_keep = torch.zeros(b, h, s, s, dtype=torch.bool)
    lines = r.stdout.splitlines()
    assert len(lines) == b * h * s, r.stdout[-2000:]
    for line in lines:
        bi, hi, i, bits = line.split()
        cuda_keep[int(bi), int(hi), int(i)] = torch.tensor([c == "1" for c in bits])
    q = torch.zeros(b, s, h, 64)
    v = torch.eye(s, 64)[None, :, None, :].expand(b, s, h, 64).contiguous()
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    with pyfastattn.backend("kernel"):
        out = functional.canonical_attention(q, torch.randn(b, s, h, 64), v, dropout_p=p, dropout_rng=rng)
    cpu_keep = (out[..., :s] != 0).permute(0, 2, 1, 3)
    assert torch.equal(cpu_keep, cuda_keep)
    assert torch.equal(cpu_keep, functional.dropout_mask(rng, p, b, h, s, s))
    assert 0.6 < cpu_keep.double().mean() < 0.8


# ---------------------------------------------------------------------------
# CUDA (run by scripts/gpu_check.sh's `tests` step, marker gpu)
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("case", ["plain", "causal_bottom_right", "bool_mask", "seqused_k", "two_pass_bwd"])
def test_cuda_kernel_matches_reference(case, feature, dtype):
    q, k, v, kw = _inputs(case, dtype)
    q, k, v = (t.cuda() for t in (q, k, v))
    kw = {n: (t.cuda() if torch.is_tensor(t) else t) for n, t in kw.items()}
    if kw["softcap"] > 0 or q.shape[-1] not in (32, 64, 96, 128, 256):
        pytest.skip("not a CUDA head dim")
    b, sq, sk, hq = q.shape[0], q.shape[1], k.shape[1], q.shape[2]
    dropout_p = 0.2 if "dropout" in feature else 0.0
    slopes = _slopes(b, hq, per_batch=True).cuda() if "alibi" in feature else None
    rng = torch.tensor([31337 + sq, 271828 * sk], dtype=torch.int64, device="cuda") if dropout_p else None
    scale = default_scale(q.shape[-1])
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    with pyfastattn.backend("kernel"):
        out = functional.canonical_attention(
            qs, ks, vs, scale=scale, dropout_p=dropout_p, dropout_rng=rng, alibi_slopes=slopes, **kw
        )
    g = torch.randn_like(out)
    out.backward(g)
    keep = None if not dropout_p else functional.dropout_mask(rng, dropout_p, b, hq, sq, sk, "cuda")
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    kw64 = dict(kw)
    if "attn_mask" in kw64 and kw64["attn_mask"].dtype != torch.bool:
        kw64["attn_mask"] = kw64["attn_mask"].double()
    ref, _ = reference.attention(
        q64, k64, v64, scale=scale, dropout_p=dropout_p, dropout_mask=keep, alibi_slopes=slopes, **kw64
    )
    ref.backward(g.double())
    ql, kl, vl = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    base = _naive_low_precision(ql, kl, vl, kw, scale, dropout_p, keep, slopes)
    base.backward(g)
    assert_tolerance(f"cuda {case}/{feature} out", out, ref.detach(), base, dtype)
    for name, got, want, bg in zip("qkv", (qs.grad, ks.grad, vs.grad), (q64.grad, k64.grad, v64.grad),
                                   (ql.grad, kl.grad, vl.grad)):  # fmt: skip
        assert_tolerance(f"cuda {case}/{feature} d{name}", got, want, bg, dtype)


@pytest.mark.gpu
def test_cpu_and_cuda_drop_the_same_elements():
    """Same (seed, offset): v = one-hot key columns make out[i, j] = P[i, j] *
    keep[i, j] / (1 - p), so the zero patterns of the two devices' outputs
    are the keep patterns; they must be equal."""
    s, h, d = 64, 2, 64
    q, k = torch.randn(1, s, h, d).half(), torch.randn(1, s, h, d).half()
    v = torch.eye(s, d).half()[None, :, None, :].expand(1, s, h, d).contiguous()
    rng = torch.tensor([2024, 1203], dtype=torch.int64)
    outs = []
    for dev in ("cpu", "cuda"):
        with pyfastattn.backend("kernel"):
            o = functional.canonical_attention(
                q.to(dev), k.to(dev), v.to(dev), dropout_p=0.5, dropout_rng=rng.to(dev), bottom_right=True
            )
        outs.append(o.cpu())
    assert torch.equal(outs[0] == 0, outs[1] == 0)
    keep = functional.dropout_mask(rng, 0.5, 1, h, s, s)
    assert torch.equal((outs[0] != 0).permute(0, 2, 1, 3), keep[..., :d])
