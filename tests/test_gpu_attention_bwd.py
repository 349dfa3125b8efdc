"""The CUDA attention backward (skipped without a GPU): dQ, dK and dV against
the fp32 reference's gradients under the tolerance rule, over every feature
and odd sizes; the deterministic mode bit for bit across 10 runs.

Gradients flow through torch.ops.pyfastattn.attention_fwd's autograd
registration, whose backward calls the CUDA attention_bwd kernel."""

from __future__ import annotations

import pytest
import torch

from pyfastattn import _ops, reference

from ._helpers import assert_tolerance, naive_attention

pytestmark = pytest.mark.gpu


def _fwd(q, k, v, mask=None, cu=None, used=None, max_q=0, max_k=0, scale=None, softcap=0.0, wl=-1, wr=-1,
         br=True):  # fmt: skip
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cu_q, cu_k = cu if cu is not None else (None, None)
    out, _ = torch.ops.pyfastattn.attention_fwd(
        q, k, v, mask, cu_q, cu_k, used, max_q, max_k, scale, softcap, wl, wr, br
    )
    return out


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


def _check(name, kernel_fn, ref_fn, base_fn, q, k, v, dtype):
    """Kernel grads (NaN-poisoned dout copies must not matter) vs fp32 reference
    grads, with plain low-precision PyTorch's error as the baseline."""
    out_shape = (*q.shape[:-1], v.shape[-1])
    dout = torch.randn(out_shape, device="cuda", dtype=dtype)
    got = _grads(kernel_fn, q, k, v, dout)
    ref = _grads(ref_fn, q.float(), k.float(), v.float(), dout.float())
    base = _grads(base_fn, q, k, v, dout)
    for n, g, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        assert g.dtype == dtype and g.shape == r.shape
        assert_tolerance(f"{name} {n}", g, r, b, dtype)


DENSE_CASES = [
    # b, sq, sk, hq, hk, d, window (l, r), bottom_right, softcap
    (2, 97, 113, 4, 2, 64, (-1, 0), True, 0.0),
    (1, 1, 1025, 2, 1, 128, (-1, -1), True, 0.0),
    (3, 1023, 17, 2, 2, 96, (5, 3), True, 0.0),
    (1, 1025, 1023, 8, 1, 256, (-1, 0), True, 30.0),
    (2, 113, 1023, 4, 4, 32, (-1, 0), False, 0.0),
    (1, 17, 1, 2, 2, 111, (-1, -1), True, 5.0),
    (2, 4096, 4096, 2, 1, 128, (-1, 0), True, 0.0),
    (1, 1025, 4096, 4, 2, 256, (100, 0), True, 0.0),
    (2, 129, 77, 2, 2, 40, (0, 0), False, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", DENSE_CASES)
def test_cuda_backward_dense(case, dtype):
    b, sq, sk, hq, hk, d, (wl, wr), br, cap = case
    q = torch.randn(b, hq, sq, d + 3, device="cuda", dtype=dtype)[..., :d].transpose(1, 2)  # strided
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    scale = d**-0.5
    kw = dict(scale=scale, softcap=cap, window_left=wl, window_right=wr, bottom_right=br)
    _check(
        f"{case}",
        lambda q, k, v: _fwd(q, k, v, scale=scale, softcap=cap, wl=wl, wr=wr, br=br),
        lambda q, k, v: reference.attention(q, k, v, **kw)[0],
        lambda q, k, v: naive_attention(q, k, v, **kw),
        q, k, v, dtype,
    )  # fmt: skip


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize(
    "shape", [(2, 97, 131, 4, 2, 64, (2, 1, 97, 131)), (1, 17, 1025, 2, 2, 128, (1, 2, 1, 1025))]
)
def test_cuda_backward_attn_mask(shape, mask_kind):
    b, sq, sk, hq, hk, d, mshape = shape
    dtype = torch.bfloat16
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    if mask_kind == "bool":
        mask = torch.rand(mshape, device="cuda") > 0.3
        if mshape[2] > 1:
            mask[..., 0, :] = False  # a fully hidden row: zero gradients, not NaN
    else:
        mask = torch.randn(mshape, device="cuda", dtype=dtype)
        mask[torch.rand(mshape, device="cuda") < 0.2] = float("-inf")
    kw = dict(scale=d**-0.5, attn_mask=mask, window_left=-1, window_right=0, bottom_right=False)
    _check(
        f"mask {mask_kind} {shape}",
        lambda q, k, v: _fwd(q, k, v, mask=mask, wr=0, br=False),
        lambda q, k, v: reference.attention(q, k, v, **{**kw, "attn_mask": mask if mask.dtype == torch.bool else mask.float()})[0],
        lambda q, k, v: naive_attention(q, k, v, **kw),
        q, k, v, dtype,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backward_varlen_and_seqused(dtype):
    lens_q, lens_k = [5, 0, 140, 1, 1025], [70, 3, 1, 17, 1023]
    used = torch.tensor([33, 0, 1, 17, 900], dtype=torch.int32, device="cuda")
    hq, hk, d = 4, 2, 64
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q) + 2, hq, d, device="cuda", dtype=dtype)  # 2 rows no sequence owns
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    mq, mk = max(lens_q), max(lens_k)
    kw = dict(scale=d**-0.5, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used, window_left=7, window_right=0,
              bottom_right=True)  # fmt: skip

    def base(q, k, v):  # plain low-precision PyTorch, one sequence at a time
        outs = []
        for i in range(len(lens_q)):
            qs, ks, vs = (t[c[i] : c[i + 1]].unsqueeze(0) for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
            o = naive_attention(qs, ks, vs, scale=d**-0.5, seqused_k=used[i : i + 1], window_left=7, window_right=0,
                                bottom_right=True)  # fmt: skip
            outs.append(o[0].nan_to_num(0.0))
        outs.append(q.new_zeros(2, hq, d))
        return torch.cat(outs)

    _check(
        "varlen",
        lambda q, k, v: _fwd(q, k, v, cu=(cu_q, cu_k), used=used, max_q=mq, max_k=mk, wl=7, wr=0),
        lambda q, k, v: reference.attention(q, k, v, **kw)[0],
        base, q, k, v, dtype,
    )  # fmt: skip


def test_cuda_backward_fully_masked_rows_give_zero_not_nan():
    q = torch.randn(1, 40, 2, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(1, 40, 2, 64, device="cuda", dtype=torch.bfloat16)
    # bottom-right causal with sq > sk: the first 32 query rows see no key
    dq, dk, dv = _grads(lambda q, k, v: _fwd(q, k, v, wr=0, br=True), q, k, v, dout)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:, :32] == 0).all()


def test_cuda_backward_deterministic_bit_identical_10_runs():
    q = torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 1100, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 1100, 2, 128, device="cuda", dtype=torch.bfloat16)
    out, lse = torch.ops.pyfastattn.attention_fwd(
        q, k, v, None, None, None, None, 0, 0, 128**-0.5, 0.0, -1, 0, True
    )
    dout = torch.randn_like(out)

    def bwd():
        return torch.ops.pyfastattn.attention_bwd(
            dout, q, k, v, out, lse, None, None, None, None, 0, 0, 128**-0.5, 0.0, -1, 0, True, True
        )

    first = bwd()
    for _ in range(9):
        again = bwd()
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    # and the deterministic result is a correct one (same as the atomic mode, to rounding)
    fast = torch.ops.pyfastattn.attention_bwd(
        dout, q, k, v, out, lse, None, None, None, None, 0, 0, 128**-0.5, 0.0, -1, 0, True, False
    )
    for a, b in zip(first, fast):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_cuda_backward_is_registered():
    assert _ops.has_kernel("attention_bwd", "cuda")


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_grid_split_past_65535_heads_times_batch(deterministic):
    """heads * batch = 70000 > 65535: the forward and the backward row kernels
    put (head, sequence) on grid y and z (65535 x 2, the second slab mostly
    rounding), and so does the backward's key grid with hk = hq. Only real
    hardware enforces the 65535 limit; the emulator runs any grid."""
    b, s, h, d = 35000, 3, 2, 32
    dtype = torch.bfloat16
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3))
    scale = d**-0.5
    out, lse = torch.ops.pyfastattn.attention_fwd(
        q, k, v, None, None, None, None, 0, 0, scale, 0.0, -1, 0, True
    )
    dout = torch.randn_like(out)
    dq, dk, dv = torch.ops.pyfastattn.attention_bwd(
        dout, q, k, v, out, lse, None, None, None, None, 0, 0, scale, 0.0, -1, 0, True, deterministic
    )
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.attention(qf, kf, vf, scale=scale, window_right=0, bottom_right=True)
    ref = torch.autograd.grad(ref_out, (qf, kf, vf), dout.float())
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-2)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2, msg=name)


# Run in a child process so that a turn-taking deadlock (a CTA waiting for a
# turn nobody passes on, or for a CTA not yet resident) fails this test after
# the timeout (60 s; the work takes seconds) instead of hanging the GPU
# session's tests step (200 s cap in scripts/gpu_check.sh).
_DETERMINISTIC_STRESS = r"""
import torch, pyfastattn  # noqa: F401  (registers the ops)
torch.manual_seed(0)
lens_q = [4096, 1, 777, 3000, 0, 2048, 1025, 64]
lens_k = [4096, 300, 777, 2999, 5, 2048, 4000, 64]
hq, hk, d, dtype = 8, 2, 128, torch.bfloat16
cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
cu_q, cu_k = cu(lens_q), cu(lens_k)
q = torch.randn(sum(lens_q), hq, d, device="cuda", dtype=dtype)
k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
for wl, wr, br in ((256, 0, True), (100, 37, False), (-1, 0, True), (-1, -1, False)):
    args = (None, cu_q, cu_k, None, max(lens_q), max(lens_k), d**-0.5, 0.0, wl, wr, br)
    out, lse = torch.ops.pyfastattn.attention_fwd(q, k, v, *args)
    dout = torch.randn_like(out)
    bwd = lambda det: torch.ops.pyfastattn.attention_bwd(dout, q, k, v, out, lse, *args, det)
    first = bwd(True)
    again = bwd(True)
    fast = bwd(False)
    torch.cuda.synchronize()
    for a, b, c in zip(first, again, fast):
        assert torch.equal(a, b), (wl, wr, br, "deterministic runs differ")
        torch.testing.assert_close(a.float(), c.float(), atol=2e-2, rtol=2e-2)
print("OK")
"""


def test_cuda_backward_deterministic_turns_never_deadlock():
    """Deterministic dQ turn-taking over sliding windows (both alignments),
    causal and full attention, GQA, varlen with empty and 1-row sequences, and
    ~1000-4000 CTAs per launch (more than an H200 holds at once, so waiting
    CTAs and not-yet-dispatched ones coexist): finishes, bit-identical twice,
    equal to the atomic mode to rounding."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _DETERMINISTIC_STRESS], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]


# More CTAs than the GPU can hold at once, so that CTAs that wait for their
# dQ turn and CTAs that have not started yet coexist: CUDA allows at most 32
# resident CTAs per multiprocessor, so a grid of more than 32 x SMs CTAs runs
# in several waves whatever the occupancy. Bit-equal over two runs; a child
# process under a watchdog (timeout), so that a dispatch-order deadlock fails
# this test instead of hanging the session.
_MULTI_WAVE = r"""
import sys, torch, pyfastattn  # noqa: F401  (registers the ops)
torch.manual_seed(0)
sms = torch.cuda.get_device_properties(0).multi_processor_count
for b, s, hq, hk, d, block_n in ((3, 8192, 16, 16, 64, 64), (3, 4096, 32, 16, 128, 32)):
    ctas = b * hk * -(-s // block_n)  # the main kernel's grid: key blocks x kv heads x batch
    assert ctas > 32 * sms, (ctas, sms)
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16)
    for wl, wr in ((-1, 0), (-1, -1), (300, 0)):
        args = (None, None, None, None, 0, 0, d**-0.5, 0.0, wl, wr, True)
        out, lse = torch.ops.pyfastattn.attention_fwd(q, k, v, *args)
        dout = torch.randn_like(out)
        first = torch.ops.pyfastattn.attention_bwd(dout, q, k, v, out, lse, *args, True)
        again = torch.ops.pyfastattn.attention_bwd(dout, q, k, v, out, lse, *args, True)
        fast = torch.ops.pyfastattn.attention_bwd(dout, q, k, v, out, lse, *args, False)
        torch.cuda.synchronize()
        for name, x, y, z in zip(("dq", "dk", "dv"), first, again, fast):
            assert torch.equal(x, y), (b, s, d, wl, wr, name, "deterministic runs differ")
            torch.testing.assert_close(x.float(), z.float(), atol=3e-2, rtol=3e-2)
    print(f"d{d}: {ctas} CTAs per launch on {sms} SMs", file=sys.stderr)
print("OK")
"""


def test_cuda_backward_deterministic_multi_wave_bit_equal_under_watchdog():
    """The deterministic backward with grids of 6144 CTAs (d 64 and 128; over 32 per
    SM: several waves on any GPU), causal, full and windowed: finishes within
    the watchdog's 90 s, bit-identical twice, equal to the atomic mode to
    rounding."""
    import subprocess
    import sys

    try:
        r = subprocess.run([sys.executable, "-c", _MULTI_WAVE], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("deterministic backward did not finish within 90 s: a dQ turn-taking deadlock?")
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]
